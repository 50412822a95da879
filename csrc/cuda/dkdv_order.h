// The order in which the attention backward's dK/dV CTAs run (attention_kernels.cu: attn_bwd_tc, attn_bwd_2d).
// A CTA owns one key tile (128 keys) of one batch·head; blocks start roughly in the order of their linear
// index lin = blockIdx.y·gridDim.x + blockIdx.x, so the map from lin to (batch·head, key tile) below is the
// schedule. Standard library only: tests/test_cta_order.py compiles this file on the CPU and checks the map
// against a one-line statement of the order.
//
// Two things pull on the order:
// * Balance. Causal key tile kt walks the query rows from its diagonal to T, so key tile 0 is the longest
//   CTA and the last one the shortest. Long CTAs should start first, and the last CTAs to start should be
//   short ones, else most SMs idle while a few finish (a tail).
// * The L2 cache. Every CTA of a head reads the same Q and dO rows (and the fused schemes add into the same
//   fp32 dQ rows). CTAs of one head that run close together in time share them in L2; far apart, each
//   reads them from device memory again.
// The order: the key tiles split into ranges of ceil(key_tiles / phases) tiles (so `phases` ranges at most; in
// order, so the last range holds the shortest CTAs); within a range, heads in groups of head_group; within a group, the
// range's key tiles in order (longest first), for each key tile the group's heads. That is, the CTAs sorted by
//     (kt / tiles per phase, bh / head_group, kt, bh).
// head_group = every head (or one key tile per phase) is the grid's own order, key tile by key tile over all
// heads: the best balance, but a head's CTAs start spread over the whole run. phases = 1 with head_group = 1
// is FlashAttention-2's order (its grid: key tiles fastest, then heads): the best locality, but each head's
// long key tile 0 starts only when the heads before it are done, the last head's near the end.
//
// The default (default_dkdv_order) comes from a model, not from a measurement: SMs stepping in lockstep through
// query tiles, one LRU cache of an H100's 50 MB over the rows (scripts/cta_order_model.py). At the benchmark
// shapes of the attention targets, with the group sizes of the rule below:
//   shape (B, H, T, D)   grid order     groups, 1 phase   groups, 3 phases   one head, 1 phase (FA2)
//   (32, 12, 512, 64)    1.03x  1.7x    1.10x  1.0x       1.10x  1.4x        1.17x  1.0x
//   (8, 12, 2048, 64)    1.01x  2.5x    1.11x  1.0x       1.05x  1.6x        1.21x  1.0x
//   (2, 12, 8192, 64)    1.00x  2.5x    1.13x  1.0x       1.06x  1.7x        1.19x  1.0x
//   (4, 16, 4096, 128)   1.00x  8.0x    1.08x  1.0x       1.02x  2.0x        1.07x  1.0x
// (first number: the run's length over a perfectly balanced one; second: the rows read from device memory
// over one read of each). At head dim 64, where all heads' rows are about twice the L2, the grid order reads
// them a few times at most and balances best. At (4, 16, 4096, 128) it reads every row 8 times (about 2 GB,
// 0.6 ms of an H100's bandwidth next to the kernel's 3 ms); 3 phases of head groups cut that to 2 for 2%
// of balance (1 phase: to 1, for 8%).
// MINILM_ATTN_HEAD_GROUP and MINILM_ATTN_KEY_PHASES override it (dkdv_order in attention_kernels.cu), and
// `python scripts/cuda_diagnostics.py attn-order` times the orders on a GPU.
// Measured (nineteenth session, H100 and H200), whole fwd+bwd calls in ms, default against the grid's order:
//   (4, 16, 4096, 128): 3.812 and 3.813 (H100); 3.756 and 3.730 (H200),
// about the size of the run-to-run noise, so the model's saving did not show in the time. 4 heads in 1
// phase were up to 1% faster than both there, one head at a time 3% slower. At head dim 64, one head at a
// time was up to 10% slower than the grid order (the default there); the 4-head orders ranged from 1% faster
// to 8% slower.
#pragma once

#include <cstdint>

#include "../host_device.h"

namespace minilm_cuda {

struct DkdvOrder {
  int head_group;  // heads per group (every head: the grid's own order)
  int phases;      // key-tile ranges
};

struct DkdvTile {
  int bh, kt;  // batch·head, key tile
};

// The CTA with linear index lin of a grid of heads x key_tiles CTAs.
MINILM_HOST_DEVICE DkdvTile dkdv_tile(int lin, int heads, int key_tiles, DkdvOrder order) {
  const int span = (key_tiles + order.phases - 1) / order.phases;  // key tiles per phase
  const int first = lin / (heads * span) * span;                    // this phase's first key tile
  const int tiles = key_tiles - first < span ? key_tiles - first : span;  // the last phase may have fewer
  const int r = lin - first * heads;                                // the CTA's index within its phase
  const int group = r / (order.head_group * tiles);
  const int left = heads - group * order.head_group;
  const int in_group = left < order.head_group ? left : order.head_group;  // the last group may have fewer
  const int s = r - group * order.head_group * tiles;                      // ... within its group
  return {group * order.head_group + s % in_group, first + s / in_group};
}

// The default order for `heads` heads of T rows, of which a head's CTAs share row_bytes per row (Q and dO;
// for the fused schemes the fp32 dQ rows too), on a GPU with l2_bytes of L2 cache (0: unknown). The grid's
// own order where all heads' rows fit in four L2s (it reads them a few times at most, see the table above);
// else groups of as many heads as fit a quarter of the L2 (about two groups run at once), in 3 phases.
inline DkdvOrder default_dkdv_order(int64_t heads, int64_t T, int64_t row_bytes, int64_t l2_bytes) {
  constexpr int kPhases = 3;
  const int64_t head_bytes = T * row_bytes;
  if (l2_bytes <= 0 || heads * head_bytes <= 4 * l2_bytes) return {static_cast<int>(heads), kPhases};
  int64_t group = l2_bytes / 4 / head_bytes;
  group = group < 1 ? 1 : group > heads ? heads : group;
  return {static_cast<int>(group), kPhases};
}

}  // namespace minilm_cuda
