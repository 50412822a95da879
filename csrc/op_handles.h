// Typed handles of the minilm ops, for the C++ that calls them through the dispatcher (attention_autograd.cpp,
// autocast.cpp). Each is looked up once, on first use. The signatures are the schemas' in csrc/ops.cpp.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace minilm {

using AttentionForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           double, double, const std::optional<at::Tensor>&);
using AttentionBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double, double, const std::optional<at::Tensor>&);
using CharCnnForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                         at::TensorList, c10::string_view);

inline c10::TypedOperatorHandle<AttentionForward> causal_attention_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("minilm::causal_attention", "").typed<AttentionForward>();
  return op;
}

inline c10::TypedOperatorHandle<AttentionBackward> causal_attention_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("minilm::causal_attention_backward", "")
                             .typed<AttentionBackward>();
  return op;
}

inline c10::TypedOperatorHandle<CharCnnForward> char_cnn_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("minilm::char_cnn", "").typed<CharCnnForward>();
  return op;
}

}  // namespace minilm
