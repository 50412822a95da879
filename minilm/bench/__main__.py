"""python -m minilm.bench <benchmark> [options] — see `python -m minilm.bench --help`."""
import argparse
import importlib
import sys

# name -> module in minilm.bench that defines add_arguments(parser) and run(args)
BENCHMARKS = {
    "attention": "minilm.bench.attention",
    "charcnn": "minilm.bench.charcnn",
    "gpt1": "minilm.bench.gpt1",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minilm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    modules = {}
    for name, modname in BENCHMARKS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            parser.exit(2, "minilm.bench: --device cuda was asked for, but torch sees no CUDA device\n")
    modules[args.benchmark].run(args)


if __name__ == "__main__":
    sys.exit(main())
