"""What ptxas made of the attention kernels, without a GPU: per kernel, its registers and spills and the
instruction mix of its main loop (the longest backward branch in its SASS), optionally next to the
FlashAttention-2 kernels that the CUDA build of torch ships (SDPA's flash backend).

    python scripts/sass_stats.py                          # every bf16 tensor-core kernel, sm_90
    python scripts/sass_stats.py --match attn_bwd_2d      # kernels whose demangled name contains this
    python scripts/sass_stats.py --flash path/to/libtorch_cuda.so --match 128ELi64ELi128ELi8  # FA2's hdim-128 bwd

Needs nvcc and cuobjdump (the toolkit's, or the copy in the triton wheel of the CUDA venv that
scripts/check_cuda_build.sh makes) and c++filt. A count is static: each instruction of the loop body once.
It is a model for comparing two versions of a kernel, not a timing (scripts/gpu_check.sh times them).
"""
import argparse
import collections
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOWN = ("HMMA", "LDSM", "LDS", "STS", "LDGSTS", "MUFU", "REDG", "BRA", "BAR", "LDL", "STL")
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def nvcc_flags():
    """The flags the extension's own build gives nvcc: minilm/_build.py's (loaded on its own, as setup.py does)
    and the macros torch's build adds."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    spec = importlib.util.spec_from_file_location("minilm_build", os.path.join(ROOT, "minilm", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return ["-std=c++17", *COMMON_NVCC_FLAGS, *build.nvcc_flags()]


def cuobjdump():
    found = shutil.which("cuobjdump")
    venv = os.path.join(os.environ.get("MINILM_CACHE", os.path.expanduser("~/.cache/minilm")), "venv-cuda")
    found = found or next(iter(glob.glob(f"{venv}/lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump")),
                          None)
    if not found:
        sys.exit("sass_stats: no cuobjdump on PATH or in the CUDA venv's triton wheel")
    return found


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return [re.sub(r"\(.*|minilm_cuda::\(anonymous namespace\)::|^void ", "", n) for n in out.splitlines()]


def functions(sass):
    """(mangled name, [(address, predicated, opcode, line)]) per function of a cuobjdump -sass listing."""
    for part in re.split(r"\n\s+Function : ", sass)[1:]:
        name, body = part.split("\n", 1)
        ins = [(int(m.group(1), 16), bool(m.group(2)), m.group(3), line)
               for line in body.splitlines() for m in [INSTR.search(line)] if m]
        yield name.strip(), ins


def main_loop(ins):
    """The instructions of the longest loop: from the target of a backward branch to the branch."""
    where = {addr: i for i, (addr, *_) in enumerate(ins)}
    best = (0, -1)
    for i, (addr, _, op, line) in enumerate(ins):
        m = re.search(r"BRA(?:\.\w+)*\s+0x([0-9a-f]+)", line) if op == "BRA" else None
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in where:
            j = where[int(m.group(1), 16)]
            if i - j > best[1] - best[0]:
                best = (j, i)
    return ins[best[0]:best[1] + 1]


def report(sass, match, ptxas=None):
    funcs = list(functions(sass))
    for name, (mangled, ins) in zip(demangle([f for f, _ in funcs]), funcs):
        if match not in name:
            continue
        loop = main_loop(ins)
        # `@!PT LDS RZ, [RZ]` is a no-op the compiler pads with, not a load
        ops = collections.Counter(op for _, pred, op, line in loop if not (pred and "@!PT" in line))
        regs = (ptxas or {}).get(mangled, "")
        print(f"{name}\n    {regs}{len(ins)} instructions, loop body {len(loop)}: "
              + " ".join(f"{op} {ops[op]}" for op in SHOWN if ops[op]))


def ptxas_usage(log):
    """mangled name -> 'N registers, S bytes spilled, ' from ptxas -v output."""
    usage, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        name = m.group(1) if m else name
        m = re.search(r"(\d+) bytes spill stores", line)
        spill = m.group(1) if m else None
        if spill is not None and name:
            usage[name] = f"{spill} bytes spilled, "
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            usage[name] = f"{m.group(1)} registers, " + usage.get(name, "")
    return usage


def flash(tool, args):
    """The kernels of a library (a library holds thousands: only those whose mangled name matches)."""
    with open(args.flash, "rb") as f:
        names = sorted({m.decode() for m in re.findall(rb"(?<!\w)_ZN\w{10,}", f.read())  # not host stubs (_ZGV...)
                        if args.match.encode() in m})
    for name in names[:args.most]:
        sass = subprocess.run([tool, "-sass", "-arch", f"sm_{args.arch}", "-fun", name, args.flash],
                              capture_output=True, text=True).stdout
        report(sass, "")
    if len(names) > args.most:
        print(f"(+{len(names) - args.most} more kernels match; --most N shows more)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", default=os.path.join(ROOT, "csrc", "cuda", "attention_kernels.cu"))
    p.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    p.add_argument("--match", default="__nv_bfloat16", help="only kernels whose demangled name contains this")
    p.add_argument("--flash", metavar="LIB", help="read this library's kernels instead of minilm's (e.g. the "
                   "CUDA torch's libtorch_cuda.so), those whose mangled name contains --match")
    p.add_argument("--most", type=int, default=8, help="with --flash: at most this many kernels (default 8)")
    args = p.parse_args(argv)
    tool = cuobjdump()
    if args.flash:
        return flash(tool, args)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        arch = f"arch=compute_{args.arch},code=sm_{args.arch}"
        build = subprocess.run(["nvcc", *nvcc_flags(), "-Xptxas=-v", "-gencode", arch, "-cubin", args.file,
                                "-o", cubin], capture_output=True, text=True)
        if build.returncode != 0:
            sys.exit(f"sass_stats: nvcc failed:\n{build.stderr[-3000:]}")
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        report(sass, args.match, ptxas_usage(build.stderr))


if __name__ == "__main__":
    main()
