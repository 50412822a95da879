"""Lightweight convolutions: a linear-cost replacement for self-attention in a decoder.

Wu et al. 2019, "Pay Less Attention with Lightweight and Dynamic Convolutions" (ICLR), and the
original code, fairseq's `LightweightConv1dTBC` and `LightConvDecoderLayer`. Names follow fairseq
(`weight`, `weight_dropout`, `linear1`, `conv`, `linear2`) so that a reader can put the two side by
side.

A lightweight convolution is a depthwise convolution (one kernel per channel, no mixing across
channels) with two twists (paper §3):

* **weight sharing**: only H kernels ("heads") for d channels; channel c uses kernel ⌈cH/d⌉, i.e.
  the d channels are cut into H contiguous groups of d/H channels that share one kernel of width K.
  A layer has H·K convolution weights instead of d·K (d = 1024, K = 7: 112 with H = 16, not 7,168).
* **softmax normalisation** of each kernel over its width, so every output is a weighted average of
  the K inputs it sees: the scale of the output does not depend on K, and the kernel is as easy to
  read as an attention row.

    DepthwiseConv(X, W, i, c) = Σ_{j=1..K} W_{c,j} · X_{i+j−⌈(K+1)/2⌉, c}
    LightConv(X, W_{⌈cH/d⌉,:}, i, c) = DepthwiseConv(X, softmax(W_{⌈cH/d⌉,:}), i, c)

The paper's equation centres the kernel on position i. A decoder must not see the future, so here
(as in fairseq's decoder, `padding_l = K − 1`) the window ends at i instead:

    LightConv_causal(X, W, i, c) = Σ_{j=1..K} softmax(W_h)_j · X_{i+j−K, c},  h = ⌈cH/d⌉

with X_{t,c} = 0 for t < 1 (left zero padding). The last kernel tap, j = K, multiplies the current
position. Training regularises the kernels with DropConnect ("weight_dropout" in fairseq):
every entry of softmax(W) is dropped with probability p and the rest divided by 1 − p. Here, as in
fairseq's CUDA layer (`LightconvLayer`), one (H, K) mask is drawn per forward pass and shared by all
sequences and positions of the batch; fairseq's pure-PyTorch path (`LightweightConv1dTBC`) draws
one per sequence, position and head instead, which needs a K-times larger unfolded input or a
(T, T) band matrix per sequence and head. The expectation is the same; the noise is more correlated here.

The cost is O(T·d·K) per sequence, linear in the length T, against attention's O(T²·d).

In the paper's blocks the convolution sits between two linear layers and a GLU:
`Linear(d, 2d) → GLU → LightConv → Linear(d, d)`, then the usual feed-forward sublayer; the first
part is `LightConvLayer` below.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def check_lightconv_input(x, n_embd):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lightconv: expected a tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != n_embd:
        raise ValueError(f"lightconv: expected input of shape (B, T, {n_embd}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"lightconv: expected a floating-point input, got {x.dtype}")


def lightconv_reference(x, weight):
    """The specification: causal LightConv as a plain weighted sum, one output position at a time.

    x: (B, T, C) input; weight: (H, K) kernel weights *already* softmax-normalised (and dropped, if
    training). Channel c uses kernel row c // (C/H). Slow (a Python loop over T and K); for tests.
    """
    B, T, C = x.shape
    H, K = weight.shape
    w = weight.repeat_interleave(C // H, dim=0)  # (C, K): row c is the kernel of channel c's head
    out = torch.zeros_like(x)
    for i in range(T):
        for j in range(K):
            t = i + j - (K - 1)  # the causal eq. with 0-based i and j: X_{i+j−K} becomes x[i+j−(K−1)]
            if t >= 0:  # positions before the sequence start are the zero padding
                out[:, i, :] += w[:, j] * x[:, t, :]
    return out


class LightweightConv1d(nn.Module):
    """Causal lightweight convolution over (B, T, C) inputs (fairseq `LightweightConv1dTBC`).

    n_embd: channels C; n_head: kernel heads H (C must divide by H); kernel_size: width K;
    weight_dropout: DropConnect probability on the normalised kernel in training.
    """

    def __init__(self, n_embd, n_head, kernel_size, weight_dropout=0.0):
        super().__init__()
        if isinstance(n_embd, bool) or not isinstance(n_embd, int) or n_embd < 1:
            raise ValueError(f"lightconv: n_embd must be a positive int, got {n_embd!r}")
        if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1 or n_embd % n_head != 0:
            raise ValueError(f"lightconv: n_head must be a positive int that divides n_embd ({n_embd}), got {n_head!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"lightconv: kernel_size must be a positive int, got {kernel_size!r}")
        if isinstance(weight_dropout, bool) or not isinstance(weight_dropout, (int, float)) or not 0.0 <= weight_dropout < 1.0:
            raise ValueError(f"lightconv: weight_dropout must be a number in [0, 1), got {weight_dropout!r}")
        self.n_embd, self.n_head, self.kernel_size = n_embd, n_head, kernel_size
        self.weight_dropout = weight_dropout
        self.weight = nn.Parameter(torch.empty(n_head, kernel_size))  # (H, K), the logits of softmax(W)
        # Xavier-uniform on the (H, K) logits, as fairseq's CUDA layer (`LightconvLayer`): uniform in
        # ±√(6 / (H + K)). (Its pure-PyTorch layer's weight is (H, 1, K), so its bound √(6 / (K + HK)) is
        # smaller.) Small logits: each kernel starts as a rough average over its window.
        nn.init.xavier_uniform_(self.weight)

    def kernel(self):
        """softmax(W) over the kernel width, then DropConnect when training. (H, K)"""
        w = F.softmax(self.weight, dim=-1)
        # DropConnect = dropout on the normalised weights; F.dropout rescales the kept ones by
        # 1/(1-p), so each kernel still sums to one in expectation (fairseq does the same).
        return F.dropout(w, p=self.weight_dropout, training=self.training)

    def forward(self, x):
        check_lightconv_input(x, self.n_embd)
        B, T, C = x.shape
        if T == 0:
            return x.clone()
        K = self.kernel_size
        w = self.kernel().to(x.dtype)  # (H, K)
        # Weight sharing made explicit: repeat each head's kernel for its C/H channels, then run an
        # ordinary depthwise (groups=C) convolution. Of the ways fairseq offers (unfold the input into
        # (B, T, C, K) windows; a (T, T) band matrix per head), this is the one that is fastest on a
        # CPU here and needs no K-times copy of the input; cuDNN has depthwise kernels as well.
        w = w.repeat_interleave(C // self.n_head, dim=0).unsqueeze(1)  # (C, 1, K)
        # conv1d computes a cross-correlation: y[i] = Σ_j w[j] · x_padded[i + j], so with K−1 zeros
        # on the left, tap j = K−1 meets position i and no tap reaches past it.
        x = F.pad(x.transpose(1, 2), (K - 1, 0))  # (B, C, K−1+T)
        y = F.conv1d(x, w, groups=C)  # (B, C, T)
        return y.transpose(1, 2)  # (B, T, C)

    def extra_repr(self):
        return (f"n_embd={self.n_embd}, n_head={self.n_head}, kernel_size={self.kernel_size}, "
                f"weight_dropout={self.weight_dropout}")


class LightConvLayer(nn.Module):
    """The paper's replacement for a self-attention sublayer (fairseq `LightConvDecoderLayer`, the
    part before the FFN, with `--decoder-glu`): Linear(d, 2d) → GLU → LightConv → Linear(d, d).

    The GLU (Dauphin et al. 2017) gates the input: GLU([a, b]) = a ⊗ σ(b), with a and b the two
    halves of linear1's output. The convolution mixes positions, linear2 mixes channels.
    `input_dropout` is applied to the input of linear1 (fairseq's `input_dropout`, 0.1 in its base
    architectures) and `dropout` to the output, before the residual add (fairseq's `dropout_module`;
    the place of GPT-1's residual dropout after attention's c_proj). GPT-1 passes its resid_pdrop as
    both (fairseq's base architectures use 0.1 for both). fairseq initialises linear1 and linear2
    Xavier-uniform; in GPT-1 they get GPT-1's N(0, 0.02), like every other weight.
    """

    def __init__(self, n_embd, n_head, kernel_size, weight_dropout=0.0, dropout=0.0, input_dropout=0.0):
        super().__init__()
        self.input_dropout = nn.Dropout(input_dropout)
        self.linear1 = nn.Linear(n_embd, 2 * n_embd)
        self.conv = LightweightConv1d(n_embd, n_head, kernel_size, weight_dropout)
        self.linear2 = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, d)
        check_lightconv_input(x, self.conv.n_embd)  # before linear1, whose own error would be less clear
        x = F.glu(self.linear1(self.input_dropout(x)), dim=-1)  # (B, T, 2d) → (B, T, d)
        x = self.conv(x)  # (B, T, d)
        return self.dropout(self.linear2(x))  # (B, T, d)


def resolve_kernel_sizes(kernel_sizes, n_layer):
    """The kernel width of each layer: `kernel_sizes` if given (one positive int per layer, or a single
    one for every layer, as fairseq's `--decoder-kernel-size-list` allows), else
    `default_kernel_sizes(n_layer)`. Raises ValueError with a clear message otherwise."""
    if kernel_sizes is None:
        return default_kernel_sizes(n_layer)
    try:
        sizes = (kernel_sizes,) if isinstance(kernel_sizes, int) else tuple(kernel_sizes)
    except TypeError:
        sizes = (kernel_sizes,)  # not a sequence: reported by the check below
    if len(sizes) == 1:
        sizes = sizes * n_layer
    if len(sizes) != n_layer or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes):
        raise ValueError(f"lightconv: kernel_sizes must be {n_layer} positive ints (one per layer) or a single "
                         f"one, got {kernel_sizes!r}")
    return sizes


def default_kernel_sizes(n_layer):
    """Kernels widen with depth: 3, 7, 15, 31, 31, 31, ... — fairseq's defaults for the paper's
    models (`decoder_kernel_size_list = [3, 7, 15, 31, 31, 31]` for the 6-layer decoder, the same
    for `lightconv_lm`; the 7-layer encoder adds one more 31), extended with 31 for deeper models."""
    return tuple(min(2 ** (i + 2) - 1, 31) for i in range(n_layer))
