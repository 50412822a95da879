// ELMo's character CNN on the CPU, fused: embedding lookup -> every width's convolution -> max over
// time -> + bias -> activation, without ever storing the (N, F, L−w+1) convolution outputs.
//
// What it computes: for each token n (a row of L character ids), x = embedding[ids] (L × E); for each
// filter width w_i and each of its F_i filters f, the VALID convolution s[t] = Σ_{k<w, e<E} W[f,e,k]·x[t+k,e]
// for t = 0 … L−w; out[n, f] = act(max_t s[t] + b[f]) and argmax[n, f] = the first t of that max.
//
// How it tiles (forward): threads take contiguous ranges of tokens (at::parallel_for). For one width at
// a time, a thread unfolds the windows x[t:t+w] of as many tokens as fill a ~512 KiB tile into a
// patch matrix [P, w·E] (with the filters stored [F, w, E], a window is w·E contiguous values of x),
// scores all P windows against all F filters with one GEMM (MKL) into S [P, F], and reduces S to
// each token's running max and argmax, adds the bias and applies the activation. Windows lying wholly
// inside a token's trailing run of one repeated id (its padding) are identical, so only the first is
// computed: exact, and on real words (5 bytes + BOW/EOW in 50 slots) it skips most of the work.
//
// What it keeps: out and argmax (an int16 per token and filter: t* <= L − w, so L − w <= 32,767 is
// checked) — nothing else survives the call.
//
// What the backward needs: argmax, out (for the activation's derivative: relu: 0 where out <= 0, else 1; tanh:
// 1 − out²), the ids, the embedding and the filters. The gradient goes through t* only:
//   g' = grad_out·act'(out);  dW_f[e,k] += g'·x[t*+k, e];  dx[t*+k, e] += g'·W_f[e,k];  db_f += g'.
// Since x is a lookup, both are computed from a histogram of g' by character id (see backward_kernel).
// Parallel over chunks of filters, race-free; deterministic on any number of threads (partial sums of
// the embedding gradient, one per fixed group of chunks, are added in a fixed order). fp32, bf16 and fp16
// accumulate in fp32; fp64 in fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace minilm {
namespace {

enum class Act { Relu, Tanh };

// argmax holds t* in [0, L − w] as int16 (half the memory of int32): L − w must fit.
constexpr int64_t kMaxArgmax = std::numeric_limits<int16_t>::max();

Act parse_activation(const std::string& activation) {
  if (activation == "relu") return Act::Relu;
  if (activation == "tanh") return Act::Tanh;
  TORCH_CHECK(false, "char_cnn: unknown activation '", activation, "'; expected 'relu' or 'tanh'");
}

void check_inputs(const at::Tensor& ids, const at::Tensor& emb, at::TensorList weights) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, "char_cnn: char_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2, "char_cnn: char_ids must be 2-D [N, L], got ", ids.sizes());
  TORCH_CHECK(emb.dim() == 2, "char_cnn: embedding must be 2-D [V, E], got ", emb.sizes());
  TORCH_CHECK(at::isFloatingType(emb.scalar_type()), "char_cnn: embedding must be floating, got ", emb.scalar_type());
  TORCH_CHECK(!weights.empty(), "char_cnn: weights must hold at least one filter width");
  TORCH_CHECK(emb.size(0) > 0, "char_cnn: the embedding has no rows");
  TORCH_CHECK(emb.size(1) > 0, "char_cnn: the embedding has no columns (E = 0)");
  TORCH_CHECK(ids.device() == emb.device(), "char_cnn: char_ids and embedding must be on one device");
  int64_t w_max = 0, w_min = std::numeric_limits<int64_t>::max();
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 3 && w.size(0) > 0 && w.size(2) > 0, "char_cnn: weights[", i,
                "] must be 3-D [F, E, w] and non-empty, got ", w.sizes());
    TORCH_CHECK(w.size(1) == emb.size(1), "char_cnn: weights[", i, "] has ", w.size(1),
                " input channels but the embedding width is ", emb.size(1));
    TORCH_CHECK(w.scalar_type() == emb.scalar_type(), "char_cnn: weights[", i, "] is ", w.scalar_type(),
                " but the embedding is ", emb.scalar_type());
    TORCH_CHECK(w.device() == emb.device(), "char_cnn: weights[", i, "] is not on the embedding's device");
    w_max = std::max(w_max, w.size(2));
    w_min = std::min(w_min, w.size(2));
  }
  TORCH_CHECK(ids.size(1) >= w_max, "char_cnn: tokens have ", ids.size(1),
              " characters, fewer than the widest filter (", w_max, ")");
  TORCH_CHECK(ids.size(1) - w_min <= kMaxArgmax, "char_cnn: argmax is int16, so L − (narrowest width) must be <= ",
              kMaxArgmax, "; got L = ", ids.size(1), " with width ", w_min);
  // Never read outside the embedding: every id is checked before any lookup.
  const int64_t* p = ids.data_ptr<int64_t>();
  const int64_t V = emb.size(0), n = ids.numel();
  int64_t bad = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] < 0 || p[j] >= V) { bad = j; break; }
  }
  TORCH_CHECK(bad < 0, "char_cnn: character id ", (bad < 0 ? 0 : p[bad]), " at flat position ", bad,
              " is outside [0, ", V, ") (the embedding has ", V, " rows)");
}

// The filters of every width, converted once to the accumulation type and re-laid out as [F, w, E]
// so that one filter's taps for one time step are contiguous like the embedded characters x[t] (E wide).
template <typename acc_t>
struct Filters {
  std::vector<std::vector<acc_t>> w;  // w[i]: [F_i, w_i, E]
  std::vector<int64_t> F, width, offset;  // offset[i]: first output column of width i
  int64_t total = 0;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
Filters<acc_t> prepare_filters(at::TensorList weights) {
  Filters<acc_t> fs;
  for (const at::Tensor& wt : weights) {
    at::Tensor w = wt.contiguous();
    const int64_t F = w.size(0), E = w.size(1), W = w.size(2);
    const scalar_t* src = w.data_ptr<scalar_t>();
    std::vector<acc_t> dst(F * W * E);
    for (int64_t f = 0; f < F; ++f)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t k = 0; k < W; ++k) dst[(f * W + k) * E + e] = acc_t(src[(f * E + e) * W + k]);
    fs.w.push_back(std::move(dst));
    fs.F.push_back(F);
    fs.width.push_back(W);
    fs.offset.push_back(fs.total);
    fs.total += F;
  }
  return fs;
}

template <typename acc_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  at::Tensor c = t.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* p = c.data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

// Rows of the score tile S [P, F] a thread keeps per GEMM: ~512 KiB, so S and the patches stay in L2.
constexpr int64_t kTileBytes = 512 * 1024;

// A matrix view of a raw buffer, for at::mm_out. (at::native::cpublas::gemm's float overload is not
// exported from libtorch_cpu, so the GEMMs go through at::mm_out on views of per-thread buffers: the
// same MKL sgemm/dgemm, plus a few µs of dispatch per call.)
template <typename acc_t>
at::Tensor view(const acc_t* p, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// S [P, F] = patches [P, K] · filtersᵀ (filters [F, K], read transposed in place).
template <typename acc_t>
void gemm_patches_filters(const acc_t* patches, const acc_t* filters, acc_t* S, int64_t P, int64_t F, int64_t K) {
  at::Tensor c = view(S, P, F, F, 1);
  at::mm_out(c, view(patches, P, K, K, 1), view(filters, K, F, 1, K));
}

// Where each token's trailing run of one repeated id (its padding) begins: every window that lies
// wholly inside the run sees the same characters and scores the same, so only the first is computed,
// and it is also the first t of any tie among them. Exact; it saves most of the work on real words.
std::vector<int64_t> trailing_run_starts(const int64_t* ids, int64_t N, int64_t L) {
  std::vector<int64_t> r(N);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* tok = ids + n * L;
    int64_t t = L - 1;
    while (t > 0 && tok[t - 1] == tok[L - 1]) --t;
    r[n] = t;
  }
  return r;
}

template <typename scalar_t>
void forward_kernel(const int64_t* ids, const at::Tensor& emb_t, at::TensorList weights, at::TensorList biases,
                    Act act, scalar_t* out, int16_t* argmax, int64_t N, int64_t L) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t E = emb_t.size(1);
  const std::vector<acc_t> emb = to_acc<acc_t>(emb_t);
  const Filters<acc_t> fs = prepare_filters<scalar_t>(weights);
  std::vector<std::vector<acc_t>> bias;
  for (const at::Tensor& b : biases) bias.push_back(to_acc<acc_t>(b));
  const int64_t Ftot = fs.total;
  const std::vector<int64_t> run = trailing_run_starts(ids, N, L);

  // Enough tokens per thread to amortise starting threads (~4 MFLOP); one token for ELMo's 17.6 MFLOP.
  int64_t flops_per_token = 0;
  for (size_t i = 0; i < fs.w.size(); ++i) flops_per_token += 2 * fs.F[i] * fs.width[i] * E * (L - fs.width[i] + 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, flops_per_token));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(L * E);            // one token's embedded characters, (L, E)
    std::vector<acc_t> patches, S, best;    // (P, w·E) windows, (P, F) scores, (F,) running max
    std::vector<int32_t> best_t;  // int while computing; stored as int16
    for (size_t i = 0; i < fs.w.size(); ++i) {
      const int64_t F = fs.F[i], W = fs.width[i], K = W * E, T = L - W + 1;
      const int64_t P_max = std::min((end - begin) * T, std::max<int64_t>(T, kTileBytes / int64_t(sizeof(acc_t) * F)));
      patches.resize(P_max * K);
      S.resize(P_max * F);
      best.resize(F);
      best_t.resize(F);
      for (int64_t n0 = begin; n0 < end;) {
        // 1. Unfold the windows of as many tokens as fit the tile: row p of `patches` is x[t:t+w]
        //    flattened, which in the (L, E) layout is the K values starting at x[t].
        int64_t P = 0, n1 = n0;
        for (; n1 < end; ++n1) {
          const int64_t Tn = std::min(run[n1], T - 1) + 1;
          if (P + Tn > P_max) break;
          for (int64_t t = 0; t < L; ++t) {
            const acc_t* row = emb.data() + ids[n1 * L + t] * E;
            std::copy(row, row + E, x.data() + t * E);
          }
          for (int64_t t = 0; t < Tn; ++t) std::copy(x.data() + t * E, x.data() + t * E + K, patches.data() + (P + t) * K);
          P += Tn;
        }
        // 2. Every window against every filter of this width in one GEMM.
        gemm_patches_filters(patches.data(), fs.w[i].data(), S.data(), P, F, K);
        // 3. Per token, the max over its windows (first t on ties), + bias, activation.
        int64_t p0 = 0;
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t Tn = std::min(run[n], T - 1) + 1;
          const acc_t* s = S.data() + p0 * F;
          for (int64_t f = 0; f < F; ++f) { best[f] = s[f]; best_t[f] = 0; }
          for (int64_t t = 1; t < Tn; ++t) {
            const acc_t* st = s + t * F;
            for (int64_t f = 0; f < F; ++f) {  // branch-free, so that it vectorises
              // a NaN wins and stays, as in torch.max: NaN inputs give NaN outputs, not a silent max
              const bool gt = st[f] > best[f] || (st[f] != st[f] && best[f] == best[f]);
              best[f] = gt ? st[f] : best[f];
              best_t[f] = gt ? int32_t(t) : best_t[f];
            }
          }
          scalar_t* o = out + n * Ftot + fs.offset[i];
          int16_t* a = argmax + n * Ftot + fs.offset[i];
          const acc_t* b = bias[i].data();
          if (act == Act::Relu) {
            for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(std::max(best[f] + b[f], acc_t(0)));
          } else {
            for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(std::tanh(best[f] + b[f]));
          }
          for (int64_t f = 0; f < F; ++f) a[f] = static_cast<int16_t>(best_t[f]);
          p0 += Tn;
        }
        n0 = n1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> char_cnn_cpu(const at::Tensor& char_ids, const at::Tensor& embedding,
                                                at::TensorList weights, at::TensorList biases,
                                                c10::string_view activation) {
  const Act act = parse_activation(std::string(activation));
  TORCH_CHECK(weights.size() == biases.size(), "char_cnn: got ", weights.size(), " weights but ", biases.size(),
              " biases (one per filter width)");
  const at::Tensor ids = char_ids.contiguous();
  check_inputs(ids, embedding, weights);
  int64_t Ftot = 0;
  for (size_t i = 0; i < biases.size(); ++i) {
    TORCH_CHECK(biases[i].dim() == 1 && biases[i].size(0) == weights[i].size(0), "char_cnn: biases[", i,
                "] must have shape [", weights[i].size(0), "], got ", biases[i].sizes());
    TORCH_CHECK(biases[i].scalar_type() == embedding.scalar_type(), "char_cnn: biases[", i, "] is ",
                biases[i].scalar_type(), " but the embedding is ", embedding.scalar_type());
    TORCH_CHECK(biases[i].device() == embedding.device(), "char_cnn: biases[", i, "] is not on the embedding's device");
    Ftot += weights[i].size(0);
  }
  const int64_t N = ids.size(0), L = ids.size(1);
  at::Tensor out = at::empty({N, Ftot}, embedding.options());
  at::Tensor argmax = at::empty({N, Ftot}, embedding.options().dtype(at::kShort));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embedding.scalar_type(), "char_cnn_cpu", [&] {
    forward_kernel<scalar_t>(ids.data_ptr<int64_t>(), embedding, weights, biases, act, out.data_ptr<scalar_t>(),
                             argmax.data_ptr<int16_t>(), N, L);
  });
  return {out, argmax};
}

// The backward, by character id. Both gradients read the characters only through their ids:
//   dW_f[k, :]      = Σ_n g'_nf · emb[id(n, t*_nf + k)]               = Σ_v H_f[k, v] · emb[v]
//   dembedding[v]   = Σ_{n,f,k: id(n, t*_nf + k) = v} g'_nf · W_f[k]   = Σ_{f,k} H_f[k, v] · W_f[k]
// with H_f[k, v] = Σ_n g'_nf · [id(n, t*_nf + k) = v], a histogram of the gradient by character id.
// So one pass over (token, filter) adds w scalars into H (instead of 2·w·E multiply-adds into dW and
// dx), and two small products per chunk of filters (H·emb for dW, Hᵀ·W for dembedding) finish the
// job. H for a chunk of C filters is C·w × V. Extra memory: a few MiB, whatever N.
// Parallel over chunks of filters; each chunk owns its dW rows and bias entries (no races), and its
// dembedding contribution goes into the partial buffer of its group: the chunks in a fixed number of
// consecutive groups, set by the shapes alone. The partials are summed in group order, so the result is
// the same run after run and on any number of threads (a resumed run on another machine trains on).
constexpr int64_t kChunkTaps = 448;       // C·w per chunk: chunks of equal work whatever the width
constexpr int64_t kHistFloats = 1 << 20;  // at most 4 MiB of histogram per chunk (large V: smaller C)
constexpr int64_t kGroups = 32;           // partial dembedding buffers: enough groups to share among threads,
constexpr int64_t kPartialFloats = 1 << 24;  // ... within 64 MiB of them (large V·E: fewer groups)

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out_t, const int64_t* ids, const at::Tensor& emb_t,
                     at::TensorList weights, const at::Tensor& out_t, const int16_t* argmax, Act act,
                     at::Tensor& grad_emb_t, std::vector<at::Tensor>& grad_w_t, at::Tensor& grad_b_t, int64_t N,
                     int64_t L) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t V = emb_t.size(0), E = emb_t.size(1);
  const std::vector<acc_t> emb = to_acc<acc_t>(emb_t);
  const Filters<acc_t> fs = prepare_filters<scalar_t>(weights);
  const int64_t Ftot = fs.total;
  const scalar_t* gout = grad_out_t.data_ptr<scalar_t>();
  const scalar_t* out = out_t.data_ptr<scalar_t>();
  scalar_t* grad_b = grad_b_t.data_ptr<scalar_t>();

  struct Chunk { int64_t i, f0, f1; };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < fs.F.size(); ++i) {
    const int64_t W = fs.width[i];
    const int64_t C = std::max<int64_t>(1, std::min(kChunkTaps / W, kHistFloats / (W * V)));
    for (int64_t f0 = 0; f0 < fs.F[i]; f0 += C) chunks.push_back({int64_t(i), f0, std::min(fs.F[i], f0 + C)});
  }
  const int64_t n_chunks = int64_t(chunks.size());
  const int64_t n_groups =
      std::max<int64_t>(1, std::min({n_chunks, kGroups, kPartialFloats / std::max<int64_t>(1, V * E)}));
  std::vector<std::vector<acc_t>> ge_partial(n_groups);  // group g: chunks [g·n/G, (g+1)·n/G)

  // Small problems (fewer than ~64k token-filter pairs) run on the calling thread alone.
  const int64_t grain = N * Ftot < (int64_t(1) << 16) ? n_groups : 1;
  at::parallel_for(0, n_groups, grain, [&](int64_t g_begin, int64_t g_end) {
    std::vector<acc_t> H, dw, db;
    for (int64_t grp = g_begin; grp < g_end; ++grp) {
      std::vector<acc_t>& ge = ge_partial[grp];
      ge.assign(V * E, acc_t(0));
      for (int64_t ch = grp * n_chunks / n_groups; ch < (grp + 1) * n_chunks / n_groups; ++ch) {
        const int64_t i = chunks[ch].i, f0 = chunks[ch].f0, f1 = chunks[ch].f1;
        const int64_t W = fs.width[i], T = L - W + 1, C = f1 - f0, off = fs.offset[i];
        H.assign(C * W * V, acc_t(0));
        db.assign(C, acc_t(0));
        for (int64_t n = 0; n < N; ++n) {
          const int64_t row = n * Ftot + off;
          const int64_t* tok_n = ids + n * L;
          for (int64_t f = f0; f < f1; ++f) {
            const int t = argmax[row + f];
            TORCH_CHECK(t >= 0 && t < T, "char_cnn_backward: argmax ", t, " is outside [0, ", T, ") for width ", W);
            const acc_t g = acc_t(gout[row + f]), y = acc_t(out[row + f]);
            // g' = grad_out · act'(out), the gradient at the pre-activation max (relu: a NaN out passes g,
            // as torch's relu backward does: zero only where out <= 0)
            const acc_t gp = act == Act::Relu ? (y <= acc_t(0) ? acc_t(0) : g) : g * (acc_t(1) - y * y);
            // no skip on gp == 0: relu zeroes about half at random, and a mispredicted branch costs
            // more than the w additions of zero it would save
            db[f - f0] += gp;
            acc_t* h = H.data() + (f - f0) * W * V;
            const int64_t* tok = tok_n + t;
            for (int64_t k = 0; k < W; ++k) h[k * V + tok[k]] += gp;
          }
        }
        for (int64_t f = f0; f < f1; ++f) grad_b[off + f] = scalar_t(db[f - f0]);
        // dW [C·w, E] = H [C·w, V] · emb [V, E] and dembedding [V, E] += Hᵀ [V, C·w] · W [C·w, E]. Plain
        // loops, not BLAS: H is sparse (only the ids that occur), the products are small, and this runs
        // on the autograd engine's thread, where every BLAS call would start and sync its own threads.
        dw.assign(C * W * E, acc_t(0));
        const acc_t* wc = fs.w[i].data() + f0 * W * E;  // this chunk's filters, [C·w, E]
        for (int64_t r = 0; r < C * W; ++r) {
          const acc_t* h = H.data() + r * V;
          acc_t* d = dw.data() + r * E;
          for (int64_t v = 0; v < V; ++v) {
            const acc_t hv = h[v];
            if (hv == acc_t(0)) continue;
            const acc_t* x = emb.data() + v * E;
            const acc_t* wr = wc + r * E;
            acc_t* g = ge.data() + v * E;
            for (int64_t e = 0; e < E; ++e) {
              d[e] += hv * x[e];
              g[e] += hv * wr[e];
            }
          }
        }
        scalar_t* dst = grad_w_t[i].data_ptr<scalar_t>();  // [F, E, w]
        for (int64_t f = f0; f < f1; ++f)
          for (int64_t e = 0; e < E; ++e)
            for (int64_t k = 0; k < W; ++k) dst[(f * E + e) * W + k] = scalar_t(dw[((f - f0) * W + k) * E + e]);
      }
    }
  });
  std::vector<acc_t> ge(V * E, acc_t(0));
  for (const auto& part : ge_partial)
    for (size_t j = 0; j < part.size(); ++j) ge[j] += part[j];
  scalar_t* grad_emb = grad_emb_t.data_ptr<scalar_t>();
  for (int64_t j = 0; j < V * E; ++j) grad_emb[j] = scalar_t(ge[j]);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> char_cnn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& char_ids, const at::Tensor& embedding, at::TensorList weights,
    const at::Tensor& out, const at::Tensor& argmax, c10::string_view activation) {
  const Act act = parse_activation(std::string(activation));
  const at::Tensor ids = char_ids.contiguous();
  check_inputs(ids, embedding, weights);
  const int64_t N = ids.size(0), L = ids.size(1);
  int64_t Ftot = 0;
  for (const at::Tensor& w : weights) Ftot += w.size(0);
  for (const at::Tensor* t : {&grad_out, &out, &argmax})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == Ftot,
                "char_cnn_backward: grad_out, out and argmax must have shape [", N, ", ", Ftot, "], got ", t->sizes());
  TORCH_CHECK(grad_out.scalar_type() == embedding.scalar_type() && out.scalar_type() == embedding.scalar_type(),
              "char_cnn_backward: grad_out and out must have the embedding's dtype ", embedding.scalar_type());
  TORCH_CHECK(argmax.scalar_type() == at::kShort, "char_cnn_backward: argmax must be int16, got ", argmax.scalar_type());
  const at::Tensor am = argmax.contiguous();
  at::Tensor grad_emb = at::empty_like(embedding, at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> grad_w;
  for (const at::Tensor& w : weights) grad_w.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
  at::Tensor grad_b = at::empty({Ftot}, embedding.options());
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embedding.scalar_type(), "char_cnn_backward_cpu", [&] {
    backward_kernel<scalar_t>(go, ids.data_ptr<int64_t>(), embedding, weights, o, am.data_ptr<int16_t>(), act,
                              grad_emb, grad_w, grad_b, N, L);
  });
  return {grad_emb, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) {
  m.impl("char_cnn", &char_cnn_cpu);
  m.impl("char_cnn_backward", &char_cnn_backward_cpu);
}

}  // namespace minilm
