"""The fused causal-attention op against its reference and torch SDPA.

Tolerances (why these numbers):
* fp32: the kernel accumulates in fp32 like the reference and SDPA, but in another order (tiles of
  512 keys, BLAS blocking) and with its own exp (≤ 2e-7 relative). Outputs are convex combinations
  of rows of v (|out| ≲ 3 for randn inputs), so the error is a few fp32 ulps of those values:
  ~1e-6 observed; atol 2e-5 / rtol 1e-4 leaves margin for T up to ~1000 and D up to 128. Gradients
  sum T terms more (dK, dV add over every query): atol 1e-4 / rtol 1e-4.
* bf16: everything inside is fp32 and the results are rounded to bf16 once, so the output must be
  within about one bf16 ulp (2⁻⁸ relative) of the exact result: rtol 1e-2, atol 1e-2 (values near
  zero). The backward reads the bf16-rounded out to form D = rowsum(dO∘O) (as SDPA and FA2 do), which
  moves the gradients by up to ~1 % of their scale: rtol/atol 3e-2.
* fp64 (gradcheck): the kernel's fp64 path is exact up to rounding, so gradcheck's default
  finite-difference tolerances apply.
The exact reference is causal_attention_reference evaluated in float64.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import minilm._build
from minilm.ops import causal_attention, causal_attention_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FP32_TOL = dict(out=dict(atol=2e-5, rtol=1e-4), grad=dict(atol=1e-4, rtol=1e-4))
BF16_TOL = dict(out=dict(atol=1e-2, rtol=1e-2), grad=dict(atol=3e-2, rtol=3e-2))


def qkv(shape, dtype=torch.float32, requires_grad=True):
    return [torch.randn(shape, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def exact(q, k, v, grad_out, scale=None, dropout_p=0.0, seed=None):
    """Output and gradients of the reference in float64, from the same (possibly bf16) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = causal_attention_reference(q64, k64, v64, scale, dropout_p, seed)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return out, grads


def check_against_exact(shape, dtype, tol, scale=None, dropout_p=0.0, seed=None):
    q, k, v = qkv(shape, dtype)
    out = causal_attention(q, k, v, scale, dropout_p, seed)
    assert out.shape == q.shape and out.dtype == dtype
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out, ref_grads = exact(q, k, v, g, scale, dropout_p, seed)
    torch.testing.assert_close(out.double(), ref_out, **tol["out"])
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, **tol["grad"], msg=lambda m: f"d{name}: {m}")


# Lengths around every block edge: forward query blocks are 32 (T < 192), 64 (T < 768), 256
# (longer), backward ones 32 / 64 / 128, key blocks 512. D includes sizes that are not multiples of 8.
SHAPES = [
    (1, 1, 1, 64), (2, 3, 2, 16), (1, 2, 7, 48), (2, 2, 31, 80), (1, 2, 32, 64), (1, 3, 33, 128),
    (2, 1, 65, 48), (1, 2, 191, 64), (1, 1, 193, 80), (1, 1, 511, 16), (1, 2, 513, 64),
    (1, 1, 767, 48), (1, 1, 769, 64), (1, 1, 1025, 32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_and_grads_match_exact(shape):
    check_against_exact(shape, torch.float32, FP32_TOL)


@pytest.mark.parametrize("shape", [(2, 3, 1, 48), (2, 2, 37, 64), (1, 2, 300, 80), (1, 1, 800, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bf16_forward_and_grads_match_exact(shape):
    check_against_exact(shape, torch.bfloat16, BF16_TOL)


def test_fp16_forward_and_grads_match_exact():
    # fp16 has 3 more mantissa bits than bf16, so the bf16 bounds hold with room to spare.
    check_against_exact((2, 2, 70, 48), torch.float16, BF16_TOL)


@pytest.mark.parametrize("shape", [(2, 3, 1, 48), (2, 3, 37, 64), (1, 4, 256, 80), (1, 2, 600, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_sdpa(shape):
    q, k, v = qkv(shape)
    out = causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, **FP32_TOL["out"])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, **FP32_TOL["grad"])


def test_bf16_matches_sdpa():
    q, k, v = qkv((2, 2, 100, 64), torch.bfloat16)
    out = causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Two bf16 results, each within about an ulp of the exact one.
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_custom_scale(scale):
    check_against_exact((1, 2, 45, 32), torch.float32, FP32_TOL, scale=scale)
    q, k, v = qkv((1, 2, 45, 32), requires_grad=False)
    torch.testing.assert_close(causal_attention(q, k, v, scale),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), **FP32_TOL["out"])


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv((1, 1, 9, 25), requires_grad=False)
    torch.testing.assert_close(causal_attention(q, k, v), causal_attention(q, k, v, 0.2))


def test_first_row_attends_only_to_itself_and_future_does_not_leak():
    q, k, v = qkv((1, 2, 40, 16), requires_grad=False)
    out = causal_attention(q, k, v)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 100.0  # change only the keys/values after position 19
    v2[:, :, 20:] -= 50.0
    torch.testing.assert_close(causal_attention(q, k2, v2)[:, :, :20], out[:, :, :20], atol=0, rtol=0)


def test_large_scores_do_not_overflow():
    # Scores of ±1e4 would overflow exp() without the running-max subtraction.
    q, k, v = qkv((1, 1, 70, 16), requires_grad=False)
    out = causal_attention(q * 100, k * 100, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, causal_attention_reference((q * 100).double(), (k * 100).double(), v.double()).float(),
                               **FP32_TOL["out"])


def test_saved_lse_is_the_row_logsumexp():
    q, k, v = qkv((2, 2, 50, 24), requires_grad=False)
    scale = 0.3
    _, lse = torch.ops.minilm.causal_attention(q, k, v, scale)
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    s = s.masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 50)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 2, 5, 3), (2, 1, 9, 4)])
def test_gradcheck_fp64(shape):
    q, k, v = qkv(shape, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: causal_attention(q, k, v), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: causal_attention(q, k, v, 0.7), (q, k, v))


def test_opcheck_forward_and_backward():
    q, k, v = qkv((2, 2, 19, 8))
    torch.library.opcheck(torch.ops.minilm.causal_attention.default, (q, k, v, 0.35))
    with torch.no_grad():
        out, lse = torch.ops.minilm.causal_attention(q, k, v, 0.35)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.35)
    torch.library.opcheck(torch.ops.minilm.causal_attention_backward.default, args)


def test_non_contiguous_inputs():
    B, T, H, D = 2, 45, 3, 32
    # q, k as the model makes them: a [B, T, H, D] view transposed to [B, H, T, D] (rows of D are
    # contiguous, row stride H·D); v with a non-unit last stride (copied by the kernel).
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, 3 * H, D)[:, :, ::3].transpose(1, 2).requires_grad_()
    v = torch.randn(B, H, T, 2 * D)[..., ::2].requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = causal_attention(q, k, v)
    g = torch.randn(B, T, H, D).transpose(1, 2)  # a non-contiguous grad_out
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out, ref_grads = exact(q, k, v, g)
    torch.testing.assert_close(out.double(), ref_out, **FP32_TOL["out"])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **FP32_TOL["grad"])


@pytest.mark.parametrize("T", [40, 1])
def test_inputs_whose_rows_overlap(T):
    # k broadcast along T (row stride 0, every row the same memory): BLAS cannot take such a matrix, so the
    # kernel copies it first. T = 1: a row stride of 0 is then harmless, and the kernel reads it where it is.
    B, H, D = 2, 2, 16
    q, v = torch.randn(B, H, T, D, requires_grad=True), torch.randn(B, H, T, D, requires_grad=True)
    k0 = torch.randn(B, H, 1, D, requires_grad=True)
    k = k0.expand(B, H, T, D) if T > 1 else k0.as_strided((B, H, T, D), (H * D, D, 0, 1))
    g = torch.randn(B, H, T, D)
    out = causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k0, v), g)
    ref_out, ref_grads = exact(q, k, v, g)
    ref_grads = (ref_grads[0], ref_grads[1].sum(2, keepdim=True), ref_grads[2])  # k0's gradient: the rows' sum
    torch.testing.assert_close(out.double(), ref_out, **FP32_TOL["out"])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **FP32_TOL["grad"])


def _interleaved_strides(B, H, T, D):  # [B, H, T, D] laid out [B, T, H, D] in memory
    return (T * H * D, D, H * D, 1)


def _layouts(B, H, T, D):
    """(name, q, k, v, the strides out and the gradients must have)."""
    x = torch.randn(B, T, 3 * H * D)  # one projection, split into heads as GPT-1 does
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
    bhtd = (H * T * D, T * D, D, 1)
    yield "gpt1-views", q, k, v, _interleaved_strides(B, H, T, D)
    yield "contiguous", q.contiguous(), k.contiguous(), v.contiguous(), bhtd
    yield "q-contiguous-kv-views", q.contiguous(), k, v, bhtd  # q decides, for all three gradients
    yield "q-view-kv-contiguous", q, k.contiguous(), v.contiguous(), _interleaved_strides(B, H, T, D)
    qt = torch.randn(B, T, H, 2 * D)[..., ::2].transpose(1, 2)  # heads interleaved, last dim strided: copied
    yield "strided-last-dim", qt, k, v, _interleaved_strides(B, H, T, D)
    yield "permuted-dhtb", torch.randn(D, H, T, B).permute(3, 1, 2, 0), k, v, bhtd  # H before T: contiguous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, H, T, D", [(2, 3, 21, 8), (1, 2, 600, 8), (1, 1, 9, 4), (2, 4, 1, 8)])
def test_results_lie_like_q(dtype, B, H, T, D):
    # out, dq, dk, dv are [B, T, H, D] in memory when q is (so GPT-1's out.transpose(1, 2) needs no copy, and
    # neither do the view backward of its q, k, v), else contiguous; with H = 1 or T = 1 both are one memory
    # order and the contiguous strides are used. The fake functions must say the same (torch.compile).
    tol = {torch.float32: FP32_TOL, torch.float64: FP32_TOL}.get(dtype, {"out": dict(atol=2e-2, rtol=2e-2),
                                                                        "grad": dict(atol=5e-2, rtol=5e-2)})
    for name, q, k, v, strides in _layouts(B, H, T, D):
        q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
        if H == 1 or T == 1:
            strides = (H * T * D, T * D, D, 1)
        out = causal_attention(q, k, v)
        g = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)
        grads = torch.autograd.grad(out, (q, k, v), g)
        for what, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
            assert t.stride() == strides, (name, what, t.stride())
        ref_out, ref_grads = exact(q, k, v, g)
        torch.testing.assert_close(out.double(), ref_out, **tol["out"])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b, **tol["grad"])
        mode = torch._subclasses.fake_tensor.FakeTensorMode()
        fq, fk, fv, fg = (mode.from_tensor(t.detach()) for t in (q, k, v, g))
        flse = mode.from_tensor(torch.zeros(B, H, T))
        with mode:
            fout, _ = torch.ops.minilm.causal_attention(fq, fk, fv, 0.5)
            fgrads = torch.ops.minilm.causal_attention_backward(fg, fq, fk, fv, fout, flse, 0.5)
        assert all(t.stride() == strides for t in (fout, *fgrads)), name


def test_opcheck_with_gpt1_views():
    B, H, T, D = 2, 3, 13, 8
    x = torch.randn(B, T, 3 * H * D, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
    torch.library.opcheck(torch.ops.minilm.causal_attention.default, (q, k, v, 0.35))
    with torch.no_grad():
        out, lse = torch.ops.minilm.causal_attention(q, k, v, 0.35)
    g = torch.randn(B, T, H, D).transpose(1, 2)
    torch.library.opcheck(torch.ops.minilm.causal_attention_backward.default,
                          (g, q.detach(), k.detach(), v.detach(), out, lse, 0.35))


def test_empty_inputs():
    for shape in [(0, 2, 5, 8), (2, 2, 0, 8)]:
        q, k, v = qkv(shape)
        out = causal_attention(q, k, v)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad.shape == shape


@pytest.mark.parametrize("bad, exc, match", [
    (lambda: causal_attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)), ValueError, "4-D"),
    (lambda: causal_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8)),
     ValueError, "same shape"),
    (lambda: causal_attention(*(torch.ones(1, 1, 4, 8, dtype=torch.int64),) * 3), TypeError, "floating dtype"),
    (lambda: causal_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).double(), torch.randn(1, 1, 4, 8)),
     TypeError, "floating dtype"),
    (lambda: causal_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8, device="meta"), torch.randn(1, 1, 4, 8)),
     ValueError, "one device"),
    (lambda: causal_attention(torch.randn(1, 1, 4, 8), [[1.0]], torch.randn(1, 1, 4, 8)), TypeError, "torch.Tensor"),
    (lambda: causal_attention(*(torch.randn(1, 1, 4, 0),) * 3), ValueError, "head dim"),
    (lambda: causal_attention(*(torch.randn(1, 1, 4, 8),) * 3, scale="0.5"), TypeError, "scale must be a number"),
    (lambda: causal_attention(*(torch.randn(1, 1, 4, 8),) * 3, dropout_p="0.1"), TypeError,
     "dropout_p must be a number, got str '0.1'"),
])
def test_bad_input_python(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 4, 8),) * 3, "4-D"),
    ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8)), "same shape"),
    ((torch.ones(1, 1, 4, 8, dtype=torch.int32),) * 3, "floating dtype"),
    ((torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).double(), torch.randn(1, 1, 4, 8)), "same dtype"),
    ((torch.randn(1, 1, 4, 0),) * 3, "head dim"),
])
def test_bad_input_cpp(args, match):
    # The op itself (torch.ops.minilm.*), without the Python wrapper's checks.
    with pytest.raises(RuntimeError, match=match):
        torch.ops.minilm.causal_attention(*args, 1.0)


def test_bad_input_cpp_backward():
    q, k, v = qkv((1, 2, 6, 8), requires_grad=False)
    out, lse = torch.ops.minilm.causal_attention(q, k, v, 1.0)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.minilm.causal_attention_backward(out, q, k, v, out, lse[:, :, :3], 1.0)
    with pytest.raises(RuntimeError, match="grad_out and out"):
        torch.ops.minilm.causal_attention_backward(out[:, :1], q, k, v, out, lse, 1.0)


def test_meta_tensor_among_real_ones_is_refused():
    # A meta tensor sends the call to the fake function (the Meta key outranks CPU), which must refuse it
    # rather than return uninitialised CPU memory shaped like the answer.
    q, k, v = qkv((1, 2, 6, 8), requires_grad=False)
    with pytest.raises(ValueError, match="seed must be a CPU tensor"):
        torch.ops.minilm.causal_attention(q, k, v, 1.0, 0.1, torch.tensor([1, 2]).to("meta"))
    out, lse = torch.ops.minilm.causal_attention(q, k, v, 1.0)
    for i, name in ((0, "grad_out"), (4, "out"), (5, "lse")):
        args = [out, q, k, v, out, lse]
        args[i] = args[i].to("meta")
        with pytest.raises(ValueError, match=f"one device; q is on cpu, {name} on meta"):
            torch.ops.minilm.causal_attention_backward(*args, 1.0)


def test_double_backward_raises_instead_of_a_wrong_answer():
    q, k, v = qkv((1, 1, 4, 3), dtype=torch.float64)
    (dq,) = torch.autograd.grad(causal_attention(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad((dq * q).sum(), q)


def test_compiled_autograd_matches_eager_gradients():
    # The C++ autograd formula must be traceable by compiled autograd (a backward compiled as one graph).
    torch._dynamo.reset()
    q, k, v = qkv((2, 2, 33, 16))
    out, _ = torch.ops.minilm.causal_attention(q, k, v, 0.5)
    want = torch.autograd.grad(out.square().sum(), (q, k, v))
    for t in (q, k, v):
        t.grad = None
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        out, _ = torch.ops.minilm.causal_attention(q, k, v, 0.5)
        out.square().sum().backward()
    for name, t, w in zip("qkv", (q, k, v), want):
        torch.testing.assert_close(t.grad, w, msg=lambda m: f"d{name}: {m}")


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def block(x, w):  # a projection into q, k, v around the op, as in a transformer layer
        B, T, C = x.shape
        q, k, v = (x @ w).view(B, T, 3, 2, C // 2).permute(2, 0, 3, 1, 4)  # 3 × (B, nh, T, hs)
        return causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C).relu().sum()

    x = torch.randn(2, 21, 32)
    w1 = torch.randn(32, 96, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    compiled = torch.compile(block, fullgraph=True)
    out_c = compiled(x, w1)
    out_c.backward()
    out_e = block(x, w2)
    out_e.backward()
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_the_inputs_as_it_casts_sdpas(dtype):
    # csrc/autocast.cpp: inside torch.autocast, fp32 q, k, v (or a mix with the autocast dtype) are cast to that
    # dtype before the kernel runs, as SDPA's are; the gradients come back in each input's own dtype.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 45, 16, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 45, 16)
    with torch.autocast("cpu", dtype=dtype):
        out = causal_attention(q, k.to(dtype), v)                 # a mix: k already in the autocast dtype
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == sdpa.dtype == dtype
    out.backward(g.to(dtype))
    grads = [t.grad for t in (q, k, v)]
    assert all(t.dtype == torch.float32 for t in grads)
    # the same as casting by hand, bit for bit
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = causal_attention(q2.to(dtype), k2.to(dtype), v2.to(dtype))
    expected.backward(g.to(dtype))
    assert torch.equal(out, expected)
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad)):
        assert torch.equal(a, b)
    torch.testing.assert_close(out, sdpa, atol=2e-2, rtol=2e-2)


def test_autocast_under_torch_compile_and_its_limits():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: causal_attention(q, k, v), fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(q, k.bfloat16(), v).dtype == torch.bfloat16
        # autocast leaves fp64 alone, so fp64 beside fp32 is still a mix the kernels refuse
        with pytest.raises(TypeError, match="must share one floating dtype"):
            causal_attention(q.double(), k, v)
    with pytest.raises(TypeError, match="must share one floating dtype"):   # outside autocast: no casts
        causal_attention(q.bfloat16(), k, v)


def test_reference_matches_sdpa():
    q, k, v = qkv((1, 2, 20, 16), requires_grad=False)
    torch.testing.assert_close(causal_attention_reference(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


# --- how the extension is built -----------------------------------------------------------------------

def _run_python(code, env_extra, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, **env_extra}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_jit_build_compiles_and_runs(tmp_path):
    code = ("import torch, minilm; from minilm.ops import causal_attention, causal_attention_reference\n"
            "assert minilm._C.__name__ == 'minilm_C', minilm._C\n"
            "q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))\n"
            "torch.testing.assert_close(causal_attention(q, k, v), causal_attention_reference(q, k, v), atol=2e-5, rtol=1e-4)\n"
            "print('JIT OK')")
    r = _run_python(code, {"MINILM_FORCE_JIT": "1", "MINILM_CACHE": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "JIT-compiling" in r.stderr and "JIT OK" in r.stdout
    assert any(f.endswith(".so") for _, _, files in os.walk(tmp_path) for f in files)


def test_an_extension_without_the_autograd_kernel_is_refused(monkeypatch):
    # A minilm/_C built before the autograd formula moved to C++ would run without gradients.
    from minilm import _build
    _build._check_complete("_C.so")  # the extension in use has it
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.raises(RuntimeError, match="no autograd formula for causal_attention.*rebuild"):
        _build._check_complete("_C.so")
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: "backward" not in op)
    with pytest.raises(RuntimeError, match="no autograd formula for causal_attention_backward"):
        _build._check_complete("_C.so")


def test_jit_without_compiler_gives_clear_error(tmp_path):
    r = _run_python("import minilm", {"MINILM_FORCE_JIT": "1", "MINILM_CACHE": str(tmp_path),
                                      "CXX": "no-such-compiler-minilm"}, cwd=tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "RuntimeError" in last and "a C++ compiler ('no-such-compiler-minilm' is not on PATH" in last


def test_jit_without_ninja_gives_clear_error(monkeypatch):
    import torch.utils.cpp_extension
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"cannot be JIT-built: missing ninja \(pip install ninja\)"):
        minilm._build.load_jit()


def test_sources_edited_after_the_build_are_reported(tmp_path, monkeypatch):
    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    os.utime(so, (0, 0))  # built long ago: every input is newer
    changed = minilm._build.changed_since_build(str(so), with_cuda=False)
    assert os.path.join(ROOT, "csrc", "ops.cpp") in changed and os.path.join(ROOT, "csrc", "attention_dropout.h") in changed
    assert not any(os.sep + "cuda" + os.sep in p for p in changed)  # a CPU build does not compile csrc/cuda/
    assert any(p.endswith(".cu") for p in minilm._build.changed_since_build(str(so), with_cuda=True))
    os.utime(so, (time.time() + 3600,) * 2)
    assert minilm._build.changed_since_build(str(so), with_cuda=False) == []
    # the warning an import gives for the extension in the checkout
    monkeypatch.setattr(minilm._build, "changed_since_build", lambda path, with_cuda: ["csrc/ops.cpp", "csrc/a.h"])
    with pytest.warns(UserWarning, match="ops.cpp and 1 more changed after .* rebuild with pip install"):
        minilm._build._warn_if_stale(os.path.join(ROOT, "minilm", "_C.so"))


# --- the benchmark's own logic (not its timings) ---------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["attention", "--device", "meta"], "--device must be cpu, cuda or cuda:N, got 'meta'"),
    (["charcnn", "--device", "bogus"], "--device must be cpu, cuda or cuda:N, got 'bogus'"),
    (["gpt1", "--batch_size", "0"], "--batch_size: must be a positive integer, got '0'"),
    (["charcnn", "--tokens", "64", "-3"], "--tokens: must be a positive integer, got '-3'"),
    (["elmo", "--preset", "nope"], "invalid choice: 'nope'"),
    (["attention", "--min-time", "nan"], "--min-time: must be a finite number of seconds >= 0, got 'nan'"),
    (["attention", "--min-time", "-1"], "--min-time: must be a finite number of seconds >= 0, got '-1'"),
    (["attention", "--shapes", "-1,12,512,64"], "-1,12,512,64 is negative: sizes and times must be positive"),
    (["lightconv", "--seq_lens", "-128,256"], "-128,256 is negative"),   # not "expected one argument"
])
def test_bench_rejects_bad_arguments(argv, message, capsys):
    from minilm.bench.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err   # one line, no usage block


def test_bench_rows_and_shape_parsing(capsys):
    import argparse
    import json

    from minilm.bench import attention as bench
    from minilm.bench.common import Reporter
    results = bench.bench_shape((1, 2, 24, 16), torch.device("cpu"), torch.float32, Reporter(as_json=True),
                                min_time_s=0.0)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in ("minilm", "sdpa", "naive")
                                                      for p in ("fwd", "fwdbwd")}
    for r in rows:
        assert r["op"] == "attention" and r["shape"] == [1, 2, 24, 16] and r["dtype"] == "fp32"
        assert r["ms"] > 0 and r["gflops"] > 0 and r["peak_mib"] >= 0
    assert set(results) == {(r["impl"], r["pass"]) for r in rows}
    assert bench.parse_shape("4,12,256,64") == (4, 12, 256, 64)
    from minilm.bench.common import peak_mib
    assert 3.99 < peak_mib(lambda: torch.ones(1 << 20).sum()) < 4.01  # a 4 MiB temporary, freed on return
    for bad in ("4,12,256", "4,12,x,64", "0,1,2,3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_shape(bad)


def test_bench_time_ms_is_the_median_of_the_calls():
    from minilm.bench.common import time_ms

    calls = []

    def fn():  # the third of nine timed calls is slow: the median does not see it (a mean would: > 33 ms)
        calls.append(None)
        if len(calls) == 3:
            time.sleep(0.3)

    assert time_ms(fn, warmup=0, iters=9) < 10 and len(calls) == 9


def test_bench_times_the_implementations_in_alternating_rounds():
    from minilm.bench.common import time_interleaved

    calls = []

    def call(name, slow_at=None):
        def fn():
            calls.append(name)
            if calls.count(name) == slow_at:
                time.sleep(0.3)
        return fn

    ms = time_interleaved({"a": call("a", slow_at=4), "b": call("b")}, warmup=1, iters=5)
    assert calls[:2] == ["a", "b"]                                    # one warmup each
    assert all(sorted(calls[i:i + 2]) == ["a", "b"] for i in range(2, 12, 2))   # then five rounds of both
    assert set(ms) == {"a", "b"} and ms["a"] < 10 and ms["b"] < 10   # a's slow call is not the median
    calls.clear()
    time_interleaved({name: call(name) for name in "abc"}, warmup=0, iters=30)
    rounds = [calls[i:i + 3] for i in range(0, 90, 3)]
    assert all(sorted(r) == list("abc") for r in rounds)
    # no implementation always runs first, or right after the same one
    assert {r[0] for r in rounds} == set("abc")
    assert {calls[i - 1] for i in range(1, 90) if calls[i] == "a"} >= {"b", "c"}
    first = list(calls)
    calls.clear()
    time_interleaved({name: call(name) for name in "abc"}, warmup=0, iters=30)
    assert calls == first                                             # the same order in every run
    assert time_interleaved({}) == {}


def test_bench_flushes_the_gpu_cache_before_each_timed_call_outside_the_timed_span(monkeypatch):
    """On a GPU each call runs between two CUDA events, after the L2 flush and a synchronisation (so the flush
    is not timed), and is waited for before the next flush (torch.cuda stood in for by recorders)."""
    from minilm.bench import common

    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")

        def elapsed_time(self, other):
            return 1.0

    class Flush:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: log.append("sync"))
    monkeypatch.setattr(common, "l2_flush_buffer", lambda device: Flush())
    ms = common.time_interleaved({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, "cuda",
                                 warmup=0, iters=2)
    assert ms == {"a": 1.0, "b": 1.0}
    timed = log[log.index("flush"):]
    assert len(timed) == 4 * 6
    for i in range(4):
        flush, sync, start, call, end, done = timed[6 * i:6 * i + 6]
        assert (flush, sync, start, end, done) == ("flush", "sync", "record", "record", "sync") and call in "ab"


def test_bench_l2_flush_buffer_is_twice_the_l2_at_least_256_mib_once_per_device(monkeypatch, capsys):
    """(torch.cuda's device queries and torch.empty stood in for: no GPU here.)"""
    from types import SimpleNamespace

    from minilm.bench import common

    sizes, l2 = [], {"bytes": 50 << 20}

    def empty(n, dtype, device):
        if l2["bytes"] == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 256.00 MiB")
        if l2["bytes"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        sizes.append(n)
        return object()

    monkeypatch.setattr(common, "_L2_FLUSH", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(L2_cache_size=l2["bytes"]))
    monkeypatch.setattr(torch, "empty", empty)
    buffer = common.l2_flush_buffer("cuda")
    assert common.l2_flush_buffer("cuda:0") is buffer and sizes == [256 << 20]   # once per device, >= 256 MiB
    l2["bytes"] = 200 << 20
    common.l2_flush_buffer("cuda:1")
    assert sizes[-1] == 400 << 20                                                  # twice the L2
    l2["bytes"] = 1
    assert common.l2_flush_buffer("cuda:2") is None and "no room on cuda:2" in capsys.readouterr().err
    l2["bytes"] = 2
    with pytest.raises(RuntimeError, match="illegal memory access"):
        common.l2_flush_buffer("cuda:3")


def test_bench_times_each_implementation_alone_when_all_in_turn_run_out_of_memory(monkeypatch, capsys):
    import json

    from minilm.bench import attention as bench
    from minilm.bench.common import Reporter

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "time_interleaved", out_of_memory)
    bench.bench_shape((1, 2, 24, 16), torch.device("cpu"), torch.float32, Reporter(as_json=True), min_time_s=0.0)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in ("minilm", "sdpa", "naive") for p in ("fwd", "fwdbwd")}


def test_bench_sizes_too_big_to_allocate_are_one_line(capsys):
    from minilm.bench.__main__ import main
    assert main(["charcnn", "--tokens", "100000000000000000"]) == 1   # a byte count past 2**63: fails at once
    err = capsys.readouterr().err
    assert err.startswith("minilm.bench: out of memory") and err.count("\n") == 1, err


def test_bench_checks_the_plot_path_before_the_run(tmp_path):
    pytest.importorskip("matplotlib")
    from minilm.bench.__main__ import main
    for path, message in ((tmp_path / "missing" / "a.png", "no such directory"), (tmp_path / "a.txt", "must end in")):
        with pytest.raises(SystemExit, match=message):
            main(["attention", "--shapes", "1,1,8,8", "--plot", str(path)])


# --- the benchmarks' timing, from a mutation run on it: each check fails with a small planted bug ---------

def test_bench_min_time_is_a_finite_number_of_seconds():
    import argparse

    from minilm.bench.common import seconds
    for bad in ("abc", "inf", "-inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            seconds(bad)
    assert seconds("0") == 0.0 and seconds("1.5") == 1.5


def test_bench_reports_the_median_not_the_fastest_call():
    from minilm.bench.common import time_ms
    calls = []

    def fn():  # 0, then 20, 20 ms: the median is 20, the minimum 0
        calls.append(None)
        if len(calls) > 1:
            time.sleep(0.02)

    assert time_ms(fn, warmup=0, iters=3) >= 15


def test_bench_rounds_run_for_min_time_per_implementation_and_stop_at_1000():
    from minilm.bench.common import time_interleaved
    t0 = time.perf_counter()
    time_interleaved({k: (lambda: time.sleep(0.002)) for k in "ab"}, warmup=0, iters=1, min_time_s=0.05)
    assert time.perf_counter() - t0 >= 0.1          # about min_time_s for each of the two
    calls = []
    time_interleaved({"a": lambda: calls.append(None)}, warmup=0, iters=1, min_time_s=2)
    assert len(calls) == 1000


def _recording_implementations(monkeypatch, bench, oom_after=None):
    """Three stand-in implementations that record their calls; naive runs out of memory after oom_after calls."""
    seen = []

    def impl(name):
        def fn(q, k, v):
            seen.append(name)
            if name == "naive" and oom_after is not None and seen.count(name) > oom_after:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return q * 1.0
        return fn

    monkeypatch.setattr(bench, "implementations", lambda *a: [(n, impl(n)) for n in ("minilm", "sdpa", "naive")])
    return seen


def test_bench_times_each_implementation_with_its_own_function(monkeypatch):
    from minilm.bench import attention as bench
    from minilm.bench.common import Reporter
    seen = _recording_implementations(monkeypatch, bench)
    bench.bench_shape((1, 1, 4, 4), torch.device("cpu"), torch.float32, Reporter(as_json=True), min_time_s=0.0)
    assert seen.count("minilm") == seen.count("sdpa") == seen.count("naive") > 10


def test_bench_raises_errors_other_than_out_of_memory(monkeypatch):
    from minilm.bench import attention as bench
    from minilm.bench.common import Reporter

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench, "time_interleaved", boom)
    with pytest.raises(RuntimeError, match="boom"):
        bench.bench_shape((1, 2, 24, 16), torch.device("cpu"), torch.float32, Reporter(as_json=True), min_time_s=0.0)


def test_bench_leaves_an_implementation_that_does_not_fit_out_of_the_rounds(monkeypatch, capsys):
    from minilm.bench import attention as bench
    from minilm.bench.common import Reporter
    _recording_implementations(monkeypatch, bench, oom_after=1)      # naive: its first probe fits, its fwd does not
    bench.bench_shape((1, 1, 4, 4), torch.device("cpu"), torch.float32, Reporter(as_json=False), min_time_s=0.0)
    out = capsys.readouterr().out
    assert "skipped naive fwd" in out and "in turn" not in out


def test_bench_charcnn_and_elmo_time_minilm_and_the_peer_alike(monkeypatch, capsys):
    import minilm.bench.charcnn as cb
    import minilm.bench.elmo as eb
    from minilm.bench.__main__ import main
    count = {"minilm": 0, "composite": 0}

    def counted(name, f):
        def g(*args, **kwargs):
            count[name] += 1
            return f(*args, **kwargs)
        return g

    monkeypatch.setattr(cb, "char_cnn", counted("minilm", cb.char_cnn))
    monkeypatch.setattr(cb, "char_cnn_reference", counted("composite", cb.char_cnn_reference))
    main(["charcnn", "--tokens", "16", "--iters", "1", "--json"])
    assert count["minilm"] == count["composite"] > 0
    count.update(minilm=0, composite=0)
    monkeypatch.setattr(eb.BiLM, "stream_losses", counted("minilm", eb.BiLM.stream_losses))
    monkeypatch.setattr(eb.CompositeBiLM, "forward", counted("composite", eb.CompositeBiLM.forward))
    main(["elmo", "--preset", "tiny", "--batch_size", "1", "--unroll_steps", "2", "--vocab_size", "16", "--iters", "1",
          "--json"])
    assert count["minilm"] == count["composite"] > 0
