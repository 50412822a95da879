#!/usr/bin/env bash
# Compiles every CUDA kernel file (csrc/cuda/*.cu) with nvcc alone, for sm_80 and sm_90, with the
# macros torch's extension build adds (no implicit half/bfloat16 conversions). Needs nvcc, no GPU and no
# torch: the kernel files include only CUDA and standard headers. Seconds per file.
#   bash scripts/check_cuda_kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda_kernels: nvcc is not on PATH (install the CUDA toolkit)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(-std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas=-warn-spills
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__)
status=0
for f in csrc/cuda/*.cu; do
  for arch in 80 90; do
    t0=$SECONDS
    if nvcc "${flags[@]}" -gencode "arch=compute_$arch,code=sm_$arch" -c "$f" -o "$out/$(basename "$f").$arch.o" \
        2> "$out/log"; then
      echo "check_cuda_kernels: OK   $f sm_$arch ($((SECONDS - t0)) s)"
    else
      echo "check_cuda_kernels: FAIL $f sm_$arch"; status=1
    fi
    grep -v "^$" "$out/log" | sed 's/^/    /' | head -40 || true
  done
done
exit $status
