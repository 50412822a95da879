"""python -m minilm.bench <benchmark> [options]; `python -m minilm.bench <benchmark> --help` lists a benchmark's options."""
import argparse
import importlib
import os
import re
import sys

# name -> (module in minilm.bench that defines add_arguments(parser) and run(args), one-line help)
BENCHMARKS = {
    "attention": ("minilm.bench.attention", "causal attention: minilm vs SDPA vs the naive composite"),
    "charcnn": ("minilm.bench.charcnn", "ELMo's char-CNN: minilm's fused op vs the PyTorch composite"),
    "gpt1": ("minilm.bench.gpt1", "GPT-1 training step: minilm vs nanoGPT-style SDPA vs transformers"),
    "elmo": ("minilm.bench.elmo", "ELMo training step: minilm vs a composite (char-CNN + nn.LSTM)"),
    "lightconv": ("minilm.bench.lightconv", "GPT-1 with LightConv vs with attention: training tokens/s"),
}


class OneLineErrors(argparse.ArgumentParser):
    """argparse's parser, with its errors in one line (without the usage block above them)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineErrors(prog="python -m minilm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    chosen = None
    for name, (modname, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:  # import only the benchmark that runs
            chosen = importlib.import_module(modname)
            p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
            p.add_argument("--json", action="store_true", help="one JSON object per line")
            chosen.add_arguments(p)
    for token in argv:   # argparse takes "-1,12,512,64" for an option, and would say that --shapes got no value
        if re.fullmatch(r"-[0-9]+(,-?[0-9]+)+", token):
            parser.error(f"{token} is negative: sizes and times must be positive")
    args = parser.parse_args(argv)
    import torch
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.exit(2, f"minilm.bench: --device {args.device} was asked for, but torch sees no CUDA device\n")
    from minilm.files import is_out_of_memory, os_error_line
    try:
        chosen.run(args)
    except BrokenPipeError:  # `... | head`: the reader has gone, and so do we, without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:     # a full disk or stdout, a plot path that cannot be written
        print(f"minilm.bench: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        what = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]   # MemoryError() has no message
        print(f"minilm.bench: out of memory ({what}): give smaller sizes",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from minilm.files import printable_output
    printable_output()
    sys.exit(main())
