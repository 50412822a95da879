// Shared by the torch glue files (attention_cuda.cpp, char_cnn_cuda.cpp): torch dtypes -> the kernels' Dtype.
#pragma once

#include <ATen/ATen.h>

#include "kernels.h"

namespace minilm {

// `what` names the tensor in the error, e.g. "causal_attention: q" or "char_cnn: embedding".
inline minilm_cuda::Dtype kernel_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return minilm_cuda::Dtype::kFloat32;
    case at::kDouble: return minilm_cuda::Dtype::kFloat64;
    case at::kBFloat16: return minilm_cuda::Dtype::kBFloat16;
    case at::kHalf: return minilm_cuda::Dtype::kFloat16;
    default: TORCH_CHECK(false, what, " must be float32, float64, bfloat16 or float16, got ", t);
  }
}

}  // namespace minilm
