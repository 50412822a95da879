"""Pre-train GPT-1 on your text (or Shakespeare), on a CPU, a GPU, or several with torchrun.

    python train_gpt1.py                                    # Shakespeare, a model that fits the device
    python train_gpt1.py --data my_text.txt --out_dir out-mine --max_iters 2000
    python train_gpt1.py --resume True --out_dir out-mine   # continue exactly where it stopped
    python train_gpt1.py --sample True --out_dir out-mine --start "To be"
    python train_gpt1.py --arch lightconv --out_dir out-lc  # LightConv (Wu et al. 2019) instead of attention
    torchrun --standalone --nproc_per_node 4 train_gpt1.py  # DDP: the same run, split four ways
    python train_gpt1.py --task classification --init_from out-gpt1   # fine-tune it (minilm/finetune.py)

Options are `--name value` or `--name=value` (booleans True/False); every name in DEFAULTS below is one.
The recipe is the paper's (Radford et al. 2018, §4.1; opt.py): Adam(W) with β = (0.9, 0.999),
decoupled weight decay 0.01 on matrices only, linear warmup then cosine decay to 0, global-norm
gradient clipping, dropout 0.1. On a GPU the default is the paper's model (12 × 768, n_ctx 512, 64
sequences per step); the schedule is shortened to suit a small corpus (the paper warmed up for 2000 of
~100 epochs of BooksCorpus: pass --warmup_iters 2000 --max_iters ... for that).

Reproducibility: the sequences of step `it` are drawn by a generator seeded with (seed, it), and the
evaluation batches are the same fixed set at every evaluation. So a run resumed after a crash, or the
same run on any number of processes, sees exactly the same data. Under DDP every step still consumes
one global batch of `batch_size` sequences: it is cut into equal slices (gradient_accumulation_steps of
them, rounded up to a multiple of the world size) and each rank takes its share.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

from minilm.bpe import BPETokenizer
from minilm.data import DataError, load_tokens, prepare_gpt1
from minilm.gpt1 import GPT1, GPT1Config, PRESETS, config_from_preset

# -----------------------------------------------------------------------------------------------------
# Defaults. "auto" and None mean: chosen below from the device and the preset.
DEFAULTS = dict(
    # data and output
    data="shakespeare",  # "shakespeare", "korean", or a path to a UTF-8 text file / directory
    out_dir="out-gpt1",
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
    # sampling (at the end of training, or alone with --sample True)
    sample=False, start="", num_samples=1, max_new_tokens=200, temperature=0.8, top_k=200,
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
MODEL_OPTIONS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""


def parse_options(argv):
    """--name value | --name=value, for the names in DEFAULTS; returns {name: value} for the given ones."""
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options are --name value or --name=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
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


def main(argv):
    given = parse_options(argv)
    cfg = {**DEFAULTS, **given}
    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    if cfg["task"] or (cfg["resume"] and is_finetune_checkpoint(ckpt_path)):
        from functools import partial
        from minilm.finetune import finetune

        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UserError("fine-tuning runs in one process: start it without torchrun")
        finetune(given, print_fn=partial(print, flush=True))  # given only: the rest are fine-tuning's defaults
        return

    # --- setup: device, processes, precision ------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun?
    rank, local_rank, world = 0, 0, 1
    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA device")
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    if cfg["sample"]:
        if master:
            sample_from_checkpoint(cfg, ckpt_path, device)
        return

    # --- resume: the checkpoint's options, then whatever this command line says ------------------------
    ckpt = None
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise UserError(f"--resume True: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        cfg = {**ckpt["options"], **given, "resume": True, "device": cfg["device"]}

    preset = cfg["preset"] if cfg["preset"] != "auto" else ("gpt1" if device_type == "cuda" else "cpu-small")
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    for key, value in TRAIN_PRESETS[preset].items():
        if cfg[key] is None:
            cfg[key] = value
    cfg["preset"] = preset

    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
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
    data_dir = os.path.join(out_dir, "data")
    error = None
    if master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            meta = prepare_gpt1(cfg["data"], data_dir, cfg["vocab_size"], val_fraction=cfg["val_fraction"])
        except (DataError, OSError) as e:
            error = str(e)
    if ddp:  # rank 0 wrote the files (or failed): tell the others, rather than leave them waiting
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    if not master:
        meta = prepare_gpt1(cfg["data"], data_dir, cfg["vocab_size"], val_fraction=cfg["val_fraction"])
    meta = {k: v for k, v in meta.items() if k != "reused"}
    train_data, val_data = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")

    # --- model ---------------------------------------------------------------------------------------
    overrides = {"vocab_size": meta["vocab_size"]}
    for opt, field in (("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd"), ("block_size", "n_ctx")):
        if cfg[opt] is not None:
            overrides[field] = cfg[opt]
    if cfg["dropout"] is not None:
        overrides.update(embd_pdrop=cfg["dropout"], attn_pdrop=cfg["dropout"], resid_pdrop=cfg["dropout"],
                         weight_dropout=cfg["dropout"])
    overrides["arch"] = cfg["arch"]
    if cfg["weight_dropout"] is not None:
        overrides["weight_dropout"] = cfg["weight_dropout"]
    if cfg["kernel_sizes"] is not None:
        try:
            overrides["kernel_sizes"] = tuple(int(k) for k in cfg["kernel_sizes"].split(","))
        except ValueError:
            raise UserError(f"--kernel_sizes takes integers separated by commas, got {cfg['kernel_sizes']!r}") from None
    try:
        gconf = GPT1Config(**ckpt["model_config"]) if ckpt else config_from_preset(preset, **overrides)
        torch.manual_seed(cfg["seed"])  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = GPT1(gconf)
    except ValueError as e:
        raise UserError(str(e)) from None
    T = gconf.n_ctx
    for name, split in (("train", train_data), ("val", val_data)):
        if len(split) < T + 1:
            raise UserError(f"the {name} split has {len(split)} tokens, fewer than block_size + 1 = {T + 1}: "
                            "use more text or a smaller --block_size")
    model.to(device)

    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings ("rank > 1", opt.py)
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8,
                                  fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    iter_num = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        iter_num = ckpt["iter_num"]
    torch.manual_seed(cfg["seed"] + rank)  # dropout masks differ between ranks
    if ckpt:
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # --- batches: a pure function of (seed, purpose, index), so resume and DDP see the same data --------
    def sequences(data, rng, n):
        starts = rng.integers(0, len(data) - T - 1, size=n)
        x = torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[s + 1:s + 1 + T] for s in starts]).astype(np.int64))
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

    def get_lr(it):
        """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (paper §4.1)."""
        lr, warmup = cfg["learning_rate"], cfg["warmup_iters"]
        decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it >= decay_iters:
            return cfg["min_lr"]
        ratio = (it - warmup) / max(1, decay_iters - warmup)
        return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - cfg["min_lr"])

    # Model FLOPs per token: 6N for the matmuls forward and backward, 12·L·H·Q·T for attention (PaLM, App. B);
    # LightConv instead: 2·K·d forward per layer for the convolution, times 3 with the backward.
    flops_per_token = 6 * raw_model.num_params() + 12 * gconf.n_layer * gconf.n_head * (gconf.n_embd // gconf.n_head) * T
    if gconf.arch == "lightconv":
        flops_per_token = 6 * raw_model.num_params() + 6 * gconf.n_embd * sum(b.lightconv.conv.kernel_size for b in raw_model.h)
    peak_flops = 989e12  # H100/H200 dense bf16; MFU is only printed on a GPU

    log_path = os.path.join(out_dir, "log.jsonl")
    if master:
        if ckpt:  # forget what the interrupted run logged after its last checkpoint
            keep = []
            if os.path.exists(log_path):
                with open(log_path, encoding="utf-8") as f:
                    keep = [line for line in f if line.strip() and json.loads(line)["iter"] <= iter_num]
            write_atomic(log_path, "".join(keep).encode("utf-8"))
        elif os.path.exists(log_path):
            os.remove(log_path)
        print(f"GPT-1 preset {preset}{' (lightconv)' if gconf.arch == 'lightconv' else ''}: {raw_model.num_params():,} parameters, {gconf.n_layer} layers × {gconf.n_embd}, "
              f"n_ctx {T}, vocab {gconf.vocab_size}; {len(train_data):,} train / {len(val_data):,} val tokens; "
              f"{device}, {dtype}, {world} process(es), batch {B} = {n_slices} × {micro}"
              + (f"; resuming at iter {iter_num}" if ckpt else ""), flush=True)

    # --- the loop -------------------------------------------------------------------------------------
    t_interval, tokens_interval, train_time = time.time(), 0, 0.0
    first_iter = iter_num
    while True:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if (iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]) and not (ckpt and iter_num == first_iter):
            losses = estimate_loss()
            if master:
                tps = tokens_interval / train_time if train_time > 0 else None
                record = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                          "tokens_per_s": tps}
                if device_type == "cuda":  # per GPU
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
        if master and iter_num % cfg["log_interval"] == 0:
            tps = B * T / dt
            line = f"iter {iter_num}: loss {float(step_loss):.4f}, lr {lr:.2e}, {dt * 1e3:.0f} ms, {tps:,.0f} tok/s"
            if device_type == "cuda":
                line += f", mfu {100 * flops_per_token * tps / (peak_flops * world):.1f}%"
            print(line, flush=True)

    if ddp:
        torch.distributed.barrier()  # every rank done before teardown: gloo aborts a rank that leaves early
        torch.distributed.destroy_process_group()
    if master:
        plot_losses(log_path, os.path.join(out_dir, "loss.png"))
        if cfg["max_new_tokens"] > 0:
            sample_from_checkpoint(cfg, ckpt_path, device, model=raw_model, data_dir=data_dir)


# -----------------------------------------------------------------------------------------------------
# Checkpoints hold plain types only (tensors, numbers, strings, lists, dicts): torch.load(weights_only=True).

def write_atomic(path, payload):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one


def is_finetune_checkpoint(path):
    if not os.path.isfile(path):
        return False
    try:
        return "task_config" in torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False  # unreadable: the pre-training path reports it


def save_checkpoint(path, state):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    with open(log_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train")
    ax.plot([r["iter"] for r in rows], [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    print(f"loss curve: {png_path}", flush=True)


def sample_from_checkpoint(cfg, ckpt_path, device, model=None, data_dir=None):
    if model is None:
        if not os.path.exists(ckpt_path):
            raise UserError(f"--sample True: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model = GPT1(GPT1Config(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.to(device)
        data_dir = os.path.join(os.path.dirname(ckpt_path), ckpt["data_dir"])
    if cfg["max_new_tokens"] < 0 or cfg["num_samples"] < 1:
        raise UserError("--max_new_tokens must be >= 0 and --num_samples >= 1")
    if cfg["temperature"] <= 0:
        raise UserError(f"--temperature must be > 0, got {cfg['temperature']}")
    tokenizer = BPETokenizer.load(data_dir)
    if cfg["start"]:
        prompt = tokenizer.encode(cfg["start"])
        if not prompt:
            raise UserError(f"--start {cfg['start']!r} encodes to no tokens")
    else:  # no prompt given: condition on the first few tokens of the validation text
        prompt = [int(t) for t in load_tokens(data_dir, "val")[:8]]
    prompt = prompt[-model.config.n_ctx:]
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    model.eval()
    x = torch.tensor([prompt] * cfg["num_samples"], dtype=torch.long, device=device)
    top_k = cfg["top_k"] if cfg["top_k"] and cfg["top_k"] > 0 else None
    y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=top_k, generator=g)
    for row in y.tolist():
        print("-" * 60)
        print(tokenizer.decode(row))
    print("-" * 60, flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UserError, DataError) as e:  # DataError: a bad path, non-UTF-8 or empty text, ...
        if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
            print(f"train_gpt1.py: error: {e}", file=sys.stderr)
        sys.exit(1)
