"""GPT-1: the decoder-only Transformer of Radford et al. 2018, "Improving Language Understanding by
Generative Pre-Training", as in OpenAI's finetune-transformer-lm (train.py) and Hugging Face's
`OpenAIGPTModel`. Module names are the checkpoint's (`tokens_embed`, `positions_embed`, `h.{i}.attn.c_attn`,
`ln_1`, `mlp.c_fc`, ...) so that importing the released weights is a key map (`GPT1.from_huggingface`).

What makes it GPT-1 and not GPT-2 (paper §4.1):
  * post-LN blocks: n = LN1(x + attn(x)); h = LN2(n + mlp(n)), and no final LayerNorm;
  * GELU in its tanh form; learned position embeddings; LayerNorm eps 1e-5;
  * the token embedding is tied to the output layer (no bias);
  * dropout 0.1 on the embeddings, the attention probabilities and each residual branch;
  * every weight initialised N(0, 0.02).

Attention runs through minilm's fused kernel, `minilm.ops.causal_attention`, which never stores the
T×T probabilities, and drops them out (attn_pdrop, the paper's regularizer) from a mask it regenerates
from a hash instead of storing it.

`GPT1Config(arch="lightconv")` swaps each block's self-attention for the lightweight convolution of
Wu et al. 2019 (minilm/lightconv.py): same post-LN block, MLP, embeddings and head.
"""
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.files import first_line
from minilm.lightconv import LightConvLayer, resolve_kernel_sizes
from minilm.ops import causal_attention
from minilm.ops._checks import id_range


@dataclass
class GPT1Config:
    vocab_size: int = 40478  # 478 base symbols + 40000 BPE merges
    n_ctx: int = 512  # context length (block size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # the MLP's inner width is 4 * n_embd = 3072
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    # arch="lightconv": each block's self-attention becomes a lightweight convolution (Wu et al. 2019,
    # minilm/lightconv.py) with n_head kernel heads; the rest of the block is unchanged.
    arch: str = "attention"  # "attention" or "lightconv"
    kernel_sizes: tuple | None = None  # lightconv: width per layer (or one for all); None = 3, 7, 15, 31, 31, ...
    weight_dropout: float = 0.1  # lightconv: DropConnect on the normalised kernels (the paper's 0.1)

    def __post_init__(self):  # a bad value (a typo, a damaged checkpoint) is one line now, not a failure later
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):   # n_layer 0: the embeddings alone
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (name != "n_layer"):
                raise ValueError(f"GPT1Config: {name} must be a {'non-negative' if name == 'n_layer' else 'positive'} "
                                 f"integer, got {value!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "weight_dropout", "layer_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:  # NaN too
                raise ValueError(f"GPT1Config: {name} must be a number in [0, 1], got {value!r}")


# Model shapes by purpose. vocab_size comes from the tokenizer, so the presets leave it at the default.
# The CPU presets train for minutes, seeing each token only a few times: there is nothing to regularize
# yet, so their dropout is 0. The paper's dropout stays in "gpt1".
PRESETS = {
    "gpt1": dict(),  # the paper: 12 layers, 12 heads, 768 wide, 512 context, 116,534,784 parameters
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, n_ctx=128,  # the default run on a CPU
                      embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, weight_dropout=0.0),
    "cpu-tiny": dict(n_layer=2, n_head=2, n_embd=32, n_ctx=32,  # tests: seconds on a laptop
                     embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, weight_dropout=0.0),
}


def config_from_preset(preset="gpt1", **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown GPT-1 preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(GPT1Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown GPT1Config field(s): {', '.join(unknown)}")
    return GPT1Config(**{**PRESETS[preset], **overrides})


def gelu(x):
    # GPT-1 (and BERT's original code) use the tanh approximation of GELU (Hendrycks & Gimpel 2016):
    # 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))). HF calls it gelu_new.
    return F.gelu(x, approximate="tanh")


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul, in that order
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)  # its p is applied inside causal_attention
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 × (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs); heads are contiguous hs-wide chunks
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # Attention(Q, K, V) = softmax(QKᵀ/√d_k) V (Vaswani et al. eq. 1), causal, with dropout on the
        # softmax while training: one fused kernel, the T×T matrix never stored.
        p = self.attn_dropout.p if self.training else 0.0
        y = causal_attention(q, k, v, dropout_p=p)  # (B, nh, T, hs), laid out (B, T, nh, hs) in memory like q
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again (no copy)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.arch = config.arch
        if config.arch == "lightconv":  # Linear → GLU → LightConv → Linear in place of attention
            kernel_size = resolve_kernel_sizes(config.kernel_sizes, config.n_layer)[layer_idx]
            self.lightconv = LightConvLayer(config.n_embd, config.n_head, kernel_size, config.weight_dropout,
                                            dropout=config.resid_pdrop, input_dropout=config.resid_pdrop)
        else:
            self.attn = CausalSelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, x):
        # Post-LN, as in the original Transformer and GPT-1 (GPT-2 moved the LayerNorms to the inputs).
        n = self.ln_1(x + (self.lightconv(x) if self.arch == "lightconv" else self.attn(x)))
        return self.ln_2(n + self.mlp(n))


class GPT1(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or GPT1Config()
        if config.arch not in ("attention", "lightconv"):
            raise ValueError(f"GPT1: arch must be 'attention' or 'lightconv', got {config.arch!r}")
        self.tokens_embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions_embed = nn.Embedding(config.n_ctx, config.n_embd)
        # HF drops the summed embeddings; the TF code dropped entries of the embedding matrix itself (one
        # mask per step, shared by every occurrence of a token; and since that matrix is also the output
        # layer, its LM logits were computed with the dropped matrix). We follow HF.
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        # P(u) = softmax(h_n W_eᵀ) (paper eq. 2): the output layer is the token embedding, transposed.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tokens_embed.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # "Since layernorm is used extensively throughout the model, a simple weight initialization of
        # N(0, 0.02) was sufficient" (paper §4.1). LayerNorm keeps PyTorch's (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameters, the tied embedding/output matrix counted once (116,534,784 for the paper's GPT-1)."""
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, idx, name="idx", check_length=True):
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"GPT1: {name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"GPT1: {name} must hold integer token ids (torch.long), got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"GPT1: {name} must be 2-D (batch, time), got shape {tuple(idx.shape)}")
        if check_length and idx.size(1) > self.config.n_ctx:
            raise ValueError(f"GPT1: sequence of length {idx.size(1)} is longer than the context n_ctx={self.config.n_ctx}")
        if idx.device != self.tokens_embed.weight.device:
            raise ValueError(f"GPT1: {name} is on {idx.device} but the model is on {self.tokens_embed.weight.device}")
        # One reduction and one host sync: cheap next to a forward pass, and it turns a device-side assert
        # (or silent garbage) into a message. Skipped inside torch.compile, where .tolist() would break the graph.
        if idx.numel() and not torch.compiler.is_compiling():
            lo, hi = id_range(idx)
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"GPT1: token ids must be in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")

    def hidden_states(self, idx):
        """h_n, the last block's output (B, T, n_embd) for idx (B, T): what the LM head reads, and what the
        fine-tuning heads read at the [extract] token (minilm/finetune.py)."""
        self._check_input(idx)
        B, T = idx.size()
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        # h_0 = U W_e + W_p (paper eq. 2)
        x = self.drop(self.tokens_embed(idx) + self.positions_embed(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)  # h_l = transformer_block(h_{l-1})
        return x

    def add_tokens(self, n):
        """Append n rows to the token embedding, drawn N(0, 0.02) like every other weight; the old rows are
        kept as they are. The output layer is tied, so the logits grow by n columns too. Fine-tuning adds
        _start_, _delimiter_ and _classify_ this way (paper §3.3; ids vocab_size, +1, +2). Returns the first new id."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"GPT1.add_tokens: n must be a positive integer, got {n!r}")
        old = self.tokens_embed.weight
        V, C = old.shape
        new = nn.Embedding(V + n, C, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            nn.init.normal_(new.weight[V:], mean=0.0, std=0.02)
            new.weight[:V] = old
        self.tokens_embed = new
        self.lm_head = nn.Linear(C, V + n, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.tokens_embed.weight
        self.config = replace(self.config, vocab_size=V + n)
        return V

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids, T <= n_ctx. Returns (logits (B, T, vocab_size), loss or None).

        targets: (B, T) next-token ids; -1 marks positions to leave out of the loss.
        """
        x = self.hidden_states(idx)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab_size); no final LayerNorm in GPT-1
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"GPT1: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            if targets.dtype not in (torch.int64, torch.int32):   # a float 3.7 would silently become class 3
                raise TypeError(f"GPT1: targets must hold integer token ids (torch.long), got {targets.dtype}")
            # loss = −L1(U) / N: the paper maximises L1(U) = Σ_i log P(u_i | u_{i-k}, ..., u_{i-1}) (eq. 1).
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1).long(),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens tokens after idx (B, T); the context is cropped to the last n_ctx tokens,
        so idx may be longer than n_ctx (its ids are still checked). Returns idx with the new tokens appended."""
        self._check_input(idx, check_length=False)
        if idx.size(1) == 0:
            raise ValueError("GPT1.generate: idx must hold at least one token to condition on")
        if not (0 < temperature < math.inf):   # NaN too
            raise ValueError(f"GPT1.generate: temperature must be a finite number > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"GPT1.generate: top_k must be >= 1, got {top_k}")
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.n_ctx:]  # (B, <= n_ctx)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].double()  # (B, vocab_size)
            # softmax(l / t) = softmax((l − max l) / t); the second stays finite for any small t (→ greedy),
            # in fp64, where t itself stays > 0 down to 5e-324
            logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next.to(idx.dtype)), dim=1)
        self.train(was_training)
        return idx

    # ------------------------------------------------------------------------------------------------
    # Hugging Face weights (OpenAIGPTModel / OpenAIGPTLMHeadModel, e.g. the released "openai-gpt")

    @classmethod
    def from_huggingface(cls, model_or_state_dict, **config_overrides):
        """Build a GPT1 from Hugging Face OpenAI GPT weights.

        model_or_state_dict: a transformers `OpenAIGPTModel` / `OpenAIGPTLMHeadModel`, its state dict, or a
        local directory holding config.json and model.safetensors (or pytorch_model.bin). Sizes are read off
        the weight shapes; n_head (which shapes cannot tell) comes from the model's config, config.json, or
        config_overrides, and defaults to 12. Dropout and eps come from the HF config where there is one.
        """
        hf_config = {}
        src = model_or_state_dict
        if isinstance(src, (str, os.PathLike)):
            hf_config, state_dict = _read_hf_directory(os.fspath(src))
        elif isinstance(src, nn.Module):
            cfg = getattr(src, "config", None)
            hf_config = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
            state_dict = src.state_dict()
        elif isinstance(src, dict):
            state_dict = src
        else:
            raise TypeError("GPT1.from_huggingface: expected an OpenAIGPT model, a state dict or a directory, "
                            f"got {type(src).__name__}")
        if hf_config.get("afn", "gelu") != "gelu":  # HF's "gelu" for this model is the tanh form (gelu_new)
            raise ValueError(f"GPT1.from_huggingface: activation {hf_config['afn']!r} is not GPT-1's GELU")

        sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
        for name in ("tokens_embed.weight", "positions_embed.weight"):
            if name not in sd:
                raise ValueError(f"GPT1.from_huggingface: no {name!r} in the weights; is this an OpenAI GPT model?")
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))}
        vocab_size, n_embd = sd["tokens_embed.weight"].shape
        known = dict(vocab_size=vocab_size, n_embd=n_embd, n_ctx=sd["positions_embed.weight"].shape[0],
                     n_layer=len(layers), n_head=hf_config.get("n_head", 12))
        for ours, theirs in (("embd_pdrop", "embd_pdrop"), ("attn_pdrop", "attn_pdrop"),
                             ("resid_pdrop", "resid_pdrop"), ("layer_norm_epsilon", "layer_norm_epsilon")):
            if theirs in hf_config:
                known[ours] = hf_config[theirs]
        shape_keys = {"vocab_size", "n_embd", "n_ctx", "n_layer"}
        clash = {k: v for k, v in config_overrides.items() if k in shape_keys and v != known[k]}
        if clash:
            raise ValueError(f"GPT1.from_huggingface: {clash} contradicts the weight shapes ({ {k: known[k] for k in clash} })")
        model = cls(config_from_preset("gpt1", **{**known, **config_overrides}))

        ours = model.state_dict()
        ours.pop("lm_head.weight")  # tied to tokens_embed.weight
        loaded = {}
        for key, value in sd.items():
            if key == "lm_head.weight" or key.endswith(".attn.bias") or key == "position_ids":
                continue  # tied head; the causal-mask buffer and position ids are recomputed here
            if key not in ours:
                raise ValueError(f"GPT1.from_huggingface: unexpected weight {key!r}")
            if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                value = value.t()  # HF Conv1D stores [in, out]; nn.Linear wants [out, in]
            if value.shape != ours[key].shape:
                raise ValueError(f"GPT1.from_huggingface: {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(ours[key].shape)}")
            loaded[key] = value
        missing = sorted(set(ours) - set(loaded))
        if missing:
            raise ValueError(f"GPT1.from_huggingface: missing weights {', '.join(missing[:4])}"
                             + (" ..." if len(missing) > 4 else ""))
        with torch.no_grad():
            for key, value in loaded.items():
                ours[key].copy_(value)
        return model


# Dense bf16/fp16 tensor-core peaks in TFLOP/s (NVIDIA datasheets, without sparsity), for MFU: the model's
# FLOP/s as a share of what the chip can do. First match of a substring of the device name wins.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("H800", 989), ("A100", 312), ("A800", 312),
                   ("L40S", 362), ("L40", 181), ("L4", 121), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71),
                   ("A6000", 155), ("V100", 125), ("T4", 65))


def gpu_peak_flops(device_name):
    """The dense half-precision peak (FLOP/s) of a GPU named `device_name`, or None for one not listed."""
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def _load_safetensors(path):
    from safetensors.torch import load_file  # only needed for this format
    return load_file(path)


def _read_hf_directory(path):
    """config.json + model.safetensors (or pytorch_model.bin) from a local Hugging Face model directory;
    a file that is not what its name says is a one-line ValueError that names it."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"GPT1.from_huggingface: {path!r} is not a directory")
    hf_config = {}
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                hf_config = json.load(f)
        except (ValueError, RecursionError) as e:   # not JSON, or not UTF-8
            raise ValueError(f"GPT1.from_huggingface: {config_path} is not a JSON config ({first_line(e)})") from None
        if not isinstance(hf_config, dict):
            raise ValueError(f"GPT1.from_huggingface: {config_path} holds a {type(hf_config).__name__}, not a JSON object")
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    for weights, load in ((st, _load_safetensors), (pt, lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        if os.path.exists(weights):
            try:
                state_dict = load(weights)
            except MemoryError:
                raise
            except Exception as e:   # a truncated or foreign file: its loader's first line, with the file's name
                raise ValueError(f"GPT1.from_huggingface: cannot read {weights} ({first_line(e)})") from None
            if not isinstance(state_dict, dict):
                raise ValueError(f"GPT1.from_huggingface: {weights} holds a {type(state_dict).__name__}, not a state dict")
            return hf_config, state_dict
    raise FileNotFoundError(f"GPT1.from_huggingface: {path!r} has neither model.safetensors nor pytorch_model.bin")
