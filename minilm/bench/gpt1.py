"""GPT-1 training step (forward + backward + AdamW): minilm vs nanoGPT-style SDPA vs Hugging Face.

One step = zero_grad, forward with the LM loss, backward, AdamW step, on the same random token batch for
every implementation, one implementation after the other in this process:

  minilm             minilm.gpt1.GPT1 (attention through the fused minilm::causal_attention op)
  minilm+compile     the same under torch.compile
  sdpa               a nanoGPT-style PyTorch GPT-1 defined below: the same architecture (post-LN, tanh-GELU,
                     tied head, no final LayerNorm) with F.scaled_dot_product_attention(is_causal=True)
  sdpa+compile       the same under torch.compile (what a user would write for speed)
  hf                 transformers' OpenAIGPTLMHeadModel (eager attention)

CUDA: the paper's GPT-1 (116,534,784 parameters), B=32, T=512, bf16 autocast, fused AdamW.
CPU: the default CPU run's model, preset cpu-small (4 layers × 128, 4 heads, n_ctx 128, vocab 2048:
1,071,616 parameters), B=16, T=128, fp32.
Dropout is 0 in every implementation by default (as in nanoGPT's bench.py). --dropout P times the paper's
training setting instead: dropout P on the embeddings, the attention probabilities and each residual branch
in all three (minilm drops inside its fused kernel, SDPA takes its dropout_p).

Model FLOPs per token = 6N + 12·L·H·Q·T (N parameters, L layers, H heads, Q head size, T context;
PaLM appendix B); MFU = that × tokens/s / the GPU's dense bf16 peak (minilm.gpt1.GPU_PEAK_TFLOPS).
"""
import gc
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.bench.common import device_name, peak_mib, positive_int, threads_note, time_ms
from minilm.gpt1 import GPT1, config_from_preset, gpu_peak_flops

# Eager first, compiled last: if a time limit cuts the run short, the quick rows are already out.
IMPLS = ("minilm", "sdpa", "hf", "minilm+compile", "sdpa+compile")


def add_arguments(p):
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--batch_size", type=positive_int, default=None, help="sequences per step (cuda 32, cpu 16)")
    p.add_argument("--block_size", type=positive_int, default=None, help="tokens per sequence (cuda 512, cpu 128)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed steps per implementation (cuda 20, cpu 5)")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="embedding, attention and residual dropout, as in training (default 0; the paper: 0.1)")


# ------------------------------------------------------------------------------------------------------
# The peer a user would write: nanoGPT's model.py, made GPT-1 (post-LN, no ln_f), attention by SDPA.

class SDPAAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.n_embd = c.n_head, c.n_embd
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.attn_pdrop = c.attn_pdrop
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_pdrop if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class SDPABlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn = SDPAAttention(c)
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.dropout = nn.Dropout(c.resid_pdrop)

    def forward(self, x):
        n = self.ln_1(x + self.attn(x))
        return self.ln_2(n + self.dropout(self.c_proj(F.gelu(self.c_fc(n), approximate="tanh"))))


class SDPAGPT1(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_ctx, c.n_embd)
        self.h = nn.ModuleList([SDPABlock(c) for _ in range(c.n_layer)])
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.drop = nn.Dropout(c.embd_pdrop)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


class HFWrapper(nn.Module):
    """OpenAIGPTLMHeadModel with the (idx, targets) -> (logits, loss) calling convention."""

    def __init__(self, c):
        super().__init__()
        import transformers
        from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel
        transformers.logging.set_verbosity_error()  # its loss_type notice would break the table
        self.model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(
            vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            embd_pdrop=c.embd_pdrop, attn_pdrop=c.attn_pdrop, resid_pdrop=c.resid_pdrop,
            layer_norm_epsilon=c.layer_norm_epsilon))

    def forward(self, idx, targets):
        out = self.model(input_ids=idx, labels=targets)  # HF shifts the labels itself; same cost
        return out.logits, out.loss


# ------------------------------------------------------------------------------------------------------

def build(impl, config):
    if impl.startswith("minilm"):
        return GPT1(config)
    if impl.startswith("sdpa"):
        return SDPAGPT1(config)
    return HFWrapper(config)


def make_optimizer(model, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8, fused=torch.device(device).type == "cuda")


def run(args):
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"minilm.bench gpt1: --dropout must be in [0, 1), got {args.dropout}")
    drop = dict(embd_pdrop=args.dropout, attn_pdrop=args.dropout, resid_pdrop=args.dropout)
    if on_cuda:
        config = config_from_preset("gpt1", **drop)
        B, T, iters, dtype = args.batch_size or 32, args.block_size or 512, args.iters or 20, torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # The model and batch of the default CPU training run (train_gpt1.py, preset cpu-small).
        config = config_from_preset("cpu-small", vocab_size=2048, **drop)
        B, T, iters, dtype = args.batch_size or 16, args.block_size or 128, args.iters or 5, torch.float32
    if T > config.n_ctx:
        config.n_ctx = T
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    if not impls:
        raise SystemExit(f"minilm.bench gpt1: --impls names no implementation; choose from {', '.join(IMPLS)}")
    bad = [s for s in impls if s not in IMPLS]
    if bad:
        raise SystemExit(f"minilm.bench gpt1: unknown implementation(s) {', '.join(bad)}; choose from {', '.join(IMPLS)}")

    L, H, Q = config.n_layer, config.n_head, config.n_embd // config.n_head
    dtype_name = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    if not args.json:
        print(f"GPT-1 training step on {device_name(device)}: {L} layers × {config.n_embd}, {H} heads, "
              f"vocab {config.vocab_size}, B={B}, T={T}, {dtype_name}, AdamW{' (fused)' if on_cuda else ''}, "
              f"dropout {args.dropout}; {threads_note()}")
        print(f"{'impl':>16} {'ms':>10} {'tokens/s':>12} {'model TFLOP/s':>14} {'mfu':>7} {'peak MiB':>9}")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    targets = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    results = {}
    for impl in impls:
        torch.manual_seed(0)
        model = build(impl, config).to(device).train()
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = make_optimizer(model, device)
        fwd = torch.compile(model) if impl.endswith("+compile") else model

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                _, loss = fwd(idx, targets)
            loss.backward()
            optimizer.step()

        try:
            ms = time_ms(step, device, warmup=3 if impl.endswith("+compile") else 2, iters=iters)
            mem = peak_mib(step, device)  # activation memory of a step, on top of weights and optimizer state
        except Exception as e:  # e.g. torch.compile without a working compiler: report, go on with the rest
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if args.json:
                print(json.dumps({"op": "gpt1_train_step", "impl": impl, "error": msg}), flush=True)
            else:
                print(f"{impl:>16} failed: {msg}", flush=True)
            ms = None
        if ms is not None:
            tps = B * T / (ms / 1e3)
            flops_per_token = 6 * n_params + 12 * L * H * Q * T
            peak = gpu_peak_flops(torch.cuda.get_device_name(device)) if on_cuda else None  # none for a shared CPU
            mfu = flops_per_token * tps / peak if peak else None
            results[impl] = tps
            record = {"op": "gpt1_train_step", "device": torch.device(device).type, "device_name": device_name(device),
                      "dtype": dtype_name, "shape": [B, T], "pass": "train", "dropout": args.dropout, "impl": impl, "ms": ms,
                      "tokens_per_s": tps, "mfu": mfu,
                      "model_tflops": flops_per_token * tps / 1e12, "params": n_params, "peak_mib": mem}
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(f"{impl:>16} {ms:10.1f} {tps:12,.0f} {record['model_tflops']:14.3g} "
                      f"{'-' if mfu is None else f'{100 * mfu:.1f}%':>7} {'-' if mem is None else f'{mem:.0f}':>9}",
                      flush=True)
        del model, optimizer, fwd, step
        gc.collect()
        if impl.endswith("+compile"):
            torch._dynamo.reset()
        if on_cuda:
            torch.cuda.empty_cache()

    if not args.json and results:
        for ours in ("minilm", "minilm+compile"):
            if ours in results:
                ratios = ", ".join(f"{results[ours] / results[p]:.2f}× {p}" for p in ("sdpa", "sdpa+compile", "hf")
                                   if p in results)
                if ratios:
                    print(f"{ours}: {ratios}")
