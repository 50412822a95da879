#!/usr/bin/env bash
# The GPU check of the CUDA kernels, for a fresh H100/H200 machine with torch + CUDA installed:
# build (timed) -> import -> pytest tests/test_cuda.py (defaults; attention dropout included; where a test
# failed, the attention tests again with inputs and results copied contiguous) -> attention
# tiling sweep (reports the fastest correct tilings) -> the attention tests with the sweep's picks ->
# char-CNN diagnostics and timings -> benchmarks (with the picks if their tests passed): attention, the
# backward's CTA orders (attn-order), the hardware counters of the main attention kernels next to
# FlashAttention-2's (attn-ncu), char-CNN, where one attention call's time goes (attn-host), GPT-1;
# attention and the GPT-1 step with dropout last.
# Every step runs even when an earlier one failed; a summary closes the log. With $OUT set, the whole
# log is also written to $OUT/gpu_check.log. Meant to finish within 7.5 minutes (GPU_CHECK_BUDGET_S).
# GPU_CHECK_SKIP names steps not to run (e.g. "diag-char-cnn cnn-determinism perf-char-cnn" when the
# char-CNN kernels have not changed since their last GPU run: the CUDA tests still check them; "attn-sweep"
# when the budget must go to the benchmarks and attn-order, which the sweep's 4 minutes would crowd out:
# tests/test_cuda.py checks every tiling for correctness anyway).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
passed=() failed=()
t_all=$SECONDS
step() {  # step NAME TIMEOUT_S CMD...: run, time, record; never stop the script
  local name=$1 limit=$2; shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then echo; echo "=== [$name] skipped: in GPU_CHECK_SKIP"; return; fi
  echo; echo "=== [$name] $* (limit ${limit} s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "=== [$name] rc=$rc in $((SECONDS - t0)) s"
  if [ $rc -eq 0 ]; then passed+=("$name"); else failed+=("$name(rc=$rc)"); fi
}

echo "=== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0), 'sm_%d%d' % torch.cuda.get_device_capability(0))" \
  || { echo "torch sees no CUDA device: nothing to check"; exit 1; }
nvcc --version 2>/dev/null | tail -1 || echo "nvcc not on PATH (torch's CUDA_HOME: $(python -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME)'))"

# On the lent H100/H200 image, CXX points to a relocated GCC wrapper (a g++ with its own as and
# collect2); an extension it builds segfaults whenever a C++ error (TORCH_CHECK) propagates, while the same
# sources built with the distribution's g++ (same GCC 13.3) raise RuntimeError as they should. So prefer
# the system compiler when there is one; MINILM_GPU_CHECK_CXX overrides.
if [ -n "${MINILM_GPU_CHECK_CXX:-}" ]; then export CXX=$MINILM_GPU_CHECK_CXX
elif [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
echo "C++ compiler: ${CXX:-c++}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
export MAX_JOBS=${MAX_JOBS:-16}
build_log=${OUT:-/tmp}/gpu_check_build.log
export build_log
# `timeout` runs programs, not shell functions: the build runs in its own bash. In place (what the tests
# import from the repository root): on the lent image `pip install -e .` fails, because setuptools' develop
# step runs a pip with build isolation, which needs an index the machine cannot reach.
build_cmd='python setup.py build_ext --inplace > "$build_log" 2>&1 && exit 0
grep -E "error" "$build_log" | head -40; tail -20 "$build_log"; exit 1'
left() { echo $(( ${GPU_CHECK_BUDGET_S:-450} - (SECONDS - t_all) )); }  # the whole check's time budget

# 1. The regular build (minilm/_C*.so, used by every later step).
step build 240 bash -c "$build_cmd"
step import 60 python -c "
import torch, minilm
for op in ('causal_attention', 'causal_attention_backward', 'char_cnn', 'char_cnn_backward'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('minilm::' + op, 'CUDA'), 'no CUDA kernel for ' + op
print('CUDA kernels registered; minilm._C from', minilm._C.__file__)"
# 2. Correctness first: the CUDA tests with the built-in defaults (one line per test, so that a run cut
#    short still says which passed).
#    With pytest-xdist (the lent machines have it), four workers share the GPU.
export PYTEST_WORKERS=
python -c "import xdist" 2>/dev/null && PYTEST_WORKERS="-n 4"
step pytest 200 python -m pytest -v -rfE --tb=short -p no:cacheprovider $PYTEST_WORKERS tests/test_cuda.py
#    Where a test failed, the attention tests once more with every input and result copied contiguous
#    (MINILM_ATTN_COPY=1, csrc/cuda/attention_cuda.cpp): a failure only above points to the strided reads and
#    writes, one in both runs to the kernels themselves.
if [[ " ${failed[*]:-} " == *" pytest(rc="* ]]; then
  step pytest-copy 150 env MINILM_ATTN_COPY=1 python -m pytest -q -rfE --tb=line -p no:cacheprovider \
    $PYTEST_WORKERS tests/test_cuda.py -k attention
fi
# 3. Every attention tiling, checked and timed; the fastest correct ones (per head dim) are printed and
#    written to $OUT/attn_best.env as candidates for the defaults in attention_kernels.cu. Then the
#    attention tests once more with the sweep's picks (the environment set for that step only), so that a
#    pick that beats a default can become the default on this run's evidence; then the char-CNN diagnostics.
export MINILM_SWEEP_ENV=${OUT:-/tmp}/attn_best.env
rm -f "$MINILM_SWEEP_ENV"
if [ "$(left)" -gt 60 ]; then step attn-sweep "$(( $(left) < 240 ? $(left) : 240 ))" python scripts/cuda_diagnostics.py attn-sweep
else echo "=== [attn-sweep] skipped: out of time"; fi
if grep -q '^export' "$MINILM_SWEEP_ENV" 2>/dev/null && [ "$(left)" -gt 100 ]; then
  step pytest-picks 120 bash -c '. "$MINILM_SWEEP_ENV" &&
    echo "picks: $MINILM_ATTN_FWD / $MINILM_ATTN_BWD / ${MINILM_ATTN_DQ:-}" &&
    python -m pytest -v -rfE --tb=short -p no:cacheprovider $PYTEST_WORKERS tests/test_cuda.py -k "attention and not dropout"'
else echo "=== [pytest-picks] skipped: no picks, or out of time"; fi
# The attention and GPT-1 benchmarks below run with the picks when their tests passed, so that their figures
# are those of the tilings that would become the defaults; else with the defaults. Each says which.
export PICKS=$MINILM_SWEEP_ENV PICKS_OK=
[[ " ${passed[*]:-} " == *" pytest-picks "* ]] && PICKS_OK=1
unset MINILM_SWEEP_ENV
with_tilings='if [ -n "$PICKS_OK" ]; then . "$PICKS"; fi
echo "tilings: ${MINILM_ATTN_FWD:-default} / ${MINILM_ATTN_BWD:-default} / ${MINILM_ATTN_DQ:-default}"; exec "$@"'
step diag-char-cnn 90 python scripts/cuda_diagnostics.py cnn-correct
step cnn-determinism 60 python scripts/cuda_diagnostics.py cnn-determinism
# 4. Speed: the char-CNN breakdown, then the project's benchmarks while there is time.
step perf-char-cnn 90 python scripts/cuda_diagnostics.py cnn-perf
bench() {  # bench NAME: python -m minilm.bench NAME --device cuda --json, while the budget lasts
  if [ "$(left)" -gt 40 ]; then step "bench-$1" "$(left)" bash -c "$with_tilings" _ python -m minilm.bench "$1" --device cuda --json
  else echo "=== [bench-$1] skipped: out of time"; fi
}
bench attention
# The dK/dV kernels' CTA order: the default, the grid's, head groups in 3 phases and in 1, one head at a time.
if [ "$(left)" -gt 70 ]; then step attn-order 60 python scripts/cuda_diagnostics.py attn-order
else echo "=== [attn-order] skipped: out of time"; fi
# The hardware counters of the main attention kernels next to FlashAttention-2's (Nsight Compute; where ncu
# cannot read the counters, the step says so and fails alone).
if [ "$(left)" -gt 60 ]; then step attn-ncu "$(( $(left) < 150 ? $(left) : 150 ))" python scripts/cuda_diagnostics.py attn-ncu
else echo "=== [attn-ncu] skipped: out of time"; fi
bench charcnn
# Where a single attention call's time goes (host, one call, back to back, per kernel) against SDPA flash.
if [ "$(left)" -gt 40 ]; then step attn-host 60 python scripts/cuda_diagnostics.py attn-host
else echo "=== [attn-host] skipped: out of time"; fi
if [ "$(left)" -gt 60 ]; then step bench-gpt1 "$(left)" bash -c "$with_tilings" _ python -m minilm.bench gpt1 --device cuda --json
else echo "=== [bench-gpt1] skipped: out of time"; fi
# Attention with dropout (training mode) against SDPA with dropout_p, default tilings.
if [ "$(left)" -gt 40 ]; then step bench-attention-dropout "$(left)" python -m minilm.bench attention --device cuda --dropout 0.1 --json
else echo "=== [bench-attention-dropout] skipped: out of time"; fi
# The paper's training step (dropout 0.1) with the kernels' dropout against SDPA's.
if [ "$(left)" -gt 60 ]; then step bench-gpt1-dropout "$(left)" python -m minilm.bench gpt1 \
  --device cuda --dropout 0.1 --impls minilm,sdpa,hf --json
else echo "=== [bench-gpt1-dropout] skipped: out of time"; fi

echo
echo "=== summary after $((SECONDS - t_all)) s: passed: ${passed[*]:-none}; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
