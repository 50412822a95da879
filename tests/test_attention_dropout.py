"""Attention dropout inside the fused op: the mask, the kernel against the reference, the model's use.

The mask is a hash of (seed, batch·head, query, key) (csrc/attention_dropout.h), so the kernel and the
reference (minilm.ops.attention.dropout_keep_mask, the same steps in PyTorch) must drop exactly the same
entries: with dropout, outputs and gradients are compared at the same tolerances as without it. The
tolerances are those of test_attention.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from minilm.gpt1 import GPT1Config, CausalSelfAttention
from minilm.ops import causal_attention, causal_attention_reference, dropout_keep_mask
from minilm.ops.attention import _mix32, dropout_threshold
from test_attention import BF16_TOL, FP32_TOL, check_against_exact, qkv

SEED = torch.tensor([20181, 3141592653])


# --- the mask -------------------------------------------------------------------------------------------

def test_mix32_is_lowbias32():
    # Known values of Wellons' lowbias32, computed with Python integers (no 64-bit overflow tricks).
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    xs = [0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 123456789, 2**31]
    assert _mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]


def test_threshold_and_scale():
    assert dropout_threshold(0.0) == (0, 1.0)
    assert dropout_threshold(0.1) == (6554, 65536 / (65536 - 6554))
    assert dropout_threshold(0.5) == (32768, 2.0)
    assert dropout_threshold(1.0) == (65536, 0.0)


def test_mask_keep_rate_and_independence():
    p = 0.1
    B, H, T = 2, 3, 512
    keep = dropout_keep_mask(SEED, B, H, T, p).float()  # (B, H, T, T), 1.5M entries
    rate = 1 - dropout_threshold(p)[0] / 65536
    n = keep.numel()
    sd = math.sqrt(rate * (1 - rate) / n)
    assert abs(keep.mean().item() - rate) < 5 * sd
    for b in range(B):  # every head and every key parity on its own
        for h in range(H):
            for parity in (0, 1):
                part = keep[b, h, :, parity::2]
                assert abs(part.mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / part.numel())

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).mean().item() / (a.std().item() * b.std().item())
    # neighbours (the two keys of one hash, adjacent keys of different hashes, adjacent queries, other heads)
    # are uncorrelated: |r| < 5 / sqrt(n)
    bound = 5 / math.sqrt(n / 2)
    assert abs(corr(keep[..., 0::2], keep[..., 1::2])) < bound
    assert abs(corr(keep[..., 1:-1:2], keep[..., 2::2])) < bound
    assert abs(corr(keep[:, :, :-1], keep[:, :, 1:])) < bound
    assert abs(corr(keep[:, :2], keep[:, 1:])) < bound


def test_mask_depends_on_the_seed_and_not_on_the_shape():
    a = dropout_keep_mask(SEED, 2, 3, 40, 0.3)
    b = dropout_keep_mask(torch.tensor([20181, 3141592654]), 2, 3, 40, 0.3)
    assert (a != b).float().mean() > 0.3  # another seed: another mask (two masks agree on ~58% of entries)
    # the entry of (b·H + h, i, j) is the same whatever T is
    assert torch.equal(dropout_keep_mask(SEED, 2, 3, 25, 0.3), a[:, :, :25, :25])


# --- the kernel against the reference ------------------------------------------------------------------------

def check_drops_exactly(device, D, dtype, p=0.3, B=2, H=3):
    """Inputs that make each kernel's mask readable, entry by entry (T = D): q = 0, so P_ij = 1/(i+1) for
    j <= i, and k = v = I.
    * forward: out = P' v = P', nonzero exactly where the kernel kept an entry;
    * backward with dO = I: dV = P'ᵀ dO = P'ᵀ (the dK/dV kernel's mask);
    * backward with dO = 1: dP_ij = M_ij (keep · scale), Delta_i = Σ_j P'_ij, dQ = dS k = dS with
      dS_ij = (M_ij − Delta_i) / (i+1) (the dQ kernel's mask): a wrong entry moves dQ[i, j] by scale/(i+1)
      or more, while rounding moves it by a few units of the dtype;
    * the same with q = I too: S = I, so P_ii = e/(i+e) and P_ij = 1/(i+e) for j < i, and dK = dSᵀ q = dSᵀ
      (the dK/dV kernel's mask in dS): a wrong entry M_ij moves dS_ij by P_ij (1 − P_ij) · scale and the
      row's other entries dS_ik by P_ik P_ij · scale (through Delta_i), which the check below, in units of
      P · scale, sees (only row 0, whose one entry has P = 1 and dS = 0, cannot show its mask)."""
    T = D
    eye = torch.eye(T, device=device, dtype=dtype).expand(B, H, T, D).contiguous()
    q = torch.zeros(B, H, T, D, device=device, dtype=dtype)
    keep = dropout_keep_mask(SEED, B, H, T, p, device) & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    ops = torch.ops.minilm
    out, lse = ops.causal_attention(q, eye, eye, 1.0, p, SEED)
    assert torch.equal(out != 0, keep), "forward: dropped entries differ from dropout_keep_mask"
    _, _, dv = ops.causal_attention_backward(eye, q, eye, eye, out, lse, 1.0, p, SEED)
    assert torch.equal(dv.transpose(-2, -1) != 0, keep), "dV: dropped entries differ from dropout_keep_mask"
    dq, _, _ = ops.causal_attention_backward(torch.ones_like(q), q, eye, eye, out, lse, 1.0, p, SEED)
    scale = dropout_threshold(p)[1]
    rows = torch.arange(1, T + 1, device=device, dtype=torch.float64)[:, None]  # i + 1
    m = keep.double() * scale
    expected = (m - m.sum(-1, keepdim=True) / rows) / rows * torch.ones(T, T, device=device).tril()
    err = (dq.double() - expected).abs() * rows / scale  # in units of the gap a wrong entry would open
    assert err.max().item() < 0.25, f"dQ: an entry is off by {err.max().item():.3g} of a dropped/kept gap"
    out, lse = ops.causal_attention(eye, eye, eye, 1.0, p, SEED)
    _, dk, _ = ops.causal_attention_backward(torch.ones_like(q), eye, eye, eye, out, lse, 1.0, p, SEED)
    i = torch.arange(T, device=device, dtype=torch.float64)[:, None]
    j = torch.arange(T, device=device, dtype=torch.float64)[None, :]
    P = torch.where(j == i, math.e, 1.0) / (i + math.e) * (j <= i)
    dS = P * (m - (P * m).sum(-1, keepdim=True))
    gap = P * scale + (j > i)  # the masked entries are exact zeros: compare them in absolute terms
    err = (dk.double() - dS.transpose(-2, -1)).abs() / gap.transpose(-2, -1)
    assert err.max().item() < 0.25, f"dK: an entry is off by {err.max().item():.3g} of a dropped/kept gap"


@pytest.mark.parametrize("D, dtype", [(64, torch.float32), (64, torch.bfloat16), (48, torch.float64)])
def test_kernel_drops_exactly_the_reference_mask(D, dtype):
    check_drops_exactly("cpu", D, dtype)


# Around the CPU kernel's block edges (query blocks 32 / 64 / 256, key blocks 512), odd head dims.
SHAPES = [(1, 1, 1, 8), (2, 3, 17, 16), (1, 2, 65, 40), (2, 1, 200, 64), (1, 2, 513, 32), (1, 1, 800, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fp32_matches_reference(shape, p):
    check_against_exact(shape, torch.float32, FP32_TOL, dropout_p=p, seed=SEED)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_match_reference(dtype):
    check_against_exact((2, 2, 300, 64), dtype, BF16_TOL, dropout_p=0.1, seed=SEED)


def test_gradcheck_fp64():
    # With a fixed seed the mask is fixed: the op is a smooth function of q, k, v, which gradcheck can check.
    q, k, v = qkv((2, 2, 9, 4), torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: causal_attention(q, k, v, dropout_p=0.3, seed=SEED), (q, k, v))


def test_p_zero_is_no_dropout_and_p_one_drops_everything():
    q, k, v = qkv((1, 2, 33, 16))
    torch.testing.assert_close(causal_attention(q, k, v, dropout_p=0.0), causal_attention(q, k, v), rtol=0, atol=0)
    out = causal_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_default_seed_follows_torch_manual_seed():
    q, k, v = qkv((1, 2, 40, 8))
    torch.manual_seed(7)
    a = causal_attention(q, k, v, dropout_p=0.2)
    b = causal_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    a2 = causal_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)  # each call draws a new mask


def test_expectation_is_the_undropped_output():
    # E[dropout output] = the attention output: the mean over many seeds lies within 5 standard errors of it.
    q, k, v = (torch.randn(1, 1, 24, 8) for _ in range(3))
    torch.manual_seed(0)
    n = 2000
    samples = torch.stack([causal_attention(q, k, v, dropout_p=0.5) for _ in range(n)])
    std_err = samples.std(dim=0) / n ** 0.5
    assert ((samples.mean(dim=0) - causal_attention(q, k, v)).abs() <= 5 * std_err + 1e-6).all()


def test_opcheck_with_dropout():
    q, k, v = qkv((2, 2, 19, 8))
    torch.library.opcheck(torch.ops.minilm.causal_attention.default, (q, k, v, 0.35, 0.2, SEED))
    with torch.no_grad():
        out, lse = torch.ops.minilm.causal_attention(q, k, v, 0.35, 0.2, SEED)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.35, 0.2, SEED)
    torch.library.opcheck(torch.ops.minilm.causal_attention_backward.default, args)


def test_torch_compile_fullgraph_with_dropout():
    # The seed is drawn inside the graph (torch.randint). Inductor has its own random-number generator, so
    # a compiled draw equals the eager one only with fallback_random (as for every random op under compile).
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()

    def f(q, k, v):
        return (causal_attention(q, k, v, dropout_p=0.25) * torch.arange(16.0)).sum()

    q, k, v = qkv((1, 2, 21, 16))
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(f, fullgraph=True)
        torch.manual_seed(3)
        out_c = compiled(q, k, v)
        grads_c = torch.autograd.grad(out_c, (q, k, v))
    torch.manual_seed(3)
    out_e = f(q, k, v)
    grads_e = torch.autograd.grad(out_e, (q, k, v))
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dropout_p=-0.1), "dropout_p must be in"),
    (dict(dropout_p=1.5), "dropout_p must be in"),
    (dict(dropout_p=0.1, seed=torch.tensor([1, 2], dtype=torch.int32)), "seed must be"),
    (dict(dropout_p=0.1, seed=torch.tensor([1, 2, 3])), "seed must be"),
    (dict(dropout_p=0.1, seed=[1, 2]), "seed must be"),
])
def test_bad_dropout_arguments(kwargs, match):
    q, k, v = qkv((1, 1, 4, 8))
    with pytest.raises(ValueError, match=match):
        causal_attention(q, k, v, **kwargs)


def test_bad_dropout_arguments_cpp():
    q, k, v = qkv((1, 1, 4, 8))
    with pytest.raises(RuntimeError, match="needs a seed"):
        torch.ops.minilm.causal_attention(q, k, v, 1.0, 0.1, None)
    with pytest.raises(RuntimeError, match="seed must be"):
        torch.ops.minilm.causal_attention(q, k, v, 1.0, 0.1, torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        torch.ops.minilm.causal_attention(q, k, v, 1.0, 2.0, SEED)


# --- the model ----------------------------------------------------------------------------------------------

def test_gpt1_attention_drops_through_the_fused_kernel():
    # Training mode with attn_pdrop > 0 on the CPU runs the fused op with a seed drawn from torch's CPU
    # generator: the same draw, fed to the reference, gives the same output.
    config = GPT1Config(n_embd=32, n_head=4, n_ctx=16, attn_pdrop=0.3, resid_pdrop=0.0)
    attn = CausalSelfAttention(config).train()
    x = torch.randn(2, 16, 32)
    torch.manual_seed(11)
    y = attn(x)
    torch.manual_seed(11)
    seed = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    q, k, v = attn.c_attn(x).split(32, dim=2)
    q, k, v = (t.view(2, 16, 4, 8).transpose(1, 2) for t in (q, k, v))
    ref = causal_attention_reference(q, k, v, dropout_p=0.3, seed=seed).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(y, attn.c_proj(ref), **FP32_TOL["out"])
    # and in eval mode nothing is dropped
    attn.eval()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(attn(x), attn.c_proj(ref), **FP32_TOL["out"])


# --- the C++ parameters agree with the spec's exactly ----------------------------------------------------------

def test_fp64_matches_reference_tightly():
    # fp64 leaves no rounding to hide a kernel scale of 1/(1 − p) instead of the spec's 65536/(65536 − threshold)
    # (relative difference 7e-6 at p = 0.1, inside the fp32 tolerances above).
    check_against_exact((2, 3, 70, 16), torch.float64,
                        dict(out=dict(atol=1e-12, rtol=1e-12), grad=dict(atol=1e-11, rtol=1e-11)), dropout_p=0.1,
                        seed=SEED)


def test_threshold_rounding_agrees_with_the_spec():
    # p = (u ± 0.4) / 65536 and (u + 0.6) / 65536 around one entry's own 16-bit number u: the kernel must round
    # p · 65536 to the threshold exactly as dropout_threshold does (keep, keep, drop).
    T = 8
    from minilm.ops.attention import _mul32
    seed0, seed1 = int(SEED[0]), int(SEED[1])
    head = _mix32(seed0 ^ _mix32(seed1 ^ _mul32(torch.tensor([0]), 0x85EBCA6B)))
    row = _mix32(head ^ _mul32(torch.tensor([5]), 0x9E3779B9))
    u = int((_mix32(row ^ (3 >> 1)) >> 16).item())  # query 5, key 3 (odd: the high half)
    q = torch.zeros(1, 1, T, T, dtype=torch.float64)
    eye = torch.eye(T, dtype=torch.float64)[None, None]
    for frac, kept in ((-0.4, True), (0.4, True), (0.6, False)):
        p = (u + frac) / 65536
        out, _ = torch.ops.minilm.causal_attention(q, eye, eye, 1.0, p, SEED)
        assert bool(out[0, 0, 5, 3] != 0) == kept == bool(dropout_keep_mask(SEED, 1, 1, T, p)[0, 0, 5, 3])
