// Torch glue for the CUDA causal-attention kernels (attention_kernels.cu): input checks, allocation,
// head-dim padding, dtype dispatch, the current stream, and registration for the CUDA dispatch key.
//
// Which kernel runs:
//   bf16/fp16, D <= 128: the tensor-core flash kernels, built for D = 64 and 128; other head dims are
//     zero-padded to the next of these (zero columns change neither q·k nor the first D output columns,
//     and `scale` is passed explicitly), then the result is cut back to D. q, k, v (and the backward's
//     grad_out and out) are read where they lie when their rows allow it (rows_readable: any strides with
//     16-byte aligned rows, e.g. GPT-1's q, k, v, views into one projection), else copied first. The
//     results (out; dq, dk, dv) are written where they belong (../attention_layout.h: [B, T, H, D] in
//     memory when q is), except with padded head dims (cut and copied there).
//   fp32, fp64, or bf16/fp16 with 128 < D <= 256 or sizes past the tensor-core kernels' limits
//     (use_tensor_cores): the CUDA-core kernels (exact, slower), on contiguous copies; their results are
//     copied into the results' layout where that is not contiguous. The backward also runs them where the
//     GPU lacks the shared memory of the tensor-core backward (attention_backward_tc_fits: D = 128 on a
//     GPU with 99 KB per block).
// Attention dropout (dropout_p, seed) becomes minilm_dropout::Params for either; its mask depends on
// (batch·head, query, key) only, so head-dim padding does not change it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "../attention_dropout_args.h"
#include "../attention_layout.h"
#include "glue.h"
#include "kernels.h"

namespace minilm {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "causal_attention: q, k, v must be 4-D [B, H, T, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "causal_attention: q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "causal_attention: q, k, v must have the same dtype");
  kernel_dtype(q.scalar_type(), "causal_attention: q, k, v");
  TORCH_CHECK(q.is_cuda() && q.device() == k.device() && q.device() == v.device(),
              "causal_attention: q, k, v must be on one CUDA device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  const int64_t D = q.size(3);
  TORCH_CHECK(q.numel() == 0 || (D >= 1 && D <= minilm_cuda::kSimpleMaxHeadDim),
              "causal_attention (CUDA): head dim must be in 1..", minilm_cuda::kSimpleMaxHeadDim, ", got ", D);
  TORCH_CHECK(q.size(2) <= std::numeric_limits<int>::max(), "causal_attention (CUDA): T is too large");
}

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// bf16/fp16 with D <= 128, and sizes small enough for the tensor-core kernels' 32-bit row offsets (within a
// head, where a tile that starts before T may reach up to 127 rows past it; rows_readable checks a strided input's own row
// stride), row indices (B·H·T) and grids (a CTA per tile of 64 or more rows along a grid's y, which ends at
// 65,535: T <= 4,194,240)
bool use_tensor_cores(const at::Tensor& q) {
  const auto t = q.scalar_type();
  const int64_t T = q.size(2), rows = q.size(0) * q.size(1) * T;
  return (t == at::kBFloat16 || t == at::kHalf) && q.size(3) <= 128 && T <= int64_t{65535} * 64 &&
         (T + 128) * 128 <= std::numeric_limits<int>::max() && rows <= std::numeric_limits<int>::max();
}

int64_t padded_head_dim(int64_t D) { return D <= 64 ? 64 : 128; }

bool aligned16(const at::Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; }

// MINILM_ATTN_COPY=1: the tensor-core kernels read contiguous copies of their inputs and write contiguous
// results, which are then copied into the results' layout, as before they read and wrote through strides. A
// diagnostic, read at every call: scripts/gpu_check.sh reruns failed attention tests with it, to tell a fault
// of the strided reads and writes from one of the kernels themselves.
bool copy_io() {
  const char* env = std::getenv("MINILM_ATTN_COPY");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// Whether the tensor-core kernels can read x's rows where they are: head dim Dp, the last dim contiguous, and
// every row 16 bytes aligned (cp.async). Other strides are read as they are (minilm_cuda::Layout), so
// GPT-1's q, k, v, views into one [B, T, 3C] projection, are not copied.
bool rows_readable(const at::Tensor& x, int64_t Dp) {
  if (copy_io() && !x.is_contiguous()) return false;
  if (x.size(3) != Dp || x.stride(3) != 1 || !aligned16(x)) return false;
  for (int d = 0; d < 3; ++d)
    if (x.size(d) > 1 && (x.stride(d) * static_cast<int64_t>(x.element_size())) % 16 != 0) return false;
  // row offsets are 32-bit in the kernels (a tile that starts before T may reach up to 127 rows past it)
  return (x.size(2) + 128) * x.stride(2) <= std::numeric_limits<int>::max();
}

// x as the tensor-core kernels read it: as it is where they can, else a contiguous copy, zero-padded to
// head dim Dp and 16-byte aligned.
at::Tensor prepare(const at::Tensor& x, int64_t Dp) {
  if (rows_readable(x, Dp)) return x;
  at::Tensor c = x.contiguous();
  if (c.size(3) != Dp) return at::constant_pad_nd(c, {0, Dp - c.size(3)}, 0);
  return aligned16(c) ? c : c.clone();
}

minilm_cuda::RowStrides row_strides(const at::Tensor& x) {
  auto stride = [&x](int d) { return x.size(d) > 1 ? x.stride(d) : int64_t{0}; };  // size 1: never stepped along
  return {stride(0), stride(1), static_cast<int>(stride(2))};
}

// Where the tensor-core kernels write a result for q with head dim Dp: in its final layout (../attention_layout.h)
// when they can, else (padded head dims, rows too far apart for 32-bit offsets) contiguous, to be copied into
// that layout by as_result.
at::Tensor tc_result(const at::Tensor& q, int64_t Dp) {
  if (q.size(3) == Dp) {
    at::Tensor res = empty_result(q);
    if (rows_readable(res, Dp)) return res;
  }
  return at::empty({q.size(0), q.size(1), q.size(2), Dp}, q.options());
}

std::tuple<at::Tensor, at::Tensor> causal_attention_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                         const at::Tensor& v_, double scale, double dropout_p,
                                                         const std::optional<at::Tensor>& seed) {
  check_inputs(q_, k_, v_);
  const minilm_dropout::Params dropout = attention_dropout_params("causal_attention", dropout_p, seed);
  const c10::cuda::CUDAGuard guard(q_.device());
  const int64_t B = q_.size(0), H = q_.size(1), T = q_.size(2), D = q_.size(3);
  const auto lse_opts = q_.options().dtype(lse_dtype(q_.scalar_type()));
  if (q_.numel() == 0) return {empty_result(q_), at::empty({B, H, T}, lse_opts)};
  const auto dt = kernel_dtype(q_.scalar_type(), "causal_attention: q, k, v");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (use_tensor_cores(q_)) {
    const int64_t Dp = padded_head_dim(D);
    at::Tensor q = prepare(q_, Dp), k = prepare(k_, Dp), v = prepare(v_, Dp);
    at::Tensor out = tc_result(q_, Dp);
    const minilm_cuda::Layout in{static_cast<int>(H), row_strides(q), row_strides(k), row_strides(v), {}, {},
                                 row_strides(out)};
    at::Tensor lse = at::empty({B, H, T}, lse_opts);
    C10_CUDA_CHECK(minilm_cuda::attention_forward_tc(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), in,
                                                     out.data_ptr(), lse.data_ptr<float>(), B * H, T,
                                                     static_cast<int>(Dp), static_cast<float>(scale), dropout,
                                                     stream));
    return {as_result(q_, out), lse};
  }
  at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, as the CUDA-core kernels write it
  at::Tensor lse = at::empty({B, H, T}, lse_opts);
  C10_CUDA_CHECK(minilm_cuda::attention_forward_simple(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                                       lse.data_ptr(), B * H, T, static_cast<int>(D), scale, dropout,
                                                       stream));
  return {as_result(q_, out), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_inputs(q_, k_, v_);
  const minilm_dropout::Params dropout = attention_dropout_params("causal_attention_backward", dropout_p, seed);
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "causal_attention_backward: grad_out and out must have q's shape ", q_.sizes(), ", got ",
              dout_.sizes(), " and ", out_.sizes());
  const int64_t B = q_.size(0), H = q_.size(1), T = q_.size(2), D = q_.size(3);
  TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == B && lse_.size(1) == H && lse_.size(2) == T,
              "causal_attention_backward: lse must have shape [B, H, T] = [", B, ", ", H, ", ", T, "], got ",
              lse_.sizes());
  TORCH_CHECK(dout_.device() == q_.device() && out_.device() == q_.device() && lse_.device() == q_.device(),
              "causal_attention_backward: all tensors must be on ", q_.device());
  const c10::cuda::CUDAGuard guard(q_.device());
  if (q_.numel() == 0) return {empty_result(q_), empty_result(q_), empty_result(q_)};
  const auto dt = kernel_dtype(q_.scalar_type(), "causal_attention: q, k, v");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor dout_t = dout_.to(q_.scalar_type()), out_t = out_.to(q_.scalar_type());
  if (use_tensor_cores(q_) && minilm_cuda::attention_backward_tc_fits(dt, static_cast<int>(padded_head_dim(D)))) {
    const int64_t Dp = padded_head_dim(D);
    at::Tensor q = prepare(q_, Dp), k = prepare(k_, Dp), v = prepare(v_, Dp);
    at::Tensor dout = prepare(dout_t, Dp), out = prepare(out_t, Dp);
    // dq, dk, dv: one layout, q's (../attention_layout.h)
    at::Tensor dq = tc_result(q_, Dp), dk = tc_result(q_, Dp), dv = tc_result(q_, Dp);
    const minilm_cuda::Layout in{static_cast<int>(H), row_strides(q), row_strides(k), row_strides(v),
                                 row_strides(dout), row_strides(out), row_strides(dq)};
    at::Tensor lse = lse_.to(at::kFloat).contiguous();
    at::Tensor delta = at::empty({B, H, T}, q.options().dtype(at::kFloat));
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    // the fp32 buffer that the schemes with dQ atomics add into (none for the others)
    const bool adds_dq =
        minilm_cuda::attention_backward_tc_adds_dq(dt, static_cast<int>(Dp), dropout.active(), deterministic);
    const auto fp32 = q.options().dtype(at::kFloat);
    at::Tensor dq_accum = adds_dq ? at::empty({B * H, minilm_cuda::attention_dq_rows(T), Dp}, fp32) : at::Tensor();
    C10_CUDA_CHECK(minilm_cuda::attention_backward_tc(
        dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), in, lse.data_ptr<float>(),
        delta.data_ptr<float>(), adds_dq ? dq_accum.data_ptr<float>() : nullptr, dq.data_ptr(), dk.data_ptr(),
        dv.data_ptr(), B * H, T, static_cast<int>(Dp), static_cast<float>(scale), dropout, deterministic, stream));
    return {as_result(q_, dq), as_result(q_, dk), as_result(q_, dv)};
  }
  at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor dout = dout_t.contiguous(), out = out_t.contiguous();
  at::Tensor lse = lse_.to(lse_dtype(q.scalar_type())).contiguous();
  at::Tensor delta = at::empty({B, H, T}, lse.options());
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options()),
             dv = at::empty(q.sizes(), q.options());  // contiguous, as the CUDA-core kernels write them
  C10_CUDA_CHECK(minilm_cuda::attention_backward_simple(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                                        out.data_ptr(), lse.data_ptr(), delta.data_ptr(),
                                                        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B * H, T,
                                                        static_cast<int>(D), scale, dropout, stream));
  return {as_result(q_, dq), as_result(q_, dk), as_result(q_, dv)};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CUDA, m) {
  m.impl("causal_attention", &causal_attention_cuda);
  m.impl("causal_attention_backward", &causal_attention_backward_cuda);
}

}  // namespace minilm
