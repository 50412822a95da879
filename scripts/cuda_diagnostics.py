"""One-line-per-case diagnostics of the CUDA kernels, for a GPU run where every minute counts.

    python scripts/cuda_diagnostics.py attn-correct | cnn-correct | attn-perf | attn-host | cnn-perf | attn-sweep |
                                       cnn-determinism | attn-order | attn-ncu

attn-host: where a single attention fwd+bwd call's time goes (host, one call, back to back, per kernel),
minilm against SDPA flash, at T = 512 (also with GPT-1's q, k, v views) and at head dim 128.

cnn-correct and cnn-determinism check both char-CNN backward variants (the token-slot kernels, and the old
ones selected by MINILM_CNN_BWD=old); cnn-perf times both, then prints the per-kernel GPU time of one
fused fwd+bwd at 32,768 tokens (torch.profiler), fp32 and bf16.

attn-sweep: for every tensor-core forward layout (MINILM_ATTN_FWD = narrow | narrow2 | wide | wide3 | wide64)
and backward configuration (MINILM_ATTN_BWD = fused | split | split2 | split3 | splitkv | wide | wide16 |
fusedwide | fusedkv | fused2d | split2d, MINILM_ATTN_DQ = narrow | wide; see csrc/cuda/attention_kernels.cu):
correctness on a few shapes, then the forward (layouts) or fwd+bwd (backward configurations) time on the four
target shapes next to SDPA's flash and cuDNN backends.

attn-order: fwd+bwd with the dK/dV kernels' CTAs in the default order, the grid's order, head groups in 3 key-tile
phases and in 1, and one head at a time (MINILM_ATTN_HEAD_GROUP, MINILM_ATTN_KEY_PHASES), next to SDPA flash.

attn-ncu: Nsight Compute's counters (time, occupancy, issue slots, warp stall reasons, pipe use, shared-memory
bank conflicts, L2 atomics) of the main forward and backward kernels, minilm next to SDPA flash's, at head dim
128 and at T = 2048; the table goes to the log, every metric to $OUT/attn_ncu_*.csv.

Correctness parts print the max errors of every case (PASS or FAIL, never stopping at the first
failure); the checks are the ones of tests/test_cuda.py. Perf parts time the fused ops against what a
user would otherwise call (SDPA's flash backend; the PyTorch composite with cuDNN), side by side in one
run, with CUDA events. Run each part in its own process: an illegal memory access kills the CUDA context.
"""
import os
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]  # the checkout's minilm, and the test helpers
import test_cuda as tc  # noqa: E402  (the test helpers; importing it loads minilm)

from minilm.ops import causal_attention  # noqa: E402

ops = torch.ops.minilm


def case(name, fn):
    t0 = time.perf_counter()
    try:
        report = fn()
        print(f"PASS {name}: {report} [{time.perf_counter() - t0:.1f} s]", flush=True)
        return True
    except Exception as e:  # noqa: BLE001  (report and go on)
        msg = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        print(f"FAIL {name}: {type(e).__name__}: {msg}", flush=True)
        if not isinstance(e, AssertionError):
            traceback.print_exc(limit=3)
        return False


def attn_correct():
    ok = True
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (64, 128, 16, 48, 80):
            for T in (1, 37, 130, 257):
                ok &= case(f"attention {str(dtype)[6:]} B=2 H=3 T={T} D={D}",
                           lambda: tc._check_attention(2, 3, T, D, dtype))
    for D, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (64, torch.float16), (64, torch.float32)):
        ok &= case(f"attention {str(dtype)[6:]} B=1 H=2 T=2048 D={D}", lambda: tc._check_attention(1, 2, 2048, D, dtype))
    ok &= case("attention fp64 gradcheck", lambda: tc.test_attention_fp64_gradcheck() or "ok")
    ok &= case("attention current stream", lambda: tc.test_attention_runs_on_the_current_stream() or "ok")
    return ok


def cnn_correct():
    """Both backward variants (the slot kernels, and MINILM_CNN_BWD=old) on every case."""
    ok = True
    odd = [[1, 3], [2, 5], [9, 7], [3, 130], [4, 33]]
    for variant in tc.CNN_BWD_VARIANTS:
        tc.set_cnn_bwd(variant)
        for dtype in (torch.float32, torch.bfloat16):
            for act in ("relu", "tanh"):
                ok &= case(f"[{variant}] char_cnn ELMo {str(dtype)[6:]} {act} N=70",
                           lambda: tc._check_char_cnn(70, 50, 262, 16, tc.ELMO_FILTERS, dtype, act))
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            ok &= case(f"[{variant}] char_cnn odd filters {str(dtype)[6:]}",
                       lambda: tc._check_char_cnn(37, 11, 20, 5, odd, dtype, "tanh"))
            ok &= case(f"[{variant}] char_cnn E=40 W=5,9 {str(dtype)[6:]}",
                       lambda: tc._check_char_cnn(3, 9, 7, 40, [[5, 17], [9, 2]], dtype, "relu"))
        for shape in tc.CNN_ODD_SHAPES:
            N, L, V, E, filters, dtype, act = shape
            ok &= case(f"[{variant}] char_cnn N={N} L={L} V={V} E={E} {filters} {str(dtype)[6:]} {act}",
                       lambda: tc._check_char_cnn(*shape))
        ok &= case(f"[{variant}] char_cnn many tokens", lambda: tc.test_char_cnn_many_tokens(variant) or "ok")
    tc.set_cnn_bwd("slots")
    ok &= case("char_cnn ties", lambda: tc.test_char_cnn_first_max_wins_ties() or "ok")
    ok &= case("char_cnn bad input", lambda: tc.test_char_cnn_bad_input() or "ok")
    ok &= case("char_cnn current stream", lambda: tc.test_char_cnn_runs_on_the_current_stream() or "ok")
    return ok


def time_ms(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attn_perf():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for B, H, T, D in ((32, 12, 512, 64), (8, 12, 2048, 64), (2, 12, 8192, 64), (4, 16, 4096, 128)):
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        flops = 2 * B * H * T * T * D  # causal forward (half of the 4·B·H·T²·D of full attention)

        def ours_fwd():
            with torch.no_grad():
                causal_attention(q, k, v)

        def ours_fb():
            causal_attention(q, k, v).backward(g)

        def sdpa_fwd():
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def sdpa_fb():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

        res = {}
        for name, fn, f in (("ours fwd", ours_fwd, flops), ("sdpa-flash fwd", sdpa_fwd, flops),
                            ("ours fwd+bwd", ours_fb, 3.5 * flops), ("sdpa-flash fwd+bwd", sdpa_fb, 3.5 * flops)):
            try:
                ms = time_ms(fn)
                res[name] = f / ms / 1e9
                print(f"attention bf16 {B},{H},{T},{D} {name}: {ms:.3f} ms, {res[name]:.1f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"attention bf16 {B},{H},{T},{D} {name}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        if "ours fwd+bwd" in res and "sdpa-flash fwd+bwd" in res:
            print(f"attention bf16 {B},{H},{T},{D} fwd+bwd ours/sdpa-flash = "
                  f"{res['ours fwd+bwd'] / res['sdpa-flash fwd+bwd']:.2f}x (target >= 1.0)", flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()


def _short_kernel_name(name):
    name = re.sub(r"minilm_cuda::\(anonymous namespace\)::|^void |\(.*$", "", name)
    return name if len(name) <= 100 else name[:97] + "..."


def kernel_breakdown(fn, label, top=10):
    """Per-kernel GPU time of one call of fn (torch.profiler, CUDA activity), summed by kernel name."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times = {}  # name -> (µs, launches)
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:  # older torch
            us = getattr(ev, "self_cuda_time_total", 0)
        if us > 0:
            t, n = times.get(_short_kernel_name(ev.key), (0.0, 0))
            times[_short_kernel_name(ev.key)] = (t + us, n + ev.count)
    total = sum(t for t, _ in times.values())
    print(f"{label}: {total / 1e3:.2f} ms of GPU time in {sum(n for _, n in times.values())} kernels/copies; "
          f"top {top}:", flush=True)
    for name, (us, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us / 1e3:8.3f} ms {100 * us / max(total, 1e-9):5.1f}%  x{n:<3d} {name}", flush=True)


def attn_host():
    """Where one bf16 fwd+bwd call's time goes, minilm against SDPA's flash backend: the host's time to enqueue
    it (no synchronisation), one synchronised call timed with CUDA events (as minilm.bench times it), ten calls
    back to back, and the GPU time of one call kernel by kernel. "views": q, k, v as GPT-1 makes them, views
    into one [B, T, 3C] projection, with grad_out a transpose (minilm reads them in place)."""
    import statistics
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minilm.bench.common import time_ms as single_call_ms
    for B, H, T, D, views in ((32, 12, 512, 64, False), (32, 12, 512, 64, True), (4, 16, 4096, 128, False)):
        opts = dict(device="cuda", dtype=torch.bfloat16)
        if views:
            qkv = torch.randn(B, T, 3 * H * D, **opts, requires_grad=True)
            leaves = [qkv]
            g = torch.randn(B, T, H, D, **opts).transpose(1, 2)

            def inputs():
                return [t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2)]
        else:
            leaves = [torch.randn(B, H, T, D, **opts, requires_grad=True) for _ in range(3)]
            g = torch.randn(B, H, T, D, **opts)

            def inputs():
                return leaves

        def ours():
            for t in leaves:
                t.grad = None
            causal_attention(*inputs()).backward(g)

        def flash():
            for t in leaves:
                t.grad = None
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(*inputs(), is_causal=True).backward(g)

        label = f"attention bf16 {B},{H},{T},{D}{' views' if views else ''} fwd+bwd"
        for name, fn in (("minilm", ours), ("sdpa-flash", flash)):
            try:
                single = single_call_ms(fn, "cuda", warmup=3, iters=20)  # as minilm.bench times a call
                host = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    fn()
                    host.append((time.perf_counter() - t0) * 1e3)
                    torch.cuda.synchronize()
                print(f"{label} {name}: host {statistics.median(host):.3f} ms to enqueue, one call {single:.3f} ms, "
                      f"back to back {time_ms(fn):.3f} ms per call", flush=True)
                kernel_breakdown(fn, f"{label} {name}")
            except Exception as e:  # noqa: BLE001
                print(f"{label} {name}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        del leaves, g
        torch.cuda.empty_cache()


def cnn_perf(N=32768):
    """Times (CUDA events) of the fused op with each backward variant and of the composite, then where one
    fused fwd+bwd spends its GPU time, kernel by kernel (torch.profiler)."""
    L, V, E = 50, 262, 16
    for dtype in (torch.float32, torch.bfloat16):
        ids, emb, weights, biases = tc._char_inputs(N, L, V, E, tc.ELMO_FILTERS, torch.float32)
        total = sum(f for _, f in tc.ELMO_FILTERS)
        g = torch.randn(N, total, device="cuda")
        params = [emb, *weights, *biases]
        for p in params:
            p.requires_grad_()

        def composite():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = tc.char_cnn_reference(ids, emb, weights, biases, "relu")
            torch.autograd.grad(y, params, g.to(y.dtype))

        e2, w2, b2 = emb.detach().to(dtype), [w.detach().to(dtype) for w in weights], [b.detach().to(dtype) for b in biases]
        g2 = g.to(dtype)

        def fused():
            out, argmax = ops.char_cnn(ids, e2, w2, b2, "relu")
            ops.char_cnn_backward(g2, ids, e2, w2, out, argmax, "relu")

        def fused_fwd():
            ops.char_cnn(ids, e2, w2, b2, "relu")

        res = {}
        runs = [("fused fwd", "slots", fused_fwd)]
        runs += [(f"fused fwd+bwd [{v}]", v, fused) for v in tc.CNN_BWD_VARIANTS]
        runs += [("composite fwd+bwd", "slots", composite)]
        for name, variant, fn in runs:
            tc.set_cnn_bwd(variant)
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = time_ms(fn, warmup=2, iters=5)
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                res[name] = (ms, peak)
                print(f"char_cnn {str(dtype)[6:]} N={N} {name}: {ms:.2f} ms, peak extra {peak:.0f} MiB", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"char_cnn {str(dtype)[6:]} N={N} {name}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
            torch.cuda.empty_cache()
        for v in tc.CNN_BWD_VARIANTS:
            name = f"fused fwd+bwd [{v}]"
            if name in res and "composite fwd+bwd" in res:
                (a, pa), (b, pb) = res[name], res["composite fwd+bwd"]
                print(f"char_cnn {str(dtype)[6:]} N={N} [{v}]: speed-up {b / a:.2f}x (target >= 3), "
                      f"memory {pb / max(pa, 1e-9):.1f}x less (target >= 20)", flush=True)
        for v in tc.CNN_BWD_VARIANTS:
            tc.set_cnn_bwd(v)
            try:
                kernel_breakdown(fused, f"char_cnn {str(dtype)[6:]} N={N} fused fwd+bwd [{v}], per kernel")
            except Exception as e:  # noqa: BLE001
                print(f"char_cnn {str(dtype)[6:]} N={N} profile [{v}]: ERROR {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
        tc.set_cnn_bwd("slots")
        del ids, emb, weights, biases, g, params
        torch.cuda.empty_cache()


# The tilings the extension can switch between at run time (csrc/cuda/attention_kernels.cu reads these
# environment variables at every call): forward layouts, and backward schemes (+ the dQ kernel's tiling).
SWEEP_SHAPES = ((32, 12, 512, 64), (8, 12, 2048, 64), (2, 12, 8192, 64), (4, 16, 4096, 128))
FWD_LAYOUTS = ("narrow", "narrow2", "wide", "wide3", "wide64")
# The dQ tiling of the split schemes: "wide" (D = 64 only; at D = 128 it is narrow) was the faster one in the
# earlier H200 sweeps and is the default, so the split schemes are swept with it alone (the fused ones have no
# dQ kernel). MINILM_ATTN_DQ=narrow remains selectable.
BWD_CONFIGS = (("fused", "narrow"), ("split", "wide"), ("split2", "wide"), ("split3", "wide"), ("splitkv", "wide"),
               ("wide", "wide"), ("wide16", "wide"), ("fusedwide", "narrow"), ("fusedkv", "narrow"),
               ("fused2d", "narrow"), ("split2d", "wide"))
# Tilings not yet run on a GPU when they were written (checked by compiling and by a lane-level model only):
# the sweep runs them after all the others, so that if one faults (an illegal memory access kills the CUDA
# context for the rest of the process) the figures of the others are already in. Empty this set once a
# sweep has run them (the eighth session's H100 sweep ran every tiling listed above).
SWEEP_UNTRIED = set()
# Names that run the very same kernels as another swept name at that head dim: not timed there (so never
# picked there), to save GPU time. Their correctness is still checked.
SWEEP_SAME = {64: {("fwd", "wide64"), ("bwd", "splitkv")},
              128: {("bwd", "split3"), ("bwd", "wide"), ("bwd", "wide16"), ("bwd", "fusedwide")}}
SWEEP_CHECKS = ((2, 3, 257, 64), (1, 2, 1000, 128), (2, 3, 130, 48), (1, 1, 1, 64), (2, 1, 37, 128))


def _cuda_alive():
    try:
        torch.zeros(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001  (a sticky error: illegal address, launch failure, ...)
        return False


def _sweep_env(fwd=None, bwd=None, dq=None):
    for key, val in (("MINILM_ATTN_FWD", fwd), ("MINILM_ATTN_BWD", bwd), ("MINILM_ATTN_DQ", dq)):
        if val is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = val


def _sweep_inputs(B, H, T, D):
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn_like(q)


def attn_sweep():
    """Every forward layout (fwd timed) and every backward configuration (fwd+bwd timed with the default
    forward), each checked first, on the four target shapes next to SDPA's flash and cuDNN backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ok = True
    base = {}  # shape -> {name: (fwd ms, fwd+bwd ms)} of the SDPA backends
    for B, H, T, D in SWEEP_SHAPES:
        q, k, v, g = _sweep_inputs(B, H, T, D)
        for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fwd():
                with torch.no_grad(), sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def fb():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
            try:
                base.setdefault((B, H, T, D), {})[name] = (time_ms(fwd), time_ms(fb))
                bf, bfb = base[B, H, T, D][name]
                flops = 2 * B * H * T * T * D
                print(f"sweep {name} {B},{H},{T},{D}: fwd {bf:.3f} ms {flops / bf / 1e9:.0f} TF/s, "
                      f"fwd+bwd {bfb:.3f} ms {3.5 * flops / bfb / 1e9:.0f} TF/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"sweep {name} {B},{H},{T},{D}: ERROR {type(e).__name__}: {str(e)[:150]}", flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()

    def timed(label, shape, fn, flops, ref_index):
        nonlocal ok
        try:
            ms = time_ms(fn)
            line = f"{label}: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s"
            for name, times in base.get(shape, {}).items():
                line += f" | {name} {times[ref_index]:.3f} ms -> ours/{name} {times[ref_index] / ms:.2f}x"
            print(line, flush=True)
            return ms
        except Exception as e:  # noqa: BLE001
            print(f"{label}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
            ok = False
            return None

    configs = [("fwd", layout) for layout in FWD_LAYOUTS] + [("bwd", bwd_dq) for bwd_dq in BWD_CONFIGS]
    configs.sort(key=lambda c: (c[0], c[1] if c[0] == "fwd" else c[1][0]) in SWEEP_UNTRIED)  # stable: tried first
    results = {}  # (kind, choice) -> {"ok": bool, "ms": {shape: ms}}
    for kind, choice in configs:
        name = choice if kind == "fwd" else choice[0]  # the MINILM_ATTN_FWD / MINILM_ATTN_BWD name
        label = f"fwd={choice}" if kind == "fwd" else f"bwd={choice[0]},dq={choice[1]}"
        if kind == "fwd":
            _sweep_env(fwd=choice)
        else:
            _sweep_env(bwd=choice[0], dq=choice[1])
        res = results[kind, choice] = {"ok": True, "ms": {}}
        for chk in SWEEP_CHECKS:
            res["ok"] &= case(f"sweep {label} correct bf16 {chk}", lambda: tc._check_attention(*chk, torch.bfloat16))
        res["ok"] &= case(f"sweep {label} correct fp16 (1,2,300,80)",
                          lambda: tc._check_attention(1, 2, 300, 80, torch.float16))
        ok &= res["ok"]
        if not _cuda_alive():  # a fault (illegal address, ...) leaves the CUDA context unusable: stop here
            print(f"sweep: {label} left the CUDA context unusable; the configurations after it are not run. "
                  f"Take {name!r} out of FWD_LAYOUTS / BWD_CONFIGS and sweep again.", flush=True)
            break
        if not res["ok"]:
            continue  # a failed check rules it out: no timing
        for shape in SWEEP_SHAPES:
            B, H, T, D = shape
            if (kind, name) in SWEEP_SAME.get(D, ()):
                continue
            q, k, v, g = _sweep_inputs(*shape)
            flops = 2 * B * H * T * T * D
            if kind == "fwd":
                def fwd():
                    with torch.no_grad():
                        causal_attention(q, k, v)
                res["ms"][shape] = timed(f"sweep {label:22s} {B},{H},{T},{D} fwd", shape, fwd, flops, 0)
            else:
                def fb():
                    causal_attention(q, k, v).backward(g)
                res["ms"][shape] = timed(f"sweep {label:22s} {B},{H},{T},{D} fwd+bwd", shape, fb, 3.5 * flops, 1)
            del q, k, v, g
            torch.cuda.empty_cache()
        if not _cuda_alive():
            print(f"sweep: {label} left the CUDA context unusable while timed; the configurations after it are "
                  f"not run. Take {name!r} out of FWD_LAYOUTS / BWD_CONFIGS and sweep again.", flush=True)
            ok = False
            break
    _sweep_env()
    picks = _sweep_pick(results)
    # Where the time goes with the picked tilings, kernel by kernel (for the next round of tuning).
    if _cuda_alive():
        for var, val in picks.items():
            os.environ[var] = val
        for shape in SWEEP_SHAPES:
            q, k, v, g = _sweep_inputs(*shape)
            case(f"sweep profile fwd+bwd {shape}",
                 lambda: kernel_breakdown(lambda: causal_attention(q, k, v).backward(g), "per kernel", top=6) or "done")
            del q, k, v, g
        _sweep_env()
    return ok


def _sweep_pick(results):
    """Per head dim, the forward layout and the backward configuration that are fastest over the sweep's
    shapes of that head dim, among those that passed every check: printed, and written as shell
    exports to $MINILM_SWEEP_ENV when set: candidates for the defaults in attention_kernels.cu (which
    also weigh determinism: "fused" adds dQ with atomics). Names in SWEEP_SAME are the same kernels as
    another name at that head dim and are not timed there; wide3 at D = 128 differs from wide only in its
    launch bounds, and the dQ tiling is always narrow at D = 128."""
    picks = {"MINILM_ATTN_FWD": [], "MINILM_ATTN_BWD": [], "MINILM_ATTN_DQ": []}
    for D in sorted({s[3] for s in SWEEP_SHAPES}):
        shapes = [s for s in SWEEP_SHAPES if s[3] == D]
        for kind in ("fwd", "bwd"):
            valid = {choice: r["ms"] for (k, choice), r in results.items()
                     if k == kind and r["ok"] and all(r["ms"].get(s) is not None for s in shapes)}
            if not valid:
                print(f"sweep pick D={D} {kind}: no configuration passed every check; keeping the default", flush=True)
                continue
            # score: the sum over shapes of time / the best time at that shape (so long shapes do not dominate)
            best = {s: min(ms[s] for ms in valid.values()) for s in shapes}
            score, choice = min((sum(ms[s] / best[s] for s in shapes), c) for c, ms in valid.items())
            print(f"sweep pick D={D} {kind}: {choice} (score {score:.3f}; {len(shapes)} = best everywhere)", flush=True)
            if kind == "fwd":
                picks["MINILM_ATTN_FWD"].append(f"{D}:{choice}")
            else:
                picks["MINILM_ATTN_BWD"].append(f"{D}:{choice[0]}")
                picks["MINILM_ATTN_DQ"].append(f"{D}:{choice[1]}")
    picks = {var: ",".join(vals) for var, vals in picks.items() if vals}
    lines = [f"export {var}={val}" for var, val in picks.items()]
    print("sweep best: " + " ; ".join(lines), flush=True)
    path = os.environ.get("MINILM_SWEEP_ENV")
    if path and lines:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    return picks


def cnn_determinism():
    """The char-CNN backward has no atomics: two runs must agree bitwise (ELMo filters, 3000 tokens), for
    both backward variants; and the two variants must agree up to rounding."""
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        ok &= case(f"char_cnn backward deterministic, slots ~ old, {str(dtype)[6:]}",
                   lambda: tc.test_char_cnn_backward_deterministic_and_variants_agree(dtype) or "bitwise equal")
    return ok


def attn_order():
    """The dK/dV kernels' CTA order (csrc/cuda/dkdv_order.h): fwd+bwd with the default order, the grid's own
    order (MINILM_ATTN_HEAD_GROUP=0), groups of 4 heads in 3 key-tile phases and in 1 (MINILM_ATTN_KEY_PHASES),
    and one head at a time (FlashAttention-2's order), next to SDPA flash, at the sweep's shapes: single calls,
    the L2 flushed before each, in rounds of random order (minilm.bench's timing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minilm.bench.common import time_interleaved
    orders = {"default": {}, "grid order": {"MINILM_ATTN_HEAD_GROUP": "0"},
              "4 heads x 3 phases": {"MINILM_ATTN_HEAD_GROUP": "4", "MINILM_ATTN_KEY_PHASES": "3"},
              "4 heads x 1 phase": {"MINILM_ATTN_HEAD_GROUP": "4", "MINILM_ATTN_KEY_PHASES": "1"},
              "one head": {"MINILM_ATTN_HEAD_GROUP": "1", "MINILM_ATTN_KEY_PHASES": "1"}}
    names = ("MINILM_ATTN_HEAD_GROUP", "MINILM_ATTN_KEY_PHASES")
    ok = True
    for B, H, T, D in SWEEP_SHAPES:
        q, k, v, g = _sweep_inputs(B, H, T, D)

        def ours(env):
            def fn():
                for name in names:
                    os.environ.pop(name, None)
                os.environ.update(env)
                q.grad = k.grad = v.grad = None
                causal_attention(q, k, v).backward(g)
            return fn

        def flash():
            q.grad = k.grad = v.grad = None
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
        fns = {**{name: ours(env) for name, env in orders.items()}, "sdpa-flash": flash}
        try:
            ms = time_interleaved(fns, "cuda", warmup=3, iters=30)
            print(f"attn-order bf16 {B},{H},{T},{D} fwd+bwd ms: " + ", ".join(
                f"{name} {t:.3f} ({ms['sdpa-flash'] / t:.2f}x flash)" for name, t in ms.items() if name != "sdpa-flash")
                + f", sdpa-flash {ms['sdpa-flash']:.3f}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"attn-order {B},{H},{T},{D}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
            ok = False
        for name in names:
            os.environ.pop(name, None)
        del q, k, v, g
        torch.cuda.empty_cache()
    return ok


# ---- attn-ncu: hardware counters of the attention kernels (Nsight Compute), minilm next to SDPA's flash backend.
# Profiles one bf16 fwd+bwd of each at the shapes below: every kernel with attn_ (minilm) or
# flash_ (FlashAttention-2 in torch) in their names, with the sections below; prints the main forward and backward kernels
# side by side and writes every metric of every kernel to $OUT/attn_ncu_<shape>.csv (or the temp folder).
# ncu replays each kernel once per counter pass, with the caches flushed (its default) and the clocks as
# they are (--clock-control none: the lent machines' clocks are left alone).
NCU_SHAPES = ((4, 16, 4096, 128), (8, 12, 2048, 64))
NCU_SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "ComputeWorkloadAnalysis",
                "InstructionStats", "MemoryWorkloadAnalysis_Tables", "SchedulerStats")
# the metrics of the side-by-side table (regular expressions over ncu's raw metric names; the CSV has all)
NCU_SHOWN = (r"gpu__time_duration\.sum", r"launch__(registers_per_thread|shared_mem_per_block_dynamic|grid_size|"
             r"block_size|occupancy_limit_\w+)$", r"sm__warps_active\.avg\.pct_of_peak_sustained_active",
             r"sm__throughput\.avg\.pct_of_peak_sustained_elapsed", r"smsp__inst_executed\.sum$",
             r"smsp__issue_active\.avg\.pct_of_peak_sustained_active",
             r"sm__inst_executed_pipe_\w+\.avg\.pct_of_peak_sustained_active",
             r"sm__pipe_\w*tensor\w*\.avg\.pct_of_peak_sustained_active",
             r"smsp__average_warp_latency_per_inst_issued\.ratio",
             r"smsp__average_warps_issue_stalled_\w+_per_issue_active\.ratio",
             r"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_(ld|st)\.sum",
             r"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_(ld|st)\.sum", r"lts__t_sectors_op_(red|atom)\.sum",
             r"lts__t_sectors_srcunit_tex_op_(read|write)\.sum", r"dram__bytes_(read|write)\.sum",
             r"lts__throughput\.avg\.pct_of_peak_sustained_elapsed",
             r"l1tex__throughput\.avg\.pct_of_peak_sustained_active")
NCU_KERNELS = "regex:(attn_|flash_)"
NCU_TIMEOUT_S = 70  # per shape: the gpu_check step gives attn-ncu 150 s in all


def attn_ncu_child():
    """What ncu profiles: one bf16 fwd+bwd of minilm, then one of SDPA flash, at the shape in argv."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, T, D = (int(x) for x in sys.argv[2].split(","))
    q, k, v, g = _sweep_inputs(B, H, T, D)
    causal_attention(q, k, v).backward(g)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
    torch.cuda.synchronize()


def _ncu_table(rows, shape):
    """The main kernels (not the Delta / dQ conversion passes) side by side, one metric a line."""
    key = next((k for k in ("Kernel Name", "Function Name", "Name") if k in rows[0]), None)
    if key is None:
        print(f"attn-ncu {shape}: no kernel name column in ncu's CSV", flush=True)
        return
    main = [r for r in rows if not re.search(r"prologue|delta|convert|dot_do_o|simple", r[key])]
    names = [_short_kernel_name(r[key]).split("<")[0].split("::")[-1][:22] for r in main]
    print(f"attn-ncu {shape}: " + " | ".join(names), flush=True)
    shown = [re.compile(p) for p in NCU_SHOWN]
    for metric in rows[0]:
        if not any(p.fullmatch(metric) or p.match(metric) for p in shown):
            continue
        vals = [r.get(metric, "") for r in main]
        if all(v in ("", "0", "0.0", "n/a") for v in vals):
            continue
        print(f"  {metric[:72]:72s} " + " ".join(f"{v[:15]:>15s}" for v in vals), flush=True)


def attn_ncu():
    """Runs attn_ncu_child under ncu per shape and prints the side-by-side table (see NCU_SHAPES)."""
    import csv
    import io
    import shutil
    import subprocess
    import tempfile
    ncu = shutil.which("ncu")
    if not ncu:
        print("attn-ncu: no ncu (Nsight Compute) on PATH", flush=True)
        return False
    out_dir = os.environ.get("OUT") or tempfile.gettempdir()
    ok = True
    for shape in NCU_SHAPES:
        tag = ",".join(map(str, shape))
        cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--kernel-name", NCU_KERNELS,
               "--csv", "--page", "raw"]
        for section in NCU_SECTIONS:
            cmd += ["--section", section]
        cmd += [sys.executable, os.path.abspath(__file__), "attn-ncu-child", tag]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NCU_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"attn-ncu {tag}: ncu ran past {NCU_TIMEOUT_S} s; stopped", flush=True)
            ok = False
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('"')]  # the CSV (ncu's own lines: ==PROF==)
        path = os.path.join(out_dir, f"attn_ncu_{tag.replace(',', 'x')}.csv")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
        rows = [r for r in rows if str(r.get("ID", "0")).strip().isdigit()]  # not the row of units
        print(f"attn-ncu {tag}: ncu rc={proc.returncode}, {len(rows)} kernels in "
              f"{time.perf_counter() - t0:.0f} s; every metric in {path}", flush=True)
        if proc.returncode != 0 or not rows:
            tail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith('"')][-8:]
            print("\n".join("  " + ln for ln in tail), flush=True)
            ok = False
            continue
        _ncu_table(rows, tag)
    return ok


PARTS = {"attn-correct": attn_correct, "cnn-correct": cnn_correct, "attn-perf": attn_perf, "attn-host": attn_host,
         "cnn-perf": cnn_perf, "attn-sweep": attn_sweep, "cnn-determinism": cnn_determinism,
         "attn-order": attn_order, "attn-ncu": attn_ncu}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "attn-ncu-child":  # what attn-ncu runs under ncu
        attn_ncu_child()
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1] not in PARTS:
        sys.exit(f"usage: python scripts/cuda_diagnostics.py {{{'|'.join(PARTS)}}}")
    if not torch.cuda.is_available():
        sys.exit("cuda_diagnostics: torch sees no CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    result = PARTS[sys.argv[1]]()
    sys.exit(0 if result in (None, True) else 1)
