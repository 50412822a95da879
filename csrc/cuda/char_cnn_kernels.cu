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
// (relu: out > 0; tanh: 1 − out²),
//     dW_f[e][w] = Σ_n g[n,f] · x_n[t*+w][e],   db_f = Σ_n g[n,f],   dx_n[t*+w][e] += g[n,f] · W_f[e][w].
// * dW, db: CTAs own (a block of filters, a chunk of 1024 tokens); each thread owns up to 8 (filter, k)
//   pairs, k = (e, w) or the bias, and sums over its chunk's tokens (g, t* and char ids staged in shared
//   memory). Per-chunk partial sums go to a workspace and a last kernel adds them in chunk order:
//   deterministic.
// * d(embedding): CTAs own 32 tokens and walk all the filters of a width (weights staged in shared
//   memory); a warp takes a (token, filter) pair with g != 0 and its lanes scatter g·W_f into the rows of
//   the characters under the filter's window, with shared-memory atomicAdd into a per-CTA copy of the
//   [V, E] gradient, which is then added to the global one with atomicAdd. Float atomics make the order
//   of additions, and so the last bits of grad_embedding, vary from run to run (documented).
#include "common.cuh"
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace minilm_cuda {
namespace {

__device__ __forceinline__ float act_fwd(float x, int act) { return act == 0 ? fmaxf(x, 0.f) : tanhf(x); }
__device__ __forceinline__ double act_fwd(double x, int act) { return act == 0 ? (x > 0 ? x : 0.0) : tanh(x); }

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
                     const T* __restrict__ bias, T* __restrict__ out, int32_t* __restrict__ argmax, int64_t N, int L,
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
            if (acc[f][tt] > best[f]) best[f] = acc[f][tt], arg[f] = t0 + tt;
        }
      }
    }
#pragma unroll
    for (int f = 0; f < kTF; ++f) {
      const int fg = f0 + lane * kTF + f;
      if (fg < F) {
        const size_t o = static_cast<size_t>(n) * out_stride + out_off + fg;
        out[o] = FromF<T>::cvt(act_fwd(best[f] + b[f], act));
        argmax[o] = arg[f];
      }
    }
  }
}

// ---------------------------------------------------------------------------------- forward, generic
template <typename T>
__global__ void charcnn_fwd_generic(const int64_t* __restrict__ ids, const T* __restrict__ emb,
                                    const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out,
                                    int32_t* __restrict__ argmax, int64_t N, int L, int E, int W, int F,
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
    if (s > best) best = s, arg = t;
  }
  const size_t o = static_cast<size_t>(n) * out_stride + out_off + f;
  out[o] = FromF<T>::cvt(act_fwd(best + static_cast<A>(to_f(bias[f])), act));
  argmax[o] = arg;
}

// ------------------------------------------------------------------------------- backward: dW and db
constexpr int kBwdThreads = 256;
constexpr int kPairsPerThread = 8;
constexpr int kSub = 16;                 // tokens staged in shared memory at a time
constexpr int64_t kChunkTokens = 1024;   // tokens per partial sum

template <typename A>
__device__ __forceinline__ A act_grad(A y, int act) {
  return act == 0 ? (y > A(0) ? A(1) : A(0)) : A(1) - y * y;
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
    charcnn_bwd_params(const T* __restrict__ grad_out, const T* __restrict__ out, const int32_t* __restrict__ argmax,
                       const int64_t* __restrict__ ids, const T* __restrict__ emb, int64_t N, int L, int E, int W,
                       int F, int FB, int out_stride, int out_off, int act,
                       typename AccOf<T>::type* __restrict__ partial, int64_t part_stride) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* gs = reinterpret_cast<A*>(smem_raw);          // [kSub][FB]: g = grad_out · act'(out)
  int* ts = reinterpret_cast<int*>(gs + kSub * FB);  // [kSub][FB]: t*
  int* is = ts + kSub * FB;                          // [kSub][L]: char ids
  const int K = E * W, K1 = K + 1;
  const int f0 = blockIdx.x * FB;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kChunkTokens;
  const int64_t n1 = std::min<int64_t>(N, n0 + kChunkTokens);

  int p_fl[kPairsPerThread], p_e[kPairsPerThread], p_w[kPairsPerThread];  // p_w = -1: the bias; -2: none
  A acc[kPairsPerThread];
#pragma unroll
  for (int j = 0; j < kPairsPerThread; ++j) {
    const int p = threadIdx.x + j * kBwdThreads;
    const int fl = p / K1, k = p % K1;
    p_fl[j] = fl;
    p_e[j] = k / W;
    p_w[j] = (p >= FB * K1 || f0 + fl >= F) ? -2 : (k == K ? -1 : k % W);
    acc[j] = 0;
  }
  for (int64_t s0 = n0; s0 < n1; s0 += kSub) {
    __syncthreads();  // the previous sub-tile is no longer read
    for (int idx = threadIdx.x; idx < kSub * FB; idx += kBwdThreads) {
      const int s = idx / FB, fl = idx % FB;
      const int64_t n = s0 + s;
      A gv = 0;
      int tv = 0;
      if (n < n1 && f0 + fl < F) {
        const size_t o = static_cast<size_t>(n) * out_stride + out_off + f0 + fl;
        gv = static_cast<A>(to_f(grad_out[o])) * act_grad(static_cast<A>(to_f(out[o])), act);
        tv = argmax[o];
      }
      gs[idx] = gv;
      ts[idx] = tv;
    }
    for (int idx = threadIdx.x; idx < kSub * L; idx += kBwdThreads) {
      const int64_t n = s0 + idx / L;
      is[idx] = n < n1 ? static_cast<int>(ids[n * L + idx % L]) : 0;
    }
    __syncthreads();
    const int ns = static_cast<int>(std::min<int64_t>(kSub, n1 - s0));
    for (int s = 0; s < ns; ++s) {
#pragma unroll
      for (int j = 0; j < kPairsPerThread; ++j) {
        if (p_w[j] == -2) continue;
        const A gv = gs[s * FB + p_fl[j]];
        if (p_w[j] == -1) {
          acc[j] += gv;
        } else {
          const int t = min(max(ts[s * FB + p_fl[j]], 0), L - W);  // see charcnn_bwd_emb
          const int id = is[s * L + t + p_w[j]];
          acc[j] += gv * static_cast<A>(to_f(emb[static_cast<int64_t>(id) * E + p_e[j]]));
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPairsPerThread; ++j) {
    if (p_w[j] == -2) continue;
    const int p = threadIdx.x + j * kBwdThreads;
    partial[static_cast<int64_t>(blockIdx.y) * part_stride + static_cast<int64_t>(f0) * K1 + p] = acc[j];
  }
}

template <typename A>
__global__ void charcnn_bwd_reduce(const A* __restrict__ partial, A* __restrict__ grad_params, int64_t P,
                                   int nchunks) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int c = 0; c < nchunks; ++c) s += partial[static_cast<int64_t>(c) * P + p];  // fixed order
    grad_params[p] = s;
  }
}

// ---------------------------------------------------------------------------- backward: d(embedding)
constexpr int kEmbTokens = 32;

size_t emb_smem_bytes(int FB, int K, int L, int V, int E, bool smem_accum, size_t acc_size) {
  return (static_cast<size_t>(smem_accum ? V * E : 0) + static_cast<size_t>(FB) * K + kEmbTokens * FB) * acc_size +
         (static_cast<size_t>(kEmbTokens) * FB + static_cast<size_t>(kEmbTokens) * L) * sizeof(int);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
    charcnn_bwd_emb(const T* __restrict__ grad_out, const T* __restrict__ out, const int32_t* __restrict__ argmax,
                    const int64_t* __restrict__ ids, const T* __restrict__ weight, int64_t N, int L, int V, int E,
                    int W, int F, int FB, int out_stride, int out_off, int act, int smem_accum,
                    typename AccOf<T>::type* __restrict__ grad_emb) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int K = E * W;
  A* gE = reinterpret_cast<A*>(smem_raw);          // [V][E] if smem_accum
  A* sW = gE + (smem_accum ? V * E : 0);            // [FB][K]
  A* gs = sW + FB * K;                              // [kEmbTokens][FB]
  int* ts = reinterpret_cast<int*>(gs + kEmbTokens * FB);  // [kEmbTokens][FB]
  int* is = ts + kEmbTokens * FB;                          // [kEmbTokens][L]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = kBwdThreads / 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kEmbTokens;
  const int ns = static_cast<int>(std::min<int64_t>(kEmbTokens, N - n0));

  if (smem_accum)
    for (int i = threadIdx.x; i < V * E; i += kBwdThreads) gE[i] = 0;
  for (int idx = threadIdx.x; idx < ns * L; idx += kBwdThreads) is[idx] = static_cast<int>(ids[n0 * L + idx]);

  for (int f0 = 0; f0 < F; f0 += FB) {
    const int nf = std::min(FB, F - f0);
    __syncthreads();  // the previous filter block is no longer read
    for (int idx = threadIdx.x; idx < nf * K; idx += kBwdThreads)
      sW[idx] = static_cast<A>(to_f(weight[static_cast<size_t>(f0) * K + idx]));
    for (int idx = threadIdx.x; idx < ns * nf; idx += kBwdThreads) {
      const int s = idx / nf, fl = idx % nf;
      const size_t o = static_cast<size_t>(n0 + s) * out_stride + out_off + f0 + fl;
      gs[s * FB + fl] = static_cast<A>(to_f(grad_out[o])) * act_grad(static_cast<A>(to_f(out[o])), act);
      ts[s * FB + fl] = argmax[o];
    }
    __syncthreads();
    for (int pair = warp; pair < ns * nf; pair += nwarps) {
      const int s = pair / nf, fl = pair % nf;
      const A gv = gs[s * FB + fl];
      if (gv == A(0)) continue;  // warp-uniform: relu filters that did not fire
      // clamped so that a corrupt argmax cannot read outside the token (the forward never makes one)
      const int* window = is + s * L + min(max(ts[s * FB + fl], 0), L - W);
      for (int k = lane; k < K; k += 32) {
        const int e = k / W, w = k % W;
        const int64_t row = window[w];
        const A c = gv * sW[fl * K + k];
        if (smem_accum)
          atomicAdd(gE + row * E + e, c);
        else
          atomicAdd(grad_emb + row * E + e, c);
      }
    }
  }
  if (smem_accum) {
    __syncthreads();
    for (int i = threadIdx.x; i < V * E; i += kBwdThreads)
      if (gE[i] != A(0)) atomicAdd(grad_emb + i, gE[i]);
  }
}

// ------------------------------------------------------------------------------------------ launchers
int max_smem_optin() {
  int dev = 0, v = 48 * 1024;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 48 * 1024;
  return v;
}

template <typename F>
cudaError_t allow_smem(F kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int W>
cudaError_t launch_fast(const int64_t* ids, const T* emb, const CharCnnWidth& cw, int64_t N, int L, int E,
                        int total, int act, T* out, int32_t* argmax, cudaStream_t stream) {
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
                          int total, int act, T* out, int32_t* argmax, cudaStream_t stream) {
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
                        int n_widths, int total, int act, void* out, int32_t* argmax, cudaStream_t stream) {
  for (int i = 0; i < n_widths; ++i) {
    cudaError_t err = forward_width<T>(ids, static_cast<const T*>(emb), widths[i], N, L, E, total, act,
                                       static_cast<T*>(out), argmax, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Filters per CTA of the dW/db kernel: each thread owns at most kPairsPerThread (filter, k) pairs.
int params_fb(int E, int W, int F) {
  return std::max(1, std::min(F, kBwdThreads * kPairsPerThread / (E * W + 1)));
}
int64_t n_chunks(int64_t N) { return (N + kChunkTokens - 1) / kChunkTokens; }

template <typename T>
cudaError_t backward_all(const void* grad_out, const int64_t* ids, const void* emb, int64_t N, int L, int V, int E,
                         const CharCnnWidth* widths, int n_widths, int total, int act, const void* out,
                         const int32_t* argmax, void* partial_, void* grad_params_, void* grad_emb_,
                         cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  A* partial = static_cast<A*>(partial_);
  A* grad_params = static_cast<A*>(grad_params_);
  A* grad_emb = static_cast<A*>(grad_emb_);
  const T* go = static_cast<const T*>(grad_out);
  const T* y = static_cast<const T*>(out);
  const int smem_limit = max_smem_optin();
  int64_t P = 0;
  for (int i = 0; i < n_widths; ++i) P += static_cast<int64_t>(widths[i].filters) * (E * widths[i].width + 1);
  const int64_t chunks = n_chunks(N);
  cudaError_t err = cudaMemsetAsync(grad_emb, 0, static_cast<size_t>(V) * E * sizeof(A), stream);
  if (err != cudaSuccess) return err;

  int64_t off = 0;
  for (int i = 0; i < n_widths; ++i) {
    const CharCnnWidth& cw = widths[i];
    const int K = E * cw.width;
    // dW, db partial sums
    const int fb = params_fb(E, cw.width, cw.filters);
    const size_t smem_p = static_cast<size_t>(kSub) * fb * (sizeof(A) + sizeof(int)) + static_cast<size_t>(kSub) * L * sizeof(int);
    if (smem_p > static_cast<size_t>(smem_limit)) return cudaErrorInvalidConfiguration;
    auto kp = charcnn_bwd_params<T>;
    if ((err = allow_smem(kp, smem_p)) != cudaSuccess) return err;
    const dim3 grid_p(static_cast<unsigned>((cw.filters + fb - 1) / fb), static_cast<unsigned>(chunks));
    kp<<<grid_p, kBwdThreads, smem_p, stream>>>(go, y, argmax, ids, static_cast<const T*>(emb), N, L, E, cw.width,
                                                 cw.filters, fb, total, cw.offset, act, partial + off, P);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    off += static_cast<int64_t>(cw.filters) * (K + 1);

    // d(embedding): the largest filter block that fits, with the per-CTA [V, E] copy if it fits too
    int fbe = std::min(cw.filters, 64);
    bool smem_accum = static_cast<size_t>(V) * E * sizeof(A) <= 48 * 1024;
    auto fits = [&](int fb_, bool acc_) {
      return emb_smem_bytes(fb_, K, L, V, E, acc_, sizeof(A)) <= static_cast<size_t>(std::min(smem_limit, 100 * 1024));
    };
    while (fbe > 1 && !fits(fbe, smem_accum)) fbe /= 2;
    if (!fits(fbe, smem_accum)) smem_accum = false;
    if (!fits(fbe, smem_accum)) return cudaErrorInvalidConfiguration;
    const size_t smem_e = emb_smem_bytes(fbe, K, L, V, E, smem_accum, sizeof(A));
    auto ke = charcnn_bwd_emb<T>;
    if ((err = allow_smem(ke, smem_e)) != cudaSuccess) return err;
    ke<<<static_cast<unsigned>((N + kEmbTokens - 1) / kEmbTokens), kBwdThreads, smem_e, stream>>>(
        go, y, argmax, ids, static_cast<const T*>(cw.weight), N, L, V, E, cw.width, cw.filters, fbe, total,
        cw.offset, act, smem_accum ? 1 : 0, grad_emb);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((P + 255) / 256, 4096));
  charcnn_bwd_reduce<A><<<blocks, 256, 0, stream>>>(partial, grad_params, P, static_cast<int>(chunks));
  return cudaGetLastError();
}

}  // namespace

cudaError_t char_cnn_forward(Dtype dtype, const int64_t* ids, const void* emb, int64_t N, int L, int V, int E,
                             const CharCnnWidth* widths, int n_widths, int total_filters, Activation act,
                             void* out, int32_t* argmax, cudaStream_t stream) {
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

int64_t char_cnn_backward_partial_elems(int64_t N, int E, const CharCnnWidth* widths, int n_widths) {
  int64_t P = 0;
  for (int i = 0; i < n_widths; ++i) P += static_cast<int64_t>(widths[i].filters) * (E * widths[i].width + 1);
  return n_chunks(N) * P;
}

cudaError_t char_cnn_backward(Dtype dtype, const void* grad_out, const int64_t* ids, const void* emb, int64_t N,
                              int L, int V, int E, const CharCnnWidth* widths, int n_widths, int total_filters,
                              Activation act, const void* out, const int32_t* argmax, void* partial,
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
