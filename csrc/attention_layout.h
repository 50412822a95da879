// Where causal_attention's results lie in memory. Torch side: included by the CPU kernel file and the CUDA
// glue; minilm/ops/attention.py's fake functions follow the same rule (torch.compile relies on it).
//
// The results (out from the forward; dq, dk, dv from the backward) are [B, H, T, D] tensors laid out
// [B, T, H, D] in memory when q is: heads side by side in every row, as GPT-1's q = x.view(B, T, H, D)
// .transpose(1, 2) and as SDPA returns them. Then the model's y.transpose(1, 2).contiguous() and the view
// backward of its q, k, v copy nothing. For any other q the results are contiguous [B, H, T, D].
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace minilm {

// Whether q (any strides) is [B, T, H, D] in memory: heads closer together than rows. With H = 1 or T = 1 the
// two layouts are the same memory, and the contiguous one is used.
inline bool heads_interleaved(const at::Tensor& q) { return q.size(1) > 1 && q.size(2) > 1 && q.stride(1) < q.stride(2); }

// The strides of a result for q: [B, T, H, D] or [B, H, T, D] in memory (see above).
inline std::array<int64_t, 4> result_strides(const at::Tensor& q) {
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3);
  if (heads_interleaved(q)) return {T * H * D, D, H * D, 1};
  return {H * T * D, T * D, D, 1};
}

// An uninitialised result for q: q's shape, laid out as above.
inline at::Tensor empty_result(const at::Tensor& q) { return at::empty_strided(q.sizes(), result_strides(q), q.options()); }

// x ([B, H, T, D'] with D' >= q's head dim D, any layout) cut to D and laid out as a result for q: x itself
// when it is that already, else a copy.
inline at::Tensor as_result(const at::Tensor& q, const at::Tensor& x) {
  const at::Tensor cut = x.size(3) == q.size(3) ? x : x.narrow(3, 0, q.size(3));
  if (cut.strides() == at::IntArrayRef(result_strides(q))) return cut;
  return empty_result(q).copy_(cut);
}

}  // namespace minilm
