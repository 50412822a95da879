"""ELMo (Peters et al. 2018, "Deep Contextualized Word Representations"), as allenai/bilm-tf builds it.

Data flows top to bottom through this file:

    words ──batch_to_ids──► char ids (B, T, 50)
          ──char_embed + char-CNN (minilm.ops.char_cnn)──► (B, T, ΣF) ──highway──► ──projection──► x (B, T, P)
          ──forward_layers  (LSTMP × n_layers, left to right)──► h_fwd per layer (B, T, P)
          ──backward_layers (LSTMP × n_layers, right to left)──► h_bwd per layer (B, T, P)
          ──softmax (one, shared by both directions)──► loss = ½ (fwd + bwd)
    ELMo features = scalar mix of the layers [x; x], [h_fwd_1; h_bwd_1], ... (eq. 1).

Training (`stream_losses`, bilm-tf's graph) feeds the two stacks differently: each direction reads its own
stream of sentences (the backward one already reversed, so both run left to right), and the LSTM state
is carried from one batch to the next.

Module names are like allennlp's (`char_cnn.i`, `highway.k.carry`, `forward_layers.l.input_linearity`, ...),
but the weights keep bilm-tf's layout (gates i, j, f, o; the forget bias added at run time), so an allennlp
state dict does not load as it is. Each is commented with the bilm-tf dataset it holds (`char_embed`,
`CNN/W_cnn_i`, `CNN_high_k`, `CNN_proj`, `RNN_0` forward, `RNN_1` backward), which `load_bilm` reads,
transposes and splits. The LSTM cell is TF's `LSTMCell(num_proj=..., cell_clip=..., proj_clip=...)` written
out.

Why not `nn.LSTM(E, H, num_layers=2, bidirectional=True)`? In a stacked bidirectional LSTM, layer 2
reads the concatenation [forward; backward] of layer 1, so layer 2's "forward" state at position t
has already seen every token after t through layer 1's backward half. Trained as a language model it
would just copy the next word. A biLM is two *independent* stacks, one reading left to right and one
right to left, each predicting the next token in its own direction; their outputs are only
concatenated per layer, afterwards, to make features (tests/test_elmo.py shows both facts).

Character ids: bilm-tf numbers UTF-8 bytes 0–255, BOS 256, EOS 257, BOW 258, EOW 259, PAD 260.
Like allennlp we store every id **+1**, so that an all-zero row of 50 ids means "no token here"
(padding of a batch) and the mask is simply `(char_ids > 0).any(-1)`. The embedding table therefore
has 262 rows; `load_bilm` prepends a row to bilm-tf's (261, E) `char_embed`.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import ops
from minilm.ops._checks import id_range

# ----------------------------------------------------------------------------------------------
# Character vocabulary (bilm-tf UnicodeCharsVocabulary; allennlp ELMoCharacterMapper)

MAX_CHARS = 50           # characters per token: BOW + up to 48 bytes + EOW (+ PAD)
BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260   # bilm-tf ids
N_CHARACTERS = 262       # 261 bilm-tf symbols, shifted by +1 so that 0 can mark padding tokens
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<S>", "</S>", "<UNK>"


def word_to_char_ids(word):
    """One token → 50 character ids, already shifted by +1. `<S>` and `</S>` get their own symbols."""
    if not isinstance(word, str):
        raise TypeError(f"word_to_char_ids: tokens must be str, got {type(word).__name__}")
    if word == BOS_TOKEN:
        body = [BOS_CHAR]
    elif word == EOS_TOKEN:
        body = [EOS_CHAR]
    else:
        # 48 bytes: Hangul and CJK take 3 bytes per character, so a Korean word keeps 16 syllables
        body = list(word.encode("utf-8", errors="ignore")[: MAX_CHARS - 2])   # bilm-tf, allennlp: "ignore"
    ids = [BOW_CHAR] + body + [EOW_CHAR]
    ids += [PAD_CHAR] * (MAX_CHARS - len(ids))
    return [i + 1 for i in ids]


def batch_to_ids(sentences):
    """list of B sentences (lists of str tokens) → LongTensor (B, T+2, 50), T the longest sentence.

    Adds `<S>` and `</S>` around every sentence; shorter sentences are padded with all-zero rows.
    """
    if not isinstance(sentences, (list, tuple)) or not sentences:
        raise ValueError("batch_to_ids: expected a non-empty list of sentences (lists of str tokens)")
    for s in sentences:
        if isinstance(s, str) or not isinstance(s, (list, tuple)):
            raise TypeError("batch_to_ids: each sentence must be a list of str tokens, "
                            f"got {type(s).__name__} (split strings into words first)")
    T = max(len(s) for s in sentences) + 2
    ids = torch.zeros(len(sentences), T, MAX_CHARS, dtype=torch.long)
    for b, s in enumerate(sentences):
        rows = [word_to_char_ids(w) for w in [BOS_TOKEN, *s, EOS_TOKEN]]
        ids[b, : len(rows)] = torch.tensor(rows, dtype=torch.long)
    return ids


# ----------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class ELMoConfig:
    # token encoder: options.json "char_cnn"
    n_characters: int = N_CHARACTERS
    max_characters_per_token: int = MAX_CHARS
    char_embed_dim: int = 16
    filters: tuple = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))  # (width, n)
    activation: str = "relu"          # after max-pooling each filter; relu in the paper's models
    n_highway: int = 2
    # biLM: options.json "lstm"
    projection_dim: int = 512
    lstm_dim: int = 4096
    n_layers: int = 2
    cell_clip: float | None = 3.0
    proj_clip: float | None = 3.0
    use_skip_connections: bool = True
    dropout: float = 0.1              # on each layer's input and on the top output (training only)
    # softmax: not part of the released weights; 0 makes a feature extractor without one
    vocab_size: int = 0
    n_negative_samples: int = 8192    # training uses sampled softmax when vocab_size > this

    def __post_init__(self):
        # checked here, so that a bad options.json, checkpoint or command line fails at once in one line
        def check(name, value, ok, want):
            if isinstance(value, bool) or not ok(value):
                raise ValueError(f"ELMoConfig: {name} must be {want}, got {value!r}")

        def is_int(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        check("filters", self.filters, lambda f: isinstance(f, (list, tuple)) and len(f) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and is_int(p[0], 1) and is_int(p[1], 1) for p in f),
            "a non-empty list of [width, count] pairs of positive integers")
        self.filters = tuple((w, n) for w, n in self.filters)
        for name in ("n_characters", "max_characters_per_token", "char_embed_dim", "projection_dim", "lstm_dim", "n_layers"):
            check(name, getattr(self, name), lambda v: is_int(v, 1), "an integer ≥ 1")
        for name in ("n_highway", "vocab_size", "n_negative_samples"):
            check(name, getattr(self, name), lambda v: is_int(v, 0), "an integer ≥ 0")
        for name in ("cell_clip", "proj_clip"):   # None: no clipping (TF's default)
            check(name, getattr(self, name), lambda v: v is None or isinstance(v, (int, float)) and v > 0,
                  "a number > 0 or null")
        check("dropout", self.dropout, lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)")
        if not isinstance(self.use_skip_connections, bool):
            raise ValueError(f"ELMoConfig: use_skip_connections must be true or false, got {self.use_skip_connections!r}")
        if self.activation not in ("relu", "tanh"):
            raise ValueError(f"ELMoConfig: activation must be 'relu' or 'tanh', got {self.activation!r}")
        # bilm-tf leaves out CNN_proj when n_filters == projection_dim, and builds its LSTMCell without num_proj
        # (no W_P_0, no proj_clip) when projection_dim >= lstm_dim. This BiLM always has both, so such options
        # would describe a model other than bilm-tf's: refused rather than silently built differently.
        if self.projection_dim >= self.lstm_dim:
            raise ValueError(f"ELMoConfig: projection_dim ({self.projection_dim}) must be smaller than lstm_dim "
                             f"({self.lstm_dim}): bilm-tf builds no LSTM projection otherwise")
        if self.projection_dim == self.n_filters:
            raise ValueError(f"ELMoConfig: projection_dim must differ from the filter count ({self.n_filters}): "
                             "bilm-tf builds no CNN projection then")

    @property
    def n_filters(self):
        return sum(n for _, n in self.filters)

    def to_dict(self):
        d = asdict(self)
        d["filters"] = [list(f) for f in self.filters]
        return d

    @classmethod
    def from_dict(cls, d):
        """The config to_dict made (a ValueError for a field it does not have: a typo would build the default)."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ELMoConfig: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        return cls(**d)


# The three released bilm-tf models (all: 2048-filter CNN, relu, clips 3/3, skip connections) and a tiny one.
# load_bilm takes every setting, the activation included, from the model's own options file.
PRESETS = {
    "tiny": dict(filters=((1, 16), (2, 16), (3, 32), (4, 64), (5, 128)), n_highway=1,
                 lstm_dim=256, projection_dim=64),
    "small": dict(lstm_dim=1024, projection_dim=128, n_highway=1),       # 13,593,312 params
    "medium": dict(lstm_dim=2048, projection_dim=256, n_highway=1),      # 28,027,744
    "original": dict(lstm_dim=4096, projection_dim=512, n_highway=2),    # 93,600,864
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown ELMo preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ELMoConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# Token encoder parts


class Highway(nn.Module):
    """Srivastava et al. 2015, as bilm-tf: g = σ(x W_carry + b_carry), y = g·relu(x W_transform + b_transform) + (1−g)·x.

    Names differ between the two: the paper calls g (the gate on the transformed path) the transform
    gate T, and 1 − g the carry gate C; bilm-tf's code calls the same g `carry_gate` (weights W_carry,
    b_carry) and the relu branch `transform_gate`. We keep the checkpoint's names.
    """

    def __init__(self, dim):
        super().__init__()
        self.carry = nn.Linear(dim, dim)       # CNN_high_k/W_carry, b_carry
        self.transform = nn.Linear(dim, dim)   # CNN_high_k/W_transform, b_transform

    def forward(self, x):                      # (N, D) -> (N, D)
        g = torch.sigmoid(self.carry(x))
        return g * F.relu(self.transform(x)) + (1.0 - g) * x


class LSTMP(nn.Module):
    """One layer of LSTM with a projection (Sak et al. 2014), TF's LSTMCell(num_proj, cell_clip, proj_clip).

        z = [x, m_prev] W + B                      split into i, j, f, o (TF's gate order)
        c = σ(f + 1.0)·c_prev + σ(i)·tanh(j)       forget bias 1.0 added here, not stored in B
        c = clip(c, ±cell_clip)
        m = clip((σ(o)·tanh(c)) W_P, ±proj_clip)   m is both the output and the recurrent state

    W is kept as two Linear maps (its first `in` rows act on x, the rest on m_prev), so the input
    part (with B and the forget bias) is one matmul over all time steps and only m_prev W_rec runs
    inside the loop.
    """

    def __init__(self, input_size, cell_size, proj_size, cell_clip=None, proj_clip=None):
        super().__init__()
        self.cell_size, self.proj_size = cell_size, proj_size
        self.cell_clip, self.proj_clip = cell_clip, proj_clip
        self.input_linearity = nn.Linear(input_size, 4 * cell_size, bias=False)   # W_0[:in]
        self.state_linearity = nn.Linear(proj_size, 4 * cell_size, bias=True)     # W_0[in:], B
        self.state_projection = nn.Linear(cell_size, proj_size, bias=False)       # W_P_0

    def forward(self, x, state=None, lengths=None):
        """x (B, T, in) → (m (B, T, P), (m, c) the state after the last step: (B, P), (B, C)).

        state: the (m, c) to start from; None: zeros. lengths (B,): each row's state stops changing after
        its own last real step (so the state returned is the one after that step); None: after step T.
        """
        if torch.is_autocast_enabled(x.device.type):
            # TF's cell keeps its state in fp32. Under autocast, c and m would be rounded to bf16/fp16 at every
            # one of the T steps, and the error compounds: the recurrence runs in the weights' own precision,
            # and only the outputs are rounded to the autocast dtype (the state returned keeps its precision).
            with torch.autocast(x.device.type, enabled=False):
                out, state = self.forward(x.to(self.state_linearity.weight.dtype), state, lengths)
            return out.to(torch.get_autocast_dtype(x.device.type)), state
        B, T, _ = x.shape
        C = self.cell_size
        # the input part of z for every step at once, plus B and TF's forget bias 1.0 on the f block
        forget_bias = torch.zeros(4 * C, dtype=x.dtype, device=x.device)
        forget_bias[2 * C: 3 * C] = 1.0
        xw = (self.input_linearity(x) + self.state_linearity.bias + forget_bias).transpose(0, 1)   # (T, B, 4C)
        W_rec = self.state_linearity.weight.t()   # (P, 4C)
        if state is None:
            m, c = x.new_zeros(B, self.proj_size), x.new_zeros(B, C)
        else:                                     # carried from an earlier call: to x's dtype and device
            m, c = (s.to(device=x.device, dtype=x.dtype) for s in state)
        outputs = []
        for t in range(T):
            z = torch.addmm(xw[t], m, W_rec)                # (B, 4C) = [x_t, m_prev] W + B (+ forget bias)
            i, j, f, o = z.chunk(4, dim=1)                  # (B, C) each
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(j)
            if self.cell_clip:
                c_new = c_new.clamp(-self.cell_clip, self.cell_clip)
            m_new = self.state_projection(torch.sigmoid(o) * torch.tanh(c_new))   # (B, P)
            if self.proj_clip:
                m_new = m_new.clamp(-self.proj_clip, self.proj_clip)
            outputs.append(m_new)
            if lengths is None:
                m, c = m_new, c_new
            else:                                           # rows already past their end keep their state
                real = (t < lengths).unsqueeze(1)           # (B, 1)
                m, c = torch.where(real, m_new, m), torch.where(real, c_new, c)
        out = torch.stack(outputs, dim=1) if outputs else x.new_zeros(B, 0, self.proj_size)   # (B, T, P)
        return out, (m, c)


def reverse_padded(x, lengths):
    """Reverse each row of x (B, T, ...) within its own length; padding stays where it is.

    The backward LM must start from each sentence's *own* last token, not from the batch's padding.
    Applying it twice gives x back.
    """
    B, T = x.shape[:2]
    t = torch.arange(T, device=x.device).expand(B, T)
    L = lengths.view(B, 1)
    index = torch.where(t < L, L - 1 - t, t)      # (B, T)
    index = index.view(B, T, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


# ----------------------------------------------------------------------------------------------
# The biLM


class BiLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # token encoder Θ_x, shared by both directions (bilm-tf: char_embed, CNN, CNN_high_k, CNN_proj)
        self.char_embed = nn.Embedding(c.n_characters, c.char_embed_dim)             # (262, E)
        self.char_cnn = nn.ModuleList(nn.Conv1d(c.char_embed_dim, n, w) for w, n in c.filters)
        self.highway = nn.ModuleList(Highway(c.n_filters) for _ in range(c.n_highway))
        self.projection = nn.Linear(c.n_filters, c.projection_dim)
        # two independent LSTM stacks (bilm-tf RNN_0, RNN_1)
        P = c.projection_dim
        self.forward_layers = nn.ModuleList(
            LSTMP(P, c.lstm_dim, P, c.cell_clip, c.proj_clip) for _ in range(c.n_layers))
        self.backward_layers = nn.ModuleList(
            LSTMP(P, c.lstm_dim, P, c.cell_clip, c.proj_clip) for _ in range(c.n_layers))
        self.dropout = nn.Dropout(c.dropout)
        # one softmax shared by both directions: eq. (3) ties Θ_x (the token encoder) and Θ_s (the softmax)
        self.softmax = nn.Linear(P, c.vocab_size) if c.vocab_size > 0 else None
        self._init_weights()

    def _init_weights(self):
        """bilm-tf's initialisers (bilm/training.py), so training from scratch behaves like the original."""
        c = self.config
        nn.init.uniform_(self.char_embed.weight, -1.0, 1.0)
        for conv, (w, _) in zip(self.char_cnn, c.filters):
            if c.activation == "relu":   # "Kim et al 2015, +/- 0.05"
                nn.init.uniform_(conv.weight, -0.05, 0.05)
            else:                        # tanh: "glorot init"
                nn.init.normal_(conv.weight, 0.0, math.sqrt(1.0 / (w * c.char_embed_dim)))
            nn.init.zeros_(conv.bias)
        for hw in self.highway:
            nn.init.normal_(hw.carry.weight, 0.0, math.sqrt(1.0 / c.n_filters))
            nn.init.constant_(hw.carry.bias, -2.0)          # start by mostly carrying x through
            nn.init.normal_(hw.transform.weight, 0.0, math.sqrt(1.0 / c.n_filters))
            nn.init.zeros_(hw.transform.bias)
        nn.init.normal_(self.projection.weight, 0.0, math.sqrt(1.0 / c.n_filters))
        nn.init.zeros_(self.projection.bias)
        for layer in [*self.forward_layers, *self.backward_layers]:
            # TF's default glorot_uniform over the whole W_0 (in + P, 4C), then over W_P_0 (C, P)
            fan_in, fan_out = layer.input_linearity.in_features + layer.proj_size, 4 * layer.cell_size
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(layer.input_linearity.weight, -bound, bound)
            nn.init.uniform_(layer.state_linearity.weight, -bound, bound)
            nn.init.zeros_(layer.state_linearity.bias)
            nn.init.xavier_uniform_(layer.state_projection.weight)
        if self.softmax is not None:
            nn.init.normal_(self.softmax.weight, 0.0, 1.0 / math.sqrt(c.projection_dim))
            nn.init.zeros_(self.softmax.bias)

    def _check(self, char_ids):
        c = self.config
        if not isinstance(char_ids, torch.Tensor):
            raise TypeError(f"BiLM: char_ids must be a torch.Tensor, got {type(char_ids).__name__}")
        if char_ids.dim() != 3 or char_ids.shape[-1] != c.max_characters_per_token:
            raise ValueError(f"BiLM: char_ids must be (B, T, {c.max_characters_per_token}) as made by "
                             f"batch_to_ids, got shape {tuple(char_ids.shape)}")
        if char_ids.dtype != torch.long:
            raise TypeError(f"BiLM: char_ids must be int64, got {char_ids.dtype}")
        if char_ids.numel() and not torch.compiler.is_compiling():   # .tolist() would break a compiled graph
            lo, hi = id_range(char_ids)
            if lo < 0 or hi >= c.n_characters:
                raise ValueError(f"BiLM: character ids must lie in [0, {c.n_characters}), got [{lo}, {hi}]")

    def _check_state(self, state, batch_size):
        if state is None:
            return
        if not isinstance(state, dict):
            raise TypeError(f"BiLM: state must be a dict (empty at first) or None, got {type(state).__name__}")
        if not state:
            return
        directions = (state.get("forward"), state.get("backward"))
        if set(state) != {"forward", "backward"} or not self._holds_states(directions, None):
            raise ValueError("BiLM: state must be a dict that only BiLM calls of this model have filled (start with "
                             "{}): per direction, its layers' (m, c)")
        if state["forward"][0][0].shape[0] != batch_size:
            raise ValueError(f"BiLM: state holds {state['forward'][0][0].shape[0]} rows, this batch has "
                             f"{batch_size}: carried state needs the same batch size")

    def _holds_states(self, directions, batch_size):
        """Whether directions is two directions' per-layer (m, c) states of this model (for batch_size rows; any
        number of rows, the same in every tensor, when batch_size is None)."""
        c = self.config
        try:
            rows = batch_size if batch_size is not None else directions[0][0][0].shape[0]
            want = ((rows, c.projection_dim), (rows, c.lstm_dim))
            return len(directions) == 2 and all(len(layers) == c.n_layers and all(
                len(mc) == 2 and all(isinstance(t, torch.Tensor) and tuple(t.shape) == w for t, w in zip(mc, want))
                for mc in layers) for layers in directions)
        except (TypeError, IndexError, KeyError, AttributeError):
            return False

    def check_stream_state(self, state, batch_size):
        """A ValueError unless state is None or what stream_losses returns for batch_size rows."""
        if state is not None and not self._holds_states(state, batch_size):
            c = self.config
            raise ValueError(f"BiLM.stream_losses: state must be None or what it returned for {batch_size} rows: per "
                             f"direction, {c.n_layers} layers of (m ({batch_size}, {c.projection_dim}), c ({batch_size}, "
                             f"{c.lstm_dim}))")

    def token_embedding(self, char_ids):
        """(B, T, 50) char ids → (B, T, P) context-independent token representations."""
        B, T, L = char_ids.shape
        # char-CNN (paper section 3.4; Kim et al. 2015): per filter, conv over characters → max over
        # time → + bias → activation, concatenated. One fused op; minilm.ops.char_cnn_reference is the
        # same thing in plain PyTorch.
        x = ops.char_cnn(char_ids.reshape(B * T, L), self.char_embed.weight,
                         [conv.weight for conv in self.char_cnn], [conv.bias for conv in self.char_cnn],
                         activation=self.config.activation)          # (B·T, ΣF)
        for hw in self.highway:
            x = hw(x)                                                # (B·T, ΣF)
        x = self.projection(x)                                       # (B·T, P), no activation
        return x.view(B, T, self.config.projection_dim)   # (B, T, P); B or T may be 0

    def _run_stack(self, layers, x, states=None, lengths=None):
        """One direction's LSTM stack → (every layer's output, each (B, T, P); each layer's last (m, c))."""
        outputs, last = [], []
        for k, layer in enumerate(layers):
            x = self.dropout(x)          # bilm-tf DropoutWrapper(input_keep_prob) around every cell
            h, s = layer(x, states[k] if states else None, lengths)
            if self.config.use_skip_connections and k > 0:
                h = h + x                # ResidualWrapper inside the DropoutWrapper: adds the dropped input
            outputs.append(h)
            last.append(s)
            x = h
        return outputs, last

    def forward(self, char_ids, next_ids=None, previous_ids=None, state=None):
        """char_ids (B, T, 50) from batch_to_ids → (layers, mask, losses).

        layers: n_layers + 1 tensors (B, T, 2P): [x; x] for the token layer, then [h_fwd; h_bwd];
                zero at padding positions.
        mask:   (B, T) bool, True at real tokens (including <S> and </S>).
        losses: None, or with next_ids and previous_ids (B, T) word ids (−1 = no target), a (2,)
                tensor [forward, backward] of mean cross-entropies in nats.
        state:  None: every sentence starts from zero LSTM states (minilm's features; training, with
                the state carried from batch to batch, is stream_losses).
                A dict: row b continues from where row b of the previous call with this dict left
                off, as bilm-tf's dumps and allennlp's Elmo do: an empty dict starts from zeros, and
                the call stores each direction's per-layer (m, c) after each row's sentence in it
                (detached; every call must have the same batch size). The dict is updated in place, so
                pass it to the BiLM itself: DDP and DataParallel wrappers copy their keyword arguments.
        """
        self._check(char_ids)
        self._check_state(state, char_ids.shape[0])
        mask = (char_ids > 0).any(-1)                                # (B, T)
        lengths = mask.sum(1)                                        # (B,)
        x = self.token_embedding(char_ids)                           # (B, T, P)
        # carried state stops at each row's own last token; without it the padding steps are harmless
        ends = lengths if state is not None else None
        fwd_from, bwd_from = (state.get("forward"), state.get("backward")) if state else (None, None)
        h_fwd, last_fwd = self._run_stack(self.forward_layers, x, fwd_from, ends)     # [(B, T, P)] × n_layers
        h_bwd, last_bwd = self._run_stack(self.backward_layers, reverse_padded(x, lengths), bwd_from, ends)
        h_bwd = [reverse_padded(h, lengths) for h in h_bwd]          # back to left-to-right order
        if state is not None:           # detached, as allennlp's: a later call never backpropagates into this one
            state.update({name: [(m.detach(), c.detach()) for m, c in last]
                          for name, last in (("forward", last_fwd), ("backward", last_bwd))})
        m = mask.unsqueeze(-1).to(x.dtype)
        layers = [torch.cat([x, x], -1) * m] + [torch.cat([f, b], -1) * m for f, b in zip(h_fwd, h_bwd)]
        losses = None
        if next_ids is not None or previous_ids is not None:
            if next_ids is None or previous_ids is None:
                raise ValueError("BiLM: give both next_ids and previous_ids, or neither")
            self._check_targets(next_ids, "next_ids")
            self._check_targets(previous_ids, "previous_ids")
            # paper eq. (3): maximise log p(t_k | t_1..t_k-1) + log p(t_k | t_k+1..t_N); we report both
            losses = torch.stack([self.lm_loss(self.dropout(h_fwd[-1]), next_ids),
                                  self.lm_loss(self.dropout(h_bwd[-1]), previous_ids)])
        return layers, mask, losses

    def stream_losses(self, char_ids, targets, state=None, token_index=None):
        """bilm-tf's training graph, where each direction reads its own stream of sentences, left to right.

        char_ids (2, B, T, 50): [0] the forward LM's inputs (sentences `<S> w_1 … w_n`, one after another),
                 [1] the backward LM's (sentences reversed, `</S> w_n … w_1`); no padding.
                 Or, with token_index (2, B, T), the (U, 50) char ids of the batch's distinct words, which
                 token_index picks from: each is encoded once (the same losses, a fraction of the char-CNN's
                 work: real text repeats its words; train_elmo.py does this).
        targets  (2, B, T): the softmax id of the token that follows each input in its own stream.
        state:   None (zeros), or the state the previous call returned: row b goes on where it stopped,
                 as bilm-tf carries the LSTM state from one batch to the next (not backpropagated into).
        → (losses (2,) [forward, backward], mean cross-entropies in nats; the state after the last step:
           per direction a list of each layer's (m (B, P), c (B, C)), detached).
        """
        if token_index is None:
            if not (isinstance(char_ids, torch.Tensor) and char_ids.dim() == 4 and char_ids.shape[0] == 2):
                raise ValueError("BiLM.stream_losses: char_ids must be (2, B, T, 50): the forward and backward "
                                 f"streams, got {_shape(char_ids)}")
            _, B, T, L = char_ids.shape
            self._check_stream_size(B, T)
            self._check(char_ids.reshape(2 * B, T, L))
            self.check_stream_state(state, B)
            x = self.token_embedding(char_ids.reshape(2 * B, T, L)).view(2, B, T, -1)   # one char-CNN call for both
        else:
            if not (isinstance(token_index, torch.Tensor) and token_index.dim() == 3 and token_index.shape[0] == 2
                    and token_index.dtype == torch.long):
                what = f"{_shape(token_index)} {token_index.dtype}" if isinstance(token_index, torch.Tensor) else _shape(token_index)
                raise ValueError(f"BiLM.stream_losses: token_index must be (2, B, T) int64, got {what}")
            if not (isinstance(char_ids, torch.Tensor) and char_ids.dim() == 2):
                raise ValueError("BiLM.stream_losses: with token_index, char_ids must be (U, 50): the distinct words, "
                                 f"got {_shape(char_ids)}")
            B, T = token_index.shape[1:]
            self._check_stream_size(B, T)
            self._check(char_ids[None])
            if token_index.numel() and not all(0 <= i < len(char_ids) for i in id_range(token_index)):
                raise ValueError(f"BiLM.stream_losses: token_index must pick one of the {len(char_ids)} rows of char_ids")
            self.check_stream_state(state, token_index.shape[1])
            words = self.token_embedding(char_ids[None])[0]                   # (U, P)
            # index_select, not words[token_index]: see _sampled_softmax_loss
            x = words.index_select(0, token_index.reshape(-1)).view(2, B, T, -1)   # (2, B, T, P)
        self._check_targets(targets, "targets")
        if tuple(targets.shape) != (2, B, T):
            raise ValueError(f"BiLM.stream_losses: targets must be (2, B, T) = {(2, B, T)}, like the inputs, got "
                             f"{tuple(targets.shape)}")
        losses, last = [], []
        for d, layers in enumerate((self.forward_layers, self.backward_layers)):
            h, s = self._run_stack(layers, x[d], state[d] if state is not None else None)
            losses.append(self.lm_loss(self.dropout(h[-1]), targets[d]))
            last.append([(m.detach(), c.detach()) for m, c in s])
        return torch.stack(losses), last

    @staticmethod
    def _check_stream_size(B, T):
        if B < 1 or T < 1:   # the carried state needs rows, and a loss needs steps
            raise ValueError(f"BiLM.stream_losses: needs at least one row and one step, got B = {B}, T = {T}")

    def _check_targets(self, targets, name):
        """Softmax targets: int64 word ids in [0, vocab_size), or −1 (ignored); one host sync."""
        if self.softmax is None:
            raise ValueError("BiLM: this model has no softmax (vocab_size=0); it can only make features")
        if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long:   # cross_entropy's target dtype
            what = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"BiLM: {name} must be integer word ids (int64), got {what}")
        if targets.numel() and not torch.compiler.is_compiling():
            lo, hi = id_range(targets)
            if lo < -1 or hi >= self.config.vocab_size:
                raise ValueError(f"BiLM: {name} must be word ids in [0, {self.config.vocab_size}) or −1 (ignored), "
                                 f"got values in [{lo}, {hi}]")

    def lm_loss(self, h, targets):
        """Mean cross-entropy (nats) of the shared softmax over h (B, T, P) against targets (B, T), −1 ignored."""
        if self.softmax is None:
            raise ValueError("BiLM: this model has no softmax (vocab_size=0); it can only make features")
        if targets.shape != h.shape[:2]:
            raise ValueError(f"BiLM: targets must be {tuple(h.shape[:2])}, got {tuple(targets.shape)}")
        keep = targets >= 0
        h, targets = h[keep], targets[keep]                          # (N, P), (N,)
        if h.shape[0] == 0:   # nothing to predict (every target −1): 0, as allennlp's LM, not the NaN of a mean of none
            # an fp32 zero that reaches the softmax's parameters too, so that every parameter gets a (zero) gradient
            return (h.float().sum() + self.softmax.weight.sum() + self.softmax.bias.sum()) * 0.0
        c = self.config
        if self.training and 0 < c.n_negative_samples < c.vocab_size:
            return self._sampled_softmax_loss(h, targets)
        return F.cross_entropy(self.softmax(h), targets)             # full softmax: a true perplexity

    def _sampled_softmax_loss(self, h, targets):
        """TF's sampled_softmax_loss with its defaults, as bilm-tf trains (Jean et al. 2015).

        K distinct candidates for the whole batch from TF's log-uniform sampler (unique=True, see
        `log_uniform_candidates`). Every logit, true or sampled, is corrected by −log Q(id), Q the
        expected count of that id among the num_tries draws; a candidate equal to a row's true id is
        masked out of that row (remove_accidental_hits=True). The result estimates the full-softmax loss
        only roughly: exp() of it is not a perplexity.
        """
        V, K = self.config.vocab_size, self.config.n_negative_samples
        sampled, num_tries = log_uniform_candidates(V, K, h.device)                             # (K,)

        def log_expected_count(ids):
            return torch.log(log_uniform_expected_count(ids, V, K, num_tries))                   # fp32

        # rows picked with index_select, not W[targets]: on the CPU, indexing's backward adds a word's repeated
        # rows with parallel atomics, in an order that changes from run to run, so two runs of one seed drift apart
        W, b = self.softmax.weight, self.softmax.bias
        W_true, b_true = W.index_select(0, targets), b.index_select(0, targets)                # (N, P), (N,)
        W_sampled, b_sampled = W.index_select(0, sampled), b.index_select(0, sampled)          # (K, P), (K,)
        true_logits = (h * W_true).sum(-1) + b_true - log_expected_count(targets)                # (N,)
        sampled_logits = h @ W_sampled.t() + b_sampled - log_expected_count(sampled)              # (N, K)
        sampled_logits = sampled_logits.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([true_logits[:, None], sampled_logits], dim=1)                        # (N, 1+K)
        return F.cross_entropy(logits, torch.zeros_like(targets))


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def log_uniform_candidates(V, K, device=None):
    """TF's log_uniform_candidate_sampler(range_max=V, num_sampled=K, unique=True) → (ids (K,), num_tries).

    Draws ids i.i.d. from P(k) = log((k+2)/(k+1)) / log(V+1) (k = floor(exp(u·log(V+1))) − 1, u uniform),
    keeping the first K distinct ones; num_tries is how many draws that took. The draws come in chunks
    (K, then doubling) from torch's CPU generator, on the host as TF samples (so a CUDA run waits for no
    kernel here; the ids are copied to `device` at the end), and the result is a function of that
    generator's state: a seeded iteration samples the same candidates again. Needs K ≤ V.
    """
    if not 0 < K <= V:
        raise ValueError(f"log_uniform_candidates: need 0 < K ≤ V, got K={K}, V={V}")
    log_range = math.log(V + 1)
    draws = torch.empty(0, dtype=torch.long)
    while True:
        # u in float32, where TF draws a double: float32's 24-bit grid gives each id 0.99-1.01x the P(k) that
        # the correction assumes at the default 10,000 words, but 0.42-1.93x at bilm-tf's 793,471 (counted
        # over the whole grid). Kept: float64 draws change every run's samples, and the default run then met
        # sampled softmax's rare-word failure (see the README).
        u = torch.rand(max(K, len(draws)))
        new = (torch.exp(u * log_range).floor().long() - 1).clamp_(0, V - 1)     # float rounding safety
        draws = torch.cat([draws, new])                                         # the stream so far
        distinct, inverse = torch.unique(draws, return_inverse=True)
        if len(distinct) >= K:
            break
    # where each distinct id first appeared in the stream; the K earliest are the sample
    position = torch.arange(len(draws))
    first = torch.full((len(distinct),), len(draws)).scatter_reduce_(0, inverse, position, "amin")
    first = first.sort().values[:K]                                            # (K,) positions in the stream
    return draws[first].to(device, non_blocking=True), int(first[-1]) + 1


def log_uniform_expected_count(ids, V, K, num_tries):
    """TF's expected count Q of each id among the sampler's num_tries draws (range_sampler.cc): p·K when
    the K draws were all distinct (num_tries == K), else 1 − (1 − p)^num_tries; p = P(id) as above."""
    p = torch.log1p(1.0 / (ids.float() + 1.0)) / math.log(V + 1)                # log((k+2)/(k+1)) / log(V+1)
    return p * K if num_tries == K else -torch.expm1(num_tries * torch.log1p(-p))


def estimate_flops_per_token(config, vocab_size, training=True):
    """Model FLOPs per token (2 per multiply-add; backward ≈ 2 × forward) for throughput figures.

    Counts every convolution position, both directions, and the softmax rows actually scored
    (the K samples when training with sampled softmax, else the whole vocabulary). A training step
    (BiLM.stream_losses, bilm-tf's graph) encodes each direction's own stream, so the token encoder
    counts twice per token. These are the model's FLOPs, not the work done: train_elmo.py encodes each
    distinct word of a batch only once.
    """
    c = config
    L, E, D, P, C = c.max_characters_per_token, c.char_embed_dim, c.n_filters, c.projection_dim, c.lstm_dim
    cnn = sum(2 * (L - w + 1) * w * E * n for w, n in c.filters)
    dense = 2 * (2 * D * D * c.n_highway + D * P)
    lstm = 2 * 2 * c.n_layers * ((P + P) * 4 * C + C * P)
    sampled = training and 0 < c.n_negative_samples < vocab_size
    softmax = 2 * 2 * P * (c.n_negative_samples if sampled else vocab_size)
    encoder = cnn + dense
    return 3 * (2 * encoder + lstm + softmax) if training else encoder + lstm + softmax


# ----------------------------------------------------------------------------------------------
# ELMo: a task-specific combination of the frozen biLM's layers


class ScalarMix(nn.Module):
    """ELMo eq. (1): ELMo_k = γ Σ_j s_j h_kj with s = softmax(w); w starts at 0 (an average), γ at 1.

    do_layer_norm (bilm-tf weight_layers): normalise each layer by one mean and one variance over
    all its unmasked elements (positions × features) before mixing — not nn.LayerNorm.
    """

    def __init__(self, n_layers, do_layer_norm=False):
        super().__init__()
        self.do_layer_norm = do_layer_norm
        self.scalar_parameters = nn.Parameter(torch.zeros(n_layers))   # w
        self.gamma = nn.Parameter(torch.ones(1))                        # γ

    def forward(self, layers, mask):               # layers: [(B, T, D)] × n_layers, mask (B, T)
        if len(layers) != self.scalar_parameters.numel():
            raise ValueError(f"ScalarMix: expected {self.scalar_parameters.numel()} layers, got {len(layers)}")
        s = torch.softmax(self.scalar_parameters, dim=0)
        m = mask.unsqueeze(-1).to(layers[0].dtype)                      # (B, T, 1)
        mixed = 0
        for s_j, h in zip(s, layers):
            if self.do_layer_norm:
                n = (m.sum() * h.shape[-1]).clamp(min=1)
                mean = (h * m).sum() / n
                var = (((h - mean) * m) ** 2).sum() / n
                h = (h - mean) / torch.sqrt(var + 1e-12)
            mixed = mixed + s_j * h
        return self.gamma * mixed

    def l2(self):
        """bilm-tf's optional regulariser on w: add l2_coef · Σ w² to the task loss."""
        return (self.scalar_parameters ** 2).sum()


def remove_sentence_boundaries(layers, mask):
    """Drop <S> and each sentence's </S> from the biLM's layers, as bilm-tf does before weight_layers.

    layers [(B, T+2, D)], mask (B, T+2) → layers [(B, T, D)], mask (B, T), zero where the mask is False.
    Output position t is input position t + 1, a real word iff t + 1 < length − 1 (the </S> of a
    sentence of `length` rows sits at length − 1), i.e. iff t < length − 2.
    """
    B, T2 = mask.shape
    T = max(T2 - 2, 0)
    lengths = mask.sum(1)                                                    # words + 2 per sentence
    mask = torch.arange(T, device=mask.device) < (lengths - 2).unsqueeze(1)  # (B, T)
    m = mask.unsqueeze(-1)
    return [(h[:, 1:1 + T] * m.to(h.dtype)) for h in layers], mask


class ELMo(nn.Module):
    """Frozen biLM + scalar mix + dropout: representations for a downstream model (paper section 3.3).

    forward(char_ids (B, T+2, 50)) → (representations (B, T, 2P), mask (B, T)), with <S> and </S>
    removed from every layer *before* the mix, as bilm-tf, so do_layer_norm's statistics cover words
    only. The task model concatenates [x_k; ELMo_k] with its own word vectors.
    """

    def __init__(self, bilm, dropout=0.5, do_layer_norm=False):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:   # NaN too
            raise ValueError(f"ELMo: dropout must be a number in [0, 1], got {dropout!r}")
        self.bilm = bilm
        for p in self.bilm.parameters():
            p.requires_grad_(False)
        self.bilm.eval()
        self.scalar_mix = ScalarMix(bilm.config.n_layers + 1, do_layer_norm)
        self.dropout = nn.Dropout(dropout)

    def train(self, mode=True):
        super().train(mode)
        self.bilm.eval()           # the biLM is frozen: never apply its own dropout
        return self

    def forward(self, char_ids, state=None):
        with torch.no_grad():                                      # state: carried LSTM state, see BiLM.forward
            layers, mask, _ = self.bilm(char_ids, state=state)     # [(B, T+2, 2P)], (B, T+2)
        return self.mix(layers, mask)

    def mix(self, layers, mask):
        """The biLM's outputs (layers, mask), markers included → (representations (B, T, 2P), mask (B, T))."""
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(layers, (list, tuple)) and all(
                isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[:2] == mask.shape for h in layers)):
            raise ValueError("ELMo.mix: give the BiLM's (layers, mask): layers a list of (B, T, 2P) tensors, mask "
                             f"(B, T); got mask {_shape(mask)}")
        layers, mask = remove_sentence_boundaries(layers, mask)    # [(B, T, 2P)], (B, T)
        mixed = self.scalar_mix(layers, mask)                      # eq. (1), (B, T, 2P)
        representations = mixed * mask.unsqueeze(-1).to(mixed.dtype)   # layer norm shifts padding off zero
        return self.dropout(representations), mask


# ----------------------------------------------------------------------------------------------
# bilm-tf / allennlp weights


def load_bilm(options_file, weight_file):
    """Build a BiLM from bilm-tf's options.json and its hdf5 weight dump (allennlp's downloads).

    The dump has no softmax, so the model makes features only. Every dataset in the file must be used:
    options asking for fewer highway or LSTM layers (or filters) than the file holds are an error, not
    a silently different model. Needs h5py.
    """
    try:
        import h5py
    except ImportError:
        raise ImportError("load_bilm needs h5py to read bilm-tf weight files: pip install h5py") from None
    for path in (options_file, weight_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_bilm: {path} is a directory, not a file" if os.path.isdir(path) else
                                    f"load_bilm: no such file: {path}")
    try:
        with open(options_file, encoding="utf-8") as f:
            options = json.load(f)
        lstm, cnn = options["lstm"], options["char_cnn"]
        settings = dict(
            max_characters_per_token=cnn.get("max_characters_per_token", MAX_CHARS),
            char_embed_dim=cnn["embedding"]["dim"], filters=cnn["filters"],
            activation=cnn.get("activation", "relu"), n_highway=cnn.get("n_highway", 0),
            projection_dim=lstm["projection_dim"], lstm_dim=lstm["dim"],
            n_layers=lstm.get("n_layers", 1), cell_clip=lstm.get("cell_clip"), proj_clip=lstm.get("proj_clip"),
            use_skip_connections=lstm.get("use_skip_connections", False))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:   # not JSON, a key missing, not an
        # object, nested past the parser's depth
        raise ValueError(f"load_bilm: {options_file} is not a bilm-tf options file ({type(e).__name__}: {e})") from None
    try:
        config = ELMoConfig(n_characters=N_CHARACTERS, dropout=0.0, vocab_size=0, **settings)
    except ValueError as e:                                           # a value of the wrong type or range
        raise ValueError(f"load_bilm: {options_file}: {str(e).removeprefix('ELMoConfig: ')}") from None
    if config.max_characters_per_token != MAX_CHARS:
        raise ValueError(f"load_bilm: max_characters_per_token must be {MAX_CHARS}, got {config.max_characters_per_token}")

    try:
        f = h5py.File(weight_file, "r")
    except OSError as e:                                              # not HDF5, truncated, unreadable
        raise ValueError(f"load_bilm: {weight_file} is not a readable HDF5 weight file ({e})") from None
    try:
        sd = _bilm_tf_state_dict(f, config, weight_file, options_file)
    except (RuntimeError, KeyError, OSError, UnicodeDecodeError) as e:   # h5py reading a damaged file
        detail = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"load_bilm: {weight_file} is damaged ({type(e).__name__}: {detail})") from None
    finally:
        f.close()
    model = BiLM(config)                     # after the file's shapes agreed with the options: no huge allocation
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)
    return model.eval()


def _bilm_tf_state_dict(f, config, weight_file, options_file):
    """load_bilm's reading of the open hdf5 file f: our state dict, every dataset used exactly once."""
    import h5py
    in_file = []
    f.visititems(lambda name, obj: in_file.append(name) if isinstance(obj, h5py.Dataset) else None)
    used = set()

    def get(name, shape):
        if not isinstance(f.get(name), h5py.Dataset):
            raise ValueError(f"load_bilm: {weight_file} has no dataset {name!r}")
        try:
            dtype, found = f[name].dtype, f[name].shape
        except (ValueError, TypeError) as e:                      # a damaged datatype or dataspace header
            raise ValueError(f"load_bilm: {weight_file} is damaged ({type(e).__name__}: {e})") from None
        if dtype.kind != "f" or found != tuple(shape):
            raise ValueError(f"load_bilm: {weight_file}: {name} is {dtype} {found}, "
                             f"options.json implies float {tuple(shape)}")
        try:
            a = torch.from_numpy(f[name][...].astype("=f4"))   # float32 in native byte order, from any float
        except OSError as e:                                      # a truncated or damaged file
            raise ValueError(f"load_bilm: {weight_file}: cannot read {name} ({e})") from None
        if not torch.isfinite(a).all():
            raise ValueError(f"load_bilm: {weight_file}: {name} holds NaN or infinite values")
        used.add(name)
        return a

    E, D, P, C = config.char_embed_dim, config.n_filters, config.projection_dim, config.lstm_dim
    sd = {}
    # bilm-tf ids are one lower than ours: row 0 (our "no token" id) is new and zero
    sd["char_embed.weight"] = torch.cat([torch.zeros(1, E), get("char_embed", (N_CHARACTERS - 1, E))])
    for i, (w, n) in enumerate(config.filters):
        W = get(f"CNN/W_cnn_{i}", (1, w, E, n))                            # TF conv2d (1, w, E, n)
        sd[f"char_cnn.{i}.weight"] = W[0].permute(2, 1, 0).contiguous()    # Conv1d (n, E, w)
        sd[f"char_cnn.{i}.bias"] = get(f"CNN/b_cnn_{i}", (n,))
    for k in range(config.n_highway):                                     # TF [in, out] → Linear [out, in]
        for ours, theirs in (("carry", "carry"), ("transform", "transform")):
            sd[f"highway.{k}.{ours}.weight"] = get(f"CNN_high_{k}/W_{theirs}", (D, D)).t()
            sd[f"highway.{k}.{ours}.bias"] = get(f"CNN_high_{k}/b_{theirs}", (D,))
    sd["projection.weight"] = get("CNN_proj/W_proj", (D, P)).t()
    sd["projection.bias"] = get("CNN_proj/b_proj", (P,))
    for d, stack in ((0, "forward_layers"), (1, "backward_layers")):      # RNN_0 forward, RNN_1 backward
        for l in range(config.n_layers):
            prefix = f"RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/"
            W = get(prefix + "W_0", (P + P, 4 * C))      # rows: input weights, then recurrent; gates i, j, f, o
            sd[f"{stack}.{l}.input_linearity.weight"] = W[:P].t()
            sd[f"{stack}.{l}.state_linearity.weight"] = W[P:].t()
            sd[f"{stack}.{l}.state_linearity.bias"] = get(prefix + "B", (4 * C,))   # forget bias 1.0 added at run time
            sd[f"{stack}.{l}.state_projection.weight"] = get(prefix + "W_P_0", (C, P)).t()
    unused = [name for name in in_file if name not in used]
    if unused:
        raise ValueError(f"load_bilm: {weight_file} holds {len(unused)} dataset(s) that {options_file} does not "
                         f"ask for (n_highway, n_layers or filters too small?), e.g. {', '.join(unused[:3])}")
    return sd
