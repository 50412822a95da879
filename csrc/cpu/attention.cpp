// Causal self-attention on the CPU — first, plain version (one query row at a time).
//
// Forward: for each query row i, an online softmax over keys j <= i keeps a running max m, a running
// sum l and an unnormalised output row; out_i = acc / l and lse_i = m + log(l) is saved so that the
// backward can recompute the probabilities without the T×T matrix.
// Backward: D_i = rowsum(dO_i ∘ O_i); P_ij = exp(scale·q_i·k_j − lse_i); dV_j += P_ij dO_i;
// dS_ij = P_ij (dO_i·v_j − D_i); dQ_i += scale·dS_ij k_j; dK_j += scale·dS_ij q_i.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace minilm {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "causal_attention: q, k, v must be 4-D [B, H, T, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "causal_attention: q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "causal_attention: q, k, v must have the same dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "causal_attention: expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "causal_attention: q, k, v must be on one device");
}

template <typename scalar_t>
void forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                    at::opmath_type<scalar_t>* lse, int64_t BH, int64_t T, int64_t D, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, BH * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / T, i = row % T;
      const scalar_t* qi = q + row * D;
      const scalar_t* kb = k + bh * T * D;
      const scalar_t* vb = v + bh * T * D;
      acc_t m = -std::numeric_limits<acc_t>::infinity(), l = 0;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j <= i; ++j) {
        acc_t s = 0;
        for (int64_t d = 0; d < D; ++d) s += acc_t(qi[d]) * acc_t(kb[j * D + d]);
        s *= acc_t(scale);
        if (s > m) {
          const acc_t corr = std::exp(m - s);
          l *= corr;
          for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
          m = s;
        }
        const acc_t p = std::exp(s - m);
        l += p;
        for (int64_t d = 0; d < D; ++d) acc[d] += p * acc_t(vb[j * D + d]);
      }
      for (int64_t d = 0; d < D; ++d) out[row * D + d] = scalar_t(acc[d] / l);
      lse[row] = m + std::log(l);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                     const scalar_t* out, const at::opmath_type<scalar_t>* lse, scalar_t* dq, scalar_t* dk,
                     scalar_t* dv, int64_t BH, int64_t T, int64_t D, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  // Parallel over batch×heads only: every query row adds into dK and dV of its head.
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dq_acc(D), dk_acc(T * D), dv_acc(T * D), Di(T);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t off = bh * T * D;
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t i = 0; i < T; ++i) {
        acc_t s = 0;
        for (int64_t d = 0; d < D; ++d) s += acc_t(dout[off + i * D + d]) * acc_t(out[off + i * D + d]);
        Di[i] = s;
      }
      for (int64_t i = 0; i < T; ++i) {
        const scalar_t* qi = q + off + i * D;
        const scalar_t* doi = dout + off + i * D;
        std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
        for (int64_t j = 0; j <= i; ++j) {
          const scalar_t* kj = k + off + j * D;
          const scalar_t* vj = v + off + j * D;
          acc_t s = 0, dp = 0;
          for (int64_t d = 0; d < D; ++d) {
            s += acc_t(qi[d]) * acc_t(kj[d]);
            dp += acc_t(doi[d]) * acc_t(vj[d]);
          }
          const acc_t p = std::exp(s * acc_t(scale) - lse[bh * T + i]);
          const acc_t ds = p * (dp - Di[i]) * acc_t(scale);
          for (int64_t d = 0; d < D; ++d) {
            dv_acc[j * D + d] += p * acc_t(doi[d]);
            dq_acc[d] += ds * acc_t(kj[d]);
            dk_acc[j * D + d] += ds * acc_t(qi[d]);
          }
        }
        for (int64_t d = 0; d < D; ++d) dq[off + i * D + d] = scalar_t(dq_acc[d]);
      }
      for (int64_t x = 0; x < T * D; ++x) {
        dk[off + x] = scalar_t(dk_acc[x]);
        dv[off + x] = scalar_t(dv_acc[x]);
      }
    }
  });
}

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, double scale) {
  check_inputs(q_, k_, v_);
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, T}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_cpu", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<at::opmath_type<scalar_t>>(), B * H, T, D,
                             scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale) {
  check_inputs(q_, k_, v_);
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "causal_attention_backward: grad_out and out must have q's shape");
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto dout = dout_.to(q.scalar_type()).contiguous(), out = out_.contiguous();
  auto lse = lse_.to(lse_dtype(q.scalar_type())).contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              lse.data_ptr<at::opmath_type<scalar_t>>(), dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B * H, T, D, scale);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) {
  m.impl("causal_attention", &causal_attention_cpu);
  m.impl("causal_attention_backward", &causal_attention_backward_cpu);
}

}  // namespace minilm
