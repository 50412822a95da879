// The op schemas of the `minilm` namespace, and the Python module that carries them.
//
// Each kernel file adds its implementation with TORCH_LIBRARY_IMPL(minilm, CPU|CUDA, m);
// minilm/ops/*.py registers the fake (meta) functions and the autograd formulas (causal_attention's is in
// C++, attention_autograd.cpp).
// A schema `float` is a C++ double; `int` an int64_t.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(minilm, m) {
  // out [B,H,T,D] (input dtype; [B,T,H,D] in memory when q is, see attention_layout.h), lse [B,H,T] (fp32;
  // fp64 for fp64 inputs): row log-sum-exp of scale·QKᵀ.
  // dropout_p > 0: the probabilities are dropped out with the mask of csrc/attention_dropout.h, made from
  // seed (int64 [2] on the CPU: two 32-bit words); lse stays that of the undropped scores.
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale, float dropout_p=0., Tensor? seed=None) "
        "-> (Tensor out, Tensor lse)");
  // -> dq, dk, dv (laid out as the forward's out; the same dropout_p and seed as the forward)
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale, float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor, Tensor)");

  // ELMo's character CNN, fused: embedding lookup -> every width's 1-D convolution -> max over time
  // -> + bias -> activation ("relu" | "tanh"). char_ids [N, L] int64; embedding [V, E];
  // weights[i] [F_i, E, W_i]; biases[i] [F_i].
  // out [N, sum F_i] (embedding's dtype); argmax [N, sum F_i] int16, the time step of each max
  // (so L − the narrowest width must be <= 32,767).
  m.def("char_cnn(Tensor char_ids, Tensor embedding, Tensor[] weights, Tensor[] biases, str activation) "
        "-> (Tensor out, Tensor argmax)");
  // -> grad_embedding [V, E], grad_weights (one per width), grad_bias [sum F_i] (split per width in Python)
  m.def("char_cnn_backward(Tensor grad_out, Tensor char_ids, Tensor embedding, Tensor[] weights, Tensor out, "
        "Tensor argmax, str activation) -> (Tensor, Tensor[], Tensor)");
}

// An empty Python module: importing it loads this library, and loading it runs the registrations.
// TORCH_EXTENSION_NAME is `_C` when setup.py builds it and `minilm_C` when the JIT does.
#define MINILM_CONCAT2(a, b) a##b
#define MINILM_CONCAT(a, b) MINILM_CONCAT2(a, b)
#define MINILM_STR2(a) #a
#define MINILM_STR(a) MINILM_STR2(a)

extern "C" PyMODINIT_FUNC MINILM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, MINILM_STR(TORCH_EXTENSION_NAME),
                                      "minilm's compiled ops (registered under torch.ops.minilm)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
