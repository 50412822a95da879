"""Pre-train GPT-1 on your text (or Shakespeare), on a CPU, a GPU, or several with torchrun.

    python train_gpt1.py                                    # Shakespeare, a model that fits the device
    python train_gpt1.py --data my_text.txt --out_dir out-mine --max_iters 2000
    python train_gpt1.py --resume True --out_dir out-mine   # continue exactly where it stopped
    python train_gpt1.py --overwrite True --out_dir out-mine   # start it over (a fresh run never silently does)
    python train_gpt1.py --sample True --out_dir out-mine --start "To be"
    python train_gpt1.py --arch lightconv --out_dir out-lc  # LightConv (Wu et al. 2019) instead of attention
    torchrun --standalone --nproc_per_node 4 train_gpt1.py  # DDP: the same run, split four ways
    python train_gpt1.py --task classification --init_from out-gpt1   # fine-tune it (minilm/finetune.py)

Options are `--name value` or `--name=value` (booleans True/False); every name in DEFAULTS below is one.
The recipe is the paper's (Radford et al. 2018, §4.1; opt.py): Adam(W) with β = (0.9, 0.999),
decoupled weight decay 0.01 on matrices only, linear warmup then cosine decay to 0, global-norm
gradient clipping, dropout 0.1 (the gpt1 preset; the CPU presets use none). On a GPU the default is
the paper's model (12 × 768, n_ctx 512, 64 sequences per step); the schedule is shortened to suit a
small corpus (the paper warmed up for 2000 of ~100 epochs of BooksCorpus: pass --warmup_iters 2000
--max_iters ... for that).

Reproducibility: the sequences of step `it` are drawn by a generator seeded with (seed, it), and the
evaluation batches are the same fixed set at every evaluation. So a run resumed after a crash, or the
same run on any number of processes, sees exactly the same data. Under DDP every step still consumes
one global batch of `batch_size` sequences: it is cut into equal slices (gradient_accumulation_steps of
them, rounded up to a multiple of the world size) and each rank takes its share.
"""
import gc
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch

from minilm.bpe import BPETokenizer, basic_tokenize
from minilm.data import DataError, data_spec, holds_preparation, load_tokens, prepare_gpt1
from minilm.files import (OPTIMIZER_STATE_UNFIT, beyond_float32, compile_error_line, first_line, is_out_of_memory,
                          lock_out_dir, make_dirs, optimizer_state_fits, os_error_line, out_dir_busy, out_dir_in_use,
                          out_dir_problem, printable_output, releases_out_dir_locks, remove_dirs, save_checkpoint,
                          set_adamw_options, torchrun_launch, truncate_log, unlock_out_dir, write_atomic)
from minilm.finetune import finetune, load_checkpoint, model_from_checkpoint, resolve_device
from minilm.gpt1 import GPT1, GPT1Config, PRESETS, config_from_preset, gpu_peak_flops
from minilm.lightconv import resolve_kernel_sizes

# -----------------------------------------------------------------------------------------------------
# Defaults. "auto" and None mean: chosen below from the device and the preset.
DEFAULTS = dict(
    # data and output
    data="shakespeare",  # "shakespeare", "korean", or a path to a UTF-8 text file / directory
    out_dir="out-gpt1",  # with --task: out-finetune-<task>
    vocab_size=None,  # BPE vocabulary to learn (preset: cpu-tiny 256, cpu-small 2048, gpt1 40478)
    val_fraction=0.1,
    # model: a preset, then any field overridden
    preset="auto",  # "gpt1" on a GPU, "cpu-small" otherwise; see minilm.gpt1.PRESETS
    n_layer=None, n_head=None, n_embd=None, block_size=None,  # block_size is GPT-1's n_ctx
    dropout=None,  # embd_pdrop = attn_pdrop = resid_pdrop (preset: 0.1 for gpt1, 0 for cpu-*)
    arch="attention",  # or "lightconv": lightweight convolutions in place of attention (minilm/lightconv.py)
    kernel_sizes=None,  # lightconv: widths per layer, "3,7,15,31", or one for all (default 3,7,15,31,31,...)
    weight_dropout=None,  # lightconv: DropConnect on the kernels (default: --dropout, else the preset's)
    # optimization (None: from the preset, TRAIN_PRESETS below)
    batch_size=None,  # sequences per optimizer step, over all processes
    gradient_accumulation_steps=None,
    max_iters=None, learning_rate=None, min_lr=0.0, warmup_iters=None, lr_decay_iters=None,
    weight_decay=0.01, beta1=0.9, beta2=0.999, grad_clip=1.0,
    # evaluation, logging, checkpoints
    eval_interval=None, eval_iters=None, log_interval=None,
    # system
    device="auto",  # "cuda", "cuda:1", "cpu", ...
    dtype="auto",  # "bfloat16" (autocast) on a GPU that has it, else "float32"; also "float16"
    compile=False,  # torch.compile the model
    seed=1337,
    resume=False,  # continue from out_dir/ckpt.pt
    overwrite=False,  # a fresh run in an out_dir that holds a checkpoint: delete it and its log first
    # sampling (at the end of training, or alone with --sample True)
    sample=False, start="", num_samples=1, max_new_tokens=200, temperature=0.8, top_k=200,  # top_k 0: no top-k
    # fine-tuning (paper §3.2-3.3): --task switches to minilm.finetune, whose defaults are the paper's
    # (lr 6.25e-5, batch 32, 3 epochs, warmup 0.2%, λ 0.5); see minilm/finetune.py's DEFAULTS
    task=None,  # classification | entailment | similarity | multiple_choice
    task_data="builtin",  # "builtin" (Shakespeare tasks), a JSONL file, or a directory with train/val.jsonl
    init_from=None,  # a pre-training out_dir; without it, the "no pre-training" ablation
    lm_coef=0.5, clf_pdrop=0.1, n_class=None, epochs=None, warmup_fraction=0.002,
)
TYPES = dict(vocab_size=int, n_layer=int, n_head=int, n_embd=int, block_size=int, dropout=float,
             kernel_sizes=str, weight_dropout=float,
             batch_size=int, gradient_accumulation_steps=int, max_iters=int, learning_rate=float,
             warmup_iters=int, lr_decay_iters=int, eval_interval=int, eval_iters=int, log_interval=int,
             task=str, init_from=str, n_class=int, epochs=int)

# Training settings per model preset. gpt1: the paper's batch (64 × 512) and peak lr; cpu-small: tuned to
# learn visibly in ~3 minutes on a 2-core CPU (val loss 7.6 -> 4.5 on Shakespeare); cpu-tiny: seconds, for tests.
TRAIN_PRESETS = {
    "gpt1": dict(vocab_size=40478, batch_size=64, gradient_accumulation_steps=2, max_iters=5000,
                 learning_rate=2.5e-4, warmup_iters=200, eval_interval=250, eval_iters=20, log_interval=10),
    "cpu-small": dict(vocab_size=2048, batch_size=16, gradient_accumulation_steps=1, max_iters=1500,
                      learning_rate=1e-3, warmup_iters=100, eval_interval=250, eval_iters=10, log_interval=20),
    "cpu-tiny": dict(vocab_size=256, batch_size=8, gradient_accumulation_steps=1, max_iters=100,
                     learning_rate=3e-3, warmup_iters=10, eval_interval=20, eval_iters=4, log_interval=10),
}
# What a checkpoint fixes: its model's shape and the data (and so the tokenizer) it was trained on. On
# --resume or --sample these may be given only with the checkpoint's own values.
FIXED_BY_CHECKPOINT = ("data", "vocab_size", "val_fraction", "preset", "arch", "n_layer", "n_head", "n_embd",
                       "block_size", "dropout", "kernel_sizes", "weight_dropout")


# The options only fine-tuning (--task) reads.
FINETUNE_OPTIONS = ("task_data", "init_from", "lm_coef", "clf_pdrop", "n_class", "epochs", "warmup_fraction")


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""


class LaunchError(UserError):
    """A process started wrongly (RANK without torchrun's other variables): every process says it."""


def parse_options(argv):
    """--name value | --name=value, for the names in DEFAULTS; returns {name: value} for the given ones,
    or None for --help (-h)."""
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--help", "-h"):
            return None
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options are --name value or --name=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1][2:].partition("=")[0] in DEFAULTS and argv[i + 1].startswith("--"):
                raise UserError(f"option --{name} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if name not in DEFAULTS:
            raise UserError(f"unknown option --{name}; known: {', '.join('--' + k for k in DEFAULTS)}")
        given[name] = convert(name, value)
    return given


def convert(name, value):
    kind = TYPES.get(name) or type(DEFAULTS[name])
    if kind is bool:
        if value not in ("True", "False"):
            raise UserError(f"--{name} takes True or False, got {value!r}")
        return value == "True"
    if DEFAULTS[name] == "auto" or kind is str:
        return value
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"--{name} takes a{'n integer' if kind is int else ' number'}, got {value!r}") from None


def check_options(cfg):
    """Every value that cannot work, refused in one line before any work is done (cfg: presets filled in)."""
    def number(name):
        v = cfg[name]
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                 "max_iters", "eval_interval", "eval_iters", "log_interval", "num_samples"):
        if cfg[name] is not None and cfg[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {cfg[name]}")
    for name in ("warmup_iters", "lr_decay_iters", "max_new_tokens", "seed", "top_k"):
        if cfg[name] is not None and cfg[name] < 0:
            raise UserError(f"--{name} must be at least 0, got {cfg[name]}")
    if cfg["num_samples"] > 10_000:  # each one is printed
        raise UserError(f"--num_samples must be at most 10,000, got {cfg['num_samples']}")
    if cfg["max_new_tokens"] > 1_000_000:
        raise UserError(f"--max_new_tokens must be at most 1,000,000, got {cfg['max_new_tokens']}")
    if cfg["seed"] >= 2**32:  # it seeds torch and numpy with offsets added: keep it well inside 64 bits
        raise UserError(f"--seed must be below 2**32, got {cfg['seed']}")
    if cfg["vocab_size"] < 2:
        raise UserError(f"--vocab_size must be at least 2, got {cfg['vocab_size']}")
    if not number("learning_rate") or cfg["learning_rate"] <= 0:
        raise UserError(f"--learning_rate must be a finite number > 0, got {cfg['learning_rate']}")
    for name in ("min_lr", "weight_decay", "grad_clip"):  # grad_clip 0 turns clipping off
        if not number(name) or cfg[name] < 0:
            raise UserError(f"--{name} must be a finite number >= 0, got {cfg[name]}")
    for name in ("learning_rate", "weight_decay"):  # (min_lr <= learning_rate is checked below)
        if message := beyond_float32(name, cfg[name]):
            raise UserError(message)
    if cfg["lr_decay_iters"] and cfg["lr_decay_iters"] < (cfg["warmup_iters"] or 0):
        raise UserError(f"--lr_decay_iters {cfg['lr_decay_iters']} ends the decay before the warmup ends "
                        f"(--warmup_iters {cfg['warmup_iters']}): the learning rate would drop to --min_lr at once")
    if cfg["min_lr"] > cfg["learning_rate"]:
        raise UserError(f"--min_lr {cfg['min_lr']} is above --learning_rate {cfg['learning_rate']}: the decay would "
                        "raise the learning rate")
    if not number("temperature") or cfg["temperature"] <= 0:
        raise UserError(f"--temperature must be a finite number > 0, got {cfg['temperature']}")
    for name in ("beta1", "beta2", "dropout", "weight_dropout"):
        if cfg[name] is not None and (not number(name) or not 0 <= cfg[name] < 1):
            raise UserError(f"--{name} must be in [0, 1), got {cfg[name]}")
    for name in ("kernel_sizes", "weight_dropout"):
        if cfg[name] is not None and cfg["arch"] != "lightconv":
            raise UserError(f"--{name} is an option of LightConv: it needs --arch lightconv")
    if not number("val_fraction") or not 0 < cfg["val_fraction"] < 1:
        raise UserError(f"--val_fraction must be in (0, 1), got {cfg['val_fraction']}")
    if cfg["start"] and not basic_tokenize(cfg["start"]):  # every word gives at least one token (maybe <unk>)
        raise UserError(f"--start {cfg['start']!r} encodes to no tokens: give some text to continue, or leave it out")


def fresh_model_config(cfg, preset):
    """The GPT1Config of a fresh run: the preset, then the options that override it."""
    overrides = {"vocab_size": cfg["vocab_size"], "arch": cfg["arch"]}  # vocab_size: the tokenizer's, once it exists
    for opt, field in (("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd"), ("block_size", "n_ctx")):
        if cfg[opt] is not None:
            overrides[field] = cfg[opt]
    if cfg["dropout"] is not None:
        overrides.update(embd_pdrop=cfg["dropout"], attn_pdrop=cfg["dropout"], resid_pdrop=cfg["dropout"],
                         weight_dropout=cfg["dropout"])
    if cfg["weight_dropout"] is not None:
        overrides["weight_dropout"] = cfg["weight_dropout"]
    if cfg["kernel_sizes"] is not None:
        overrides["kernel_sizes"] = parse_kernel_sizes(cfg["kernel_sizes"])
    return config_from_preset(preset, **overrides)


def parse_kernel_sizes(text):
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise UserError(f"--kernel_sizes takes integers separated by commas, got {text!r}") from None


def check_fixed_options(given, ckpt, what):
    """--resume / --sample: an option in FIXED_BY_CHECKPOINT may only repeat the checkpoint's value."""
    try:
        mc, dm = ckpt["model_config"], ckpt["data_meta"]
        kernels = resolve_kernel_sizes(mc.get("kernel_sizes"), mc["n_layer"]) if mc.get("arch") == "lightconv" else None
        trained_with = {
            "data": dm["data"], "vocab_size": dm["vocab_size_requested"], "val_fraction": dm["val_fraction"],
            "preset": ckpt["options"]["preset"], "arch": mc.get("arch", "attention"), "n_layer": mc["n_layer"],
            "n_head": mc["n_head"], "n_embd": mc["n_embd"], "block_size": mc["n_ctx"],
            "dropout": mc["resid_pdrop"], "kernel_sizes": kernels, "weight_dropout": mc.get("weight_dropout"),
        }
    except (KeyError, TypeError, ValueError) as e:  # a damaged or hand-edited checkpoint
        raise UserError(f"{what}: the checkpoint's model_config or data_meta is damaged ({type(e).__name__}: {e})") from None
    for name in FIXED_BY_CHECKPOINT:
        if name not in given or (name == "preset" and given[name] == "auto"):
            continue
        value = given[name]
        if name == "data":
            value = data_spec(value)
        elif name == "kernel_sizes" and kernels:
            try:
                value = resolve_kernel_sizes(parse_kernel_sizes(value), mc["n_layer"])
            except ValueError as e:
                raise UserError(f"{what}: {e}") from None
        elif name == "dropout":  # one option for the three dropouts
            value = value if value == mc["embd_pdrop"] == mc["attn_pdrop"] else None
        if value != trained_with[name]:
            raise UserError(f"{what}: --{name} {given[name]} differs from the checkpoint's ({trained_with[name]}): its "
                            "model and data are fixed; start a new run (another --out_dir, or --overwrite True) to change them")


# -----------------------------------------------------------------------------------------------------
# The data and the schedule of one step, as functions of their arguments (main() below calls them).

def get_batch(data, rng, n, T):
    """n sequences of T tokens from the token stream `data`, at starts drawn by the numpy Generator rng:
    (x, y) int64 tensors (n, T), y the next token of each x (y[:, t] = data[s + t + 1]). Every start that
    leaves room for the T targets can be drawn, 0 ... len(data) - T - 1."""
    starts = rng.integers(0, len(data) - T, size=n)
    x = torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + T] for s in starts]).astype(np.int64))
    return x, y


def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (paper §4.1)."""
    lr, warmup = cfg["learning_rate"], cfg["warmup_iters"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - cfg["min_lr"])


def usage():
    """--help: this file's docstring, then DEFAULTS as written above (each option with its comment)."""
    with open(__file__, encoding="utf-8") as f:
        src = f.read()
    start = src.index("DEFAULTS = dict(")
    options = src[start:src.index("\n)\n", start) + 2]
    return f"{__doc__.strip()}\n\nOptions (--name value), with their defaults:\n\n{options}"


@releases_out_dir_locks
def main(argv):
    given = parse_options(argv)
    if given is None:  # --help
        print(usage())
        return
    cfg = {**DEFAULTS, **given}
    for name in ("out_dir", "task", "init_from"):  # e.g. an unset shell variable: not the same as leaving it out
        if given.get(name) == "":
            raise UserError(f"--{name} is empty: give a value, or leave the option out")
    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if cfg["resume"] and cfg["overwrite"]:
        raise UserError("--resume True continues the checkpoint and --overwrite True deletes it: pass one of them")
    if cfg["sample"] and cfg["overwrite"]:
        raise UserError("--sample True reads the checkpoint and --overwrite True deletes it: pass one of them")
    if cfg["sample"] and cfg["resume"]:
        raise UserError("--sample True samples from the checkpoint and --resume True trains it on: pass one of them")

    # --- the checkpoint to continue or to sample from --------------------------------------------------
    if not cfg["task"] and (problem := out_dir_problem(out_dir)):   # fine-tuning checks its own out_dir
        raise UserError(problem)
    ckpt = None
    if (cfg["resume"] or cfg["sample"]) and not cfg["task"]:
        what = "--sample True" if cfg["sample"] else "--resume True"
        ckpt = load_checkpoint(ckpt_path, what)
        if "task_config" in ckpt and cfg["sample"]:
            raise UserError(f"--sample True: {ckpt_path} is a fine-tuning checkpoint; sample from a pre-training run")
    if cfg["task"] or (ckpt and "task_config" in ckpt):
        from functools import partial

        if os.environ.get("WORLD_SIZE", "1").strip() != "1":
            raise UserError("fine-tuning runs in one process: start it without torchrun")
        # given only (the rest are fine-tuning's defaults), and the out_dir whose checkpoint was read above
        finetune({**given, "out_dir": out_dir} if ckpt else given, print_fn=partial(print, flush=True), ckpt=ckpt)
        return
    for name in FINETUNE_OPTIONS:
        if name in given:
            raise UserError(f"--{name} is a fine-tuning option: it needs --task")
    if ckpt:  # its model and data, then whatever else this command line says
        check_fixed_options(given, ckpt, what)
        if not cfg["sample"]:
            cfg = {**DEFAULTS, **ckpt["options"], **given, "resume": True, "overwrite": False,
                   "device": cfg["device"], "data": ckpt["data_meta"]["data"]}
    elif os.path.exists(ckpt_path) and not cfg["overwrite"]:
        if out_dir_in_use(out_dir):   # a run still going: --resume or --overwrite would not help
            raise UserError(out_dir_busy(out_dir))
        raise UserError(f"{out_dir} already holds a checkpoint: pass --resume True to continue it, choose another "
                        "--out_dir, or pass --overwrite True to start over")

    device = resolve_device(cfg["device"])
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    preset = cfg["preset"] if cfg["preset"] != "auto" else ("gpt1" if device_type == "cuda" else "cpu-small")
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    for key, value in TRAIN_PRESETS[preset].items():
        if cfg[key] is None:
            cfg[key] = value
    cfg["preset"] = preset
    check_options(cfg)
    # The model's config, checked by building the model on the meta device (no memory): a bad shape is
    # reported now, not after the data is prepared. vocab_size becomes the tokenizer's once it exists.
    try:
        gconf = GPT1Config(**ckpt["model_config"]) if ckpt else fresh_model_config(cfg, preset)
        size = gconf.n_layer * 12 * gconf.n_embd ** 2 + (gconf.vocab_size + gconf.n_ctx) * gconf.n_embd
        if gconf.n_layer > 10_000:  # building even the meta model would take hours
            raise ValueError(f"--n_layer {gconf.n_layer}: more layers than any machine trains (at most 10,000)")
        if size > 10**11:
            raise ValueError(f"a model of {gconf.n_layer} layers × {gconf.n_embd} would have about {size:.2g} "
                             "parameters: more than any machine trains (at most 1e11)")
        if cfg["batch_size"] * gconf.n_ctx > 2**31:
            raise ValueError(f"--batch_size {cfg['batch_size']} × block_size {gconf.n_ctx} tokens is more than any "
                             "machine holds in one batch (at most 2**31)")
        with torch.device("meta"):
            GPT1(gconf)
    except (TypeError, ValueError) as e:  # TypeError: a checkpoint's model_config with unknown or missing fields
        raise UserError(f"{what}: the checkpoint's model_config does not make a GPT-1 ({e})" if ckpt else str(e)) from None
    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype}: choose float32, bfloat16 or float16")

    # --- setup: processes, precision ----------------------------------------------------------------------
    ddp = os.environ.get("RANK", "-1").strip() != "-1"  # started by torchrun?
    rank, local_rank, world = 0, 0, 1
    if ddp:
        try:
            rank, local_rank, world = torchrun_launch()
        except ValueError as e:
            raise LaunchError(str(e)) from None
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0

    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    if cfg["sample"]:
        if master:
            sample_from_checkpoint(cfg, ckpt, ckpt_path, device, autocast)
        return

    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Cut each global batch into equal slices, a whole number per rank.
    B = cfg["batch_size"]
    local_steps = math.ceil(max(1, cfg["gradient_accumulation_steps"]) / world)
    n_slices = local_steps * world
    if B % n_slices:
        raise UserError(f"--batch_size {B} must split into {n_slices} equal micro-batches "
                        f"({local_steps} accumulation steps × {world} processes)")
    micro = B // n_slices

    # --- data: tokenized once into out_dir/data, reused after -----------------------------------------
    # A resumed run must see the very data (and tokenizer) its checkpoint was trained on: prepare_gpt1
    # checks the corpus, vocab_size and val_fraction against the checkpoint's data_meta and refuses, with
    # out_dir/data left as it is, when they differ (an edited corpus, say).
    data_dir = os.path.join(out_dir, "data")
    expect = ckpt["data_meta"] if ckpt else None
    error = None
    if master:
        made = []
        try:
            made = make_dirs(out_dir)
            if not lock_out_dir(out_dir):   # held for the run: no second run writes here meanwhile
                made = []
                raise OSError(out_dir_busy(out_dir))
            meta = prepare_gpt1(cfg["data"], data_dir, cfg["vocab_size"], val_fraction=cfg["val_fraction"], expect=expect,
                                min_tokens=gconf.n_ctx + 1)  # too little text: refused before anything is written
        except (DataError, OSError) as e:
            error = ("--resume True: " if ckpt else "") + str(e)
            if made:  # out_dir is this run's: leave nothing of it (data_dir inside it, then out_dir), if empty
                unlock_out_dir(out_dir)
                remove_dirs([data_dir, *made])
    if ddp:  # rank 0 wrote the files (or failed): tell the others, rather than leave them waiting
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    if not master:
        meta = prepare_gpt1(cfg["data"], data_dir, cfg["vocab_size"], val_fraction=cfg["val_fraction"], expect=expect,
                            min_tokens=gconf.n_ctx + 1)
    meta = {k: v for k, v in meta.items() if k != "reused"}
    train_data, val_data = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")

    # --- model ---------------------------------------------------------------------------------------
    if ckpt and meta["vocab_size"] != gconf.vocab_size:
        raise UserError(f"--resume True: {data_dir} holds a tokenizer of {meta['vocab_size']} tokens, the checkpoint's "
                        f"model has {gconf.vocab_size}")
    gconf = replace(gconf, vocab_size=meta["vocab_size"])  # may be below --vocab_size: the text ran out of pairs
    T = gconf.n_ctx  # prepare_gpt1 made sure that each split holds T + 1 tokens or more
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = model_from_checkpoint(ckpt, ckpt_path, "--resume True") if ckpt else GPT1(gconf)
    model.to(device)

    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings ("rank > 1", opt.py)
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8,
                                  fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    iter_num = 0
    torch.manual_seed(cfg["seed"] + rank)  # dropout masks differ between ranks
    if ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            set_adamw_options(optimizer, cfg)   # the moments are the checkpoint's, the options this run's
            if ckpt.get("scaler") and scaler.is_enabled():  # --dtype may change on resume: fp16's loss scale only
                scaler.load_state_dict(ckpt["scaler"])
            for state in ckpt["rng"]:  # every rank's, on every rank: a damaged one stops them all alike
                set_rng_state(state)
            set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
            if not optimizer_state_fits(optimizer):
                raise ValueError(OPTIMIZER_STATE_UNFIT)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"--resume True: {ckpt_path} is damaged ({first_line(e)})") from None
        iter_num = ckpt["iter_num"]
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # --- batches: a pure function of (seed, purpose, index), so resume and DDP see the same data --------
    def sequences(data, rng, n):
        x, y = get_batch(data, rng, n, T)
        if device_type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    def train_slices(it):
        """This rank's micro-batches of global step `it`: slices rank·local_steps ... of the global batch."""
        x, y = sequences(train_data, np.random.default_rng([cfg["seed"], 0, it]), B)
        first = rank * local_steps
        return [(x[(first + j) * micro:(first + j + 1) * micro], y[(first + j) * micro:(first + j + 1) * micro])
                for j in range(local_steps)]

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches per split; ranks share the batches, then add up."""
        model.eval()
        out = {}
        for split_id, (name, data) in enumerate((("train", train_data), ("val", val_data))):
            total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
            for k in range(rank, cfg["eval_iters"], world):
                x, y = sequences(data, np.random.default_rng([cfg["seed"], 1 + split_id, k]), B)
                for i in range(0, B, micro):
                    with autocast:
                        _, loss = raw_model(x[i:i + micro], y[i:i + micro])
                    total[0] += loss.double() * y[i:i + micro].numel()
                    total[1] += y[i:i + micro].numel()
            if ddp:
                torch.distributed.all_reduce(total)
            out[name] = (total[0] / total[1]).item()
        model.train()
        return out

    # Model FLOPs per token: 6N for the matmuls forward and backward, 12·L·H·Q·T for attention (PaLM, App. B);
    # LightConv instead: 2·K·d forward per layer for the convolution, times 3 with the backward.
    flops_per_token = 6 * raw_model.num_params() + 12 * gconf.n_layer * gconf.n_head * (gconf.n_embd // gconf.n_head) * T
    if gconf.arch == "lightconv":
        flops_per_token = 6 * raw_model.num_params() + 6 * gconf.n_embd * sum(b.lightconv.conv.kernel_size for b in raw_model.h)
    # MFU is printed on a GPU whose peak minilm.gpt1.GPU_PEAK_TFLOPS knows.
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None

    log_path = os.path.join(out_dir, "log.jsonl")
    if master:
        if ckpt:  # forget what the interrupted run logged after its last checkpoint
            try:
                truncate_log(log_path, iter_num)
            except ValueError as e:
                raise UserError(str(e)) from None
        else:  # a fresh run; with --overwrite True the old run's checkpoint and log go together, now
            for path in (ckpt_path, log_path):
                if os.path.exists(path):
                    os.remove(path)
        print(f"GPT-1 preset {preset}{' (lightconv)' if gconf.arch == 'lightconv' else ''}: {raw_model.num_params():,} parameters, {gconf.n_layer} layers × {gconf.n_embd}, "
              f"n_ctx {T}, vocab {gconf.vocab_size}; {len(train_data):,} train / {len(val_data):,} val tokens; "
              f"{device}, {dtype}, {world} process(es), batch {B} = {n_slices} × {micro}"
              + (f"; resuming at iter {iter_num}" if ckpt else ""), flush=True)
        if cfg["warmup_iters"] > cfg["max_iters"]:  # after every check that could still refuse the run
            print(f"train_gpt1.py: warning: --warmup_iters {cfg['warmup_iters']} is longer than --max_iters "
                  f"{cfg['max_iters']}: the learning rate never reaches --learning_rate {cfg['learning_rate']}",
                  file=sys.stderr, flush=True)

    # --- the loop -------------------------------------------------------------------------------------
    if master and ckpt and iter_num >= cfg["max_iters"]:
        print(f"{ckpt_path} is at iteration {iter_num} and --max_iters is {cfg['max_iters']}: nothing to train "
              "(pass a larger --max_iters to go on)", flush=True)
    tokens_interval, train_time = 0, 0.0
    first_iter = iter_num
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if (iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]) and not (ckpt and iter_num == first_iter):
            losses = estimate_loss()  # the same on every rank
            if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
                raise UserError(f"iter {iter_num}: the loss is {losses['train']} (train), {losses['val']} (val): "
                                f"training diverged; nothing is saved ({ckpt_path} keeps the last good iteration, if "
                                "any): lower --learning_rate")
            if master:
                tps = tokens_interval / train_time if train_time > 0 else None
                record = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                          "tokens_per_s": tps}
                if peak_flops:  # per GPU
                    record["mfu"] = flops_per_token * tps / (peak_flops * world) if tps else None
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            tokens_interval, train_time = 0, 0.0
            rng_states = gather_rng_states(ddp, world)
            if master and iter_num > first_iter:
                save_checkpoint(ckpt_path, {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "iter_num": iter_num, "rng": rng_states, "model_config": asdict(gconf),
                    "options": {k: cfg[k] for k in DEFAULTS}, "data_meta": meta, "data_dir": "data",
                })
        if iter_num >= cfg["max_iters"]:
            break

        t0 = time.time()
        step_loss = 0.0
        slices = train_slices(iter_num)
        for j, (x, y) in enumerate(slices):
            if ddp:  # all-reduce the gradients once, after the last micro-batch
                model.require_backward_grad_sync = j == len(slices) - 1
            with autocast:
                _, loss = model(x, y)
                loss = loss / local_steps
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        train_time += dt
        tokens_interval += B * T
        iter_num += 1
        if iter_num % cfg["log_interval"] == 0:
            if ddp:  # each rank holds the mean over its own slices: the step's loss is their mean (equal slices)
                step_loss = torch.as_tensor(step_loss, dtype=torch.float32, device=device)
                torch.distributed.all_reduce(step_loss)
                step_loss = step_loss / world
            tps = B * T / dt
            line = f"iter {iter_num}: loss {float(step_loss):.4f}, lr {lr:.2e}, {dt * 1e3:.0f} ms, {tps:,.0f} tok/s"
            if peak_flops:
                line += f", mfu {100 * flops_per_token * tps / (peak_flops * world):.1f}%"
            if master:
                print(line, flush=True)

    if ddp:
        torch.distributed.barrier()  # every rank done before teardown: gloo aborts a rank that leaves early
        # DDP's reducer goes first: if the process group's last reference died with it, gloo's destructor
        # would wait for its worker threads while holding the GIL that they may need (a rare hang at exit).
        del model
        gc.collect()
        torch.distributed.destroy_process_group()
    if master:
        plot_losses(log_path, os.path.join(out_dir, "loss.png"))
        if cfg["max_new_tokens"] > 0:
            sample(cfg, raw_model, data_dir, device, autocast)


# -----------------------------------------------------------------------------------------------------
# Checkpoints hold plain types only (tensors, numbers, strings, lists, dicts): torch.load(weights_only=True).
# They are read by load_checkpoint (minilm/finetune.py, shared with fine-tuning) and written by
# minilm.files.save_checkpoint.

def get_rng_state():
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states(ddp, world):
    """Every rank's RNG state, in rank order (each rank drew its own dropout masks)."""
    mine = get_rng_state()
    if not ddp:
        return [mine]
    states = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def plot_losses(log_path, png_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot is optional
    rows = []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError):
                pass
    # the evaluations (a record edited by hand into something else is left out of the plot, not an error)
    rows = [r for r in rows if isinstance(r, dict) and all(type(r.get(k)) in (int, float) for k in
                                                           ("iter", "train_loss", "val_loss"))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train")
    ax.plot([r["iter"] for r in rows], [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    write_atomic(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    print(f"loss curve: {png_path}", flush=True)


def sample_from_checkpoint(cfg, ckpt, ckpt_path, device, autocast):
    """--sample True: the checkpoint's model and the tokenizer it was trained with (out_dir/data)."""
    data_dir = os.path.join(os.path.dirname(ckpt_path), ckpt.get("data_dir", "data"))
    if not holds_preparation(data_dir, ckpt["data_meta"]):
        raise UserError(f"--sample True: {data_dir} does not hold the data and tokenizer {ckpt_path} was trained with "
                        "(moved, deleted or damaged): --resume True prepares them again once what is left of them is "
                        "deleted (and trains on, if the run has iterations left)")
    model = model_from_checkpoint(ckpt, ckpt_path, "--sample True").to(device)
    sample(cfg, model, data_dir, device, autocast)


def sample(cfg, model, data_dir, device, autocast):
    """Print num_samples continuations of --start (or of the first tokens of the validation text), the model
    run in --dtype's precision (autocast) as in training; eager, whatever --compile says (each new length
    would be a new graph)."""
    tokenizer = BPETokenizer.load(data_dir)
    if cfg["start"]:
        prompt = tokenizer.encode(cfg["start"])  # not empty: check_options made sure
    else:  # no prompt given: condition on the first few tokens of the validation text
        prompt = [int(t) for t in load_tokens(data_dir, "val")[:8]]
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    model.eval()
    x = torch.tensor([prompt] * cfg["num_samples"], dtype=torch.long, device=device)
    top_k = cfg["top_k"] or None  # 0: no top-k
    with autocast:
        y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=top_k, generator=g)
    for row in y.tolist():
        print("-" * 60)
        print(tokenizer.decode(row))
    print("-" * 60, flush=True)


def one_line(e):
    """The message of an error that ends a run: the user's to fix (bad input, a full disk, too little memory).
    None for anything else, which is a bug and keeps its traceback."""
    if isinstance(e, (UserError, DataError)):  # DataError: a bad path, non-UTF-8 or empty text, ...
        return str(e)
    if isinstance(e, OSError):  # a full disk, a read-only out_dir, ...
        return os_error_line(e)
    if is_out_of_memory(e):
        return "out of memory: give a smaller --batch_size (or --block_size, or a smaller model)"
    return compile_error_line(e)


if __name__ == "__main__":
    printable_output()
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print("train_gpt1.py: interrupted (a run that wrote a checkpoint goes on from it with --resume True)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        message = one_line(e)
        if message is None:
            raise
        # Under torchrun a user error is every rank's: rank 0 says it. A full disk or too little memory may be
        # one rank's alone: that rank says it. LaunchError: no rank is sure to be rank 0.
        rank = os.environ.get("RANK", "0").strip()
        if isinstance(e, LaunchError) or rank in ("0", "-1"):   # RANK -1: no torchrun, one process
            print(f"train_gpt1.py: error: {message}", file=sys.stderr)
        elif not isinstance(e, (UserError, DataError)):
            print(f"train_gpt1.py: error (rank {rank}): {message}", file=sys.stderr)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # leaving with the group up can abort the ranks
        sys.exit(1)
