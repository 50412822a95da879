"""Causal self-attention: the fused op, its reference, and its registration with torch.library.

The C++/CUDA kernels (csrc/cpu/attention.cpp, csrc/cuda/) compute, for q, k, v of shape [B, H, T, D],

    out = softmax(scale · q kᵀ + causal mask) v          (the T×T matrix is never stored)
    lse = logsumexp(scale · q kᵀ + causal mask, dim=-1)  (saved for the backward)

and the backward op recomputes the probabilities from lse (FlashAttention, Dao et al. 2022).
With dropout_p > 0 the probabilities are dropped out after the softmax, as nn.Dropout on them would,
from a mask that is never stored either: every kernel regenerates it from a hash of (seed, batch·head,
query, key) -- csrc/attention_dropout.h, spelled out in PyTorch by dropout_keep_mask below.
Here, in Python: the input checks and the fake (shape) functions that torch.compile needs. The autograd
formula, which calls the backward op, is registered in C++ (csrc/attention_autograd.cpp).
"""
import math

import torch

from minilm.ops._checks import autocast_casts, check_one_device

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- attention dropout's mask, the steps of csrc/attention_dropout.h on uint32 values held in int64 tensors
_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """x · c mod 2³² for x in [0, 2³²) and a 32-bit constant c, without overflowing int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(dropout_p):
    """p -> (threshold, scale): a 16-bit uniform number u keeps its probability iff u >= threshold, and kept
    probabilities are multiplied by scale = 65536 / (65536 − threshold) (0 when everything is dropped)."""
    threshold = min(max(int(dropout_p * 65536.0 + 0.5), 0), 65536)
    return threshold, (0.0 if threshold == 65536 else 65536.0 / (65536 - threshold))


def dropout_keep_mask(seed, B, H, T, dropout_p, device=None):
    """(B, H, T, T) bool: which attention probabilities the kernels keep for this seed (an int64 tensor of two
    32-bit words). Entry [b, h, i, j] depends only on (seed, b·H + h, i, j), not on how a kernel tiles."""
    seed = seed.to(device="cpu", dtype=torch.int64).reshape(-1)
    seed0, seed1 = int(seed[0]) & _M32, int(seed[1]) & _M32
    bh = torch.arange(B * H, dtype=torch.int64, device=device)
    head = _mix32(seed0 ^ _mix32(seed1 ^ _mul32(bh, 0x85EBCA6B)))  # (BH,)
    i = torch.arange(T, dtype=torch.int64, device=device)
    row = _mix32(head[:, None] ^ _mul32(i, 0x9E3779B9)[None, :])  # (BH, T): one key per query row
    bits = _mix32(row[:, :, None] ^ (i >> 1)[None, None, :])  # (BH, T, T): one hash per pair of keys
    u16 = torch.where((i & 1).bool()[None, None, :], bits >> 16, bits & 0xFFFF)
    return (u16 >= dropout_threshold(dropout_p)[0]).view(B, H, T, T)


def causal_attention_reference(q, k, v, scale=None, dropout_p=0.0, seed=None):
    """The math, step by step: what the fused kernel must equal. Materialises the (B, H, T, T) scores
    (and, with dropout, the mask)."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    att = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_p > 0:
        if seed is None:
            raise ValueError("causal_attention_reference: dropout_p > 0 needs the seed (int64 CPU tensor of 2 elements)")
        keep = dropout_keep_mask(seed, B, H, T, dropout_p, q.device)  # (B, H, T, T)
        att = att * keep * dropout_threshold(dropout_p)[1]
    return (att @ v.to(ct)).to(q.dtype)  # (B, H, T, D)


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"causal_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"causal_attention: q, k, v must be 4-D [B, H, T, D], got q of shape {tuple(q.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError("causal_attention: q, k, v must have the same shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    mixed = k.dtype != q.dtype or v.dtype != q.dtype   # allowed where autocast will cast them to one dtype
    if q.dtype not in _FLOAT_DTYPES or (mixed and not autocast_casts(q.device, (q.dtype, k.dtype, v.dtype))):
        raise TypeError(f"causal_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"causal_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] < 1:
        raise ValueError("causal_attention: the head dim D (last dim) must be at least 1")


def _check_dropout(dropout_p, seed):
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"causal_attention: dropout_p must be in [0, 1], got {dropout_p}")
    if seed is not None and (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 2
                             or seed.device.type != "cpu"):
        raise ValueError("causal_attention: seed must be an int64 CPU tensor of 2 elements")


def causal_attention(q, k, v, scale=None, dropout_p=0.0, seed=None):
    """Fused causal self-attention. q, k, v: [B, H, T, D]; scale defaults to 1/sqrt(D). Returns [B, H, T, D],
    laid out [B, T, H, D] in memory when q is (q = x.view(B, T, H, D).transpose(1, 2), as in GPT-1: then
    out.transpose(1, 2) is contiguous, as with SDPA), else contiguous. The gradients of q, k, v lie like out.

    dropout_p > 0 drops attention probabilities (after the softmax) with that probability and scales the
    rest by 1 / (1 − p), as nn.Dropout on them would (exactly: p is rounded to a multiple of 1/65536 and the
    scale is the inverse of the rounded keep rate, see dropout_threshold). The mask comes from `seed` (an
    int64 CPU tensor of two 32-bit words; by default drawn from torch's CPU generator, so torch.manual_seed
    makes it reproducible). The same seed gives the same mask: pass a new one to every call (every layer).
    The seed is read when the op is called, so a captured CUDA graph replays the mask of its capture."""
    _check(q, k, v)
    for name, x in (("scale", scale), ("dropout_p", dropout_p)):
        if isinstance(x, (str, bytes)):   # float() would take "0.5" as the number
            raise TypeError(f"causal_attention: {name} must be a number, got {type(x).__name__} {x!r}")
    dropout_p = float(dropout_p)
    _check_dropout(dropout_p, seed)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0 and seed is None:
        seed = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    out, _ = torch.ops.minilm.causal_attention(q, k, v, scale, dropout_p, seed if dropout_p > 0 else None)
    return out


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_result(q):
    """An uninitialised result (out; dq, dk, dv) laid out as the kernels write it (csrc/attention_layout.h):
    [B, T, H, D] in memory when q is (heads closer together than rows, as in GPT-1 and in SDPA's results),
    else contiguous [B, H, T, D]. The fake functions must give exactly the kernels' strides."""
    B, H, T, D = q.shape
    if H > 1 and T > 1 and q.stride(1) < q.stride(2):
        return q.new_empty_strided((B, H, T, D), (T * H * D, D, H * D, 1))
    return q.new_empty_strided((B, H, T, D), (H * T * D, T * D, D, 1))


@torch.library.register_fake("minilm::causal_attention")
def _(q, k, v, scale, dropout_p=0.0, seed=None):
    _check(q, k, v)  # so that torch.compile reports bad inputs at trace time, as eager does
    check_one_device("causal_attention", {"q": q, "k": k, "v": v}, seed)
    return _empty_result(q), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("minilm::causal_attention_backward")
def _(grad_out, q, k, v, out, lse, scale, dropout_p=0.0, seed=None):
    check_one_device("causal_attention_backward", {"q": q, "k": k, "v": v, "grad_out": grad_out, "out": out,
                                                   "lse": lse}, seed)
    return _empty_result(q), _empty_result(q), _empty_result(q)  # one layout, q's


# The autograd formula (dq, dk, dv = causal_attention_backward(grad_out, q, k, v, out, lse, ...); lse is not
# differentiable; a double backward raises) is registered in C++, csrc/attention_autograd.cpp: attention runs
# once per layer and step, and a Python formula doubled the host time of each call.
