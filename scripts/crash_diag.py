"""Why does a C++ error raised by the CUDA ops kill the process (SIGSEGV) instead of raising RuntimeError?

    python scripts/crash_diag.py            (GPU machine; ~1-3 minutes, each probe in its own process)

Each probe runs in a fresh interpreter and prints `probe NAME: rc=RC | last line`: rc 0 means the expected
RuntimeError was raised and caught; rc -11 (or 139) a segfault. The matrix separates the hypotheses:
  aten-cuda-error      torch's own error on CUDA tensors: if this crashes, the environment is at fault, not minilm
  minilm-cpu-glue      a TORCH_CHECK in minilm's CPU kernel (CPU tensors)
  minilm-cuda-glue-cpu the CUDA glue's TORCH_CHECK reached with CPU tensors (dispatcher redispatch to the CUDA key)
  minilm-cuda-glue     the crash of run 1: causal_attention with mismatched CUDA tensors (Python autograd path)
  minilm-cuda-direct   the same, but redispatched straight to the CUDA kernel (no Python autograd frame)
  ...-no-stacktrace    with TORCH_SHOW_CPP_STACKTRACES=0 / 1
  build variants       the same probes with the extension JIT-built without -march=native, without -fopenmp
Then, if cuda-gdb is on PATH, the crashing probe runs under it and prints the native backtrace.
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = "import sys; sys.path.insert(0, %r)\nimport torch\n" % ROOT
PROBES = {
    "aten-cuda-error": "torch.mm(torch.ones(2, 3, device='cuda'), torch.ones(2, 3, device='cuda'))",
    "minilm-cpu-glue": "import minilm\nq = torch.randn(1, 2, 8, 16)\n"
                       "torch.ops.minilm.causal_attention(q, q[:, :, :4], q, 0.25)",
    "minilm-cuda-glue-cpu": "import minilm\nq = torch.randn(1, 2, 8, 16)\n"
                            "ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)\n"
                            "torch.ops.minilm.causal_attention.default.redispatch(ks, q, q[:, :, :4], q, 0.25)",
    "minilm-cuda-glue": "import minilm\nq = torch.randn(1, 2, 8, 16, device='cuda')\n"
                        "torch.ops.minilm.causal_attention(q, q[:, :, :4], q, 0.25)",
    "minilm-cuda-direct": "import minilm\nq = torch.randn(1, 2, 8, 16, device='cuda')\n"
                          "ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)\n"
                          "torch.ops.minilm.causal_attention.default.redispatch(ks, q, q[:, :, :4], q, 0.25)",
    "minilm-cnn-bad-ids": "import minilm\nids = torch.full((4, 12), 10, device='cuda')\n"
                          "emb = torch.randn(10, 16, device='cuda')\n"
                          "torch.ops.minilm.char_cnn(ids, emb, [torch.randn(8, 16, 3, device='cuda')], "
                          "[torch.zeros(8, device='cuda')], 'relu')",
}
EPILOGUE = "\nprint('NO ERROR RAISED')\n"


def script(body):
    return PRELUDE + "try:\n" + "".join("    " + ln + "\n" for ln in body.splitlines()) + \
        "except RuntimeError as e:\n    print('RuntimeError OK:', str(e).strip().splitlines()[0][:160])\n" \
        "    sys.exit(0)\n" + EPILOGUE + "sys.exit(3)\n"


def run(name, body, env_extra=None, timeout=240):
    env = dict(os.environ, **(env_extra or {}))
    try:
        p = subprocess.run([sys.executable, "-c", script(body)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip() and not ln.startswith("minilm: no prebuilt")]
        print(f"probe {name}: rc={p.returncode} | {lines[-1][:200] if lines else ''}", flush=True)
        return p.returncode
    except subprocess.TimeoutExpired:
        print(f"probe {name}: TIMEOUT after {timeout} s", flush=True)
        return None


def main():
    import torch
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}", flush=True)
    for tool in ("c++", "g++", "nvcc"):
        path = shutil.which(tool)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()
            print(f"{tool}: {path}: {out[0] if out else '?'}", flush=True)
    rcs = {}
    for name, body in PROBES.items():
        rcs[name] = run(name, body)
    run("minilm-cuda-glue TORCH_SHOW_CPP_STACKTRACES=0", PROBES["minilm-cuda-glue"], {"TORCH_SHOW_CPP_STACKTRACES": "0"})
    run("minilm-cuda-glue TORCH_SHOW_CPP_STACKTRACES=1", PROBES["minilm-cuda-glue"], {"TORCH_SHOW_CPP_STACKTRACES": "1"})
    # the extension's shared-library dependencies (which libstdc++/libgomp/libcudart it binds to)
    import minilm
    so = getattr(getattr(minilm, "_C", None), "__file__", None)
    if so and shutil.which("ldd"):
        deps = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        print("ldd " + so + ":\n" + "\n".join("    " + ln.strip() for ln in deps.splitlines()
                                          if any(k in ln for k in ("stdc++", "gomp", "gcc_s", "cudart", "c10", "torch"))))
    crashed = [n for n, rc in rcs.items() if rc not in (0, None)]
    if not crashed:
        print("crash_diag: every probe raised RuntimeError: no crash", flush=True)
        return 0
    # the same probes with the extension JIT-built with fewer flags, in scratch caches (MINILM_FORCE_JIT)
    for label, env in (("no -march=native", {"MINILM_ARCH_FLAGS": ""}),
                       ("no -march=native, no -fopenmp", {"MINILM_ARCH_FLAGS": "", "MINILM_OPENMP": "0"})):
        cache = tempfile.mkdtemp(prefix="minilm-diag-")
        env = dict(env, MINILM_FORCE_JIT="1", MINILM_CACHE=cache)
        for name in crashed:
            run(f"{name} [JIT {label}]", PROBES[name], env)
    gdb = shutil.which("cuda-gdb")
    if gdb:
        body = PROBES[crashed[-1]]
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(script(body))
        print(f"--- cuda-gdb backtrace of probe {crashed[-1]}", flush=True)
        try:
            p = subprocess.run([gdb, "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
                                "-ex", "info sharedlibrary", "--args", sys.executable, f.name], cwd=ROOT,
                               capture_output=True, text=True, timeout=150)
            text = p.stdout + p.stderr
            keep = [ln for ln in text.splitlines() if ln.startswith("#") or "SIG" in ln or "signal" in ln
                    or "stdc++" in ln or "gcc_s" in ln or "minilm" in ln]
            print("\n".join(keep[-80:]), flush=True)
        except subprocess.TimeoutExpired:
            print("cuda-gdb: timeout", flush=True)
    else:
        print("cuda-gdb is not on PATH: no native backtrace", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
