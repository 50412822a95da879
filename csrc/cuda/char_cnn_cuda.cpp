// Torch glue for the CUDA char-CNN kernels (char_cnn_kernels.cu): input checks (including the range of
// the character ids: a min/max reduction on the device, compared on the host, before any kernel reads the
// embedding with them), allocation, dtype dispatch, the current stream, and registration for the CUDA
// dispatch key.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "glue.h"
#include "kernels.h"

namespace minilm {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();
// argmax holds t* in [0, L − w] as int16 (half the memory of int32): L − w must fit.
constexpr int64_t kMaxArgmax = std::numeric_limits<int16_t>::max();

minilm_cuda::Activation parse_activation(c10::string_view a) {
  if (a == "relu") return minilm_cuda::Activation::kRelu;
  if (a == "tanh") return minilm_cuda::Activation::kTanh;
  TORCH_CHECK(false, "char_cnn: activation must be \"relu\" or \"tanh\", got \"", std::string(a), "\"");
}

// Checks the shapes, dtypes and devices; returns one descriptor per width (pointers into `weights`/`biases`).
std::vector<minilm_cuda::CharCnnWidth> check_inputs(const at::Tensor& ids, const at::Tensor& emb,
                                                    at::TensorList weights, at::TensorList biases,
                                                    bool with_biases, int64_t* total_filters) {
  TORCH_CHECK(ids.dim() == 2, "char_cnn: char_ids must be 2-D [N, L], got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "char_cnn: char_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(emb.dim() == 2, "char_cnn: embedding must be 2-D [V, E], got shape ", emb.sizes());
  kernel_dtype(emb.scalar_type(), "char_cnn: embedding");
  TORCH_CHECK(ids.is_cuda() && emb.device() == ids.device(),
              "char_cnn: char_ids and embedding must be on one CUDA device, got ", ids.device(), " and ", emb.device());
  TORCH_CHECK(!weights.empty(), "char_cnn: weights must hold at least one convolution");
  TORCH_CHECK(!with_biases || weights.size() == biases.size(), "char_cnn: got ", weights.size(), " weights but ",
              biases.size(), " biases");
  const int64_t L = ids.size(1), V = emb.size(0), E = emb.size(1);
  TORCH_CHECK(V >= 1 && E >= 1, "char_cnn: embedding must not be empty, got shape ", emb.sizes());
  TORCH_CHECK(L <= kIntMax && V <= kIntMax && E <= kIntMax, "char_cnn: sizes are too large");
  std::vector<minilm_cuda::CharCnnWidth> widths;
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 3 && w.size(1) == E && w.size(0) >= 1 && w.size(2) >= 1,
                "char_cnn: weights[", i, "] must have shape [F, E=", E, ", W] with F, W >= 1, got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == emb.scalar_type(), "char_cnn: weights[", i, "] must have the embedding's dtype ",
                emb.scalar_type(), ", got ", w.scalar_type());
    TORCH_CHECK(w.device() == emb.device(), "char_cnn: weights[", i, "] must be on ", emb.device());
    if (with_biases) {
      const at::Tensor& b = biases[i];
      TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "char_cnn: biases[", i, "] must have shape [", w.size(0),
                  "], got ", b.sizes());
      TORCH_CHECK(b.scalar_type() == emb.scalar_type(), "char_cnn: biases[", i, "] must have the embedding's dtype ",
                  emb.scalar_type(), ", got ", b.scalar_type());
      TORCH_CHECK(b.device() == emb.device(), "char_cnn: biases[", i, "] must be on ", emb.device());
    }
    TORCH_CHECK(L >= w.size(2), "char_cnn: the words are ", L, " characters long, shorter than the width ",
                w.size(2), " of weights[", i, "]");
    TORCH_CHECK(L - w.size(2) <= kMaxArgmax, "char_cnn: argmax is int16, so L − W must be <= ", kMaxArgmax,
                " for every width W; got L = ", L, " with width ", w.size(2));
    TORCH_CHECK(w.size(0) * E * w.size(2) <= kIntMax, "char_cnn: weights[", i, "] is too large");
    widths.push_back({nullptr, nullptr, static_cast<int>(w.size(0)), static_cast<int>(w.size(2)),
                      static_cast<int>(total)});
    total += w.size(0);
    TORCH_CHECK(total <= kIntMax, "char_cnn: too many filters");
  }
  *total_filters = total;
  return widths;
}

// Character ids index the embedding inside the kernels: check their range first (one small reduction
// and one device-to-host copy), so that a bad id is a Python error, not an illegal memory access.
void check_ids(const at::Tensor& ids, int64_t V) {
  if (ids.numel() == 0) return;
  const auto mm = at::aminmax(ids);
  const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
  const int64_t lo = both[0].item<int64_t>(), hi = both[1].item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < V, "char_cnn: char_ids must lie in [0, ", V, ") (the embedding's rows), got values in [",
              lo, ", ", hi, "]");
}

std::tuple<at::Tensor, at::Tensor> char_cnn_cuda(const at::Tensor& char_ids, const at::Tensor& embedding,
                                                 at::TensorList weights, at::TensorList biases,
                                                 c10::string_view activation) {
  int64_t total = 0;
  auto widths = check_inputs(char_ids, embedding, weights, biases, true, &total);
  const auto act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(char_ids.device());
  const int64_t N = char_ids.size(0), L = char_ids.size(1), V = embedding.size(0), E = embedding.size(1);
  at::Tensor out = at::empty({N, total}, embedding.options());
  at::Tensor argmax = at::empty({N, total}, char_ids.options().dtype(at::kShort));
  if (N == 0) return {out, argmax};
  check_ids(char_ids, V);
  const at::Tensor ids = char_ids.contiguous(), emb = embedding.contiguous();
  std::vector<at::Tensor> keep;  // contiguous copies must outlive the launches
  for (size_t i = 0; i < weights.size(); ++i) {
    keep.push_back(weights[i].contiguous());
    keep.push_back(biases[i].contiguous());
    widths[i].weight = keep[2 * i].data_ptr();
    widths[i].bias = keep[2 * i + 1].data_ptr();
  }
  C10_CUDA_CHECK(minilm_cuda::char_cnn_forward(
      kernel_dtype(emb.scalar_type(), "char_cnn: embedding"), ids.data_ptr<int64_t>(), emb.data_ptr(), N, static_cast<int>(L),
      static_cast<int>(V), static_cast<int>(E), widths.data(), static_cast<int>(widths.size()),
      static_cast<int>(total), act, out.data_ptr(), argmax.data_ptr<int16_t>(), at::cuda::getCurrentCUDAStream()));
  return {out, argmax};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> char_cnn_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& char_ids, const at::Tensor& embedding, at::TensorList weights,
    const at::Tensor& out, const at::Tensor& argmax, c10::string_view activation) {
  int64_t total = 0;
  auto widths = check_inputs(char_ids, embedding, weights, {}, false, &total);
  const auto act = parse_activation(activation);
  const int64_t N = char_ids.size(0), L = char_ids.size(1), V = embedding.size(0), E = embedding.size(1);
  for (const auto* t : {&grad_out, &out, &argmax}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == total,
                "char_cnn_backward: grad_out, out and argmax must have shape [N, sum F] = [", N, ", ", total,
                "], got ", t->sizes());
    TORCH_CHECK(t->device() == embedding.device(), "char_cnn_backward: all tensors must be on ", embedding.device());
  }
  TORCH_CHECK(argmax.scalar_type() == at::kShort, "char_cnn_backward: argmax must be int16, got ", argmax.scalar_type());
  const auto dtype = embedding.scalar_type();
  const auto dt = kernel_dtype(dtype, "char_cnn: embedding");
  TORCH_CHECK(minilm_cuda::char_cnn_backward_supported(dt, static_cast<int>(L), static_cast<int>(V), static_cast<int>(E),
                                                       widths.data(), static_cast<int>(widths.size())),
              "char_cnn_backward (CUDA): one word's gradient [L, E] = [", L, ", ", E,
              "] does not fit in shared memory");
  const c10::cuda::CUDAGuard guard(char_ids.device());
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = embedding.options().dtype(acc_dtype);

  std::vector<at::Tensor> keep;
  for (size_t i = 0; i < weights.size(); ++i) {
    keep.push_back(weights[i].contiguous());
    widths[i].weight = keep[i].data_ptr();
  }
  int64_t P = 0;
  for (const auto& w : widths) P += static_cast<int64_t>(w.filters) * (E * w.width + 1);
  at::Tensor grad_params, grad_emb;
  if (N == 0) {
    grad_params = at::zeros({P}, acc_opts);
    grad_emb = at::zeros({V, E}, acc_opts);
  } else {
    check_ids(char_ids, V);
    const at::Tensor ids = char_ids.contiguous(), emb = embedding.contiguous();
    const at::Tensor go = grad_out.to(dtype).contiguous(), y = out.to(dtype).contiguous(), am = argmax.contiguous();
    const int64_t partial_elems = minilm_cuda::char_cnn_backward_partial_elems(
        dt, N, static_cast<int>(L), static_cast<int>(V), static_cast<int>(E), widths.data(), static_cast<int>(widths.size()));
    at::Tensor partial = at::empty({partial_elems}, acc_opts);
    grad_params = at::empty({P}, acc_opts);
    grad_emb = at::empty({V, E}, acc_opts);
    C10_CUDA_CHECK(minilm_cuda::char_cnn_backward(
        dt, go.data_ptr(), ids.data_ptr<int64_t>(), emb.data_ptr(), N, static_cast<int>(L),
        static_cast<int>(V), static_cast<int>(E), widths.data(), static_cast<int>(widths.size()),
        static_cast<int>(total), act, y.data_ptr(), am.data_ptr<int16_t>(), partial.data_ptr(),
        grad_params.data_ptr(), grad_emb.data_ptr(), at::cuda::getCurrentCUDAStream()));
  }
  // grad_params holds, per width, rows [dW_f (E·W values), db_f]: split them
  std::vector<at::Tensor> grad_weights;
  std::vector<at::Tensor> grad_biases;
  int64_t off = 0;
  for (size_t i = 0; i < widths.size(); ++i) {
    const int64_t F = widths[i].filters, W = widths[i].width, K = E * W;
    const at::Tensor rows = grad_params.narrow(0, off, F * (K + 1)).view({F, K + 1});
    grad_weights.push_back(rows.narrow(1, 0, K).reshape({F, E, W}).to(dtype).contiguous());
    grad_biases.push_back(rows.select(1, K));
    off += F * (K + 1);
  }
  return {grad_emb.to(dtype), grad_weights, at::cat(grad_biases).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CUDA, m) {
  m.impl("char_cnn", &char_cnn_cuda);
  m.impl("char_cnn_backward", &char_cnn_backward_cuda);
}

}  // namespace minilm
