"""The fused char-CNN (minilm::char_cnn) against its PyTorch reference: values, every gradient, checks.

Tolerances:
* fp32: the kernel and the reference (oneDNN/MKL convolution) sum the same E·w products in different
  orders; sums of ~100 O(1) terms differ by a few 1e-6, gradients (sums over tokens) by ~1e-5. We allow
  1e-4 relative to each tensor's largest entry.
* fp16 (10-bit mantissa, 8× finer than bf16): 0.5%.
* bf16: the kernel reads bf16 inputs, accumulates in fp32 and rounds the result once (relative error
  ≤ 2^-9 ≈ 0.2%); gradients also see bf16 grad_out and tanh' = 1 − out² from the bf16 out. We compare
  against the fp32 reference run on the same bf16-rounded inputs and allow 2% of the largest entry.
"""
import re

import pytest
import torch

import minilm  # noqa: F401
from minilm.ops import char_cnn, char_cnn_reference

BOW, EOW, PAD = 258, 259, 260
V = 262  # 0–255 bytes, BOS, EOS, BOW, EOW, PAD, +1 like allennlp
ELMO_SMALL = [(1, 4), (2, 8), (3, 16), (4, 32), (5, 64)]  # allennlp's test model filters (width, count)


def make_ids(n, L, vocab=V, pad=True, gen=None):
    """Words like ELMo's: [BOW, bytes, EOW, PAD, ...]; some tokens fill all L characters (no padding)."""
    if not pad:
        return torch.randint(0, vocab, (n, L), generator=gen)
    ids = torch.full((n, L), PAD % vocab, dtype=torch.int64)
    lengths = torch.randint(1, L - 1, (n,), generator=gen)
    lengths[0] = L - 2  # one full token
    for i, k in enumerate(lengths.tolist()):
        ids[i, 0] = BOW % vocab
        ids[i, 1:1 + k] = torch.randint(0, min(vocab, 256), (k,), generator=gen)
        ids[i, 1 + k] = EOW % vocab
    return ids


def make_params(filters, E, dtype, vocab=V, requires_grad=True):
    emb = torch.randn(vocab, E, dtype=dtype)
    ws = [(torch.randn(F, E, w) / (E * w) ** 0.5).to(dtype) for w, F in filters]
    bs = [(0.1 * torch.randn(F)).to(dtype) for _, F in filters]
    for t in (emb, *ws, *bs):
        t.requires_grad_(requires_grad)
    return emb, ws, bs


def run_with_grads(fn, ids, emb, ws, bs, act, grad_out):
    out = fn(ids, emb, ws, bs, act)
    grads = torch.autograd.grad(out, [emb, *ws, *bs], grad_out.to(out.dtype))
    return out, grads


def assert_close_rel(actual, expected, rel, what):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} × {scale:.3g}"


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("filters,L,E", [
    (ELMO_SMALL, 20, 4),                     # allennlp's test model (char dim 4)
    ([(3, 5), (1, 2), (7, 1)], 7, 3),        # unsorted widths, a single filter, L = widest filter
    ([(2, 33)], 11, 16),                     # one width, an odd filter count, ELMo's char dim
])
def test_matches_reference(act, dtype, filters, L, E):
    ids = make_ids(37, L)
    emb, ws, bs = make_params(filters, E, dtype)
    grad_out = torch.randn(37, sum(F for _, F in filters))
    out, grads = run_with_grads(char_cnn, ids, emb, ws, bs, act, grad_out)
    assert out.dtype == dtype and out.shape == (37, sum(F for _, F in filters))
    # the reference in fp32 on the same (possibly bf16-rounded) inputs
    ref_params = [t.detach().float().requires_grad_() for t in (emb, *ws, *bs)]
    r_emb, r_ws, r_bs = ref_params[0], ref_params[1:1 + len(ws)], ref_params[1 + len(ws):]
    ref, ref_grads = run_with_grads(char_cnn_reference, ids, r_emb, r_ws, r_bs, act, grad_out)
    rel = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert_close_rel(out, ref, rel, "out")
    names = ["embedding"] + [f"weights[{i}]" for i in range(len(ws))] + [f"biases[{i}]" for i in range(len(bs))]
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        assert_close_rel(g, rg, rel, f"grad {name}")


def assert_argmax_is_first_max(ids, emb, ws, argmax):
    """t* must be a maximal window and hold the same characters as the first maximal window.

    Windows of identical characters score identically in exact arithmetic, but a GEMM may round
    them differently in the last bit (they sit at different places of its tiles), so either may be
    picked; their gradients are the same, as they read the same ids. Otherwise t* is the first max.
    """
    x = torch.nn.functional.embedding(ids, emb).transpose(1, 2)  # fp64
    col = 0
    for w in ws:
        s = torch.nn.functional.conv1d(x, w)  # (N, F, T)
        top = s.amax(-1, keepdim=True)
        first = (s >= top - 1e-12).int().argmax(-1)  # (N, F)
        t = argmax[:, col:col + w.shape[0]].long()
        assert (s.gather(-1, t[..., None]) >= top - 1e-12).all(), "argmax is not a maximal window"
        win = ids.unfold(1, w.shape[2], 1)  # (N, T, w)
        idx = lambda tt: win.gather(1, tt[..., None].expand(-1, -1, w.shape[2]))  # noqa: E731
        differs = (idx(t) != idx(first)).any(-1)  # windows with other characters than the first max
        assert not differs.any(), f"argmax picked a later window with other characters: {t[differs][:5]}"
        col += w.shape[0]


def test_argmax_is_the_first_max():
    # fp64, so the only (near-)ties are windows of identical characters, e.g. inside the padding.
    ids = make_ids(16, 12)
    ids[3] = PAD
    emb, ws, bs = make_params(ELMO_SMALL, 4, torch.float64, requires_grad=False)
    out, argmax = torch.ops.minilm.char_cnn(ids, emb, ws, bs, "relu")
    assert argmax.dtype == torch.int16
    assert_argmax_is_first_max(ids, emb, ws, argmax)
    assert (argmax[3] == 0).all()


def test_repeated_characters_and_runs():
    # The kernel computes the windows inside a token's trailing run of one repeated id only once:
    # check tokens that end in runs of every length, runs that are not padding, a token that is all
    # one id, and ids from a 2-letter alphabet (many exact ties), in fp64 against the reference.
    L, vocab = 12, 9
    rows = [[1, 2, 3, 4, 5, 6, 7, 8, 3, 3, 3, 3], [4] * L, [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 5],
            [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 2], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 7, 7]]
    rows += [[1] * k + [2] * (L - k) for k in range(1, L)]
    ids = torch.cat([torch.tensor(rows), torch.randint(0, 2, (20, L))])
    emb, ws, bs = make_params([(1, 3), (3, 4), (5, 70), (12, 2)], 3, torch.float64, vocab=vocab)
    g = torch.randn(len(ids), 79, dtype=torch.float64)
    out, grads = run_with_grads(char_cnn, ids, emb, ws, bs, "tanh", g)
    ref, ref_grads = run_with_grads(char_cnn_reference, ids, emb, ws, bs, "tanh", g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    _, argmax = torch.ops.minilm.char_cnn(ids, emb.detach(), [w.detach() for w in ws], [b.detach() for b in bs], "tanh")
    assert_argmax_is_first_max(ids, emb.detach(), [w.detach() for w in ws], argmax)
    assert (argmax[1] == 0).all()  # a token of one repeated id: every window ties, the first wins


def test_ties_between_different_characters_go_to_the_first_window():
    # Two characters with one embedding row: their windows tie exactly, and the whole gradient goes to the
    # first (the reference's .max; .amax would split it between the two rows).
    emb = torch.tensor([[0.0, 0.0], [0.5, -1.0], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64, requires_grad=True)  # one filter of width 1
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    for fn in (char_cnn, char_cnn_reference):
        out = fn(torch.tensor([[1, 2, 0]]), emb, [w], [b], "relu")  # windows: 1.5, 1.5, 0
        (g_emb,) = torch.autograd.grad(out.sum(), [emb])
        assert out.item() == 1.5 and g_emb.tolist() == [[0.0, 0.0], [1.0, -1.0], [0.0, 0.0]], fn.__name__


def test_large_vocabulary():
    # A large character vocabulary makes the backward split the filters into small chunks.
    vocab = 20000
    ids = torch.randint(0, vocab, (30, 9))
    emb, ws, bs = make_params([(7, 16), (2, 5)], 2, torch.float64, vocab=vocab)
    g = torch.randn(30, 21, dtype=torch.float64)
    out, grads = run_with_grads(char_cnn, ids, emb, ws, bs, "relu", g)
    ref, ref_grads = run_with_grads(char_cnn_reference, ids, emb, ws, bs, "relu", g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_deterministic():
    ids = make_ids(200, 16)
    emb, ws, bs = make_params(ELMO_SMALL, 4, torch.float32)
    g = torch.randn(200, 124)
    a = run_with_grads(char_cnn, ids, emb, ws, bs, "tanh", g)
    b = run_with_grads(char_cnn, ids, emb, ws, bs, "tanh", g)
    for x, y in zip([a[0], *a[1]], [b[0], *b[1]]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_matches_reference_on_several_threads(act):
    # Enough tokens (600 · 124 token-filter pairs ≥ 2¹⁶) that the backward splits its work between threads,
    # each adding into a partial d(embedding) table that are summed at the end; 2,000 tokens also split the
    # forward's window tiles.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (600, 2000):
            ids = make_ids(n, 16, gen=torch.Generator().manual_seed(n))
            emb, ws, bs = make_params(ELMO_SMALL, 4, torch.float64)
            g = torch.randn(n, 124, dtype=torch.float64)
            out, grads = run_with_grads(char_cnn, ids, emb, ws, bs, act, g)
            ref, ref_grads = run_with_grads(char_cnn_reference, ids, emb, ws, bs, act, g)
            torch.testing.assert_close(out, ref)
            for name, a, b in zip(("embedding", *("weight",) * 5, *("bias",) * 5), grads, ref_grads):
                torch.testing.assert_close(a, b, msg=lambda m: f"N={n}, d{name}: {m}")
    finally:
        torch.set_num_threads(threads)


def test_autocast_casts_the_parameters_as_it_casts_a_convolutions():
    # csrc/autocast.cpp: inside torch.autocast the fp32 embedding, weights and biases are cast to its dtype
    # (as Conv1d's would be): the same result, bit for bit, as casting them by hand; fp32 gradients.
    ids = make_ids(50, 20, gen=torch.Generator().manual_seed(5))
    emb, ws, bs = make_params(ELMO_SMALL, 8, torch.float32)
    g = torch.randn(50, 124)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = char_cnn(ids, emb, ws[:-1] + [ws[-1].bfloat16()], bs, "relu")       # a mix too
    grads = torch.autograd.grad(out, [emb, *ws, *bs], g.bfloat16())
    assert out.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in grads)
    by_hand = [[t.detach().bfloat16().requires_grad_() for t in ts] for ts in ([emb], ws, bs)]
    expected = char_cnn(ids, by_hand[0][0], by_hand[1], by_hand[2], "relu")
    expected_grads = torch.autograd.grad(expected, [t for ts in by_hand for t in ts], g.bfloat16())
    assert torch.equal(out, expected)
    for a, b in zip(grads, expected_grads):
        assert torch.equal(a, b.float())
    with pytest.raises(TypeError, match="share one floating dtype"):   # outside autocast: no casts
        char_cnn(ids, emb, ws[:-1] + [ws[-1].bfloat16()], bs, "relu")


@pytest.mark.parametrize("N, L, filters", [(2000, 32, ELMO_SMALL + [(6, 64), (7, 128)]),   # one chunk per group
                                           (300, 16, ELMO_SMALL + [(7, 2048)])])           # 38 chunks in 32 groups
def test_results_are_the_same_on_any_number_of_threads(N, L, filters):
    # The backward adds the embedding gradient's partial sums in a fixed order of fixed groups of chunks, never
    # one per thread: a run resumed on a machine with another number of cores trains on as the uninterrupted run.
    ids = make_ids(N, L, gen=torch.Generator().manual_seed(3))
    emb, ws, bs = make_params(filters, 16, torch.float32)
    g = torch.randn(N, sum(f for _, f in filters), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append(run_with_grads(char_cnn, ids, emb, ws, bs, "relu", g))
    finally:
        torch.set_num_threads(threads)
    (out, grads), rest = results[0], results[1:]
    names = ("embedding", *("weight",) * len(filters), *("bias",) * len(filters))
    for n, (o, gs) in zip((2, 3, 5), rest):
        assert torch.equal(o, out), f"{n} threads: out"
        for name, a, b in zip(names, gs, grads):
            assert torch.equal(a, b), f"{n} threads: d{name}"


def test_an_embedding_of_width_zero_is_refused_in_python_and_in_cpp():
    # (as on CUDA; the backward once divided by V·E)
    ids = make_ids(3, 8, vocab=5, gen=torch.Generator().manual_seed(0))
    emb, ws, bs = make_params([(3, 4)], 0, torch.float32, vocab=5)
    with pytest.raises(ValueError, match=r"no columns \(E = 0\)"):
        char_cnn(ids, emb, ws, bs, "relu")
    with pytest.raises(RuntimeError, match=r"no columns \(E = 0\)"):
        torch.ops.minilm.char_cnn(ids, emb, ws, bs, "relu")


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_gradcheck_fp64(act):
    ids = make_ids(4, 8, vocab=6, gen=torch.Generator().manual_seed(1))
    emb, ws, bs = make_params([(1, 2), (3, 2), (8, 1)], 2, torch.float64, vocab=6)
    n = len(ws)
    fn = lambda e, *wb: char_cnn(ids, e, list(wb[:n]), list(wb[n:]), act)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (emb, *ws, *bs))


def test_opcheck():
    ids = make_ids(6, 9, vocab=20)
    emb, ws, bs = make_params([(2, 3), (4, 5)], 4, torch.float32, vocab=20)
    torch.library.opcheck(torch.ops.minilm.char_cnn.default, (ids, emb, ws, bs, "relu"))
    out, argmax = torch.ops.minilm.char_cnn(ids, emb.detach(), [w.detach() for w in ws], [b.detach() for b in bs], "tanh")
    torch.library.opcheck(torch.ops.minilm.char_cnn_backward.default,
                          (torch.randn_like(out), ids, emb.detach(), [w.detach() for w in ws], out, argmax, "tanh"))


def test_torch_compile_fullgraph():
    ids = make_ids(8, 10, vocab=20)
    emb, ws, bs = make_params([(2, 3), (4, 5)], 4, torch.float32, vocab=20)

    # aot_eager traces forward and backward with fake tensors through the op's fake and autograd
    # registrations — what the op itself must get right; inductor would add ~35 s of code generation
    # on a 2-core machine for the surrounding square().sum() only.
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(ids, emb, ws, bs):
        return char_cnn(ids, emb, ws, bs, "tanh").square().sum()

    loss = f(ids, emb, ws, bs)
    grads = torch.autograd.grad(loss, [emb, *ws, *bs])
    ref = char_cnn_reference(ids, emb, ws, bs, "tanh").square().sum()
    ref_grads = torch.autograd.grad(ref, [emb, *ws, *bs])
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4)


def _bad_cases():
    ids = make_ids(4, 8, vocab=20)
    emb, ws, bs = make_params([(2, 3), (4, 5)], 4, torch.float32, vocab=20, requires_grad=False)
    yield "id too large", (ids.clone().index_fill_(1, torch.tensor([2]), 20), emb, ws, bs, "relu"), IndexError, "ids must lie"
    yield "negative id", (ids.clone().index_fill_(1, torch.tensor([2]), -1), emb, ws, bs, "relu"), IndexError, "ids must lie"
    yield "L < widest", (ids[:, :3], emb, ws, bs, "relu"), ValueError, "fewer than the widest"
    long_ids = torch.zeros(1, 32770, dtype=torch.int64)  # L - 2 = 32,768: one past int16's range
    yield "L - w > int16", (long_ids, emb, ws, bs, "relu"), ValueError, "must be <= 32767; got L = 32770 with width 2"
    yield "lengths", (ids, emb, ws, bs[:1], "relu"), ValueError, "2 weights but 1 biases"
    yield "no widths", (ids, emb, [], [], "relu"), ValueError, "at least one"
    yield "char dim", (ids, emb[:, :3], ws, bs, "relu"), ValueError, "input channels"
    yield "int32 ids", (ids.int(), emb, ws, bs, "relu"), TypeError, "int64"
    yield "3-D ids", (ids[None], emb, ws, bs, "relu"), ValueError, "2-D"
    yield "dtype mix", (ids, emb.double(), ws, bs, "relu"), TypeError, "one floating dtype"
    yield "int emb", (ids, emb.long(), ws, bs, "relu"), TypeError, "floating"
    yield "bias shape", (ids, emb, ws, [bs[0], bs[1][:2]], "relu"), ValueError, "biases[1]"
    yield "activation", (ids, emb, ws, bs, "gelu"), ValueError, "unknown activation"
    yield "device", (ids.to("meta"), emb, ws, bs, "relu"), ValueError, "device"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input_raises(case):
    _, args, exc, msg = case
    with pytest.raises(exc, match=re.escape(msg)):
        char_cnn(*args)


@pytest.mark.parametrize("bad_id", [20, -1, 2**40])
def test_kernel_checks_ids_itself(bad_id):
    # Called directly (no Python checks), the C++ op must refuse ids outside the table, not read there.
    ids = make_ids(4, 8, vocab=20)
    ids[2, 5] = bad_id
    emb, ws, bs = make_params([(2, 3)], 4, torch.float32, vocab=20, requires_grad=False)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.minilm.char_cnn(ids, emb, ws, bs, "relu")
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.minilm.char_cnn(ids.clamp(0, 19), emb, ws, bs, "sigmoid")


def test_argmax_int16_limit():
    # argmax is int16: t* = L - w = 32,767 is the largest position it can hold, and is held exactly.
    L = 32768
    ids = torch.zeros(2, L, dtype=torch.int64)
    ids[0, -1] = 1  # token 0's best window is the last one (t* = L - 1 = 32,767), token 1's the first
    emb = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    w, b = torch.ones(1, 1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    out, argmax = torch.ops.minilm.char_cnn(ids, emb, [w], [b], "relu")
    assert argmax.dtype == torch.int16 and argmax.tolist() == [[32767], [0]]
    assert out.tolist() == [[1.0], [0.0]]
    assert char_cnn(ids, emb, [w], [b], "relu").tolist() == [[1.0], [0.0]]  # the Python wrapper takes it too
    g_emb, (g_w,), g_b = torch.ops.minilm.char_cnn_backward(torch.ones_like(out), ids, emb, [w], out, argmax, "relu")
    assert g_emb.tolist() == [[0.0], [1.0]] and g_w.item() == 1.0 and g_b.item() == 1.0
    # one character more and the C++ op refuses (the Python wrapper raises ValueError first)
    long_ids = torch.zeros(1, L + 1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="argmax is int16"):
        torch.ops.minilm.char_cnn(long_ids, emb, [w], [b], "relu")
    with pytest.raises(ValueError, match="must be <= 32767"):
        char_cnn(long_ids, emb, [w], [b], "relu")
    # a wider filter leaves room: L - w = 32,767 again
    w2 = torch.ones(1, 1, 2, dtype=torch.float64)
    _, argmax = torch.ops.minilm.char_cnn(long_ids, emb, [w2], [b], "relu")
    assert argmax.dtype == torch.int16


def test_backward_checks_argmax():
    ids = make_ids(4, 8, vocab=20)
    emb, ws, bs = make_params([(2, 3)], 4, torch.float32, vocab=20, requires_grad=False)
    out, argmax = torch.ops.minilm.char_cnn(ids, emb, ws, bs, "relu")
    argmax[1, 1] = 7  # L - w + 1 = 7 time steps: 7 is one past the end
    with pytest.raises(RuntimeError, match="argmax"):
        torch.ops.minilm.char_cnn_backward(torch.ones_like(out), ids, emb, ws, out, argmax, "relu")
    with pytest.raises(RuntimeError, match="argmax must be int16"):
        torch.ops.minilm.char_cnn_backward(torch.ones_like(out), ids, emb, ws, out, argmax.int(), "relu")


def test_meta_tensor_among_real_ones_is_refused():
    # The fake function runs for any meta argument; it must refuse a mix rather than return garbage.
    ids = make_ids(4, 8, vocab=20)
    emb, ws, bs = make_params([(2, 3)], 4, torch.float32, vocab=20, requires_grad=False)
    with pytest.raises(ValueError, match=r"one device; char_ids is on cpu, biases\[0\] on meta"):
        torch.ops.minilm.char_cnn(ids, emb, ws, [bs[0].to("meta")], "relu")
    out, argmax = torch.ops.minilm.char_cnn(ids, emb, ws, bs, "relu")
    with pytest.raises(ValueError, match="one device; grad_out is on meta, char_ids on cpu"):
        torch.ops.minilm.char_cnn_backward(out.to("meta"), ids, emb, ws, out, argmax, "relu")


def test_meta_tensors_give_the_shapes_of_a_call():
    # all on meta (e.g. a model built under torch.device("meta")): the fake functions' shapes, no id check
    emb = torch.empty(20, 4, device="meta", requires_grad=True)
    ws, bs = [torch.empty(3, 4, 2, device="meta")], [torch.empty(3, device="meta")]
    out = char_cnn(torch.zeros(5, 10, dtype=torch.int64, device="meta"), emb, ws, bs)
    assert out.shape == (5, 3) and out.is_meta
    out.sum().backward()
    assert emb.grad.shape == (20, 4) and emb.grad.is_meta


def test_double_backward_raises_instead_of_a_wrong_answer():
    ids = make_ids(4, 8, vocab=20)
    emb, ws, bs = make_params([(2, 3)], 4, torch.float64, vocab=20)
    (demb,) = torch.autograd.grad(char_cnn(ids, emb, ws, bs, "tanh").pow(2).sum(), emb, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad((demb * emb).sum(), emb)


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    import torch.autograd.forward_ad as fwAD
    ids = make_ids(4, 8, vocab=20)
    emb, ws, bs = make_params([(2, 3)], 4, torch.float64, vocab=20)
    for which in ("embedding", "weight", "bias"):
        with fwAD.dual_level():
            dual = lambda t: fwAD.make_dual(t, torch.ones_like(t))  # noqa: E731
            args = (dual(emb) if which == "embedding" else emb, [dual(ws[0])] if which == "weight" else ws,
                    [dual(bs[0])] if which == "bias" else bs)
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                char_cnn(ids, *args, "tanh")
    with fwAD.dual_level():   # no tangent anywhere: runs
        assert char_cnn(ids, emb, ws, bs, "tanh").shape == (4, 3)


def test_nan_propagates():
    # Like torch.max, a NaN among a token's windows makes its max NaN (no silent finite answer).
    ids = make_ids(6, 10, vocab=20)
    ids[ids == 13] = 12
    ids[2, 4] = 13  # only token 2 holds the id whose embedding is NaN
    emb, ws, bs = make_params([(1, 3), (3, 4)], 4, torch.float32, vocab=20, requires_grad=False)
    emb[13, 1] = float("nan")
    out = char_cnn(ids, emb, ws, bs, "tanh")
    torch.testing.assert_close(out, char_cnn_reference(ids, emb, ws, bs, "tanh"), equal_nan=True)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()


def test_a_nan_output_passes_its_gradient_through_relu_as_torch_does():
    # torch's relu backward zeroes the gradient where out <= 0 only, so a NaN out (here from a NaN bias) passes
    # it on; a kernel testing out > 0 instead would drop it silently, and every gradient would stay finite.
    # Each token repeats one character, so all its windows tie and where the max lies does not matter.
    ids = torch.arange(5).repeat_interleave(10).view(5, 10)
    params = make_params([(2, 3), (3, 4)], 4, torch.float64, vocab=20, requires_grad=False)
    params[2][1][0] = float("nan")
    grads = []
    for fn in (char_cnn, char_cnn_reference):
        emb, ws, bs = (params[0].clone().requires_grad_(), [w.clone().requires_grad_() for w in params[1]],
                       [b.clone().requires_grad_() for b in params[2]])
        fn(ids, emb, ws, bs, "relu").sum().backward()
        grads.append([t.grad for t in (emb, *ws, *bs)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert grads[0][4][0] == 5   # the NaN bias: grad_out 1 from each of the 5 tokens


def test_empty_batch():
    emb, ws, bs = make_params(ELMO_SMALL, 4, torch.float32)
    out = char_cnn(torch.zeros(0, 10, dtype=torch.int64), emb, ws, bs)
    assert out.shape == (0, 124)
    out.sum().backward()
    assert emb.grad.abs().sum() == 0
