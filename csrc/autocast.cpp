// The ops under torch.autocast, on the CPU and on CUDA: their floating-point tensors are cast to autocast's
// lower-precision dtype (bf16 or fp16, as the autocast region says), as torch casts SDPA's q, k, v and a
// convolution's input, weight and bias; fp64 tensors stay fp64, as autocast leaves them. So the fused ops
// compute in the dtype that the PyTorch they replace would compute in, and take fp32 inputs beside bf16 ones
// inside an autocast region (an fp32 cache beside a bf16 projection, say). The casts are ordinary
// differentiable ops, recorded by autograd below this key: gradients come back in each input's own dtype.
// Outside an autocast region this key is not in the dispatch set and these functions never run.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "op_handles.h"

#include <optional>
#include <tuple>
#include <vector>

namespace minilm {
namespace {

using at::autocast::cached_cast;

template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> causal_attention_autocast(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale, double dropout_p,
                                                             const std::optional<at::Tensor>& seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return causal_attention_op().call(cached_cast(dtype, q, device), cached_cast(dtype, k, device),
                                    cached_cast(dtype, v, device), scale, dropout_p, seed);  // seed: int64, never cast
}

template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> char_cnn_autocast(const at::Tensor& char_ids, const at::Tensor& embedding,
                                                     at::TensorList weights, at::TensorList biases,
                                                     c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  const std::vector<at::Tensor> w = cached_cast(dtype, weights, device), b = cached_cast(dtype, biases, device);
  return char_cnn_op().call(char_ids, cached_cast(dtype, embedding, device), w, b, activation);  // ids: never cast
}

}  // namespace

// The backward ops need no autocast kernels: they are called with the tensors the forward saved, already cast,
// and autocast passes every op it has no kernel for straight on.
TORCH_LIBRARY_IMPL(minilm, AutocastCPU, m) {
  m.impl("causal_attention", &causal_attention_autocast<c10::DeviceType::CPU>);
  m.impl("char_cnn", &char_cnn_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(minilm, AutocastCUDA, m) {
  m.impl("causal_attention", &causal_attention_autocast<c10::DeviceType::CUDA>);
  m.impl("char_cnn", &char_cnn_autocast<c10::DeviceType::CUDA>);
}

}  // namespace minilm
