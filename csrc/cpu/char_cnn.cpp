// ELMo's character CNN on the CPU, fused — first, plain version (direct loops).
//
// What it computes: for each token n (a row of L character ids), x = embedding[ids] (L × E); for each
// filter width w_i and each of its F_i filters f, the VALID convolution s[t] = Σ_{k<w, e<E} W[f,e,k]·x[t+k,e]
// for t = 0 … L−w; out[n, f] = act(max_t s[t] + b[f]) and argmax[n, f] = the first t of that max.
// What it keeps: only out and argmax (one int per token and filter) — never the (L−w+1)-long maps.
// Backward, through t* only: g' = grad_out·act'(out) (relu: out > 0; tanh: 1 − out²);
//   dW_f[e,k] += g'·x[t*+k, e];   dx[t*+k, e] += g'·W_f[e,k];   db_f += g';   dembedding[id] += dx.
// Race-free and deterministic without atomics: dW and db are computed in parallel over filters (each
// filter's sum runs over tokens in order); dx in parallel over tokens (each token owns its rows), then
// scattered into dembedding by one loop in token order. fp32 and bf16 accumulate in fp32; fp64 in fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace minilm {
namespace {

enum class Act { Relu, Tanh };

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
  TORCH_CHECK(ids.device() == emb.device(), "char_cnn: char_ids and embedding must be on one device");
  int64_t w_max = 0;
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
  }
  TORCH_CHECK(ids.size(1) >= w_max, "char_cnn: tokens have ", ids.size(1),
              " characters, fewer than the widest filter (", w_max, ")");
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

template <typename scalar_t>
void forward_kernel(const int64_t* ids, const at::Tensor& emb_t, at::TensorList weights, at::TensorList biases,
                    Act act, scalar_t* out, int32_t* argmax, int64_t N, int64_t L) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t E = emb_t.size(1);
  const std::vector<acc_t> emb = to_acc<acc_t>(emb_t);
  const Filters<acc_t> fs = prepare_filters<scalar_t>(weights);
  std::vector<std::vector<acc_t>> bias;
  for (const at::Tensor& b : biases) bias.push_back(to_acc<acc_t>(b));
  const int64_t Ftot = fs.total;

  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(L * E);  // this token's embedded characters, (L, E)
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t t = 0; t < L; ++t) {
        const acc_t* row = emb.data() + ids[n * L + t] * E;
        std::copy(row, row + E, x.data() + t * E);
      }
      for (size_t i = 0; i < fs.w.size(); ++i) {
        const int64_t W = fs.width[i], T = L - W + 1, K = W * E;
        for (int64_t f = 0; f < fs.F[i]; ++f) {
          const acc_t* wf = fs.w[i].data() + f * K;  // (w, E)
          acc_t best = -std::numeric_limits<acc_t>::infinity();
          int32_t best_t = 0;
          for (int64_t t = 0; t < T; ++t) {
            const acc_t* xt = x.data() + t * E;  // the window x[t:t+w] is K contiguous values
            acc_t s = 0;
            for (int64_t j = 0; j < K; ++j) s += wf[j] * xt[j];
            if (s > best) { best = s; best_t = int32_t(t); }  // strict: the first t wins ties
          }
          acc_t y = best + bias[i][f];
          y = act == Act::Relu ? std::max(y, acc_t(0)) : std::tanh(y);
          out[n * Ftot + fs.offset[i] + f] = scalar_t(y);
          argmax[n * Ftot + fs.offset[i] + f] = best_t;
        }
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
  at::Tensor argmax = at::empty({N, Ftot}, embedding.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embedding.scalar_type(), "char_cnn_cpu", [&] {
    forward_kernel<scalar_t>(ids.data_ptr<int64_t>(), embedding, weights, biases, act, out.data_ptr<scalar_t>(),
                             argmax.data_ptr<int32_t>(), N, L);
  });
  return {out, argmax};
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out_t, const int64_t* ids, const at::Tensor& emb_t,
                     at::TensorList weights, const at::Tensor& out_t, const int32_t* argmax, Act act,
                     at::Tensor& grad_emb_t, std::vector<at::Tensor>& grad_w_t, at::Tensor& grad_b_t, int64_t N,
                     int64_t L) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t V = emb_t.size(0), E = emb_t.size(1);
  const std::vector<acc_t> emb = to_acc<acc_t>(emb_t);
  const Filters<acc_t> fs = prepare_filters<scalar_t>(weights);
  const int64_t Ftot = fs.total;
  const scalar_t* gout = grad_out_t.data_ptr<scalar_t>();
  const scalar_t* out = out_t.data_ptr<scalar_t>();
  // g' = grad_out · act'(out), the gradient at the pre-activation max.
  auto gprime = [&](int64_t idx) -> acc_t {
    const acc_t g = acc_t(gout[idx]), y = acc_t(out[idx]);
    return act == Act::Relu ? (y > acc_t(0) ? g : acc_t(0)) : g * (acc_t(1) - y * y);
  };
  // Which width owns global filter column c.
  std::vector<int64_t> width_of(Ftot);
  for (size_t i = 0; i < fs.F.size(); ++i)
    for (int64_t f = 0; f < fs.F[i]; ++f) width_of[fs.offset[i] + f] = int64_t(i);

  // dW and db: parallel over filters, each summing over tokens in order (deterministic, no races).
  scalar_t* grad_b = grad_b_t.data_ptr<scalar_t>();
  at::parallel_for(0, Ftot, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dw;  // one filter's gradient, [w, E]
    for (int64_t c = begin; c < end; ++c) {
      const int64_t i = width_of[c], f = c - fs.offset[i], W = fs.width[i];
      dw.assign(W * E, acc_t(0));
      acc_t db = 0;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t g = gprime(n * Ftot + c);
        if (g == acc_t(0)) continue;
        db += g;
        const int64_t* tok = ids + n * L + argmax[n * Ftot + c];
        for (int64_t k = 0; k < W; ++k) {
          const acc_t* xk = emb.data() + tok[k] * E;
          for (int64_t e = 0; e < E; ++e) dw[k * E + e] += g * xk[e];
        }
      }
      grad_b[c] = scalar_t(db);
      scalar_t* dst = grad_w_t[i].data_ptr<scalar_t>() + f * E * W;  // [E, w]
      for (int64_t e = 0; e < E; ++e)
        for (int64_t k = 0; k < W; ++k) dst[e * W + k] = scalar_t(dw[k * E + e]);
    }
  });

  // dx per token (parallel over tokens: each owns its L × E rows), then one ordered scatter by id.
  std::vector<acc_t> dx(N * L * E, acc_t(0));
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* dxn = dx.data() + n * L * E;
      for (int64_t c = 0; c < Ftot; ++c) {
        const acc_t g = gprime(n * Ftot + c);
        if (g == acc_t(0)) continue;
        const int64_t i = width_of[c], f = c - fs.offset[i], K = fs.width[i] * E;
        const acc_t* wf = fs.w[i].data() + f * K;  // (w, E), matching dx[t*:t*+w]
        acc_t* d = dxn + argmax[n * Ftot + c] * E;
        for (int64_t j = 0; j < K; ++j) d[j] += g * wf[j];
      }
    }
  });
  std::vector<acc_t> ge(V * E, acc_t(0));
  for (int64_t r = 0; r < N * L; ++r) {
    acc_t* dst = ge.data() + ids[r] * E;
    const acc_t* src = dx.data() + r * E;
    for (int64_t e = 0; e < E; ++e) dst[e] += src[e];
  }
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
  TORCH_CHECK(argmax.scalar_type() == at::kInt, "char_cnn_backward: argmax must be int32, got ", argmax.scalar_type());
  const at::Tensor am = argmax.contiguous();
  {  // the positions come from the forward, but a foreign tensor must not make us read out of bounds
    const int32_t* a = am.data_ptr<int32_t>();
    int64_t c = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t T = L - weights[i].size(2) + 1, F = weights[i].size(0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t f = 0; f < F; ++f) {
          const int32_t t = a[n * Ftot + c + f];
          TORCH_CHECK(t >= 0 && t < T, "char_cnn_backward: argmax ", t, " is outside [0, ", T, ") for width ",
                      weights[i].size(2));
        }
      c += F;
    }
  }
  at::Tensor grad_emb = at::empty_like(embedding, at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> grad_w;
  for (const at::Tensor& w : weights) grad_w.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
  at::Tensor grad_b = at::empty({Ftot}, embedding.options());
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embedding.scalar_type(), "char_cnn_backward_cpu", [&] {
    backward_kernel<scalar_t>(go, ids.data_ptr<int64_t>(), embedding, weights, o, am.data_ptr<int32_t>(), act,
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
