"""LightConv (Wu et al. 2019): the causal lightweight convolution, its block, and the GPT-1 variant."""
import pytest
import torch
import torch.nn.functional as F

from minilm.lightconv import (LightConvLayer, LightweightConv1d, default_kernel_sizes,
                              lightconv_reference)


def _eval_conv(C=12, H=3, K=5, p=0.0):
    conv = LightweightConv1d(C, H, K, weight_dropout=p).double().eval()
    with torch.no_grad():  # larger logits than the init, so the kernels are far from uniform
        conv.weight.normal_(0.0, 1.0)
    return conv


@pytest.mark.parametrize("K", [1, 2, 3, 4, 7, 31])
def test_layer_equals_naive_weighted_sum_reference(K):
    # K = 31 > T: the window reaches into the left padding for every position.
    conv = _eval_conv(K=K)
    x = torch.randn(3, 9, 12, dtype=torch.float64)
    expected = lightconv_reference(x, F.softmax(conv.weight, dim=-1))
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-12)  # float64: only rounding


def test_reference_is_the_written_equation_for_one_position():
    # An independent check of the reference itself: position i = 4 of channel c (head c // (C/H))
    # with K = 3 is w0·x[2] + w1·x[3] + w2·x[4]; position 0 only sees itself (w2·x[0]).
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    w = torch.softmax(torch.randn(2, 3, dtype=torch.float64), dim=-1)  # H = 2 heads, 2 channels each
    out = lightconv_reference(x, w)
    c = 3  # second head
    torch.testing.assert_close(out[0, 4, c], w[1, 0] * x[0, 2, c] + w[1, 1] * x[0, 3, c] + w[1, 2] * x[0, 4, c])
    torch.testing.assert_close(out[0, 0, c], w[1, 2] * x[0, 0, c])


def test_channels_share_their_heads_kernel():
    # An impulse reads each channel's kernel back (reversed, since tap K-1 is the current
    # position): channels 0-1 show head 0's kernel, 2-3 head 1's, 4-5 head 2's.
    conv = _eval_conv(C=6, H=3, K=3)
    x = torch.zeros(1, 5, 6, dtype=torch.float64)
    x[0, 2, :] = 1.0  # an impulse at t = 2
    y = conv(x)
    w = F.softmax(conv.weight, dim=-1)
    for c in range(6):
        torch.testing.assert_close(y[0, 2:5, c], w[c // 2].flip(0))


def test_gradients_match_the_reference():
    conv = _eval_conv(K=4)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    gx, gw = torch.autograd.grad((conv(x) * g).sum(), (x, conv.weight))
    rx, rw = torch.autograd.grad((lightconv_reference(x, F.softmax(conv.weight, -1)) * g).sum(), (x, conv.weight))
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-12)


def test_normalised_kernels_sum_to_one():
    conv = _eval_conv(K=7)
    w = conv.kernel()
    assert w.shape == (3, 7)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_layer_sees_no_future_positions():
    conv = LightweightConv1d(16, 4, 7).eval()
    x = torch.randn(2, 20, 16)
    y = conv(x)
    for t in (0, 5, 19):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 100
        y2 = conv(x2)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=0)
        if t < 19:
            assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])  # the change did reach the future


def test_dropconnect_only_in_training():
    conv = LightweightConv1d(8, 2, 5, weight_dropout=0.5)
    x = torch.randn(2, 10, 8)
    conv.eval()
    torch.testing.assert_close(conv(x), conv(x), rtol=0, atol=0)
    torch.testing.assert_close(conv.kernel(), F.softmax(conv.weight, -1), rtol=0, atol=0)
    conv.train()
    kernels = [conv.kernel() for _ in range(20)]
    soft = F.softmax(conv.weight, -1)
    for k in kernels:  # every entry is either dropped or the normalised weight / (1 - p)
        kept = k != 0
        torch.testing.assert_close(k[kept], soft[kept] / 0.5)
    zeros = sum(int((k == 0).sum()) for k in kernels)
    assert 0.3 < zeros / (20 * 10) < 0.7  # p = 0.5 over 200 entries
    assert not torch.equal(conv(x), conv(x))  # a fresh mask each forward pass


def test_layer_without_weight_dropout_is_deterministic_in_training():
    conv = LightweightConv1d(8, 2, 5, weight_dropout=0.0).train()
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(conv(x), conv(x), rtol=0, atol=0)


def test_block_is_linear_glu_lightconv_linear():
    torch.manual_seed(1)
    layer = LightConvLayer(8, 2, 3).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    h = x @ layer.linear1.weight.T + layer.linear1.bias  # (B, T, 2d)
    a, b = h[..., :8], h[..., 8:]
    g = a * torch.sigmoid(b)  # GLU
    c = lightconv_reference(g, F.softmax(layer.conv.weight, -1))
    expected = c @ layer.linear2.weight.T + layer.linear2.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 13])
def test_shapes(T):
    layer = LightConvLayer(12, 4, 5)
    assert layer(torch.randn(3, T, 12)).shape == (3, T, 12)


def test_bad_inputs_raise_clear_errors():
    conv = LightweightConv1d(8, 2, 3)
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        conv(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        conv(torch.randn(5, 8))
    with pytest.raises(TypeError, match="floating-point"):
        conv(torch.ones(2, 5, 8, dtype=torch.long))
    for n_head in (4, 0, -2, True):
        with pytest.raises(ValueError, match="n_head must be a positive int that divides"):
            LightweightConv1d(10, n_head, 3)
    for kernel_size in (0, True):
        with pytest.raises(ValueError, match="kernel_size"):
            LightweightConv1d(8, 2, kernel_size)
    assert conv(torch.randn(2, 0, 8)).shape == (2, 0, 8)
    for p in (1.0, "0.1"):
        with pytest.raises(ValueError, match="weight_dropout"):
            LightweightConv1d(8, 2, 3, weight_dropout=p)
    for n_embd in (0, -4, 8.0):
        with pytest.raises(ValueError, match="n_embd must be a positive int"):
            LightweightConv1d(n_embd, 1, 3)
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):              # the whole sublayer checks, before linear1
        LightConvLayer(8, 2, 3)(torch.randn(2, 3, 5))


def test_default_kernel_sizes_grow_then_stay_at_31():
    assert default_kernel_sizes(1) == (3,)
    assert default_kernel_sizes(6) == (3, 7, 15, 31, 31, 31)
    assert default_kernel_sizes(12)[-1] == 31 and len(default_kernel_sizes(12)) == 12


# ---------------------------------------------------------------------------------------------------
# GPT-1 with arch="lightconv"

from minilm.gpt1 import GPT1, GPT1Config  # noqa: E402


def _lightconv_gpt(**kw):
    cfg = dict(vocab_size=50, n_ctx=24, n_layer=3, n_head=2, n_embd=16, embd_pdrop=0.0,
               attn_pdrop=0.0, resid_pdrop=0.0, arch="lightconv", weight_dropout=0.0)
    return GPT1(GPT1Config(**{**cfg, **kw}))


def test_model_uses_lightconv_blocks_with_growing_kernels():
    model = _lightconv_gpt(n_layer=5)
    assert [b.lightconv.conv.kernel_size for b in model.h] == [3, 7, 15, 31, 31]
    assert not any("attn" in name for name, _ in model.named_parameters())
    model = _lightconv_gpt(kernel_sizes=(5, 3, 1))
    assert [b.lightconv.conv.kernel_size for b in model.h] == [5, 3, 1]
    model = _lightconv_gpt(kernel_sizes=(9,))  # one width for every layer
    assert [b.lightconv.conv.kernel_size for b in model.h] == [9, 9, 9]


def test_model_sees_no_future_tokens():
    # Kernels wider than the sequence and 3 layers: every position's receptive field reaches the
    # start, so a leak of any size through any layer would show.
    model = _lightconv_gpt(kernel_sizes=(31, 31, 31)).eval()
    idx = torch.randint(0, 50, (2, 24))
    logits, _ = model(idx)
    for t in (0, 7, 22):
        idx2 = idx.clone()
        idx2[:, t + 1:] = (idx2[:, t + 1:] + 1 + torch.randint(0, 48, idx2[:, t + 1:].shape)) % 50
        logits2, _ = model(idx2)
        torch.testing.assert_close(logits2[:, :t + 1], logits[:, :t + 1], rtol=0, atol=0)
        assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


def test_model_config_errors_are_clear():
    with pytest.raises(ValueError, match="arch"):
        GPT1(GPT1Config(vocab_size=10, n_ctx=8, n_layer=1, n_head=1, n_embd=8, arch="lstm"))
    with pytest.raises(ValueError, match="kernel_sizes"):
        _lightconv_gpt(kernel_sizes=(3, 7))
    with pytest.raises(ValueError, match="kernel_sizes"):
        _lightconv_gpt(kernel_sizes=(3, 0, 7))


def test_model_weight_dropout_is_active_only_in_training():
    model = _lightconv_gpt(weight_dropout=0.3)
    idx = torch.randint(0, 50, (2, 12))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_layer_output_dropout_drops_the_output_before_the_residual():
    from minilm.lightconv import LightConvLayer

    layer = LightConvLayer(16, 2, 3, weight_dropout=0.0, dropout=0.5)
    x = torch.randn(4, 24, 16)
    want, got = layer.eval()(x), layer.train()(x)
    dropped = got == 0  # each output element zeroed with probability 0.5, the others scaled by 2
    assert abs(dropped.float().mean().item() - 0.5) < 0.05
    torch.testing.assert_close(got[~dropped], want[~dropped] * 2)
    # and in the model (resid_pdrop is the layer's dropout; the others 0): training outputs differ from eval
    model = _lightconv_gpt(resid_pdrop=0.5)
    idx = torch.randint(0, 50, (2, 12))
    assert model.h[0].lightconv.dropout.p == 0.5
    assert not torch.allclose(model.train()(idx)[0], model.eval()(idx)[0])


def test_layer_input_dropout_drops_the_input_of_linear1():
    # fairseq's input_dropout: on the sublayer's input, before linear1 (GPT-1 passes its resid_pdrop)
    layer = LightConvLayer(16, 2, 3, weight_dropout=0.0, dropout=0.0, input_dropout=0.5).train()
    x = torch.randn(4, 24, 16)
    torch.manual_seed(0)
    got = layer(x)
    torch.manual_seed(0)
    x_dropped = F.dropout(x, 0.5, training=True)
    assert (x_dropped == 0).any()
    want = layer.linear2(layer.conv.eval()(F.glu(layer.linear1(x_dropped), dim=-1)))
    torch.testing.assert_close(got, want)
    model = _lightconv_gpt(resid_pdrop=0.3)
    assert model.h[0].lightconv.input_dropout.p == 0.3


def test_model_loss_falls_on_a_tiny_synthetic_task():
    # Sequences that count up modulo 13 from a random start: the next token is a function of the
    # current one, which one LightConv tap (plus the MLP) can learn. Uniform guessing is ln 13 = 2.56;
    # this run reaches about 0.05 after 60 steps.
    torch.manual_seed(0)
    model = _lightconv_gpt(vocab_size=13, n_ctx=16, n_layer=2, weight_dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        start = torch.randint(0, 13, (8, 1))
        seq = (start + torch.arange(17)) % 13  # (8, 17)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.2
    assert losses[-1] < 0.3, losses[::10]


def test_model_generates():
    model = _lightconv_gpt(n_ctx=8)
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=12)  # beyond n_ctx = 8
    assert out.shape == (1, 13) and int(out.max()) < 50


# ---------------------------------------------------------------------------------------------------
# train_gpt1.py --arch lightconv: the same training, evaluation, checkpoints, resume and sampling

import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from script_helpers import kill_at_first_checkpoint, read_log, script_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, os.path.join(ROOT, "train_gpt1.py"), "--preset", "cpu-tiny", "--vocab_size", "200",
         "--eval_iters", "2", "--log_interval", "1000", "--arch", "lightconv"]


def _run(*args):
    return subprocess.run([*TRAIN, *args], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the king and queen rode to a castle where a knight waited with his sword and horse".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(1000)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_train_gpt1_lightconv_learns_resumes_after_sigkill_and_samples(corpus, tmp_path):
    # Weight dropout on, so the resumed run only matches if the RNG state is restored with the weights.
    args = ["--data", corpus, "--max_iters", "40", "--eval_interval", "10", "--kernel_sizes", "3,5",
            "--weight_dropout", "0.1", "--max_new_tokens", "8"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    proc = _run(*args, "--out_dir", ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(lightconv)" in proc.stdout and "-" * 60 in proc.stdout  # banner, and the sample at the end
    want = read_log(ref)
    assert [r["iter"] for r in want] == [0, 10, 20, 30, 40]
    assert want[-1]["val_loss"] < want[0]["val_loss"] - 1.0
    ckpt = torch.load(os.path.join(ref, "ckpt.pt"), weights_only=True)
    assert ckpt["model_config"]["arch"] == "lightconv" and tuple(ckpt["model_config"]["kernel_sizes"]) == (3, 5)
    assert "h.1.lightconv.conv.weight" in ckpt["model"]

    kill_at_first_checkpoint([*TRAIN, *args, "--out_dir", cut], cut)
    assert read_log(cut)[-1]["iter"] < 40, "the run finished before it could be killed"
    proc = _run("--resume", "True", "--out_dir", cut)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_log(cut)
    assert [(r["iter"], r["train_loss"], r["val_loss"]) for r in got] == \
           [(r["iter"], r["train_loss"], r["val_loss"]) for r in want]

    proc = _run("--sample", "True", "--out_dir", cut, "--start", "the king", "--max_new_tokens", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("-" * 60)[1].strip().startswith("the king")


@pytest.mark.parametrize("bad", [["--arch", "rnn"], ["--kernel_sizes", "3,x"], ["--kernel_sizes", "3,5,7"]])
def test_train_gpt1_bad_lightconv_options_are_one_line_errors(bad, corpus, tmp_path):
    proc = _run("--data", corpus, "--out_dir", str(tmp_path / "out"), "--max_iters", "1", *bad)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt1.py: error: "), proc.stderr
