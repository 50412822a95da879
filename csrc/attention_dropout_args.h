// The attention ops' dropout arguments (dropout_p, seed), checked and turned into the kernels'
// minilm_dropout::Params. Torch side: included by the CPU kernel file and the CUDA glue.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "attention_dropout.h"

namespace minilm {

inline minilm_dropout::Params attention_dropout_params(const char* op, double dropout_p,
                                                       const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p == 0.0) return {};
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": dropout_p > 0 needs a seed (int64 CPU tensor of 2 elements)");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2 && seed->device().is_cpu(), op,
              ": seed must be an int64 CPU tensor of 2 elements, got ", seed->scalar_type(), " ", seed->sizes(),
              " on ", seed->device());
  const at::Tensor words = seed->contiguous();
  return minilm_dropout::make_params(dropout_p, words.data_ptr<int64_t>()[0], words.data_ptr<int64_t>()[1]);
}

}  // namespace minilm
