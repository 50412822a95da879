// Causal self-attention on the CPU, FlashAttention-style (Dao et al. 2022; FA2 loop order).
//
// For one (batch, head): q, k, v are [T, D]; S = scale · q kᵀ with S_ij = −inf for j > i;
// P = softmax(S) row by row; out = P v; lse_i = log Σ_j exp(S_ij). The T×T matrices S and P are
// never stored: only tiles of them, in per-thread scratch.
//
// Forward (parallel over batch × heads × query blocks, `at::parallel_for`):
//   one work item owns a block of Bq query rows and walks the key/value blocks of Bk rows up to the
//   block's last query (causality: later keys are masked for every row, so those blocks are skipped).
//   Per key block, with an online softmax (running row max m and row sum l):
//     S    = scale · Q Kᵀ                      [Bq×Bk]  GEMM
//     m'   = max(m, rowmax S);  P = exp(S − m')        (only the diagonal tile needs the causal mask)
//     l    = l · exp(m − m') + rowsum P
//     acc  = acc · exp(m − m') + P V           [Bq×D]   GEMM
//   then out = acc / l and lse = m + log l (saved for the backward, [B, H, T] fp32).
//   With dropout, P's dropped entries are zeroed and the kept ones scaled (after l has summed them all):
//   the mask is a hash of (seed, head, query, key), see ../attention_dropout.h, regenerated per tile.
//   Fast memory (L1/L2) holds Q's block, the S/P tile, acc, m, l: O(Bq·(Bk + D)) floats per thread.
//   K and V tiles are streamed from L3/DRAM, once per query block. Bq = 32, 64 or 256 (grows with
//   T), Bk = 512; any T and any D ≥ 1 (partial last blocks are just smaller GEMMs).
//
// Backward (parallel over batch × heads): recompute P from the saved lse instead of storing it:
//   Dᵢ = rowsum(dOᵢ ∘ Oᵢ)   (= Σ_j P_ij dP_ij, the softmax Jacobian's correction term)
//   per (query block i, key block j ≤ i):
//     P   = exp(scale · Qᵢ Kⱼᵀ − lseᵢ)       dVⱼ += Pᵀ dOᵢ
//     dP  = dOᵢ Vⱼᵀ                          dS   = P ∘ (dP − Dᵢ)
//     dQᵢ += scale · dS Kⱼ                   dKⱼ += scale · dSᵀ Qᵢ
//   With dropout, M = keep · (1 / keep rate) is regenerated per tile and
//     dVⱼ += (P ∘ M)ᵀ dOᵢ                    dS   = P ∘ (dP ∘ M − Dᵢ)
//   One thread owns a whole head: every query block adds into the same dK, dV rows, so splitting a
//   head's query blocks across threads would race (or need atomics / per-thread copies of dK, dV).
//   With B·H ≥ threads (the usual case) the heads are enough parallelism; with fewer heads than
//   threads some threads idle. Contiguous fp32/fp64 results accumulate dK, dV in the output tensors;
//   bf16/fp16, and results laid out [B, T, H, D] (a head's rows spread over T·H·D elements), use fp32/fp64
//   accumulators (O(T·D) per thread). The other scratch is O(Bq·Bk) per thread. Bq = 32/64/128.
//
// Precision: everything is computed in fp32 (fp64 for fp64 inputs, for gradcheck). bf16/fp16 tiles
// are converted to fp32 when loaded; results are rounded to the input dtype once, at the end.
// The tile products are BLAS sgemm/dgemm calls on raw pointers (MKL inside PyTorch's CPU build):
// the per-call overhead of a few hundred ns is negligible next to a 64×512×64 product, unlike
// at::mm's tensor bookkeeping. The row max / exp / sum loops are written so that the compiler
// vectorises them (-O3 -march=native; `omp simd` lets it reorder the reductions).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../attention_dropout_args.h"
#include "../attention_layout.h"

// The Fortran BLAS entry points that libtorch_cpu exports (MKL, or OpenBLAS on other builds).
// at::native::cpublas::gemm would be the natural call, but its float/double overloads are not
// exported from libtorch_cpu, so an extension cannot link against them. Declared weak: on a torch
// built without BLAS they are null and gemm() below falls back to plain loops.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's C name for mkl_set_num_threads_local (mkl_service.h maps one to the other with a macro).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace minilm {
namespace {

// ---------------------------------------------------------------------------------------------
// Small building blocks: a row-major GEMM, a vectorisable exp, strided tensor access.

// C[M×N] = alpha · op(A) · op(B) + beta · C, every matrix row-major with its own row stride (ld).
// op(A) is [M×K]: A itself, or Aᵀ of a stored [K×M] when trans_a. Likewise op(B) is [K×N].
// BLAS is column-major, and a row-major matrix read column-major is its transpose, so we ask BLAS
// for Cᵀ = op(B)ᵀ · op(A)ᵀ: the operands swap places and keep their transpose flags.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  }
  for (int64_t i = 0; i < M; ++i) {  // no BLAS in this torch build: slow but correct
    for (int64_t j = 0; j < N; ++j) {
      T s = 0;
      for (int64_t p = 0; p < K; ++p) s += (trans_a ? A[p * lda + i] : A[i * lda + p]) * (trans_b ? B[j * ldb + p] : B[p * ldb + j]);
      C[i * ldc + j] = alpha * s + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
    }
  }
}

// The kernels parallelise over tiles themselves, so each BLAS call must stay on its own thread.
// MKL would otherwise start its own thread team for a tile product issued outside a parallel
// region (a tiny problem runs on the calling thread): a wake-up per call, which on a busy machine
// costs milliseconds. mkl_set_num_threads_local is per thread; the destructor restores the setting.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// exp(x) for fp32 in straight-line code that the compiler vectorises (std::exp is a library call
// per element). exp(x) = 2ⁿ · exp(r) with n = round(x / ln 2) and |r| ≤ ln2/2; exp(r) by its
// degree-6 Taylor polynomial (relative error < 2e-7, about 1 ulp); 2ⁿ built directly in the
// exponent bits. x is clamped to [−87, 88] so that 2ⁿ stays a normal float; exp(−87) ≈ 1.6e-38 is
// as good as 0 next to the row's largest term, which is 1.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x − n·ln2, ln2 split in two for accuracy
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}
inline double exp_vec(double x) { return std::exp(x); }  // the fp64 path is for gradcheck, not speed

template <typename T>
T row_max(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = m > s[c] ? m : s[c];  // GCC vectorises this form, not std::max
  return m;
}

// p[c] = exp(s[c] − sub) for c < n and 0 for n ≤ c < len (the causally masked tail); returns Σ p.
template <typename T>
T exp_rows(const T* s, T* p, int64_t n, int64_t len, T sub) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const T e = exp_vec(s[c] - sub);
    p[c] = e;
    sum += e;
  }
  for (int64_t c = n; c < len; ++c) p[c] = 0;
  return sum;
}

// One [B, H, T, D] tensor whose rows (the last dim) are contiguous; any other strides. So q from
// x.view(B, T, H, D).transpose(1, 2) is read in place (BLAS takes the row stride as its ld), and results are
// written in their layout (../attention_layout.h). E: const scalar_t (an input) or scalar_t (a result).
template <typename E>
struct Rows {
  E* data;
  int64_t sb, sh, st;
  E* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

template <typename E>
Rows<E> rows_of(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<E>>(), t.stride(0), t.stride(1), t.size(2) > 1 ? t.stride(2) : t.size(3)};
}

// A tensor that rows_of() can read: last dim contiguous and rows that do not overlap (BLAS's ld ≥ D).
at::Tensor with_contiguous_rows(const at::Tensor& t) {
  const bool ok = (t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) >= t.size(3)) &&
                  t.stride(2) < INT_MAX;
  return ok ? t : t.contiguous();
}

// Where the kernels write a result for q: in its layout (../attention_layout.h), unless its rows lie too far
// apart for BLAS's 32-bit ld; then contiguous, and as_result copies it into that layout.
at::Tensor writable_result(const at::Tensor& q) {
  return result_strides(q)[2] < INT_MAX ? empty_result(q) : at::empty(q.sizes(), q.options());
}

// rows [0, n) of a [n×D] tile as acc_t: the memory itself when the dtypes agree (row stride ld), or
// a converted copy in buf (row stride D) for bf16/fp16. Sets *ld_out to the returned tile's stride.
template <typename scalar_t, typename acc_t>
const acc_t* load_tile(const scalar_t* src, int64_t ld, int64_t n, int64_t D, acc_t* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = acc_t(src[r * ld + d]);
    *ld_out = D;
    return buf;
  }
}

// Per-thread fp32 scratch: one tensor of [threads, n], allocated by the calling thread (so that
// torch's allocator and memory profilers see it) and sliced by thread id inside at::parallel_for.
// Each call allocates its own, so concurrent calls never share one.
template <typename acc_t>
struct ThreadScratch {
  at::Tensor buf;
  int64_t n;
  explicit ThreadScratch(int64_t n_)
      : buf(at::empty({at::get_num_threads(), n_}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value))),
        n(n_) {}
  acc_t* get() {
    const int64_t t = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(t < buf.size(0), "causal_attention: thread id ", t, " out of range");
    return buf.data_ptr<acc_t>() + t * n;
  }
};

// Block sizes. Query blocks grow with T so that each K/V tile is reused by more rows (fewer passes
// over K and V) while short sequences still split into enough work items for every thread; 512
// keys per tile keep the S tile (Bq×512 floats, ≤ 512 KiB) within a core's L2. As in PyTorch's
// kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp).
int64_t q_block_fwd(int64_t T) { return T >= 768 ? 256 : (T >= 192 ? 64 : 32); }
int64_t q_block_bwd(int64_t T) { return T >= 768 ? 128 : (T >= 192 ? 64 : 32); }
constexpr int64_t kKvBlock = 512;

// Work items per thread at least: waking the thread pool costs microseconds (far more on a loaded
// machine), so a tiny problem runs on the calling thread. `work` is in multiply-adds, roughly.
int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work_per_item)); }

// Number of keys (from the tile's first key j0) that query row i may see: min(kb, i − j0 + 1), ≥ 0.
inline int64_t visible_keys(int64_t i, int64_t j0, int64_t kb) { return std::clamp<int64_t>(i - j0 + 1, 0, kb); }

// Attention dropout on one row of a tile: m[c] = x[c] · scale if key j0 + c is kept in this row (`row` is
// the row's key, minilm_dropout::row_key), else 0, for c < n. x and m may be the same array.
template <typename T>
void dropout_row(const T* x, T* m, int64_t n, uint32_t row, int64_t j0, const minilm_dropout::Params& drop) {
  const T scale = T(drop.scale);
#pragma omp simd
  for (int64_t c = 0; c < n; ++c)
    m[c] = minilm_dropout::keep(row, static_cast<uint32_t>(j0 + c), drop.threshold) ? x[c] * scale : T(0);
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename acc_t>
void forward_kernel(Rows<const scalar_t> q, Rows<const scalar_t> k, Rows<const scalar_t> v, Rows<scalar_t> out,
                    acc_t* lse, int64_t B, int64_t H, int64_t T, int64_t D, acc_t scale,
                    const minilm_dropout::Params& drop) {
  const int64_t Bq = q_block_fwd(T), Bk = kKvBlock;
  const int64_t nq = (T + Bq - 1) / Bq;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  // per thread: S/P tile, acc, m, l, and for bf16/fp16 the fp32 copies of the Q, K, V tiles
  ThreadScratch<acc_t> scratch(Bq * Bk + Bq * D + 2 * Bq + (convert ? (Bq + 2 * Bk) * D : 0));
  at::parallel_for(0, B * H * nq, grain_for(2 * Bq * T * D), [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    acc_t* const S = scratch.get();                                    // (Bq, Bk)
    acc_t* const acc = S + Bq * Bk;                                    // (Bq, D)
    acc_t* const m = acc + Bq * D;                                     // (Bq,)
    acc_t* const l = m + Bq;                                           // (Bq,)
    acc_t* const qbuf = l + Bq;                                        // (Bq, D) if convert
    acc_t* const kbuf = qbuf + Bq * D;                                 // (Bk, D) if convert
    acc_t* const vbuf = kbuf + Bk * D;                                 // (Bk, D) if convert
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nq, b = bh / H, h = bh % H;
      // at::parallel_for hands each thread one contiguous range of items, and a late query block
      // costs more than an early one (it sees more keys); ordering a head's blocks
      // 0, n−1, 1, n−2, ... keeps every range's total work even.
      const int64_t r = item % nq, blk = (r % 2 == 0) ? r / 2 : nq - 1 - r / 2;
      const int64_t i0 = blk * Bq, qb = std::min(Bq, T - i0);
      const uint32_t head_key = minilm_dropout::head_key(drop.seed0, drop.seed1, static_cast<uint32_t>(bh));
      int64_t ldq, ldk, ldv;
      const acc_t* Q = load_tile(q.head(b, h) + i0 * q.st, q.st, qb, D, qbuf, &ldq);  // (qb, D)
      std::fill(m, m + qb, -std::numeric_limits<acc_t>::infinity());
      std::fill(l, l + qb, acc_t(0));
      std::fill(acc, acc + qb * D, acc_t(0));

      const int64_t kv_end = i0 + qb;  // keys after the block's last query are masked for all its rows
      for (int64_t j0 = 0; j0 < kv_end; j0 += Bk) {
        const int64_t kb = std::min(Bk, kv_end - j0);
        const acc_t* K = load_tile(k.head(b, h) + j0 * k.st, k.st, kb, D, kbuf, &ldk);  // (kb, D)
        const acc_t* V = load_tile(v.head(b, h) + j0 * v.st, v.st, kb, D, vbuf, &ldv);  // (kb, D)
        gemm<acc_t>(false, true, qb, kb, D, scale, Q, ldq, K, ldk, acc_t(0), S, kb);  // S = scale·Q Kᵀ (qb, kb)
        const bool diagonal = j0 + kb - 1 > i0;  // does any key of this tile lie after some query row?
        for (int64_t r = 0; r < qb; ++r) {
          acc_t* s = S + r * kb;
          const int64_t n = diagonal ? visible_keys(i0 + r, j0, kb) : kb;
          const acc_t m_new = std::max(m[r], row_max(s, n));
          if (n == 0 || m_new == -std::numeric_limits<acc_t>::infinity()) {  // nothing visible (yet)
            std::fill(s, s + kb, acc_t(0));
            continue;
          }
          const acc_t row_sum = exp_rows(s, s, n, kb, m_new);  // P overwrites S
          const acc_t corr = std::exp(m[r] - m_new);         // rescales the old terms; 0 on the first tile
          l[r] = l[r] * corr + row_sum;
          m[r] = m_new;
          if (drop.active())  // after l has summed the undropped P
            dropout_row(s, s, n, minilm_dropout::row_key(head_key, static_cast<uint32_t>(i0 + r)), j0, drop);
          if (corr != acc_t(1)) {
            acc_t* a = acc + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          }
        }
        gemm<acc_t>(false, false, qb, D, kb, acc_t(1), S, kb, V, ldv, acc_t(1), acc, D);  // acc += P V
      }

      scalar_t* o = out.head(b, h) + i0 * out.st;  // (qb, D), rows out.st apart
      acc_t* lse_row = lse + bh * T + i0;
      for (int64_t r = 0; r < qb; ++r) {
        const acc_t inv_l = acc_t(1) / l[r];
        for (int64_t d = 0; d < D; ++d) o[r * out.st + d] = scalar_t(acc[r * D + d] * inv_l);
        lse_row[r] = m[r] + std::log(l[r]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename scalar_t, typename acc_t>
void backward_kernel(Rows<const scalar_t> dout, Rows<const scalar_t> q, Rows<const scalar_t> k, Rows<const scalar_t> v,
                     Rows<const scalar_t> out, const acc_t* lse, Rows<scalar_t> dq, Rows<scalar_t> dk,
                     Rows<scalar_t> dv, int64_t B, int64_t H, int64_t T, int64_t D, acc_t scale,
                     const minilm_dropout::Params& drop) {
  const int64_t Bq = q_block_bwd(T), Bk = kKvBlock;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  // per thread: P and dS tiles, dQ, D; for bf16/fp16 also fp32 dK, dV accumulators and fp32 copies of
  // K, V (whole head) and the Q, dO tiles. With dropout, the tile M = keep · scale too. fp32/fp64 accumulate
  // dK, dV straight into contiguous results; results laid out [B, T, H, D] get the scratch accumulators too
  // (a head's T×D block, spread over T·H·D elements, would cost cache misses in every one of its updates).
  const bool acc_buf = convert || dk.st != D;
  ThreadScratch<acc_t> scratch(2 * Bq * Bk + Bq * D + Bq + (acc_buf ? 2 * T * D : 0) +
                               (convert ? 2 * T * D + 2 * Bq * D : 0) + (drop.active() ? Bq * Bk : 0));
  at::parallel_for(0, B * H, grain_for(5 * T * T * D / 2), [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    acc_t* const P = scratch.get();         // (Bq, Bk)
    acc_t* const dS = P + Bq * Bk;          // (Bq, Bk), first dP
    acc_t* const dQ = dS + Bq * Bk;         // (Bq, D)
    acc_t* const Di = dQ + Bq * D;          // (Bq,)
    acc_t* const M = Di + Bq;               // (Bq, Bk) if dropout
    acc_t* const dK_buf = M + (drop.active() ? Bq * Bk : 0);  // (T, D) if acc_buf
    acc_t* const dV_buf = dK_buf + T * D;   // (T, D) if acc_buf
    acc_t* const khead = dK_buf + (acc_buf ? 2 * T * D : 0);  // (T, D) if convert
    acc_t* const vhead = khead + T * D;     // (T, D) if convert
    acc_t* const qbuf = vhead + T * D;      // (Bq, D) if convert
    acc_t* const dobuf = qbuf + Bq * D;     // (Bq, D) if convert
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const uint32_t head_key = minilm_dropout::head_key(drop.seed0, drop.seed1, static_cast<uint32_t>(bh));
      int64_t ldk, ldv, ldq, lddo;
      const acc_t* Kh = load_tile(k.head(b, h), k.st, T, D, khead, &ldk);  // (T, D)
      const acc_t* Vh = load_tile(v.head(b, h), v.st, T, D, vhead, &ldv);  // (T, D)
      acc_t* dK = dK_buf;  // (T, D): this head's gradients, accumulated over all query blocks
      acc_t* dV = dV_buf;
      if constexpr (!convert) {
        if (!acc_buf) dK = dk.head(b, h), dV = dv.head(b, h);  // fp32/fp64, contiguous results: in place
      }
      std::fill(dK, dK + T * D, acc_t(0));
      std::fill(dV, dV + T * D, acc_t(0));

      for (int64_t i0 = 0; i0 < T; i0 += Bq) {
        const int64_t qb = std::min(Bq, T - i0);
        const acc_t* Q = load_tile(q.head(b, h) + i0 * q.st, q.st, qb, D, qbuf, &ldq);               // (qb, D)
        const acc_t* dO = load_tile(dout.head(b, h) + i0 * dout.st, dout.st, qb, D, dobuf, &lddo);  // (qb, D)
        const scalar_t* O = out.head(b, h) + i0 * out.st;
        const acc_t* lse_i = lse + bh * T + i0;
        for (int64_t r = 0; r < qb; ++r) {  // Dᵢ = rowsum(dOᵢ ∘ Oᵢ)
          acc_t s = 0;
          for (int64_t d = 0; d < D; ++d) s += dO[r * lddo + d] * acc_t(O[r * out.st + d]);
          Di[r] = s;
        }
        std::fill(dQ, dQ + qb * D, acc_t(0));

        const int64_t kv_end = i0 + qb;
        for (int64_t j0 = 0; j0 < kv_end; j0 += Bk) {
          const int64_t kb = std::min(Bk, kv_end - j0);
          const acc_t* K = Kh + j0 * ldk;  // (kb, D)
          const acc_t* V = Vh + j0 * ldv;  // (kb, D)
          gemm<acc_t>(false, true, qb, kb, D, scale, Q, ldq, K, ldk, acc_t(0), P, kb);  // S = scale·Q Kᵀ
          const bool diagonal = j0 + kb - 1 > i0;
          for (int64_t r = 0; r < qb; ++r) {  // P = exp(S − lse), 0 where masked
            acc_t* p = P + r * kb;
            const int64_t n = diagonal ? visible_keys(i0 + r, j0, kb) : kb;
            exp_rows(p, p, n, kb, lse_i[r]);
            if (drop.active()) {  // M = keep · scale; P ∘ M into the dS tile, for dV
              acc_t* mr = M + r * kb;
              std::fill(mr, mr + kb, acc_t(1));
              dropout_row(mr, mr, n, minilm_dropout::row_key(head_key, static_cast<uint32_t>(i0 + r)), j0, drop);
              for (int64_t c = 0; c < kb; ++c) dS[r * kb + c] = p[c] * mr[c];
            }
          }
          // dV += Pᵀ dO (with dropout: (P ∘ M)ᵀ dO)
          gemm<acc_t>(true, false, kb, D, qb, acc_t(1), drop.active() ? dS : P, kb, dO, lddo, acc_t(1), dV + j0 * D, D);
          gemm<acc_t>(false, true, qb, kb, D, acc_t(1), dO, lddo, V, ldv, acc_t(0), dS, kb);  // dP = dO Vᵀ
          for (int64_t r = 0; r < qb; ++r) {  // dS = P ∘ (dP − D) (with dropout: P ∘ (dP ∘ M − D))
            const acc_t* p = P + r * kb;
            acc_t* ds = dS + r * kb;
            const acc_t di = Di[r];
            if (drop.active()) {
              const acc_t* mr = M + r * kb;
#pragma omp simd
              for (int64_t c = 0; c < kb; ++c) ds[c] = p[c] * (ds[c] * mr[c] - di);
            } else {
#pragma omp simd
              for (int64_t c = 0; c < kb; ++c) ds[c] = p[c] * (ds[c] - di);
            }
          }
          gemm<acc_t>(false, false, qb, D, kb, scale, dS, kb, K, ldk, acc_t(1), dQ, D);  // dQ += scale·dS K
          gemm<acc_t>(true, false, kb, D, qb, scale, dS, kb, Q, ldq, acc_t(1), dK + j0 * D, D);  // dK += scale·dSᵀ Q
        }
        scalar_t* dq_out = dq.head(b, h) + i0 * dq.st;
        for (int64_t r = 0; r < qb; ++r)
          for (int64_t d = 0; d < D; ++d) dq_out[r * dq.st + d] = scalar_t(dQ[r * D + d]);
      }
      if (acc_buf) {
        scalar_t* dk_out = dk.head(b, h);
        scalar_t* dv_out = dv.head(b, h);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t d = 0; d < D; ++d) {
            dk_out[t * dk.st + d] = scalar_t(dK[t * D + d]);
            dv_out[t * dv.st + d] = scalar_t(dV[t * D + d]);
          }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The ops

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D [B, H, T, D], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), op, ": q, k, v must have the same shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op, ": q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.device().is_cpu(), op, ": this is the CPU kernel, got tensors on ", q.device());
  TORCH_CHECK(q.size(3) >= 1, op, ": head dim D must be at least 1");
}

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, double scale, double dropout_p,
                                                        const std::optional<at::Tensor>& seed) {
  check_inputs("causal_attention", q_, k_, v_);
  const auto drop = attention_dropout_params("causal_attention", dropout_p, seed);
  const auto q = with_contiguous_rows(q_), k = with_contiguous_rows(k_), v = with_contiguous_rows(v_);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto out = writable_result(q_);
  auto lse = at::empty({B, H, T}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0) return {as_result(q_, out), lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(rows_of<const scalar_t>(q), rows_of<const scalar_t>(k), rows_of<const scalar_t>(v),
                                    rows_of<scalar_t>(out), lse.data_ptr<acc_t>(), B, H, T, D, acc_t(scale), drop);
  });
  return {as_result(q_, out), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const char* op = "causal_attention_backward";
  check_inputs(op, q_, k_, v_);
  const auto drop = attention_dropout_params(op, dropout_p, seed);
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(), op,
              ": grad_out and out must have q's shape ", q_.sizes(), ", got ", dout_.sizes(), " and ", out_.sizes());
  TORCH_CHECK(lse_.dim() == 3 && lse_.sizes() == q_.sizes().slice(0, 3), op, ": lse must be [B, H, T] = ",
              q_.sizes().slice(0, 3), ", got ", lse_.sizes());
  TORCH_CHECK(at::isFloatingType(dout_.scalar_type()) && at::isFloatingType(out_.scalar_type()) &&
                  at::isFloatingType(lse_.scalar_type()),
              op, ": grad_out, out and lse must be floating point");
  TORCH_CHECK(dout_.device() == q_.device() && out_.device() == q_.device() && lse_.device() == q_.device(), op,
              ": all tensors must be on one device");
  const auto q = with_contiguous_rows(q_), k = with_contiguous_rows(k_), v = with_contiguous_rows(v_);
  const auto dout = with_contiguous_rows(dout_.to(q.scalar_type()));
  const auto out = with_contiguous_rows(out_.to(q.scalar_type()));
  const auto lse = lse_.to(lse_dtype(q.scalar_type())).contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto dq = writable_result(q_), dk = writable_result(q_), dv = writable_result(q_);  // one layout: q's
  if (dq.numel() == 0) return {as_result(q_, dq), as_result(q_, dk), as_result(q_, dv)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(rows_of<const scalar_t>(dout), rows_of<const scalar_t>(q),
                                     rows_of<const scalar_t>(k), rows_of<const scalar_t>(v),
                                     rows_of<const scalar_t>(out), lse.data_ptr<acc_t>(), rows_of<scalar_t>(dq),
                                     rows_of<scalar_t>(dk), rows_of<scalar_t>(dv), B, H, T, D, acc_t(scale), drop);
  });
  return {as_result(q_, dq), as_result(q_, dk), as_result(q_, dv)};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) {
  m.impl("causal_attention", &causal_attention_cpu);
  m.impl("causal_attention_backward", &causal_attention_backward_cpu);
}

}  // namespace minilm
