"""Train an ELMo biLM from scratch (Peters et al. 2018; allenai/bilm-tf's bin/train_elmo.py), or embed text with one.

    python train_elmo.py                                        # Shakespeare, tiny model: under a minute on 2 CPU cores
    python train_elmo.py --data my_corpus.txt --preset small --device cuda
    torchrun --nproc_per_node 2 train_elmo.py --batch_size 64   # DDP: the same global batch at any world size
    python train_elmo.py --out_dir out-elmo --embed sentences.txt   # ELMo features of a trained run (.npz)
    python train_elmo.py --out_dir out-elmo --test val              # its perplexity on all of its validation split
    python train_elmo.py --resume True          # continue the run in out_dir, with its own options
    python train_elmo.py --overwrite True       # start over in an out_dir that holds a run

Options are the names below, given as `--name value` or `--name=value` (booleans: True/False).

The corpus is read one sentence per line, split into words (`token_regex`: case kept, punctuation
split off), and every line becomes a sentence `<S> words... </S>`. Batches are made as bilm-tf's
LMDataset makes them (SentenceStream): each of the `batch_size` rows reads sentences one after another,
`unroll_steps` tokens per batch, and the LSTM state it ends a batch with is the state it starts the next
one with (not backpropagated through). The forward LM reads `<S> w_1 … w_n` and predicts `w_1 … w_n
</S>`; the backward LM reads its own stream of reversed sentences, `</S> w_n … w_1`, predicting `w_n …
w_1 <S>`, in another random order (bilm-tf's two datasets shuffle independently), so the char-CNN
encodes both streams (each distinct word of a batch once). Inputs are characters, so any word has a representation; only the softmax has a
word vocabulary (`<S>`, `</S>`, `<UNK>`, then the training split's words by frequency — the order the
log-uniform sampler of the sampled softmax assumes).

The streams' places and the carried state are in the checkpoint, and dropout and softmax samples are
seeded from (seed, iteration, rank), so `--resume True` after a kill replays the run exactly. Under
torchrun every rank steps all rows' streams and trains on its own rows: the same batches at any world size.
"""
import functools
import gc
import hashlib
import json
import math
import os
import re
import sys
import time
import unicodedata
from collections import Counter

import numpy as np
import torch

from minilm.files import (load_error_line, out_dir_problem, printable_output, releases_out_dir_locks,
                          state_dict_error_line)

# -----------------------------------------------------------------------------------------------
# defaults (bilm-tf's where they make sense on a laptop; the paper's run: --preset original
# --batch_size 384 (bilm-tf: 128 per GPU on 3 GPUs) --unroll_steps 20 --n_negative_samples 8192, 10 epochs of
# the 1B Word Benchmark)
data = "shakespeare"       # "shakespeare", "korean", or a UTF-8 text file / directory of them
out_dir = "out-elmo"
device = "cuda" if torch.cuda.is_available() else "cpu"
preset = "tiny"            # tiny | small | medium | original (minilm.elmo.PRESETS)
batch_size = 32            # rows (sentence streams) per iteration, over all processes together
unroll_steps = 20          # tokens per row and iteration (bilm-tf: 20)
max_iters = 500
eval_interval = 100
eval_iters = 10            # batches per split at each evaluation
log_interval = 25
optimizer = "adagrad"      # adagrad (the paper's) | adam
learning_rate = 0.0        # 0 means the optimizer's default here: adagrad 0.2 (bilm-tf), adam 1e-3
grad_clip = 10.0           # global gradient-norm clip (bilm-tf: 10)
dropout = 0.1
max_vocab = 10000          # softmax vocabulary, specials included (0 = every training word)
n_negative_samples = 2048  # sampled softmax when the vocabulary is larger than this (bilm-tf: 8192)
val_fraction = 0.1
seed = 1337               # 0 ≤ seed < 2**32
compile = False            # torch.compile the model
resume = False             # continue from out_dir/ckpt.pt
overwrite = False          # start over in an out_dir with a checkpoint (deletes ckpt.pt, log.jsonl, --embed files)
embed = ""                 # a text file (or a directory of them): ELMo features of its lines (needs a trained out_dir)
word = ""                  # --embed: the word whose contexts to compare (default: picked from the file)
test = ""                  # "val" (the run's validation split) or a text file: a trained out_dir's perplexity on all of it
# -----------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Something the user got wrong: printed as one line, exit status 1."""


class LaunchError(UsageError):
    """A process started wrongly (RANK without torchrun's other variables): every process says it."""


class RankError(UsageError):
    """A full disk, too little memory: maybe one rank's alone, so every rank says its own."""


def parse_args(argv, defaults):
    """`--name value` / `--name=value` overrides for the defaults above, typed like the default; None for
    --help (-h)."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--help", "-h"):
            return None
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r} (options look like --name value)")
        if "=" in arg:
            key, val = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--") and argv[i + 1][2:].partition("=")[0] in defaults:
                raise UsageError(f"{arg} needs a value")
            key, val = arg[2:], argv[i + 1]
            i += 2
        if key not in defaults:
            raise UsageError(f"unknown option --{key}; options: {', '.join('--' + k for k in defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if val not in ("True", "False"):
                raise UsageError(f"--{key} must be True or False, got {val!r}")
            out[key] = val == "True"
        else:
            try:
                out[key] = kind(val)
            except ValueError:
                raise UsageError(f"--{key} must be {'an' if kind is int else 'a'} {kind.__name__}, got {val!r}") from None
    return out


@functools.cache
def unicode_classes():
    """One pass over every code point (on first use, about 0.1 s) for the two tables tokenize needs: the
    combining marks (Unicode categories Mn, Mc, Me) as [first, last] runs, and str.translate's table of what
    a reader does not see (invisible_characters)."""
    marks, invisible = [], {}
    for c in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(c))
        if category[0] == "M":
            if marks and marks[-1][1] == c - 1:
                marks[-1][1] = c
            else:
                marks.append([c, c])
        kept = c in (0x200C, 0x200D) or 0xE0020 <= c <= 0xE007F   # joiners; the tags of 🏴 flag sequences
        if category == "Cf" and not kept or category == "Cc" and not chr(c).isspace():
            invisible[c] = None
    invisible[0x200B] = " "
    return marks, invisible


@functools.cache
def token_regex():
    """Words or symbols: the compiled pattern that `tokenize` uses (built once, on first use).

    A word is a run of word characters: Python's \\w (letters, digits, _) plus what belongs inside a
    word but is not \\w, and re has no class for: the combining marks (Unicode categories Mn, Mc,
    Me: Devanagari vowel signs and viramas, the accents of NFD text) and the zero-width non-joiner
    and joiner U+200C, U+200D. An apostrophe, ' or ’, between word characters stays inside
    ("o'er", "don’t"). A symbol is one other non-space character together with the marks (emoji
    variation selectors), skin-tone modifiers, flag tags and ZWJ-joined symbols that follow it, so an
    emoji sequence like 👨‍👩‍👧 stays one token; two regional indicators make one flag.
    """
    marks = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in unicode_classes()[0])
    word = rf"[\w{marks}\u200c\u200d]"
    symbol = rf"[^\w\s](?:[{marks}\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F]|\u200d[^\w\s])*"
    return re.compile(rf"{word}+(?:['’]{word}+)*|[\U0001F1E6-\U0001F1FF]{{2}}|{symbol}")


def invisible_characters():
    """str.translate's table of what a reader does not see: the format characters (category Cf: soft hyphens,
    direction marks, word joiners, a byte-order mark inside the text, ...) and the control characters but
    whitespace (NUL) go, so that a word with a soft hyphen (U+00AD) stays one word rather than three; the
    zero-width space U+200B, which separates words in Thai or Khmer, becomes a space. The joiners U+200C and
    U+200D stay, as do the tag characters of subdivision flags (🏴 + tags: Scotland's, England's): they
    belong inside words and emoji sequences."""
    return unicode_classes()[1]


def tokenize(line):
    """Case-sensitive word-level split: ELMo reads characters, so "King" and "king" stay distinct."""
    return token_regex().findall(line.translate(invisible_characters()))


def sentences_of(text):
    return [words for words in map(tokenize, text.splitlines()) if words]


# What a checkpoint fixes. --resume True takes every option from the checkpoint's train_config, then the
# command line's; these may only repeat the checkpoint's value. The model, its softmax vocabulary and the
# optimizer's state depend on the first ones; the rest decide every batch and step, and resume replays
# the run exactly. max_iters (train longer), eval_interval, eval_iters, log_interval, device and compile may change.
FIXED_BY_CHECKPOINT = ("data", "val_fraction", "max_vocab", "preset", "dropout", "n_negative_samples", "optimizer",
                       "learning_rate", "grad_clip", "batch_size", "unroll_steps", "seed")
NOT_FROM_CHECKPOINT = ("out_dir", "device", "resume", "overwrite", "embed", "word", "test")   # this command line's own


def default_lr(optimizer):
    return {"adagrad": 0.2, "adam": 1e-3}[optimizer]


def check_fixed_options(given, trained_with):
    """--resume True: an option in FIXED_BY_CHECKPOINT may only repeat the checkpoint's value."""
    from minilm.data import data_spec       # --data as a checkpoint records it: a built-in's name, or a full path
    for name in FIXED_BY_CHECKPOINT:
        if name not in given:
            continue
        value, theirs = given[name], trained_with[name]
        if name == "data":
            value, theirs = data_spec(value), data_spec(theirs)
        elif name == "learning_rate":       # 0: the optimizer's default, the same run as giving that value
            value = value or default_lr(trained_with["optimizer"])
            theirs = theirs or default_lr(trained_with["optimizer"])
        if value != theirs:
            raise UsageError(f"--resume True: --{name} {given[name]} differs from the checkpoint's "
                             f"({trained_with[name]}): the checkpoint fixes its model, vocabulary, optimizer and "
                             "batches; start a new run (another --out_dir, or --overwrite True) to change it")


def usage():
    """--help: this file's docstring, then the defaults as written above (each option with its comment)."""
    with open(__file__, encoding="utf-8") as f:
        lines = f.read().splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("# ----")][:2]
    options = "\n".join(lines[marks[0] + 1:marks[1]])
    return f"{__doc__.strip()}\n\nOptions (--name value), with their defaults:\n\n{options}"


@releases_out_dir_locks
def main(argv):
    defaults = {k: globals()[k] for k in _CONFIG_KEYS}
    given = parse_args(argv, defaults)
    if given is None:  # --help
        print(usage())
        return 0
    cfg = {**defaults, **given}
    try:
        for name in ("out_dir", "embed", "test", "word"):  # e.g. an unset shell variable: not the same as leaving it out
            if given.get(name) == "":
                raise UsageError(f"--{name} is empty: give a value, or leave the option out")
        if cfg["embed"] and cfg["test"]:
            raise UsageError("--embed and --test are two different jobs: pass one of them")
        for job, takes in (("embed", ("out_dir", "device", "word")), ("test", ("out_dir", "device", "batch_size",
                                                                                "unroll_steps"))):
            other = sorted(set(given) - {job, *takes})
            if cfg[job] and other:
                raise UsageError(f"--{job} takes only --{', --'.join(takes)}, not --{', --'.join(other)} (training "
                                 "options; --resume and --overwrite are for training too)")
        if cfg["embed"]:
            return embed_file(cfg)
        if cfg["test"]:
            return held_out_perplexity(cfg)
        check_train_options(cfg)
        checkpoint = None
        if cfg["resume"]:       # the checkpoint's options, then whatever this command line says
            ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
            if problem := out_dir_problem(cfg["out_dir"]):   # before "no checkpoint", which it would explain
                raise UsageError(problem)
            if not os.path.isfile(ckpt_path):
                raise UsageError(f"--resume True, but there is no checkpoint at {ckpt_path}")
            checkpoint = load_checkpoint(ckpt_path)
            saved = checkpoint.get("train_config")
            trained_with = {k: v for k, v in (saved if isinstance(saved, dict) else {}).items()
                            if k in defaults and k not in NOT_FROM_CHECKPOINT}
            missing = [k for k in FIXED_BY_CHECKPOINT if k not in trained_with]
            if missing:
                raise UsageError(f"{ckpt_path} does not record its run's --{', --'.join(missing)}: "
                                 "it cannot be resumed")
            if checkpoint.get("batches") != BATCHES:
                raise UsageError(f"{ckpt_path} was trained by an older train_elmo.py on independent windows: it holds "
                                 "no sentence streams or LSTM state to go on from; start a new run (its weights "
                                 "still work with --embed)")
            for k, v in trained_with.items():   # a hand-edited or damaged checkpoint: its options checked as given ones
                if type(v) is not type(defaults[k]) and not (type(defaults[k]) is float and type(v) is int):
                    raise UsageError(f"{ckpt_path} is damaged: its --{k} is {v!r}")
            check_fixed_options(given, trained_with)
            cfg = {**defaults, **trained_with, **given}
            check_train_options(cfg)
        return train(cfg, checkpoint)
    except (ValueError, FileNotFoundError) as e:    # minilm.data.DataError is a ValueError; library checks raise these
        raise UsageError(str(e)) from None
    except OSError as e:                            # a full disk, a read-only out_dir, ...
        from minilm.files import os_error_line
        raise RankError(os_error_line(e)) from None
    except (MemoryError, RuntimeError) as e:        # torch's allocators raise RuntimeErrors (CUDA: OutOfMemoryError)
        from minilm.files import compile_error_line, is_out_of_memory
        compile_failure = compile_error_line(e)     # --compile True, and torch.compile failed
        if compile_failure:
            raise RankError(compile_failure) from None
        if not is_out_of_memory(e):
            raise
        raise RankError("out of memory: give a smaller --batch_size (or --unroll_steps, --preset)") from None


def check_device(dev):
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", dev):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {dev} was asked for, but torch sees no CUDA device")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {dev}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    if dev == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but torch sees no MPS device")


def check_train_options(cfg):
    """Everything on the command line that can be wrong on its own, checked before any work."""
    from minilm.elmo import PRESETS
    for key, low in (("max_iters", 0), ("eval_interval", 1),
                     ("eval_iters", 1), ("log_interval", 1), ("n_negative_samples", 0)):
        if cfg[key] < low:
            raise UsageError(f"--{key} must be ≥ {low}, got {cfg[key]}")
    if not cfg["grad_clip"] > 0:      # 0 would zero every gradient, a negative one would climb the loss
        raise UsageError(f"--grad_clip must be > 0 (inf turns clipping off), got {cfg['grad_clip']}")
    if not (math.isfinite(cfg["learning_rate"]) and cfg["learning_rate"] >= 0):
        raise UsageError(f"--learning_rate must be a finite number ≥ 0 (0: the optimizer's default), got "
                         f"{cfg['learning_rate']}")
    from minilm.files import beyond_float32
    if message := beyond_float32("learning_rate", cfg["learning_rate"]):
        raise UsageError(message)
    check_batch_shape(cfg)
    if not 0 <= cfg["dropout"] < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {cfg['dropout']}")
    if not 0 < cfg["val_fraction"] < 1:
        raise UsageError(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    if not cfg["data"].strip():
        raise UsageError("--data is empty: give a text file or a directory of them")
    if cfg["max_vocab"] != 0 and cfg["max_vocab"] < 4:
        raise UsageError(f"--max_vocab must be 0 (every training word) or ≥ 4 (<S>, </S>, <UNK> and at least "
                         f"one word), got {cfg['max_vocab']}")
    if not 0 <= cfg["seed"] < 2**32:   # the per-iteration seeds (seed · 1,000,003 + ...) must fit torch's 64 bits
        raise UsageError(f"--seed must be in [0, 2**32), got {cfg['seed']}")
    if cfg["optimizer"] not in ("adagrad", "adam"):
        raise UsageError(f"--optimizer must be adagrad or adam, got {cfg['optimizer']!r}")
    if cfg["preset"] not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {cfg['preset']!r}")
    if cfg["word"]:
        raise UsageError("--word picks the word whose contexts --embed compares: give it with --embed")
    if cfg["resume"] and cfg["overwrite"]:
        raise UsageError("--resume True continues the checkpoint and --overwrite True deletes it: pass one of them")
    check_device(cfg["device"])


def check_batch_shape(cfg):
    """--batch_size rows of --unroll_steps tokens: each ≥ 1, and a batch no larger than 2³¹ tokens."""
    B, T = cfg["batch_size"], cfg["unroll_steps"]
    for key in ("batch_size", "unroll_steps"):
        if cfg[key] < 1:
            raise UsageError(f"--{key} must be ≥ 1, got {cfg[key]}")
    if B * T > 2**31:
        raise UsageError(f"--batch_size {B} × --unroll_steps {T} tokens is more than any machine holds in one batch "
                         "(at most 2**31)")


def perplexity(nats):
    """exp(nats), inf where that overflows (a diverged run's loss)."""
    return math.inf if nats >= 709 else math.exp(nats)   # nan stays nan


def load_checkpoint(path):
    """A train_elmo.py checkpoint as a dict, or a one-line UsageError saying why the file is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:            # truncated, not a torch file, objects that weights_only refuses, ...
        raise UsageError(f"cannot read {path} (truncated or not a checkpoint?): {load_error_line(e)}") from None
    missing = {"model", "optimizer", "config", "vocab", "iter"} - set(checkpoint if isinstance(checkpoint, dict) else {})
    if missing:
        raise UsageError(f"{path} is not a train_elmo.py checkpoint (no {', '.join(sorted(missing))}: "
                         "a train_gpt1.py one, or another file?)")
    from minilm.elmo import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN
    from minilm.files import weights_finite
    vocab, weights, config = checkpoint["vocab"], checkpoint["model"], checkpoint["config"]
    if type(checkpoint["iter"]) is not int or checkpoint["iter"] < 0:
        raise UsageError(f"{path} is damaged: its iteration is {checkpoint['iter']!r}")
    specials = [BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    if not (isinstance(vocab, list) and all(isinstance(w, str) for w in vocab) and vocab[:3] == specials
            and isinstance(config, dict) and len(vocab) == config.get("vocab_size")):
        raise UsageError(f"{path} is damaged: its vocabulary is not the model's list of words starting with "
                         f"{', '.join(specials)}")
    if not (isinstance(weights, dict) and all(isinstance(t, torch.Tensor) for t in weights.values())):
        raise UsageError(f"{path} is damaged: its model is not a state dict")
    if not weights_finite(weights):
        raise UsageError(f"{path} holds NaN or infinite weights (a damaged file, or a run that diverged)")
    return checkpoint


def bilm_from_checkpoint(checkpoint, path):
    from minilm.elmo import BiLM, ELMoConfig
    try:
        model = BiLM(ELMoConfig.from_dict(checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as e:
        raise UsageError(f"{path}: the model in it does not load ({state_dict_error_line(e)})") from None
    return model


BATCHES = "bilm-tf streams"   # recorded in checkpoints: how the batches are made (SentenceStream, state carried)


class SentenceStream:
    """One direction's batches, as bilm-tf's LMDataset and _get_batch make them (bilm/data.py).

    Each of `rows` rows reads sentences one after another. A sentence is a run of token indices
    `length` long, markers included: `<S> w_1 … w_n </S>` in the forward stream, `</S> w_n … w_1 <S>` in
    the backward one. At every step a row reads one token and its target is the next one, so a
    sentence's last marker is only ever a target and no (input, target) pair spans two sentences (the
    LSTM state does run on from one to the next, as in bilm-tf): the forward LM reads `<S> w_1 … w_n`
    and predicts `w_1 … w_n </S>`. A batch takes T steps from each row in turn, and a row whose
    sentence is used up draws the next one from a supply all rows share: the split's sentences in a
    new random order on every pass (bilm-tf reshuffles a shard each time it loads one). The rows' places
    are all the state there is, so a checkpoint keeps it (state_dict). seed: a tuple of ints; pass e's
    order is numpy's default_rng([*seed, e]).permutation. test: bilm-tf's test mode, one pass through the
    sentences in their order, after which next_batch raises StopIteration.
    """

    def __init__(self, lengths, rows, seed, test=False):
        self.lengths = np.asarray(lengths, dtype=np.int64)                   # tokens per sentence, markers included
        # a sentence shorter than its two markers has no (input, target) pair (one of length 0 would make
        # next_batch step backwards), and with no sentence at all there is nothing to draw
        if self.lengths.size == 0 or self.lengths.min() < 2:
            raise ValueError("SentenceStream needs at least one sentence, each at least its two markers long")
        self.offsets = np.cumsum(self.lengths) - self.lengths                # where each one starts in the split's tokens
        self.rows, self.seed, self.test = rows, seed, test
        self.epoch, self.drawn = 0, 0          # the pass through the sentences, and how many of it are drawn
        self.sentence = [-1] * rows            # each row's sentence (−1: none yet)
        self.place = [0] * rows                # and the place in it of the row's next input
        self.order = self._order()

    def _order(self):
        if self.test:
            return np.arange(len(self.lengths))
        return np.random.default_rng([*self.seed, self.epoch]).permutation(len(self.lengths))

    def _draw(self):
        if self.drawn == len(self.lengths):
            if self.test:       # bilm-tf's test mode: one pass in file order; the unfinished batch is dropped
                raise StopIteration
            self.epoch, self.drawn = self.epoch + 1, 0
            self.order = self._order()
        self.drawn += 1
        return int(self.order[self.drawn - 1])

    def next_batch(self, T):
        """(rows, T) int64: the index of every input among the split's tokens; each target is the token after it."""
        index = np.empty((self.rows, T), dtype=np.int64)
        for r in range(self.rows):
            t = 0
            while t < T:
                if self.sentence[r] < 0 or self.place[r] >= self.lengths[self.sentence[r]] - 1:
                    self.sentence[r], self.place[r] = self._draw(), 0
                s, p = self.sentence[r], self.place[r]
                n = min(int(self.lengths[s]) - 1 - p, T - t)                  # steps left in this sentence
                index[r, t:t + n] = self.offsets[s] + p + np.arange(n)
                self.place[r], t = p + n, t + n
        return index

    def state_dict(self):
        return {"epoch": self.epoch, "drawn": self.drawn, "sentence": list(self.sentence), "place": list(self.place)}

    def load_state_dict(self, d):
        self.epoch, self.drawn, self.sentence, self.place = d["epoch"], d["drawn"], list(d["sentence"]), list(d["place"])
        self.order = self._order()


def restore_streams(checkpoint, path, streams, model):
    """The checkpoint's stream places into `streams`, and its carried LSTM state (all rows) returned; a
    checkpoint whose streams or state do not fit this run is a one-line error."""
    saved, state = checkpoint.get("streams"), checkpoint.get("lstm_state")
    rows, n = streams[0].rows, len(streams[0].lengths)
    for stream, d in zip(streams, saved if isinstance(saved, list) and len(saved) == 2 else [None, None]):
        try:
            ints = [d["epoch"], d["drawn"], *d["sentence"], *d["place"]]
            fits = (all(type(x) is int for x in ints) and 0 <= d["epoch"] and 0 <= d["drawn"] <= n
                    and len(d["sentence"]) == len(d["place"]) == rows
                    and all(s == -1 or (0 <= s < n and 0 <= p < stream.lengths[s])
                            for s, p in zip(d["sentence"], d["place"])))
        except (TypeError, KeyError):
            fits = False
        if not fits:
            raise UsageError(f"{path} is damaged: its sentence streams do not fit this run's corpus and --batch_size")
        stream.load_state_dict(d)
    try:
        model.check_stream_state(state, rows)
        fits = state is not None and all(torch.isfinite(t).all() for layers in state for mc in layers for t in mc)
    except ValueError:
        fits = False
    if not fits:
        raise UsageError(f"{path} is damaged: its carried LSTM state does not fit the model and --batch_size, or is "
                         "not finite")
    return state


def encode_splits(sentences, vocab):
    """{split: sentences} and the softmax vocabulary → (types: every word read, markers included, sorted;
    type_chars (n_types, 50) their char ids; type_to_word (n_types,) their softmax ids, <UNK> for words outside
    it; {split: (2, N) the type ids each direction reads}; {split: each sentence's length})."""
    from minilm.elmo import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, word_to_char_ids
    word_id = {w: i for i, w in enumerate(vocab)}
    types = sorted({w for sents in sentences.values() for s in sents for w in s} | {BOS_TOKEN, EOS_TOKEN})
    type_id = {w: i for i, w in enumerate(types)}
    type_chars = torch.tensor([word_to_char_ids(w) for w in types], dtype=torch.long)      # (n_types, 50)
    type_to_word = torch.tensor([word_id.get(w, word_id[UNK_TOKEN]) for w in types])        # (n_types,)
    tokens, lengths = {}, {}
    for split, sents in sentences.items():
        words, lengths[split] = direction_words(sents)
        tokens[split] = torch.tensor([[type_id[w] for w in ws] for ws in words])   # (2, N) type ids
    return types, type_chars, type_to_word, tokens, lengths


def stream_batch(streams, T, tokens, type_chars, type_to_word, rows=slice(None)):
    """The two streams' next batch, rows `rows` of it: the char ids of its distinct words (U, 50), which of them
    each direction reads (2, b, T), and the targets (2, b, T), softmax ids. tokens (2, N): the split's type ids."""
    index = torch.from_numpy(np.stack([stream.next_batch(T) for stream in streams])[:, rows])   # (2, b, T)
    d = torch.arange(2).view(2, 1, 1)
    read = tokens[d, index]                                      # (2, b, T) type ids of the inputs
    distinct, where = torch.unique(read, return_inverse=True)    # each word once: the char-CNN encodes it once
    targets = type_to_word[tokens[d, index + 1]]                 # (2, b, T) the token after each input
    return type_chars[distinct], where, targets


def direction_words(sentences):
    """The words each direction reads, sentence after sentence: ([forward: <S> w_1 … w_n </S> …, backward:
    </S> w_n … w_1 <S> …], each sentence's length in tokens)."""
    from minilm.elmo import BOS_TOKEN, EOS_TOKEN
    forward = [w for s in sentences for w in (BOS_TOKEN, *s, EOS_TOKEN)]
    backward = [w for s in sentences for w in (EOS_TOKEN, *reversed(s), BOS_TOKEN)]
    return [forward, backward], [len(s) + 2 for s in sentences]


class StreamLM(torch.nn.Module):
    """A training step's losses as a module's forward (BiLM.stream_losses), so DDP can wrap it."""

    def __init__(self, bilm):
        super().__init__()
        self.bilm = bilm

    def forward(self, char_ids, targets, state=None, token_index=None):
        return self.bilm.stream_losses(char_ids, targets, state, token_index)


def setup_device(cfg):
    """DDP when launched by torchrun (RANK in the environment), else one process."""
    ddp = os.environ.get("RANK", "-1").strip() != "-1"
    rank, world = 0, 1
    dev = cfg["device"]
    if ddp:
        import torch.distributed as dist

        from minilm.files import torchrun_launch
        try:
            rank, local_rank, world = torchrun_launch(need_local_rank=dev.startswith("cuda"))   # LOCAL_RANK: which GPU
        except ValueError as e:
            raise LaunchError(str(e)) from None
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return ddp, rank, world, dev


def train(cfg, checkpoint=None):
    """A run with the options cfg (checked by main); checkpoint: the run in out_dir that --resume True continues."""
    from minilm.data import data_spec, load_documents, split_documents
    from minilm.files import (OPTIMIZER_STATE_UNFIT, lock_out_dir, make_dirs, optimizer_state_fits, out_dir_busy,
                              remove_dirs, save_checkpoint, truncate_log, unlock_out_dir)
    from minilm.elmo import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, BiLM, estimate_flops_per_token, preset as make_preset

    ddp, rank, world, dev = setup_device(cfg)
    master = rank == 0
    B, T = cfg["batch_size"], cfg["unroll_steps"]
    if B % world:
        raise UsageError(f"--batch_size {B} must be divisible by the number of processes ({world})")
    lr = cfg["learning_rate"] or default_lr(cfg["optimizer"])

    # -- out_dir: an earlier run's checkpoint is continued (--resume) or deleted (--overwrite), never mixed in
    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    log_path = os.path.join(out_dir, "log.jsonl")
    if problem := out_dir_problem(out_dir):
        raise UsageError(problem)
    corpus = os.path.realpath(cfg["data"])
    if os.path.isdir(corpus) and os.path.commonpath([corpus, os.path.realpath(out_dir)]) == corpus:
        raise UsageError(f"--out_dir {out_dir} is inside the corpus directory {cfg['data']}: its log and checkpoint "
                         "would be read as text; choose an --out_dir outside it")
    try:
        made = make_dirs(out_dir)
    except OSError as e:
        raise UsageError(f"cannot use --out_dir {out_dir}: {e.strerror or e}") from None
    busy = master and not lock_out_dir(out_dir)   # held for the run: no second run writes here meanwhile
    if ddp:   # rank 0 took the lock (or found it taken): every rank stops, rather than run on alone
        box = [busy]
        torch.distributed.broadcast_object_list(box, src=0)
        busy = box[0]
    if busy:
        raise UsageError(out_dir_busy(out_dir))
    if not checkpoint and os.path.exists(ckpt_path) and not cfg["overwrite"]:
        raise UsageError(f"{out_dir} already holds a checkpoint: pass --resume True to continue it, choose another "
                         "--out_dir, or pass --overwrite True to start over")

    # -- data: each split's sentences as two token arrays (forward, backward), char ids of every word type
    try:
        train_text, val_text = split_documents(load_documents(cfg["data"]), cfg["val_fraction"])
        sentences = {"train": sentences_of(train_text), "val": sentences_of(val_text)}
        for split, sents in sentences.items():
            if not sents:
                raise UsageError(f"the {split} split of {cfg['data']} has no words (give more text or another "
                                 "--val_fraction)")
    except (ValueError, UsageError, OSError):   # DataError is a ValueError; main() prints each in one line
        if made:
            unlock_out_dir(out_dir)
        remove_dirs(made)                 # no empty out_dir left behind
        raise
    counts = Counter(w for s in sentences["train"] for w in s)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    # <S>, </S> first, then <UNK> and the words by frequency
    vocab = [BOS_TOKEN, EOS_TOKEN, UNK_TOKEN] + ranked[: (cfg["max_vocab"] - 3) if cfg["max_vocab"] else None]
    types, type_chars, type_to_word, tokens, lengths = encode_splits(sentences, vocab)
    n_tokens = {split: sum(n - 1 for n in lengths[split]) for split in lengths}   # inputs (= targets) per pass
    corpus_sha256 = corpus_fingerprint(types, tokens)
    del sentences

    def make_streams(split, seed):
        """The forward and backward streams of a split: independent orders, as bilm-tf's two LMDatasets."""
        return [SentenceStream(lengths[split], B, (seed, d)) for d in (0, 1)]

    def get_batch(split, streams):
        """The streams' next global batch (every rank steps every row, so a rank's rows are the same at any
        world size), this rank's rows of it, on the device (see stream_batch)."""
        return [x.to(dev) for x in stream_batch(streams, T, tokens[split], type_chars, type_to_word, rows)]

    rows = slice(rank * (B // world), (rank + 1) * (B // world))

    # -- model and optimizer ------------------------------------------------------------------------
    torch.manual_seed(cfg["seed"])
    if checkpoint:
        if checkpoint.get("corpus_sha256") != corpus_sha256:   # the words and tokens, so the vocabulary too
            raise UsageError(f"--resume True: {cfg['data']} has changed since {ckpt_path} was trained on it, or an "
                             "older minilm split it into train and validation text elsewhere (its streams would read "
                             "other sentences); start a new run")
        model = bilm_from_checkpoint(checkpoint, ckpt_path).to(dev)
        config = model.config
    else:
        config = make_preset(cfg["preset"], vocab_size=len(vocab), dropout=cfg["dropout"],
                             n_negative_samples=cfg["n_negative_samples"])
        model = BiLM(config).to(dev)
    if cfg["optimizer"] == "adagrad":   # bilm-tf: AdagradOptimizer(lr, initial_accumulator_value=1.0)
        opt = torch.optim.Adagrad(model.parameters(), lr=lr, initial_accumulator_value=1.0)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    if checkpoint:
        try:
            opt.load_state_dict(checkpoint["optimizer"])
            fits = optimizer_state_fits(opt)
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError):   # AttributeError: not a dict
            fits = False
        if not fits:
            raise UsageError(f"{ckpt_path} is damaged: {OPTIMIZER_STATE_UNFIT}")
    raw_model = model
    model = StreamLM(raw_model)          # forward = BiLM.stream_losses
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)
    start_iter = checkpoint["iter"] if checkpoint else 0
    # where the training streams are and the LSTM state they carry (bilm-tf feeds each batch's final
    # state in as the next one's initial state): a resumed run goes on from the checkpoint's
    train_streams = make_streams("train", cfg["seed"])
    lstm_state = None
    if checkpoint:
        lstm_state = restore_streams(checkpoint, ckpt_path, train_streams, raw_model)
        lstm_state = [[(m[rows].to(dev), c[rows].to(dev)) for m, c in layers] for layers in lstm_state]
    n_params = sum(p.numel() for p in raw_model.parameters())
    softmax = "full" if not 0 < config.n_negative_samples < len(vocab) else f"sampled ({config.n_negative_samples})"
    if master:
        print(f"data {cfg['data']}: {n_tokens['train']:,} train / {n_tokens['val']:,} val tokens "
              f"({len(lengths['train']):,} / {len(lengths['val']):,} sentences), "
              f"{len(types):,} word types, softmax vocabulary {len(vocab):,} ({softmax} softmax in training)")
        resumed = f" from checkpoint (iter {start_iter})" if checkpoint else ""
        print(f"model {cfg['preset']}{resumed}: {n_params:,} parameters "
              f"({n_params - (len(vocab) * (config.projection_dim + 1)):,} without the softmax); "
              f"{world} process(es), device {dev}, global batch {B} × {T} tokens")
        if checkpoint and start_iter >= cfg["max_iters"]:
            print(f"{ckpt_path} is at iteration {start_iter} and --max_iters is {cfg['max_iters']}: nothing to train "
                  "(pass a larger --max_iters to go on)")
    flops_per_token = estimate_flops_per_token(config, len(vocab))

    @torch.no_grad()
    def estimate_loss():
        """Mean full-softmax loss per direction on the first eval_iters batches of each split's own streams
        (fixed orders, so the same batches every time), the LSTM state carried from zero as in training."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            streams = make_streams(split, cfg["seed"] + (1 if split == "train" else 2))
            total, state = torch.zeros(2, device=dev), None
            for _ in range(cfg["eval_iters"]):
                chars, where, targets = get_batch(split, streams)
                losses, state = raw_model.stream_losses(chars, targets, state, where)
                total += losses
            if ddp:               # every rank scores b × T targets per direction: the mean of ranks is the batch's
                torch.distributed.all_reduce(total)
            out[split] = (total / (cfg["eval_iters"] * world)).tolist()     # [fwd, bwd], nats
        model.train()
        return out

    def all_rows(state):
        """The carried LSTM state of the whole global batch (every rank's rows, in order), on the CPU; every
        rank must call it."""
        def gather(x):
            if not ddp:
                return x.cpu()
            parts = [torch.empty_like(x) for _ in range(world)]
            torch.distributed.all_gather(parts, x)
            return torch.cat(parts).cpu()
        return [[(gather(m), gather(c)) for m, c in layers] for layers in state]

    def checkpoint_state(it, lstm_state):
        return {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "config": config.to_dict(),
                 "vocab": vocab, "iter": it, "train_config": {**cfg, "data": data_spec(cfg["data"])},
                 "batches": BATCHES, "corpus_sha256": corpus_sha256,
                 "streams": [stream.state_dict() for stream in train_streams],
                 "lstm_state": lstm_state}

    if master and checkpoint:
        truncate_log(log_path, start_iter)   # evaluations logged after the checkpoint (then a kill) are redone
    elif master and not checkpoint:
        # a fresh run: nothing of an earlier one stays (its checkpoint is here only with --overwrite True),
        # nor the features --embed made with it; the checkpoint goes first, so a kill in between leaves a log
        # without one, which the next run drops
        features = [os.path.join(out_dir, name) for name in ("elmo_features.npz", "elmo_contexts.png")]
        for path in (ckpt_path, log_path, *features):
            if os.path.exists(path):
                os.remove(path)

    # -- the loop -----------------------------------------------------------------------------------
    model.train()
    t0, tokens_since = time.time(), 0
    for it in range(start_iter, cfg["max_iters"] + 1):
        if (it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]) and not (checkpoint and it == start_iter):
            losses = estimate_loss()                  # the same on every rank
            if not all(math.isfinite(x) for x in losses["train"] + losses["val"]):
                raise UsageError(f"iter {it}: the loss is {losses['train'] + losses['val']}: training diverged; "
                                 f"nothing is saved ({ckpt_path} keeps the last good iteration, if any): start a "
                                 "new run with a lower --learning_rate or --grad_clip")
            saved_state = all_rows(lstm_state) if it > 0 else None     # every rank takes part in the gather
            if master:
                (tf, tb), (vf, vb) = losses["train"], losses["val"]
                record = {"iter": it, "train_loss": (tf + tb) / 2, "val_loss": (vf + vb) / 2, "val_ppl_fwd": perplexity(vf),
                          "val_ppl_bwd": perplexity(vb), "val_ppl": perplexity((vf + vb) / 2)}
                print(f"eval {it}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                      f"val ppl {record['val_ppl']:.1f} (fwd {record['val_ppl_fwd']:.1f}, bwd {record['val_ppl_bwd']:.1f})",
                      flush=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if it > 0:
                    save_checkpoint(ckpt_path, checkpoint_state(it, saved_state))   # atomic: a kill leaves the old one
            t0, tokens_since = time.time(), 0
        if it == cfg["max_iters"]:
            break

        torch.manual_seed(cfg["seed"] * 1_000_003 + it * 1009 + rank + 1)      # dropout and softmax samples: per rank
        chars, where, targets = get_batch("train", train_streams)             # (U, 50), (2, b, T), (2, b, T)
        losses, lstm_state = model(chars, targets, lstm_state, where)         # (2,) [forward, backward]
        loss = losses.mean()                          # paper: ½ (forward + backward) negative log-likelihood
        opt.zero_grad(set_to_none=True)
        (loss * T).backward()                         # bilm-tf differentiates loss × unroll_steps (a sum over time)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()

        tokens_since += B * T
        if (it + 1) % cfg["log_interval"] == 0:
            losses = losses.detach()
            if ddp:  # every rank scores as many targets: the mean over ranks is the global batch's
                torch.distributed.all_reduce(losses)
                losses = losses / world
            if master:
                dt = time.time() - t0
                tok_s = tokens_since / max(dt, 1e-9)
                print(f"iter {it + 1}: loss {losses.mean().item():.4f} (fwd {losses[0].item():.3f}, "
                      f"bwd {losses[1].item():.3f}), grad norm {grad_norm.item():.2f}, {tok_s:,.0f} tokens/s, "
                      f"{tok_s * flops_per_token / 1e9:.1f} model GFLOP/s", flush=True)
    if ddp:
        torch.distributed.barrier()  # every rank done before teardown: gloo aborts a rank that leaves early
        # DDP's reducer goes first: if the process group's last reference died with it, gloo's destructor
        # would wait for its worker threads while holding the GIL that they may need (a rare hang at exit).
        del model
        gc.collect()
        torch.distributed.destroy_process_group()
    return 0


# -----------------------------------------------------------------------------------------------
# --test and --embed: jobs for a trained out_dir


def trained_bilm(cfg, option):
    """(out_dir's checkpoint, its BiLM on --device), or a one-line error naming the option that needs them."""
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if problem := out_dir_problem(cfg["out_dir"]):
        raise UsageError(f"--{option}: {problem}")
    if not os.path.isfile(ckpt_path):
        raise UsageError(f"--{option} needs a trained model: no checkpoint at {ckpt_path} (train with --out_dir first)")
    check_device(cfg["device"])
    checkpoint = load_checkpoint(ckpt_path)
    return checkpoint, bilm_from_checkpoint(checkpoint, ckpt_path).to(cfg["device"])


def text_sentences(path, option):
    """The sentences of a text file (or a directory of them) given to --option, or a one-line error."""
    from minilm.data import load_documents
    if not os.path.exists(path):
        raise UsageError(f"--{option} {path}: no such file or directory")
    try:
        text = "\n".join(t for _, t in load_documents(path))
    except ValueError as e:          # DataError: empty, not UTF-8, ...
        raise UsageError(f"--{option} {path}: {e}") from None
    return sentences_of(text)


# --test: a trained biLM's perplexity on a whole text (bilm-tf's bin/run_test.py)


def corpus_fingerprint(types, tokens):
    """sha256 of a run's corpus as its streams read it (encode_splits' word types and each split's tokens, train
    then val): a checkpoint records it, so that resuming on, or scoring the validation split of, a corpus that
    has changed since is refused."""
    return hashlib.sha256("\n".join(types).encode() + b"".join(t.numpy().tobytes() for t in tokens.values())).hexdigest()


def fills_a_batch(lengths, rows, steps):
    """Whether sentences of these lengths fill a first batch of rows × steps in --test's pass (in file order)."""
    try:
        SentenceStream(lengths, rows, (0,), test=True).next_batch(steps)
        return True
    except StopIteration:
        return False


def largest_filling(fills, limit):
    """The largest v in [1, limit] for which fills(v), or None: by bisection, since fewer rows, or fewer steps
    per row, never fill less."""
    lo, hi = 0, limit              # fills(lo) (or lo = 0), not fills(hi + 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fills(mid) else (lo, mid - 1)
    return lo or None


def held_out_perplexity(cfg):
    """Full-softmax perplexity of out_dir's model on every sentence of --test ("val": the run's own validation
    split), read as bilm-tf's test mode reads it: batch_size rows of unroll_steps tokens, each direction's
    stream in file order, the LSTM state carried from zero through the whole pass, the unfinished last
    batch dropped."""
    from minilm.data import load_documents, split_documents

    check_batch_shape(cfg)
    checkpoint, bilm = trained_bilm(cfg, "test")
    bilm.eval()
    if cfg["test"] == "val":
        trained_with = checkpoint.get("train_config") or {}
        data, fraction = trained_with.get("data"), trained_with.get("val_fraction")
        if not (isinstance(data, str) and type(fraction) in (int, float) and 0 < fraction < 1):
            raise UsageError(f"{cfg['out_dir']}/ckpt.pt does not record its run's --data and --val_fraction: give "
                             "--test a text file")
        if "corpus_sha256" not in checkpoint:
            raise UsageError(f"{cfg['out_dir']}/ckpt.pt does not record its corpus (an older minilm wrote it): give "
                             "--test a text file")
        try:
            train_text, val_text = split_documents(load_documents(data), fraction)
        except (ValueError, FileNotFoundError) as e:   # DataError: moved, emptied, ...
            raise UsageError(f"--test val: the run's corpus {data} cannot be read ({e}): give --test a text "
                             "file") from None
        splits = {"train": sentences_of(train_text), "val": sentences_of(val_text)}   # the order train() hashes
        types, _, _, split_tokens, _ = encode_splits(splits, checkpoint["vocab"])
        if corpus_fingerprint(types, split_tokens) != checkpoint["corpus_sha256"]:
            raise UsageError(f"--test val: {data} has changed since {cfg['out_dir']}/ckpt.pt was trained on it (or an "
                             "older minilm split or tokenized it otherwise), so its validation split is no longer the "
                             "run's: give --test a text file")
        sentences = splits["val"]
    else:
        sentences = text_sentences(cfg["test"], "test")
    if not sentences:
        raise UsageError(f"--test {cfg['test']} has no words")
    B, T = cfg["batch_size"], cfg["unroll_steps"]
    if len(sentences) < B:   # every row reads sentences of its own, to the end of the text (bilm-tf's test mode)
        raise UsageError(f"--test {cfg['test']} has {len(sentences):,} sentences, fewer than the --batch_size {B} rows "
                         f"that read them: give --batch_size {len(sentences)} or less")
    _, type_chars, type_to_word, tokens, lengths = encode_splits({"test": sentences}, checkpoint["vocab"])
    streams = [SentenceStream(lengths["test"], B, (0, d), test=True) for d in (0, 1)]
    total, n, state = torch.zeros(2, dtype=torch.float64), 0, None
    with torch.no_grad():
        while True:
            try:
                batch = stream_batch(streams, T, tokens["test"], type_chars, type_to_word)
            except StopIteration:
                break
            chars, where, targets = (x.to(cfg["device"]) for x in batch)
            losses, state = bilm.stream_losses(chars, targets, state, where)
            total += losses.double().cpu() * (B * T)
            n += B * T
    if n == 0:
        # at least B sentences (above): one step per row always fills a batch; fewer rows may not
        rows = largest_filling(lambda v: fills_a_batch(lengths["test"], v, T), B)
        steps = largest_filling(lambda v: fills_a_batch(lengths["test"], B, v), T)
        fix = (f"--batch_size {rows} or " if rows else "") + f"--unroll_steps {steps}"
        raise UsageError(f"--test {cfg['test']} fills no batch of --batch_size {B} × --unroll_steps {T} tokens (each "
                         f"row reads sentences of its own, and the pass ends when one row runs out): {fix} fills one, "
                         "or give more text")
    fwd, bwd = (total / n).tolist()
    print(f"--test {cfg['test']}: {len(sentences):,} sentences, {n:,} of the {sum(lengths['test']) - len(sentences):,} "
          f"tokens scored per direction ({B} × {T} per batch, the unfinished last batch left out, as bilm-tf)")
    print(f"perplexity {perplexity((fwd + bwd) / 2):.1f} (forward {perplexity(fwd):.1f}, backward {perplexity(bwd):.1f})")
    return 0


# -----------------------------------------------------------------------------------------------
# --embed: ELMo features of a text file, and a look at how context changes a word's vector


def embed_file(cfg):
    from minilm.elmo import ELMo, batch_to_ids
    from minilm.files import write_atomic

    dev = cfg["device"]
    cfg = {**cfg, "word": cfg["word"].translate(invisible_characters())}   # as the text's words are read
    _, bilm = trained_bilm(cfg, "embed")
    elmo = ELMo(bilm, dropout=0.0).eval()     # w = 0, γ = 1: the plain average of the layers
    sentences = text_sentences(cfg["embed"], "embed")
    if not sentences:
        raise UsageError(f"{cfg['embed']} has no words to embed")
    if cfg["word"] and not any(cfg["word"] in words for words in sentences):
        raise UsageError(f"--word {cfg['word']!r} does not occur in {cfg['embed']}")
    features, top = [None] * len(sentences), [None] * len(sentences)
    # batches of 64 sentences of similar length (a batch is as long as its longest sentence)
    order = sorted(range(len(sentences)), key=lambda k: len(sentences[k]))
    with torch.no_grad():
        for i in range(0, len(order), 64):
            batch = order[i: i + 64]
            ids = batch_to_ids([sentences[k] for k in batch]).to(dev)
            layers, mask, _ = bilm(ids)                                # [(b, T+2, 2P)] × (n_layers + 1)
            mixed, _ = elmo.mix(layers, mask)                          # (b, T, 2P): the same biLM run, mixed
            for b, k in enumerate(batch):                              # sentence k is row b
                words = sentences[k]
                n = len(words)
                features[k] = {"tokens": np.array(words),
                               "layers": torch.stack([h[b, 1:n + 1] for h in layers]).cpu().numpy(),  # (L+1, n, 2P)
                               "elmo": mixed[b, :n].cpu().numpy(),                                   # (n, 2P)
                               "sentence": mixed[b, :n].mean(0).cpu().numpy()}  # (2P,) mean of its ELMo vectors
                top[k] = layers[-1][b, 1:n + 1].cpu()
    arrays = {f"{name}_{k}": a for k, f in enumerate(features) for name, a in f.items()}    # in the file's order
    out_path = os.path.join(cfg["out_dir"], "elmo_features.npz")
    write_atomic(out_path, lambda f: np.savez(f, n_sentences=len(sentences), **arrays))
    print(f"wrote ELMo features of {len(sentences)} sentence{'s' if len(sentences) > 1 else ''} to {out_path}: "
          f"per sentence i, tokens_i, layers_i (n_layers+1, n_tokens, {2 * bilm.config.projection_dim}), elmo_i "
          "(their average) and sentence_i (the mean of elmo_i over the tokens: a sentence embedding)")
    show_contexts(cfg, sentences, top, bilm)
    return 0


def show_contexts(cfg, sentences, top, bilm):
    """The same word in different sentences: one vector in layer 0, different ones in the top biLM layer."""
    path = os.path.join(cfg["out_dir"], "elmo_contexts.png")
    if os.path.isfile(path):
        os.remove(path)     # an earlier --embed's plot, of another file perhaps: this one's replaces it, or none
    where = {}
    for s, words in enumerate(sentences):
        for t, w in enumerate(words):
            where.setdefault(w, []).append((s, t))
    if cfg["word"]:                 # embed_file checked that it occurs
        target = cfg["word"]
    else:   # the alphabetic word found in the most different sentences
        candidates = [w for w in where if w.isalpha() and len({s for s, _ in where[w]}) >= 2]
        if not candidates:
            print("no word occurs in two different sentences: nothing to compare")
            return
        target = max(candidates, key=lambda w: (len({s for s, _ in where[w]}), w))
    occ = where[target][:12]
    vecs = torch.nn.functional.normalize(torch.stack([top[s][t] for s, t in occ]), dim=-1)
    sim = vecs @ vecs.t()                                                  # (n, n) cosine similarity
    print(f"\n{target!r} in {len(occ)} contexts (cosine similarity of top-layer biLM vectors; "
          f"the context-free layer 0 gives 1.00 for every pair):")
    for a, (s, t) in enumerate(occ):
        others = [b for b in range(len(occ)) if occ[b][0] != s]
        ctx = " ".join(sentences[s][max(0, t - 6): t + 7])
        if others:
            b = max(others, key=lambda b: sim[a, b].item())
            near = " ".join(sentences[occ[b][0]][max(0, occ[b][1] - 6): occ[b][1] + 7])
            print(f"  [{a}] {ctx[:70]!r}\n      nearest: [{b}] {near[:70]!r} (cos {sim[a, b].item():.2f})")
        else:
            print(f"  [{a}] {ctx[:70]!r}")
    print("  cosine matrix:\n" + "\n".join("   " + " ".join(f"{v:5.2f}" for v in row) for row in sim.tolist()))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(sim.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_title(f"'{target}': cosine similarity across contexts (top biLM layer)", fontsize=8)
    ax.set_xlabel("occurrence")
    ax.set_ylabel("occurrence")
    fig.colorbar(im)
    from minilm.files import write_atomic
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    print(f"plot: {path}")


# the options: the module's lower-case scalars (the defaults at the top), not its CONSTANTS
_CONFIG_KEYS = [k for k, v in list(globals().items())
                if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str))]

if __name__ == "__main__":
    printable_output()
    try:
        sys.exit(main(sys.argv[1:]))
    except UsageError as e:
        # Under torchrun a user error is every rank's: rank 0 says it (RankError: each rank its own).
        rank = os.environ.get("RANK", "0").strip()
        if isinstance(e, LaunchError) or rank in ("0", "-1"):   # RANK -1: no torchrun, one process
            print(f"train_elmo.py: {e}", file=sys.stderr)
        elif isinstance(e, RankError):
            print(f"train_elmo.py (rank {rank}): {e}", file=sys.stderr)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # leaving with the group up can abort the ranks
        sys.exit(1)
    except KeyboardInterrupt:
        print("train_elmo.py: interrupted", file=sys.stderr)
        sys.exit(130)
