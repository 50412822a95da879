#!/usr/bin/env bash
# Builds the COMPLETE torch CUDA extension (csrc/*.cpp, csrc/cpu/*, csrc/cuda/*) on a machine without a
# GPU, imports it, and checks that the CUDA kernels are registered. Nothing can run here, but every
# compile and link error of the CUDA build shows up before GPU time is spent.
#
# How: a separate virtual environment (outside the repo) holds the CUDA build of torch; its NVIDIA
# wheels carry the headers and libraries (cuBLAS, cuSPARSE, ...) that a bare toolkit may lack, under
# site-packages/nvidia/cu13/{include,lib}. CUDA_HOME is the toolkit that holds the nvcc on PATH (its
# major version must match torch.version.cuda). The build goes to a temporary folder, so the repo's
# in-place CPU build is untouched.
#
#   bash scripts/check_cuda_build.sh            (venv in ${MINILM_CACHE:-~/.cache/minilm}/venv-cuda)
#   MINILM_CUDA_TORCH=torch==2.14.1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2 bash scripts/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
t0=$SECONDS
die() { echo "check_cuda_build: $*" >&2; exit 1; }

command -v nvcc >/dev/null || die "nvcc is not on PATH (install the CUDA toolkit, or add its bin/ to PATH)"
# nvcc may be a wrapper script; ask nvcc itself where its toolkit lies.
probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
echo '__global__ void k() {}' > "$probe_dir/p.cu"
top=$(nvcc --dryrun -c "$probe_dir/p.cu" -o "$probe_dir/p.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
[ -n "$top" ] || die "could not find the CUDA toolkit from 'nvcc --dryrun'"
export CUDA_HOME=${CUDA_HOME:-$(cd "$top" && pwd -P)}  # TOP is <toolkit>/bin/..
nvcc_ver=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9]*\).*/\1/p')
echo "check_cuda_build: CUDA_HOME=$CUDA_HOME (nvcc $nvcc_ver)"

cache=${MINILM_CACHE:-$HOME/.cache/minilm}
venv=$cache/venv-cuda
torch_req=${MINILM_CUDA_TORCH:-torch==2.14.1}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, ninja, numpy, setuptools; assert torch.version.cuda" 2>/dev/null; then
  echo "check_cuda_build: creating $venv with $torch_req (CUDA build; several GB, once)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$torch_req" numpy ninja setuptools || die "pip install $torch_req failed"
fi
py=$venv/bin/python
read -r torch_ver torch_cuda nv_root < <("$py" -c '
import os, torch
try:
    import nvidia.cu13 as nv; root = list(nv.__path__)[0]
except ImportError:
    root = "-"
print(torch.__version__, torch.version.cuda, root)')
echo "check_cuda_build: torch $torch_ver (CUDA $torch_cuda) in $venv"
[ "${torch_cuda%%.*}" = "${nvcc_ver%%.*}" ] || die "torch is built for CUDA $torch_cuda but nvcc is $nvcc_ver"
if [ "$nv_root" != "-" ]; then
  export CPATH="$nv_root/include${CPATH:+:$CPATH}"
  export LIBRARY_PATH="$nv_root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi

export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
build=$(mktemp -d)
trap 'rm -rf "$probe_dir" "$build"' EXIT
echo "check_cuda_build: building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"
tb=$SECONDS
"$py" setup.py -q build_ext --build-lib "$build/lib" --build-temp "$build/tmp" > "$build/log" 2>&1 \
  || { grep -E "error|Error" "$build/log" | head -40; tail -20 "$build/log"; die "the CUDA build failed"; }
echo "check_cuda_build: built in $((SECONDS - tb)) s"
# A copy of the Python package beside the built _C, imported with the venv's torch.
cp -r "$root/minilm" "$build/lib/minilm.src" && cp "$build"/lib/minilm/_C*.so "$build/lib/minilm.src/" \
  && rm -rf "$build/lib/minilm" && mv "$build/lib/minilm.src" "$build/lib/minilm"
(cd "$build/lib" && MINILM_CACHE="$build/jit" "$py" - <<'PY') || die "the built extension does not import or lacks CUDA kernels"
import torch
import minilm  # noqa: F401  (loads minilm/_C, which registers the ops)
import minilm.ops  # noqa: F401
assert minilm.__file__.startswith(__import__("os").getcwd()), minilm.__file__
ops = ["causal_attention", "causal_attention_backward", "char_cnn", "char_cnn_backward"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"minilm::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for: {missing}"
forward_ops = ["causal_attention", "char_cnn"]  # csrc/autocast.cpp: the backward ops need none
no_autocast = [op for op in forward_ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"minilm::{op}", "AutocastCUDA")]
assert not no_autocast, f"no AutocastCUDA kernel registered for: {no_autocast}"
print("check_cuda_build: CUDA kernels registered for", ", ".join(ops), "and autocast's for", ", ".join(forward_ops))
PY
echo "check_cuda_build: OK in $((SECONDS - t0)) s"
