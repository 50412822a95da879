"""train_gpt1.py end to end on a tiny corpus: logging, checkpoints, sampling, resume after SIGKILL, DDP, errors."""
import contextlib
import math
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from script_helpers import (OutDirLockHolder, assert_decayed_on_matrices_only, locked_while_running, kill_at_first_checkpoint, load_script, read_log,
                            script_env, snapshot)
from test_data import PLAY, _write

from minilm import data as D
from minilm.bpe import BPETokenizer
from minilm.data import DataError
from minilm.gpt1 import GPT1, config_from_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt1.py")
TINY = ["--preset", "cpu-tiny", "--vocab_size", "200", "--eval_iters", "2", "--log_interval", "1000"]


def _train(*args, check=True, timeout=240):
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _torchrun(*args):
    """train_gpt1.py under torchrun with two processes; the finished process (exit status 0 asserted)."""
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*cmd, "--standalone", "--nproc_per_node", "2", SCRIPT, *args], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~25 kB of English-like text made of a small vocabulary, so a 2-layer model learns it in seconds."""
    rng = random.Random(0)
    words = ("the king and queen of england rode to a castle where knight waited with his sword horse "
             "lord lady good night sweet prince my love shall not die").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(1500)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """(out_dir, process) of one finished 60-step run, on a corpus of its own (a test edits it). Tests that
    resume or sample from it work on a copy (shutil.copytree) and leave this one as it is."""
    base = tmp_path_factory.mktemp("trained")
    text = base / "corpus.txt"
    shutil.copy(corpus, text)
    out = str(base / "run")
    proc = _train("--data", str(text), "--out_dir", out, *TINY, "--max_iters", "60", "--eval_interval", "20",
                  "--max_new_tokens", "12")
    return out, proc


def test_training_logs_learns_checkpoints_and_samples(trained, tmp_path):
    out, proc = trained
    log = read_log(out)
    assert [r["iter"] for r in log] == [0, 20, 40, 60]
    assert set(log[0]) >= {"iter", "train_loss", "val_loss", "lr", "tokens_per_s"}
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 1.0  # from ~ln(vocab) to clearly better
    assert log[-1]["tokens_per_s"] > 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # plain types only
    assert ckpt["iter_num"] == 60 and ckpt["model_config"]["n_layer"] == 2
    assert "-" * 60 in proc.stdout  # the sample printed at the end
    proc = _train("--sample", "True", "--out_dir", out, "--start", "the king", "--max_new_tokens", "10")
    text = proc.stdout.split("-" * 60)[1].strip()
    assert text.startswith("the king") and len(text.split()) > 2


def test_resume_after_sigkill_matches_uninterrupted_run(corpus, tmp_path):
    # Dropout 0.1 on: a resumed run only matches if the RNG state comes back too, not just the weights.
    args = ["--data", corpus, *TINY, "--max_iters", "120", "--eval_interval", "10", "--dropout", "0.1",
            "--max_new_tokens", "0"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    _train(*args, "--out_dir", ref)
    # Same run, killed with SIGKILL as soon as its first checkpoint (iter 10) is on disk.
    proc = kill_at_first_checkpoint([sys.executable, SCRIPT, *args, "--out_dir", cut], cut)
    assert proc.returncode == -signal.SIGKILL
    killed_at = [r["iter"] for r in read_log(cut)]
    assert killed_at[-1] < 120, "the run finished before it could be killed"
    _train("--resume", "True", "--out_dir", cut)
    want, got = read_log(ref), read_log(cut)
    assert [r["iter"] for r in got] == [r["iter"] for r in want]
    for a, b in zip(want, got):
        assert (a["train_loss"], a["val_loss"], a["lr"]) == (b["train_loss"], b["val_loss"], b["lr"]), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 4])
def test_torchrun_two_processes_match_one_process(corpus, tmp_path, accumulation):
    # Dropout 0: each rank draws its own dropout masks, which no single process reproduces; everything
    # else -- batches, slices, gradient averaging (once, after a rank's last micro-batch), evaluation
    # batches -- is the same computation, so the losses agree up to float summation order (DDP averages
    # gradients in a different order).
    args = ["--data", corpus, *TINY, "--max_iters", "30", "--eval_interval", "10", "--batch_size", "8",
            "--dropout", "0.0", "--max_new_tokens", "0", "--log_interval", "10",
            "--gradient_accumulation_steps", str(accumulation)]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    single = _train(*args, "--out_dir", one)
    proc = _torchrun(*args, "--out_dir", two)
    assert ("2 process(es), batch 8 = 2 × 4" if accumulation == 1 else "batch 8 = 4 × 2") in proc.stdout
    a, b = read_log(one), read_log(two)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [0, 10, 20, 30]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (key, ra, rb)
    assert b[-1]["val_loss"] < b[0]["val_loss"] - 0.5  # and it trained
    # The printed step loss is the whole global batch's (all ranks'), not rank 0's share of it.
    printed = [[float(line.split("loss ")[1].split(",")[0]) for line in p.stdout.splitlines() if line.startswith("iter ")]
               for p in (single, proc)]
    assert len(printed[0]) == len(printed[1]) == 3
    assert printed[1] == pytest.approx(printed[0], abs=2e-4)


@pytest.mark.slow
def test_torchrun_resume_gives_every_rank_its_own_random_state_back(corpus, tmp_path):
    # Dropout 0.1: each rank draws its own masks, so a resumed two-process run matches the uninterrupted one
    # only if every rank gets back its own RNG state (not rank 0's). lr_decay_iters fixes the schedule, so
    # that a run stopped at 20 and resumed to 30 steps is the 30-step run.
    args = ["--data", corpus, *TINY, "--eval_interval", "10", "--batch_size", "8", "--dropout", "0.1",
            "--lr_decay_iters", "30", "--max_new_tokens", "0"]
    for extra in (["--out_dir", str(tmp_path / "whole"), "--max_iters", "30"],
                  ["--out_dir", str(tmp_path / "parts"), "--max_iters", "20"],
                  ["--out_dir", str(tmp_path / "parts"), "--max_iters", "30", "--resume", "True"]):
        _torchrun(*args, *extra)
    whole, parts = read_log(tmp_path / "whole"), read_log(tmp_path / "parts")
    assert [r["iter"] for r in parts] == [r["iter"] for r in whole] == [0, 10, 20, 30]
    for a, b in zip(whole, parts):
        assert (b["train_loss"], b["val_loss"]) == (a["train_loss"], a["val_loss"]), (a, b)


@pytest.mark.parametrize("case", ["unknown_option", "bad_bool", "missing_data", "non_utf8", "empty",
                                  "no_checkpoint_resume", "no_checkpoint_sample", "bad_preset"])
def test_user_errors_are_one_line_and_exit_1(case, tmp_path):
    out = str(tmp_path / "out")
    bad = tmp_path / "bad.txt"
    args = {
        "unknown_option": ["--learning_rat", "1e-3"],
        "bad_bool": ["--compile", "yes"],
        "missing_data": ["--data", str(tmp_path / "nope.txt")],
        "non_utf8": ["--data", str(bad)],
        "empty": ["--data", str(bad)],
        "no_checkpoint_resume": ["--resume", "True"],
        "no_checkpoint_sample": ["--sample", "True"],
        "bad_preset": ["--preset", "gpt9"],
    }[case]
    if case == "non_utf8":
        bad.write_bytes(b"hello \xff\xfe world\n")
    if case == "empty":
        bad.write_bytes(b"")
    proc = _train("--out_dir", out, *TINY, *args, check=False, timeout=120)  # later options win
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt1.py: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)     # a run that fails on its data leaves no empty out_dir behind


# --- options refused before any work is done (main() called in this process: no subprocess per case) ---

train_gpt1 = load_script("train_gpt1")


def _refused(*argv):
    """main(argv) must stop with a user error whose message is one line; returns the message."""
    with pytest.raises((train_gpt1.UserError, DataError)) as info:
        train_gpt1.main(list(argv))
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize("bad, message", [
    (["--eval_interval", "0"], "--eval_interval must be at least 1"),
    (["--log_interval", "0"], "--log_interval must be at least 1"),
    (["--eval_iters", "0"], "--eval_iters must be at least 1"),
    (["--n_head", "0"], "--n_head must be at least 1"),
    (["--n_head", "3"], "divisible by n_head"),
    (["--block_size", "0"], "--block_size must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--batch_size", "-8"], "--batch_size must be at least 1"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
    (["--learning_rate", "1e39"], "--learning_rate 1e+39 is beyond float32's range (at most 3.403e+38)"),
    (["--weight_decay", "1e39"], "--weight_decay 1e+39 is beyond float32's range"),
    (["--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--seed", str(2**64)], "--seed must be below 2**32"),
    (["--device", "gpu"], "--device gpu: choose"),
    (["--val_fraction", "1"], "--val_fraction must be in (0, 1)"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be at least 0"),
    (["--num_samples", str(10**22)], "--num_samples must be at most 10,000"),
    (["--max_new_tokens", str(10**7)], "--max_new_tokens must be at most 1,000,000"),
    (["--task", ""], "--task is empty: give a value, or leave the option out"),  # an unset shell variable, say
    (["--task", "classification", "--init_from", ""], "--init_from is empty"),
    (["--start", "\u200b"], "encodes to no tokens"),  # a zero-width space: no word at all
    (["--resume", "True", "--overwrite", "True"], "pass one of them"),
    (["--kernel_sizes", "3"], "--kernel_sizes is an option of LightConv: it needs --arch lightconv"),
    (["--top_k", "-5"], "--top_k must be at least 0"),
    (["--min_lr", "1"], "--min_lr 1.0 is above --learning_rate"),
    (["--sample", "True", "--overwrite", "True"], "pass one of them"),
    (["--init_from", "x"], "--init_from is a fine-tuning option: it needs --task"),
    (["--lm_coef", "0.3"], "--lm_coef is a fine-tuning option: it needs --task"),
    (["--start", "--max_new_tokens", "0"], "option --start needs a value"),
    (["--sample", "True", "--resume", "True"], "pass one of them"),
    (["--warmup_iters", "100", "--lr_decay_iters", "50"], "ends the decay before the warmup ends"),
    (["--batch_size", str(10**12)], "more than any machine holds"),
    (["--n_layer", str(10**8)], "--n_layer 100000000: more layers than any machine trains (at most 10,000)"),
    (["--n_embd", "4000000", "--n_head", "1"], "parameters: more than any machine trains (at most 1e11)"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(bad, message, corpus, tmp_path):
    out = tmp_path / "out"
    assert message in _refused("--data", corpus, "--out_dir", str(out), *TINY, *bad)
    assert not out.exists()  # not even the out_dir: nothing was prepared


def test_an_out_dir_that_is_a_file_or_empty_is_refused(corpus, tmp_path):
    assert _refused("--data", corpus, "--out_dir", "", *TINY) == "--out_dir is empty: give a value, or leave the option out"
    (tmp_path / "afile").write_text("x")
    assert _refused("--data", corpus, "--out_dir", str(tmp_path / "afile"), *TINY) == \
        f"--out_dir {tmp_path / 'afile'} is a file, not a directory"


def test_a_directory_named_ckpt_pt_is_named_whatever_the_run_asks(corpus, tmp_path):
    (tmp_path / "out" / "ckpt.pt").mkdir(parents=True)   # not "no checkpoint" for --resume, "holds one" for a new run
    for job in ([], ["--resume", "True"], ["--overwrite", "True"], ["--sample", "True"],
                ["--task", "classification", "--task_data", str(tmp_path / "none.jsonl")]):   # fine-tuning's own check
        data = [] if "--task" in job else ["--data", corpus, *TINY]
        assert _refused(*data, "--out_dir", str(tmp_path / "out"), *job) == \
            f"{tmp_path / 'out' / 'ckpt.pt'} is a directory, not a checkpoint: move it away (a run keeps its checkpoint there)"
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "ckpt.pt")   # reading it would wait for a writer for ever
    assert "ckpt.pt is not a regular file, not a checkpoint" in _refused("--out_dir", str(tmp_path / "fifo"), "--resume", "True")


def test_a_run_in_an_out_dir_that_another_run_uses_is_refused_and_changes_nothing(trained, corpus, tmp_path):
    busy, fresh = tmp_path / "busy", tmp_path / "fresh"   # a run's out_dir, before and after its first checkpoint
    shutil.copytree(trained[0], busy)
    fresh.mkdir()
    unlocked = lambda files: {k: v for k, v in files.items() if not k.endswith(".lock")}   # noqa: E731
    before = unlocked(snapshot(tmp_path))
    for out, extra in ((busy, ["--resume", "True"]), (busy, ["--overwrite", "True"]), (busy, []), (fresh, [])):
        with OutDirLockHolder(out):
            data = [] if extra == ["--resume", "True"] else ["--data", corpus]   # a resumed run reads its own
            message = _refused(*data, "--out_dir", str(out), *TINY, *extra)
        assert message.endswith(f"another run holds its lock {out / '.lock'}; wait for that run to end, or "
                                "choose another --out_dir"), message
    assert unlocked(snapshot(tmp_path)) == before
    _refused("--data", str(tmp_path / "missing.txt"), "--out_dir", str(fresh), *TINY)   # in this process, after the lock
    with OutDirLockHolder(fresh):                  # ... which it left free
        pass
    running = str(tmp_path / "running")            # a run holds its lock while it runs
    assert locked_while_running([sys.executable, SCRIPT, "--data", corpus, "--out_dir", running, *TINY, "--max_iters",
                                 "100000", "--eval_interval", "2"], running)


def test_a_torch_compile_that_fails_is_one_line_on_stderr(corpus, tmp_path):
    env = dict(script_env(), CXX="/nonexistent/c++", CC="/nonexistent/cc")   # no C++ compiler for inductor
    proc = subprocess.run([sys.executable, SCRIPT, "--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY,
                           "--max_iters", "1", "--warmup_iters", "0", "--compile", "True"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("train_gpt1.py: error: --compile True: torch.compile failed (")
    assert "C++ compiler" in last and last.endswith("; run without --compile True")


def test_a_bad_option_is_one_line_on_stderr_and_exit_1(corpus, tmp_path):
    # The same through the script: the message, once, and no traceback.
    proc = _train("--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY, "--device", "gpu", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "train_gpt1.py: error: --device gpu: choose auto, cpu, cuda or cuda:N"


def test_help_prints_the_docstring_and_every_option_and_does_nothing_else(tmp_path):
    out = tmp_path / "out"
    for flag in ("--help", "-h"):
        proc = _train("--out_dir", str(out), flag)
        assert proc.stdout.startswith(train_gpt1.__doc__.strip().splitlines()[0]) and proc.stderr == ""
        assert all(f"{name}=" in proc.stdout for name in train_gpt1.DEFAULTS)
    assert not out.exists()
    assert _train("--start", "-h", "--device", "gpu", check=False).returncode == 1  # a value, not --help


@pytest.mark.parametrize("what", ["--resume", "--sample"])
def test_resume_and_sample_refuse_other_model_or_data_options_and_leave_out_dir_untouched(what, trained, corpus, tmp_path):
    out = str(shutil.copytree(trained[0], tmp_path / "run"))
    before = snapshot(out)
    for bad in (["--vocab_size", "300"], ["--data", corpus], ["--val_fraction", "0.2"], ["--preset", "cpu-small"],
                ["--n_layer", "3"], ["--n_head", "4"], ["--n_embd", "64"], ["--block_size", "64"],
                ["--dropout", "0.1"], ["--arch", "lightconv"], ["--kernel_sizes", "3"], ["--weight_dropout", "0.1"]):
        message = _refused(what, "True", "--out_dir", out, *bad)
        assert message.startswith(f"{what} True: {bad[0]} {bad[1]} differs from the checkpoint's"), message
    assert snapshot(out) == before


def test_resume_refuses_an_edited_corpus_and_leaves_out_dir_untouched(trained, tmp_path):
    out = str(shutil.copytree(trained[0], tmp_path / "run"))
    text = os.path.join(os.path.dirname(trained[0]), "corpus.txt")
    before, original = snapshot(out), open(text, encoding="utf-8").read()
    try:
        with open(text, "a", encoding="utf-8") as f:
            f.write("a line that was not there when the run started.\n")
        message = _refused("--resume", "True", "--out_dir", out)
    finally:
        with open(text, "w", encoding="utf-8") as f:
            f.write(original)
    assert message == f"--resume True: the text of {text} has changed since {out}/data was prepared from it; " \
                      "restore it, or start a new run"
    assert snapshot(out) == before


def test_resume_accepts_the_checkpoints_own_values(trained, tmp_path, capsys):
    # Repeating the checkpoint's shape is not a change; max_iters 60 = the checkpoint's step: nothing to train.
    out = str(shutil.copytree(trained[0], tmp_path / "run"))
    train_gpt1.main(["--resume", "True", "--out_dir", out, "--n_layer", "2", "--block_size", "32", "--vocab_size",
                     "200", "--preset", "cpu-tiny", "--max_iters", "60", "--max_new_tokens", "0"])
    assert "resuming at iter 60" in capsys.readouterr().out


def test_a_truncated_or_foreign_checkpoint_is_one_line(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    data = open(os.path.join(trained[0], "ckpt.pt"), "rb").read()
    (out / "ckpt.pt").write_bytes(data[:len(data) // 2])
    for what in ("--resume", "--sample"):
        assert _refused(what, "True", "--out_dir", str(out)).startswith(f"{what} True: cannot read {out}/ckpt.pt (")
    torch.save({"weights": torch.zeros(2)}, out / "ckpt.pt")
    assert _refused("--sample", "True", "--out_dir", str(out)) == \
        f"--sample True: {out}/ckpt.pt is not a train_gpt1.py checkpoint (it has no 'model')"


def test_a_damaged_model_config_is_one_line(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = torch.load(os.path.join(trained[0], "ckpt.pt"), weights_only=True)
    ckpt["model_config"]["n_experts"] = 8  # a field GPT1Config does not have
    torch.save(ckpt, out / "ckpt.pt")
    for what in ("--resume", "--sample"):
        message = _refused(what, "True", "--out_dir", str(out))
        assert message.startswith(f"{what} True: the checkpoint's model_config does not make a GPT-1 ("), message
    del ckpt["model_config"]["n_experts"]
    ckpt["model_config"]["resid_pdrop"] = float("nan")   # GPT1Config's own checks, not a failure in the first step
    torch.save(ckpt, out / "ckpt.pt")
    for what in ("--resume", "--sample"):
        assert "resid_pdrop must be a number in [0, 1], got nan" in _refused(what, "True", "--out_dir", str(out))
    del ckpt["model_config"]["n_layer"]
    torch.save(ckpt, out / "ckpt.pt")
    assert "model_config or data_meta is damaged (KeyError" in _refused("--resume", "True", "--out_dir", str(out))


def test_a_fresh_run_does_not_overwrite_a_checkpoint_unless_told_to(trained, corpus, tmp_path):
    out = str(shutil.copytree(trained[0], tmp_path / "run"))
    before = snapshot(out)
    args = ["--data", corpus, "--out_dir", out, *TINY, "--max_iters", "10", "--eval_interval", "10", "--max_new_tokens", "0"]
    assert _refused(*args) == (f"{out} already holds a checkpoint: pass --resume True to continue it, choose another "
                               "--out_dir, or pass --overwrite True to start over")
    assert snapshot(out) == before
    _train(*args, "--overwrite", "True")  # the old run's checkpoint and log are gone: only the new run's remain
    assert [r["iter"] for r in read_log(out)] == [0, 10]
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 10


def test_a_refused_overwrite_leaves_the_old_run_whole(trained, tmp_path):
    # too little text for a block: refused before out_dir/data is touched, so the old run still resumes
    out = str(shutil.copytree(trained[0], tmp_path / "run"))
    before = snapshot(out)
    short = tmp_path / "short.txt"
    short.write_text("a b c\n", encoding="utf-8")
    message = _refused("--data", str(short), "--out_dir", out, *TINY, "--overwrite", "True")
    assert message.startswith("the train split has") and "fewer than block_size + 1" in message
    assert snapshot(out) == before


def test_a_diverging_run_stops_in_one_line_without_saving(corpus, tmp_path):
    out = tmp_path / "run"
    proc = _train("--data", corpus, "--out_dir", str(out), *TINY, "--learning_rate", "1000", "--warmup_iters", "0",
                  "--max_iters", "30", "--eval_interval", "10", "--max_new_tokens", "0", check=False)
    assert proc.returncode == 1 and "training diverged" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (out / "ckpt.pt").exists()


def test_damaged_checkpoint_entries_and_token_files_are_one_line(trained, tmp_path):
    good = torch.load(os.path.join(trained[0], "ckpt.pt"), weights_only=True)
    weights = dict(good["model"])
    name = next(k for k, t in weights.items() if t.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    short = {**good["model"], name: good["model"][name][:1]}   # torch's first line names no weight: the second does
    opt = {**good["optimizer"], "state": {k: {**v, "exp_avg": torch.zeros(3)} for k, v in good["optimizer"]["state"].items()}}
    negative = {**good["optimizer"], "state": {k: {**v, "exp_avg_sq": -1 - v["exp_avg_sq"]}    # a sum of squares < 0
                                               for k, v in good["optimizer"]["state"].items()}}
    for i, (change, message) in enumerate((({"model": weights}, "NaN or infinite weights"),
                                           ({"model": short}, f"loading state_dict for GPT1: size mismatch for {name}"),
                                           ({"optimizer": negative}, "or holds NaN, infinite or negative accumulators"),
                                           ({"iter_num": -5}, "is damaged (its 'iter_num'"),
                                           ({"rng": {}}, "is damaged (its 'rng'"),
                                           ({"data_dir": 5}, "is damaged (its 'data_dir'"),
                                           ({"optimizer": opt}, "optimizer state does not fit"))):
        out = shutil.copytree(trained[0], tmp_path / f"run{i}")
        torch.save({**good, **change}, out / "ckpt.pt")
        assert message in _refused("--resume", "True", "--out_dir", str(out), "--max_iters", "70"), change
    # a damaged token file (the right size, ids past the vocabulary): --sample refuses it, --resume prepares it
    # again from the corpus (meta.json holds each file's sha256), exactly as it was
    out = shutil.copytree(trained[0], tmp_path / "tokens")
    ids = (out / "data" / "val.bin").read_bytes()
    (out / "data" / "val.bin").write_bytes(b"\xff" * len(ids))
    assert "does not hold the data and tokenizer" in _refused("--sample", "True", "--out_dir", str(out))
    _train("--resume", "True", "--out_dir", str(out), "--max_iters", "62", "--eval_interval", "2", "--max_new_tokens", "0")
    assert (out / "data" / "val.bin").read_bytes() == ids


def test_resume_may_change_the_dtype(trained, tmp_path):
    out = str(shutil.copytree(trained[0], tmp_path / "run"))
    _train("--resume", "True", "--out_dir", out, "--max_iters", "62", "--eval_interval", "2", "--dtype", "float16",
           "--max_new_tokens", "0")


def test_resume_applies_this_runs_weight_decay_and_betas(trained, tmp_path):
    # optimizer.load_state_dict puts back the checkpoint's hyperparameters; the run's options must win, as
    # --learning_rate's do (and the checkpoint's record of its options must be true)
    out = str(shutil.copytree(trained[0], tmp_path / "run"))
    _train("--resume", "True", "--out_dir", out, "--max_iters", "62", "--eval_interval", "2", "--max_new_tokens", "0",
           "--weight_decay", "0.5", "--beta1", "0.8", "--beta2", "0.99")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    assert (ckpt["options"]["weight_decay"], ckpt["options"]["beta1"]) == (0.5, 0.8)


LAUNCHED = {"LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29577"}


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK is set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not: launch several "
                                       "processes with torchrun (or unset RANK)"),
    ({"RANK": "1", "WORLD_SIZE": "1", **LAUNCHED}, "RANK=1, LOCAL_RANK=0, WORLD_SIZE=1: a rank must lie in "
                                                   "[0, WORLD_SIZE)"),   # the rendezvous would wait for ever
    ({"RANK": "abc", "WORLD_SIZE": "2", **LAUNCHED}, "RANK, LOCAL_RANK and WORLD_SIZE must be integers, got RANK='abc'"),
])
def test_rank_without_torchrun_is_one_line(env, message, corpus, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--data", corpus, "--out_dir", str(tmp_path / "run"), *TINY],
                          cwd=ROOT, env={**script_env(), **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"train_gpt1.py: error: {message}"), proc.stderr


# --- the batch builder and the learning-rate schedule, as functions (no subprocess) ---------------------

def test_get_batch_targets_are_the_next_tokens_of_the_stream():
    import numpy as np

    data = np.random.default_rng(0).permutation(5000).astype(np.uint16)  # every token distinct: a token tells its place
    where = {int(t): i for i, t in enumerate(data)}
    x, y = train_gpt1.get_batch(data, np.random.default_rng(1), 64, 16)
    assert x.shape == y.shape == (64, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # shifted by exactly one token
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        s = where[row_x[0]]
        assert row_x == data[s:s + 16].tolist()  # a contiguous slice of the stream
        assert row_y == data[s + 1:s + 17].tolist()  # and its next tokens
    # The same generator state gives the same batch (resume and DDP rely on it).
    again = train_gpt1.get_batch(data, np.random.default_rng(1), 64, 16)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_get_batch_can_draw_every_start_including_the_last():
    # A split of T + 1 tokens (the smallest main() accepts) has exactly one sequence; a split of T + 3 has
    # three starts, and every one of them is drawn: the last token of the stream is a target too.
    import numpy as np

    data = np.arange(9, dtype=np.uint16)
    x, y = train_gpt1.get_batch(data, np.random.default_rng(0), 4, 8)
    assert x.tolist() == [list(range(8))] * 4 and y.tolist() == [list(range(1, 9))] * 4
    data = np.arange(11, dtype=np.uint16)
    x, _ = train_gpt1.get_batch(data, np.random.default_rng(0), 200, 8)
    assert set(x[:, 0].tolist()) == {0, 1, 2}


def _lr_cfg(**kw):
    return {"learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 10, "lr_decay_iters": 110, "max_iters": 200, **kw}


def test_get_lr_warms_up_linearly_then_decays_by_a_cosine_to_min_lr():
    cfg = _lr_cfg()
    lr = [train_gpt1.get_lr(it, cfg) for it in range(200)]
    # warmup: lr·(it + 1)/(warmup + 1), from lr/11 at step 0, up in equal steps
    assert lr[0] == pytest.approx(1e-3 / 11, rel=1e-12)
    assert lr[9] == pytest.approx(1e-3 * 10 / 11, rel=1e-12)
    assert all(b - a == pytest.approx(1e-3 / 11, rel=1e-9) for a, b in zip(lr[:10], lr[1:11]))
    assert lr[10] == pytest.approx(1e-3, rel=1e-12)  # the peak, at the end of the warmup
    # cosine: halfway between warmup and lr_decay_iters, halfway between learning_rate and min_lr
    assert lr[60] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)
    assert lr[35] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4, rel=1e-12)
    assert all(a > b for a, b in zip(lr[10:110], lr[11:111]))  # strictly down all the way
    assert lr[110:] == [1e-4] * 90  # then min_lr to the end


def test_get_lr_decays_to_max_iters_without_lr_decay_iters():
    cfg = _lr_cfg(lr_decay_iters=None, min_lr=0.0, warmup_iters=0)
    assert train_gpt1.get_lr(0, cfg) == pytest.approx(1e-3, rel=1e-12)  # no warmup: the peak at once
    assert train_gpt1.get_lr(100, cfg) == pytest.approx(5e-4, rel=1e-12)  # the middle of 0 ... max_iters 200
    assert train_gpt1.get_lr(200, cfg) == 0.0


# -- the training step's parts, each checked by what it must do to a run -----------------------------------

def test_evaluation_uses_fixed_batches_in_eval_mode(corpus, tmp_path):
    # With a learning rate too small to move a weight, every evaluation must score the same: the same batches
    # (not new ones each time) and no dropout (eval mode), though training runs with dropout.
    out = tmp_path / "r"
    _train("--data", corpus, "--out_dir", str(out), *TINY, "--max_new_tokens", "0", "--max_iters", "30",
           "--eval_interval", "10", "--learning_rate", "1e-30", "--weight_decay", "0", "--warmup_iters", "0",
           "--dropout", "0.1")
    log = read_log(out)
    assert len(log) == 4 and len({r["val_loss"] for r in log}) == 1 and len({r["train_loss"] for r in log}) == 1, log


def test_gradients_are_clipped(corpus, tmp_path):
    # A clip norm of 1e-12 leaves Adam's updates ~1e-4 of the learning rate (eps dominates): nothing is learned.
    out = tmp_path / "r"
    _train("--data", corpus, "--out_dir", str(out), *TINY, "--max_new_tokens", "0", "--max_iters", "20",
           "--eval_interval", "20", "--grad_clip", "1e-12")
    log = read_log(out)
    assert abs(log[-1]["val_loss"] - log[0]["val_loss"]) < 0.05, log


def test_weight_decay_acts_on_matrices_only(corpus, tmp_path):
    # Decoupled decay with lr · weight_decay = 1 sets every decayed weight to 0 in one step; Adam's first step
    # then moves each weight by at most lr. So matrices and embeddings end within lr of 0, LayerNorm gains (and
    # biases, not decayed) within lr of where they started.
    lr, out = 1e-3, tmp_path / "r"
    _train("--data", corpus, "--out_dir", str(out), *TINY, "--max_new_tokens", "0", "--max_iters", "1",
           "--eval_interval", "1", "--learning_rate", str(lr), "--weight_decay", str(1 / lr), "--warmup_iters", "0")
    state = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert_decayed_on_matrices_only(state, lr)
    assert any(n.endswith("ln_1.weight") for n in state) and any(n.endswith("bias") for n in state)


def test_gradient_accumulation_is_the_same_step(corpus, tmp_path):
    # Two micro-batches of 4 sequences must be the step that one batch of 8 is (each micro-batch's loss divided
    # by the number of micro-batches), and the printed step loss the batch's.
    args = ["--data", corpus, *TINY, "--max_new_tokens", "0", "--max_iters", "20", "--eval_interval", "10",
            "--log_interval", "10", "--dropout", "0.0"]
    procs = [_train(*args, "--out_dir", str(tmp_path / str(n)), "--gradient_accumulation_steps", str(n)) for n in (1, 2)]
    for a, b in zip(read_log(tmp_path / "1"), read_log(tmp_path / "2")):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4) and b["iter"] == a["iter"]
    printed = [[float(line.split("loss ")[1].split(",")[0]) for line in p.stdout.splitlines() if line.startswith("iter ")]
               for p in procs]
    assert len(printed[0]) == 2 and printed[1] == pytest.approx(printed[0], abs=2e-4)


def test_float16_clips_the_unscaled_gradients(corpus, tmp_path, monkeypatch):
    # Under float16 the loss is scaled (GradScaler); the gradients must be unscaled before they are clipped,
    # so that the norm clipped is the true one, as in float32.
    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, **kw):
        norm = clip(params, max_norm, **kw)
        norms.append(norm.item())
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    for dtype in ("float32", "float16"):
        train_gpt1.main(["--data", corpus, "--out_dir", str(tmp_path / dtype), *TINY, "--max_new_tokens", "0",
                         "--max_iters", "1", "--eval_interval", "1", "--warmup_iters", "0", "--dtype", dtype])
    assert len(norms) == 2 and norms[1] == pytest.approx(norms[0], rel=0.05), norms


def test_resume_drops_log_records_written_after_the_checkpoint(corpus, tmp_path):
    # A run killed between a log record and its checkpoint leaves a record the checkpoint does not know; the
    # resumed run drops it and logs that evaluation anew.
    out = tmp_path / "r"
    _train("--data", corpus, "--out_dir", str(out), *TINY, "--max_new_tokens", "0", "--max_iters", "20",
           "--eval_interval", "10")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 30, "train_loss": 9.0, "val_loss": 9.0, "lr": 0.0, "tokens_per_s": 1.0}\n')
    _train("--resume", "True", "--out_dir", str(out), "--max_iters", "30")
    log = read_log(out)
    assert [r["iter"] for r in log] == [0, 10, 20, 30] and log[-1]["val_loss"] != 9.0


# -- sampling: what sample() hands to generate ---------------------------------------------------------

def _sample(tmp_path, monkeypatch, capsys, **options):
    src, out = _write(tmp_path / "t.txt", PLAY), tmp_path / "data"
    meta = D.prepare_gpt1(str(src), str(out), vocab_size=100)
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=meta["vocab_size"]))
    seen, generate = {}, model.generate

    def recording(idx, max_new_tokens, **kw):
        seen.update(idx=idx.clone(), max_new_tokens=max_new_tokens, **kw)
        return generate(idx, max_new_tokens, **kw)
    monkeypatch.setattr(model, "generate", recording)
    cfg = {"start": "", "seed": 3, "num_samples": 2, "max_new_tokens": 4, "temperature": 0.8, "top_k": 200, **options}
    train_gpt1.sample(cfg, model, str(out), "cpu", contextlib.nullcontext())
    return seen, BPETokenizer.load(str(out)), str(out), capsys.readouterr().out


def test_sample_passes_temperature_and_top_k_and_zero_means_no_top_k(tmp_path, monkeypatch, capsys):
    seen, *_ = _sample(tmp_path, monkeypatch, capsys, temperature=0.37, top_k=0)
    assert seen["temperature"] == 0.37 and seen["top_k"] is None and seen["max_new_tokens"] == 4
    seen, *_ = _sample(tmp_path / "b", monkeypatch, capsys, top_k=7)
    assert seen["top_k"] == 7 and seen["temperature"] == 0.8


def test_sample_without_start_continues_the_first_validation_tokens(tmp_path, monkeypatch, capsys):
    seen, tok, data_dir, printed = _sample(tmp_path, monkeypatch, capsys)
    val = [int(t) for t in D.load_tokens(data_dir, "val")[:8]]
    assert seen["idx"].tolist() == [val, val]                            # num_samples rows of the val prompt
    samples = [p.strip() for p in printed.split("-" * 60)[1:-1]]
    assert len(samples) == 2 and all(p.startswith(tok.decode(val)) for p in samples)   # printed with its prompt
    seen, tok, _, printed = _sample(tmp_path / "b", monkeypatch, capsys, start="the king", num_samples=1)
    assert seen["idx"].tolist() == [tok.encode("the king")]
    assert printed.split("-" * 60)[1].strip().startswith("the king")


def test_sample_runs_the_model_in_the_dtypes_precision(trained, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    seen, generate = [], GPT1.generate

    def recording(self, *args, **kw):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return generate(self, *args, **kw)
    monkeypatch.setattr(GPT1, "generate", recording)
    for dtype in ("bfloat16", "float32"):
        assert train_gpt1.main(["--sample", "True", "--out_dir", out, "--max_new_tokens", "3", "--dtype", dtype,
                                "--device", "cpu"]) in (0, None)
    assert seen == [torch.bfloat16, None]


def test_the_loss_plot_leaves_out_records_that_are_not_evaluations(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 0, "train_loss": 5.0, "val_loss": 5.1}\n{"iter": 1}\n{"iter": 2, "train_loss": 4.0, '
                   '"val_loss": null}\n' + "[" * 100_000 + '\n{"iter": 3, "train_loss": 3.0, "val_loss": 3.2}\n'
                   '{"iter": 4, "train_loss": 2.0}\n{"iter": 5, "train_loss": 2.0, "val_loss": "n/a"}\n')
    train_gpt1.plot_losses(str(log), str(tmp_path / "loss.png"))   # a hand-edited log: no traceback
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("script, argv, prefix", [("train_elmo.py", ["--batch_size", "-4"], "train_elmo.py: "),
                                                  ("train_gpt1.py", ["--seed", "-1"], "train_gpt1.py: error: ")])
def test_rank_minus_one_is_one_process_that_says_its_errors(script, argv, prefix):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                          env={**script_env(), "RANK": "-1"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith(prefix), proc.stderr


def test_finetuning_refuses_any_world_size_but_one(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(train_gpt1.UserError, match="fine-tuning runs in one process"):
        train_gpt1.main(["--task", "classification", "--task_data", str(tmp_path / "t.jsonl"),
                         "--out_dir", str(tmp_path / "o")])
