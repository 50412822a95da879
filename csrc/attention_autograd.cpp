// The autograd formula of minilm::causal_attention, registered for the Autograd dispatch key in C++ (as
// torchvision registers its ops'), for every device:
//
//     out, lse = causal_attention(q, k, v, scale, dropout_p, seed)
//     dq, dk, dv = causal_attention_backward(grad_out, q, k, v, out, lse, scale, dropout_p, seed)
//
// lse is a by-product the backward reads, not differentiable; the backward op's own gradient raises (the
// kernels compute first derivatives only). The formula sits here rather than in Python
// (torch.library.register_autograd) because attention runs once per layer and step: a forward + backward of a
// tiny input took 54 µs of host time with the Python formula and takes 30 µs in C++ (SDPA: 26-28 µs; one thread
// of a 2-core CPU), and on a GPU a host that falls behind leaves the device idle between kernels. The fake
// (shape) functions that torch.compile needs stay in minilm/ops/attention.py.
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handles.h"

#include <optional>
#include <tuple>

namespace minilm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class CausalAttention : public torch::autograd::Function<CausalAttention> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd may trace backward() (it is plain op calls)

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the CPU / CUDA kernel
    auto [out, lse] = causal_attention_op().call(q, k, v, scale, dropout_p, seed);
    ctx->save_for_backward({q, k, v, out, lse, seed.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    // lse is returned detached (causal_attention_autograd) rather than marked non-differentiable, which
    // compiled autograd does not support for C++ Functions; its gradient is never materialised either.
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // One entry per forward argument: dq, dk, dv, then none for scale, dropout_p and seed.
    const at::Tensor& grad_out = grads[0];  // grads[1] (lse's) is never used
    if (!grad_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> seed = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    // Through the dispatcher with autograd, so that a double backward reaches CausalAttentionBackward's guard.
    auto [dq, dk, dv] = causal_attention_backward_op().call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4],
                                                            ctx->saved_data["scale"].toDouble(),
                                                            ctx->saved_data["dropout_p"].toDouble(), seed);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The backward op computes first derivatives only: a gradient of the gradient (create_graph=True, then
// another backward) raises, rather than autograd treating the op as a constant and returning a wrong
// second derivative with only a warning.
class CausalAttentionBackward : public torch::autograd::Function<CausalAttentionBackward> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dq, dk, dv] = causal_attention_backward_op().call(grad_out, q, k, v, out, lse, scale, dropout_p, seed);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(false, "causal_attention: double backward (the gradient of its gradient, e.g. with create_graph=True) "
                       "is not supported; use the reference implementation for that");
  }
};

std::tuple<at::Tensor, at::Tensor> causal_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale, double dropout_p,
                                                             const std::optional<at::Tensor>& seed) {
  const variable_list out = CausalAttention::apply(q, k, v, scale, dropout_p, seed);
  return {out[0], out[1].detach()};  // lse: not differentiable
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const variable_list g = CausalAttentionBackward::apply(grad_out, q, k, v, out, lse, scale, dropout_p, seed);
  return {g[0], g[1], g[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, Autograd, m) {
  m.impl("causal_attention", &causal_attention_autograd);
  m.impl("causal_attention_backward", &causal_attention_backward_autograd);
}

}  // namespace minilm
