"""ELMo char-CNN: minilm's fused op vs the PyTorch composite (embedding -> 7x Conv1d -> max -> relu -> cat).

Both run on the same inputs in the same process, timed in alternating rounds (the median of each
one's single calls; common.time_interleaved): ELMo's original token encoder (filters [[1,32],[2,32],[3,64],[4,128],[5,256],
[6,512],[7,1024]], char dim 16, 50 characters, 262 ids, relu).
Tokens are words as ELMo sees them, [BOW, bytes, EOW, PAD...] with 1 + Poisson(4) bytes (mean 5, like
English text), or with --chars random, 50 uniformly random ids (no padding: the kernel's worst case,
since it computes the identical all-padding windows at the end of a token only once).

GFLOP/s count the nominal convolution work, 2·N·Σ_i F_i·E·w_i·(L−w_i+1) for the forward, and 3× that
for forward+backward (the composite's backward is two convolutions' worth; the fused backward is far
cheaper, going through one position per filter, so its fwd+bwd figure is an effective rate).
peak_mib is the memory one call adds, outputs included (common.peak_mib: torch's allocator on both devices).
bf16: both implementations get the same bf16 tensors (the composite runs in bf16, not under autocast).
"""
import sys

import torch

from minilm.bench.common import Reporter, device_name, peak_mib, positive_int, threads_note, time_interleaved
from minilm.ops import char_cnn, char_cnn_reference

ELMO_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]
CHAR_DIM, MAX_CHARS, N_CHARS = 16, 50, 262
BOW, EOW, PAD = 259, 260, 261  # bilm-tf's 258/259/260, +1 as in allennlp (0 is the mask id)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(p):
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="default: fp32 on the CPU; fp32 and bf16 on CUDA")
    p.add_argument("--tokens", nargs="+", type=positive_int, default=None,
                   help="numbers of tokens N (default: 640 2560 on the CPU, 32768 on CUDA)")
    p.add_argument("--chars", choices=["words", "random"], default="words",
                   help="token contents: padded words (default) or 50 random ids (no padding)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed iterations (default 5 on the CPU, 20 on CUDA)")


def make_tokens(n, chars, gen):
    if chars == "random":
        return torch.randint(0, N_CHARS, (n, MAX_CHARS), generator=gen)
    ids = torch.full((n, MAX_CHARS), PAD, dtype=torch.int64)
    lengths = (1 + torch.poisson(torch.full((n,), 4.0), generator=gen).long()).clamp(max=MAX_CHARS - 2)
    ids[:, 0] = BOW
    for i, k in enumerate(lengths.tolist()):
        ids[i, 1:1 + k] = torch.randint(1, 257, (k,), generator=gen)
        ids[i, 1 + k] = EOW
    return ids


def forward_flops(n):
    return 2 * n * sum(f * CHAR_DIM * w * (MAX_CHARS - w + 1) for w, f in ELMO_FILTERS)


def run(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = args.dtype or (["fp32", "bf16"] if cuda else ["fp32"])
    tokens = args.tokens or ([32768] if cuda else [640, 2560])
    iters = args.iters or (20 if cuda else 5)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("minilm::char_cnn", device.type.upper()):
        sys.exit(f"minilm.bench charcnn: minilm was built without a {device.type} kernel for char_cnn "
                 "(rebuild the extension where nvcc and a CUDA torch are present)")
    warmup = 3 if cuda else 1
    rep = Reporter(args.json)
    rep.note(f"char-CNN, ELMo filters, E={CHAR_DIM}, L={MAX_CHARS}, V={N_CHARS}, relu, tokens: {args.chars}; "
             f"{device_name(device)}; {threads_note()}")
    gen = torch.Generator().manual_seed(0)
    impls = {"minilm": char_cnn, "composite": char_cnn_reference}
    ratios = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        # Initialised like the weights of a trained ELMo are scaled: N(0, 1/fan_in) filters.
        emb = torch.randn(N_CHARS, CHAR_DIM, generator=gen).to(device, dtype)
        ws = [(torch.randn(f, CHAR_DIM, w, generator=gen) / (CHAR_DIM * w) ** 0.5).to(device, dtype)
              for w, f in ELMO_FILTERS]
        bs = [(0.1 * torch.randn(f, generator=gen)).to(device, dtype) for _, f in ELMO_FILTERS]
        params = [emb, *ws, *bs]
        for n in tokens:
            ids = make_tokens(n, args.chars, gen).to(device)
            grad = torch.randn(n, sum(f for _, f in ELMO_FILTERS), generator=gen).to(device, dtype)
            flops = forward_flops(n)
            passes = {}  # (impl, pass) -> call
            for impl, fn in impls.items():
                def fwd(fn=fn):
                    with torch.no_grad():
                        return fn(ids, emb, ws, bs, "relu")

                def fwdbwd(fn=fn):
                    for p in params:
                        p.requires_grad_(True)
                    out = fn(ids, emb, ws, bs, "relu")
                    g = torch.autograd.grad(out, params, grad)
                    for p in params:
                        p.requires_grad_(False)
                    return g

                passes[impl, "fwd"], passes[impl, "fwdbwd"] = fwd, fwdbwd
            res = {}
            for pname, mult in (("fwd", 1), ("fwdbwd", 3)):
                times = time_interleaved({impl: passes[impl, pname] for impl in impls}, device, warmup=warmup, iters=iters)
                mibs = {impl: peak_mib(passes[impl, pname], device) for impl in impls}
                for impl, ms in times.items():
                    res[impl, pname] = (ms, mibs[impl])
                    rep.row({"op": "charcnn", "device": device.type, "device_name": device_name(device), "dtype": dname,
                             "shape": [n, MAX_CHARS], "pass": pname, "impl": impl, "ms": ms,
                             "gflops": mult * flops / ms / 1e6, "peak_mib": mibs[impl], "chars": args.chars})
            for pname in ("fwd", "fwdbwd"):
                (m_ms, m_mib), (c_ms, c_mib) = res["minilm", pname], res["composite", pname]
                mem = f"{c_mib / m_mib:.1f}x less peak memory" if m_mib else f"peak {m_mib} vs {c_mib} MiB"
                ratios.append(f"  {dname} N={n:>6} {pname:>6}: minilm {c_ms / m_ms:.2f}x faster than the composite, {mem}")
    rep.note("minilm vs composite (same run):\n" + "\n".join(ratios))
