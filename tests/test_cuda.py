"""The CUDA kernels against their references (skipped without a CUDA device).

Tolerances. The truth is the reference evaluated in float64 on the same (already rounded) inputs.
* Attention, bf16/fp16: the kernel's error must be at most 2x the error of PyTorch's own flash
  attention (SDPA) in the same dtype, plus one unit of the dtype's rounding at the tensor's scale
  (FlashAttention's own test criterion: both round P to 16 bits before P·V and accumulate in fp32).
  fp32/fp64 (CUDA-core kernels, fp32/fp64 accumulation): absolute 2e-5 / 1e-10 at unit scale.
* Char-CNN: fp32 accumulates the same products as the reference, in another order: 1e-4 of the
  tensor's scale; bf16 rounds outputs and gradients to 8 bits of mantissa: 2e-2. Gradients are compared
  with the reference evaluated at the kernel's own argmax (checked separately to be a maximum), so that a
  near-tie resolved differently in the last bit cannot make the test flaky.
"""
import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from minilm.ops import causal_attention, causal_attention_reference, char_cnn, char_cnn_reference
from test_attention_dropout import SEED, check_drops_exactly

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"
ops = torch.ops.minilm

# ---------------------------------------------------------------------------------------------- attention
_UNIT = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
_ABS = {torch.float32: 2e-5, torch.float64: 1e-10}


def _qkv(B, H, T, D, dtype):
    return [torch.randn(B, H, T, D, device=DEV, dtype=dtype) for _ in range(3)]


def _truth(q, k, v, g, scale):
    """out, lse and (dq, dk, dv) in float64 from the reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = causal_attention_reference(q64, k64, v64, scale)
    grads = torch.autograd.grad(out, (q64, k64, v64), g.double())
    T = q.shape[-2]
    att = (q64 @ k64.transpose(-2, -1)).detach() * scale
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=DEV).tril(), float("-inf"))
    return out.detach(), torch.logsumexp(att, dim=-1), grads


def _sdpa(q, k, v, g):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    return (out.detach(), *torch.autograd.grad(out, (qs, ks, vs), g))


def _check_attention(B, H, T, D, dtype):
    q, k, v = _qkv(B, H, T, D, dtype)
    g = torch.randn_like(q)
    scale = 1.0 / math.sqrt(D)
    out, lse = ops.causal_attention(q, k, v, scale)
    dq, dk, dv = ops.causal_attention_backward(g, q, k, v, out, lse, scale)
    t_out, t_lse, (t_dq, t_dk, t_dv) = _truth(q, k, v, g, scale)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == q.shape[:-1]
    lse_tol = 1e-3 if dtype in _UNIT else 1e-5
    lse_err = (lse.double() - t_lse).abs().max().item()
    assert lse_err <= lse_tol * (1 + t_lse.abs().max().item()), f"lse error {lse_err:.3g}"
    ours = {"out": out, "dq": dq, "dk": dk, "dv": dv}
    truth = {"out": t_out, "dq": t_dq, "dk": t_dk, "dv": t_dv}
    if dtype in _UNIT:
        base = dict(zip(("out", "dq", "dk", "dv"), _sdpa(q, k, v, g)))
    report, ok = [], True
    for name in ours:
        assert torch.isfinite(ours[name]).all(), f"{name} has non-finite values"
        err = (ours[name].double() - truth[name]).abs().max().item()
        scale_t = truth[name].abs().max().item()
        if dtype in _UNIT:
            ref_err = (base[name].double() - truth[name]).abs().max().item()
            # The floor covers gradients that are exactly zero in exact arithmetic (T = 1: dq = dk = 0),
            # where our kernel and SDPA each leave different rounding residue of ~1e-7.
            bound = 2 * ref_err + _UNIT[dtype] * scale_t + 1e-3 * _UNIT[dtype]
            report.append(f"{name}: err {err:.3g} sdpa {ref_err:.3g} bound {bound:.3g}")
        else:
            bound = _ABS[dtype] * max(1.0, scale_t)
            report.append(f"{name}: err {err:.3g} bound {bound:.3g}")
        ok &= err <= bound
    report.append(f"lse: err {lse_err:.3g}")
    assert ok, f"B={B} H={H} T={T} D={D} {dtype}: " + "; ".join(report)
    return "; ".join(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [16, 48, 64, 80, 128, 200])
@pytest.mark.parametrize("T", [1, 37, 130, 257])
def test_attention_matches_reference_and_sdpa(T, D, dtype):
    _check_attention(2, 3, T, D, dtype)


@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (64, torch.float16),
                                     (64, torch.float32)])
def test_attention_long_sequence(D, dtype):
    _check_attention(1, 2, 2048, D, dtype)


def test_attention_fp64_gradcheck():
    for shape in [(1, 2, 5, 16), (1, 1, 9, 48)]:
        q, k, v = (torch.randn(*shape, device=DEV, dtype=torch.float64, requires_grad=True) for _ in range(3))
        assert torch.autograd.gradcheck(causal_attention, (q, k, v), eps=1e-6, atol=1e-5)


def test_attention_autograd_and_noncontiguous_inputs():
    # (B, T, H, D) transposed to (B, H, T, D), as a model produces them
    q, k, v = (torch.randn(2, 70, 4, 64, device=DEV, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    out = causal_attention(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    scale = 1 / 8
    out2, lse2 = ops.causal_attention(q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous(), scale)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    direct = ops.causal_attention_backward(g, q.detach().contiguous(), k.detach().contiguous(),
                                           v.detach().contiguous(), out2, lse2, scale)
    for a, b in zip(grads, direct):  # dq sums fp32 atomics: order may vary, so not bitwise
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float16, 80), (torch.float32, 48)])
def test_attention_opcheck(dtype, D):
    q, k, v = (torch.randn(1, 2, 33, D, device=DEV, dtype=dtype, requires_grad=True) for _ in range(3))
    torch.library.opcheck(ops.causal_attention.default, (q, k, v, 1.0 / math.sqrt(D)))


def _check_runs_on_the_current_stream(fn, x):
    """fn(x) again on a side stream that first sleeps, then writes x: a kernel launched on another stream
    than the current one would read x before it is written."""
    expected = fn(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    x_late = torch.zeros_like(x)
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x_late.copy_(x)
        out = fn(x_late)
    side.synchronize()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_attention_runs_on_the_current_stream():
    q, k, v = _qkv(1, 2, 256, 64, torch.bfloat16)
    _check_runs_on_the_current_stream(lambda q: ops.causal_attention(q, k, v, 0.125)[0], q)


def test_attention_bad_input():
    q = torch.randn(1, 2, 8, 16, device=DEV)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.causal_attention(q, q[:, :, :4], q, 0.25)
    with pytest.raises(RuntimeError, match="head dim"):
        x = torch.randn(1, 1, 4, 300, device=DEV)
        ops.causal_attention(x, x, x, 0.1)
    with pytest.raises(RuntimeError, match="one CUDA device"):
        ops.causal_attention(q, q.cpu(), q, 0.25)
    torch.cuda.synchronize()  # the context is still healthy


def test_attention_empty():
    q = torch.randn(0, 2, 5, 64, device=DEV, dtype=torch.bfloat16)
    out, lse = ops.causal_attention(q, q, q, 0.125)
    assert out.shape == q.shape and lse.shape == (0, 2, 5)


# ------------------------------------------------------------------------------------ attention dropout
# The mask is a hash of (seed, batch·head, query, key) (csrc/attention_dropout.h): every kernel must drop
# exactly the entries of dropout_keep_mask, whatever its tiling.

@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (64, torch.float16),
                                     (128, torch.float16), (48, torch.bfloat16), (64, torch.float32),
                                     (32, torch.float64)])
def test_attention_dropout_drops_exactly_the_reference_mask(D, dtype):
    check_drops_exactly(DEV, D, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 80, 128, 200])   # 200: the CUDA-core kernels' widest lane layout
@pytest.mark.parametrize("T", [1, 37, 130, 257, 1000])
def test_attention_dropout_matches_reference(T, D, dtype):
    """Against the reference with the same mask, within twice the error of the same kernel without dropout on the
    same inputs (itself held to SDPA's error above) plus two units of the dtype at the tensor's scale."""
    B, H, p = 2, 3, 0.1
    q, k, v = _qkv(B, H, T, D, dtype)
    g = torch.randn_like(q)
    scale = 1.0 / math.sqrt(D)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    errors = {}
    for drop in (0.0, p):
        seed = SEED if drop else None
        out, lse = ops.causal_attention(q, k, v, scale, drop, seed)
        grads = ops.causal_attention_backward(g, q, k, v, out, lse, scale, drop, seed)
        t_out = causal_attention_reference(q64, k64, v64, scale, drop, seed)
        t_grads = torch.autograd.grad(t_out, (q64, k64, v64), g.double())
        for name, a, t in zip(("out", "dq", "dk", "dv"), (out, *grads), (t_out.detach(), *t_grads)):
            assert torch.isfinite(a).all(), f"{name} (dropout {drop}) has non-finite values"
            errors[name, drop] = ((a.double() - t).abs().max().item(), t.abs().max().item())
        if drop:
            torch.testing.assert_close(lse, lse_nodrop, atol=1e-5, rtol=1e-5)  # lse of the undropped scores
        lse_nodrop = lse
    # A gradient's rounding is relative to the gradients' scale, not its own: at T = 1, dq and dk are 0 in
    # exact arithmetic, but Delta = rowsum(dO ∘ O) reads the rounded O (the stored output), which with
    # dropout (O = v / keep rate) is no longer exactly v.
    grad_size = max(errors[name, p][1] for name in ("dq", "dk", "dv"))
    report, ok = [], True
    for name in ("out", "dq", "dk", "dv"):
        (err, size), (err0, _) = errors[name, p], errors[name, 0.0]
        size = size if name == "out" else grad_size
        unit = _UNIT.get(dtype, _ABS.get(dtype))
        bound = 2 * err0 + 2 * unit * max(size, 1.0 if dtype not in _UNIT else 0.0) + 1e-3 * unit
        report.append(f"{name}: err {err:.3g} (no dropout {err0:.3g}) bound {bound:.3g}")
        ok &= err <= bound
    assert ok, f"B={B} H={H} T={T} D={D} {dtype}: " + "; ".join(report)


@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (128, torch.float16), (48, torch.float32)])
def test_attention_dropout_edge_probabilities(D, dtype):
    # p = 1 drops everything (scale 0: out and every gradient exactly 0); a p below 1/131072 rounds to threshold 0,
    # which must be bitwise the kernel without dropout.
    q, k, v = _qkv(2, 3, 70, D, dtype)
    g = torch.randn_like(q)
    out, lse = ops.causal_attention(q, k, v, 0.125, 1.0, SEED)
    assert torch.equal(out, torch.zeros_like(out))
    for t in ops.causal_attention_backward(g, q, k, v, out, lse, 0.125, 1.0, SEED):
        assert torch.equal(t, torch.zeros_like(t))
    out0, lse0 = ops.causal_attention(q, k, v, 0.125)
    out1, lse1 = ops.causal_attention(q, k, v, 0.125, 1e-7, SEED)
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)


@contextlib.contextmanager
def _deterministic_algorithms():
    # warn_only: torch's own ops here (the fp64 reference's cuBLAS products) may not be deterministic
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_backward_is_reproducible_under_deterministic_algorithms(D, p, monkeypatch):
    """The default backward adds dQ with atomics (as FlashAttention-2 does), so dQ's last bits vary run to run;
    under torch.use_deterministic_algorithms(True) a scheme without atomics runs (wide at D = 64, split2d at
    128: bitwise what naming them gives): the same inputs give the same bits, as accurately as the default
    (and with dropout, exactly the reference mask)."""
    q, k, v = _qkv(2, 3, 1000, D, torch.bfloat16)
    g = torch.randn_like(q)
    scale, seed = 1.0 / math.sqrt(D), (SEED if p else None)
    out, lse = ops.causal_attention(q, k, v, scale, p, seed)
    default = ops.causal_attention_backward(g, q, k, v, out, lse, scale, p, seed)
    with _deterministic_algorithms():
        runs = [ops.causal_attention_backward(g, q, k, v, out, lse, scale, p, seed) for _ in range(3)]
        if p:
            check_drops_exactly(DEV, D, torch.bfloat16)
    for run in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], run):
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    monkeypatch.setenv("MINILM_ATTN_BWD", "64:wide,128:split2d")
    named = ops.causal_attention_backward(g, q, k, v, out, lse, scale, p, seed)
    for name, a, b in zip(("dq", "dk", "dv"), runs[0], named):
        assert torch.equal(a, b), f"{name}: the deterministic mode did not run the atomic-free scheme"
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    truth = torch.autograd.grad(causal_attention_reference(q64, k64, v64, scale, p, seed), (q64, k64, v64),
                                g.double())
    size = max(t.abs().max().item() for t in truth)
    for name, det, dflt, t in zip(("dq", "dk", "dv"), runs[0], default, truth):
        err, err0 = ((x.double() - t).abs().max().item() for x in (det, dflt))
        assert err <= 2 * err0 + _UNIT[torch.bfloat16] * size, f"{name}: deterministic {err:.3g}, default {err0:.3g}"


@pytest.mark.parametrize("limit_kb", [163, 99])  # an A100; sm_86/89/120 GPUs (L4, L40S, RTX 4090)
def test_attention_on_gpus_with_less_shared_memory(limit_kb, monkeypatch):
    # MINILM_SMEM_LIMIT_KB makes the kernels act as on a GPU with that much shared memory per CTA: at 163 KB
    # the 2-D backward (171 KB at head dim 128) falls back to fused / split; at 99 KB the 102 KB forwards at
    # head dim 128 (wide64, narrow) fall back to wide, and the backward at head dim 128 (>= 113 KB) runs the
    # CUDA-core kernels.
    monkeypatch.setenv("MINILM_SMEM_LIMIT_KB", str(limit_kb))
    for fwd in ("", "128:narrow"):
        monkeypatch.setenv("MINILM_ATTN_FWD", fwd)
        for D in (64, 128):
            _check_attention(2, 3, 257, D, torch.bfloat16)
    monkeypatch.setenv("MINILM_ATTN_BWD", "64:fused2d")
    _check_attention(1, 2, 300, 64, torch.float16)
    monkeypatch.delenv("MINILM_ATTN_BWD")
    with _deterministic_algorithms():
        _check_attention(2, 3, 257, 128, torch.bfloat16)
    check_drops_exactly(DEV, 128, torch.bfloat16)
    test_attention_dropout_matches_reference(257, 128, torch.bfloat16)


@pytest.mark.parametrize("scheme", ["fused", "split", "split2", "split3", "splitkv", "wide", "wide16", "fusedwide",
                                    "fusedkv", "fused2d", "split2d"])
def test_attention_every_backward_scheme_and_forward_layout_on_short_sequences(scheme, monkeypatch):
    # The defaults run a few of the tilings; the rest are there for measurements (MINILM_ATTN_BWD and _FWD), and
    # each has its own masked and mask-free loops. T = 1, 37, 64: one query tile, all of it on the diagonal;
    # 65: a second tile of one row; 300: a partial last key tile. Each forward layout runs beside one scheme.
    forward = {"fused": "narrow", "split": "narrow2", "wide": "wide", "fused2d": "wide3", "split2d": "wide64"}
    monkeypatch.setenv("MINILM_ATTN_BWD", scheme)
    monkeypatch.setenv("MINILM_ATTN_FWD", forward.get(scheme, ""))   # "": the default layout
    # the split schemes' dQ kernel: the narrow tiling (the default at D = 128) at D = 64 too, beside two of them
    monkeypatch.setenv("MINILM_ATTN_DQ", "narrow" if scheme in ("split", "split3") else "")
    for T in (1, 37, 64, 65, 300):
        for D, dtype in ((64, torch.bfloat16), (128, torch.float16)):
            _check_attention(2, 3, T, D, dtype)


@pytest.mark.parametrize("group,phases", [("1", "1"), ("4", "2"), ("2", "3"), ("0", "1")])
def test_attention_backward_in_every_cta_order(group, phases, monkeypatch):
    # The dK/dV kernels take their (batch·head, key tile) from the block index (csrc/cuda/dkdv_order.h; the map
    # itself: tests/test_cta_order.py). At these sizes the default is the grid's order; here also groups of one
    # head in one phase (FlashAttention-2's order), groups of 4 of the 6 heads (the last has 2) in 2 phases of
    # the 3 key tiles per head (the last has 1), groups of 2 in 3 phases, and the grid's order named.
    monkeypatch.setenv("MINILM_ATTN_HEAD_GROUP", group)
    monkeypatch.setenv("MINILM_ATTN_KEY_PHASES", phases)
    for D in (64, 128):
        _check_attention(2, 3, 300, D, torch.bfloat16)
    for scheme, D in (("fused2d", 64), ("wide", 64), ("split2d", 128), ("fused", 128)):  # and the defaults above
        monkeypatch.setenv("MINILM_ATTN_BWD", f"{D}:{scheme}")
        _check_attention(2, 3, 300, D, torch.float16)
    monkeypatch.delenv("MINILM_ATTN_BWD")
    for D in (64, 128):
        test_attention_dropout_matches_reference(300, D, torch.bfloat16)


@pytest.mark.parametrize("scheme", ["fused", "split"])
def test_attention_dropout_in_the_fallback_schemes_at_head_dim_128(scheme, monkeypatch):
    # Where a GPU lacks the 171 KB of shared memory per CTA that the 2-D backward takes at head dim 128 (an
    # A100), fused runs instead (split when deterministic), so both are built with dropout; named here, they
    # run on any GPU.
    monkeypatch.setenv("MINILM_ATTN_BWD", f"128:{scheme}")
    check_drops_exactly(DEV, 128, torch.bfloat16)
    test_attention_dropout_matches_reference(257, 128, torch.bfloat16)


def _layouts(H, T, D, dtype):
    """(name, q, k, v, grad_out, out's layout, readable): inputs in layouts that the tensor-core kernels read
    where they lie (readable) or must copy first. out's layout: a function that returns a copy of out."""
    def randn(*shape):
        return torch.randn(*shape, device=DEV, dtype=dtype)

    def btdh(x):  # x ([B, H, T, D]) as the transpose of a contiguous [B, T, H, D]
        return torch.empty_like(x.transpose(1, 2), memory_format=torch.contiguous_format).transpose(1, 2).copy_(x)

    def tbhd(x):  # x as a permutation of a contiguous [T, B, H, D]
        B = x.shape[0]
        return torch.empty(T, B, H, D, device=DEV, dtype=dtype).permute(1, 2, 0, 3).copy_(x)

    B = 2
    qkv = randn(B, T, 3 * H * D)  # GPT-1: q, k, v are views into one projection, grad_out a transpose
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    g = randn(B, T, H, D).transpose(1, 2)
    yield "views of one projection", q, k, v, g, tbhd, True
    # every input with strides of its own (so that one input's strides used for another's would show)
    k2 = randn(B, H, T, D)
    v2 = randn(B, T, H, D + 8)[..., :D].transpose(1, 2)  # rows (D + 8)·2 bytes apart within a head: readable
    g2 = randn(T, B, H, D).permute(1, 2, 0, 3)
    yield "a layout per input", q, k2, v2, g2, btdh, True
    kv = randn(1, H, T, D).expand(B, H, T, D)  # stride 0 along the batch
    yield "batch-expanded k and v", q, kv, kv, g, btdh, True
    # size-1 dims may carry any stride (never stepped along)
    one = [randn(2 * H * T * D).as_strided((1, H, T, D), (7, T * D, D, 1)) for _ in range(4)]
    yield "size-1 batch with an odd stride", *one, btdh, True
    yield "rows 8 bytes off 16-byte alignment", randn(B, H, T, D + 4)[..., :D], k, v, g, btdh, False
    yield "start 2 bytes off alignment", randn(B * H * T * D + 1)[1:].view(B, H, T, D), k, v, g, btdh, False


def _result_strides(q):
    """The strides of out, dq, dk, dv for q (csrc/attention_layout.h): [B, T, H, D] in memory when q is."""
    B, H, T, D = q.shape
    return (T * H * D, D, H * D, 1) if H > 1 and T > 1 and q.stride(1) < q.stride(2) else (H * T * D, T * D, D, 1)


def _copies(fn):
    """The aten copy ops that fn() runs (torch.profiler sees those that C++ code dispatches too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()} & {"aten::copy_", "aten::clone", "aten::constant_pad_nd"}


@pytest.mark.parametrize("copy_io", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("D", [64, 128, 48])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_reads_strided_inputs(dtype, D, p, copy_io, monkeypatch):
    # q, k, v, grad_out and out are read through their strides where their rows are 16-byte aligned (GPT-1's
    # q, k, v need no copy), else copied first (and always where the head dim is padded): either way the
    # result is bitwise that of contiguous copies (the backward in deterministic mode; with dQ atomics, equal
    # up to their order of addition). MINILM_ATTN_COPY=1 (the GPU check's diagnostic) copies every
    # non-contiguous input and result, with the same results.
    if copy_io:
        monkeypatch.setenv("MINILM_ATTN_COPY", "1")
    else:
        monkeypatch.delenv("MINILM_ATTN_COPY", raising=False)
    H, T = 3, 257
    scale, seed = 1.0 / math.sqrt(D), (SEED if p else None)
    for name, q, k, v, g, layout, readable in _layouts(H, T, D, dtype):
        qc, kc, vc, gc = (t.contiguous() for t in (q, k, v, g))
        out, lse = ops.causal_attention(q, k, v, scale, p, seed)
        out_c, lse_c = ops.causal_attention(qc, kc, vc, scale, p, seed)
        assert torch.equal(out, out_c) and torch.equal(lse, lse_c), name
        assert out.stride() == _result_strides(q), name  # written in place: [B, T, H, D] when q is
        out_t = layout(out)
        assert not out_t.is_contiguous()
        with _deterministic_algorithms():
            got = ops.causal_attention_backward(g, q, k, v, out_t, lse, scale, p, seed)
            want = ops.causal_attention_backward(gc, qc, kc, vc, out_c, lse_c, scale, p, seed)
        for grad, a, b in zip(("dq", "dk", "dv"), got, want):
            assert torch.equal(a, b), f"{name}: {grad}"
            assert a.stride() == _result_strides(q), f"{name}: {grad}"
        got = ops.causal_attention_backward(g, q, k, v, out_t, lse, scale, p, seed)
        want = ops.causal_attention_backward(gc, qc, kc, vc, out_c, lse_c, scale, p, seed)
        for grad, a, b in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {grad}: {m}")
        copies = _copies(lambda: ops.causal_attention_backward(g, q, k, v, out_t, *ops.causal_attention(
            q, k, v, scale, p, seed)[1:], scale, p, seed))
        if readable and D in (64, 128) and not copy_io:
            assert not copies, f"{name}: read in place, yet {copies} ran"
        else:
            assert copies, f"{name}: copied first, yet no copy ran"


@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 48),
                                      (torch.bfloat16, 200), (torch.float32, 64)])
def test_attention_results_lie_like_q(dtype, D):
    # Every path (tensor-core kernels writing in place; padded head dims and the CUDA-core kernels, copied) gives
    # out, dq, dk, dv [B, T, H, D] in memory when q is (GPT-1's views), bitwise what contiguous inputs give
    # (deterministic mode), and the fake functions say the same strides.
    B, H, T = 2, 3, 133
    x = torch.randn(B, T, 3 * H * D, device=DEV, dtype=dtype)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
    g = torch.randn(B, T, H, D, device=DEV, dtype=dtype).transpose(1, 2)
    scale = 1.0 / math.sqrt(D)
    with _deterministic_algorithms():
        out, lse = ops.causal_attention(q, k, v, scale)
        grads = ops.causal_attention_backward(g, q, k, v, out, lse, scale)
        qc, kc, vc, gc = (t.contiguous() for t in (q, k, v, g))
        out_c, lse_c = ops.causal_attention(qc, kc, vc, scale)
        grads_c = ops.causal_attention_backward(gc, qc, kc, vc, out_c, lse_c, scale)
    assert out.transpose(1, 2).is_contiguous() and out_c.is_contiguous()
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_c, *grads_c)):
        assert a.stride() == _result_strides(q) and b.stride() == _result_strides(qc), name
        assert torch.equal(a, b), name
    with _deterministic_algorithms():  # opcheck compares runs: no dQ atomics
        torch.library.opcheck(ops.causal_attention.default, (q, k, v, scale))
        torch.library.opcheck(ops.causal_attention_backward.default, (g, q, k, v, out, lse, scale))


def test_gpt1_attention_drops_through_the_fused_kernel():
    # The model's attention drops inside the kernel, with a seed from torch's CPU generator.
    from minilm.gpt1 import CausalSelfAttention, GPT1Config
    attn = CausalSelfAttention(GPT1Config(n_embd=128, n_head=2, n_ctx=96, attn_pdrop=0.3, resid_pdrop=0.0))
    attn = attn.to(DEV, torch.bfloat16).train()
    x = torch.randn(2, 96, 128, device=DEV, dtype=torch.bfloat16)
    torch.manual_seed(11)
    y = attn(x)
    torch.manual_seed(11)
    seed = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    with torch.no_grad():
        q, k, v = (t.view(2, 96, 2, 64).transpose(1, 2).double() for t in attn.c_attn(x).split(128, dim=2))
        ref = causal_attention_reference(q, k, v, dropout_p=0.3, seed=seed).transpose(1, 2).reshape(2, 96, 128)
        ref = attn.c_proj(ref.to(torch.bfloat16))
    torch.testing.assert_close(y, ref, atol=3e-2, rtol=3e-2)


def test_attention_dropout_autograd_and_seed():
    q, k, v = (torch.randn(2, 3, 100, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    a = causal_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(5)
    b = causal_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b)  # the default seed comes from torch's CPU generator
    a.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    torch.library.opcheck(ops.causal_attention.default, (q, k, v, 0.125, 0.2, SEED))


# ---------------------------------------------------------------------------------------------- char-CNN
ELMO_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]


def _composite_at(char_ids, embedding, weights, biases, activation, argmax, relu_mask):
    """char_cnn_reference with each filter's max read at a given `argmax` (and relu through a given mask),
    so that fp64 gradients can be checked with the kernel's argmax held fixed."""
    x = F.embedding(char_ids, embedding).transpose(1, 2)  # (N, E, L)
    outs, col = [], 0
    for w, b in zip(weights, biases):
        c = F.conv1d(x, w)  # (N, F, L - W + 1)
        m = c.gather(-1, argmax[:, col:col + w.shape[0]].long().unsqueeze(-1)).squeeze(-1)  # (N, F)
        col += w.shape[0]
        outs.append(m + b)
    pre = torch.cat(outs, dim=-1)
    return torch.tanh(pre) if activation == "tanh" else pre * relu_mask


def _char_inputs(N, L, V, E, filters, dtype):
    ids = torch.randint(0, V, (N, L), device=DEV)
    emb = torch.randn(V, E, device=DEV).to(dtype)
    weights = [(torch.randn(f, E, w, device=DEV) / math.sqrt(E * w)).to(dtype) for w, f in filters]
    biases = [(0.1 * torch.randn(f, device=DEV)).to(dtype) for _, f in filters]
    return ids, emb, weights, biases


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check_char_cnn(N, L, V, E, filters, dtype, activation):
    ids, emb, weights, biases = _char_inputs(N, L, V, E, filters, dtype)
    out, argmax = ops.char_cnn(ids, emb, weights, biases, activation)
    total = sum(f for _, f in filters)
    assert out.shape == (N, total) and out.dtype == dtype and argmax.dtype == torch.int16
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    if dtype == torch.float64:
        tol = 1e-10
    d = lambda ts: [t.double() for t in ts]  # noqa: E731
    # values, against the composite at its own max
    ref = char_cnn_reference(ids, emb.double(), d(weights), d(biases), activation)
    assert _rel_err(out, ref) <= tol, f"out: rel err {_rel_err(out, ref):.3g}"
    # argmax: in range, and a maximum of the float64 convolution up to rounding
    x = F.embedding(ids, emb.double()).transpose(1, 2)
    col = 0
    for (w_, f), w in zip(filters, weights):
        c = F.conv1d(x, w.double())
        a = argmax[:, col:col + f].long()
        assert a.min() >= 0 and a.max() <= L - w_
        at = c.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        gap = (c.max(-1).values - at).max().item()
        assert gap <= 1e-5 * max(1.0, c.abs().max().item()), f"width {w_}: argmax is {gap:.3g} below the max"
        col += f
    # gradients, against autograd of the composite at the kernel's argmax (float64)
    g = torch.randn(N, total, device=DEV).to(dtype)
    g_emb, g_w, g_b = ops.char_cnn_backward(g, ids, emb, weights, out, argmax, activation)
    e64 = emb.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in weights]
    b64 = [b.detach().double().requires_grad_() for b in biases]
    mask = (out > 0).double() if activation == "relu" else None
    y = _composite_at(ids, e64, w64, b64, activation, argmax, mask)
    if activation == "tanh":  # the kernel's act' is 1 - out², with `out` in the data's dtype
        y = y.detach() + (y - y.detach()) * (1 - out.double() ** 2) / (1 - y.detach() ** 2)
    r = torch.autograd.grad(y, [e64, *w64, *b64], g.double())
    r_emb, r_w, r_b = r[0], r[1:1 + len(filters)], torch.cat(r[1 + len(filters):])
    assert g_emb.shape == emb.shape and g_emb.dtype == dtype
    errs = {"d_embedding": _rel_err(g_emb, r_emb), "d_bias": _rel_err(g_b, r_b)}
    for i, (a, b) in enumerate(zip(g_w, r_w)):
        assert a.shape == b.shape and a.dtype == dtype
        errs[f"d_weight[{i}]"] = _rel_err(a, b)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"gradient errors above {tol}: " + ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
    return f"out {_rel_err(out, ref):.3g}, " + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()) + f" (tol {tol})"


# The two backward implementations (csrc/cuda/char_cnn_kernels.cu): the token-slot kernels (default) and
# the old ones (MINILM_CNN_BWD=old, read at every call). Every char-CNN gradient test runs both.
CNN_BWD_VARIANTS = ("slots", "old")


def set_cnn_bwd(variant):
    if variant == "old":
        os.environ["MINILM_CNN_BWD"] = "old"
    else:
        os.environ.pop("MINILM_CNN_BWD", None)


@pytest.fixture(params=CNN_BWD_VARIANTS)
def cnn_bwd(request):
    set_cnn_bwd(request.param)
    yield request.param
    set_cnn_bwd("slots")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_char_cnn_elmo_filters(dtype, activation, cnn_bwd):
    _check_char_cnn(N=70, L=50, V=262, E=16, filters=ELMO_FILTERS, dtype=dtype, activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_char_cnn_odd_filters(dtype, cnn_bwd):
    # width 9 > 7 and E*W large take the generic kernels; 130 filters span two blocks of 128
    filters = [[1, 3], [2, 5], [9, 7], [3, 130], [4, 33]]
    _check_char_cnn(N=37, L=11, V=20, E=5, filters=filters, dtype=dtype, activation="tanh")
    # E = 40 > 32: the slot kernels do not take it, the old ones run
    _check_char_cnn(N=3, L=9, V=7, E=40, filters=[[5, 17], [9, 2]], dtype=dtype, activation="relu")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_char_cnn_nan_propagates_as_on_the_cpu(activation):
    # a NaN among a token's windows makes its max NaN (torch.max's rule), and relu keeps it: both forward kernels
    # (the fast one, widths <= 7, and the generic one, width 9) give the CPU op's NaNs and values
    ids = torch.randint(0, 20, (40, 12))
    ids[ids == 13] = 12
    ids[[3, 17], 5] = 13                    # tokens 3 and 17 hold the character whose embedding is NaN
    emb = torch.randn(20, 8)
    emb[13, 2] = float("nan")
    ws = [torch.randn(f, 8, w) / (8 * w) ** 0.5 for w, f in ((2, 16), (9, 8))]
    bs = [0.1 * torch.randn(f) for _, f in ((2, 16), (9, 8))]
    cpu = char_cnn(ids, emb, ws, bs, activation)
    gpu = char_cnn(ids.to(DEV), emb.to(DEV), [w.to(DEV) for w in ws], [b.to(DEV) for b in bs], activation)
    assert cpu[[3, 17]].isnan().all() and not cpu[[0, 1, 2]].isnan().any()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_char_cnn_nan_output_passes_its_gradient_through_relu(dtype, cnn_bwd):
    # as on the CPU (tests/test_char_cnn.py): torch's relu backward zeroes only where out <= 0, so the filter
    # whose bias is NaN gets grad_out from every token; the others' gradients are the CPU op's
    ids = torch.arange(40).repeat_interleave(12).view(40, 12) % 30   # one character per token: all windows tie
    emb = torch.randn(30, 16)
    ws = [torch.randn(f, 16, w) / (16 * w) ** 0.5 for w, f in ((1, 32), (5, 40))]
    bs = [0.1 * torch.randn(f) for _, f in ((1, 32), (5, 40))]
    bs[1][3] = float("nan")
    grads = {}
    for dev in ("cpu", DEV):
        leaves = [t.to(dev, dtype, copy=True).requires_grad_() for t in (emb, *ws, *bs)]
        char_cnn(ids.to(dev), leaves[0], leaves[1:3], leaves[3:], "relu").float().sum().backward()
        grads[dev] = [t.grad.float().cpu() for t in leaves]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(grads[DEV], grads["cpu"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)
    assert grads[DEV][4][3] == 40


def test_char_cnn_many_tokens(cnn_bwd):
    # several CTAs of tokens and of filters, and a word length that is a whole number of chunks
    _check_char_cnn(N=300, L=32, V=100, E=16, filters=[[3, 64], [7, 256]], dtype=torch.float32,
                    activation="relu")


# Shapes that exercise the backward's tiling: (N, L, V, E, filters [[width, count], ...], dtype, activation).
CNN_ODD_SHAPES = [
    (33, 1, 9, 16, [[1, 5]], torch.float32, "relu"),                  # L = 1 with w = 1
    (19, 1, 7, 3, [[1, 4]], torch.float32, "tanh"),                   # ... and E = 3
    (29, 12, 15, 3, [[10, 9], [1, 2]], torch.float32, "tanh"),        # width 10 > 8 (two tap chunks)
    (45, 20, 30, 7, [[3, 65], [8, 3], [2, 97]], torch.float32, "tanh"),  # E = 7 (4 slots, 4 idle lanes)
    (50, 40, 9, 1, [[5, 2], [1, 1]], torch.float32, "tanh"),          # E = 1: 32 tokens per warp
    (23, 10, 50, 32, [[3, 5], [4, 70]], torch.float32, "relu"),       # E = 32: one token per warp
    (1, 9, 5, 16, [[2, 3]], torch.float32, "relu"),                   # one token
    (40, 14, 5000, 16, [[2, 7], [7, 33]], torch.float32, "relu"),     # V·E too large for a shared table
    (40, 14, 5000, 16, [[2, 7], [7, 33]], torch.bfloat16, "tanh"),
    (17, 20, 262, 16, [[1, 4], [7, 40], [9, 3]], torch.float64, "tanh"),  # fp64: 4 filters per warp
    (517, 50, 262, 16, [[1, 32], [7, 100]], torch.float16, "relu"),   # fp16; N not a multiple of 16
]


@pytest.mark.parametrize("shape", CNN_ODD_SHAPES, ids=lambda s: f"N{s[0]}-L{s[1]}-V{s[2]}-E{s[3]}-{str(s[5])[6:]}")
def test_char_cnn_backward_odd_shapes(shape, cnn_bwd):
    _check_char_cnn(*shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_char_cnn_backward_deterministic_and_variants_agree(dtype):
    ids, emb, weights, biases = _char_inputs(3000, 50, 262, 16, ELMO_FILTERS, dtype)
    out, argmax = ops.char_cnn(ids, emb, weights, biases, "relu")
    g = torch.randn_like(out)
    grads = {}
    try:
        for variant in CNN_BWD_VARIANTS:
            set_cnn_bwd(variant)
            a = ops.char_cnn_backward(g, ids, emb, weights, out, argmax, "relu")
            b = ops.char_cnn_backward(g, ids, emb, weights, out, argmax, "relu")
            for x, y in zip([a[0], *a[1], a[2]], [b[0], *b[1], b[2]]):
                assert torch.equal(x, y), f"{variant}: two backward runs differ"
            grads[variant] = [a[0], *a[1], a[2]]
    finally:
        set_cnn_bwd("slots")
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # same sums in other orders (bf16: rounded results)
    for x, y in zip(grads["slots"], grads["old"]):
        assert _rel_err(x, y) <= tol, f"slots vs old: rel err {_rel_err(x, y):.3g}"


def test_char_cnn_first_max_wins_ties():
    ids = torch.zeros(4, 12, dtype=torch.long, device=DEV)  # every window sees the same characters
    emb = torch.randn(3, 16, device=DEV)
    weights = [torch.randn(8, 16, w, device=DEV) for w in (1, 3, 9)]
    biases = [torch.zeros(8, device=DEV) for _ in range(3)]
    _, argmax = ops.char_cnn(ids, emb, weights, biases, "relu")
    assert (argmax == 0).all()


def test_char_cnn_bad_input():
    ids = torch.randint(0, 10, (4, 12), device=DEV)
    emb = torch.randn(10, 16, device=DEV)
    weights, biases = [torch.randn(8, 16, 3, device=DEV)], [torch.zeros(8, device=DEV)]
    for bad in (10, -1):
        wrong = ids.clone()
        wrong[2, 5] = bad
        with pytest.raises(RuntimeError, match=r"char_ids must lie in \[0, 10\)"):
            ops.char_cnn(wrong, emb, weights, biases, "relu")
    with pytest.raises(RuntimeError, match="shorter than the width"):
        ops.char_cnn(ids[:, :2], emb, weights, biases, "relu")
    with pytest.raises(RuntimeError, match="int64"):
        ops.char_cnn(ids.int(), emb, weights, biases, "relu")
    with pytest.raises(RuntimeError, match="activation"):
        ops.char_cnn(ids, emb, weights, biases, "gelu")
    with pytest.raises(RuntimeError, match="biases"):
        ops.char_cnn(ids, emb, weights, [torch.zeros(7, device=DEV)], "relu")
    torch.cuda.synchronize()  # no illegal memory access happened


def test_char_cnn_runs_on_the_current_stream():
    ids, emb, weights, biases = _char_inputs(64, 50, 262, 16, ELMO_FILTERS[:4], torch.float32)
    _check_runs_on_the_current_stream(lambda emb: ops.char_cnn(ids, emb, weights, biases, "relu")[0], emb)


def test_char_cnn_opcheck():
    ids, emb, weights, biases = _char_inputs(5, 9, 12, 4, [[2, 3], [3, 5]], torch.float32)
    for t in (emb, *weights, *biases):
        t.requires_grad_()
    torch.library.opcheck(ops.char_cnn.default, (ids, emb, weights, biases, "tanh"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_both_ops_under_autocast_equal_casting_by_hand(dtype):
    # csrc/autocast.cpp's AutocastCUDA kernels: fp32 inputs are cast to the autocast dtype, as SDPA's and a
    # convolution's are; the results equal those of casting by hand, and the gradients are fp32.
    q, k, v = _qkv(2, 3, 200, 64, torch.float32)
    g = torch.randn_like(q).to(dtype)
    results = []
    for autocast in (True, False):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            out = causal_attention(*(x if autocast else [t.to(dtype) for t in x]))
        out.backward(g)
        results.append((out, [t.grad for t in x]))
    (out, grads), (expected, expected_grads) = results
    assert out.dtype == dtype and all(t.dtype == torch.float32 for t in grads)
    assert torch.equal(out, expected)
    for a, b in zip(grads, expected_grads):   # dq is added with atomics: equal up to their order
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)

    ids, emb, weights, biases = _char_inputs(64, 50, 262, 16, ELMO_FILTERS[:4], torch.float32)
    params = [emb, *weights, *biases]
    g = torch.randn(64, sum(f for _, f in ELMO_FILTERS[:4]), device=DEV).to(dtype)
    results = []
    for autocast in (True, False):
        x = [t.detach().clone().requires_grad_() for t in params]
        y = x if autocast else [t.to(dtype) for t in x]
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            out = char_cnn(ids, y[0], y[1:5], y[5:], "relu")
        out.backward(g)
        results.append((out, [t.grad for t in x]))
    (out, grads), (expected, expected_grads) = results
    assert out.dtype == dtype and all(t.dtype == torch.float32 for t in grads)
    assert torch.equal(out, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------- ELMo on a GPU
def test_elmo_sampled_softmax_step_on_cuda_matches_the_cpu():
    # The sampler draws on the host from torch's CPU generator, so a seeded step samples the same K
    # candidates on either device: the loss and the gradients agree (fp32; dropout off, whose masks
    # would come from the device's own generator). Stateful features follow the model to the GPU too.
    from minilm.elmo import BiLM, ELMoConfig, batch_to_ids
    config = ELMoConfig(char_embed_dim=4, filters=((1, 4), (2, 8), (3, 8)), n_highway=1, lstm_dim=24,
                        projection_dim=8, n_layers=2, dropout=0.0, vocab_size=50, n_negative_samples=6)
    torch.manual_seed(0)
    cpu = BiLM(config).train()
    gpu = BiLM(config).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(DEV)
    ids = batch_to_ids([["a", "b", "c", "d"], ["e", "f"]])
    nxt = torch.tensor([[3, 10, 0, 49, 7, -1], [2, 5, 8, -1, -1, -1]])
    losses = {}
    for name, model, dev in (("cpu", cpu, "cpu"), ("cuda", gpu, DEV)):
        torch.manual_seed(1)
        loss = model(ids.to(dev), nxt.to(dev), nxt.to(dev))[2].mean()
        loss.backward()
        losses[name] = loss.item()
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)   # other candidates: off by percents
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-7, msg=name)
    state = {}
    with torch.no_grad():
        cpu.eval()(ids, state=state)                                 # a state made on the CPU ...
        layers, _, _ = gpu.eval()(ids.to(DEV), state=state)           # ... carries on on the GPU
    assert layers[-1].device.type == state["forward"][0][0].device.type == torch.device(DEV).type


def test_train_elmo_on_cuda_resumes_exactly(tmp_path):
    # train_elmo.py on the GPU: the carried LSTM state lives on the device, the checkpoint gathers it to the
    # CPU, and a resumed run (state back on the device) ends with the uninterrupted run's weights
    from script_helpers import load_script
    train_elmo = load_script("train_elmo")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {w} saw a {v} near the {u} ." for w in ("king", "fool", "queen")
                                for v in ("ship", "play", "crown") for u in ("sea", "wall")) + "\n", encoding="utf-8")
    common = ["--data", str(corpus), "--preset", "tiny", "--batch_size", "4", "--unroll_steps", "6", "--eval_iters", "1",
              "--eval_interval", "2", "--log_interval", "1000", "--device", DEV, "--n_negative_samples", "8"]
    train_elmo.main([*common, "--out_dir", str(tmp_path / "whole"), "--max_iters", "4"])
    train_elmo.main([*common, "--out_dir", str(tmp_path / "split"), "--max_iters", "2"])
    train_elmo.main(["--out_dir", str(tmp_path / "split"), "--resume", "True", "--max_iters", "4", "--device", DEV])
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("whole", "split"))   # where saved
    assert a["lstm_state"][0][0][0].device.type == "cpu" and a["iter"] == b["iter"] == 4
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k].cpu(), a["model"][k].cpu(), rtol=1e-5, atol=1e-6, msg=k)   # atomics


def test_bench_peak_mib_counts_only_what_a_call_adds_on_the_gpu():
    from minilm.bench.common import peak_mib

    held = torch.empty(100 << 20, dtype=torch.uint8, device=DEV)  # 100 MiB held before the call: not counted
    assert 3.99 < peak_mib(lambda: torch.ones(1 << 20, device=DEV).sum(), DEV) < 4.01  # a 4 MiB temporary
    del held
