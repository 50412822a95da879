"""Causal attention: minilm's fused kernel vs torch SDPA vs the naive composite, fwd and fwd+bwd.

    python -m minilm.bench attention [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--dropout P]
                                     [--shapes B,H,T,D ...] [--json] [--plot FILE.png]

All implementations run on the same q, k, v (shape [B, H, T, D]) in one process, timed in
rounds that call each implementation once, in a new random order every round (the median of each
one's single calls, on a GPU each with the L2 cache flushed before it), so that a change of the
machine's load or clock during the run weighs on all of them alike. GFLOP/s
counts the useful work of causal attention for every implementation alike: forward 2·B·H·T²·D (QKᵀ
and PV over the causal half, 2 FLOPs per multiply-add); forward+backward 3.5× that (the backward's
five products, of which the recomputation of QKᵀ is one). peak_mib is the memory one call allocates
on top of its inputs (tensors only; see minilm.bench.common.peak_mib).
On the CPU a 2048³ fp32 matmul is timed first: the machine's practical GEMM rate, the ceiling
for the GEMM-bound attention kernels. --dropout P times training-mode attention: every implementation
drops the probabilities with probability P (minilm from its hashed mask, SDPA with its dropout_p, the
composite with F.dropout).
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F

from minilm.bench.common import (Reporter, device_name, peak_mib, seconds, sync, threads_note, time_interleaved,
                                 time_ms)
from minilm.files import is_out_of_memory, write_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SHAPES = [(4, 12, 256, 64), (1, 12, 1024, 64), (1, 4, 4096, 64)]
CUDA_SHAPES = [(32, 12, 512, 64), (8, 12, 2048, 64), (2, 12, 8192, 64), (4, 16, 4096, 128)]
NAIVE_SKIP_T = 8192  # the naive composite stores B·H·T² scores several times over: skipped from this T on


def parse_shape(text):
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B,H,T,D (four positive integers), got {text!r}")
    return shape


def add_arguments(parser):
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="fp32 (default on cpu), bf16 (default on cuda) or fp16")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="B,H,T,D",
                        help="shapes to time (default: 3 CPU shapes or 4 CUDA shapes)")
    parser.add_argument("--dropout", type=float, default=0.0, metavar="P",
                        help="attention dropout probability, as in training (default 0: no dropout)")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="also draw a bar chart (matplotlib)")
    parser.add_argument("--min-time", type=seconds, default=1.0, metavar="SECONDS",
                        help="time each case for at least this long (default 1.0; the median is reported)")


# --- the implementations ---------------------------------------------------------------------------

def naive_attention(q, k, v, mask, dropout_p=0.0):
    """What one writes without a fused kernel: matmul -> mask -> softmax (-> dropout) -> matmul."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    att = att.masked_fill(mask, float("-inf"))
    return F.dropout(torch.softmax(att, dim=-1), dropout_p) @ v  # (B, H, T, D)


def sdpa_with(backend, dropout_p=0.0):
    """SDPA, restricted to one backend (torch.nn.attention.sdpa_kernel) unless backend is None."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return fn


def implementations(device, T, dropout_p=0.0):
    """(name, fn(q, k, v) -> out) for the peers worth timing at this length on this device."""
    import minilm.ops
    impls = [("minilm", lambda q, k, v: minilm.ops.causal_attention(q, k, v, dropout_p=dropout_p)),
             ("sdpa", sdpa_with(None, dropout_p))]
    if device.type == "cuda":  # SDPA's fused GPU backends one by one (a torch that lacks one skips it)
        from torch.nn.attention import SDPBackend
        for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
            if hasattr(SDPBackend, backend):
                impls.append((name, sdpa_with(getattr(SDPBackend, backend), dropout_p)))
    if T < NAIVE_SKIP_T:
        mask = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        impls.append(("naive", lambda q, k, v: naive_attention(q, k, v, mask, dropout_p)))
    return impls


# --- timing -------------------------------------------------------------------------------------------

def matmul_reference(device, dtype, reporter):
    """Time an n³ matmul: the rate that GEMM-bound kernels are measured against."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, warmup=2, iters=5, min_time_s=0.5)
    reporter.row({"op": "matmul", "device": device.type, "device_name": device_name(device), "dtype": dtype_name(dtype),
                  "shape": [n, n, n],
                  "pass": "fwd", "impl": "torch.mm", "ms": ms, "gflops": 2 * n**3 / ms / 1e6, "peak_mib": None})


def dtype_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


def bench_shape(shape, device, dtype, reporter, min_time_s=1.0, dropout_p=0.0):
    B, H, T, D = shape
    flops = {"fwd": 2 * B * H * T * T * D, "fwdbwd": 3.5 * 2 * B * H * T * T * D}
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    calls = {}  # impl -> {pass: call}
    for name, fn in implementations(device, T, dropout_p):
        try:  # a peer that this device/dtype/torch does not support is skipped, not fatal
            with torch.no_grad():
                fn(q, k, v)
            sync(device)
        except (RuntimeError, NotImplementedError) as e:
            reporter.note(f"  skipped {name} at {shape}: {str(e).strip().splitlines()[0][:120]}")
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, k, v)

        def fwdbwd(fn=fn):
            for t in (qg, kg, vg):
                t.grad = None
            fn(qg, kg, vg).backward(grad)

        calls[name] = {"fwd": fwd, "fwdbwd": fwdbwd}

    def skip_if_out_of_memory(e, what):
        """An allocation failure is noted and its case skipped (the naive composite's T×T scores, on either
        device); any other error is raised."""
        if not is_out_of_memory(e):
            raise e
        reporter.note(f"  skipped {what} at {shape}: out of memory")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    results = {}  # (impl, pass) -> ms
    for pass_name in ("fwd", "fwdbwd"):
        mibs = {}  # a first call (does it fit in memory?), the peak of a second one, then all timed side by side
        for name, passes in calls.items():
            try:
                passes[pass_name]()
                mibs[name] = peak_mib(passes[pass_name], device)
            except (MemoryError, RuntimeError) as e:
                skip_if_out_of_memory(e, f"{name} {pass_name}")
        try:
            times = time_interleaved({name: calls[name][pass_name] for name in mibs}, device, warmup=2, iters=5,
                                     min_time_s=min_time_s)
        except (MemoryError, RuntimeError) as e:   # together they did not fit: each one alone, as far as it fits
            skip_if_out_of_memory(e, f"timing every implementation in turn ({pass_name}; each is timed alone)")
            times = {}
            for name in mibs:
                try:
                    times[name] = time_ms(calls[name][pass_name], device, warmup=2, iters=5, min_time_s=min_time_s)
                except (MemoryError, RuntimeError) as e2:
                    skip_if_out_of_memory(e2, f"{name} {pass_name}")
        for name, ms in times.items():
            results[name, pass_name] = ms
            reporter.row({"op": "attention", "device": device.type, "device_name": device_name(device),
                          "dtype": dtype_name(dtype), "shape": list(shape),
                          "dropout": dropout_p, "pass": pass_name, "impl": name, "ms": ms, "gflops": flops[pass_name] / ms / 1e6,
                          "peak_mib": mibs[name]})
    for peer in ("sdpa", "sdpa-flash", "sdpa-cudnn", "naive"):
        parts = [f"{p} {results[peer, p] / results['minilm', p]:.2f}×" for p in ("fwd", "fwdbwd")
                 if (peer, p) in results and ("minilm", p) in results]
        if parts:
            reporter.note(f"  minilm vs {peer} (speed-up): " + ", ".join(parts))
    return results


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(tuple(r["shape"]), r["pass"]) for r in records}, key=lambda g: (g[0][2], g[0], g[1]))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, impl in enumerate(impls):
        ys = [next((r["gflops"] for r in records if r["impl"] == impl and (tuple(r["shape"]), r["pass"]) == g), 0)
              for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], ys, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{','.join(map(str, s))}\n{p}" for s, p in groups], fontsize=8)
    ax.set_ylabel("GFLOP/s (causal FLOPs)")
    ax.set_title(f"causal attention, {records[0]['dtype']}, {records[0]['device']}")
    ax.legend()
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".").lower()   # one matplotlib writes (checked in run)
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=120))


def run(args):
    device = torch.device(args.device)
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"minilm.bench attention: --dropout must be in [0, 1), got {args.dropout}")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = args.shapes or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.plot:  # checked before the run, which may take minutes, rather than when the figure is saved
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError:
            raise SystemExit("minilm.bench: --plot needs matplotlib (pip install matplotlib)")
        kinds = FigureCanvasAgg.get_supported_filetypes()
        ext = os.path.splitext(args.plot)[1].lstrip(".").lower()
        if ext not in kinds:
            raise SystemExit(f"minilm.bench: --plot {args.plot}: the file name must end in one of "
                             f"{', '.join('.' + k for k in sorted(kinds))}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise SystemExit(f"minilm.bench: --plot {args.plot}: no such directory")

    rows = []

    class Collect(Reporter):
        def row(self, record):
            rows.append(record)
            super().row(record)

    reporter = Collect(args.json)
    reporter.note(f"causal attention on {device_name(device)}; {threads_note()}")
    # The GEMM rate at the start and at the end: on a shared machine the two differ by how much the
    # load changed during the run.
    mm_dtype = torch.float32 if device.type == "cpu" else dtype
    matmul_reference(device, mm_dtype, reporter)
    for shape in shapes:
        bench_shape(shape, device, dtype, reporter, args.min_time, args.dropout)
    matmul_reference(device, mm_dtype, reporter)
    records = [r for r in rows if r["op"] == "attention"]
    if args.plot and records:
        plot(records, args.plot)
        reporter.note(f"wrote {args.plot}")
    elif args.plot:
        reporter.note("nothing was timed: no plot")
