// Attention dropout without a stored mask: which probabilities P_ij are dropped is a hash of
// (seed, batch·head, query i, key j), so the forward and every backward kernel -- CPU or CUDA, whatever
// their tiling -- regenerate the same decision wherever they need it. The T×T mask is never stored, just as
// the T×T probabilities are not. Included by csrc/cpu/attention.cpp and csrc/cuda/attention_kernels.cu (so
// it uses only the standard library); minilm/ops/attention.py spells out the same steps in PyTorch
// (dropout_keep_mask), and the tests check that every kernel drops exactly the entries it says.
//
//   mix32(x)         = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
//                      (Wellons' "lowbias32": a bijection of the 32-bit integers with strong avalanche)
//   head key  h      = mix32(seed0 ^ mix32(seed1 ^ (bh · 0x85ebca6b)))        bh = b·H + h, seed = (seed0, seed1)
//   row key   r_i    = mix32(h ^ (i · 0x9e3779b9))
//   bits      u_ij   = mix32(r_i ^ (j >> 1))     one hash serves the key pair (2m, 2m + 1): the low 16 bits
//                      are key 2m's uniform number, the high 16 bits key 2m + 1's
//   keep_ij          = (16-bit number of key j) >= threshold,   threshold = round(p · 65536)
//   P'_ij            = P_ij · keep_ij · 65536 / (65536 − threshold)
// so p is applied in steps of 1/65536 (p = 0.1 drops with probability 6554/65536 = 0.100006) and the kept
// values are scaled by the exact inverse of that keep rate, which keeps E[P'] = P. With p = 1 everything is
// dropped and the scale is 0. All arithmetic is on uint32 and wraps modulo 2^32.
//
// The forward saves lse of the undropped scores (dropout acts after the softmax); the backward uses
//   dV = P'ᵀ dO,   dP' = dO Vᵀ,   dP = dP' ∘ keep · scale_keep,   dS = P ∘ (dP − Delta),   Delta = rowsum(dO ∘ O),
// where Delta is unchanged because Σ_j P_ij dP_ij = Σ_j P'_ij dP'_ij = dO_i · O_i.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace minilm_dropout {

MINILM_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

MINILM_HOST_DEVICE uint32_t head_key(uint32_t seed0, uint32_t seed1, uint32_t bh) {
  return mix32(seed0 ^ mix32(seed1 ^ (bh * 0x85ebca6bu)));
}

MINILM_HOST_DEVICE uint32_t row_key(uint32_t head, uint32_t i) { return mix32(head ^ (i * 0x9e3779b9u)); }

// The hash of key pair (j & ~1, j | 1) in row `row` (a row_key).
MINILM_HOST_DEVICE uint32_t pair_bits(uint32_t row, uint32_t j) { return mix32(row ^ (j >> 1)); }

// Key j's 16-bit uniform number, from its pair's bits.
MINILM_HOST_DEVICE uint32_t key_u16(uint32_t bits, uint32_t j) { return (j & 1u) ? bits >> 16 : bits & 0xffffu; }

// Whether key j is kept, from its pair's bits (for kernels that hash a pair once and use both halves).
MINILM_HOST_DEVICE bool kept(uint32_t bits, uint32_t j, uint32_t threshold) { return key_u16(bits, j) >= threshold; }

MINILM_HOST_DEVICE bool keep(uint32_t row, uint32_t j, uint32_t threshold) { return kept(pair_bits(row, j), j, threshold); }

// What a kernel needs: the two seed words, the threshold (0 = no dropout, 65536 = drop everything) and
// the scale of the kept values.
struct Params {
  uint32_t seed0 = 0, seed1 = 0;
  uint32_t threshold = 0;
  double scale = 1.0;  // kernels in fp32 take it as float
  MINILM_HOST_DEVICE bool active() const { return threshold != 0; }
};

// p in [0, 1] -> threshold = round(p · 65536) (p·65536 + 0.5, rounded down), and the scale 65536 / (65536 − threshold).
inline Params make_params(double p, int64_t seed0, int64_t seed1) {
  Params d;
  d.seed0 = static_cast<uint32_t>(seed0);
  d.seed1 = static_cast<uint32_t>(seed1);
  const double t = p * 65536.0 + 0.5;
  d.threshold = t <= 0 ? 0u : (t >= 65536.0 ? 65536u : static_cast<uint32_t>(t));
  d.scale = d.threshold >= 65536u ? 0.0 : 65536.0 / (65536.0 - d.threshold);
  return d;
}

}  // namespace minilm_dropout
