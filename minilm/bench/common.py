"""Timing and memory helpers shared by the benchmarks."""
import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

from minilm.files import is_out_of_memory


def positive_int(text):
    """argparse type: an integer >= 1 (0 would otherwise fall back to a default, a negative crash later)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seconds(text):
    """argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):   # NaN too
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device="cpu", warmup=2, iters=10, min_time_s=0.0):
    """Median wall time of fn() in milliseconds (CUDA events on a GPU)."""
    return time_interleaved({"fn": fn}, device, warmup, iters, min_time_s)["fn"]


def time_interleaved(fns, device="cpu", warmup=2, iters=10, min_time_s=0.0):
    """{name: median wall time of one call of fn, in ms} for fns = {name: fn}, timed in rounds that call
    each fn once, so that a change in the machine's load or clock during the run falls on every
    implementation alike rather than on whichever was timed last. Each round takes the fns in a new random
    order (seeded: the same for every run), so that none always runs first, or right after the same one.
    Each call is timed on its own: with CUDA events and a synchronisation after it on a GPU, so the host's
    launch overhead counts, and with the GPU's L2 cache flushed before it, so that no call finds its inputs
    left in the cache by the one before (as llm.c's and Triton's benchmarks do). At least `iters` rounds,
    and more until about `min_time_s` per fn has passed (1000 at most)."""
    if not fns:
        return {}
    device = torch.device(device)
    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    flush = l2_flush_buffer(device) if cuda else None
    sync(device)
    order = list(fns)
    shuffle = random.Random(0).shuffle
    times = {name: [] for name in order}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < iters or time.perf_counter() - t_start < min_time_s * len(fns):
        shuffle(order)
        for name in order:
            fn = fns[name]
            if cuda:
                if flush is not None:
                    flush.zero_()
                torch.cuda.synchronize(device)   # the flush is done before the clock starts
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 1000:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


_L2_FLUSH = {}  # torch.device -> its flush buffer (None where it did not fit)


def l2_flush_buffer(device):
    """A byte buffer whose zeroing evicts everything else from the GPU's L2 cache: twice the L2's size and at
    least 256 MiB (torch reports 50 MB of L2 on an H100, 60 MB on an H200). Allocated once per device, by the
    first timing or memory measurement (peak_mib), and kept, so that whether a call fits in memory is judged
    with it held; None, with a note, where it does not fit: the calls are then timed without a flush."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _L2_FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        try:
            _L2_FLUSH[device] = torch.empty(max(2 * l2, 256 << 20), dtype=torch.uint8, device=device)
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            print(f"minilm.bench: no room on {device} for the L2 cache flush; timing without it", file=sys.stderr)
            _L2_FLUSH[device] = None
    return _L2_FLUSH[device]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side logs a line at every start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn):
    # torch's CPU allocator reports every allocation and free to the profiler when profile_memory is
    # on; the running sum of those events, in time order, peaks at the call's extra memory.
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def peak_mib(fn, device="cpu"):
    """Peak memory that one call of fn() allocates on top of what was already held, in MiB.

    Counts tensors (torch's allocator), the same on both devices: on a GPU through
    torch.cuda.max_memory_allocated, on the CPU through the profiler's memory events. (The process's
    resident set is no measure on the CPU: glibc keeps freed blocks resident and reuses them, so a
    call that allocates a lot can leave the high-water mark unchanged.) None if it cannot be measured.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        l2_flush_buffer(device)  # held from the first measurement on, as during the timing
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        return _cpu_peak_bytes(fn) / 2**20
    except (RuntimeError, AttributeError):  # a torch without the profiler's memory events
        return None


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    name = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


class Reporter:
    """Prints rows as an aligned table, or as JSON lines with --json."""

    def __init__(self, as_json=False):
        self.as_json = as_json
        self.header_done = False

    def row(self, record):
        if self.as_json:
            print(json.dumps(record), flush=True)
            return
        cols = [("op", 10), ("dtype", 9), ("shape", 20), ("pass", 7), ("impl", 22), ("ms", 10),
                ("gflops", 9), ("peak_mib", 9)]
        if not self.header_done:
            print(" ".join(f"{name:>{w}}" for name, w in cols), flush=True)
            self.header_done = True
        cells = []
        for name, w in cols:
            val = record.get(name)
            if isinstance(val, float):
                val = f"{val:.1f}" if val >= 10 else f"{val:.3g}"
            elif isinstance(val, (list, tuple)):
                val = ",".join(map(str, val))
            cells.append(f"{'-' if val is None else val!s:>{w}}")
        print(" ".join(cells), flush=True)

    def note(self, text):
        if not self.as_json:
            print(text, flush=True)


def threads_note():
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
