// ELMo's character CNN on NVIDIA GPUs, fused: embedding lookup -> 1-D convolution -> max over time
// -> + bias -> activation, without ever storing the [N, F, L − W + 1] activation map.
//
// Forward, fast kernel (one launch per filter width W <= 7, fp32 arithmetic on CUDA cores): a CTA of
// 8 warps owns 128 filters of one width and 64 tokens. It copies its filters into shared memory once,
// as a [E·W][128] fp32 matrix. Each warp then takes one token at a time: it gathers the token's
// embedded characters into its own [E][L] fp32 buffer in shared memory, and each lane computes 4
// filters x 16 time steps of the convolution in registers (an outer product per (e, w): one float4 of
// weights times a sliding window of 16 + W − 1 characters), for time chunks 0..15, 16..31, ...; after
// each chunk it folds the 16 values into a running max and argmax (strict '>' in increasing t: the first
// time step wins ties). Finally out = act(max + bias) and argmax = t*. Arithmetic intensity per lane is
// 64 FMAs per float4 of weights read, so the kernel runs on the FMA units rather than on shared memory.
// Other widths (or shapes whose filters do not fit in shared memory, or fp64) use a plain kernel:
// one thread per (token, filter), same accumulation order.
//
// Backward (the max passes the gradient to its argmax only): with g = grad_out · act'(out)
// (relu: 0 where out <= 0, else 1, so a NaN passes as in torch; tanh: 1 − out²),
//     dW_f[e][w] = Σ_n g[n,f] · x_n[t*+w][e],   db_f = Σ_n g[n,f],   dx_n[t*+w][e] += g[n,f] · W_f[e][w],
// and d(embedding)[v] = Σ of dx_n[t] over the positions (n, t) whose character is v. The arithmetic is small
// (per token and filter, E·W multiply-adds for dW and as many for dx: ~6.5 GMAC each for ELMo at 32k tokens);
// what matters is to feed the FMA units from registers and conflict-free shared memory, with enough warps
// per SM to hide its latency, and to avoid atomics, so that the result is bitwise reproducible.
//
// Default: the token-slot kernels. A warp works on NT = 32 / E tokens at once, lane = (slot h, dim e), and
// keeps its tokens' rows interleaved in shared memory ([t][h][e]), so that the 32 lanes of one access -- each
// slot at its own t* -- fall in distinct banks (E dividing 32).
// * dW, db (charcnn_bwd_dw_slots, one launch per width): a CTA owns 64 filters (32 in fp64), a chunk of
//   taps w and a chunk of tokens; each warp keeps 8 filters' dW_f[e][w-chunk] in registers. Per batch of 16
//   tokens it stages x = embedding[ids] and [filter][token] tables of g and t*; then each lane adds
//   g · x[t* + w][e] of its slot's tokens. At the end the slots' sums are added in slot order, and
//   charcnn_bwd_reduce adds the token chunks' partial sums in chunk order (~one wave of CTAs per width).
// * d(embedding) (charcnn_bwd_demb_slots, one launch for all widths): a CTA owns token blocks of 8·NT tokens
//   (16 for E = 16) and a private [V, E] table (in shared memory when small, as ELMo's 262 x 16). Per block
//   and per chunk of 64 filters, the filters are staged as [f][w][e] (the E lanes of every slot read the same
//   E consecutive values: a broadcast) and g, t* as [filter][token]. Each lane then adds g · W_f[e][·] into
//   rows t*..t*+W−1 of its own token's column e, filter after filter: W loads, W FMAs, W stores, unrolled
//   for W <= 8 (a plain loop beyond). No other lane writes that column, so no atomics. Then the rows of dx
//   go into the table: lane (slot q, e) owns table rows v ≡ q (mod 8·NT); a warp reads 32 positions' ids at
//   once, ballots which belong to each of its slots, and each lane adds its rows in increasing (token,
//   position). A last charcnn_bwd_reduce sums the CTAs' tables in CTA order.
// The old kernels (MINILM_CNN_BWD=old, and shapes the slot kernels do not take: E > 32, or rows too long
// for shared memory) map lane = filter instead:
// * charcnn_bwd_dw: a CTA owns 128 filters (lane = filter), an 8-wide slice of e and up to 8 w, and a chunk
//   of tokens; each thread walks its chunk's tokens (staged 32 at a time) with its dW slice in registers.
// * charcnn_bwd_demb: a CTA owns blocks of 256 / E tokens and a private [V, E] table; thread (token, e)
//   adds g·W_f[e][·] for every filter in order (weights read from global memory); then thread (e, v mod NG)
//   scans all rows of the block and adds those of its table rows.
// Either way, no atomics anywhere: the same inputs give the same bits.
#include "common.cuh"
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace minilm_cuda {
namespace {

// relu keeps a NaN (fmaxf would turn it into 0), as torch's relu and the CPU kernel do
__device__ __forceinline__ float act_fwd(float x, int act) { return act == 0 ? (x <= 0.f ? 0.f : x) : tanhf(x); }
__device__ __forceinline__ double act_fwd(double x, int act) { return act == 0 ? (x <= 0.0 ? 0.0 : x) : tanh(x); }

// Whether window value s replaces the running max: a larger value (the first on ties), or the first NaN,
// which then stays, as in torch.max and the CPU kernel (NaN inputs give NaN outputs, not a silent max).
template <typename A>
__device__ __forceinline__ bool new_max(A s, A best) { return s > best || (s != s && best == best); }

// ------------------------------------------------------------------------------------- forward, fast
constexpr int kTF = 4;               // filters per lane
constexpr int kTT = 16;              // time steps per lane and chunk
constexpr int kFwdWarps = 8;
constexpr int kFB = 32 * kTF;        // filters per CTA
constexpr int kFBP = kFB + 4;        // padded row of the shared weight matrix (keeps float4 alignment)
constexpr int kFwdTokens = 64;       // tokens per CTA
constexpr int kMaxFastWidth = 7;

// Shared row length of one embedded token: long enough for the float4 windows of the last chunk.
int fast_row_len(int L, int W) {
  const int t_out = L - W + 1;
  const int chunks = (t_out + kTT - 1) / kTT;
  const int nx4 = (kTT + W - 1 + 3) / 4;
  const int need = std::max(L, (chunks - 1) * kTT + 4 * nx4);
  return (need + 3) / 4 * 4;
}
size_t fast_smem_bytes(int E, int W, int L) {
  return (static_cast<size_t>(E) * W * kFBP + static_cast<size_t>(kFwdWarps) * E * fast_row_len(L, W)) * sizeof(float);
}

template <typename T, int W>
__global__ void __launch_bounds__(kFwdWarps * 32)
    charcnn_fwd_fast(const int64_t* __restrict__ ids, const T* __restrict__ emb, const T* __restrict__ weight,
                     const T* __restrict__ bias, T* __restrict__ out, int16_t* __restrict__ argmax, int64_t N, int L,
                     int E, int F, int out_stride, int out_off, int Lp, int n_chunks, int act) {
  extern __shared__ __align__(16) float smem[];
  const int K = E * W;
  float* sW = smem;             // [K][kFBP]: sW[k][fl] = weight[f0 + fl][k], k = e·W + w
  float* sX = smem + K * kFBP;  // [kFwdWarps][E][Lp]
  const int f0 = blockIdx.y * kFB;
  for (int idx = threadIdx.x; idx < K * kFB; idx += blockDim.x) {
    const int fl = idx / K, k = idx % K;  // consecutive threads read consecutive weights
    const int f = f0 + fl;
    sW[k * kFBP + fl] = f < F ? to_f(weight[static_cast<size_t>(f) * K + k]) : 0.f;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* xs = sX + warp * E * Lp;
  const int t_out = L - W + 1;
  float b[kTF];
#pragma unroll
  for (int f = 0; f < kTF; ++f) {
    const int fg = f0 + lane * kTF + f;
    b[f] = fg < F ? to_f(bias[fg]) : 0.f;
  }
  const int64_t n_end = std::min<int64_t>(N, (static_cast<int64_t>(blockIdx.x) + 1) * kFwdTokens);
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kFwdTokens + warp; n < n_end; n += kFwdWarps) {
    __syncwarp();  // the previous token's buffer is no longer read
    const int64_t* idn = ids + n * L;
    for (int idx = lane; idx < E * Lp; idx += 32) {
      const int e = idx / Lp, t = idx % Lp;
      xs[idx] = t < L ? to_f(emb[idn[t] * E + e]) : 0.f;
    }
    __syncwarp();

    float best[kTF];
    int arg[kTF];
#pragma unroll
    for (int f = 0; f < kTF; ++f) best[f] = -INFINITY, arg[f] = 0;
    for (int c = 0; c < n_chunks; ++c) {
      const int t0 = c * kTT;
      float acc[kTF][kTT];
#pragma unroll
      for (int f = 0; f < kTF; ++f)
#pragma unroll
        for (int tt = 0; tt < kTT; ++tt) acc[f][tt] = 0.f;
      for (int e = 0; e < E; ++e) {
        constexpr int NX4 = (kTT + W - 1 + 3) / 4;
        float xw[NX4 * 4];  // x[t0 .. t0 + 16 + W − 2][e]
        const float4* xp = reinterpret_cast<const float4*>(xs + e * Lp + t0);
#pragma unroll
        for (int j = 0; j < NX4; ++j) {
          const float4 v = xp[j];
          xw[4 * j] = v.x, xw[4 * j + 1] = v.y, xw[4 * j + 2] = v.z, xw[4 * j + 3] = v.w;
        }
#pragma unroll
        for (int w = 0; w < W; ++w) {
          const float4 wv = *reinterpret_cast<const float4*>(sW + (e * W + w) * kFBP + lane * kTF);
#pragma unroll
          for (int tt = 0; tt < kTT; ++tt) {
            acc[0][tt] = fmaf(wv.x, xw[tt + w], acc[0][tt]);
            acc[1][tt] = fmaf(wv.y, xw[tt + w], acc[1][tt]);
            acc[2][tt] = fmaf(wv.z, xw[tt + w], acc[2][tt]);
            acc[3][tt] = fmaf(wv.w, xw[tt + w], acc[3][tt]);
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < kTT; ++tt) {
        if (t0 + tt < t_out) {
#pragma unroll
          for (int f = 0; f < kTF; ++f)
            if (new_max(acc[f][tt], best[f])) best[f] = acc[f][tt], arg[f] = t0 + tt;
        }
      }
    }
#pragma unroll
    for (int f = 0; f < kTF; ++f) {
      const int fg = f0 + lane * kTF + f;
      if (fg < F) {
        const size_t o = static_cast<size_t>(n) * out_stride + out_off + fg;
        out[o] = FromF<T>::cvt(act_fwd(best[f] + b[f], act));
        argmax[o] = static_cast<int16_t>(arg[f]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------- forward, generic
template <typename T>
__global__ void charcnn_fwd_generic(const int64_t* __restrict__ ids, const T* __restrict__ emb,
                                    const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out,
                                    int16_t* __restrict__ argmax, int64_t N, int L, int E, int W, int F,
                                    int out_stride, int out_off, int act) {
  using A = typename AccOf<T>::type;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * F) return;
  const int64_t n = idx / F;
  const int f = static_cast<int>(idx % F);
  const T* wf = weight + static_cast<size_t>(f) * E * W;
  const int64_t* idn = ids + n * L;
  A best = -INFINITY;
  int arg = 0;
  for (int t = 0; t + W <= L; ++t) {
    A s = 0;
    for (int e = 0; e < E; ++e)
      for (int w = 0; w < W; ++w) s += static_cast<A>(to_f(wf[e * W + w])) * static_cast<A>(to_f(emb[idn[t + w] * E + e]));
    if (new_max(s, best)) best = s, arg = t;
  }
  const size_t o = static_cast<size_t>(n) * out_stride + out_off + f;
  out[o] = FromF<T>::cvt(act_fwd(best + static_cast<A>(to_f(bias[f])), act));
  argmax[o] = static_cast<int16_t>(arg);
}

// ---------------------------------------------------------------------------------- backward: common
// relu: 0 where out <= 0, else 1 -- a NaN out passes the gradient, as torch's relu backward does
template <typename A>
__device__ __forceinline__ A act_grad(A y, int act) {
  return act == 0 ? (y <= A(0) ? A(0) : A(1)) : A(1) - y * y;
}

// ------------------------------------------------------------------------------- backward: dW and db
constexpr int kDwThreads = 128;  // filters per CTA: lane = filter, so the loads of g and t* coalesce
constexpr int kDwEC = 8;         // embedding dims per thread
constexpr int kDwTS = 32;        // tokens staged in shared memory at a time

// CTA (filter block, (e-chunk, w-chunk), token chunk). Thread = one filter f; it owns dW_f[e0..e0+8)[w0..w0+WC)
// (and db_f in the CTA with e0 = w0 = 0) in registers and walks the tokens of its chunk in order.
template <typename T, int WC>
__global__ void __launch_bounds__(kDwThreads)
    charcnn_bwd_dw(const T* __restrict__ grad_out, const T* __restrict__ out, const int16_t* __restrict__ argmax,
                   const int64_t* __restrict__ ids, const T* __restrict__ emb, int64_t N, int L, int E, int W, int F,
                   int out_stride, int out_off, int act, int64_t chunk_tokens, int TS,
                   typename AccOf<T>::type* __restrict__ partial, int64_t part_stride) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);  // [TS][L][kDwEC]: the staged tokens' embedded characters
  A* gs = xs + TS * L * kDwEC;             // [TS][kDwThreads]: g = grad_out · act'(out)
  int* ts = reinterpret_cast<int*>(gs + TS * kDwThreads);  // [TS][kDwThreads]: t*
  const int n_ec = (E + kDwEC - 1) / kDwEC;
  const int e0 = (blockIdx.y % n_ec) * kDwEC, w0 = (blockIdx.y / n_ec) * WC;
  const int f0 = blockIdx.x * kDwThreads, f = f0 + threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.z) * chunk_tokens;
  const int64_t n1 = std::min<int64_t>(N, n0 + chunk_tokens);
  A acc[WC][kDwEC];
#pragma unroll
  for (int w = 0; w < WC; ++w)
#pragma unroll
    for (int e = 0; e < kDwEC; ++e) acc[w][e] = 0;
  A acc_b = 0;
  for (int64_t s0 = n0; s0 < n1; s0 += TS) {
    const int ns = static_cast<int>(std::min<int64_t>(TS, n1 - s0));
    __syncthreads();  // the previous tokens are no longer read
    for (int idx = threadIdx.x; idx < ns * L * kDwEC; idx += kDwThreads) {
      const int s = idx / (L * kDwEC), r = idx % (L * kDwEC), t = r / kDwEC, e = e0 + r % kDwEC;
      xs[idx] = e < E ? static_cast<A>(to_f(emb[ids[(s0 + s) * L + t] * E + e])) : A(0);
    }
    for (int idx = threadIdx.x; idx < ns * kDwThreads; idx += kDwThreads) {
      const int s = idx / kDwThreads, fl = idx % kDwThreads;
      A gv = 0;
      int tv = 0;
      if (f0 + fl < F) {
        const size_t o = static_cast<size_t>(s0 + s) * out_stride + out_off + f0 + fl;
        gv = static_cast<A>(to_f(grad_out[o])) * act_grad(static_cast<A>(to_f(out[o])), act);
        tv = argmax[o];
      }
      gs[idx] = gv;
      ts[idx] = tv;
    }
    __syncthreads();
    if (f < F) {
      for (int s = 0; s < ns; ++s) {
        const A gv = gs[s * kDwThreads + threadIdx.x];
        if (gv == A(0)) continue;  // relu filters that did not fire
        acc_b += gv;
        // clamped so that a corrupt argmax cannot read outside the token (the forward never makes one)
        const int t = min(max(ts[s * kDwThreads + threadIdx.x], 0), L - W);
        const A* xr = xs + (s * L + t + w0) * kDwEC;
#pragma unroll
        for (int w = 0; w < WC; ++w) {
          if (w0 + w < W) {
#pragma unroll
            for (int e = 0; e < kDwEC; ++e) acc[w][e] += gv * xr[w * kDwEC + e];
          }
        }
      }
    }
  }
  if (f >= F) return;
  const int K = E * W;
  A* dst = partial + static_cast<int64_t>(blockIdx.z) * part_stride + static_cast<int64_t>(f) * (K + 1);
#pragma unroll
  for (int w = 0; w < WC; ++w)
#pragma unroll
    for (int e = 0; e < kDwEC; ++e)
      if (w0 + w < W && e0 + e < E) dst[(e0 + e) * W + w0 + w] = acc[w][e];
  if (blockIdx.y == 0) dst[K] = acc_b;
}

// grad[p] = Σ_c partial[c·P + p] over the chunks in increasing c: a fixed order, so bitwise reproducible.
template <typename A>
__global__ void charcnn_bwd_reduce(const A* __restrict__ partial, A* __restrict__ grad, int64_t P, int nchunks) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int c = 0; c < nchunks; ++c) s += partial[static_cast<int64_t>(c) * P + p];
    grad[p] = s;
  }
}

// ---------------------------------------------------------------------------- backward: d(embedding)
constexpr int kDxThreads = 256;
constexpr int kDxFC = 64;         // filters staged at a time
constexpr int kDxMaxWidths = 16;  // widths per launch (more: several launches, see backward_all)

struct DxWidths {
  const void* weight[kDxMaxWidths];
  int filters[kDxMaxWidths], width[kDxMaxWidths], offset[kDxMaxWidths];
  int n;
};

// CTA b owns token blocks b, b + G, b + 2G, ... of TB tokens, and a private [V, E] table (shared memory, or
// its slice of `tables` when V·E is large). Per token block: dx[TB][L][E] = 0 in shared memory; thread
// (slot, e) alone adds, for its token and every filter in order, g·W_f[e][w] into dx[t*+w][e]; then thread
// (e, v mod NG) alone adds the rows of dx into the table rows of their characters, in increasing position.
// No atomics: every sum has a fixed order. `accumulate`: the table continues a previous launch.
template <typename T>
__global__ void __launch_bounds__(kDxThreads)
    charcnn_bwd_demb(const T* __restrict__ grad_out, const T* __restrict__ out, const int16_t* __restrict__ argmax,
                     const int64_t* __restrict__ ids, int64_t N, int L, int V, int E, int TB, int out_stride,
                     int act, DxWidths ws, int smem_table, int accumulate,
                     typename AccOf<T>::type* __restrict__ tables) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* dx = reinterpret_cast<A*>(smem_raw);                     // [TB][L][E]
  A* gs = dx + static_cast<size_t>(TB) * L * E;               // [TB][kDxFC]
  A* tab_s = gs + TB * kDxFC;                                 // [V][E] if smem_table
  int* ts = reinterpret_cast<int*>(tab_s + (smem_table ? static_cast<size_t>(V) * E : 0));  // [TB][kDxFC]
  int* sid = ts + TB * kDxFC;                                 // [TB][L]
  A* tab_g = tables + static_cast<int64_t>(blockIdx.x) * V * E;
  A* tab = smem_table ? tab_s : tab_g;
  const int EW = min(E, kDxThreads), slot = threadIdx.x / EW, ec = threadIdx.x % EW;
  const int NG = kDxThreads / EW;  // table row groups in the scatter

  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(V) * E; i += kDxThreads)
    tab[i] = accumulate ? tab_g[i] : A(0);
  for (int64_t blk = blockIdx.x; blk * TB < N; blk += gridDim.x) {
    const int64_t n0 = blk * TB;
    const int ns = static_cast<int>(std::min<int64_t>(TB, N - n0));
    __syncthreads();  // the previous block's scatter is done
    for (int i = threadIdx.x; i < ns * L * E; i += kDxThreads) dx[i] = 0;
    for (int i = threadIdx.x; i < ns * L; i += kDxThreads) sid[i] = static_cast<int>(ids[n0 * L + i]);
    for (int wi = 0; wi < ws.n; ++wi) {
      const T* weight = static_cast<const T*>(ws.weight[wi]);
      const int F = ws.filters[wi], W = ws.width[wi], off = ws.offset[wi], K = E * W;
      for (int fc0 = 0; fc0 < F; fc0 += kDxFC) {
        const int nf = min(kDxFC, F - fc0);
        __syncthreads();  // gs/ts are no longer read (and dx is zeroed)
        for (int i = threadIdx.x; i < ns * kDxFC; i += kDxThreads) {
          const int s = i / kDxFC, fl = i % kDxFC;
          A gv = 0;
          int tv = 0;
          if (fl < nf) {
            const size_t o = static_cast<size_t>(n0 + s) * out_stride + off + fc0 + fl;
            gv = static_cast<A>(to_f(grad_out[o])) * act_grad(static_cast<A>(to_f(out[o])), act);
            tv = min(max(static_cast<int>(argmax[o]), 0), L - W);  // a corrupt argmax cannot write outside the token
          }
          gs[i] = gv;
          ts[i] = tv;
        }
        __syncthreads();
        if (slot < ns) {
          A* dxs = dx + static_cast<size_t>(slot) * L * E;
          for (int fl = 0; fl < nf; ++fl) {
            const A gv = gs[slot * kDxFC + fl];
            if (gv == A(0)) continue;
            A* d = dxs + ts[slot * kDxFC + fl] * E;
            const T* wf = weight + static_cast<size_t>(fc0 + fl) * K;
            for (int e = ec; e < E; e += EW)
              for (int w = 0; w < W; ++w) d[w * E + e] += gv * static_cast<A>(to_f(wf[e * W + w]));
          }
        }
      }
    }
    __syncthreads();  // dx complete
    const int grp = threadIdx.x / EW;
    if (grp < NG) {
      for (int r = 0; r < ns * L; ++r) {
        const int v = sid[r];
        if (v % NG != grp) continue;
        for (int e = ec; e < E; e += EW) tab[static_cast<int64_t>(v) * E + e] += dx[static_cast<size_t>(r) * E + e];
      }
    }
  }
  if (smem_table) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(V) * E; i += kDxThreads) tab_g[i] = tab_s[i];
  }
}

// ------------------------------------------------------------ backward, token-slot kernels (the default)
// Both kernels give each warp NT = 32 / E tokens at once ("slots") and each lane one (slot h, dim e):
// h = lane / E, e = lane % E (when E does not divide 32, the last 32 mod E lanes idle). A warp's NT tokens
// are stored interleaved in shared memory, row t of slot h at [t][h][e] (a [L][NT][E] block per warp), so
// that when every slot reads or writes E values of its own row t_h (its own t*), the 32 lanes hit
// NT·E consecutive-modulo-32 banks: no bank conflicts when E divides 32, whatever the t* are.
constexpr int kSlotWarps = 8;
constexpr int kSlotThreads = 32 * kSlotWarps;
constexpr int kSlotMaxE = 32;       // lanes per token
constexpr int kSlotMaxW = 8;        // widths with unrolled tap loops (wider: w-chunks in dW, a loop in dx)
constexpr int kSlotDwBatch = 16;    // dW: tokens staged at a time (rounded up to whole warps of slots)

// dW: filters per warp (their W-tap sums stay in registers); fewer for fp64, whose values take two registers.
template <typename A>
struct DwSlots {
  static constexpr int kFPW = sizeof(A) == 8 ? 4 : 8;
  static constexpr int kFB = kFPW * kSlotWarps;  // filters per CTA
};

// Σ over the NT slots of the lanes (h, e), in slot order (a fixed order: deterministic). Every lane calls it.
template <typename A>
__device__ __forceinline__ A sum_over_slots(A v, int NT, int E, int e) {
  A s = 0;
  for (int q = 0; q < NT; ++q) s += __shfl_sync(0xffffffffu, v, q * E + e);
  return s;
}

// dW, db. CTA (block of FB filters of one width, w-chunk [w0, w0 + WC), token chunk). Lane (h, e) of warp k
// keeps dW_f[e][w0 .. w0 + WC) and db_f of the filters f = f0 + k, f0 + k + 8, ... (kFPW of them) in registers
// and adds the tokens of slot h: per batch of TS tokens, x = embedding[ids] is staged in the slot layout and
// g = grad_out · act'(out), t* as [filter][token]; then for each filter and token, acc[w] += g · x[t* + w][e]
// (the lanes (h, e) of a warp each read their own token's row: conflict-free). At the end the NT slots' sums are added
// in slot order and written as this chunk's partial sums (charcnn_bwd_reduce adds the chunks in order).
template <typename T, int WC>
__global__ void __launch_bounds__(kSlotThreads, 2)
    charcnn_bwd_dw_slots(const T* __restrict__ grad_out, const T* __restrict__ out,
                         const int16_t* __restrict__ argmax, const int64_t* __restrict__ ids,
                         const T* __restrict__ emb, int64_t N, int L, int E, int W, int F, int out_stride,
                         int out_off, int act, int64_t chunk_tokens, int TS,
                         typename AccOf<T>::type* __restrict__ partial, int64_t part_stride) {
  using A = typename AccOf<T>::type;
  constexpr int FPW = DwSlots<A>::kFPW, FB = DwSlots<A>::kFB;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int NT = 32 / E, TE = NT * E, TSP = TS + 1;  // TS is a multiple of NT
  A* xs = reinterpret_cast<A*>(smem_raw);                        // [TS / NT][L][NT][E]
  A* gs = xs + static_cast<size_t>(TS) * L * E;                  // [FB][TSP]
  int* ts = reinterpret_cast<int*>(gs + FB * TSP);               // [FB][TSP]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, h = lane / E, e = lane % E;
  const int w0 = blockIdx.y * WC, f0 = blockIdx.x * FB;
  const int64_t n0 = static_cast<int64_t>(blockIdx.z) * chunk_tokens;
  const int64_t n1 = std::min<int64_t>(N, n0 + chunk_tokens);
  // staging x: thread (row lane r, dim er) copies rows r, r + RS, ... of every token
  const int er = threadIdx.x % E, RS = kSlotThreads / E, r0 = threadIdx.x / E;
  A acc[FPW][WC], acc_b[FPW];
#pragma unroll
  for (int i = 0; i < FPW; ++i) {
    acc_b[i] = 0;
#pragma unroll
    for (int w = 0; w < WC; ++w) acc[i][w] = 0;
  }
  for (int64_t s0 = n0; s0 < n1; s0 += TS) {
    const int ns = static_cast<int>(std::min<int64_t>(TS, n1 - s0));
    __syncthreads();  // the previous batch is no longer read
    if (r0 < RS) {
      for (int s = 0; s < TS; ++s) {
        A* x_s = xs + (static_cast<size_t>(s / NT) * L * NT + s % NT) * E + er;
        if (s < ns) {
          const int64_t* id_s = ids + (s0 + s) * L;
          for (int t = r0; t < L; t += RS) x_s[t * TE] = static_cast<A>(to_f(emb[id_s[t] * E + er]));
        } else {
          for (int t = r0; t < L; t += RS) x_s[t * TE] = A(0);
        }
      }
    }
    for (int idx = threadIdx.x; idx < TS * FB; idx += kSlotThreads) {
      const int s = idx / FB, fl = idx % FB;  // consecutive threads read consecutive filters of a token
      A gv = 0;
      int tv = 0;
      if (s < ns && f0 + fl < F) {
        const size_t o = static_cast<size_t>(s0 + s) * out_stride + out_off + f0 + fl;
        gv = static_cast<A>(to_f(grad_out[o])) * act_grad(static_cast<A>(to_f(out[o])), act);
        // clamped so that a corrupt argmax cannot read outside the token (the forward never makes one)
        tv = min(max(static_cast<int>(argmax[o]), 0), L - W);
      }
      gs[fl * TSP + s] = gv;
      ts[fl * TSP + s] = tv;
    }
    __syncthreads();
    if (h < NT) {
#pragma unroll
      for (int i = 0; i < FPW; ++i) {
        const int fl = i * kSlotWarps + warp;
        const A* g_f = gs + fl * TSP + h;  // token j·NT + h of filter fl at g_f[j·NT]
        const int* t_f = ts + fl * TSP + h;
        const A* x_h = xs + (static_cast<size_t>(w0) * NT + h) * E + e;  // slot h, row w0, dim e
        for (int j = 0; j < TS / NT; ++j) {
          const A gv = g_f[j * NT];
          if (gv == A(0)) continue;  // relu filters that did not fire (and padding tokens)
          acc_b[i] += gv;
          const A* xr = x_h + (static_cast<size_t>(j) * L + t_f[j * NT]) * TE;  // x[t* + w0][e] of the token
#pragma unroll
          for (int w = 0; w < WC; ++w)
            if (w0 + w < W) acc[i][w] += gv * xr[w * TE];
        }
      }
    }
  }
  const int K = E * W;
#pragma unroll
  for (int i = 0; i < FPW; ++i) {
    const int f = f0 + i * kSlotWarps + warp;
    A* dst = partial + static_cast<int64_t>(blockIdx.z) * part_stride + static_cast<int64_t>(f) * (K + 1);
#pragma unroll
    for (int w = 0; w < WC; ++w) {
      const A v = sum_over_slots(acc[i][w], NT, E, e);
      if (h == 0 && f < F && w0 + w < W) dst[e * W + w0 + w] = v;
    }
    const A vb = sum_over_slots(acc_b[i], NT, E, e);
    if (h == 0 && e == 0 && f < F && blockIdx.y == 0) dst[K] = vb;
  }
}

// dx[t* + w][e] += g · W_f[e][w] for the chunk's filters fl < nf, in order, into this lane's column of its
// token's dx (row t at dx_col[t·TE]). The taps' loads come first, then the stores (W unrolled), and the next
// filter's g and t* are read before this filter's stores: shared-memory latency overlaps within a filter.
// Filters whose windows overlap update the same rows, so filter fl + 1 reads dx after filter fl wrote it.
template <typename A, int W>
__device__ __forceinline__ void dx_add_filters(A* dx_col, const A* w_col, const A* g_s, const int* t_s, int nf,
                                               int TBP, int E, int TE) {
  A gv = nf > 0 ? g_s[0] : A(0);
  int t = nf > 0 ? t_s[0] : 0;
  for (int fl = 0; fl < nf; ++fl) {
    const A g_next = fl + 1 < nf ? g_s[(fl + 1) * TBP] : A(0);
    const int t_next = fl + 1 < nf ? t_s[(fl + 1) * TBP] : 0;
    if (gv != A(0)) {
      A* d = dx_col + t * TE;
      const A* wr = w_col + fl * W * E;  // W_f[e][w] at wr[w·E]
      A wv[W], dv[W];
#pragma unroll
      for (int w = 0; w < W; ++w) wv[w] = wr[w * E], dv[w] = d[w * TE];
#pragma unroll
      for (int w = 0; w < W; ++w) d[w * TE] = dv[w] + gv * wv[w];
    }
    gv = g_next, t = t_next;
  }
}
// The same for any width (W > kSlotMaxW), one tap at a time.
template <typename A>
__device__ __forceinline__ void dx_add_filters_any(A* dx_col, const A* w_col, const A* g_s, const int* t_s, int nf, int TBP, int E,
                                   int TE, int W) {
  for (int fl = 0; fl < nf; ++fl) {
    const A gv = g_s[fl * TBP];
    if (gv == A(0)) continue;
    A* d = dx_col + t_s[fl * TBP] * TE;
    const A* wr = w_col + fl * W * E;
    for (int w = 0; w < W; ++w) d[w * TE] += gv * wr[w * E];
  }
}

// d(embedding). CTA b owns token blocks b, b + G, ... of TB = 8·NT tokens (one slot per token) and a private
// [V, E] table (shared memory, or its slice of `tables` when V·E is large). Per token block: dx = 0 in the
// slot layout; for every width and chunk of FC filters, the chunk's weights are staged as [f][w][e] (the E
// lanes of a slot read E consecutive values, the same for every slot: broadcast) with g and t* as
// [filter][token]; lane (h, e) then adds g·W_f[e][·] into its own token's column e (no other lane writes
// it: no atomics). Then the rows of dx go into the table: lane (slot q, e) owns table rows v ≡ q (mod TB);
// a warp reads 32 positions' ids at once and ballots which belong to each of its slots, and each lane adds
// its rows in increasing (token, position). Every sum has a fixed order. `accumulate`: the table continues a
// previous launch (more than kDxMaxWidths widths).
template <typename T>
__global__ void __launch_bounds__(kSlotThreads, 2)
    charcnn_bwd_demb_slots(const T* __restrict__ grad_out, const T* __restrict__ out,
                           const int16_t* __restrict__ argmax, const int64_t* __restrict__ ids, int64_t N, int L,
                           int V, int E, int out_stride, int act, DxWidths ws, int FC, int w_max, int smem_table,
                           int accumulate, typename AccOf<T>::type* __restrict__ tables) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int NT = 32 / E, TE = NT * E, TB = kSlotWarps * NT, TBP = TB + 1;
  A* dx = reinterpret_cast<A*>(smem_raw);                    // [kSlotWarps][L][NT][E]
  A* sw = dx + static_cast<size_t>(TB) * L * E;              // [FC][W][E]: the chunk's filters
  A* gs = sw + static_cast<size_t>(FC) * w_max * E;          // [FC][TBP]
  A* tab_s = gs + static_cast<size_t>(FC) * TBP;             // [V][E] if smem_table
  int* ts = reinterpret_cast<int*>(tab_s + (smem_table ? static_cast<size_t>(V) * E : 0));  // [FC][TBP]
  int* sid = ts + FC * TBP;                                  // [TB][L]
  A* tab_g = tables + static_cast<int64_t>(blockIdx.x) * V * E;
  A* tab = smem_table ? tab_s : tab_g;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, h = lane / E, e = lane % E;
  const int slot = warp * NT + h;  // this lane's token in the block (when h < NT)
  A* dx_col = dx + (static_cast<size_t>(warp) * L * NT + h) * E + e;

  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(V) * E; i += kSlotThreads)
    tab[i] = accumulate ? tab_g[i] : A(0);
  for (int64_t blk = blockIdx.x; blk * TB < N; blk += gridDim.x) {
    const int64_t n0 = blk * TB;
    const int ns = static_cast<int>(std::min<int64_t>(TB, N - n0));
    __syncthreads();  // the previous block's scatter is done
    for (int i = threadIdx.x; i < TB * L * E; i += kSlotThreads) dx[i] = 0;
    for (int i = threadIdx.x; i < ns * L; i += kSlotThreads) sid[i] = static_cast<int>(ids[n0 * L + i]);
    for (int wi = 0; wi < ws.n; ++wi) {
      const T* weight = static_cast<const T*>(ws.weight[wi]);
      const int F = ws.filters[wi], W = ws.width[wi], off = ws.offset[wi];
      for (int fc0 = 0; fc0 < F; fc0 += FC) {
        const int nf = min(FC, F - fc0);
        __syncthreads();  // sw, gs and ts are no longer read (and dx is zeroed)
        for (int r = threadIdx.x; r < nf * E; r += kSlotThreads) {  // thread (fl, e) copies W_f[e][0 .. W)
          const int fl = r / E, ee = r % E;
          const T* src = weight + (static_cast<size_t>(fc0 + fl) * E + ee) * W;
          A* dst = sw + static_cast<size_t>(fl) * W * E + ee;
          for (int w = 0; w < W; ++w) dst[w * E] = static_cast<A>(to_f(src[w]));
        }
        for (int i = threadIdx.x; i < TB * FC; i += kSlotThreads) {
          const int s = i / FC, fl = i % FC;  // consecutive threads read consecutive filters of a token
          A gv = 0;
          int tv = 0;
          if (s < ns && fl < nf) {
            const size_t o = static_cast<size_t>(n0 + s) * out_stride + off + fc0 + fl;
            gv = static_cast<A>(to_f(grad_out[o])) * act_grad(static_cast<A>(to_f(out[o])), act);
            tv = min(max(static_cast<int>(argmax[o]), 0), L - W);  // a corrupt argmax cannot write outside
          }
          gs[fl * TBP + s] = gv;
          ts[fl * TBP + s] = tv;
        }
        __syncthreads();
        if (h < NT) {
          const A* g_s = gs + slot;
          const int* t_s = ts + slot;
          const A* w_col = sw + e;
          switch (W) {
#define MINILM_DX(WW) \
  case WW: dx_add_filters<A, WW>(dx_col, w_col, g_s, t_s, nf, TBP, E, TE); break
            MINILM_DX(1); MINILM_DX(2); MINILM_DX(3); MINILM_DX(4); MINILM_DX(5); MINILM_DX(6); MINILM_DX(7);
            MINILM_DX(8);
#undef MINILM_DX
            default: dx_add_filters_any<A>(dx_col, w_col, g_s, t_s, nf, TBP, E, TE, W);
          }
        }
      }
    }
    __syncthreads();  // dx complete
    for (int s = 0; s < ns; ++s) {
      const A* dx_s = dx + (static_cast<size_t>(s / NT) * L * NT + s % NT) * E + e;  // token s, dim e
      const int* sid_s = sid + s * L;
      for (int t0 = 0; t0 < L; t0 += 32) {
        const int owner = t0 + lane < L ? sid_s[t0 + lane] % TB : -1;  // the slot owning row t0 + lane's id
        unsigned mine = 0;  // bit b: position t0 + b goes into a table row of this lane's slot
        for (int q = 0; q < NT; ++q) {
          const unsigned m = __ballot_sync(0xffffffffu, owner == warp * NT + q);
          if (q == h) mine = m;
        }
        while (mine != 0) {
          const int t = t0 + __ffs(mine) - 1;
          mine &= mine - 1;
          tab[static_cast<int64_t>(sid_s[t]) * E + e] += dx_s[t * TE];
        }
      }
    }
  }
  if (smem_table) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(V) * E; i += kSlotThreads) tab_g[i] = tab_s[i];
  }
}

// ------------------------------------------------------------------------------------------ launchers
int max_smem_optin() { return current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024); }

template <typename F>
cudaError_t allow_smem(F kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int W>
cudaError_t launch_fast(const int64_t* ids, const T* emb, const CharCnnWidth& cw, int64_t N, int L, int E,
                        int total, int act, T* out, int16_t* argmax, cudaStream_t stream) {
  const size_t smem = fast_smem_bytes(E, W, L);
  auto kernel = charcnn_fwd_fast<T, W>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int t_out = L - W + 1;
  const dim3 grid(static_cast<unsigned>((N + kFwdTokens - 1) / kFwdTokens),
                  static_cast<unsigned>((cw.filters + kFB - 1) / kFB));
  kernel<<<grid, kFwdWarps * 32, smem, stream>>>(ids, emb, static_cast<const T*>(cw.weight),
                                                 static_cast<const T*>(cw.bias), out, argmax, N, L, E, cw.filters,
                                                 total, cw.offset, fast_row_len(L, W), (t_out + kTT - 1) / kTT, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_width(const int64_t* ids, const T* emb, const CharCnnWidth& cw, int64_t N, int L, int E,
                          int total, int act, T* out, int16_t* argmax, cudaStream_t stream) {
  const bool fast = !std::is_same<T, double>::value && cw.width <= kMaxFastWidth &&
                    fast_smem_bytes(E, cw.width, L) <= static_cast<size_t>(max_smem_optin());
  if (fast) {
    if constexpr (!std::is_same<T, double>::value) {
      switch (cw.width) {
        case 1: return launch_fast<T, 1>(ids, emb, cw, N, L, E, total, act, out, argmax, stream);
        case 2: return launch_fast<T, 2>(ids, emb, cw, N, L, E, total, act, out, argmax, stream);
        case 3: return launch_fast<T, 3>(ids, emb, cw, N, L, E, total, act, out, argmax, stream);
        case 4: return launch_fast<T, 4>(ids, emb, cw, N, L, E, total, act, out, argmax, stream);
        case 5: return launch_fast<T, 5>(ids, emb, cw, N, L, E, total, act, out, argmax, stream);
        case 6: return launch_fast<T, 6>(ids, emb, cw, N, L, E, total, act, out, argmax, stream);
        case 7: return launch_fast<T, 7>(ids, emb, cw, N, L, E, total, act, out, argmax, stream);
        default: break;
      }
    }
  }
  const int64_t threads = N * cw.filters;
  charcnn_fwd_generic<T><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
      ids, emb, static_cast<const T*>(cw.weight), static_cast<const T*>(cw.bias), out, argmax, N, L, E, cw.width,
      cw.filters, total, cw.offset, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_all(const int64_t* ids, const void* emb, int64_t N, int L, int E, const CharCnnWidth* widths,
                        int n_widths, int total, int act, void* out, int16_t* argmax, cudaStream_t stream) {
  for (int i = 0; i < n_widths; ++i) {
    cudaError_t err = forward_width<T>(ids, static_cast<const T*>(emb), widths[i], N, L, E, total, act,
                                       static_cast<T*>(out), argmax, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int sm_count() { return current_device_attribute(cudaDevAttrMultiProcessorCount, 132); }

// ---- backward plans: the same functions size the workspace (char_cnn_backward_partial_elems) and launch.
// Shared memory that lets 2 CTAs share an SM on Hopper (228 KB per SM, 1 KB reserved per CTA). On a GPU with
// less (an A100: 164 KB) two such CTAs do not fit side by side: the grid of 2 per SM then runs in two waves.
constexpr size_t kTwoPerSm = 110 * 1024;

// -- the old kernels (MINILM_CNN_BWD=old, and shapes the slot kernels do not take)
int dw_wc(int W) { return W <= 8 ? W : 8; }  // w per thread (W > 8: several w-chunks)
// Token chunks of width `cw` in the dW kernel: enough CTAs for ~2 waves, each chunk >= 256 tokens, at most
// 64 partial sums per parameter (the workspace is chunks x parameters).
int64_t dw_chunk_tokens(int64_t N, int E, const CharCnnWidth& cw) {
  const int64_t base = static_cast<int64_t>((cw.filters + kDwThreads - 1) / kDwThreads) *
                       ((E + kDwEC - 1) / kDwEC) * ((cw.width + dw_wc(cw.width) - 1) / dw_wc(cw.width));
  int64_t c = (2 * sm_count() + base - 1) / base;
  c = std::max<int64_t>(1, std::min<int64_t>({c, 64, (N + 255) / 256}));
  return (N + c - 1) / c;
}
int64_t dw_chunks(int64_t N, int E, const CharCnnWidth& cw) {
  const int64_t ct = dw_chunk_tokens(N, E, cw);
  return (N + ct - 1) / ct;
}
int dw_tokens_staged(int L, size_t acc) {  // kDwTS, halved until the staging fits in shared memory
  int ts = kDwTS;
  while (ts > 1 && static_cast<size_t>(ts) * (L * kDwEC * acc + kDwThreads * (acc + sizeof(int))) >
                       static_cast<size_t>(max_smem_optin()))
    ts /= 2;
  return ts;
}

struct EmbPlan {
  int TB = 0;              // tokens per block (0: does not fit)
  bool smem_table = true;  // the CTA's [V, E] table in shared memory
  int64_t G = 0;           // CTAs = private tables
  size_t smem = 0;
};
EmbPlan emb_plan(int64_t N, int L, int V, int E, size_t acc) {
  EmbPlan p;
  const int EW = std::min(E, kDxThreads);
  const size_t optin = static_cast<size_t>(max_smem_optin());
  auto bytes = [&](int tb, bool tab) {
    return (static_cast<size_t>(tb) * L * E + static_cast<size_t>(tb) * kDxFC +
            (tab ? static_cast<size_t>(V) * E : 0)) * acc +
           (static_cast<size_t>(tb) * kDxFC + static_cast<size_t>(tb) * L) * sizeof(int);
  };
  const size_t two_per_sm = std::min(optin, kTwoPerSm);
  p.smem_table = static_cast<size_t>(V) * E * acc <= 64 * 1024;
  for (int pass = 0; pass < 2 && p.TB == 0; ++pass) {
    for (int tb = kDxThreads / EW; tb >= 1; --tb)
      if (bytes(tb, p.smem_table) <= two_per_sm || (tb == 1 && bytes(tb, p.smem_table) <= optin)) {
        p.TB = tb;
        break;
      }
    if (p.TB == 0) p.smem_table = false;
  }
  if (p.TB == 0) return p;
  p.smem = bytes(p.TB, p.smem_table);
  p.G = std::min<int64_t>((N + p.TB - 1) / p.TB, 2 * sm_count());
  if (!p.smem_table)  // tables in global memory: keep them under ~256 MiB
    p.G = std::min<int64_t>(p.G, std::max<int64_t>(1, (int64_t{256} << 20) / (static_cast<int64_t>(V) * E * acc)));
  return p;
}

// -- the slot kernels
int slot_dw_fb(size_t acc) { return acc == sizeof(double) ? DwSlots<double>::kFB : DwSlots<float>::kFB; }
int slot_dw_wc(int W) { return W <= kSlotMaxW ? W : kSlotMaxW; }
size_t slot_dw_smem(int TS, int L, int E, size_t acc) {
  return static_cast<size_t>(TS) * L * E * acc + static_cast<size_t>(slot_dw_fb(acc)) * (TS + 1) * (acc + sizeof(int));
}
// Tokens per staged batch: kSlotDwBatch rounded up to whole slots, halved while 2 CTAs do not fit an SM;
// 0 if even one warp's slots do not fit (then the old kernels run).
int slot_dw_batch(int L, int E, size_t acc) {
  if (E > kSlotMaxE) return 0;
  const int NT = 32 / E;
  int groups = (kSlotDwBatch + NT - 1) / NT;
  while (groups > 1 && slot_dw_smem(NT * groups, L, E, acc) > kTwoPerSm) groups /= 2;
  return slot_dw_smem(NT * groups, L, E, acc) <= static_cast<size_t>(max_smem_optin()) ? NT * groups : 0;
}
// Token chunks of one width: about one wave of CTAs at 2 per SM (rounded down: no small second wave), each
// chunk >= 256 tokens, at most 64 partial sums per parameter.
int64_t slot_dw_chunk_tokens(int64_t N, const CharCnnWidth& cw, size_t acc) {
  const int fb = slot_dw_fb(acc), wc = slot_dw_wc(cw.width);
  const int64_t base = static_cast<int64_t>((cw.filters + fb - 1) / fb) * ((cw.width + wc - 1) / wc);
  const int64_t c = std::max<int64_t>(1, std::min<int64_t>({2 * sm_count() / base, 64, (N + 255) / 256}));
  return (N + c - 1) / c;
}
int64_t slot_dw_chunks(int64_t N, const CharCnnWidth& cw, size_t acc) {
  const int64_t ct = slot_dw_chunk_tokens(N, cw, acc);
  return (N + ct - 1) / ct;
}

struct SlotEmbPlan {
  int FC = 0;              // filters per staged chunk (0: does not fit)
  bool smem_table = true;  // the CTA's [V, E] table in shared memory
  int64_t G = 0;           // CTAs = private tables
  size_t smem = 0;
};
SlotEmbPlan slot_emb_plan(int64_t N, int L, int V, int E, int w_max, size_t acc) {
  SlotEmbPlan p;
  if (E > kSlotMaxE) return p;
  const int TB = kSlotWarps * (32 / E);
  const size_t optin = static_cast<size_t>(max_smem_optin());
  auto bytes = [&](int fc, bool tab) {
    return (static_cast<size_t>(TB) * L * E + static_cast<size_t>(fc) * w_max * E +
            static_cast<size_t>(fc) * (TB + 1) + (tab ? static_cast<size_t>(V) * E : 0)) * acc +
           (static_cast<size_t>(fc) * (TB + 1) + static_cast<size_t>(TB) * L) * sizeof(int);
  };
  // Largest chunk (64, 32, ..., 1 filters) that lets 2 CTAs share an SM, else that fits one; the table in
  // shared memory if it is small, else (or if nothing fits with it) in global memory.
  for (int tab = static_cast<size_t>(V) * E * acc <= 64 * 1024 ? 1 : 0; tab >= 0 && p.FC == 0; --tab) {
    for (size_t limit : {std::min(optin, kTwoPerSm), optin}) {
      for (int fc = 64; fc >= 1 && p.FC == 0; fc /= 2)
        if (bytes(fc, tab) <= limit) p.FC = fc, p.smem_table = tab == 1;
      if (p.FC != 0) break;
    }
  }
  if (p.FC == 0) return p;
  p.smem = bytes(p.FC, p.smem_table);
  const int per_sm = p.smem <= kTwoPerSm ? 2 : 1;
  p.G = std::min<int64_t>((N + TB - 1) / TB, static_cast<int64_t>(per_sm) * sm_count());
  if (!p.smem_table)  // tables in global memory: keep them under ~256 MiB
    p.G = std::min<int64_t>(p.G, std::max<int64_t>(1, (int64_t{256} << 20) / (static_cast<int64_t>(V) * E * acc)));
  return p;
}

int max_width(const CharCnnWidth* widths, int n_widths) {
  int w = 1;
  for (int i = 0; i < n_widths; ++i) w = std::max(w, widths[i].width);
  return w;
}

// Which backward runs: the slot kernels, unless MINILM_CNN_BWD=old (read at every call, so that a
// benchmark can compare) or the shape does not fit them (E > 32, or a token's rows too long for shared
// memory); then the old kernels.
bool use_slot_kernels(int L, int V, int E, const CharCnnWidth* widths, int n_widths, size_t acc) {
  const char* v = std::getenv("MINILM_CNN_BWD");
  if (v != nullptr && std::strcmp(v, "old") == 0) return false;
  return slot_dw_batch(L, E, acc) > 0 && slot_emb_plan(1, L, V, E, max_width(widths, n_widths), acc).FC > 0;
}

int64_t backward_workspace(int64_t N, int L, int V, int E, const CharCnnWidth* widths, int n_widths, size_t acc) {
  int64_t elems = 0;
  if (use_slot_kernels(L, V, E, widths, n_widths, acc)) {
    for (int i = 0; i < n_widths; ++i)
      elems += slot_dw_chunks(N, widths[i], acc) * widths[i].filters * (static_cast<int64_t>(E) * widths[i].width + 1);
    return elems + slot_emb_plan(N, L, V, E, max_width(widths, n_widths), acc).G * V * E;
  }
  for (int i = 0; i < n_widths; ++i)
    elems += dw_chunks(N, E, widths[i]) * widths[i].filters * (static_cast<int64_t>(E) * widths[i].width + 1);
  return elems + emb_plan(N, L, V, E, acc).G * V * E;
}

DxWidths dx_widths(const CharCnnWidth* widths, int i0, int n_widths) {  // widths i0 .. i0 + kDxMaxWidths
  DxWidths ws{};
  ws.n = std::min(kDxMaxWidths, n_widths - i0);
  for (int j = 0; j < ws.n; ++j) {
    ws.weight[j] = widths[i0 + j].weight;
    ws.filters[j] = widths[i0 + j].filters;
    ws.width[j] = widths[i0 + j].width;
    ws.offset[j] = widths[i0 + j].offset;
  }
  return ws;
}

template <typename A>
cudaError_t launch_reduce(const A* partial, A* grad, int64_t P, int64_t chunks, cudaStream_t stream) {
  charcnn_bwd_reduce<A><<<static_cast<unsigned>(std::min<int64_t>((P + 255) / 256, 2048)), 256, 0, stream>>>(
      partial, grad, P, static_cast<int>(chunks));
  return cudaGetLastError();
}

template <typename T, int WC>
cudaError_t launch_dw(const T* go, const T* y, const int16_t* argmax, const int64_t* ids, const T* emb, int64_t N,
                      int L, int E, const CharCnnWidth& cw, int total, int act, typename AccOf<T>::type* partial,
                      cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int ts = dw_tokens_staged(L, sizeof(A));
  const size_t smem = static_cast<size_t>(ts) * (L * kDwEC * sizeof(A) + kDwThreads * (sizeof(A) + sizeof(int)));
  auto kernel = charcnn_bwd_dw<T, WC>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t ct = dw_chunk_tokens(N, E, cw);
  const int64_t P = static_cast<int64_t>(cw.filters) * (E * cw.width + 1);
  const dim3 grid(static_cast<unsigned>((cw.filters + kDwThreads - 1) / kDwThreads),
                  static_cast<unsigned>(((E + kDwEC - 1) / kDwEC) * ((cw.width + WC - 1) / WC)),
                  static_cast<unsigned>((N + ct - 1) / ct));
  kernel<<<grid, kDwThreads, smem, stream>>>(go, y, argmax, ids, emb, N, L, E, cw.width, cw.filters, total,
                                             cw.offset, act, ct, ts, partial, P);
  return cudaGetLastError();
}

template <typename T, int WC>
cudaError_t launch_dw_slots(const T* go, const T* y, const int16_t* argmax, const int64_t* ids, const T* emb,
                            int64_t N, int L, int E, const CharCnnWidth& cw, int total, int act,
                            typename AccOf<T>::type* partial, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int TS = slot_dw_batch(L, E, sizeof(A));
  if (TS == 0) return cudaErrorInvalidConfiguration;
  const size_t smem = slot_dw_smem(TS, L, E, sizeof(A));
  auto kernel = charcnn_bwd_dw_slots<T, WC>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t ct = slot_dw_chunk_tokens(N, cw, sizeof(A));
  const int64_t P = static_cast<int64_t>(cw.filters) * (E * cw.width + 1);
  constexpr int FB = DwSlots<A>::kFB;
  const dim3 grid(static_cast<unsigned>((cw.filters + FB - 1) / FB), static_cast<unsigned>((cw.width + WC - 1) / WC),
                  static_cast<unsigned>((N + ct - 1) / ct));
  kernel<<<grid, kSlotThreads, smem, stream>>>(go, y, argmax, ids, emb, N, L, E, cw.width, cw.filters, total,
                                               cw.offset, act, ct, TS, partial, P);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_all(const void* grad_out, const int64_t* ids, const void* emb_, int64_t N, int L, int V, int E,
                         const CharCnnWidth* widths, int n_widths, int total, int act, const void* out,
                         const int16_t* argmax, void* partial_, void* grad_params_, void* grad_emb_,
                         cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  A* partial = static_cast<A*>(partial_);
  A* grad_params = static_cast<A*>(grad_params_);
  A* grad_emb = static_cast<A*>(grad_emb_);
  const T* go = static_cast<const T*>(grad_out);
  const T* y = static_cast<const T*>(out);
  const T* emb = static_cast<const T*>(emb_);
  const bool slots = use_slot_kernels(L, V, E, widths, n_widths, sizeof(A));
  cudaError_t err = cudaSuccess;

  // dW, db: per width, chunk partial sums, then their fixed-order sum
  int64_t off = 0;  // into grad_params
  A* part = partial;
  for (int i = 0; i < n_widths; ++i) {
    const CharCnnWidth& cw = widths[i];
    if (slots) {
      switch (slot_dw_wc(cw.width)) {
#define MINILM_DW(WC) \
  case WC: err = launch_dw_slots<T, WC>(go, y, argmax, ids, emb, N, L, E, cw, total, act, part, stream); break
        MINILM_DW(1); MINILM_DW(2); MINILM_DW(3); MINILM_DW(4); MINILM_DW(5); MINILM_DW(6); MINILM_DW(7);
        MINILM_DW(8);
#undef MINILM_DW
        default: return cudaErrorInvalidValue;
      }
    } else {
      switch (dw_wc(cw.width)) {
#define MINILM_DW(WC) \
  case WC: err = launch_dw<T, WC>(go, y, argmax, ids, emb, N, L, E, cw, total, act, part, stream); break
        MINILM_DW(1); MINILM_DW(2); MINILM_DW(3); MINILM_DW(4); MINILM_DW(5); MINILM_DW(6); MINILM_DW(7);
        MINILM_DW(8);
#undef MINILM_DW
        default: return cudaErrorInvalidValue;
      }
    }
    if (err != cudaSuccess) return err;
    const int64_t P = static_cast<int64_t>(cw.filters) * (E * cw.width + 1);
    const int64_t chunks = slots ? slot_dw_chunks(N, cw, sizeof(A)) : dw_chunks(N, E, cw);
    if ((err = launch_reduce<A>(part, grad_params + off, P, chunks, stream)) != cudaSuccess) return err;
    off += P;
    part += chunks * P;
  }

  // d(embedding): per-CTA tables (all widths per token block, kDxMaxWidths per launch), then their sum
  int64_t G = 0;
  if (slots) {
    const int w_max = max_width(widths, n_widths);
    const SlotEmbPlan plan = slot_emb_plan(N, L, V, E, w_max, sizeof(A));
    if (plan.FC == 0) return cudaErrorInvalidConfiguration;
    auto kd = charcnn_bwd_demb_slots<T>;
    if ((err = allow_smem(kd, plan.smem)) != cudaSuccess) return err;
    for (int i0 = 0; i0 < n_widths; i0 += kDxMaxWidths) {
      kd<<<static_cast<unsigned>(plan.G), kSlotThreads, plan.smem, stream>>>(
          go, y, argmax, ids, N, L, V, E, total, act, dx_widths(widths, i0, n_widths), plan.FC, w_max,
          plan.smem_table ? 1 : 0, i0 > 0 ? 1 : 0, part);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    G = plan.G;
  } else {
    const EmbPlan plan = emb_plan(N, L, V, E, sizeof(A));
    if (plan.TB == 0) return cudaErrorInvalidConfiguration;
    auto kd = charcnn_bwd_demb<T>;
    if ((err = allow_smem(kd, plan.smem)) != cudaSuccess) return err;
    for (int i0 = 0; i0 < n_widths; i0 += kDxMaxWidths) {
      kd<<<static_cast<unsigned>(plan.G), kDxThreads, plan.smem, stream>>>(
          go, y, argmax, ids, N, L, V, E, plan.TB, total, act, dx_widths(widths, i0, n_widths),
          plan.smem_table ? 1 : 0, i0 > 0 ? 1 : 0, part);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    G = plan.G;
  }
  return launch_reduce<A>(part, grad_emb, static_cast<int64_t>(V) * E, G, stream);
}

}  // namespace

cudaError_t char_cnn_forward(Dtype dtype, const int64_t* ids, const void* emb, int64_t N, int L, int V, int E,
                             const CharCnnWidth* widths, int n_widths, int total_filters, Activation act,
                             void* out, int16_t* argmax, cudaStream_t stream) {
  (void)V;
  const int a = static_cast<int>(act);
  switch (dtype) {
    case Dtype::kFloat32:
      return forward_all<float>(ids, emb, N, L, E, widths, n_widths, total_filters, a, out, argmax, stream);
    case Dtype::kFloat64:
      return forward_all<double>(ids, emb, N, L, E, widths, n_widths, total_filters, a, out, argmax, stream);
    case Dtype::kBFloat16:
      return forward_all<__nv_bfloat16>(ids, emb, N, L, E, widths, n_widths, total_filters, a, out, argmax, stream);
    case Dtype::kFloat16:
      return forward_all<__half>(ids, emb, N, L, E, widths, n_widths, total_filters, a, out, argmax, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t char_cnn_backward_partial_elems(Dtype dtype, int64_t N, int L, int V, int E, const CharCnnWidth* widths,
                                        int n_widths) {
  return backward_workspace(N, L, V, E, widths, n_widths, dtype == Dtype::kFloat64 ? sizeof(double) : sizeof(float));
}

bool char_cnn_backward_supported(Dtype dtype, int L, int V, int E, const CharCnnWidth* widths, int n_widths) {
  const size_t acc = dtype == Dtype::kFloat64 ? sizeof(double) : sizeof(float);
  return use_slot_kernels(L, V, E, widths, n_widths, acc) || emb_plan(1, L, V, E, acc).TB > 0;
}

cudaError_t char_cnn_backward(Dtype dtype, const void* grad_out, const int64_t* ids, const void* emb, int64_t N,
                              int L, int V, int E, const CharCnnWidth* widths, int n_widths, int total_filters,
                              Activation act, const void* out, const int16_t* argmax, void* partial,
                              void* grad_params, void* grad_emb, cudaStream_t stream) {
  const int a = static_cast<int>(act);
#define MINILM_BWD(T)                                                                                          \
  return backward_all<T>(grad_out, ids, emb, N, L, V, E, widths, n_widths, total_filters, a, out, argmax, partial, \
                         grad_params, grad_emb, stream)
  switch (dtype) {
    case Dtype::kFloat32: MINILM_BWD(float);
    case Dtype::kFloat64: MINILM_BWD(double);
    case Dtype::kBFloat16: MINILM_BWD(__nv_bfloat16);
    case Dtype::kFloat16: MINILM_BWD(__half);
  }
#undef MINILM_BWD
  return cudaErrorInvalidValue;
}

}  // namespace minilm_cuda
