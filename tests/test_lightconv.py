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
    with pytest.raises(ValueError, match="divisible"):
        LightweightConv1d(10, 4, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        LightweightConv1d(8, 2, 0)
    with pytest.raises(ValueError, match="weight_dropout"):
        LightweightConv1d(8, 2, 3, weight_dropout=1.0)


def test_default_kernel_sizes_grow_then_stay_at_31():
    assert default_kernel_sizes(1) == (3,)
    assert default_kernel_sizes(6) == (3, 7, 15, 31, 31, 31)
    assert default_kernel_sizes(12)[-1] == 31 and len(default_kernel_sizes(12)) == 12
