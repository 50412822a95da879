// Causal self-attention on NVIDIA GPUs: FlashAttention-2 (Dao 2023) with tensor cores, plus a plain
// CUDA-core version for fp32/fp64 and unusual head dims.
//
// Tensor-core forward (bf16/fp16, head dim D = 64 or 128): one CTA owns a tile of BR = 128 query rows of
// one (batch, head); each warp owns 16 (8 warps, "narrow") or 32 (4 warps, "wide", FlashAttention-2's
// tiling) of those rows. The CTA walks the key/value tiles of BC = 64 (or 32) rows from the first up to
// the diagonal (later tiles are fully masked and skipped, per CTA and per warp), copying the next tile into
// shared memory with cp.async while computing on the current one. Per tile a warp computes S = Q Kᵀ for its
// rows with mma.sync m16n8k16 (fp32 accumulate), masks keys > query on the diagonal tiles only, and updates
// the running row max m and row sum l of the online softmax:
//     m' = max(m, rowmax S),  O ← O·2^(m−m'),  l ← l·2^(m−m') + rowsum P,  P = 2^(S·scale·log2e − m').
// P never leaves registers: the accumulator layout of an m16n8 tile is exactly the operand layout of
// the next mma, so P (rounded to bf16/fp16) multiplies V directly. At the end O /= l and
// LSE = (m + log2 l)·ln 2 are written. Q fragments stay in registers for the whole key loop where they
// fit (see FwdCfg for the layouts and their register budgets).
// CTAs are ordered heaviest-first (the last query tiles see the most keys) for the causal imbalance.
//
// Tensor-core backward: a prologue computes Delta_i = rowsum(dO_i ∘ O_i) (and zeroes the dQ buffer of the
// schemes that add dQ with atomics, below) in one memory-bound pass. Then one CTA of 8 warps owns
// BC = 128 keys (16 per warp; the "wide" schemes: 4 warps x 32 keys; the CTAs start in the order of
// dkdv_order.h, balance against L2 locality) and walks the query tiles (BR = 64, 32 or 16 rows, see BwdCfg
// and "Backward schemes" below) from the diagonal to the end, double-buffering
// Q, dO, LSE and Delta (all with cp.async, see load_bwd_query_tile). Per query tile each warp recomputes the
// transposed scores Sᵀ = K Qᵀ for its keys (so that Pᵀ is already an mma operand; the causal mask only on the
// tiles that cross the diagonal and the last one), then
//     Pᵀ = 2^(Sᵀ·scale·log2e − LSE·log2e),  dV += Pᵀ dO,  dPᵀ = V dOᵀ,  dSᵀ = Pᵀ ∘ (dPᵀ − Delta),
//     dK += dSᵀ Q   (dK and dV stay in registers for the whole query loop),
// writes dSᵀ to shared memory, and the CTA computes dQ_tile = dS K, added into an fp32 buffer with
// atomicAdd (as FlashAttention-2 does: several key tiles add into one query row, so dQ is not bitwise
// deterministic run to run; on sm_90 one 4-wide vector atomic per lane and n8 tile; each head's rows are
// padded to whole 64-row tiles, so that no atomic needs a bounds check). A last kernel writes
// dQ = scale · buffer in the input dtype. The "split" schemes instead run this kernel
// without dQ and a second kernel that owns query rows and recomputes S and dP to get dQ without atomics
// (deterministic, 7 instead of 5 matrix products); without dQ, a warp skips the query tiles that lie
// wholly before its keys. The "2d" schemes tile the same work differently (see attn_bwd_2d).
// The defaults add dQ with atomics; under torch.use_deterministic_algorithms(True) a scheme without them runs
// (see "THE DEFAULTS" below). MINILM_ATTN_BWD picks the scheme, see bwd_variant.
//
// The inputs (Q, K, V, dO, O) are read, and the results (O; dQ, dK, dV) written, through their strides (Layout
// in kernels.h: views such as GPT-1's q, k, v need no copy, and results can lie as [B, T, H, D], as SDPA's).
// Shared-memory rows are padded by 8 elements (16 bytes), so that the 8 row addresses of an ldmatrix fall in
// different banks. Rows past T are zero-filled by cp.async (src-size 0) and never written back.
//
// CUDA-core kernels ("simple"): one warp per query row (forward, dQ) or key row (dK, dV); lanes split
// the head dim; scores are reduced with warp shuffles; fp32 accumulation (fp64 for fp64). Exact, O(T)
// memory, deterministic, slow: they exist for fp32/fp64 (gradcheck), head dims the mma path lacks, and the
// backward on GPUs without the shared memory of the tensor-core backward (attention_backward_tc_fits).
//
// Attention dropout (dropout_p > 0, the kernels' DROP = true versions): whether P_ij is kept is a hash of
// (seed, batch·head, query i, key j) (csrc/attention_dropout.h), so no mask is stored: each thread hashes
// the entries its accumulators hold, from the indices the causal mask uses -- one row key per query (once
// per row for the whole key loop in the forward and dQ kernels; once per query column and tile in the
// dK/dV kernel, whose rows are keys), then one hash per key pair (2m, 2m + 1), which is exactly an
// accumulator's two columns c[0], c[1] in the forward, dQ and 2-D kernels (the 1-D dK/dV kernel, whose
// columns are queries, hashes once per element). The forward takes m, l and LSE from the undropped P, zeroes the
// dropped entries only in the P of O += P V, and folds the keep-scale 1/(1 − p) into the final 1/l. The
// backward keeps Delta; dV += (P ∘ keep)ᵀ dO, scaled when stored (the dK/dV kernel stores a dropped P as
// −P, so the sign is the keep bit), and dS = P ∘ (dP ∘ keep · scale − Delta): a dropped entry still has
// dS = −P·Delta. Only some tilings are built with dropout (see "Tuning choices" below).
#include "common.cuh"
#include "dkdv_order.h"
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>

namespace minilm_cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------------------------------ PTX helpers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses registers; pred == false fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
// 4-byte global -> shared copy (cp.async.ca: 4 bytes is below .cg's 16); pred == false writes a zero.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l gives the address of row (l % 8) of matrix (l / 8), and receives
// row l/4, columns 2(l%4), 2(l%4)+1 of each matrix (transposed with .trans).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Element type traits: mma on bf16 or fp16 operands, fp32 accumulators.
template <typename T>
struct Half;
template <>
struct Half<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo -> low 16 bits (the lower column)
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
  // D = A·B + D for an m16n8k16 tile (A row-major 16x16, B column-major 16x8).
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};
template <>
struct Half<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};

// One step of a double-buffered loop over tiles: start copying the next tile into the other buffer (if there
// is one), then wait until this step's tile has landed and every thread of the CTA sees it.
template <typename LoadNext>
__device__ __forceinline__ void pipeline_step(bool has_next, LoadNext load_next) {
  if (has_next) {
    load_next();
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// Runs body(std::true_type{}) where `masked`, else body(std::false_type{}): a loop compiled twice, so that
// the tiles that need no mask (in the backward kernels all but those on the diagonal and the last query
// tile) do without the per-element compares. decltype(argument)::value is the constant bool.
template <typename Body>
__device__ __forceinline__ void masked_or_not(bool masked, Body body) {
  if (masked) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// Copies rows [row0, row0 + ROWS) of a [T, D] matrix whose rows lie ld elements apart (16-byte aligned;
// (T + 128)·ld < 2³¹, see RowStrides) into shared memory rows of STRIDE elements. A thread copies the same
// 16-byte column chunk of every STEP-th row, stepping one pointer (fewer live registers than an offset per
// row). For rows at or past T that pointer runs past the matrix (by at most ROWS rows, within the 32-bit
// bound above) but is never used: cp.async gets g, with a source size of 0, and zero-fills the row.
template <typename T, int ROWS, int D, int STRIDE, int NTHREADS>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int ld, int row0, int T_) {
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
  static_assert(NTHREADS % CHUNKS == 0, "every thread must keep one column chunk");
  constexpr int STEP = NTHREADS / CHUNKS;
  const int r0 = threadIdx.x / CHUNKS, col = (threadIdx.x % CHUNKS) * 8;
  const T* src = g + ((row0 + r0) * ld + col);
#pragma unroll
  for (int r = r0; r < ROWS; r += STEP, src += STEP * ld) {
    const bool ok = row0 + r < T_;
    cp_async16(s + r * STRIDE + col, ok ? src : g, ok);
  }
}

// Lane offsets for ldmatrix (see ldsm_x4): A operand (16 rows x 16 k, row-major in smem) ...
__device__ __forceinline__ int a_row(int lane) { return lane & 15; }
__device__ __forceinline__ int a_col(int lane) { return (lane >> 4) * 8; }
// ... B operand for two n8 tiles stored as [n][k] (non-transposed load): r0,r1 -> tile 0, r2,r3 -> tile 1
__device__ __forceinline__ int bn_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__device__ __forceinline__ int bn_col(int lane) { return ((lane >> 3) & 1) * 8; }
// ... B operand for two n8 tiles stored as [k][n] (transposed load): r0,r1 -> tile 0, r2,r3 -> tile 1
__device__ __forceinline__ int bt_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int bt_col(int lane) { return (lane >> 4) * 8; }

// Accumulator tiles (m16n8, 4 floats: rows g, g, g+8, g+8; columns 2t, 2t+1) of two adjacent n8
// tiles -> the A operand (m16 k16) of the next mma.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = Half<T>::pack(c0[0], c0[1]);
  a[1] = Half<T>::pack(c0[2], c0[3]);
  a[2] = Half<T>::pack(c1[0], c1[1]);
  a[3] = Half<T>::pack(c1[2], c1[3]);
}

// Zeroes MT row tiles of N8 m16n8 accumulator tiles (float[MT][N8][4]; for one row tile, pass &tile).
template <int MT, int N8>
__device__ __forceinline__ void zero_acc(float (*acc)[N8][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < N8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
}

// Multiplies MT row tiles of N8 m16n8 accumulator tiles by x.
template <int MT, int N8>
__device__ __forceinline__ void scale_acc(float (*acc)[N8][4], float x) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < N8; ++i) acc[mt][i][0] *= x, acc[mt][i][1] *= x, acc[mt][i][2] *= x, acc[mt][i][3] *= x;
}

// The warp-level products every kernel below is made of. A warp holds MT row tiles of 16 rows; a tile of
// accumulators is float[N / 8][4] (N columns); `acc` and `p` point to the first of MT such tiles (for one
// tile, pass &tile).
//
// acc (16·MT x N) += A (16·MT x K) · B (K x N), the loop both products below run: A comes fragment by fragment
// from a_frag(mt, kk, a) (registers or shared memory: the caller decides); B is in shared memory (rows of
// stride S), stored [n][k] (read with ldmatrix) or, with B_KN, [k][n] (read with ldmatrix.trans). Each B
// fragment feeds MT·2 mma.
template <typename T, int MT, int K, int N, int S, bool B_KN, typename AFrag>
__device__ __forceinline__ void acc_mma(float (*acc)[N / 8][4], AFrag a_frag, const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a_frag(mt, kk, a[mt]);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      if constexpr (B_KN)
        ldsm_x4_trans(b, sB + (kk * 16 + bt_row(lane)) * S + np * 16 + bt_col(lane));
      else
        ldsm_x4(b, sB + (np * 16 + bn_row(lane)) * S + kk * 16 + bn_col(lane));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Half<T>::mma(acc[mt][2 * np], a[mt], b[0], b[1]);
        Half<T>::mma(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc = A · Bᵀ: A (16·MT x D) from a_frag, B (N x D) is rows of stride S in shared memory.
// S = Q Kᵀ, Sᵀ = K Qᵀ, dPᵀ = V dOᵀ.
template <typename T, int MT, int N, int D, int S, typename AFrag>
__device__ __forceinline__ void acc_abt(float (*acc)[N / 8][4], AFrag a_frag, const T* sB, int lane) {
  zero_acc<MT>(acc);
  acc_mma<T, MT, D, N, S, false>(acc, a_frag, sB, lane);
}

// acc (16·MT x N) += A (16·MT x K) · B (K x N), B stored [k][n] in shared memory (rows of stride S).
template <typename T, int MT, int K, int N, int S, typename AFrag>
__device__ __forceinline__ void acc_plus_ab(float (*acc)[N / 8][4], AFrag a_frag, const T* sB, int lane) {
  acc_mma<T, MT, K, N, S, true>(acc, a_frag, sB, lane);
}

// A fragments of a 16·MT x K matrix stored transposed, [k][m] (rows of stride S, first column at sA), read with
// ldmatrix.trans: e.g. Pᵀ from a [query][key] tile, or dS from a [key][query] one.
template <typename T, int S>
__device__ __forceinline__ auto a_trans_frag(const T* sA, int lane) {
  return [sA, lane](int mt, int kk, uint32_t(&a)[4]) {
    ldsm_x4_trans(a, sA + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * S + mt * 16 + ((lane >> 3) & 1) * 8);
  };
}

// acc (16·MT x D) += P (16·MT x BC, in accumulator registers) · B (BC x D, rows of stride S in shared
// memory): O += P V, dQ += dS K, dV += Pᵀ dO, dK += dSᵀ Q.
template <typename T, int MT, int BC, int D, int S>
__device__ __forceinline__ void acc_plus_pb(float (*acc)[D / 8][4], const float (*p)[BC / 8][4], const T* sB,
                                            int lane) {
  acc_plus_ab<T, MT, BC, D, S>(
      acc, [p](int mt, int kk, uint32_t(&a)[4]) { acc_to_a<T>(a, p[mt][2 * kk], p[mt][2 * kk + 1]); }, sB, lane);
}

// ------------------------------------------------------------------------------------ attention dropout
// The row keys (minilm_dropout::row_key) of a thread's accumulator rows in MT row tiles of 16: rows
// row_g + 16 mt and row_g + 16 mt + 8 of (batch, head) bh.
template <int MT>
__device__ __forceinline__ void dropout_row_keys(uint32_t (&rkey)[MT][2], const minilm_dropout::Params& drop, int bh,
                                                 int row_g) {
  const uint32_t head = minilm_dropout::head_key(drop.seed0, drop.seed1, bh);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) rkey[mt][r] = minilm_dropout::row_key(head, row_g + mt * 16 + 8 * r);
}

// Zeroes the dropped ones of x0, x1: keys j, j + 1 (j even) of the row with row key `row`.
__device__ __forceinline__ void drop_pair(float& x0, float& x1, uint32_t row, uint32_t j, uint32_t threshold) {
  const uint32_t bits = minilm_dropout::pair_bits(row, j);
  if (!minilm_dropout::kept(bits, j, threshold)) x0 = 0.f;
  if (!minilm_dropout::kept(bits, j + 1, threshold)) x1 = 0.f;
}

// acc_plus_pb for a P whose dropped entries are stored negated (−P: P >= 0, so the sign bit is the keep bit
// and costs no register): the A operand takes max(x, 0), i.e. P where kept and 0 where dropped.
template <typename T, int MT, int BC, int D, int S>
__device__ __forceinline__ void acc_plus_pb_kept(float (*acc)[D / 8][4], const float (*p)[BC / 8][4], const T* sB,
                                                 int lane) {
  acc_plus_ab<T, MT, BC, D, S>(
      acc,
      [p](int mt, int kk, uint32_t(&a)[4]) {
        const float(&c0)[4] = p[mt][2 * kk];
        const float(&c1)[4] = p[mt][2 * kk + 1];
        a[0] = Half<T>::pack(fmaxf(c0[0], 0.f), fmaxf(c0[1], 0.f));
        a[1] = Half<T>::pack(fmaxf(c0[2], 0.f), fmaxf(c0[3], 0.f));
        a[2] = Half<T>::pack(fmaxf(c1[0], 0.f), fmaxf(c1[1], 0.f));
        a[3] = Half<T>::pack(fmaxf(c1[2], 0.f), fmaxf(c1[3], 0.f));
      },
      sB, lane);
}

// ------------------------------------------------------------------------------- tensor-core forward
// Tile shapes (MINILM_ATTN_FWD picks one, see fwd_layout). A CTA always owns BR = 128 query rows.
//   narrow : 8 warps x 16 rows, Q fragments in registers; each K/V fragment read from shared memory feeds
//            2 mma. D = 64: at most 128 registers (2 CTAs per SM); D = 128: ~200 (1 CTA per SM).
//   narrow2: as narrow, Q re-read from shared memory per key tile, 128 registers (2 CTAs per SM).
//   wide   : 4 warps x 32 rows (two m16 row tiles: FlashAttention-2's forward tiling); each K/V fragment
//            feeds 4 mma, halving shared-memory reads per mma. D = 64 with Q in registers and 64-key tiles;
//            D = 128 with Q re-read and 32-key tiles (O alone takes 128 registers). ~240 registers.
//   wide3  : as wide with Q re-read, capped at 168 registers for D = 64 (3 CTAs per SM; spills a little).
//            At D = 128 it is wide in all but name (the register cap binds nothing there).
//   wide64 : at D = 128, wide with 64-key tiles (each Q fragment read feeds twice the mma of wide's 32-key
//            tiles; 255 registers, no spills on sm_90: ~80 bytes before load_tile_async stepped one pointer,
//            ~50 with dropout). At D = 64 it is wide.
template <int D, int NW_, int MT_, bool QREG_, int MINB_, int BC_>
struct FwdCfg {
  static constexpr int NW = NW_, MT = MT_, MINB = MINB_, NT = NW * 32, BR = 16 * MT * NW, BC = BC_, S = D + 8;
  static constexpr bool QREG = QREG_;
  static constexpr size_t smem_bytes(size_t elem) { return static_cast<size_t>(BR + 4 * BC) * S * elem; }
};
template <int D>
using FwdNarrow = FwdCfg<D, 8, 1, true, D <= 64 ? 2 : 1, 64>;
template <int D>
using FwdNarrow2 = FwdCfg<D, 8, 1, false, 2, 64>;
template <int D>
using FwdWide = FwdCfg<D, 4, 2, D <= 64, 1, D <= 64 ? 64 : 32>;
template <int D>
using FwdWide3 = FwdCfg<D, 4, 2, false, D <= 64 ? 3 : 2, D <= 64 ? 64 : 32>;
template <int D>
using FwdWide64 = FwdCfg<D, 4, 2, D <= 64, 1, 64>;

template <typename T, int D, typename C, bool DROP = false>
__global__ void __launch_bounds__(C::NT, C::MINB) attn_fwd_tc(const T* __restrict__ Q, const T* __restrict__ K,
                                                             const T* __restrict__ V, Layout in,
                                                             T* __restrict__ O, float* __restrict__ LSE, int T_,
                                                             float scale_log2, minilm_dropout::Params drop) {
  constexpr int BR = C::BR, BC = C::BC, S = C::S, NT = C::NT, MT = C::MT;
  constexpr bool QREG = C::QREG;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BR][S]
  T* sK = sQ + BR * S;                      // [2][BC][S]
  T* sV = sK + 2 * BC * S;                  // [2][BC][S]

  const int bh = blockIdx.x;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;  // heaviest query tiles first
  Q += in.q.offset(bh, in.heads), K += in.k.offset(bh, in.heads), V += in.v.offset(bh, in.heads);
  LSE += static_cast<size_t>(bh) * T_;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  const int wrow0 = q0 + warp * 16 * MT;  // first query row of this warp; row tile mt starts at wrow0 + 16 mt
  const T* sQw = sQ + (warp * 16 * MT + a_row(lane)) * S + a_col(lane);  // this lane's ldmatrix address

  const int kv_end = min(T_, q0 + BR);
  const int nkb = (kv_end + BC - 1) / BC;
  load_tile_async<T, BR, D, S, NT>(sQ, Q, in.q.row, q0, T_);
  load_tile_async<T, BC, D, S, NT>(sK, K, in.k.row, 0, T_);
  load_tile_async<T, BC, D, S, NT>(sV, V, in.v.row, 0, T_);
  cp_async_commit();

  uint32_t qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];  // Q fragments, when they stay in registers
  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];  // running max (log2 domain) and this lane's partial row sums
  zero_acc<MT>(o);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }
  uint32_t rkey[DROP ? MT : 1][2];  // dropout: the row keys of this thread's rows, fixed for the key loop
  if constexpr (DROP) dropout_row_keys(rkey, drop, bh, wrow0 + g);

  for (int kb = 0; kb < nkb; ++kb) {
    const int buf = kb & 1;
    pipeline_step(kb + 1 < nkb, [&] {
      load_tile_async<T, BC, D, S, NT>(sK + (buf ^ 1) * BC * S, K, in.k.row, (kb + 1) * BC, T_);
      load_tile_async<T, BC, D, S, NT>(sV + (buf ^ 1) * BC * S, V, in.v.row, (kb + 1) * BC, T_);
    });
    if constexpr (QREG) {
      if (kb == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[mt][kk], sQw + mt * 16 * S + kk * 16);
      }
    }
    const int k0 = kb * BC;
    // A warp whose rows all lie before this key tile has nothing to add (every key is masked).
    if (k0 <= wrow0 + 16 * MT - 1) {
      const T* sKb = sK + buf * BC * S;
      const T* sVb = sV + buf * BC * S;

      // S = Q Kᵀ (16·MT rows x BC keys per warp)
      float s[MT][BC / 8][4];
      acc_abt<T, MT, BC, D, S>(
          s,
          [&](int mt, int kk, uint32_t(&a)[4]) {
            if constexpr (QREG) {
#pragma unroll
              for (int i = 0; i < 4; ++i) a[i] = qf[mt][kk][i];
            } else {
              ldsm_x4(a, sQw + mt * 16 * S + kk * 16);
            }
          },
          sKb, lane);

#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r0 = wrow0 + mt * 16;          // first row of this row tile
        const int row_a = r0 + g, row_b = row_a + 8;  // the two rows this thread's accumulators hold
        // scale into the log2 domain; mask keys after the query (only tiles that cross this row tile's
        // diagonal; keys >= T are always after every valid query, so they are masked here too)
        const bool diag = k0 + BC - 1 > r0;
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            float x = s[mt][nt][i] * scale_log2;
            if (diag) {
              const int key = k0 + nt * 8 + t4 * 2 + (i & 1);
              if (key > (i < 2 ? row_a : row_b)) x = -INFINITY;
            }
            s[mt][nt][i] = x;
          }
        }

        // online softmax. Every row sees key 0 in the first tile, so m is finite from then on.
        float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
          mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
          mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
        }
        float alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));  // the 4 lanes of a quad share a row
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
          alpha[r] = exp2f(m[mt][r] - mx[r]);  // 0 on the first tile (m = -inf)
          m[mt][r] = mx[r];
        }
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
          s[mt][nt][0] = exp2f(s[mt][nt][0] - mx[0]);
          s[mt][nt][1] = exp2f(s[mt][nt][1] - mx[0]);
          s[mt][nt][2] = exp2f(s[mt][nt][2] - mx[1]);
          s[mt][nt][3] = exp2f(s[mt][nt][3] - mx[1]);
          rs[0] += s[mt][nt][0] + s[mt][nt][1];
          rs[1] += s[mt][nt][2] + s[mt][nt][3];
          if constexpr (DROP) {  // after the row sums: l sums the undropped P; only O += P V sees the drops
            const uint32_t key = k0 + nt * 8 + t4 * 2;
            drop_pair(s[mt][nt][0], s[mt][nt][1], rkey[mt][0], key, drop.threshold);
            drop_pair(s[mt][nt][2], s[mt][nt][3], rkey[mt][1], key, drop.threshold);
          }
        }
        // l stays a per-lane partial sum (each lane of a quad holds different columns); summed at the end
        l[mt][0] = l[mt][0] * alpha[0] + rs[0];
        l[mt][1] = l[mt][1] * alpha[1] + rs[1];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[mt][dt][0] *= alpha[0];
          o[mt][dt][1] *= alpha[0];
          o[mt][dt][2] *= alpha[1];
          o[mt][dt][3] *= alpha[1];
        }
      }

      acc_plus_pb<T, MT, BC, D, S>(o, s, sVb, lane);  // O += P V
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  O += in.res.offset(bh, in.heads);  // here, not before the loop: one pointer fewer live in it
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row_a = wrow0 + mt * 16 + g, row_b = row_a + 8;
    const int oa = row_a * in.res.row, ob = row_b * in.res.row;  // < (T + 128)·row < 2³¹ (the glue)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(kFull, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(kFull, l[mt][r], 2);
    }
    const float num = DROP ? static_cast<float>(drop.scale) : 1.f;  // dropout's scale of the kept P
    const float inv_a = num / l[mt][0], inv_b = num / l[mt][1];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + t4 * 2;
      if (row_a < T_)
        *reinterpret_cast<uint32_t*>(O + (oa + col)) = Half<T>::pack(o[mt][dt][0] * inv_a, o[mt][dt][1] * inv_a);
      if (row_b < T_)
        *reinterpret_cast<uint32_t*>(O + (ob + col)) =
            Half<T>::pack(o[mt][dt][2] * inv_b, o[mt][dt][3] * inv_b);
    }
    if (t4 == 0) {
      if (row_a < T_) LSE[row_a] = (m[mt][0] + log2f(l[mt][0])) * kLn2;
      if (row_b < T_) LSE[row_b] = (m[mt][1] + log2f(l[mt][1])) * kLn2;
    }
  }
}

// ------------------------------------------------------------------------------ tensor-core backward
// Delta[row] = sum_d dO[row, d] * O[row, d]: one warp per row, any head dim (the CUDA-core backward's).
template <typename T, typename A>
__global__ void attn_bwd_delta(const T* __restrict__ dO, const T* __restrict__ O, A* __restrict__ delta,
                               int64_t rows, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  A acc = 0;
  for (int d = lane; d < D; d += 32) acc += static_cast<A>(to_f(dO[row * D + d])) * static_cast<A>(to_f(O[row * D + d]));
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
  if (lane == 0) delta[row] = acc;
}

// The tensor-core backward's prologue, one memory-bound pass: Delta[row] = sum_d dO[row, d] * O[row, d]
// in fp32 and, for the schemes that add dQ with atomics (ZERO_DQ), the row of dQacc zeroed (instead of a
// separate memset: one launch fewer; dQacc's padding rows, see attention_dq_rows, are left as they are).
// D / 8 lanes per row, each loading 16 bytes (8 elements) of dO and of O (rows 16-byte aligned, see
// Layout), and zeroing 32 bytes of dQacc. kPrologueThreads per CTA.
constexpr int kPrologueThreads = 256;
template <typename T, int D, bool ZERO_DQ>
__global__ void __launch_bounds__(kPrologueThreads)
    attn_bwd_prologue(const T* __restrict__ dO, const T* __restrict__ O, Layout in, float* __restrict__ delta,
                      float* __restrict__ dQacc, int64_t rows, int T_) {
  constexpr int LPR = D / 8, RPB = kPrologueThreads / LPR;  // lanes per row, rows per CTA
  static_assert(D % 8 == 0 && 32 % LPR == 0, "a row's lanes must lie in one warp");
  const int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / LPR;  // bh · T + t
  const int col = (threadIdx.x % LPR) * 8;
  float acc = 0.f;
  if (row < rows) {  // no early return: every lane takes part in the shuffles below
    const int bh = static_cast<int>(row) / T_, t = static_cast<int>(row) - bh * T_;  // row < 2³¹ (the glue)
    const uint4 a = *reinterpret_cast<const uint4*>(dO + in.dout.offset(bh, in.heads) + (t * in.dout.row + col));
    const uint4 b = *reinterpret_cast<const uint4*>(O + in.out.offset(bh, in.heads) + (t * in.out.row + col));
    T x[8], y[8];
    memcpy(x, &a, sizeof(a));
    memcpy(y, &b, sizeof(b));
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += to_f(x[i]) * to_f(y[i]);
    if constexpr (ZERO_DQ) {
      uint4* z = reinterpret_cast<uint4*>(dQacc + (static_cast<int64_t>(bh) * attention_dq_rows(T_) + t) * D + col);
      // 0u: the bits of 0.f
      z[0] = make_uint4(0u, 0u, 0u, 0u);
      z[1] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
#pragma unroll
  for (int off = LPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
  if (row < rows && threadIdx.x % LPR == 0) delta[row] = acc;
}

// dQ (the input dtype, laid out as in.res says) = scale · dQacc (fp32 [BH, attention_dq_rows(T), D]), 4
// elements per thread and step (16 bytes read, 8 written).
template <typename T, int D>
__global__ void attn_bwd_dq_convert(const float4* __restrict__ acc, T* __restrict__ dq, Layout in, int64_t rows,
                                    int T_, float scale) {
  constexpr int C4 = D / 4;  // float4s per row
  const int64_t Tp = attention_dq_rows(T_);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * C4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(i / C4), bh = row / T_, t = row - bh * T_;  // bh·T + t < 2³¹ (the glue)
    const int c4 = static_cast<int>(i % C4);
    const float4 a = acc[(bh * Tp + t) * C4 + c4];
    *reinterpret_cast<uint2*>(dq + in.res.offset(bh, in.heads) + (t * in.res.row + c4 * 4)) =
        make_uint2(Half<T>::pack(a.x * scale, a.y * scale), Half<T>::pack(a.z * scale, a.w * scale));
  }
}

// Adds an m16n8 accumulator tile (rows g and g + 8 of the tile, columns 2·t4 and 2·t4 + 1, see acc_to_a)
// into dQacc, an fp32 matrix of D columns, with atomics; `at` points to the tile's row g, column 0. dQacc's
// rows are padded to whole query tiles (attention_dq_rows), so no row needs a bounds check (what lands in
// the rows past T is never read). On sm_90 and later, lanes t4 = 2u and 2u + 1 swap halves so that each
// adds 4 consecutive columns of one row (the even lane row g, the odd lane row g + 8) with one vector atomic.
// CHECK: also skip rows at or past T (rows_left = T − the tile's row g; the sm_90 path only, the scalar
// path before it adds every row). Not needed, as padding takes them,
// but the 1-D kernels keep it: without the branch, ptxas gives them more registers and they spill (sm_90).
template <int D, bool CHECK = false>
__device__ __forceinline__ void atomic_add_acc(float* at, int t4, const float (&c)[4], int rows_left = 16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const bool even = (t4 & 1) == 0;
  const float r0 = __shfl_xor_sync(kFull, even ? c[2] : c[0], 1);
  const float r1 = __shfl_xor_sync(kFull, even ? c[3] : c[1], 1);
  const float4 v = even ? make_float4(c[0], c[1], r0, r1) : make_float4(r0, r1, c[2], c[3]);
  if (!CHECK || rows_left > (even ? 0 : 8))
    atomicAdd(reinterpret_cast<float4*>(at + (even ? 0 : 8 * D) + (t4 >> 1) * 4), v);
#else
  atomicAdd(at + 2 * t4, c[0]);
  atomicAdd(at + 2 * t4 + 1, c[1]);
  atomicAdd(at + 8 * D + 2 * t4, c[2]);
  atomicAdd(at + 8 * D + 2 * t4 + 1, c[3]);
#endif
}

// Query tile qb of the dK/dV kernels into double-buffer slot buf: its Q and dO rows, LSE and Delta (rows past
// T: zeros), all with cp.async (the caller commits). A plain load of LSE or Delta here would have to land
// before the __syncthreads that ends the pipeline step, so every query tile would wait out one global-memory
// latency (the kernels run 1 or 2 CTAs per SM: nothing else would fill that time).
template <typename T, int BR, int D, int S, int NT>
__device__ __forceinline__ void load_bwd_query_tile(T* sQ, T* sdO, float* sL, float* sDl, const T* Q, const T* dO,
                                                    const Layout& in, const float* LSE, const float* Delta,
                                                    int qb, int buf, int T_) {
  static_assert(BR <= NT, "one thread per row of LSE and Delta");
  load_tile_async<T, BR, D, S, NT>(sQ + buf * BR * S, Q, in.q.row, qb * BR, T_);
  load_tile_async<T, BR, D, S, NT>(sdO + buf * BR * S, dO, in.dout.row, qb * BR, T_);
  if (threadIdx.x < BR) {
    const int q = qb * BR + threadIdx.x;
    const int at = q < T_ ? q : 0;  // a row past T reads nothing (source size 0) but needs a valid address
    cp_async4(sL + buf * BR + threadIdx.x, LSE + at, q < T_);
    cp_async4(sDl + buf * BR + threadIdx.x, Delta + at, q < T_);
  }
}

// The (batch·head, key tile) of this dK/dV CTA, in the order of dkdv_order.h (grid: batch·head x key tiles).
__device__ __forceinline__ DkdvTile cta_dkdv_tile(DkdvOrder order) {
  return dkdv_tile(blockIdx.y * gridDim.x + blockIdx.x, gridDim.x, gridDim.y, order);
}

// Where (batch·head) bh starts, in elements, in the arrays a dK/dV kernel reads: the inputs by their strides,
// the dQ buffer (rows padded to whole 64-row tiles, see attention_dq_rows) and the per-row LSE and Delta.
// (dK and dV: in.res.offset, taken after the query loop, so that no pointer to them is live in it.)
template <int D, int BR>
struct HeadOffsets {
  static_assert(64 % BR == 0, "dQacc's rows are padded to whole 64-row tiles (attention_dq_rows)");
  int64_t q, k, v, dout, dq, row;
  __device__ HeadOffsets(int bh, int T_, const Layout& in)
      : q(in.q.offset(bh, in.heads)), k(in.k.offset(bh, in.heads)), v(in.v.offset(bh, in.heads)),
        dout(in.dout.offset(bh, in.heads)),
        dq(static_cast<int64_t>(bh) * attention_dq_rows(T_) * D), row(static_cast<int64_t>(bh) * T_) {}
};

// Writes a warp's dK (times `scale`) and dV accumulators to the [T, D] results (rows `ld` elements apart): MT
// row tiles of 16 keys (this lane's rows: key_a + 16 mt and key_a + 16 mt + 8) by N columns from col0; keys
// >= T are not written.
template <typename T, int MT, int N>
__device__ __forceinline__ void store_dkdv(T* dK, T* dV, const float (*dk)[N / 8][4], const float (*dv)[N / 8][4],
                                           int key_a, int col0, int t4, float scale, int T_, int ld) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int ka = key_a + mt * 16, kb = ka + 8;
    const int oa = ka * ld + col0, ob = kb * ld + col0;  // < (T + 128)·ld < 2³¹ (the glue)
#pragma unroll
    for (int dt = 0; dt < N / 8; ++dt) {
      const int col = dt * 8 + t4 * 2;
      if (ka < T_) {
        *reinterpret_cast<uint32_t*>(dK + (oa + col)) = Half<T>::pack(dk[mt][dt][0] * scale, dk[mt][dt][1] * scale);
        *reinterpret_cast<uint32_t*>(dV + (oa + col)) = Half<T>::pack(dv[mt][dt][0], dv[mt][dt][1]);
      }
      if (kb < T_) {
        *reinterpret_cast<uint32_t*>(dK + (ob + col)) = Half<T>::pack(dk[mt][dt][2] * scale, dk[mt][dt][3] * scale);
        *reinterpret_cast<uint32_t*>(dV + (ob + col)) = Half<T>::pack(dv[mt][dt][2], dv[mt][dt][3]);
      }
    }
  }
}

// A dK/dV CTA: NW warps, each owning MTK row tiles of 16 keys (BC = 16·MTK·NW keys), stepping through the
// queries BR rows at a time. MTK = 2 ("wide") halves the shared-memory reads per mma of dV += Pᵀ dO and
// dK += dSᵀ Q (each Q/dO fragment feeds 4 mma instead of 2), as the wide forward does for K and V.
template <int D, int BR_, int NW_ = 8, int MTK_ = 1>
struct BwdCfg {
  static constexpr int NW = NW_, MTK = MTK_, NT = NW * 32, BC = 16 * MTK * NW, BR = BR_, S = D + 8, SS = BR + 8;
  static constexpr size_t smem_bytes(size_t elem) {
    return (static_cast<size_t>(2 * BC * S) + 4 * BR * S + static_cast<size_t>(BC) * SS) * elem +
           4 * BR * sizeof(float);
  }
};

// BR: query rows per step (64 for D = 64, 32 for D = 128; split3, wide and fusedwide use 32 at D = 64 too,
// wide16 16).
// KVREG: this warp's K and V fragments stay in registers for the whole query loop (else they are re-read
// from shared memory per step); by default only where the registers are there (split at D = 64).
template <typename T, int D, bool WITH_DQ, int MINB, int BR_ = (D <= 64 ? 64 : 32), int NW_ = 8, int MTK = 1,
          bool KVREG = !WITH_DQ && MINB == 1 && D <= 64, bool DROP = false>
__global__ void __launch_bounds__(BwdCfg<D, BR_, NW_, MTK>::NT, MINB)
    attn_bwd_tc(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
                Layout in, const float* __restrict__ LSE, const float* __restrict__ Delta,
                float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, int T_, DkdvOrder order,
                float scale, float scale_log2, minilm_dropout::Params drop) {
  using C = BwdCfg<D, BR_, NW_, MTK>;
  constexpr int NW = C::NW, NT = C::NT, BC = C::BC, BR = C::BR, S = C::S, SS = C::SS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BC][S]
  T* sV = sK + BC * S;                      // [BC][S]
  T* sQ = sV + BC * S;                      // [2][BR][S]
  T* sdO = sQ + 2 * BR * S;                 // [2][BR][S]
  T* sdS = sdO + 2 * BR * S;                // [BC][SS]: dSᵀ, keys x queries
  float* sL = reinterpret_cast<float*>(sdS + BC * SS);  // [2][BR]: LSE
  float* sDl = sL + 2 * BR;                              // [2][BR]: Delta

  const DkdvTile tile = cta_dkdv_tile(order);
  const int bh = tile.bh, k0 = tile.kt * BC;
  const HeadOffsets<D, BR> off(bh, T_, in);
  Q += off.q, K += off.k, V += off.v, dO += off.dout, LSE += off.row, Delta += off.row;
  if constexpr (WITH_DQ) dQacc += off.dq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  // This warp's keys: tile rows wk0 .. wk0 + 16·MTK − 1. The rows of this thread's Sᵀ accumulators in row
  // tile mt are the keys key_a + 16 mt and key_b + 16 mt.
  const int wk0 = warp * 16 * MTK;
  const int key_a = k0 + wk0 + g, key_b = key_a + 8;
  // dropout: this (batch, head)'s hash key and the scale of the kept P
  const uint32_t head = DROP ? minilm_dropout::head_key(drop.seed0, drop.seed1, bh) : 0u;
  const float drop_scale = DROP ? static_cast<float>(drop.scale) : 1.f;

  const int nqb = (T_ + BR - 1) / BR;
  const int qb0 = k0 / BR;  // query tiles before this one lie entirely before the keys
  auto load_q_tile = [&](int qb, int buf) {
    load_bwd_query_tile<T, BR, D, S, NT>(sQ, sdO, sL, sDl, Q, dO, in, LSE, Delta, qb, buf, T_);
  };
  load_tile_async<T, BC, D, S, NT>(sK, K, in.k.row, k0, T_);
  load_tile_async<T, BC, D, S, NT>(sV, V, in.v.row, k0, T_);
  load_q_tile(qb0, 0);
  cp_async_commit();

  constexpr int KF = KVREG ? MTK : 1, KK = KVREG ? D / 16 : 1;
  uint32_t kf[KF][KK][4], vf[KF][KK][4];
  float dk[MTK][D / 8][4], dv[MTK][D / 8][4];
  zero_acc<MTK>(dk);
  zero_acc<MTK>(dv);

  for (int qb = qb0; qb < nqb; ++qb) {
    const int buf = (qb - qb0) & 1;
    const int q0 = qb * BR;
    pipeline_step(qb + 1 < nqb, [&] { load_q_tile(qb + 1, buf ^ 1); });
    const T* sQb = sQ + buf * BR * S;
    const T* sdOb = sdO + buf * BR * S;
    const float* sLb = sL + buf * BR;
    const float* sDb = sDl + buf * BR;

    if constexpr (KVREG) {
      if (qb == qb0) {
#pragma unroll
        for (int mt = 0; mt < MTK; ++mt)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            ldsm_x4(kf[mt][kk], sK + (wk0 + mt * 16 + a_row(lane)) * S + kk * 16 + a_col(lane));
            ldsm_x4(vf[mt][kk], sV + (wk0 + mt * 16 + a_row(lane)) * S + kk * 16 + a_col(lane));
          }
      }
    }
    // Without dQ, a warp whose keys all lie after this query tile has nothing to add (all of Pᵀ is 0);
    // with dQ every warp goes on (the condition is then always true: the __syncthreads inside are safe).
    if (WITH_DQ || k0 + wk0 <= q0 + BR - 1) {
      // A operands from this warp's rows of K or V: kept in registers (KVREG) or read from shared memory.
      auto rows_frag = [wk0, lane](const uint32_t(&reg)[KF][KK][4], const T* sM) {
        return [&reg, sM, wk0, lane](int mt, int kk, uint32_t(&a)[4]) {
          if constexpr (KVREG) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = reg[mt][kk][i];
          } else {
            ldsm_x4(a, sM + (wk0 + mt * 16 + a_row(lane)) * S + kk * 16 + a_col(lane));
          }
        };
      };
      // Sᵀ = K Qᵀ (16·MTK keys x BR queries per warp)
      float st[MTK][BR / 8][4];
      acc_abt<T, MTK, BR, D, S>(st, rows_frag(kf, sK), sQb, lane);
      // Pᵀ, zero where query < key (causal) or query >= T (padding rows of the last tile): masked only where
      // the warp's last key lies after the tile's first query or the tile has rows past T (warp-uniform)
      masked_or_not(q0 < k0 + wk0 + 16 * MTK - 1 || q0 + BR > T_, [&](auto masked) {
        constexpr bool kMasked = decltype(masked)::value;   // a constant, without --expt-relaxed-constexpr
#pragma unroll
        for (int mt = 0; mt < MTK; ++mt)
#pragma unroll
          for (int nt = 0; nt < BR / 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int qi = nt * 8 + t4 * 2 + (i & 1);
              const int q = q0 + qi;
              const int key = (i < 2 ? key_a : key_b) + mt * 16;
              const float p = exp2f(st[mt][nt][i] * scale_log2 - sLb[qi] * kLog2e);
              st[mt][nt][i] = (kMasked && (q < key || q >= T_)) ? 0.f : p;
            }
          }
      });
      // Dropout: a dropped entry of Pᵀ is stored as −P (see acc_plus_pb_kept; a keep mask in a register spills
      // at split3's 128-register cap). The hash's row is the query, a column here: one row key per query
      // column, then one pair hash per element (this thread's keys key_a + 16 mt and key_b + 16 mt lie in
      // different key pairs).
      if constexpr (DROP) {
#pragma unroll
        for (int nt = 0; nt < BR / 8; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const uint32_t rq = minilm_dropout::row_key(head, q0 + nt * 8 + t4 * 2 + c);
#pragma unroll
            for (int mt = 0; mt < MTK; ++mt)
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const uint32_t key = (r == 0 ? key_a : key_b) + mt * 16;
                if (!minilm_dropout::keep(rq, key, drop.threshold))
                  st[mt][nt][2 * r + c] = -st[mt][nt][2 * r + c];
              }
          }
        acc_plus_pb_kept<T, MTK, BR, D, S>(dv, st, sdOb, lane);  // dV += (Pᵀ ∘ keep) dO  (· scale at the end)
      } else {
        acc_plus_pb<T, MTK, BR, D, S>(dv, st, sdOb, lane);  // dV += Pᵀ dO
      }
      // dPᵀ = V dOᵀ
      float dpt[MTK][BR / 8][4];
      acc_abt<T, MTK, BR, D, S>(dpt, rows_frag(vf, sV), sdOb, lane);
      // dSᵀ = Pᵀ ∘ (dPᵀ − Delta); with dropout dPᵀ is first dropped and scaled like P
#pragma unroll
      for (int mt = 0; mt < MTK; ++mt)
#pragma unroll
        for (int nt = 0; nt < BR / 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float delta = sDb[nt * 8 + t4 * 2 + (i & 1)];
            if constexpr (DROP) {
              const float p = st[mt][nt][i];  // −P where dropped
              dpt[mt][nt][i] = fabsf(p) * ((p > 0.f ? dpt[mt][nt][i] * drop_scale : 0.f) - delta);
            } else {
              dpt[mt][nt][i] = st[mt][nt][i] * (dpt[mt][nt][i] - delta);
            }
          }
        }
      acc_plus_pb<T, MTK, BR, D, S>(dk, dpt, sQb, lane);  // dK += dSᵀ Q  (scaled by `scale` at the end)
      if constexpr (WITH_DQ) {
        // dSᵀ -> shared memory, for dQ, which contracts over the keys of all warps
#pragma unroll
        for (int mt = 0; mt < MTK; ++mt)
#pragma unroll
          for (int nt = 0; nt < BR / 8; ++nt) {
            const int col = nt * 8 + t4 * 2, row = wk0 + mt * 16 + g;
            *reinterpret_cast<uint32_t*>(sdS + row * SS + col) = Half<T>::pack(dpt[mt][nt][0], dpt[mt][nt][1]);
            *reinterpret_cast<uint32_t*>(sdS + (row + 8) * SS + col) = Half<T>::pack(dpt[mt][nt][2], dpt[mt][nt][3]);
          }
        __syncthreads();
        // dQ_tile (BR x D) += dS (BR x BC) K (BC x D): warp w owns row tile w % (BR/16) and D/WPM columns,
        // so each dS fragment read from shared memory feeds 2·NPW mma.
        constexpr int MTQ = BR / 16, WPM = NW / MTQ, NPW = D / 16 / WPM;
        static_assert(NW % MTQ == 0 && (D / 16) % WPM == 0, "dQ tiling: warps must cover BR x D evenly");
        const int mt = warp % MTQ, np0 = (warp / MTQ) * NPW;
        float acc[2 * NPW][4];
        zero_acc<1>(&acc);
        // A = dS rows (queries) x k (keys), stored transposed as [key][query]
        acc_plus_ab<T, 1, BC, 16 * NPW, S>(&acc, a_trans_frag<T, SS>(sdS + mt * 16, lane), sK + np0 * 16, lane);
        const int row_g = q0 + mt * 16 + g;  // this lane's row g of the tile; columns from np0·16 + 8j
#pragma unroll
        for (int j = 0; j < 2 * NPW; ++j)
          atomic_add_acc<D, true>(dQacc + static_cast<size_t>(row_g) * D + np0 * 16 + j * 8, t4, acc[j], T_ - row_g);
      }  // WITH_DQ
    }
    __syncthreads();  // sdS and this Q/dO buffer are rewritten next iteration
  }

  if constexpr (DROP) scale_acc<MTK>(dv, drop_scale);  // dV = (Pᵀ ∘ keep) dO · dropout's scale
  const int64_t res = in.res.offset(bh, in.heads);
  store_dkdv<T, MTK, D>(dK + res, dV + res, dk, dv, key_a, 0, t4, scale, T_, in.res.row);
}

// The "2d" backward schemes (FlashAttention-2's own backward tiling; meant for D = 128, where a warp cannot
// hold the dK and dV accumulators of 32 keys beside its scores). A CTA of 8 warps owns BC = 128 keys and
// walks query tiles of BR = 64 rows from the diagonal; per tile it runs three kinds of products, each with
// its own 2-D grid of warps, handing P and dS over through shared memory:
//   1. S = Q Kᵀ and dP = dO Vᵀ (BR x BC): warps in 2 (queries) x 4 (keys), 32 x 32 each. P and
//      dS = P ∘ (dP − Delta) go to shared memory as [query][key] tiles (the causal mask only in the warp
//      tiles that need it).
//   2. dV += Pᵀ dO and (step 4) dK += dSᵀ Q (BC x D): warps in 4 (keys) x 2 (columns), 32 keys x D/2 each,
//      the A operands Pᵀ and dSᵀ read with ldmatrix.trans from the [query][key] tiles. dK and dV stay in
//      registers for the whole query loop (2 x 64 registers at D = 128).
//   3. With dQ ("fused2d"): dQ_tile = dS K (BR x D): warps in 2 (queries) x 4 (columns), 32 x D/4 each,
//      added into the fp32 buffer with atomics, as in the fused scheme; between dV and dK, as
//      FlashAttention-2 orders them, so that the dK products run while the atomics drain. Without
//      ("split2d"), the dQ kernel computes dQ afterwards.
// At D = 128 every product's warp tile is 32 x 32 or larger, so each fragment read from shared memory feeds
// at least 2 mma: phases 1 and 3 read 256 bytes of shared memory per mma, phase 2 192 (the 1-D schemes above
// read 256 to 384 there). At D = 64 phase 3's tiles are 32 x 16 (384 bytes per mma).
template <int D>
struct Bwd2dCfg {
  static constexpr int NW = 8, NT = NW * 32, BC = 128, BR = 64, S = D + 8, SP = BC + 8;
  static constexpr size_t smem_bytes(size_t elem) {
    return (static_cast<size_t>(2 * BC * S) + 4 * BR * S + 2 * BR * SP) * elem + 4 * BR * sizeof(float);
  }
};

template <typename T, int D, bool WITH_DQ, bool DROP = false>
__global__ void __launch_bounds__(Bwd2dCfg<D>::NT, 1)
    attn_bwd_2d(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
                Layout in, const float* __restrict__ LSE, const float* __restrict__ Delta,
                float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, int T_, DkdvOrder order,
                float scale, float scale_log2, minilm_dropout::Params drop) {
  using C = Bwd2dCfg<D>;
  constexpr int NT = C::NT, BC = C::BC, BR = C::BR, S = C::S, SP = C::SP;
  constexpr int DH = D / 2, DQ = D / 4;  // columns per warp in phases 2 and 3
  static_assert(DQ % 16 == 0, "the 2d schemes need D to be a multiple of 64");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BC][S]
  T* sV = sK + BC * S;                      // [BC][S]
  T* sQ = sV + BC * S;                      // [2][BR][S]
  T* sdO = sQ + 2 * BR * S;                 // [2][BR][S]
  T* sP = sdO + 2 * BR * S;                 // [BR][SP]: P, queries x keys
  T* sdS = sP + BR * SP;                    // [BR][SP]: dS, queries x keys
  float* sL = reinterpret_cast<float*>(sdS + BR * SP);  // [2][BR]: LSE
  float* sDl = sL + 2 * BR;                              // [2][BR]: Delta

  const DkdvTile tile = cta_dkdv_tile(order);
  const int bh = tile.bh, k0 = tile.kt * BC;
  const HeadOffsets<D, BR> off(bh, T_, in);
  Q += off.q, K += off.k, V += off.v, dO += off.dout, LSE += off.row, Delta += off.row;
  if constexpr (WITH_DQ) dQacc += off.dq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  const int r1 = (warp / 4) * 32, c1 = (warp % 4) * 32;  // phase 1: query rows r1.., keys c1.. of the tile
  const int r2 = (warp / 2) * 32, c2 = (warp % 2) * DH;  // phase 2: keys r2.., columns c2..
  const int r3 = (warp / 4) * 32, c3 = (warp % 4) * DQ;  // phase 3: query rows r3.., columns c3..
  const float drop_scale = DROP ? static_cast<float>(drop.scale) : 1.f;  // dropout: the scale of the kept P

  const int nqb = (T_ + BR - 1) / BR;
  const int qb0 = k0 / BR;  // query tiles before this one lie entirely before the keys
  auto load_q_tile = [&](int qb, int buf) {
    load_bwd_query_tile<T, BR, D, S, NT>(sQ, sdO, sL, sDl, Q, dO, in, LSE, Delta, qb, buf, T_);
  };
  load_tile_async<T, BC, D, S, NT>(sK, K, in.k.row, k0, T_);
  load_tile_async<T, BC, D, S, NT>(sV, V, in.v.row, k0, T_);
  load_q_tile(qb0, 0);
  cp_async_commit();

  float dk[2][DH / 8][4], dv[2][DH / 8][4];
  zero_acc<2>(dk);
  zero_acc<2>(dv);

  for (int qb = qb0; qb < nqb; ++qb) {
    const int buf = (qb - qb0) & 1;
    const int q0 = qb * BR;
    pipeline_step(qb + 1 < nqb, [&] { load_q_tile(qb + 1, buf ^ 1); });
    const T* sQb = sQ + buf * BR * S;
    const T* sdOb = sdO + buf * BR * S;
    const float* sLb = sL + buf * BR;
    const float* sDb = sDl + buf * BR;

    // 1. S and dP for query rows r1.. and keys c1.. (a warp whose keys all lie after its rows skips the
    //    products: its P and dS are all zero, which the mask below writes)
    float s[2][4][4], dp[2][4][4];
    if (k0 + c1 <= q0 + r1 + 31) {
      auto rows_of = [lane](const T* sM) {
        return [sM, lane](int mt, int kk, uint32_t(&a)[4]) {
          ldsm_x4(a, sM + (mt * 16 + a_row(lane)) * S + kk * 16 + a_col(lane));
        };
      };
      acc_abt<T, 2, 32, D, S>(s, rows_of(sQb + r1 * S), sK + c1 * S, lane);
      acc_abt<T, 2, 32, D, S>(dp, rows_of(sdOb + r1 * S), sV + c1 * S, lane);
    } else {
      zero_acc<2>(s);
      zero_acc<2>(dp);
    }
    // LSE·log2e and Delta of this thread's 4 query rows (r = 0, 1: rows g and g + 8 of row tile mt), read
    // once: between the stores to sP and sdS below, the compiler would read them again for every element
    float lse[2][2], delta[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        lse[mt][r] = sLb[r1 + mt * 16 + g + 8 * r] * kLog2e;
        delta[mt][r] = sDb[r1 + mt * 16 + g + 8 * r];
      }
    // dropout: the row keys of the same rows
    uint32_t rkey[DROP ? 2 : 1][2];
    if constexpr (DROP) dropout_row_keys(rkey, drop, bh, q0 + r1 + g);
    // P and dS of the warp's 32 x 32 tile; the causal mask (and the rows past T) only where the warp's tile
    // has a key after its first query or a row past T (warp-uniform)
    masked_or_not(q0 + r1 < k0 + c1 + 31 || q0 + r1 + 31 >= T_, [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;   // a constant, without --expt-relaxed-constexpr
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          float p[4], ds[4];
          [[maybe_unused]] uint32_t bits[2];  // dropout: this thread's key pair in rows g and g + 8
          if constexpr (DROP) {
            const uint32_t key0 = k0 + c1 + nt * 8 + t4 * 2;
            bits[0] = minilm_dropout::pair_bits(rkey[mt][0], key0);
            bits[1] = minilm_dropout::pair_bits(rkey[mt][1], key0);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int qi = r1 + mt * 16 + g + (i < 2 ? 0 : 8);  // row of the tile
            const int q = q0 + qi, key = k0 + c1 + nt * 8 + t4 * 2 + (i & 1);
            p[i] = (kMasked && (q < key || q >= T_)) ? 0.f : exp2f(s[mt][nt][i] * scale_log2 - lse[mt][i >> 1]);
            if constexpr (DROP) {
              // sP gets the dropped P (scaled at the end, with dV); dS = P ∘ (dP ∘ keep · scale − Delta)
              const bool k = minilm_dropout::kept(bits[i >> 1], key, drop.threshold);
              ds[i] = p[i] * ((k ? dp[mt][nt][i] * drop_scale : 0.f) - delta[mt][i >> 1]);
              if (!k) p[i] = 0.f;
            } else {
              ds[i] = p[i] * (dp[mt][nt][i] - delta[mt][i >> 1]);
            }
          }
          const int row = r1 + mt * 16 + g, col = c1 + nt * 8 + t4 * 2;
          *reinterpret_cast<uint32_t*>(sP + row * SP + col) = Half<T>::pack(p[0], p[1]);
          *reinterpret_cast<uint32_t*>(sP + (row + 8) * SP + col) = Half<T>::pack(p[2], p[3]);
          *reinterpret_cast<uint32_t*>(sdS + row * SP + col) = Half<T>::pack(ds[0], ds[1]);
          *reinterpret_cast<uint32_t*>(sdS + (row + 8) * SP + col) = Half<T>::pack(ds[2], ds[3]);
        }
    });
    __syncthreads();

    // 2. dV += Pᵀ dO for keys r2.. and columns c2.. (nothing to add when every key of the warp lies after
    //    the last query of the tile)
    const bool adds_dkdv = k0 + r2 <= q0 + BR - 1;
    if (adds_dkdv) acc_plus_ab<T, 2, BR, DH, S>(dv, a_trans_frag<T, SP>(sP + r2, lane), sdOb + c2, lane);

    // 3. dQ_tile += dS K for query rows r3.. and columns c3.., into the fp32 buffer (before dK, as in
    //    FlashAttention-2, so that the dK products below run while the atomics drain)
    if constexpr (WITH_DQ) {
      float dq[2][DQ / 8][4];
      zero_acc<2>(dq);
      const T* sA = sdS + r3 * SP;
      acc_plus_ab<T, 2, BC, DQ, S>(
          dq, [sA, lane](int mt, int kk, uint32_t(&a)[4]) {
            ldsm_x4(a, sA + (mt * 16 + a_row(lane)) * SP + kk * 16 + a_col(lane));
          },
          sK + c3, lane);
      float* dq_at = dQacc + static_cast<size_t>(q0 + r3 + g) * D + c3;  // this lane's row g
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < DQ / 8; ++j) atomic_add_acc<D>(dq_at + mt * 16 * D + j * 8, t4, dq[mt][j]);
    }

    // 4. dK += dSᵀ Q for the keys and columns of phase 2
    if (adds_dkdv) acc_plus_ab<T, 2, BR, DH, S>(dk, a_trans_frag<T, SP>(sdS + r2, lane), sQb + c2, lane);
    __syncthreads();  // sP, sdS and this Q/dO buffer are rewritten next iteration
  }

  if constexpr (DROP) scale_acc<2>(dv, drop_scale);  // dV = (P ∘ keep)ᵀ dO · dropout's scale
  const int64_t res = in.res.offset(bh, in.heads);
  store_dkdv<T, 2, DH>(dK + res, dV + res, dk, dv, k0 + r2 + g, c2, t4, scale, T_, in.res.row);
}

// dQ alone (the "split" backward): a CTA of NW warps owns BR = 16·MT·NW query rows (MT row tiles of 16 per
// warp) and walks the key tiles up to the diagonal like the forward, with Q and dO fragments in registers:
//     P = 2^(S·scale·log2e − LSE·log2e),  dP = dO Vᵀ,  dS = P ∘ (dP − Delta),  dQ += dS K,
// so dQ needs no atomics and is deterministic; the dK/dV kernel (attn_bwd_tc<..., WITH_DQ = false>) skips it.
// MINILM_ATTN_DQ picks the tiling: narrow (MT = 1, 64-key tiles) or wide (MT = 2, 32-key tiles, D = 64 only:
// each K/V fragment feeds twice the mma).
template <int D, int NW_, int MT_, int BC_>
struct DqCfg {
  static constexpr int NW = NW_, MT = MT_, NT = NW * 32, BR = 16 * MT * NW, BC = BC_, S = D + 8;
  static constexpr size_t smem_bytes(size_t elem) { return static_cast<size_t>(BR + 4 * BC) * S * elem; }
};
template <int D>
using DqNarrow = DqCfg<D, 4, 1, 64>;
template <int D>
using DqWide = DqCfg<D, 4, 2, 32>;

template <typename T, int D, typename C, bool DROP = false>
__global__ void __launch_bounds__(C::NT)
    attn_bwd_dq_tc(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                   const T* __restrict__ dO, Layout in, const float* __restrict__ LSE,
                   const float* __restrict__ Delta, T* __restrict__ dQ, int T_, float scale, float scale_log2,
                   minilm_dropout::Params drop) {
  constexpr int BR = C::BR, BC = C::BC, S = C::S, NT = C::NT, MT = C::MT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BR][S]: Q, then dO (fragments are read once into registers)
  T* sK = sQ + BR * S;                      // [2][BC][S]
  T* sV = sK + 2 * BC * S;                  // [2][BC][S]

  const int bh = blockIdx.x;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;  // heaviest query tiles first
  Q += in.q.offset(bh, in.heads), K += in.k.offset(bh, in.heads), V += in.v.offset(bh, in.heads);
  dO += in.dout.offset(bh, in.heads);
  LSE += static_cast<size_t>(bh) * T_;
  Delta += static_cast<size_t>(bh) * T_;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  const int wrow0 = q0 + warp * 16 * MT;  // first query row of this warp; row tile mt starts at wrow0 + 16 mt
  const T* sQw = sQ + (warp * 16 * MT + a_row(lane)) * S + a_col(lane);
  float lse[MT][2], dl[MT][2];  // per row this thread holds: LSE·log2e and Delta
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = wrow0 + mt * 16 + g + 8 * r;
      lse[mt][r] = row < T_ ? LSE[row] * kLog2e : 0.f;
      dl[mt][r] = row < T_ ? Delta[row] : 0.f;
    }
  }
  uint32_t rkey[DROP ? MT : 1][2];  // dropout: the row keys of this thread's rows, fixed for the key loop
  const float drop_scale = DROP ? static_cast<float>(drop.scale) : 1.f;
  if constexpr (DROP) dropout_row_keys(rkey, drop, bh, wrow0 + g);

  const int kv_end = min(T_, q0 + BR);
  const int nkb = (kv_end + BC - 1) / BC;
  uint32_t qf[MT][D / 16][4], of[MT][D / 16][4];
  load_tile_async<T, BR, D, S, NT>(sQ, Q, in.q.row, q0, T_);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[mt][kk], sQw + mt * 16 * S + kk * 16);
  __syncthreads();
  load_tile_async<T, BR, D, S, NT>(sQ, dO, in.dout.row, q0, T_);
  load_tile_async<T, BC, D, S, NT>(sK, K, in.k.row, 0, T_);
  load_tile_async<T, BC, D, S, NT>(sV, V, in.v.row, 0, T_);
  cp_async_commit();

  float dq[MT][D / 8][4];
  zero_acc<MT>(dq);

  for (int kb = 0; kb < nkb; ++kb) {
    const int buf = kb & 1;
    pipeline_step(kb + 1 < nkb, [&] {
      load_tile_async<T, BC, D, S, NT>(sK + (buf ^ 1) * BC * S, K, in.k.row, (kb + 1) * BC, T_);
      load_tile_async<T, BC, D, S, NT>(sV + (buf ^ 1) * BC * S, V, in.v.row, (kb + 1) * BC, T_);
    });
    if (kb == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(of[mt][kk], sQw + mt * 16 * S + kk * 16);
    }
    const int k0 = kb * BC;
    if (k0 <= wrow0 + 16 * MT - 1) {  // else every key of the tile lies after this warp's rows
      const T* sKb = sK + buf * BC * S;
      const T* sVb = sV + buf * BC * S;

      // S = Q Kᵀ and dP = dO Vᵀ (16·MT rows x BC keys per warp)
      float s[MT][BC / 8][4], dp[MT][BC / 8][4];
      zero_acc<MT>(s);
      zero_acc<MT>(dp);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < BC / 16; ++np) {
          uint32_t b[4];
          ldsm_x4(b, sKb + (np * 16 + bn_row(lane)) * S + kk * 16 + bn_col(lane));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Half<T>::mma(s[mt][2 * np], qf[mt][kk], b[0], b[1]);
            Half<T>::mma(s[mt][2 * np + 1], qf[mt][kk], b[2], b[3]);
          }
          ldsm_x4(b, sVb + (np * 16 + bn_row(lane)) * S + kk * 16 + bn_col(lane));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Half<T>::mma(dp[mt][2 * np], of[mt][kk], b[0], b[1]);
            Half<T>::mma(dp[mt][2 * np + 1], of[mt][kk], b[2], b[3]);
          }
        }
      }
      // dS = P ∘ (dP − Delta), P = 0 for keys after the query (keys >= T lie after every valid query);
      // with dropout dP is first dropped and scaled like P: dS = P ∘ (dP ∘ keep · scale − Delta)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r0 = wrow0 + mt * 16, row_a = r0 + g, row_b = row_a + 8;
        const bool diag = k0 + BC - 1 > r0;
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
          const uint32_t key0 = k0 + nt * 8 + t4 * 2;
          uint32_t bits[2];  // dropout: this thread's key pair in rows row_a and row_b
          if constexpr (DROP) {
            bits[0] = minilm_dropout::pair_bits(rkey[mt][0], key0);
            bits[1] = minilm_dropout::pair_bits(rkey[mt][1], key0);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            float p = exp2f(s[mt][nt][i] * scale_log2 - lse[mt][i >> 1]);
            if (diag) {
              const int key = k0 + nt * 8 + t4 * 2 + (i & 1);
              if (key > (i < 2 ? row_a : row_b)) p = 0.f;
            }
            float d = dp[mt][nt][i];
            if constexpr (DROP)
              d = minilm_dropout::kept(bits[i >> 1], key0 + (i & 1), drop.threshold) ? d * drop_scale : 0.f;
            s[mt][nt][i] = p * (d - dl[mt][i >> 1]);
          }
        }
      }
      acc_plus_pb<T, MT, BC, D, S>(dq, s, sKb, lane);  // dQ += dS K
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  dQ += in.res.offset(bh, in.heads);  // here, not before the loop: one pointer fewer live in it
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row_a = wrow0 + mt * 16 + g, row_b = row_a + 8;
    const int oa = row_a * in.res.row, ob = row_b * in.res.row;  // < (T + 128)·row < 2³¹ (the glue)
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + t4 * 2;
      if (row_a < T_)
        *reinterpret_cast<uint32_t*>(dQ + (oa + col)) = Half<T>::pack(dq[mt][dt][0] * scale, dq[mt][dt][1] * scale);
      if (row_b < T_)
        *reinterpret_cast<uint32_t*>(dQ + (ob + col)) =
            Half<T>::pack(dq[mt][dt][2] * scale, dq[mt][dt][3] * scale);
    }
  }
}

// ------------------------------------------------------------------------------- CUDA-core kernels
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
}
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
template <typename A>
__device__ __forceinline__ A neg_inf() { return -INFINITY; }


// Lane `lane` holds elements d = lane + 32 j (j < PER) of a row of D values.
template <typename T, typename A, int PER>
__device__ __forceinline__ void load_row(A (&r)[PER], const T* p, int D, int lane) {
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int d = lane + 32 * j;
    r[j] = d < D ? static_cast<A>(to_f(p[d])) : A(0);
  }
}
template <typename T, typename A, int PER>
__device__ __forceinline__ A dot_row(const A (&r)[PER], const T* p, int D, int lane) {
  A s = 0;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int d = lane + 32 * j;
    if (d < D) s += r[j] * static_cast<A>(to_f(p[d]));
  }
  return warp_sum(s);
}

// Dropout in the CUDA-core kernels: the hash key of the (batch, head) of row `row` of [BH·T, D].
__device__ __forceinline__ uint32_t simple_head_key(const minilm_dropout::Params& drop, int64_t row, int T_) {
  return minilm_dropout::head_key(drop.seed0, drop.seed1, static_cast<uint32_t>(row / T_));
}

template <typename T, typename A, int PER, bool DROP = false>
__global__ void attn_fwd_simple(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                                T* __restrict__ O, A* __restrict__ LSE, int64_t rows, int T_, int D, A scale,
                                minilm_dropout::Params drop) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = static_cast<int>(row % T_);
  const size_t base = static_cast<size_t>(row - i) * D;  // start of this (batch, head)
  const uint32_t rkey = DROP ? minilm_dropout::row_key(simple_head_key(drop, row, T_), i) : 0u;  // dropout
  A q[PER], acc[PER];
  load_row<T, A, PER>(q, Q + static_cast<size_t>(row) * D, D, lane);
#pragma unroll
  for (int j = 0; j < PER; ++j) acc[j] = 0;
  A m = neg_inf<A>(), l = 0;
  for (int key = 0; key <= i; ++key) {
    const A s = dot_row<T, A, PER>(q, K + base + static_cast<size_t>(key) * D, D, lane) * scale;
    const A m_new = s > m ? s : m;
    const A corr = exp_acc(m - m_new);
    A p = exp_acc(s - m_new);
    l = l * corr + p;  // l sums the undropped P; only O sees the drops
    if constexpr (DROP) {
      if (!minilm_dropout::keep(rkey, key, drop.threshold)) p = 0;
    }
    const T* v = V + base + static_cast<size_t>(key) * D;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int d = lane + 32 * j;
      acc[j] = acc[j] * corr + (d < D ? p * static_cast<A>(to_f(v[d])) : A(0));
    }
    m = m_new;
  }
  const A drop_scale = DROP ? static_cast<A>(drop.scale) : A(1);  // O = (P ∘ keep) V · scale / l
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int d = lane + 32 * j;
    if (d < D) O[static_cast<size_t>(row) * D + d] = FromF<T>::cvt(DROP ? acc[j] / l * drop_scale : acc[j] / l);
  }
  if (lane == 0) LSE[row] = m + log_acc(l);
}

// dQ_i = scale · sum_{j <= i} P_ij (dP_ij − Delta_i) k_j: one warp per query row
// With dropout: dS_ij = P_ij (dP_ij keep_ij · dropout scale − Delta_i).
template <typename T, typename A, int PER, bool DROP = false>
__global__ void attn_bwd_dq_simple(const T* __restrict__ dO, const T* __restrict__ Q, const T* __restrict__ K,
                                   const T* __restrict__ V, const A* __restrict__ LSE, const A* __restrict__ Delta,
                                   T* __restrict__ dQ, int64_t rows, int T_, int D, A scale,
                                   minilm_dropout::Params drop) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = static_cast<int>(row % T_);
  const size_t base = static_cast<size_t>(row - i) * D;
  A q[PER], g[PER], acc[PER];
  load_row<T, A, PER>(q, Q + static_cast<size_t>(row) * D, D, lane);
  load_row<T, A, PER>(g, dO + static_cast<size_t>(row) * D, D, lane);
#pragma unroll
  for (int j = 0; j < PER; ++j) acc[j] = 0;
  const A lse = LSE[row], delta = Delta[row];
  const uint32_t rkey = DROP ? minilm_dropout::row_key(simple_head_key(drop, row, T_), i) : 0u;  // dropout
  const A drop_scale = DROP ? static_cast<A>(drop.scale) : A(1);
  for (int key = 0; key <= i; ++key) {
    const T* k = K + base + static_cast<size_t>(key) * D;
    const A s = dot_row<T, A, PER>(q, k, D, lane);
    A dp = dot_row<T, A, PER>(g, V + base + static_cast<size_t>(key) * D, D, lane);
    if constexpr (DROP) dp = minilm_dropout::keep(rkey, key, drop.threshold) ? dp * drop_scale : A(0);
    const A ds = exp_acc(s * scale - lse) * (dp - delta);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int d = lane + 32 * j;
      if (d < D) acc[j] += ds * static_cast<A>(to_f(k[d]));
    }
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int d = lane + 32 * j;
    if (d < D) dQ[static_cast<size_t>(row) * D + d] = FromF<T>::cvt(acc[j] * scale);
  }
}

// dV_j = sum_{i >= j} P_ij dO_i, dK_j = scale · sum_{i >= j} P_ij (dP_ij − Delta_i) q_i: one warp per key row
// With dropout: dV_j = scale_drop · sum_i P_ij keep_ij dO_i and dS as in attn_bwd_dq_simple.
template <typename T, typename A, int PER, bool DROP = false>
__global__ void attn_bwd_dkdv_simple(const T* __restrict__ dO, const T* __restrict__ Q, const T* __restrict__ K,
                                     const T* __restrict__ V, const A* __restrict__ LSE,
                                     const A* __restrict__ Delta, T* __restrict__ dK, T* __restrict__ dV,
                                     int64_t rows, int T_, int D, A scale, minilm_dropout::Params drop) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int j0 = static_cast<int>(row % T_);
  const int64_t brow = row - j0;  // row index of query 0 of this (batch, head)
  const size_t base = static_cast<size_t>(brow) * D;
  A k[PER], v[PER], dk[PER], dv[PER];
  load_row<T, A, PER>(k, K + static_cast<size_t>(row) * D, D, lane);
  load_row<T, A, PER>(v, V + static_cast<size_t>(row) * D, D, lane);
#pragma unroll
  for (int j = 0; j < PER; ++j) dk[j] = dv[j] = 0;
  const A drop_scale = DROP ? static_cast<A>(drop.scale) : A(1);
  const uint32_t head = DROP ? simple_head_key(drop, row, T_) : 0u;  // dropout: this (batch, head)'s key
  for (int i = j0; i < T_; ++i) {
    const T* q = Q + base + static_cast<size_t>(i) * D;
    const T* g = dO + base + static_cast<size_t>(i) * D;
    const A s = dot_row<T, A, PER>(k, q, D, lane);
    A dp = dot_row<T, A, PER>(v, g, D, lane);
    const A p = exp_acc(s * scale - LSE[brow + i]);
    A pv = p;  // the P that multiplies dO: dropped (scaled at the end) with dropout
    if constexpr (DROP) {
      const bool k = minilm_dropout::keep(minilm_dropout::row_key(head, i), j0, drop.threshold);
      pv = k ? p : A(0);
      dp = k ? dp * drop_scale : A(0);
    }
    const A ds = p * (dp - Delta[brow + i]);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int d = lane + 32 * j;
      if (d < D) {
        dv[j] += pv * static_cast<A>(to_f(g[d]));
        dk[j] += ds * static_cast<A>(to_f(q[d]));
      }
    }
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int d = lane + 32 * j;
    if (d < D) {
      dK[static_cast<size_t>(row) * D + d] = FromF<T>::cvt(dk[j] * scale);
      dV[static_cast<size_t>(row) * D + d] = FromF<T>::cvt(DROP ? dv[j] * drop_scale : dv[j]);
    }
  }
}

// ------------------------------------------------------------------------------------------ launchers
// Whether this GPU gives one CTA `bytes` of shared memory (the opt-in limit: 227 KB on Hopper, 163 KB on an
// A100, 99 KB on sm_86/89/120 GPUs such as the L4, L40S and RTX 4090). Tilings that need more fall back.
// MINILM_SMEM_LIMIT_KB lowers the limit, so that tests run the fallbacks of smaller GPUs on a large one.
bool smem_fits(size_t bytes) {
  size_t limit = static_cast<size_t>(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  if (const char* cap = std::getenv("MINILM_SMEM_LIMIT_KB")) limit = std::min(limit, std::strtoul(cap, nullptr, 10) * 1024);
  return bytes <= limit;
}

template <typename F>
cudaError_t with_smem(F kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// The arguments of one forward launch.
struct FwdArgs {
  const void *q, *k, *v;
  Layout in;
  void* out;
  float* lse;
  int64_t BH, T;
  float scale;
  minilm_dropout::Params dropout;
  cudaStream_t stream;
};

template <typename T, int D, typename C, bool DROP = false>
cudaError_t launch_fwd_tc(const FwdArgs& a) {
  const size_t smem = C::smem_bytes(sizeof(T));
  auto kernel = attn_fwd_tc<T, D, C, DROP>;
  cudaError_t err = with_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.BH), static_cast<unsigned>((a.T + C::BR - 1) / C::BR));
  kernel<<<grid, C::NT, smem, a.stream>>>(static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                                          static_cast<const T*>(a.v), a.in, static_cast<T*>(a.out), a.lse,
                                          static_cast<int>(a.T), a.scale * kLog2e, a.dropout);
  return cudaGetLastError();
}

// ---- Tuning choices. The tensor-core kernels come in several tilings (FwdCfg, DqCfg, the backward
// schemes); which one runs is fixed per head dim by the defaults below, measured on an H100 with
// `python scripts/cuda_diagnostics.py attn-sweep`. For such measurements an environment variable, read at
// every call, overrides a default: one name for every head dim ("wide") or one per head dim
// ("64:wide,128:narrow2").
//   MINILM_ATTN_FWD: narrow | narrow2 | wide | wide3 | wide64   (forward layout, see FwdCfg)
//   MINILM_ATTN_BWD: fused | split | split2 | split3 | splitkv | wide | wide16 | fusedwide | fusedkv |
//                    fused2d | split2d
//                                                         (backward scheme, see "Backward schemes" below)
//   MINILM_ATTN_DQ : narrow | wide                        (dQ kernel of the split schemes, see DqCfg; wide: D = 64)
// With attention dropout (dropout_p > 0) only a few tilings are built (the DROP = true kernels, to bound the
// build time): the default forward and dQ tiling (MINILM_ATTN_FWD and MINILM_ATTN_DQ are then ignored), and
// the backward schemes that built_with_dropout lists (any other MINILM_ATTN_BWD choice runs the default).
int tuning_choice(const char* var, int D, std::initializer_list<const char*> names, int fallback) {
  const char* env = std::getenv(var);
  if (env == nullptr) return fallback;
  std::string value;
  for (const char* c = env; *c != '\0'; ++c)
    if (*c != ' ') value += *c;
  const std::string key = std::to_string(D) + ":";
  std::string pick;
  bool listed = value.find(':') == std::string::npos;  // one name for every head dim
  if (listed) {
    pick = value;
  } else {
    for (size_t pos = 0; pos <= value.size();) {
      size_t end = value.find(',', pos);
      if (end == std::string::npos) end = value.size();
      const std::string item = value.substr(pos, end - pos);
      if (item.compare(0, key.size(), key) == 0) pick = item.substr(key.size()), listed = true;
      pos = end + 1;
    }
  }
  if (!listed || pick.empty()) return fallback;  // no entry for this head dim: the default
  int i = 0;
  for (const char* name : names) {
    if (pick == name) return i;
    ++i;
  }
  static bool warned = false;  // a typo should not pass unnoticed, nor flood a training log
  if (!warned) {
    warned = true;
    std::fprintf(stderr, "minilm: %s=%s: unknown choice '%s' for head dim %d; using the default\n", var, env,
                 pick.c_str(), D);
  }
  return fallback;
}
// THE DEFAULTS (index into the name lists above), from the first of two sweeps on one H100 (bf16, fwd+bwd
// against SDPA's flash backend in the same run; scripts/cuda_diagnostics.py attn-sweep, eighth session; the
// second sweep, with these defaults, agreed within a few percent except fusedwide at T = 512: 0.92x):
//   forward D = 64: wide (1.11x / 1.00x / 0.97x flash at T = 512 / 2048 / 8192; narrow 1.07 / 0.92 / 0.87);
//   forward D = 128: wide64 (0.98x; wide 0.91x, narrow2 0.87x);
//   backward D = 64: fusedwide (fwd+bwd 1.02x / 1.02x / 0.99x; wide 1.05 / 0.96 / 0.87, split3 1.06 /
//            0.93 / 0.85, fused 0.91 / 0.85 / 0.83);
//   backward D = 128: fused2d (0.86x; split2d 0.79x, splitkv 0.77x, split 0.74x, split2 0.51x: it spills).
// A third sweep (fourteenth session, the same H100 model, kernels read and write through strides) picked the
// same tilings: backward fusedwide 1.13x / 1.06x / 1.03x and fused2d 0.89x flash (ten calls back to back).
// Both backward defaults add dQ with atomics, as FlashAttention-2 and SDPA's flash backend do, so dQ is not
// bitwise reproducible. Under torch.use_deterministic_algorithms(True) the backward runs the fastest scheme
// without atomics instead: wide at D = 64, split2d at D = 128 (deterministic_bwd_scheme).
// The 2-D schemes at D = 128 need 171 KB of shared memory per CTA: where a GPU has less (an A100: 163 KB)
// they fall back to fused / split (resolve_bwd_scheme).
// default_fwd_layout, default_bwd_scheme, deterministic_bwd_scheme and default_dq_wide below are the one
// place that names them (the dropout path builds and runs whatever they say).
enum FwdLayout { kFwdNarrow, kFwdNarrow2, kFwdWide, kFwdWide3, kFwdWide64 };
enum BwdScheme { kFused, kSplit, kSplit2, kSplit3, kSplitKV, kWide, kWide16, kFusedWide, kFusedKV, kFused2d, kSplit2d };
constexpr int default_fwd_layout(int D) { return D <= 64 ? kFwdWide : kFwdWide64; }
constexpr int default_bwd_scheme(int D) { return D <= 64 ? kFusedWide : kFused2d; }
constexpr int deterministic_bwd_scheme(int D) { return D <= 64 ? kWide : kSplit2d; }
constexpr bool default_dq_wide(int D) { return D <= 64; }

int fwd_layout(int D) {
  return tuning_choice("MINILM_ATTN_FWD", D, {"narrow", "narrow2", "wide", "wide3", "wide64"}, default_fwd_layout(D));
}
// Whether a scheme adds dQ with atomics in its dK/dV kernel (else the dQ kernel runs after it). The wide
// schemes exist for D = 64 only: at D = 128 fusedwide runs split (see launch_bwd_scheme).
constexpr bool is_fused(int scheme, int D) {
  return scheme == kFused || scheme == kFusedKV || scheme == kFused2d || (D <= 64 && scheme == kFusedWide);
}
int bwd_variant(int D) {
  return tuning_choice("MINILM_ATTN_BWD", D,
                       {"fused", "split", "split2", "split3", "splitkv", "wide", "wide16", "fusedwide", "fusedkv",
                        "fused2d", "split2d"},
                       default_bwd_scheme(D));
}
bool dq_wide(int D) {
  return tuning_choice("MINILM_ATTN_DQ", D, {"narrow", "wide"}, default_dq_wide(D) ? 1 : 0) == 1;
}

// The FwdCfg of each forward layout.
template <int D, int LAYOUT>
using FwdLayoutCfg = std::conditional_t<
    LAYOUT == kFwdNarrow, FwdNarrow<D>,
    std::conditional_t<LAYOUT == kFwdNarrow2, FwdNarrow2<D>,
                       std::conditional_t<LAYOUT == kFwdWide3, FwdWide3<D>,
                                          std::conditional_t<LAYOUT == kFwdWide64, FwdWide64<D>, FwdWide<D>>>>>;

// A layout that needs more shared memory per CTA than this GPU has runs wide instead (at D = 128 wide64,
// narrow and narrow2 take 102 KB, sm_86/89/120 GPUs have 99 KB; wide takes 68 KB).
template <typename T, int D, int LAYOUT, bool DROP = false>
cudaError_t launch_fwd_layout(const FwdArgs& a) {
  if constexpr (LAYOUT != kFwdWide) {
    if (!smem_fits(FwdLayoutCfg<D, LAYOUT>::smem_bytes(sizeof(T)))) return launch_fwd_layout<T, D, kFwdWide, DROP>(a);
  }
  return launch_fwd_tc<T, D, FwdLayoutCfg<D, LAYOUT>, DROP>(a);
}

template <typename T, int D>
cudaError_t fwd_tc(const FwdArgs& a) {
  // with dropout only the default (and wide, its fallback) is built: MINILM_ATTN_FWD is ignored
  if (a.dropout.active()) return launch_fwd_layout<T, D, default_fwd_layout(D), true>(a);
  switch (fwd_layout(D)) {
    case kFwdNarrow: return launch_fwd_layout<T, D, kFwdNarrow>(a);
    case kFwdNarrow2: return launch_fwd_layout<T, D, kFwdNarrow2>(a);
    case kFwdWide3: return launch_fwd_layout<T, D, kFwdWide3>(a);
    case kFwdWide64: return launch_fwd_layout<T, D, kFwdWide64>(a);
    default: return launch_fwd_layout<T, D, kFwdWide>(a);
  }
}

// Backward schemes (MINILM_ATTN_BWD; the defaults are above, with the sweep's figures; register and spill
// counts are ptxas's, nvcc 13.0, sm_90 unless said: python scripts/sass_stats.py prints them):
//   fused  : one kernel, dQ added into an fp32 buffer with atomicAdd (FlashAttention-2's scheme)
//   split  : a dK/dV kernel without dQ + a dQ kernel (no atomics, deterministic)
//   split2 : as split, with the dK/dV kernel limited to 128 registers (2 CTAs per SM; spills for D = 128)
//   split3 : as split2 with 32 query rows per step (fewer live registers: no spills at D = 64);
//            at D = 128 split2 already steps by 32 rows, so there split3 is split2
//   splitkv: as split with each warp's K and V fragments in registers at D = 128 too (split does that at
//            D = 64 already, so there splitkv is split): the Sᵀ and dPᵀ products then read only Q and dO
//            from shared memory. 255 registers, no spills (sm_90).
//   wide   : split with the dK/dV kernel in 4 warps x 32 keys (MTK = 2), K/V fragments in registers and
//            32-query steps: every Q/dO fragment read from shared memory feeds 4 mma instead of 2, so all
//            four products read 128 bytes of shared memory per mma (split3: 256 to 384). 255 registers,
//            2 CTAs per SM; about 180 bytes of spills on sm_90, with dropout too, since its Pᵀ loop has a
//            masked and a mask-free version (84 and 60 before that, none before the inputs were read through
//            their strides).
//   wide16 : as wide with 16-query steps (fewer live scores, twice the steps)
//   fusedwide: fused with the wide dK/dV tiling (4 warps x 32 keys, 32-query steps; dQ by atomics)
//   fusedkv: fused with the K/V fragments in registers (244 registers at D = 64, 255 at D = 128)
//   fused2d: FlashAttention-2's backward tiling (attn_bwd_2d: 2-D warp grids, P and dS through shared
//            memory, dQ by atomics); split2d: the same without dQ, plus the dQ kernel (deterministic).
//            At D = 128 a CTA takes 171 KB of shared memory: Hopper has it (227 KB), an A100 (163 KB) does
//            not, and there fused / split run instead (resolve_bwd_scheme).
//   The wide schemes exist for D = 64 only (at D = 128 the dK and dV accumulators of 32 keys alone would
//   take 256 registers); at D = 128 they run split.
// A model to read the schemes by (a model, not a measurement: occupancy, the exp throughput and the dQ
// atomics count too). mma.sync takes its operands through ldmatrix from shared memory, which delivers 128
// bytes per clock per SM, while the tensor cores can finish up to about one m16n8k16 per clock per SM; so a
// product whose warp tile reads more than about 128 bytes of shared memory per mma waits on shared memory.
// A warp tile of M x N reads, per 16-deep step, 32·M bytes for an A operand in shared memory and 32·N for a
// B operand in shared memory, for M·N/128 mma. Bytes per mma for Sᵀ, dPᵀ, dV, dK | the dQ product(s), and
// the sum (+: plus the dQ atomics):
//                D = 64                                 D = 128
//   split      256 256 256 256 | 128 128 128 = 1408     384 384 256 256 | 256 256 256 = 2048
//   split3     384 384 256 256 | 128 128 128 = 1664     (split2 = split's reads)
//   splitkv    (split)                                  256 256 256 256 | 256 256 256 = 1792
//   wide       128 128 128 128 | 128 128 128 =  896     (split)
//   fused      320 320 256 256 | 384         = 1536+    384 384 256 256 | 384         = 1664+
//   fusedkv    256 256 256 256 | 384         = 1408+    256 256 256 256 | 384         = 1408+
//   fusedwide  256 256 128 128 | 384         = 1152+    (split)
//   fused2d    256 256 256 256 | 384         = 1408+    256 256 192 192 | 256         = 1152+
//   split2d    256 256 256 256 | 128 128 128 = 1408     256 256 192 192 | 256 256 256 = 1664
// The same count for FlashAttention-2's backward tiling (our reading of its kernel traits) gives 1152+ at
// both head dims. The H100 sweep bears it out at D = 128 (fused2d is the fastest there) and in part at D = 64
// (wide is the fastest scheme without atomics, fusedwide the fastest with them).

// The dK/dV kernels' CTA order (dkdv_order.h): default_dkdv_order for this GPU's L2, or MINILM_ATTN_HEAD_GROUP=n
// heads per group (0: all heads, the grid's own order) and MINILM_ATTN_KEY_PHASES=p key-tile ranges, for
// measurements (scripts/cuda_diagnostics.py attn-order).
DkdvOrder dkdv_order(int64_t BH, int64_t T, int D, size_t elem, bool fused) {
  const int64_t row_bytes = D * static_cast<int64_t>(2 * elem + (fused ? sizeof(float) : 0));  // Q, dO (, dQ)
  DkdvOrder order = default_dkdv_order(BH, T, row_bytes, current_device_attribute(cudaDevAttrL2CacheSize, 0));
  if (const char* env = std::getenv("MINILM_ATTN_HEAD_GROUP")) {
    const int64_t group = std::strtol(env, nullptr, 10);
    order.head_group = static_cast<int>(group <= 0 ? BH : std::min<int64_t>(group, BH));
  }
  if (const char* env = std::getenv("MINILM_ATTN_KEY_PHASES")) {
    order.phases = static_cast<int>(std::clamp<long>(std::strtol(env, nullptr, 10), 1, 1 << 16));
  }
  return order;
}

// The arguments of one dK/dV launch (dq_accum: null for the split schemes).
struct BwdArgs {
  const void *dout, *q, *k, *v;
  Layout in;
  const float *lse, *delta;
  float* dq_accum;
  void *dk, *dv;
  int64_t BH, T;
  float scale;
  minilm_dropout::Params dropout;
  cudaStream_t stream;
  DkdvOrder order;  // of the dK/dV kernels' CTAs (dkdv_order)
};

// One dK/dV kernel: a CTA of C::NT threads per C::BC keys of one (batch, head).
template <typename T, typename C, typename Kernel>
cudaError_t launch_dkdv(Kernel kernel, const BwdArgs& a) {
  const size_t smem = C::smem_bytes(sizeof(T));
  cudaError_t err = with_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.BH), static_cast<unsigned>((a.T + C::BC - 1) / C::BC));
  kernel<<<grid, C::NT, smem, a.stream>>>(static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                                          static_cast<const T*>(a.v), static_cast<const T*>(a.dout), a.in, a.lse,
                                          a.delta, a.dq_accum, static_cast<T*>(a.dk), static_cast<T*>(a.dv),
                                          static_cast<int>(a.T), a.order, a.scale, a.scale * kLog2e,
                                          a.dropout);
  return cudaGetLastError();
}

template <typename T, int D, bool DROP, bool WITH_DQ, int MINB, int BR = (D <= 64 ? 64 : 32), int NW = 8,
          int MTK = 1, bool KVREG = !WITH_DQ && MINB == 1 && D <= 64>
cudaError_t launch_bwd_tc(const BwdArgs& a) {
  return launch_dkdv<T, BwdCfg<D, BR, NW, MTK>>(attn_bwd_tc<T, D, WITH_DQ, MINB, BR, NW, MTK, KVREG, DROP>, a);
}

template <typename T, int D, bool DROP, bool WITH_DQ>
cudaError_t launch_bwd_2d(const BwdArgs& a) {
  return launch_dkdv<T, Bwd2dCfg<D>>(attn_bwd_2d<T, D, WITH_DQ, DROP>, a);
}

// The dK/dV kernel of backward scheme SCHEME (adding dQ with atomics for the fused ones), as listed above;
// DROP: with attention dropout.
template <typename T, int D, int SCHEME, bool DROP = false>
cudaError_t launch_bwd_scheme(const BwdArgs& a) {
  constexpr int BR = D <= 64 ? 64 : 32;
  // the wide schemes exist for D = 64 only; at D = 128 they run split (the last case)
  if constexpr (D <= 64 && SCHEME == kWide) return launch_bwd_tc<T, D, DROP, false, 2, 32, 4, 2, true>(a);
  else if constexpr (D <= 64 && SCHEME == kWide16) return launch_bwd_tc<T, D, DROP, false, 2, 16, 4, 2, true>(a);
  else if constexpr (D <= 64 && SCHEME == kFusedWide) return launch_bwd_tc<T, D, DROP, true, 2, 32, 4, 2, false>(a);
  else if constexpr (SCHEME == kFused) return launch_bwd_tc<T, D, DROP, true, 1>(a);
  else if constexpr (SCHEME == kSplit2) return launch_bwd_tc<T, D, DROP, false, 2>(a);
  else if constexpr (SCHEME == kSplit3) return launch_bwd_tc<T, D, DROP, false, 2, 32>(a);
  else if constexpr (SCHEME == kSplitKV) return launch_bwd_tc<T, D, DROP, false, 1, BR, 8, 1, true>(a);
  else if constexpr (SCHEME == kFusedKV) return launch_bwd_tc<T, D, DROP, true, 1, BR, 8, 1, true>(a);
  else if constexpr (SCHEME == kFused2d) return launch_bwd_2d<T, D, DROP, true>(a);
  else if constexpr (SCHEME == kSplit2d) return launch_bwd_2d<T, D, DROP, false>(a);
  else return launch_bwd_tc<T, D, DROP, false, 1>(a);  // split
}

// The same for a scheme chosen at run time (without dropout: every scheme is built).
template <typename T, int D>
cudaError_t launch_bwd_scheme(int scheme, const BwdArgs& a) {
  switch (scheme) {
    case kFused: return launch_bwd_scheme<T, D, kFused>(a);
    case kSplit2: return launch_bwd_scheme<T, D, kSplit2>(a);
    case kSplit3: return launch_bwd_scheme<T, D, kSplit3>(a);
    case kSplitKV: return launch_bwd_scheme<T, D, kSplitKV>(a);
    case kWide: return launch_bwd_scheme<T, D, kWide>(a);
    case kWide16: return launch_bwd_scheme<T, D, kWide16>(a);
    case kFusedWide: return launch_bwd_scheme<T, D, kFusedWide>(a);
    case kFusedKV: return launch_bwd_scheme<T, D, kFusedKV>(a);
    case kFused2d: return launch_bwd_scheme<T, D, kFused2d>(a);
    case kSplit2d: return launch_bwd_scheme<T, D, kSplit2d>(a);
    default: return launch_bwd_scheme<T, D, kSplit>(a);
  }
}

constexpr bool is_2d(int scheme) { return scheme == kFused2d || scheme == kSplit2d; }

// The scheme that runs: the chosen one, without dQ atomics where torch asks for deterministic algorithms,
// and without the 2-D tiling where the GPU lacks the shared memory for it.
template <typename T, int D>
int resolve_bwd_scheme(int scheme, bool deterministic) {
  if (deterministic && is_fused(scheme, D)) scheme = deterministic_bwd_scheme(D);
  if (is_2d(scheme) && !smem_fits(Bwd2dCfg<D>::smem_bytes(sizeof(T)))) scheme = scheme == kFused2d ? kFused : kSplit;
  return scheme;
}

// With dropout only a few schemes are built (to bound the build time): the default, the deterministic one,
// and fused and split where either of those is a 2-D scheme (the fallbacks above).
constexpr bool built_with_dropout(int scheme, int D) {
  return scheme == default_bwd_scheme(D) || scheme == deterministic_bwd_scheme(D) ||
         ((is_2d(default_bwd_scheme(D)) || is_2d(deterministic_bwd_scheme(D))) && (scheme == kFused || scheme == kSplit));
}

template <typename T, int D>
cudaError_t launch_bwd_dropout(int scheme, const BwdArgs& a) {
  constexpr int def = default_bwd_scheme(D), det = deterministic_bwd_scheme(D);
  if (scheme == det) return launch_bwd_scheme<T, D, det, true>(a);
  if constexpr (is_2d(def) || is_2d(det)) {
    if (scheme == kFused) return launch_bwd_scheme<T, D, kFused, true>(a);
    if (scheme == kSplit) return launch_bwd_scheme<T, D, kSplit, true>(a);
  }
  return launch_bwd_scheme<T, D, def, true>(a);
}

// The DqCfg of the dQ kernel's two tilings (wide exists for D = 64 only: at D = 128 it is narrow).
template <int D, bool WIDE>
using DqTiling = std::conditional_t<WIDE && D <= 64, DqWide<D>, DqNarrow<D>>;

template <typename T, int D, typename C, bool DROP = false>
cudaError_t launch_dq_tc(const BwdArgs& a, void* dq) {
  const size_t smem = C::smem_bytes(sizeof(T));
  auto kernel = attn_bwd_dq_tc<T, D, C, DROP>;
  cudaError_t err = with_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.BH), static_cast<unsigned>((a.T + C::BR - 1) / C::BR));
  kernel<<<grid, C::NT, smem, a.stream>>>(static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                                          static_cast<const T*>(a.v), static_cast<const T*>(a.dout), a.in, a.lse,
                                          a.delta, static_cast<T*>(dq), static_cast<int>(a.T), a.scale,
                                          a.scale * kLog2e,
                                          a.dropout);
  return cudaGetLastError();
}

// The backward scheme that runs, from MINILM_ATTN_BWD or the default: with dropout only one built with
// dropout (else the default); then resolve_bwd_scheme. The one place that decides it (bwd_tc and
// attention_backward_tc_adds_dq).
template <typename T, int D>
int backward_scheme(bool drop, bool deterministic) {
  int scheme = bwd_variant(D);
  if (drop && !built_with_dropout(scheme, D)) scheme = default_bwd_scheme(D);
  return resolve_bwd_scheme<T, D>(scheme, deterministic);
}

template <typename T, int D>
cudaError_t bwd_tc(const void* dout, const void* q, const void* k, const void* v, const void* out,
                   const Layout& in, const float* lse, float* delta, float* dq_accum, void* dq, void* dk,
                   void* dv, int64_t BH, int64_t T_, float scale, const minilm_dropout::Params& dropout,
                   bool deterministic, cudaStream_t stream) {
  const bool drop = dropout.active();
  const int scheme = backward_scheme<T, D>(drop, deterministic);
  const bool fused = is_fused(scheme, D);
  if (fused && dq_accum == nullptr) return cudaErrorInvalidValue;  // see attention_backward_tc_adds_dq
  // Delta, and for the fused schemes dq_accum zeroed, in one pass
  const int64_t rows = BH * T_;
  constexpr int rows_per_cta = kPrologueThreads / (D / 8);
  auto prologue = fused ? attn_bwd_prologue<T, D, true> : attn_bwd_prologue<T, D, false>;
  prologue<<<static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta), kPrologueThreads, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(out), in, delta, dq_accum, rows, static_cast<int>(T_));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const BwdArgs args{dout, q, k, v, in, lse, delta, fused ? dq_accum : nullptr, dk, dv, BH, T_, scale, dropout, stream,
                     dkdv_order(BH, T_, D, sizeof(T), fused)};
  auto dkdv = [&] { return drop ? launch_bwd_dropout<T, D>(scheme, args) : launch_bwd_scheme<T, D>(scheme, args); };
  err = dkdv();
  if (err != cudaSuccess) return err;
  if (!fused) {  // split: the dQ kernel after the dK/dV kernel (with dropout: its default tiling)
    if (drop) return launch_dq_tc<T, D, DqTiling<D, default_dq_wide(D)>, true>(args, dq);
    return dq_wide(D) ? launch_dq_tc<T, D, DqTiling<D, true>>(args, dq) : launch_dq_tc<T, D, DqTiling<D, false>>(args, dq);
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows * D / 4 + 255) / 256, 65536));
  attn_bwd_dq_convert<T, D><<<blocks, 256, 0, stream>>>(reinterpret_cast<const float4*>(dq_accum), static_cast<T*>(dq),
                                                        in, rows, static_cast<int>(T_), scale);
  return cudaGetLastError();
}

template <typename T, typename A, int PER>
cudaError_t fwd_simple(const void* q, const void* k, const void* v, void* out, void* lse, int64_t BH, int64_t T_,
                       int D, double scale, const minilm_dropout::Params& dropout, cudaStream_t stream) {
  const int64_t rows = BH * T_;
  const bool drop = dropout.active();
  auto fwd = drop ? attn_fwd_simple<T, A, PER, true> : attn_fwd_simple<T, A, PER, false>;
  fwd<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out),
      static_cast<A*>(lse), rows, static_cast<int>(T_), D, static_cast<A>(scale), dropout);
  return cudaGetLastError();
}

template <typename T, typename A, int PER>
cudaError_t bwd_simple(const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const void* lse, void* delta, void* dq, void* dk, void* dv, int64_t BH, int64_t T_, int D,
                       double scale, const minilm_dropout::Params& dropout, cudaStream_t stream) {
  const int64_t rows = BH * T_;
  const unsigned blocks = static_cast<unsigned>((rows + 7) / 8);
  attn_bwd_delta<T, A><<<blocks, 256, 0, stream>>>(static_cast<const T*>(dout), static_cast<const T*>(out),
                                                   static_cast<A*>(delta), rows, D);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const bool drop = dropout.active();
  auto dq_kernel = drop ? attn_bwd_dq_simple<T, A, PER, true> : attn_bwd_dq_simple<T, A, PER, false>;
  auto dkdv_kernel = drop ? attn_bwd_dkdv_simple<T, A, PER, true> : attn_bwd_dkdv_simple<T, A, PER, false>;
  dq_kernel<<<blocks, 256, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<const A*>(lse), static_cast<const A*>(delta), static_cast<T*>(dq), rows, static_cast<int>(T_), D,
      static_cast<A>(scale), dropout);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dkdv_kernel<<<blocks, 256, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<const A*>(lse), static_cast<const A*>(delta), static_cast<T*>(dk), static_cast<T*>(dv), rows,
      static_cast<int>(T_), D, static_cast<A>(scale), dropout);
  return cudaGetLastError();
}

}  // namespace

bool attention_tc_supported(Dtype dtype, int head_dim) {
  return (dtype == Dtype::kBFloat16 || dtype == Dtype::kFloat16) && (head_dim == 64 || head_dim == 128);
}

cudaError_t attention_forward_tc(Dtype dtype, const void* q, const void* k, const void* v, const Layout& in,
                                 void* out, float* lse, int64_t BH, int64_t T, int D, float scale,
                                 const minilm_dropout::Params& dropout, cudaStream_t stream) {
  const FwdArgs a{q, k, v, in, out, lse, BH, T, scale, dropout, stream};
  if (dtype == Dtype::kBFloat16) {
    if (D == 64) return fwd_tc<__nv_bfloat16, 64>(a);
    if (D == 128) return fwd_tc<__nv_bfloat16, 128>(a);
  } else if (dtype == Dtype::kFloat16) {
    if (D == 64) return fwd_tc<__half, 64>(a);
    if (D == 128) return fwd_tc<__half, 128>(a);
  }
  return cudaErrorInvalidValue;
}

bool attention_backward_tc_fits(Dtype /*dtype: bf16 and fp16 take the same room*/, int head_dim) {
  // split's dK/dV CTA: the largest that resolve_bwd_scheme can end on after its 2-D fallback (the dQ
  // kernel's is smaller)
  return head_dim == 64 ? smem_fits(BwdCfg<64, 64>::smem_bytes(2)) : smem_fits(BwdCfg<128, 32>::smem_bytes(2));
}

bool attention_backward_tc_adds_dq(Dtype dtype, int head_dim, bool dropout, bool deterministic) {
  auto adds = [&](auto scheme, int D) { return is_fused(scheme(dropout, deterministic), D); };
  if (dtype == Dtype::kBFloat16) {
    if (head_dim == 64) return adds(backward_scheme<__nv_bfloat16, 64>, 64);
    if (head_dim == 128) return adds(backward_scheme<__nv_bfloat16, 128>, 128);
  } else if (dtype == Dtype::kFloat16) {
    if (head_dim == 64) return adds(backward_scheme<__half, 64>, 64);
    if (head_dim == 128) return adds(backward_scheme<__half, 128>, 128);
  }
  return false;
}

cudaError_t attention_backward_tc(Dtype dtype, const void* dout, const void* q, const void* k, const void* v,
                                  const void* out, const Layout& in, const float* lse, float* delta,
                                  float* dq_accum, void* dq, void* dk, void* dv, int64_t BH, int64_t T, int D,
                                  float scale, const minilm_dropout::Params& dropout, bool deterministic,
                                  cudaStream_t stream) {
  auto run = [&](auto bwd) {
    return bwd(dout, q, k, v, out, in, lse, delta, dq_accum, dq, dk, dv, BH, T, scale, dropout, deterministic,
               stream);
  };
  if (dtype == Dtype::kBFloat16) {
    if (D == 64) return run(bwd_tc<__nv_bfloat16, 64>);
    if (D == 128) return run(bwd_tc<__nv_bfloat16, 128>);
  } else if (dtype == Dtype::kFloat16) {
    if (D == 64) return run(bwd_tc<__half, 64>);
    if (D == 128) return run(bwd_tc<__half, 128>);
  }
  return cudaErrorInvalidValue;
}

#define MINILM_SIMPLE_DISPATCH(FN, ...)                                                      \
  switch (dtype) {                                                                           \
    case Dtype::kFloat32:                                                                    \
      return D <= 128 ? FN<float, float, 4>(__VA_ARGS__) : FN<float, float, 8>(__VA_ARGS__); \
    case Dtype::kFloat64:                                                                    \
      return D <= 128 ? FN<double, double, 4>(__VA_ARGS__) : FN<double, double, 8>(__VA_ARGS__); \
    case Dtype::kBFloat16:                                                                   \
      return D <= 128 ? FN<__nv_bfloat16, float, 4>(__VA_ARGS__)                             \
                      : FN<__nv_bfloat16, float, 8>(__VA_ARGS__);                            \
    case Dtype::kFloat16:                                                                    \
      return D <= 128 ? FN<__half, float, 4>(__VA_ARGS__) : FN<__half, float, 8>(__VA_ARGS__); \
  }                                                                                          \
  return cudaErrorInvalidValue;

cudaError_t attention_forward_simple(Dtype dtype, const void* q, const void* k, const void* v, void* out,
                                     void* lse, int64_t BH, int64_t T, int D, double scale,
                                     const minilm_dropout::Params& dropout, cudaStream_t stream) {
  if (D < 1 || D > kSimpleMaxHeadDim) return cudaErrorInvalidValue;
  MINILM_SIMPLE_DISPATCH(fwd_simple, q, k, v, out, lse, BH, T, D, scale, dropout, stream)
}

cudaError_t attention_backward_simple(Dtype dtype, const void* dout, const void* q, const void* k, const void* v,
                                      const void* out, const void* lse, void* delta, void* dq, void* dk, void* dv,
                                      int64_t BH, int64_t T, int D, double scale,
                                      const minilm_dropout::Params& dropout, cudaStream_t stream) {
  if (D < 1 || D > kSimpleMaxHeadDim) return cudaErrorInvalidValue;
  MINILM_SIMPLE_DISPATCH(bwd_simple, dout, q, k, v, out, lse, delta, dq, dk, dv, BH, T, D, scale, dropout, stream)
}

#undef MINILM_SIMPLE_DISPATCH

}  // namespace minilm_cuda
