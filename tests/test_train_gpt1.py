"""train_gpt1.py end to end on a tiny corpus: logging, checkpoints, sampling, resume after SIGKILL, DDP, errors."""
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from script_helpers import kill_at_first_checkpoint, read_log, script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt1.py")
TINY = ["--preset", "cpu-tiny", "--vocab_size", "200", "--eval_iters", "2", "--log_interval", "1000"]


def _train(*args, check=True, timeout=240):
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
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


def test_training_logs_learns_checkpoints_and_samples(corpus, tmp_path):
    out = str(tmp_path / "run")
    proc = _train("--data", corpus, "--out_dir", out, *TINY, "--max_iters", "60", "--eval_interval", "20",
                  "--max_new_tokens", "12")
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
def test_torchrun_two_processes_match_one_process(corpus, tmp_path):
    # Dropout 0: each rank draws its own dropout masks, which no single process reproduces; everything
    # else -- batches, slices, gradient averaging, evaluation batches -- is the same computation, so the
    # losses agree up to float summation order (DDP averages gradients in a different order).
    args = ["--data", corpus, *TINY, "--max_iters", "30", "--eval_interval", "10", "--batch_size", "8",
            "--dropout", "0.0", "--max_new_tokens", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _train(*args, "--out_dir", one)
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*cmd, "--standalone", "--nproc_per_node", "2", SCRIPT, *args, "--out_dir", two],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), batch 8 = 2 × 4" in proc.stdout
    a, b = read_log(one), read_log(two)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [0, 10, 20, 30]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (key, ra, rb)
    assert b[-1]["val_loss"] < b[0]["val_loss"] - 0.5  # and it trained


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
