"""How the extension ``minilm._C`` is built — shared by ``setup.py`` and the JIT fallback.

Two ways to get the compiled ops:

* ``pip install --no-build-isolation -e .`` runs ``setup.py``, which compiles ``csrc/`` into
  ``minilm/_C*.so`` (CUDA sources too when a CUDA-enabled torch, nvcc and a GPU are present, or
  always with ``FORCE_CUDA=1``).
* In a plain checkout with no ``minilm/_C``, ``import minilm`` compiles the same sources with
  ``torch.utils.cpp_extension.load`` into a cache directory (``$MINILM_CACHE`` or
  ``~/.cache/minilm``). torch re-hashes the sources on every load, so editing ``csrc/`` triggers a
  rebuild on the next import.

This file imports nothing from ``minilm`` so that ``setup.py`` can load it on its own.
"""
import glob
import os
import shutil
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def cpu_sources():
    return sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))


def cuda_sources():
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))


def headers(with_cuda=False):
    """The headers the sources include (setup.py's `depends`, so that editing one triggers a rebuild)."""
    dirs = [CSRC, os.path.join(CSRC, "cpu")] + ([os.path.join(CSRC, "cuda")] if with_cuda else [])
    return sorted(p for d in dirs for ext in ("*.h", "*.cuh") for p in glob.glob(os.path.join(d, ext)))


def changed_since_build(so_path, with_cuda):
    """The build inputs (sources and headers) modified after the extension `so_path` was built."""
    built = os.path.getmtime(so_path)
    inputs = cpu_sources() + (cuda_sources() if with_cuda else []) + headers(with_cuda)
    return [p for p in inputs if os.path.getmtime(p) > built]


def openmp_flags():
    """-fopenmp, unless MINILM_OPENMP=0 (a diagnosis switch: the CPU kernels then run on one thread)."""
    return [] if os.environ.get("MINILM_OPENMP", "1") == "0" else ["-fopenmp"]


def cxx_flags(with_cuda=False):
    # -march=native: the extension is compiled on the machine that runs it (pip install -e . or
    # the JIT), so the compiler may use every vector unit it has (AVX2/AVX-512 on x86).
    # MINILM_ARCH_FLAGS overrides it, e.g. for a wheel that must run on older CPUs.
    # -fno-math-errno -fno-trapping-math: as PyTorch's own build; without them GCC will not vectorise
    # loops that call floor() or convert float to int (the kernels' exp). They do not reorder
    # arithmetic (unlike -ffast-math), so results stay IEEE-exact.
    # No -std=: torch's cpp_extension adds the standard its headers need (C++17 or C++20 by version).
    arch = os.environ.get("MINILM_ARCH_FLAGS", "-march=native").split()
    flags = ["-O3", *openmp_flags(), "-fno-math-errno", "-fno-trapping-math", *arch]
    if with_cuda:
        flags.append("-DMINILM_WITH_CUDA")
    return flags


def nvcc_flags():
    return ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-DMINILM_WITH_CUDA"]


def want_cuda():
    """CUDA sources are built when torch has CUDA, nvcc is found and a GPU is visible, or always when
    FORCE_CUDA=1 (never with MINILM_CPU_ONLY=1)."""
    if os.environ.get("MINILM_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def cache_dir():
    import torch
    base = os.environ.get("MINILM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minilm")
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(base, "ext", tag)


def _missing_tools():
    from torch.utils.cpp_extension import is_ninja_available
    missing = []
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ('{cxx}' is not on PATH; install g++ or clang, or set CXX)")
    return missing


def _clear_stale_lock(build_dir, max_age_s=900):
    # torch's JIT guards a build with a 'lock' file; a build that was killed leaves it behind and the
    # next load waits for it forever. A lock older than any real build is stale.
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > max_age_s:
        print(f"minilm: removing a stale build lock left by an interrupted build: {lock}", file=sys.stderr)
        os.remove(lock)


def load_jit(verbose=False, reason="no prebuilt extension found"):
    """Compile csrc/ with torch.utils.cpp_extension.load and return the module."""
    missing = _missing_tools()
    if missing:
        raise RuntimeError(f"minilm: {reason}, and the extension cannot be JIT-built: missing "
                           + " and ".join(missing) + ". Or install it with: pip install --no-build-isolation -e .")
    from torch.utils.cpp_extension import load
    with_cuda = want_cuda()
    sources = cpu_sources() + (cuda_sources() if with_cuda else [])
    build_dir = cache_dir() + ("-cuda" if with_cuda else "")
    os.makedirs(build_dir, exist_ok=True)
    _clear_stale_lock(build_dir)
    print(f"minilm: {reason}; JIT-compiling csrc/ into {build_dir} "
          "(once; again only after csrc/ changes)", file=sys.stderr)
    return load(name="minilm_C", sources=sources, build_directory=build_dir,
                extra_cflags=cxx_flags(with_cuda), extra_cuda_cflags=nvcc_flags(),
                extra_ldflags=openmp_flags(), with_cuda=with_cuda, verbose=verbose)


def load_extension():
    """Import the prebuilt ``minilm._C``; fall back to the JIT build. MINILM_FORCE_JIT=1 skips the first."""
    if os.environ.get("MINILM_FORCE_JIT", "0") == "1":
        return load_jit(reason="MINILM_FORCE_JIT=1")
    try:
        from minilm import _C  # noqa: F401  (registers the ops as a side effect)
        _check_complete(_C.__file__)
        _warn_if_stale(_C.__file__)
        return _C
    except ImportError as e:
        # A minilm/_C*.so that exists but does not load was built against another torch or Python:
        # say so, rather than let the user think it was never built.
        prebuilt = glob.glob(os.path.join(ROOT, "minilm", "_C*.so")) + glob.glob(os.path.join(ROOT, "minilm", "_C*.pyd"))
        reason = (f"the prebuilt extension {os.path.basename(prebuilt[0])} does not load ({e}); rebuild it with "
                  "pip install --no-build-isolation -e .") if prebuilt else "no prebuilt extension found"
    return load_jit(reason=reason)


def _check_complete(so_path):
    # An extension built before causal_attention's autograd formula and double-backward guard moved to C++
    # (csrc/attention_autograd.cpp) would load and run without gradients, or without the guard: refuse it.
    import torch
    for op in ("causal_attention", "causal_attention_backward"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"minilm::{op}", "Autograd"):
            raise RuntimeError(f"minilm: {os.path.basename(so_path)} was built from older sources (it has no "
                               f"autograd formula for {op}); rebuild it with pip install --no-build-isolation -e .")


def _warn_if_stale(so_path):
    # In a checkout (pip install -e, or build_ext --inplace) csrc/ sits beside the package: sources edited
    # after the build are not in the .so that runs, which would otherwise go unnoticed.
    if not os.path.isdir(CSRC) or os.path.dirname(os.path.abspath(so_path)) != os.path.join(ROOT, "minilm"):
        return
    import torch
    with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("minilm::causal_attention", "CUDA")
    changed = changed_since_build(so_path, with_cuda)
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        warnings.warn(f"minilm: {os.path.relpath(changed[0], ROOT)}{more} changed after {os.path.basename(so_path)} "
                      "was built, so the kernels that run are the old ones; rebuild with "
                      "pip install --no-build-isolation -e .", stacklevel=3)
