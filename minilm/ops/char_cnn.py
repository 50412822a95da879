"""ELMo's character CNN, fused: the op, its reference, and its registration with torch.library.

ELMo's token encoder (Peters et al. 2018; Kim et al. 2016's char-CNN) turns each token's characters
into one vector: embed the L character ids, run one VALID 1-D convolution per filter width w_i
(F_i filters each), take the max over time, add the bias, apply the activation and concatenate:

    x      = embedding[char_ids]                                      # (N, L, E)
    s_i    = conv1d(x, weights[i])                                    # (N, F_i, L - w_i + 1)
    out_i  = act(max_t s_i[:, :, t] + biases[i])                      # (N, F_i)
    out    = cat_i out_i                                              # (N, sum F_i)

The bias is added after the max and the activation applied after it: both are exact because a
per-filter constant does not move the max and relu/tanh are monotonic.

The composite materialises s_i — (N, sum F_i, L - w + 1), 92,128 floats per token for ELMo's
filters — only to take its max. The kernels (csrc/cpu/char_cnn.cpp, csrc/cuda/) keep a running max
and its position t* instead (argmax, int16: half the memory of int32; it needs L - w <= 32,767), and
the backward sends the gradient through t* only:

    g'        = grad_out · act'(out)            (relu: out > 0;  tanh: 1 - out²)
    dW_f     += g' · x[t*:t*+w]                 dx[t*:t*+w] += g' · W_f                db_f += g'

with dx scattered into grad_embedding by character id. Here, in Python: the input checks, the fake
(shape) functions that torch.compile needs, and the autograd formula that calls the backward op.
"""
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from minilm.ops._checks import autocast_casts, check_one_device, forbid_double_backward, id_range

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACTIVATIONS = ("relu", "tanh")
MAX_ARGMAX = torch.iinfo(torch.int16).max  # argmax (t* in [0, L - w]) is stored as int16


def char_cnn_reference(char_ids, embedding, weights, biases, activation="relu"):
    """The math, step by step, in plain PyTorch: what the fused kernel must equal.

    char_ids [N, L] int64; embedding [V, E]; weights[i] [F_i, E, w_i]; biases[i] [F_i] -> [N, sum F_i].
    Materialises every (N, F_i, L - w_i + 1) convolution output.
    """
    act = {"relu": torch.relu, "tanh": torch.tanh}[activation]
    x = F.embedding(char_ids, embedding).transpose(1, 2)  # (N, E, L): Conv1d wants channels first
    outs = []
    for w, b in zip(weights, biases):
        s = F.conv1d(x, w)  # (N, F_i, L - w_i + 1)
        # .max (not .amax): its gradient goes to one position, the first on ties, like the kernel's.
        s = s.max(dim=-1).values  # (N, F_i)
        outs.append(act(s + b))
    return torch.cat(outs, dim=-1)  # (N, sum F_i)


def _check(char_ids, embedding, weights, biases, activation):
    name = "char_cnn"
    if not isinstance(char_ids, torch.Tensor) or not isinstance(embedding, torch.Tensor):
        raise TypeError(f"{name}: char_ids and embedding must be torch.Tensors")
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError(f"{name}: weights and biases must be lists of tensors")
    if len(weights) == 0:
        raise ValueError(f"{name}: weights must hold at least one filter width")
    if len(weights) != len(biases):
        raise ValueError(f"{name}: got {len(weights)} weights but {len(biases)} biases (one per filter width)")
    if not all(isinstance(t, torch.Tensor) for t in (*weights, *biases)):
        raise TypeError(f"{name}: weights and biases must hold only torch.Tensors")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if char_ids.dtype != torch.int64:
        raise TypeError(f"{name}: char_ids must be int64, got {char_ids.dtype}")
    if char_ids.dim() != 2:
        raise ValueError(f"{name}: char_ids must be 2-D [N, L] (flatten any batch dims first), "
                         f"got shape {tuple(char_ids.shape)}")
    if embedding.dim() != 2:
        raise ValueError(f"{name}: embedding must be 2-D [V, E], got shape {tuple(embedding.shape)}")
    dtype = embedding.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: embedding must have a floating dtype, got {dtype}")
    V, E = embedding.shape
    if V == 0:
        raise ValueError(f"{name}: the embedding has no rows")
    if E == 0:
        raise ValueError(f"{name}: the embedding has no columns (E = 0)")
    L = char_ids.shape[1]
    mixed_ok = autocast_casts(embedding.device, [embedding.dtype] + [t.dtype for t in (*weights, *biases)])
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 3:
            raise ValueError(f"{name}: weights[{i}] must be 3-D [F, E, w], got shape {tuple(w.shape)}")
        if w.shape[1] != E:
            raise ValueError(f"{name}: weights[{i}] has {w.shape[1]} input channels but the embedding "
                             f"width is {E}")
        if w.shape[2] < 1 or w.shape[0] < 1:
            raise ValueError(f"{name}: weights[{i}] has an empty dimension: shape {tuple(w.shape)}")
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(f"{name}: biases[{i}] must have shape [{w.shape[0]}], got {tuple(b.shape)}")
        if (w.dtype != dtype or b.dtype != dtype) and not mixed_ok:
            raise TypeError(f"{name}: embedding, weights and biases must share one floating dtype; "
                            f"embedding is {dtype}, weights[{i}] {w.dtype}, biases[{i}] {b.dtype}")
        if w.device != embedding.device or b.device != embedding.device:
            raise ValueError(f"{name}: all tensors must be on one device; embedding is on {embedding.device}, "
                             f"weights[{i}] on {w.device}, biases[{i}] on {b.device}")
    if char_ids.device != embedding.device:
        raise ValueError(f"{name}: char_ids and embedding must be on one device, got {char_ids.device} and {embedding.device}")
    w_max = max(w.shape[2] for w in weights)
    if L < w_max:
        raise ValueError(f"{name}: tokens have {L} characters, fewer than the widest filter ({w_max})")
    w_min = min(w.shape[2] for w in weights)
    if L - w_min > MAX_ARGMAX:
        raise ValueError(f"{name}: argmax is int16, so L - (narrowest width) must be <= {MAX_ARGMAX}; "
                         f"got L = {L} with width {w_min}")
    # Reading the ids' range needs their values: skipped while torch.compile traces and for meta tensors, which
    # have none (the C++ glue checks it too).
    if char_ids.numel() > 0 and not torch.compiler.is_compiling() and not char_ids.is_meta:
        lo, hi = id_range(char_ids)
        if lo < 0 or hi >= V:
            raise IndexError(f"{name}: character ids must lie in [0, {V}) (the embedding has {V} rows), "
                             f"got ids in [{lo}, {hi}]")


def char_cnn(char_ids, embedding, weights, biases, activation="relu"):
    """Fused char-CNN. char_ids [N, L] int64; embedding [V, E]; weights[i] [F_i, E, w_i]; biases[i] [F_i].

    Returns [N, sum F_i] in the embedding's dtype. Differentiable in embedding, weights and biases.
    """
    _check(char_ids, embedding, weights, biases, activation)
    # torch.library's autograd formula is reverse-mode only: under forward-mode AD the output would silently
    # carry no tangent (causal_attention's C++ formula raises by itself)
    if not torch.compiler.is_compiling() and any(
            forward_ad.unpack_dual(t).tangent is not None for t in (embedding, *weights, *biases)):
        raise NotImplementedError("char_cnn: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported; "
                                  "differentiate in reverse mode (backward)")
    out, _ = torch.ops.minilm.char_cnn(char_ids, embedding, list(weights), list(biases), activation)
    return out


@torch.library.register_fake("minilm::char_cnn")
def _(char_ids, embedding, weights, biases, activation):
    check_one_device("char_cnn", {"char_ids": char_ids, "embedding": embedding, "weights": weights,
                                  "biases": biases})
    n_filters = sum(w.shape[0] for w in weights)
    out = embedding.new_empty((char_ids.shape[0], n_filters))
    return out, embedding.new_empty((char_ids.shape[0], n_filters), dtype=torch.int16)


@torch.library.register_fake("minilm::char_cnn_backward")
def _(grad_out, char_ids, embedding, weights, out, argmax, activation):
    check_one_device("char_cnn_backward", {"grad_out": grad_out, "char_ids": char_ids, "embedding": embedding,
                                           "weights": weights, "out": out, "argmax": argmax})
    return (torch.empty_like(embedding, memory_format=torch.contiguous_format),
            [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights],
            embedding.new_empty((out.shape[1],)))


def _setup_context(ctx, inputs, output):
    char_ids, embedding, weights, biases, activation = inputs
    out, argmax = output
    ctx.save_for_backward(char_ids, embedding, out, argmax, *weights)
    ctx.activation = activation
    ctx.filter_counts = [w.shape[0] for w in weights]
    ctx.mark_non_differentiable(argmax)
    # No zero-filled stand-in for argmax's gradient: an [N, sum F] int16 tensor (half the fp32 output)
    # allocated on every backward only to be ignored.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_argmax):
    # argmax is an integer by-product (non-differentiable), so grad_argmax is ignored (None).
    char_ids, embedding, out, argmax, *weights = ctx.saved_tensors
    if grad_out is None:  # not materialised: nothing downstream used the output
        n = len(ctx.filter_counts)
        return None, None, [None] * n, [None] * n, None
    grad_embedding, grad_weights, grad_bias = torch.ops.minilm.char_cnn_backward(
        grad_out, char_ids, embedding, weights, out, argmax, ctx.activation)
    grad_biases = list(torch.split(grad_bias, ctx.filter_counts))
    return None, grad_embedding, list(grad_weights), grad_biases, None


torch.library.register_autograd("minilm::char_cnn", _backward, setup_context=_setup_context)
forbid_double_backward("minilm::char_cnn_backward", "char_cnn")
