"""train_elmo.py end to end, as a user runs it: subprocesses on a small corpus the tests write themselves.
Checks that stop before any training call its main() in this process, which is much faster."""
import copy
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import torch
from script_helpers import OutDirLockHolder, kill_at_first_checkpoint, locked_while_running, load_script, read_log, script_env, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_elmo.py")
# a small, fast run: the tiny preset on 8 rows of 8 tokens
SMALL = ["--preset", "tiny", "--batch_size", "8", "--unroll_steps", "8", "--eval_iters", "2",
         "--log_interval", "1000", "--device", "cpu"]
# the shared run (and its resumed copy) draw random numbers every iteration: dropout masks, and the
# sampled softmax's candidates (16 of the corpus's ~30 softmax words). A resumed run matches the
# uninterrupted one only if each iteration reseeds them (without the reseed, either one alone fails it).
RANDOM = ["--dropout", "0.2", "--n_negative_samples", "16"]

train_elmo = load_script("train_elmo")


def run(*args, check=True, **kw):
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                       timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train_elmo.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Sentences from a little grammar: predictable enough that a biLM's loss visibly falls. Their lengths
    vary (5 to 10 words), so the rows of a batch draw their next sentences at different steps."""
    rng = random.Random(0)
    subjects = ["The king", "A fool", "My lord", "The queen", "Her daughter", "That knave"]
    adverbs = ["", "", "truly ", "never ", "surely still "]
    verbs = ["loves", "fears", "betrays", "serves", "mocks", "follows"]
    objects = ["the crown", "his brother", "the sea", "a play", "the night", "our cause"]
    ends = ["", "", " tonight", " in the end"]
    lines = [f"{rng.choice(subjects)} {rng.choice(adverbs)}{rng.choice(verbs)} {rng.choice(objects)}{rng.choice(ends)} ."
             for _ in range(3000)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One uninterrupted run, shared by the tests below."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    p = run("--data", corpus, "--out_dir", out, "--max_iters", "40", "--eval_interval", "10", *SMALL, *RANDOM)
    assert "sampled (16) softmax in training" in p.stdout
    return out


def test_loss_falls_and_every_evaluation_is_logged(trained):
    log = read_log(trained)
    assert [r["iter"] for r in log] == [0, 10, 20, 30, 40]
    for r in log:
        assert set(r) == {"iter", "train_loss", "val_loss", "val_ppl_fwd", "val_ppl_bwd", "val_ppl"}
        assert r["val_ppl"] == pytest.approx(np.exp(r["val_loss"]))
        assert r["val_ppl"] == pytest.approx(np.sqrt(r["val_ppl_fwd"] * r["val_ppl_bwd"]))   # exp of the mean loss
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5      # 3.65 → 2.80 nats in 40 steps
    ckpt = load_ckpt(trained)                                                # weights_only=True loads it
    assert ckpt["iter"] == 40 and ckpt["vocab"][:3] == ["<S>", "</S>", "<UNK>"]
    forward, backward = ckpt["streams"]                     # two streams, each in its own order
    assert forward["sentence"] != backward["sentence"] and len(forward["sentence"]) == 8


def bilm_tf_batches(sentences, rows, T, orders):
    """bilm-tf's _get_batch (bilm/data.py) written out as it is: each row keeps a list of the rest of its
    sentence's tokens, takes (input, next) pairs from it, and draws the next sentence (from `orders`, one
    list per pass) once one token is left. Yields (inputs, targets), each rows × T words."""
    supply = (sentences[i] for order in orders for i in order)
    current = [None] * rows
    while True:
        inputs, targets = [], []
        for r in range(rows):
            xs, ys = [], []
            while len(xs) < T:
                if current[r] is None or len(current[r]) <= 1:
                    current[r] = list(next(supply))
                n = min(len(current[r]) - 1, T - len(xs))
                xs += current[r][:n]
                ys += current[r][1:n + 1]
                current[r] = current[r][n:]
            inputs.append(xs)
            targets.append(ys)
        yield inputs, targets


def test_sentence_streams_make_bilm_tfs_batches_in_both_directions():
    # sentences of 1 to 6 words, 3 rows of 4 steps: rows draw sentences in turn, a sentence runs on into the
    # next batch, and 40 batches go through the 13 sentences several times, each pass in a new order
    rng = np.random.default_rng(0)
    sentences = [[f"w{i}_{k}" for k in range(rng.integers(1, 7))] for i in range(13)]
    words, lengths = train_elmo.direction_words(sentences)
    assert words[0][:len(sentences[0]) + 2] == ["<S>", *sentences[0], "</S>"]
    assert words[1][:len(sentences[0]) + 2] == ["</S>", *sentences[0][::-1], "<S>"]
    for d, seed in ((0, (7, 0)), (1, (7, 1))):
        stream = train_elmo.SentenceStream(lengths, 3, seed)
        orders = [np.random.default_rng([*seed, e]).permutation(13).tolist() for e in range(40)]
        assert orders[0] != orders[1]
        as_read = [["<S>", *s, "</S>"] if d == 0 else ["</S>", *s[::-1], "<S>"] for s in sentences]
        expected = bilm_tf_batches(as_read, 3, 4, orders)
        for _ in range(40):
            index = stream.next_batch(4)
            inputs, targets = next(expected)
            assert [[words[d][i] for i in row] for row in index] == inputs
            assert [[words[d][i + 1] for i in row] for row in index] == targets
        assert stream.epoch >= 3


def test_a_stream_goes_on_from_its_state_dict():
    stream = train_elmo.SentenceStream([3, 5, 4, 7], 2, (1, 0))
    for _ in range(5):
        stream.next_batch(3)
    copy = train_elmo.SentenceStream([3, 5, 4, 7], 2, (1, 0))
    copy.load_state_dict(stream.state_dict())
    for _ in range(10):
        np.testing.assert_array_equal(copy.next_batch(3), stream.next_batch(3))


def test_a_stream_refuses_sentences_it_could_never_step_through():
    # a sentence shorter than its two markers has no (input, target) pair (length 0 would make next_batch step
    # backwards), and with no sentence at all there is nothing to draw
    for lengths in ([], [3, 1, 4], [0]):
        with pytest.raises(ValueError, match="at least"):
            train_elmo.SentenceStream(lengths, 2, (0, 0))
    assert train_elmo.SentenceStream([2], 1, (0, 0)).next_batch(3).tolist() == [[0, 0, 0]]


def test_the_forward_lm_never_reads_the_end_marker_nor_the_backward_lm_the_start_marker():
    # bilm-tf's targets: the forward LM reads <S> a b and predicts a b </S>, the backward reads </S> b a
    # and predicts b a <S>; no target is a free marker-after-marker guess
    words, lengths = train_elmo.direction_words([["a", "b"], ["c"]])
    assert words == [["<S>", "a", "b", "</S>", "<S>", "c", "</S>"], ["</S>", "b", "a", "<S>", "</S>", "c", "<S>"]]
    stream = train_elmo.SentenceStream(lengths, 1, (0, 0))
    stream.order = np.array([0, 1])                     # this pass: "a b", then "c"
    index = stream.next_batch(5)[0]
    assert [words[0][i] for i in index] == ["<S>", "a", "b", "<S>", "c"]
    assert [words[0][i + 1] for i in index] == ["a", "b", "</S>", "c", "</S>"]
    assert [words[1][i] for i in index] == ["</S>", "b", "a", "</S>", "c"]
    assert [words[1][i + 1] for i in index] == ["b", "a", "<S>", "c", "<S>"]


def test_resume_refuses_a_checkpoint_trained_on_independent_windows(trained, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(trained, out)
    ckpt = load_ckpt(out)
    assert ckpt.pop("batches") == "bilm-tf streams"
    del ckpt["streams"], ckpt["lstm_state"]
    ckpt["targets"] = "bilm-tf"                               # as train_elmo.py wrote it before
    torch.save(ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    message = usage_error("--resume", "True", "--out_dir", str(out))
    assert "was trained by an older train_elmo.py on independent windows" in message
    assert (out / "ckpt.pt").read_bytes() == before


def test_resume_after_sigkill_matches_uninterrupted_run(corpus, trained, tmp_path):
    out = str(tmp_path / "out")
    args = ["--data", corpus, "--out_dir", out, "--max_iters", "40", "--eval_interval", "10", *SMALL, *RANDOM]
    proc = kill_at_first_checkpoint([sys.executable, SCRIPT, *args], out)  # at iter 10's checkpoint (or later)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert read_log(out)[-1]["iter"] < 40
    run("--out_dir", out, "--resume", "True", "--device", "cpu")   # the checkpoint's options: data, SMALL, RANDOM
    a, b = load_ckpt(trained), load_ckpt(out)
    assert a["config"]["dropout"] > 0 and 0 < a["config"]["n_negative_samples"] < len(a["vocab"])   # random draws
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert read_log(out) == read_log(trained)


def test_two_processes_match_one_with_the_same_global_batch(corpus, tmp_path):
    # no dropout: each rank draws its own masks, which one process cannot reproduce
    common = ["--data", corpus, "--max_iters", "6", "--eval_interval", "3", *SMALL, "--dropout", "0.0",
              "--log_interval", "3"]
    single = run("--out_dir", str(tmp_path / "one"), *common)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        SCRIPT, "--out_dir", str(tmp_path / "two"), *common],
                       cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    one, two = load_ckpt(tmp_path / "one"), load_ckpt(tmp_path / "two")
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-4, atol=1e-5)   # all-reduce order only
    # the checkpoint holds every row's streams and carried LSTM state, whichever rank trained the row
    assert two["streams"] == one["streams"]
    torch.testing.assert_close(two["lstm_state"], one["lstm_state"], rtol=1e-4, atol=1e-5)
    for r1, r2 in zip(read_log(tmp_path / "one"), read_log(tmp_path / "two")):
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], abs=1e-5)
    # the printed training loss is the whole global batch's (all ranks'), not rank 0's share of it
    printed = [[float(line.split("loss ")[1].split(" ")[0]) for line in proc.stdout.splitlines() if line.startswith("iter ")]
               for proc in (single, p)]
    assert len(printed[0]) == len(printed[1]) == 2
    assert printed[1] == pytest.approx(printed[0], abs=2e-4)


@pytest.mark.parametrize("content,message", [
    (None, "no such file or directory"), (b"", "corpus.txt is empty: there is no text in it"),
    (b"\xff\xfe bad bytes \xc3\x28\n", "UTF-8")])
def test_bad_corpus_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    p = run("--data", str(path), "--out_dir", str(tmp_path / "out"), check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr and lines[0].startswith("train_elmo.py: ")
    assert message.lower() in lines[0].lower()
    assert not (tmp_path / "out").exists()              # no empty out_dir left behind


def test_bad_options_are_one_line_errors(tmp_path):
    for args, message in ((["--no_such_option", "1"], "unknown option"), (["--compile", "yes"], "True or False"),
                          (["--resume", "True", "--out_dir", str(tmp_path)], "no checkpoint"),
                          (["--embed", "x.txt", "--out_dir", str(tmp_path)], "needs a trained model")):
        p = run(*args, check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert message in p.stderr


def test_help_prints_the_docstring_and_every_option_and_does_nothing_else(tmp_path):
    out = tmp_path / "out"
    for flag in ("--help", "-h"):
        p = run("--out_dir", str(out), flag)
        assert p.stdout.startswith("Train an ELMo biLM from scratch") and p.stderr == ""
        assert all(f"\n{name} = " in p.stdout for name in train_elmo._CONFIG_KEYS)
    assert not out.exists()


def test_embed_writes_features_and_context_changes_a_words_vector(trained, tmp_path):
    text = tmp_path / "sentences.txt"
    text.write_text("The king loves a play .\nA fool mocks the ki\u00adng .\nMy lord serves the king .\n", encoding="utf-8")
    # a soft hyphen, in the text or in --word, is not part of the word
    p = run("--out_dir", trained, "--embed", str(text), "--word", "ki\u00adng", "--device", "cpu")
    assert "'king' in 3 contexts" in p.stdout
    f = np.load(os.path.join(trained, "elmo_features.npz"))
    assert int(f["n_sentences"]) == 3
    layers, tokens = f["layers_1"], list(f["tokens_1"])
    assert tokens == ["A", "fool", "mocks", "the", "king", "."]
    assert layers.shape == (3, 6, 128) and f["elmo_1"].shape == (6, 128)
    np.testing.assert_allclose(f["elmo_1"], layers.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f["sentence_1"], f["elmo_1"].mean(0), rtol=1e-5, atol=1e-6)   # (128,)
    king = [f["layers_0"][:, 1], f["layers_1"][:, 4], f["layers_2"][:, 4]]        # (3, 128) each
    np.testing.assert_allclose(king[0][0], king[1][0], rtol=1e-6)                 # layer 0: context-free
    assert not np.allclose(king[0][2], king[1][2], atol=1e-3)                     # top layer: depends on context


def test_embed_checks_its_file_and_word_before_any_work(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    (out / "elmo_features.npz").unlink(missing_ok=True)
    text = tmp_path / "sentences.txt"
    text.write_text("The king loves a play .\n", encoding="utf-8")
    assert usage_error("--out_dir", str(out), "--embed", str(text), "--word", "queen") == \
        f"--word 'queen' does not occur in {text}"
    assert not (out / "elmo_features.npz").exists()
    missing = tmp_path / "missing.txt"
    assert usage_error("--out_dir", str(out), "--embed", str(missing)) == f"--embed {missing}: no such file or directory"
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert "is empty" in usage_error("--out_dir", str(out), "--embed", str(tmp_path / "empty.txt"))


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    p = run("--out_dir", str(out), "--resume", "True")
    assert "is at iteration 40 and --max_iters is 40: nothing to train" in p.stdout
    assert read_log(out) == read_log(trained)


def test_a_log_line_cut_by_a_kill_is_dropped_and_a_damaged_one_is_a_one_line_error(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 50, "val_lo')                      # an append that a kill cut short: dropped on resume
    train_elmo.main(["--out_dir", str(out), "--resume", "True", "--max_iters", "50"])
    assert [r["iter"] for r in read_log(out)] == [0, 10, 20, 30, 40, 50]
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text("".join(lines[:2] + ["not json\n"] + lines[2:]))
    message = usage_error("--out_dir", str(out), "--resume", "True", "--max_iters", "60")
    assert message.startswith(f"{out / 'log.jsonl'}, line 3, is not an evaluation record")


def usage_error(*argv):
    """The one-line message main() stops with (printed as `train_elmo.py: <message>`, exit status 1)."""
    with pytest.raises(train_elmo.UsageError) as e:
        train_elmo.main(list(argv))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--grad_clip", "-1"], "--grad_clip must be > 0"), (["--grad_clip", "0"], "--grad_clip must be > 0"),
    (["--max_vocab", "2"], "--max_vocab must be 0"), (["--max_vocab", "-5"], "--max_vocab must be 0"),
    (["--log_interval", "0"], "--log_interval must be ≥ 1"), (["--batch_size", "0"], "--batch_size must be ≥ 1"),
    (["--batch_size", "-4"], "--batch_size must be ≥ 1"), (["--seed", str(2**64)], "--seed must be in"),
    (["--seed", "-1"], "--seed must be in"), (["--device", "tpu"], "--device must be"),
    (["--resume", "True", "--overwrite", "True"], "pass one of them"),
    (["--unroll_steps", "0"], "--unroll_steps must be ≥ 1"), (["--max_iters", "1.5"], "--max_iters must be an int"),
    (["--word", "king"], "--word picks the word whose contexts --embed compares"),
    (["--word", "--max_iters", "3"], "--word needs a value"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--learning_rate", "1e39"], "--learning_rate 1e+39 is beyond float32's range (at most 3.403e+38)"),
    (["--batch_size", str(10**11)], "more than any machine holds")])
def test_bad_option_values_stop_before_any_work(tmp_path, args, message):
    # --data does not exist: an error about the option shows it was checked before the data
    assert message in usage_error("--data", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "out"), *args)


def test_a_device_torch_does_not_see_is_a_one_line_error(tmp_path):
    import torch as t
    if t.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert "no MPS device" in usage_error("--device", "mps", "--out_dir", str(tmp_path))


def test_a_run_in_an_out_dir_that_another_run_uses_is_refused_and_changes_nothing(trained, corpus, tmp_path):
    busy, fresh = tmp_path / "busy", tmp_path / "fresh"   # a run's out_dir, before and after its first checkpoint
    shutil.copytree(trained, busy)
    fresh.mkdir()
    unlocked = lambda files: {k: v for k, v in files.items() if not k.endswith(".lock")}   # noqa: E731
    before = unlocked(snapshot(tmp_path))
    for out, extra in ((busy, ["--resume", "True"]), (busy, ["--overwrite", "True"]), (busy, []), (fresh, [])):
        with OutDirLockHolder(out):
            message = usage_error("--data", corpus, "--out_dir", str(out), *SMALL, *extra)
        assert message.endswith(f"another run holds its lock {out / '.lock'}; wait for that run to end, or "
                                "choose another --out_dir"), message
    assert unlocked(snapshot(tmp_path)) == before
    # under torchrun, rank 0's finding is every rank's: one message, exit status 1
    with OutDirLockHolder(fresh):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            SCRIPT, "--data", corpus, "--out_dir", str(fresh), *SMALL], cwd=ROOT, env=script_env(),
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.count("is in use: another run holds its lock") == 1, p.stderr[-3000:]
    # a run holds its lock while it runs
    running = str(tmp_path / "running")
    assert locked_while_running([sys.executable, SCRIPT, "--data", corpus, "--out_dir", running, *SMALL, "--max_iters",
                                 "100000", "--eval_interval", "2"], running)
    # a run in this process that took the lock, then stopped, leaves it free for the next one
    assert "already holds a checkpoint" in usage_error("--data", corpus, "--out_dir", str(busy), *SMALL)
    with OutDirLockHolder(busy):
        pass


def test_out_dir_under_a_file_is_reported_before_the_data_is_read(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in ("afile", "afile/sub"):
        message = usage_error("--data", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / out))
        assert "--out_dir" in message and "missing.txt" not in message


def test_a_directory_named_ckpt_pt_is_named_by_every_job(tmp_path):
    (tmp_path / "out" / "ckpt.pt").mkdir(parents=True)   # not "no checkpoint" for --resume, "holds one" for a new run
    missing = str(tmp_path / "missing.txt")
    for job in (["--data", missing], ["--data", missing, "--resume", "True"], ["--data", missing, "--overwrite", "True"],
                ["--test", "val"], ["--embed", missing]):
        assert f"{tmp_path / 'out' / 'ckpt.pt'} is a directory, not a checkpoint" in \
            usage_error("--out_dir", str(tmp_path / "out"), *job), job


def test_foreign_or_truncated_checkpoints_are_one_line_errors(trained, tmp_path):
    foreign = tmp_path / "gpt"
    foreign.mkdir()
    torch.save({"model": {}, "optimizer": {}, "options": {}, "iter_num": 3}, foreign / "ckpt.pt")   # train_gpt1's keys
    truncated = tmp_path / "cut"
    truncated.mkdir()
    whole = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    (truncated / "ckpt.pt").write_bytes(whole[: len(whole) // 2])
    missing = str(tmp_path / "missing.txt")     # checked before the data: an error about the data would show it
    for out, message in ((foreign, "not a train_elmo.py checkpoint"), (truncated, "cannot read")):
        assert message in usage_error("--out_dir", str(out), "--resume", "True", "--data", missing)
        assert message in usage_error("--out_dir", str(out), "--embed", missing)


def test_damaged_checkpoints_are_one_line_errors(trained, tmp_path):
    # fields a damaged (or hand-edited) checkpoint can get wrong, each caught before any work is done
    good = load_ckpt(trained)
    nan_weights = {**good["model"]}
    name = next(k for k, t in nan_weights.items() if t.is_floating_point())
    nan_weights[name] = torch.full_like(nan_weights[name], float("nan"))
    dropped = {k: t for k, t in good["model"].items() if k != name}   # torch's first line names no weight
    nan_state = [[(torch.full_like(m, float("nan")), c) for m, c in layers] for layers in good["lstm_state"]]
    bad_sums = []   # Adagrad's accumulators: NaN, then negative (no run reaches either; the loss would go NaN)
    for bad in (float("nan"), -1.0):
        opt = copy.deepcopy(good["optimizer"])
        first = opt["state"][next(iter(opt["state"]))]
        first["sum"] = torch.full_like(first["sum"], bad)
        bad_sums.append(opt)
    for i, (change, message) in enumerate((
            ({"model": nan_weights}, "NaN or infinite weights"),
            ({"model": dropped}, f'loading state_dict for BiLM: Missing key(s) in state_dict: "{name}"'),
            ({"lstm_state": nan_state}, "its carried LSTM state does not fit the model and --batch_size, or is not finite"),
            ({"optimizer": bad_sums[0]}, "or holds NaN, infinite or negative accumulators"),
            ({"optimizer": bad_sums[1]}, "or holds NaN, infinite or negative accumulators"),
            ({"iter": 2.5}, "its iteration is 2.5"),
            ({"vocab": None}, "its vocabulary is not"),
            ({"train_config": {**good["train_config"], "batch_size": "4"}}, "its --batch_size is '4'"),
            ({"train_config": {**good["train_config"], "preset": "bogus"}}, "--preset must be one of"),
            ({"optimizer": {}}, "its optimizer state does not fit"),
            ({"optimizer": None}, "its optimizer state does not fit"))):
        out = tmp_path / f"out{i}"
        out.mkdir()
        torch.save({**good, **change}, out / "ckpt.pt")
        shutil.copy(os.path.join(trained, "log.jsonl"), out / "log.jsonl")
        assert message in usage_error("--out_dir", str(out), "--resume", "True"), change


def test_embed_and_test_refuse_training_options(trained, tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("The king loves a play .\n", encoding="utf-8")
    assert "--embed takes only" in usage_error("--out_dir", trained, "--embed", str(text), "--resume", "True")
    assert "--test takes only" in usage_error("--out_dir", trained, "--test", str(text), "--preset", "small")
    assert "--test takes only" in usage_error("--out_dir", trained, "--test", str(text), "--word", "king")
    for name in ("embed", "test", "word", "out_dir"):   # an unset shell variable, say: not a training run
        assert usage_error("--out_dir", trained, f"--{name}", "") == \
            f"--{name} is empty: give a value, or leave the option out"


def test_a_second_embed_leaves_no_plot_of_the_first(trained, tmp_path):
    pytest.importorskip("matplotlib")
    out, text = tmp_path / "out", tmp_path / "s.txt"
    shutil.copytree(trained, out)
    text.write_text("The king loves a play .\nA fool mocks the king .\n", encoding="utf-8")
    run("--out_dir", str(out), "--embed", str(text), "--device", "cpu")
    assert (out / "elmo_contexts.png").exists()
    text.write_text("The king loves a play .\nMy fool mocks nobody .\n", encoding="utf-8")   # no word in both
    assert "nothing to compare" in run("--out_dir", str(out), "--embed", str(text), "--device", "cpu").stdout
    assert not (out / "elmo_contexts.png").exists()


def test_out_dir_inside_the_corpus_directory_is_refused(corpus, tmp_path):
    shutil.copy(corpus, tmp_path / "corpus.txt")
    message = usage_error("--data", str(tmp_path), "--out_dir", str(tmp_path / "out"), "--max_iters", "0", *SMALL)
    assert "inside the corpus directory" in message and not (tmp_path / "out").exists()


def test_a_diverging_run_stops_without_saving(corpus, tmp_path):
    out = tmp_path / "out"
    p = run("--data", corpus, "--out_dir", str(out), "--max_iters", "4", "--eval_interval", "2", *SMALL,
            "--learning_rate", "1e30", check=False)
    assert p.returncode == 1 and "training diverged" in p.stderr.strip().splitlines()[-1], p.stderr
    assert not (out / "ckpt.pt").exists()


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK is set but MASTER_ADDR, MASTER_PORT are not: launch several processes "
                                       "with torchrun (or unset RANK)"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29578"},
     "RANK=2, LOCAL_RANK=0, WORLD_SIZE=2: a rank must lie in [0, WORLD_SIZE)"),   # the rendezvous would wait for ever
])
def test_rank_without_torchrun_is_a_one_line_error(env, message, corpus, tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--data", corpus, "--out_dir", str(tmp_path / "out"), *SMALL],
                       cwd=ROOT, env={**script_env(), **env}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith(f"train_elmo.py: {message}"), p.stderr


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoint(trained, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "log.jsonl"):
        shutil.copy(os.path.join(trained, name), out / name)
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    message = usage_error("--data", corpus, "--out_dir", str(out), "--max_iters", "0", *SMALL)
    assert message == (f"{out} already holds a checkpoint: pass --resume True to continue it, choose another "
                       "--out_dir, or pass --overwrite True to start over")
    assert {name: (out / name).read_bytes() for name in before} == before          # nothing lost
    train_elmo.main(["--data", corpus, "--out_dir", str(out), "--max_iters", "0", "--overwrite", "True", *SMALL])
    assert not (out / "ckpt.pt").exists()                                            # the old run is gone, all of it
    assert [r["iter"] for r in read_log(out)] == [0]


def test_resume_refuses_a_corpus_that_changed_since_the_checkpoint(corpus, tmp_path):
    # the first two lines swapped: the same split and vocabulary, but the streams would read other sentences
    text = tmp_path / "corpus.txt"
    lines = open(corpus, encoding="utf-8").read().splitlines()
    assert len(lines[0]) != len(lines[1])
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = str(tmp_path / "out")
    train_elmo.main(["--data", str(text), "--out_dir", out, "--max_iters", "2", "--eval_interval", "2", *SMALL])
    text.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n", encoding="utf-8")
    train_elmo.main(["--data", str(text), "--out_dir", str(tmp_path / "new"), "--max_iters", "1", "--eval_interval", "1",
                     *SMALL])
    assert load_ckpt(tmp_path / "new")["vocab"] == load_ckpt(out)["vocab"]
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    assert "has changed since" in usage_error("--out_dir", out, "--resume", "True", "--max_iters", "4")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def _one_stream(c):
    c["streams"] = c["streams"][:1]


def _short_rows(c):
    c["streams"][1]["sentence"].pop()


def _no_such_sentence(c):
    c["streams"][0]["sentence"][0] = 10 ** 6


def _state_of_other_rows(c):
    c["lstm_state"][0][0] = tuple(t[:3] for t in c["lstm_state"][0][0])


@pytest.mark.parametrize("damage,message", [
    (lambda c: c.pop("streams"), "sentence streams do not fit"), (_one_stream, "sentence streams do not fit"),
    (_short_rows, "sentence streams do not fit"), (_no_such_sentence, "sentence streams do not fit"),
    (lambda c: c.update(lstm_state=None), "LSTM state does not fit"), (_state_of_other_rows, "LSTM state does not fit"),
    (lambda c: c.pop("corpus_sha256"), "has changed since")])
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(trained, tmp_path, damage, message):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    ckpt = load_ckpt(out)
    damage(ckpt)
    torch.save(ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    assert message in usage_error("--out_dir", str(out), "--resume", "True", "--max_iters", "50")
    assert (out / "ckpt.pt").read_bytes() == before


def test_resume_takes_the_optimizer_from_the_checkpoint(corpus, tmp_path):
    # in process, a few steps: Adam's state, resumed without --optimizer adam, is still Adam's
    # (the old code built Adagrad and loading Adam's state into it failed with KeyError: 'sum')
    common = ["--data", corpus, "--eval_interval", "2", *SMALL]
    train_elmo.main(["--out_dir", str(tmp_path / "whole"), "--max_iters", "4", *common, "--optimizer", "adam"])
    train_elmo.main(["--out_dir", str(tmp_path / "parts"), "--max_iters", "2", *common, "--optimizer", "adam"])
    train_elmo.main(["--out_dir", str(tmp_path / "parts"), "--resume", "True", "--max_iters", "4", *common])  # longer
    a, b = load_ckpt(tmp_path / "whole"), load_ckpt(tmp_path / "parts")
    assert b["train_config"]["optimizer"] == "adam" and b["train_config"]["max_iters"] == 4
    assert "exp_avg" in b["optimizer"]["state"][0]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")


@pytest.mark.parametrize("args,shown", [
    (["--optimizer", "adam"], "--optimizer adam differs from the checkpoint's (adagrad)"),
    (["--preset", "small"], "--preset small differs from the checkpoint's (tiny)"),
    (["--dropout", "0.1"], "--dropout 0.1 differs from the checkpoint's (0.2)"),
    (["--n_negative_samples", "8"], "--n_negative_samples 8 differs"), (["--max_vocab", "20"], "--max_vocab 20"),
    (["--val_fraction", "0.2"], "--val_fraction 0.2"), (["--batch_size", "16"], "--batch_size 16"),
    (["--unroll_steps", "4"], "--unroll_steps 4"), (["--seed", "1"], "--seed 1 differs"),
    (["--learning_rate", "0.1"], "--learning_rate 0.1 differs from the checkpoint's (0.0)"),
    (["--grad_clip", "1"], "--grad_clip 1.0 differs"), (["--data", "shakespeare"], "--data shakespeare differs")])
def test_resume_refuses_to_change_what_the_checkpoint_fixes(trained, corpus, tmp_path, args, shown):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "log.jsonl"):
        shutil.copy(os.path.join(trained, name), out / name)
    before = snapshot(out)
    # the rest repeat the checkpoint's values (allowed), or are free to change (max_iters, intervals, device)
    message = usage_error("--out_dir", str(out), "--resume", "True", "--data", corpus, "--dropout", "0.2",
                          "--max_iters", "60", "--log_interval", "5", "--eval_iters", "3", "--device", "cpu", *args)
    assert message.startswith(f"--resume True: {shown}") and message.endswith(
        "start a new run (another --out_dir, or --overwrite True) to change it")
    assert snapshot(out) == before


def test_resume_accepts_the_checkpoints_own_values(trained, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "log.jsonl"):
        shutil.copy(os.path.join(trained, name), out / name)
    monkeypatch.chdir(os.path.dirname(corpus))          # a relative --data is the same file
    # learning_rate 0.2 is Adagrad's default, the checkpoint's 0 (max_iters 40: the run is done, nothing to train)
    assert train_elmo.main(["--out_dir", str(out), "--resume", "True", "--data", os.path.basename(corpus), *SMALL,
                            *RANDOM, "--learning_rate", "0.2", "--max_iters", "40"]) == 0
    assert read_log(out) == read_log(trained)


@pytest.mark.parametrize("line,tokens", [
    ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),                                    # vowel signs and virama are marks
    (unicodedata.normalize("NFD", "café noir"), [unicodedata.normalize("NFD", "café"), "noir"]),
    ("می\u200cخواهم", ["می\u200cخواهم"]),                                        # zero-width non-joiner
    ("👨\u200d👩\u200d👧 ok 👍🏽!", ["👨\u200d👩\u200d👧", "ok", "👍🏽", "!"]),      # ZWJ sequence, skin tone
    ("don’t, o'er ‘it’", ["don’t", ",", "o'er", "‘", "it", "’"]),               # ’ inside a word joins like '
    ("The King's men, I'll go.", ["The", "King's", "men", ",", "I'll", "go", "."]),
    ("co\u00adoperate \u200fwith\u2060in\ufeff a\u200bb\x00c", ["cooperate", "within", "a", "bc"]),   # invisible
    ("🏴\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F ok",                        # a subdivision flag
     ["🏴\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F", "ok"])])
def test_tokenize_keeps_marks_joiners_and_inner_apostrophes_inside_words(line, tokens):
    assert train_elmo.tokenize(line) == tokens


def test_embed_runs_the_bilm_once_per_batch(trained, tmp_path, monkeypatch):
    from minilm.elmo import BiLM
    calls = []
    forward = BiLM.forward
    monkeypatch.setattr(BiLM, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(os.path.join(trained, "ckpt.pt"), out / "ckpt.pt")
    text = tmp_path / "sentences.txt"
    text.write_text("The king loves a play .\nA fool mocks the king .\n", encoding="utf-8")
    cfg = {**{k: getattr(train_elmo, k) for k in train_elmo._CONFIG_KEYS},
           "out_dir": str(out), "embed": str(text), "device": "cpu", "word": "king"}
    monkeypatch.setattr(train_elmo, "show_contexts", lambda *a: None)
    train_elmo.embed_file(cfg)
    assert len(calls) == 1                                          # two sentences: one batch


def test_readme_elmo_snippet_runs(trained, monkeypatch):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("### ELMo features"):readme.index("### Loading the original weights")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(os.path.dirname(trained))
    os.makedirs("out-elmo", exist_ok=True)
    shutil.copy(os.path.join(trained, "ckpt.pt"), "out-elmo/ckpt.pt")
    scope = {}
    exec(code, scope)
    assert scope["reps"].shape[:2] == (2, 4) and scope["mask"].sum().item() == 7


def test_test_scores_the_whole_text_as_one_stream_with_the_state_carried(trained, tmp_path, capsys):
    # batch 1 × 1 step: the pass through the file, state carried from zero, is one call over the whole stream
    text = tmp_path / "held_out.txt"
    sentences = [["The", "king", "loves", "a", "play", "."], ["A", "fool", "mocks", "the", "queen", "."], ["Go", "!"]]
    text.write_text("\n".join(" ".join(s) for s in sentences) + "\n", encoding="utf-8")
    assert train_elmo.main(["--out_dir", trained, "--test", str(text), "--batch_size", "1", "--unroll_steps", "1",
                            "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 sentences, 17 of the 17 tokens scored per direction" in out
    ppl = [float(x) for x in re.findall(r"perplexity ([\d.]+) \(forward ([\d.]+), backward ([\d.]+)\)", out)[0]]
    ckpt = load_ckpt(trained)
    bilm = train_elmo.bilm_from_checkpoint(ckpt, "ckpt").eval()
    _, type_chars, type_to_word, tokens, _ = train_elmo.encode_splits({"t": sentences}, ckpt["vocab"])
    ends = [len(s) + 2 for s in sentences]                                # the inputs: every token but each last
    starts = np.cumsum([0] + ends[:-1])
    inputs = torch.tensor([i for n, start in zip(ends, starts) for i in range(start, start + n - 1)])
    chars, targets = type_chars[tokens["t"][:, inputs]], type_to_word[tokens["t"][:, inputs + 1]]   # (2, 17, 50), (2, 17)
    with torch.no_grad():
        losses, _ = bilm.stream_losses(chars[:, None], targets[:, None])                      # one row of 17 steps
    expected = [np.exp(losses.mean().item()), np.exp(losses[0].item()), np.exp(losses[1].item())]
    assert ppl == pytest.approx(expected, abs=0.051)
    # the run's own validation split, in batches of the default size
    assert train_elmo.main(["--out_dir", trained, "--test", "val", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    for args, message in ((["--test", str(tmp_path / "missing.txt")], "no such file or directory"),
                          (["--test", "val", "--embed", str(text)], "pass one of them"),
                          (["--test", str(text), "--batch_size", "2", "--unroll_steps", "64"],
                           "fills no batch of --batch_size 2 × --unroll_steps 64 tokens (each row reads sentences of "
                           "its own, and the pass ends when one row runs out): --unroll_steps 7 fills one"),
                          (["--test", str(text), "--batch_size", "3", "--unroll_steps", "5"],
                           "--batch_size 2 or --unroll_steps 3 fills one"),
                          (["--test", str(text), "--batch_size", "1", "--unroll_steps", "18"], "--unroll_steps 17 fills"),
                          (["--test", str(text), "--batch_size", "64"], "fewer than the --batch_size 64 rows")):
        assert message in usage_error("--out_dir", trained, *args)
    assert "--test needs a trained model" in usage_error("--out_dir", str(tmp_path / "none"), "--test", "val")


def test_test_val_refuses_a_corpus_changed_since_training_and_a_damaged_record_of_it(trained, corpus, tmp_path):
    out, text = tmp_path / "out", tmp_path / "corpus.txt"
    shutil.copytree(trained, out)
    shutil.copy(corpus, text)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["train_config"]["data"] = str(text)        # the run as if trained on this copy of its corpus
    torch.save(ckpt, out / "ckpt.pt")
    assert train_elmo.main(["--out_dir", str(out), "--test", "val", "--device", "cpu"]) == 0
    with open(text, "a", encoding="utf-8") as f:
        f.write("The king fears a new line .\n")
    assert usage_error("--out_dir", str(out), "--test", "val") == (
        f"--test val: {text} has changed since {out}/ckpt.pt was trained on it (or an older minilm split or "
        "tokenized it otherwise), so its validation split is no longer the run's: give --test a text file")
    text.unlink()                                   # moved away: the run's corpus, not a --data, is named
    assert usage_error("--out_dir", str(out), "--test", "val").startswith(
        f"--test val: the run's corpus {text} cannot be read (")
    del ckpt["corpus_sha256"]
    torch.save(ckpt, out / "ckpt.pt")
    assert "does not record its corpus" in usage_error("--out_dir", str(out), "--test", "val")
    ckpt["train_config"]["val_fraction"] = "x"
    torch.save(ckpt, out / "ckpt.pt")
    assert "does not record its run's --data and --val_fraction" in usage_error("--out_dir", str(out), "--test", "val")


def test_a_torch_compile_that_fails_is_one_line(corpus, tmp_path):
    env = dict(script_env(), CXX="/nonexistent/c++", CC="/nonexistent/cc")   # no C++ compiler for inductor
    p = subprocess.run([sys.executable, SCRIPT, "--data", corpus, "--out_dir", str(tmp_path / "out"), *SMALL,
                        "--max_iters", "1", "--compile", "True"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    last = p.stderr.splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last.startswith("train_elmo.py: --compile True: torch.compile failed (") and "C++ compiler" in last


def test_an_empty_data_path_and_a_test_text_of_fewer_sentences_than_rows_are_named_as_such(trained, tmp_path):
    for empty in ("", "  "):
        assert usage_error("--data", empty, "--out_dir", str(tmp_path / "out")) == \
            "--data is empty: give a text file or a directory of them"
    text = tmp_path / "few.txt"
    text.write_text(" ".join(["the king loves the crown"] * 200) + " .\nA fool .\nMy lord .\n", encoding="utf-8")
    assert usage_error("--out_dir", trained, "--test", str(text), "--batch_size", "8") == \
        f"--test {text} has 3 sentences, fewer than the --batch_size 8 rows that read them: give --batch_size 3 or less"
    assert train_elmo.main(["--out_dir", trained, "--test", str(text), "--batch_size", "3", "--unroll_steps", "2",
                            "--device", "cpu"]) == 0


def test_training_and_evaluation_carry_the_lstm_state_from_batch_to_batch(corpus, tmp_path, monkeypatch):
    # bilm-tf carries each row's LSTM state from one batch to the next: training from zero at the start, and
    # every evaluation from zero at its start, on each split's own streams (never the training state).
    from minilm.elmo import BiLM

    calls, stream_losses = [], BiLM.stream_losses

    def recording(self, char_ids, targets, state=None, token_index=None):
        losses, last = stream_losses(self, char_ids, targets, state, token_index)
        calls.append((self.training, state, last))
        return losses, last

    monkeypatch.setattr(BiLM, "stream_losses", recording)
    train_elmo.main(["--data", corpus, "--out_dir", str(tmp_path / "r"), "--max_iters", "3", "--eval_interval", "3",
                     *SMALL])                                                   # --eval_iters 2
    training = [(state, last) for is_training, state, last in calls if is_training]
    evaluations = [(state, last) for is_training, state, last in calls if not is_training]
    assert len(training) == 3 and len(evaluations) == 2 * 2 * 2               # 2 evaluations × 2 splits × 2 batches
    for batches in (training, *(evaluations[i:i + 2] for i in range(0, len(evaluations), 2))):
        assert batches[0][0] is None
        for (_, last), (state, _) in zip(batches, batches[1:]):
            torch.testing.assert_close(state, last, rtol=0, atol=0)


def test_optimizer_and_clipping_are_bilm_tfs(corpus, tmp_path):
    # bilm-tf: Adagrad with learning rate 0.2 and initial accumulator 1.0, global-norm clipping (a clip norm of
    # 1e-9 leaves every update ~1e-10: the model does not move).
    out = tmp_path / "r"
    train_elmo.main(["--data", corpus, "--out_dir", str(out), "--max_iters", "10", "--eval_interval", "10", *SMALL,
                     "--grad_clip", "1e-9"])
    group = load_ckpt(out)["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.2 and group["initial_accumulator_value"] == 1.0
    log = read_log(out)
    assert len(log) == 2 and abs(log[-1]["val_loss"] - log[0]["val_loss"]) < 1e-3, log


class _Stop(Exception):
    pass


def test_max_vocab_counts_the_specials_and_keeps_the_most_frequent_words(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    # c: 4, a: 3, b: 3, d: 1 ... ties broken alphabetically (a before b)
    text.write_text("c c a b\nc a b d\nc a b e\nf g h i\n" * 3, encoding="utf-8")
    seen = {}

    def capture(sentences, vocab):
        seen["vocab"] = list(vocab)
        raise _Stop
    monkeypatch.setattr(train_elmo, "encode_splits", capture)
    with pytest.raises(_Stop):
        train_elmo.main(["--data", str(text), "--out_dir", str(tmp_path / "o"), "--max_vocab", "5", *SMALL])
    assert seen["vocab"] == ["<S>", "</S>", "<UNK>", "c", "a"]


def test_words_outside_the_vocabulary_are_unk_targets():
    vocab = ["<S>", "</S>", "<UNK>", "a"]
    types, _, type_to_word, tokens, lengths = train_elmo.encode_splits({"t": [["a", "zz", "a"]]}, vocab)
    assert types == ["</S>", "<S>", "a", "zz"]
    assert type_to_word.tolist() == [1, 0, 3, 2]                      # zz → <UNK> (2), never <S> or </S>
    assert lengths["t"] == [5]


def test_embed_sentence_vectors_average_only_their_own_tokens(trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(os.path.join(trained, "ckpt.pt"), out / "ckpt.pt")
    text = tmp_path / "s.txt"
    text.write_text("The king loves a play in the end .\nThe king !\n", encoding="utf-8")   # 9 and 3 words: padding
    shown = {}
    monkeypatch.setattr(train_elmo, "show_contexts", lambda cfg, sentences, top, bilm: shown.update(top=top))
    assert train_elmo.main(["--out_dir", str(out), "--embed", str(text), "--device", "cpu"]) == 0
    f = np.load(out / "elmo_features.npz")
    for i, n in ((0, 9), (1, 3)):
        assert f[f"elmo_{i}"].shape[0] == n
        np.testing.assert_allclose(f[f"sentence_{i}"], f[f"elmo_{i}"].mean(0), rtol=1e-5, atol=1e-6)
        # the vectors the context comparison uses are the top layer of the same tokens
        torch.testing.assert_close(shown["top"][i], torch.from_numpy(f[f"layers_{i}"][-1]), rtol=1e-5, atol=1e-6)
