// Launchers of minilm's CUDA kernels: raw pointers and a cudaStream_t, no torch types, so that the
// .cu files compile with nvcc alone (scripts/check_cuda_kernels.sh). The torch glue (input checks,
// allocation, the current stream, dtype dispatch, registration) is in attention_cuda.cpp and
// char_cnn_cuda.cpp. Every tensor is contiguous (except the tensor-core attention kernels' inputs and
// results, see Layout); every launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../attention_dropout.h"

namespace minilm_cuda {

enum class Dtype { kFloat32, kFloat64, kBFloat16, kFloat16 };

// ---------------------------------------------------------------- causal attention (attention_kernels.cu)
// q, k, v, out, dout, dq, dk, dv: [BH, T, D] in `dtype`. `dropout`: attention dropout's mask and scale
// (csrc/attention_dropout.h); inactive (threshold 0) = no dropout. The backward takes the forward's.

// Where the rows of one [B, H, T, D] tensor of the tensor-core kernels lie, in elements: row t of head h of
// batch b starts at b·batch + h·head + t·row (the last dim contiguous). So views need no copy, e.g. GPT-1's
// q, k, v, which are slices of one [B, T, 3C] projection (batch = 3CT, head = D, row = 3C). Every row must
// start 16 bytes aligned (cp.async), and (T + 128)·row < 2³¹ (row offsets are 32-bit, fewer registers in
// the kernels' loops; a tile that starts before T may reach up to 127 rows past it). Contiguous: {H·T·D, T·D, D}; [B, T, H, D] in
// memory: {T·H·D, D, H·D}.
struct RowStrides {
  int64_t batch, head;
  int row;
  __host__ __device__ int64_t offset(int bh, int heads) const {  // of row 0 of (batch·head) bh
    return static_cast<int64_t>(bh / heads) * batch + static_cast<int64_t>(bh % heads) * head;
  }
};
// The strides of the inputs (dout and out: the backward only) and of the results the kernels write (`res`:
// out in the forward; dq, dk and dv, which share one layout, in the backward), and H, so that bh = b·H + h.
struct Layout {
  int heads;
  RowStrides q, k, v, dout, out, res;
};

// Tensor-core (mma.sync) flash kernels: bf16/fp16 with head dim 64 or 128 only (the glue pads other
// head dims up to these with zeros). q, k, v (and dout, out) are read, and out (forward) or dq, dk, dv
// (backward) written, as `in` says. lse: [BH, T] fp32.
bool attention_tc_supported(Dtype dtype, int head_dim);
cudaError_t attention_forward_tc(Dtype dtype, const void* q, const void* k, const void* v, const Layout& in,
                                 void* out, float* lse, int64_t BH, int64_t T, int D, float scale,
                                 const minilm_dropout::Params& dropout, cudaStream_t stream);
// Whether this GPU has the shared memory per CTA that the tensor-core backward takes at this head dim: head
// dim 128 needs 113 KB, which GPUs with 99 KB (sm_86/89/120: L4, L40S, RTX 4090) lack. If not, the glue runs
// the CUDA-core backward (the tensor-core forward's out and lse are what it reads).
bool attention_backward_tc_fits(Dtype dtype, int head_dim);
// The rows per head of attention_backward_tc's fp32 dQ buffer: T padded to whole query tiles (64 rows), so
// that its atomics need no bounds checks.
__host__ __device__ constexpr int64_t attention_dq_rows(int64_t T) { return (T + 63) / 64 * 64; }
// Whether attention_backward_tc with these settings runs a scheme that adds dQ with atomics into dq_accum
// (then an fp32 workspace of [BH, attention_dq_rows(T), D], whose first T rows per head it zeroes; else
// unused, and null may be passed).
bool attention_backward_tc_adds_dq(Dtype dtype, int head_dim, bool dropout, bool deterministic);
// delta: [BH, T] fp32 workspace; dq_accum: see attention_backward_tc_adds_dq. deterministic: no atomics
// (torch.use_deterministic_algorithms), so that dQ is bitwise the same run to run.
cudaError_t attention_backward_tc(Dtype dtype, const void* dout, const void* q, const void* k, const void* v,
                                  const void* out, const Layout& in, const float* lse, float* delta,
                                  float* dq_accum, void* dq, void* dk, void* dv, int64_t BH, int64_t T, int D,
                                  float scale, const minilm_dropout::Params& dropout, bool deterministic,
                                  cudaStream_t stream);

// CUDA-core kernels for every dtype and 1 <= D <= kSimpleMaxHeadDim (fp32/fp64, and half types with
// other head dims). lse and delta are fp64 for fp64 inputs, fp32 otherwise.
constexpr int kSimpleMaxHeadDim = 256;
cudaError_t attention_forward_simple(Dtype dtype, const void* q, const void* k, const void* v, void* out,
                                     void* lse, int64_t BH, int64_t T, int D, double scale,
                                     const minilm_dropout::Params& dropout, cudaStream_t stream);
cudaError_t attention_backward_simple(Dtype dtype, const void* dout, const void* q, const void* k, const void* v,
                                      const void* out, const void* lse, void* delta, void* dq, void* dk, void* dv,
                                      int64_t BH, int64_t T, int D, double scale,
                                      const minilm_dropout::Params& dropout, cudaStream_t stream);

// ---------------------------------------------------------------- char-CNN (char_cnn_kernels.cu)
// One convolution width: weight [F, E, W] and bias [F] in the embedding's dtype; its F output columns
// start at `offset` in out [N, total_filters].
struct CharCnnWidth {
  const void* weight;
  const void* bias;
  int filters;  // F
  int width;    // W
  int offset;
};

enum class Activation { kRelu = 0, kTanh = 1 };

// ids [N, L] int64 (already checked to lie in [0, V)); emb [V, E]; out [N, total]; argmax [N, total] int16
// (t* <= L − W <= 32,767, checked by the glue).
cudaError_t char_cnn_forward(Dtype dtype, const int64_t* ids, const void* emb, int64_t N, int L, int V, int E,
                             const CharCnnWidth* widths, int n_widths, int total_filters, Activation act,
                             void* out, int16_t* argmax, cudaStream_t stream);

// Workspace of char_cnn_backward, in elements of the accumulation type (fp64 for fp64 inputs, fp32
// otherwise): the dW/db partial sums of every token chunk and the per-CTA [V, E] d(embedding) tables.
int64_t char_cnn_backward_partial_elems(Dtype dtype, int64_t N, int L, int V, int E, const CharCnnWidth* widths,
                                        int n_widths);
// Whether one token's [L, E] gradient fits in shared memory (else the backward cannot run).
bool char_cnn_backward_supported(Dtype dtype, int L, int V, int E, const CharCnnWidth* widths, int n_widths);
// grad_params: [sum_i F_i * (E*W_i + 1)] accumulation type; for width i, starting at sum_{j<i} F_j*(E*W_j+1),
//   row f holds dW[f] (E*W values, [E][W] order) followed by db[f].
// grad_emb: [V, E] accumulation type (every element written).
// Deterministic: no atomics; every sum runs in a fixed order.
cudaError_t char_cnn_backward(Dtype dtype, const void* grad_out, const int64_t* ids, const void* emb, int64_t N,
                              int L, int V, int E, const CharCnnWidth* widths, int n_widths, int total_filters,
                              Activation act, const void* out, const int16_t* argmax, void* partial,
                              void* grad_params, void* grad_emb, cudaStream_t stream);

}  // namespace minilm_cuda
