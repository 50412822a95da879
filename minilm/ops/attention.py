"""Causal self-attention: the fused op, its reference, and its registration with torch.library.

The C++/CUDA kernels (csrc/cpu/attention.cpp, csrc/cuda/) compute, for q, k, v of shape [B, H, T, D],

    out = softmax(scale · q kᵀ + causal mask) v          (the T×T matrix is never stored)
    lse = logsumexp(scale · q kᵀ + causal mask, dim=-1)  (saved for the backward)

and the backward op recomputes the probabilities from lse (FlashAttention, Dao et al. 2022).
Here, in Python: the input checks, the fake (shape) function that torch.compile needs, and the
autograd formula that calls the backward op.
"""
import math

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def causal_attention_reference(q, k, v, scale=None):
    """The math, step by step: what the fused kernel must equal. Materialises the (B, H, T, T) scores."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    att = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = torch.softmax(att, dim=-1)
    return (att @ v.float()).to(q.dtype)  # (B, H, T, D)


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"causal_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"causal_attention: q, k, v must be 4-D [B, H, T, D], got q of shape {tuple(q.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError("causal_attention: q, k, v must have the same shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"causal_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"causal_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] < 1:
        raise ValueError("causal_attention: the head dim D (last dim) must be at least 1")


def causal_attention(q, k, v, scale=None):
    """Fused causal self-attention. q, k, v: [B, H, T, D]; scale defaults to 1/sqrt(D). Returns [B, H, T, D]."""
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.minilm.causal_attention(q, k, v, scale)
    return out


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("minilm::causal_attention")
def _(q, k, v, scale):
    _check(q, k, v)  # so that torch.compile reports bad inputs at trace time, as eager does
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("minilm::causal_attention_backward")
def _(grad_out, q, k, v, out, lse, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled [B, H, T] stand-in for lse's gradient


def _backward(ctx, grad_out, grad_lse):
    # lse is an internal by-product (marked non-differentiable), so grad_lse is ignored (None).
    if grad_out is None:  # not materialised: nothing downstream used the output
        return None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.minilm.causal_attention_backward(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd("minilm::causal_attention", _backward, setup_context=_setup_context)
