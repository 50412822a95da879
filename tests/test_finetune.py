"""GPT-1 fine-tuning (minilm/finetune.py): special tokens, the input transformations, the heads, L3 = L2 + λ·L1,
task files, the built-in tasks, and training end to end (learning, exact resume)."""
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

import minilm.finetune as ft
from minilm.bpe import DataError
from minilm.gpt1 import GPT1, config_from_preset
from script_helpers import assert_decayed_on_matrices_only, load_script

SP = ft.Specials(100, 101, 102)  # a vocabulary of 100 ordinary tokens, then the three specials


def _classifier(task, n_class=2, vocab=100, lm_coef=0.5, clf_pdrop=0.0, n_ctx=32):
    base = GPT1(config_from_preset("cpu-tiny", vocab_size=vocab, n_ctx=n_ctx))
    base.add_tokens(3)
    return ft.GPT1Classifier(base, ft.TaskConfig(task=task, n_class=n_class, clf_pdrop=clf_pdrop, lm_coef=lm_coef))


# --- special tokens -------------------------------------------------------------------------------------

def test_add_tokens_appends_n002_rows_and_leaves_the_old_rows_untouched():
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=50, n_embd=64, n_head=2))
    old = model.tokens_embed.weight.detach().clone()
    x = torch.randint(0, 50, (2, 8))
    old_logits, _ = model(x)
    first = model.add_tokens(300)  # many rows, so the sample's mean and std are pinned down
    assert first == 50 and model.config.vocab_size == 350
    w = model.tokens_embed.weight
    assert w.shape == (350, 64)
    assert torch.equal(w[:50], old)
    new = w[50:].detach()
    assert abs(new.mean().item()) < 0.002  # 19,200 draws of N(0, 0.02): the mean's std is 1.4e-4
    assert abs(new.std().item() - 0.02) < 0.001  # the std's std is 1e-4
    assert model.lm_head.weight is model.tokens_embed.weight  # still tied: the logits grew too
    logits, _ = model(x)
    assert logits.shape == (2, 8, 350)
    torch.testing.assert_close(logits[..., :50], old_logits, rtol=0, atol=0)


def test_special_tokens_are_the_three_ids_after_the_vocabulary():
    assert ft.Specials.after(40478) == ft.Specials(40478, 40479, 40480)
    assert ft.SPECIAL_TOKENS == ("_start_", "_delimiter_", "_classify_")


# --- input transformations ------------------------------------------------------------------------------

def test_classification_is_start_text_extract_and_keeps_the_first_n_ctx_minus_2_tokens():
    assert ft.transform("classification", ([5, 6, 7],), 32, SP) == [[100, 5, 6, 7, 102]]
    (seq,) = ft.transform("classification", (list(range(50)),), 16, SP)
    assert seq == [100] + list(range(14)) + [102] and len(seq) == 16


def test_entailment_is_start_premise_delim_hypothesis_extract_each_part_cut_to_n_ctx_half_minus_2():
    assert ft.transform("entailment", ([1, 2], [3]), 32, SP) == [[100, 1, 2, 101, 3, 102]]
    (seq,) = ft.transform("entailment", (list(range(40)), list(range(60, 90))), 16, SP)
    m = 16 // 2 - 2
    assert seq == [100] + list(range(m)) + [101] + list(range(60, 60 + m)) + [102]
    assert len(seq) <= 16
    (seq,) = ft.transform("entailment", ([1], list(range(60, 90))), 16, SP)  # a short premise gives no room away
    assert seq == [100, 1, 101] + list(range(60, 60 + m)) + [102]


def test_similarity_builds_both_orders():
    assert ft.transform("similarity", ([1, 2], [3]), 32, SP) == [[100, 1, 2, 101, 3, 102], [100, 3, 101, 1, 2, 102]]


def test_multiple_choice_builds_one_sequence_per_choice():
    seqs = ft.transform("multiple_choice", ([1, 2], [[3], [4, 5], [6]]), 32, SP)
    assert seqs == [[100, 1, 2, 101, 3, 102], [100, 1, 2, 101, 4, 5, 102], [100, 1, 2, 101, 6, 102]]


@pytest.mark.parametrize("n_ctx", [6, 7, 16, 33])
def test_long_inputs_never_exceed_n_ctx_and_the_model_accepts_them(n_ctx):
    long = list(range(1, 99))
    for task, parts in (("classification", (long,)), ("entailment", (long, long)),
                        ("similarity", (long, long)), ("multiple_choice", (long, [long, long[:3]]))):
        seqs = ft.transform(task, parts, n_ctx, SP)
        assert all(len(s) <= n_ctx and s[0] == 100 and s[-1] == 102 for s in seqs)
        model = _classifier(task, n_ctx=n_ctx).eval()
        idx, mask = ft.collate([seqs])
        model(idx, mask)  # no index error


def test_a_context_too_small_for_the_specials_is_refused():
    with pytest.raises(ValueError, match="no room"):
        ft.transform("entailment", ([1], [2]), 5, SP)


# --- heads ----------------------------------------------------------------------------------------------

def test_head_reads_the_hidden_state_at_the_extract_token_of_each_padded_sequence():
    model = _classifier("classification", n_class=3).eval()
    seqs = [[[100, 5, 6, 102]], [[100, 7, 8, 9, 10, 11, 102]]]
    idx, mask = ft.collate(seqs)
    logits, _ = model(idx, mask)
    for b, (s,) in enumerate(seqs):  # independently: the sequence alone, no padding, its last position
        h = model.transformer.hidden_states(torch.tensor([s]))
        torch.testing.assert_close(logits[b], model.clf(h[0, -1]), rtol=1e-5, atol=1e-6)
    idx2 = idx.clone()
    idx2[0, 0, 4:] = 42  # whatever lies in the padding changes nothing
    torch.testing.assert_close(model(idx2, mask)[0], logits, rtol=0, atol=0)


def test_a_sequence_that_does_not_end_with_the_extract_token_is_refused():
    model = _classifier("classification")
    idx, mask = ft.collate([[[100, 5, 6]]])
    with pytest.raises(ValueError, match="_classify_"):
        model(idx, mask)


def test_similarity_is_symmetric_in_its_two_inputs():
    model = _classifier("similarity").eval()
    a, b = [5, 6, 7, 8], [9, 10]
    idx_ab, mask_ab = ft.collate([ft.transform("similarity", (a, b), 32, SP)])
    idx_ba, mask_ba = ft.collate([ft.transform("similarity", (b, a), 32, SP)])
    torch.testing.assert_close(model(idx_ab, mask_ab)[0], model(idx_ba, mask_ba)[0], rtol=1e-6, atol=1e-7)
    h = model.transformer.hidden_states  # and it is W_y(h_ab + h_ba), computed here sequence by sequence
    s_ab, s_ba = (torch.tensor([s]) for s in ft.transform("similarity", (a, b), 32, SP))
    torch.testing.assert_close(model(idx_ab, mask_ab)[0][0], model.clf(h(s_ab)[0, -1] + h(s_ba)[0, -1]),
                               rtol=1e-5, atol=1e-6)


def test_multiple_choice_gives_one_logit_per_choice_and_its_loss_normalises_over_the_choices():
    model = _classifier("multiple_choice", lm_coef=0.0).eval()
    examples = [([1, 2, 3], [[4], [5, 6], [7, 8, 9], [10]]), ([11], [[12, 13], [14], [15], [16, 17]])]
    idx, mask = ft.collate([ft.transform("multiple_choice", e, 32, SP) for e in examples])
    labels = torch.tensor([2, 0])
    logits, loss = model(idx, mask, labels)
    assert logits.shape == (2, 4)
    for b, (ctx, choices) in enumerate(examples):  # each choice's logit on its own
        for k, c in enumerate(choices):
            s = torch.tensor([[100] + ctx + [101] + c + [102]])
            torch.testing.assert_close(logits[b, k], model.clf(model.transformer.hidden_states(s)[0, -1])[0],
                                       rtol=1e-5, atol=1e-6)
    expected = -(logits.log_softmax(-1)[0, 2] + logits.log_softmax(-1)[1, 0]) / 2  # softmax over k
    torch.testing.assert_close(loss, expected)


def test_multiple_choice_dropout_mask_is_shared_by_the_choices_of_an_example():
    model = _classifier("multiple_choice", clf_pdrop=0.5).train()
    same = ft.transform("multiple_choice", ([1, 2], [[3, 4]] * 4), 32, SP)  # four identical choices
    idx, mask = ft.collate([same, same])
    logits, _ = model(idx, mask)
    assert torch.equal(logits[:, 1:], logits[:, :1].expand(-1, 3))  # one mask for the four
    assert not torch.equal(logits[0], logits[1])  # but a different mask for the next example


def test_classifier_dropout_zeroes_features_and_scales_the_rest_by_one_over_keep():
    # W_y the identity (n_class = n_embd = 32, bias 0): the logits are h_clf itself, dropped out.
    model = _classifier("classification", n_class=32, clf_pdrop=0.25)
    with torch.no_grad():
        model.clf.weight.copy_(torch.eye(32))
    seqs = [ft.transform("classification", ([1 + i, 2, 3 + i],), 32, SP) for i in range(40)]
    idx, mask = ft.collate(seqs)
    want = model.eval()(idx, mask)[0]  # (40, 32): the hidden states at _classify_
    got = model.train()(idx, mask)[0]  # the Transformer's own dropout is 0 (cpu-tiny)
    dropped = got == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.05, dropped.float().mean()
    torch.testing.assert_close(got[~dropped], want[~dropped] / 0.75)


# --- L3 = L2 + λ·L1 ---------------------------------------------------------------------------------------

def test_lm_coef_adds_lambda_times_the_lm_loss_on_the_real_tokens_of_the_transformed_sequences():
    seqs = [ft.transform("entailment", ([1, 2, 3], [4, 5]), 32, SP), ft.transform("entailment", ([6], [7]), 32, SP)]
    idx, mask = ft.collate(seqs)
    labels = torch.tensor([1, 0])
    torch.manual_seed(0)
    model = _classifier("entailment", lm_coef=0.0).eval()
    logits, l2 = model(idx, mask, labels)
    torch.testing.assert_close(l2, F.cross_entropy(logits, labels))  # λ = 0: the task loss alone
    # L1 independently: GPT1's own LM loss on each sequence alone (no padding), averaged over sequences.
    l1 = sum(model.transformer(torch.tensor([s[0][:-1]]), torch.tensor([s[0][1:]]))[1] for s in seqs) / 2
    for lam in (0.5, 2.0):
        model.config.lm_coef = lam
        _, l3 = model(idx, mask, labels)
        torch.testing.assert_close(l3, l2 + lam * l1, rtol=1e-5, atol=1e-6)
    _, clf_loss, lm_loss = model.losses(idx, mask, labels)
    torch.testing.assert_close(lm_loss, l1, rtol=1e-5, atol=1e-6)


def test_labels_out_of_range_raise_a_clear_error():
    model = _classifier("classification", n_class=3).eval()
    idx, mask = ft.collate([[[100, 5, 102]], [[100, 1, 2, 102]]])
    for bad in ([0, 3], [-1, 1]):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got values in \[" + str(min(bad))):
            model(idx, mask, torch.tensor(bad))
    with pytest.raises(TypeError, match="labels must hold integer class ids"):
        model(idx, mask, torch.tensor([0.0, 1.7]))


def test_the_lm_loss_does_not_see_the_padding():
    model = _classifier("classification", lm_coef=1.0).eval()
    idx, mask = ft.collate([[[100, 5, 102]], [[100, 1, 2, 3, 4, 5, 6, 102]]])
    labels = torch.tensor([0, 1])
    _, loss = model(idx, mask, labels)
    idx[0, 0, 3:] = 77
    torch.testing.assert_close(model(idx, mask, labels)[1], loss, rtol=0, atol=0)


# --- task files -----------------------------------------------------------------------------------------

def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_jsonl_examples_are_read_for_each_task(tmp_path):
    p = _write(tmp_path / "c.jsonl", ['{"text": "a b", "label": 1}', "", '{"text": "c", "label": 0}'])
    assert ft.read_jsonl(p, "classification") == [(("a b",), 1), (("c",), 0)]
    p = _write(tmp_path / "m.jsonl", ['{"context": "x", "choices": ["y", "z"], "label": 1}'])
    assert ft.read_jsonl(p, "multiple_choice") == [(("x", ["y", "z"]), 1)]
    bom = tmp_path / "bom.jsonl"    # a byte order mark before the first line (some Windows editors write one)
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a b", "label": 1}\n')
    assert ft.read_jsonl(str(bom), "classification") == [(("a b",), 1)]


@pytest.mark.parametrize("task,bad,message", [
    ("classification", '{"text": "a", "label": 1', "not valid JSON"),
    ("classification", '{"text": "a"}', "missing field 'label'"),
    ("entailment", '{"premise": "a", "label": 0}', "missing field 'hypothesis'"),
    ("classification", '{"text": 3, "label": 0}', "'text' must be a string"),
    ("classification", '{"text": "a", "label": -1}', "out of range"),
    ("classification", '{"text": "a", "label": "pos"}', "must be an integer"),
    ("similarity", '{"a": "x", "b": "y", "label": 2}', "out of range"),
    ("multiple_choice", '{"context": "x", "choices": ["a", "b"], "label": 2}', "out of range"),
    ("multiple_choice", '{"context": "x", "choices": ["a", "b", "c"], "label": 0}', "same number"),
    ("classification", '["a", 1]', "JSON object"),
    ("classification", '{"text": "  ", "label": 0}', "field 'text' is empty"),
    ("multiple_choice", '{"context": "x", "choices": ["a", ""], "label": 0}', "field 'choices' is empty"),
    ("classification", '{"text": "a \\ud800 b", "label": 0}', "field 'text' holds an unpaired surrogate"),
    ("multiple_choice", '{"context": "x", "choices": ["a", "\\udfff"], "label": 0}', "'choices' holds an unpaired"),
    ("classification", "[" * 100_000, "nested too deeply"),
])
def test_a_malformed_jsonl_line_is_reported_with_its_file_and_line_number(tmp_path, task, bad, message):
    good = {"classification": '{"text": "ok", "label": 0}', "entailment": '{"premise": "p", "hypothesis": "h", "label": 0}',
            "similarity": '{"a": "x", "b": "y", "label": 1}',
            "multiple_choice": '{"context": "c", "choices": ["a", "b"], "label": 1}'}[task]
    p = _write(tmp_path / "task.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=message) as e:
        ft.read_jsonl(p, task)
    assert str(e.value).startswith(f"{p}:3: ") and "\n" not in str(e.value)


def test_an_empty_or_missing_or_non_utf8_task_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="no examples"):
        ft.read_jsonl(str(tmp_path / "empty.jsonl"), "classification")
    with pytest.raises(DataError, match="no such task file"):
        ft.read_jsonl(str(tmp_path / "nope.jsonl"), "classification")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8"):
        ft.read_jsonl(str(tmp_path / "latin1.jsonl"), "classification")


# --- built-in tasks -------------------------------------------------------------------------------------

def _fake_corpus():
    """The 42 works' names with made-up lines: each line names its work and its number."""
    docs = []
    for w in sorted(ft.GENRE_OF_WORK):
        lines = []
        for i in range(120):
            lines += [f"SPEAKER{i % 3}.", f"{w} says line number {i} here"]
            if i == 60:
                lines += ["[Enter a messenger", "and some lords.]"]
        docs.append((w, "\n".join(lines)))
    return docs


@pytest.mark.parametrize("task", ft.TASKS)
def test_builtin_tasks_are_deterministic_and_hold_out_the_tail_of_every_work(task):
    docs = _fake_corpus()
    sizes = {"train": 300, "val": 100}
    train, val = ft.builtin_task(task, seed=3, docs=docs, sizes=sizes)
    assert (train, val) == ft.builtin_task(task, seed=3, docs=docs, sizes=sizes)
    assert train != ft.builtin_task(task, seed=4, docs=docs, sizes=sizes)[0]
    assert len(train) == 300 and len(val) == 100

    def lines(example):
        parts = example[0]
        flat = [p for part in parts for p in (part if isinstance(part, list) else [part])]
        return {line for p in flat for line in p.split("\n")}

    train_lines = set().union(*map(lines, train))
    val_lines = set().union(*map(lines, val))
    assert not train_lines & val_lines  # no leakage
    numbers = {int(line.split()[-2]) for line in val_lines}
    assert min(numbers) >= 100  # the val lines are each work's last 10%
    assert not any("SPEAKER" in line or "Enter" in line or "lords" in line for line in train_lines)
    for parts, label in train[:50]:
        if task == "classification":
            work = parts[0].split()[0]
            assert ft.GENRES[label] == ft.GENRE_OF_WORK[work]
        elif task == "entailment":
            (wa, *_, na, _), (wb, *_, nb, _) = (p.split() for p in parts)
            assert label == (wa == wb and int(nb) == int(na) + 1)
        elif task == "similarity":
            assert label == (parts[0].split()[0] == parts[1].split()[0])
        else:
            last = int(parts[0].split("\n")[-1].split()[-2])
            assert [int(c.split()[-2]) == last + 1 for c in parts[1]].index(True) == label
    counts = [sum(1 for _, y in train if y == k) for k in range(4 if task in ("classification", "multiple_choice") else 2)]
    assert min(counts) > 0.6 * max(counts)  # roughly balanced


# --- training end to end ----------------------------------------------------------------------------------

def _separable_task(tmp_path, n_train=320, n_val=80):
    """Label 1 iff the text holds one of a few 'marker' words; the other words are shared noise."""
    rng = random.Random(0)
    noise = "the of and to in that is was he for it with as his on be at by".split()
    markers = "apple pear plum".split()
    (tmp_path).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for _ in range(n):
            words = rng.choices(noise, k=rng.randint(4, 8))
            label = rng.randrange(2)
            if label:
                words.insert(rng.randrange(len(words) + 1), rng.choice(markers))
            rows.append(json.dumps({"text": " ".join(words), "label": label}))
        _write(tmp_path / f"{split}.jsonl", rows)
    return str(tmp_path)


def _tiny_run(data, out_dir, **kw):
    return {**dict(task="classification", task_data=data, out_dir=str(out_dir), preset="cpu-tiny", vocab_size=60,
                   batch_size=32, learning_rate=3e-3, log_interval=1000), **kw}


def test_a_tiny_finetune_from_scratch_beats_chance_on_a_separable_task(tmp_path):
    data = _separable_task(tmp_path / "data")
    record = ft.finetune(_tiny_run(data, tmp_path / "out", epochs=4), print_fn=lambda *a: None)
    assert record["iter"] == 40 and record["val_accuracy"] >= 0.9  # chance: 50%
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["iter"] for r in log] == [0, 10, 20, 30, 40] and all("val_accuracy" in r for r in log)


def test_a_fresh_run_in_a_finetuning_out_dir_is_refused_unless_overwrite_and_sample_refuses_it(tmp_path):
    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    out = tmp_path / "out"
    quiet = lambda *a: None  # noqa: E731
    ft.finetune(_tiny_run(data, out, epochs=1), print_fn=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ft.FinetuneError, match=r"already holds a checkpoint: pass --resume True to continue it, "
                                                r"choose another --out_dir, or pass --overwrite True to start over"):
        ft.finetune(_tiny_run(data, out, epochs=2), print_fn=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    ft.finetune(_tiny_run(data, out, epochs=2, overwrite=True), print_fn=quiet)  # a new run: its own log only
    assert [json.loads(line)["iter"] for line in open(out / "log.jsonl")] == [0, 2, 4]
    # train_gpt1.py --sample True samples from pre-training runs: one line, not a state_dict traceback
    train_gpt1 = load_script("train_gpt1")
    with pytest.raises(train_gpt1.UserError) as info:
        train_gpt1.main(["--sample", "True", "--out_dir", str(out)])
    assert str(info.value) == f"--sample True: {out}/ckpt.pt is a fine-tuning checkpoint; sample from a pre-training run"


def test_a_finetune_in_an_out_dir_that_another_run_uses_is_refused(tmp_path):
    from script_helpers import OutDirLockHolder

    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    out = tmp_path / "out"
    out.mkdir()
    with OutDirLockHolder(out), pytest.raises(ft.FinetuneError, match="is in use: another run holds its lock"):
        ft.finetune(_tiny_run(data, out, epochs=1), print_fn=lambda *a: None)
    assert [p.name for p in out.iterdir()] == [".lock"]
    ft.finetune(_tiny_run(data, out, max_iters=1), print_fn=lambda *a: None)
    with OutDirLockHolder(out):   # the run in this process has ended: its lock is free
        pass
    from script_helpers import locked_elsewhere

    new, seen = tmp_path / "new", []   # a run into a new out_dir holds its lock while it runs
    ft.finetune(_tiny_run(data, new, max_iters=2, eval_interval=1),
                print_fn=lambda *a: seen.append(locked_elsewhere(new)) if not seen else None)
    assert seen == [True]
    with OutDirLockHolder(new), pytest.raises(ft.FinetuneError, match="is in use"):   # and so does a resumed one
        ft.finetune(_tiny_run(data, new, max_iters=4, resume=True), print_fn=lambda *a: None)


def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = _separable_task(tmp_path / "data", n_train=96, n_val=32)
    opts = dict(epochs=3, eval_interval=2, lm_coef=0.5, clf_pdrop=0.1, dropout=0.1)
    quiet = lambda *a: None  # noqa: E731
    whole = ft.finetune(_tiny_run(data, tmp_path / "a", **opts), print_fn=quiet)

    real_lr_at = ft.lr_at

    def crash_at_5(it, total, o):
        if it == 5:
            raise KeyboardInterrupt  # after the checkpoint of step 4, before step 5
        return real_lr_at(it, total, o)

    monkeypatch.setattr(ft, "lr_at", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(_tiny_run(data, tmp_path / "b", **opts), print_fn=quiet)
    monkeypatch.setattr(ft, "lr_at", real_lr_at)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iter_num"] == 4
    # The resumed run is the checkpoint's: another task, task file, class count or starting point is refused,
    # with nothing changed (before: a state_dict traceback, or silently training on under the other option).
    other = _separable_task(tmp_path / "other", n_train=96, n_val=32)
    before = (tmp_path / "b" / "ckpt.pt").read_bytes()
    for name, value in (("task", "entailment"), ("task_data", other), ("n_class", 3), ("init_from", str(tmp_path / "a"))):
        with pytest.raises(ft.FinetuneError, match=f"^--resume True: --{name} .* differs from the run in "):
            ft.finetune(dict(out_dir=str(tmp_path / "b"), resume=True, **{name: value}), print_fn=quiet)
    with pytest.raises(ft.FinetuneError, match="^--resume True: --preset cpu-small differs from the run in "):
        ft.finetune(dict(out_dir=str(tmp_path / "b"), resume=True, preset="cpu-small"), print_fn=quiet)
    # An edited task file behind the same path is refused too (its examples' digest is in the checkpoint).
    train_file = os.path.join(data, "train.jsonl")
    original = open(train_file, "rb").read()
    with open(train_file, "ab") as f:
        f.write(b'{"text": "apple one more", "label": 1}\n')
    with pytest.raises(ft.FinetuneError, match=f"^--resume True: the examples of --task_data {data} are not those the run in "):
        ft.finetune(dict(out_dir=str(tmp_path / "b"), resume=True), print_fn=quiet)
    open(train_file, "wb").write(original)
    assert (tmp_path / "b" / "ckpt.pt").read_bytes() == before
    # train_gpt1.py --resume True (no --task) finds the fine-tuning run from its checkpoint alone; the shape
    # options may be repeated with the checkpoint's values
    load_script("train_gpt1").main(["--resume", "True", "--out_dir", str(tmp_path / "b"), "--preset", "cpu-tiny",
                                    "--vocab_size", "60"])
    resumed = json.loads(open(tmp_path / "b" / "log.jsonl").readlines()[-1])
    assert resumed == whole
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert open(tmp_path / "a" / "log.jsonl").read() == open(tmp_path / "b" / "log.jsonl").read()


def test_resume_applies_this_runs_weight_decay_and_betas(tmp_path):
    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    quiet = lambda *a: None  # noqa: E731
    ft.finetune(_tiny_run(data, tmp_path / "out", epochs=1), print_fn=quiet)
    ft.finetune(dict(out_dir=str(tmp_path / "out"), resume=True, epochs=2, weight_decay=0.3, beta1=0.7, beta2=0.95),
                print_fn=quiet)
    groups = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]
    assert all(tuple(g["betas"]) == (0.7, 0.95) for g in groups)


def test_a_damaged_model_config_is_one_line_on_resume_and_init_from(tmp_path):
    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    quiet = lambda *a: None  # noqa: E731
    ft.finetune(_tiny_run(data, tmp_path / "out", epochs=1), print_fn=quiet)
    ckpt_path = tmp_path / "out" / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model_config"]["resid_pdrop"] = float("nan")
    torch.save(ckpt, ckpt_path)
    with pytest.raises(ft.FinetuneError, match=r"^--resume True: .*ckpt.pt is damaged \(its model_config: "
                                               r"GPT1Config: resid_pdrop must be a number in \[0, 1\], got nan\)$"):
        ft.finetune(dict(out_dir=str(tmp_path / "out"), resume=True, epochs=2), print_fn=quiet)
    with pytest.raises(ft.FinetuneError, match="is damaged \\(its model_config: GPT1Config: resid_pdrop"):
        ft.model_from_checkpoint(ckpt, str(ckpt_path), "--init_from")


def test_lr_schedule_is_opt_py_warmup_linear():
    # opt.py: lrt *= schedule(t / t_total), t the updates made so far, with
    # warmup_linear(x, warmup) = (s*(x/warmup) + (1-s))*(1-x), s = (x <= warmup).
    def warmup_linear(x, warmup):
        s = 1.0 if x <= warmup else 0.0
        return (s * (x / warmup) + (1 - s)) * (1 - x)

    for total, warmup in ((1000, 0.002), (10, 0.3), (37, 0.002)):
        opts = {"learning_rate": 6.25e-5, "warmup_fraction": warmup}
        got = [ft.lr_at(t, total, opts) for t in range(total)]
        assert got == pytest.approx([6.25e-5 * warmup_linear(t / total, warmup) for t in range(total)], rel=1e-12, abs=0)
    assert ft.lr_at(0, 100, {"learning_rate": 1.0, "warmup_fraction": 0.0}) == 1.0  # no warmup (opt.py: 0/0)
    # Pinned values (lr 1, 10% warmup of 1000 updates): 0 at the start, half-way up at 5% (times 1 - 0.05),
    # the top at the end of the warmup (times 1 - 0.1), then the straight line down to 0: 0.5 half-way.
    opts = {"learning_rate": 1.0, "warmup_fraction": 0.1}
    assert [ft.lr_at(t, 1000, opts) for t in (0, 50, 100, 101, 500, 999)] == \
        pytest.approx([0.0, 0.475, 0.9, 0.899, 0.5, 0.001], rel=1e-12, abs=1e-15)
    assert ft.lr_at(500, 1000, {"learning_rate": 1.0, "warmup_fraction": 0.0}) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(n_class=1), "--n_class must be at least 2"),
    (dict(learning_rate=float("nan")), "--learning_rate must be a finite number >= 0"),
    (dict(learning_rate=-1e-3), "--learning_rate must be a finite number >= 0"),
    (dict(learning_rate=1e39), "--learning_rate 1e+39 is beyond float32's range"),
    (dict(weight_decay=1e39), "--weight_decay 1e+39 is beyond float32's range"),
    (dict(device="gpu"), "--device gpu: choose auto, cpu, cuda or cuda:N"),
    (dict(batch_size=0), "--batch_size must be a positive integer"),
    (dict(epochs=0), "--epochs must be a positive integer"),
    (dict(max_iters=0), "--max_iters must be a positive integer"),
    (dict(eval_interval=0), "--eval_interval must be a positive integer"),
    (dict(log_interval=0), "--log_interval must be a positive integer"),
    (dict(warmup_fraction=2.0), "--warmup_fraction must be in [0, 1]"),
    (dict(seed=-1), "--seed must be an integer in [0, 2**64), got -1"),
    (dict(seed=2**64), "--seed must be an integer in"),
    (dict(grad_clip=float("nan")), "--grad_clip must be a finite number"),
    (dict(resume=True, overwrite=True), "pass one of them"),
    (dict(grad_clip=-1.0), "--grad_clip must be a finite number >= 0 (0: off)"),
])
def test_bad_options_are_refused_before_any_work(bad, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ft.FinetuneError) as info:  # the task file does not even exist: nothing was read
        ft.finetune(_tiny_run(str(tmp_path / "missing.jsonl"), out, **bad), print_fn=lambda *a: None)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_checkpoints_are_fsynced_before_the_rename_and_bad_ones_are_one_line(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = ft.os.fsync, ft.os.replace
    monkeypatch.setattr(ft.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ft.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    path = str(tmp_path / "ckpt.pt")
    ft.save_checkpoint(path, {"model": {}, "model_config": {}, "options": {}, "iter_num": 3})
    assert calls == ["fsync", "replace"]
    assert ft.load_checkpoint(path, "--resume True")["iter_num"] == 3
    with pytest.raises(ft.FinetuneError, match="is a pre-training checkpoint, not a fine-tuning one"):
        ft.load_checkpoint(path, "--resume True", kind="fine-tuning")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(ft.FinetuneError) as info:
        ft.load_checkpoint(path, "--resume True")
    assert str(info.value).startswith(f"--resume True: cannot read {path} (") and "\n" not in str(info.value)


# --- through train_gpt1.py ------------------------------------------------------------------------------

def test_train_gpt1_finetunes_a_pretrained_run_and_reports_a_bad_task_file_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    env.pop("RANK", None)

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(root, "train_gpt1.py"), *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)

    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(json.loads(line)["text"] for line in open(tmp_path / "data" / "train.jsonl")) * 4)
    pre = run("--data", str(corpus), "--out_dir", str(tmp_path / "pre"), "--preset", "cpu-tiny", "--vocab_size", "60",
              "--max_iters", "2", "--eval_iters", "1", "--max_new_tokens", "0")
    assert pre.returncode == 0, pre.stderr[-2000:]
    # cpu-tiny warms up over 10 steps, longer than this whole run: said once, at the start
    assert pre.stderr.strip() == ("train_gpt1.py: warning: --warmup_iters 10 is longer than --max_iters 2: "
                                  "the learning rate never reaches --learning_rate 0.003")

    # a tokenizer beside ckpt.pt (left by an earlier fine-tuning run in that out_dir) is not the checkpoint's
    (tmp_path / "pre" / "vocab.json").write_text('{"a</w>": 0}')
    (tmp_path / "pre" / "merges.txt").write_text("#version: 0.2\n")
    # lr 0: the fine-tuned Transformer must still be exactly the pre-trained one, plus three rows
    ft_run = run("--task", "classification", "--task_data", data, "--init_from", str(tmp_path / "pre"),
                 "--out_dir", str(tmp_path / "ft"), "--learning_rate", "0", "--max_iters", "2", "--batch_size", "16")
    assert ft_run.returncode == 0, ft_run.stderr[-2000:]
    pre_sd = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=True)["model"]
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    for k, v in pre_sd.items():
        w = ckpt["model"]["transformer." + k]
        assert torch.equal(w[:v.shape[0]], v), k
    assert ckpt["model"]["transformer.tokens_embed.weight"].shape[0] == pre_sd["tokens_embed.weight"].shape[0] + 3
    assert "val_accuracy" in json.loads(open(tmp_path / "ft" / "log.jsonl").readlines()[-1])
    # fine-tuning into the pre-training run's own out_dir would delete the checkpoint it starts from
    before = (tmp_path / "pre" / "ckpt.pt").read_bytes()
    same = run("--task", "classification", "--task_data", data, "--init_from", str(tmp_path / "pre"),
               "--out_dir", str(tmp_path / "pre"), "--overwrite", "True", "--max_iters", "2")
    assert same.returncode == 1 and "is --init_from's run" in same.stderr and same.stderr.count("\n") == 1
    assert (tmp_path / "pre" / "ckpt.pt").read_bytes() == before

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b", "label": 0}\n{"text": "c d", "label": 1}\n{"text": "e", "lab": 1}\n')
    err = run("--task", "classification", "--task_data", str(bad), "--out_dir", str(tmp_path / "bad"))
    assert err.returncode == 1
    assert err.stderr.strip() == f"train_gpt1.py: error: {bad}:3: missing field 'label' (a classification example has text, label)"


def test_finetuning_dropout_reaches_a_lightconv_models_dropconnect(tmp_path):
    # --dropout in fine-tuning means what it means in pre-training: every dropout, LightConv's DropConnect too
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the apple and the pear were on the plum tree in the garden .\n" * 200)
    load_script("train_gpt1").main(["--data", str(corpus), "--out_dir", str(tmp_path / "pre"), "--preset", "cpu-tiny",
                                    "--arch", "lightconv", "--vocab_size", "60", "--max_iters", "1", "--eval_iters", "1",
                                    "--max_new_tokens", "0", "--warmup_iters", "0"])
    model, _ = ft._pretrained(str(tmp_path / "pre"), {"dropout": 0.3})
    convs = [m for m in model.modules() if isinstance(m, ft.LightweightConv1d)]
    assert convs and all(m.weight_dropout == 0.3 for m in convs) and model.config.weight_dropout == 0.3
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_classifier_refuses_a_bad_mask_or_number_of_sequences():
    from minilm.gpt1 import GPT1, GPT1Config
    base = GPT1(GPT1Config(vocab_size=40, n_ctx=16, n_embd=32, n_head=2, n_layer=1))
    with pytest.raises(ValueError, match="n_class must be an integer >= 2"):
        ft.GPT1Classifier(base, ft.TaskConfig(task="classification", n_class=1))
    clf = ft.GPT1Classifier(base, ft.TaskConfig(task="classification", n_class=3))
    idx = torch.full((2, 1, 5), 39)  # every token _classify_ (the last id): a valid sequence end anywhere
    mask = torch.ones(2, 1, 5)
    clf.losses(idx, mask)
    with pytest.raises(ValueError, match="mask must hold 0"):
        clf.losses(idx, mask * 2)
    with pytest.raises(ValueError, match="got K = 2"):
        clf.losses(idx.repeat(1, 2, 1), mask.repeat(1, 2, 1))


def test_labels_too_large_for_a_classifier_head_are_one_line(tmp_path):
    rows = [json.dumps({"text": f"some words {i}", "label": 10**12 if i == 3 else i % 2}) for i in range(40)]
    _write(tmp_path / "task.jsonl", rows)
    with pytest.raises(ft.FinetuneError, match="more than a classifier head holds"):
        ft.finetune(_tiny_run(str(tmp_path / "task.jsonl"), tmp_path / "out", epochs=1), print_fn=lambda *a: None)


# -- the fine-tuning loop's parts, each checked by what it must do to a run ---------------------------------

def _quiet(*args):
    pass


def test_each_epoch_visits_every_example_once_in_a_new_order_partial_batch_included(tmp_path, monkeypatch):
    # 100 examples in batches of 32: an epoch is 4 steps, the last of 4 examples; two epochs, two orders.
    import inspect

    data = _separable_task(tmp_path / "data", n_train=100, n_val=32)
    batches, collate = [], ft.collate

    def recording(batch, device="cpu"):
        if inspect.stack()[1].function == "train_batch":  # not the evaluations' batches
            batches.append([tuple(map(tuple, example)) for example in batch])
        return collate(batch, device)

    monkeypatch.setattr(ft, "collate", recording)
    record = ft.finetune(_tiny_run(data, tmp_path / "out", epochs=2), print_fn=_quiet)
    assert record["iter"] == 8 and [len(b) for b in batches] == [32, 32, 32, 4] * 2
    first, second = sum(batches[:4], []), sum(batches[4:], [])
    assert len(set(first)) == 100 and sorted(first) == sorted(second) and first != second


def test_the_auxiliary_lm_loss_weight_is_lm_coef(tmp_path):
    # L3 = L2 + λ·L1 (paper eq. 5), with the λ given
    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    record = ft.finetune(_tiny_run(data, tmp_path / "out", epochs=1, lm_coef=2.0), print_fn=_quiet)
    assert record["train_loss"] == pytest.approx(record["train_clf_loss"] + 2.0 * record["train_lm_loss"], rel=1e-5)


def test_weight_decay_acts_on_matrices_only(tmp_path):
    # lr · weight_decay = 1 zeroes every decayed weight in one step, then Adam's first step moves each by at
    # most lr: matrices (the classifier's too) end within lr of 0, LayerNorm gains within lr of 1.
    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    lr = 1e-3
    ft.finetune(_tiny_run(data, tmp_path / "out", max_iters=1, eval_interval=1, learning_rate=lr, weight_decay=1 / lr,
                          warmup_fraction=0.0), print_fn=_quiet)
    assert_decayed_on_matrices_only(torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"], lr)


def test_evaluation_runs_without_dropout(tmp_path):
    # learning rate 0, dropout 0.5 in training: every evaluation must score the same (eval mode)
    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    ft.finetune(_tiny_run(data, tmp_path / "out", max_iters=3, eval_interval=1, learning_rate=0.0, dropout=0.5,
                          clf_pdrop=0.5), print_fn=_quiet)
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert len(log) == 4 and len({r["val_loss"] for r in log}) == 1, log


def test_gradients_are_clipped(tmp_path):
    # A clip norm of 1e-12 leaves Adam's updates ~1e-4 of the learning rate (eps dominates): two steps at lr 1e-2
    # must leave the weights where a run at lr 0 leaves them, to 1e-4.
    data = _separable_task(tmp_path / "data", n_train=64, n_val=32)
    opts = dict(max_iters=2, eval_interval=2, weight_decay=0.0, warmup_fraction=0.0)
    ft.finetune(_tiny_run(data, tmp_path / "a", learning_rate=0.0, **opts), print_fn=_quiet)
    ft.finetune(_tiny_run(data, tmp_path / "b", learning_rate=1e-2, grad_clip=1e-12, **opts), print_fn=_quiet)
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"] for run in ("a", "b"))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4


def test_the_seed_may_take_64_bits(tmp_path):
    # torch.manual_seed takes any seed below 2**64; runs saved with such a seed must resume
    with pytest.raises(DataError) as info:   # the task file is missing: the seed passed the checks
        ft.finetune(_tiny_run(str(tmp_path / "missing.jsonl"), tmp_path / "out", seed=2**64 - 1), print_fn=lambda *a: None)
    assert "--seed" not in str(info.value)


def test_int32_labels_are_class_ids_too():
    model = _classifier("classification", n_class=3).eval()
    idx, mask = ft.collate([[[100, 5, 102]], [[100, 1, 2, 102]]])
    torch.testing.assert_close(model(idx, mask, torch.tensor([0, 2], dtype=torch.int32))[1],
                               model(idx, mask, torch.tensor([0, 2]))[1])


def test_a_model_config_with_an_unknown_field_is_damaged():
    with pytest.raises(ft.FinetuneError, match="is damaged \\(its model_config"):
        ft.model_from_checkpoint({"model_config": {"bogus": 1}, "model": {}}, "x/ckpt.pt", "--init_from")


def test_an_out_dir_that_links_to_init_from_is_refused_too(tmp_path):
    (tmp_path / "pre").mkdir()
    os.symlink(tmp_path / "pre", tmp_path / "link")
    with pytest.raises(ft.FinetuneError, match="is --init_from's run"):
        ft.finetune(_tiny_run(str(tmp_path / "t.jsonl"), tmp_path / "pre", init_from=str(tmp_path / "link"),
                              overwrite=True), print_fn=lambda *a: None)
