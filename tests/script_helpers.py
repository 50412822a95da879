"""Helpers for the tests that run train_gpt1.py / train_elmo.py as subprocesses."""
import json
import os
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_env():
    """The environment of a training subprocess: this checkout importable, one thread (deterministic and
    quick), and no torchrun variables inherited from the test process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def read_log(out_dir):
    """The JSON lines a training run appended to out_dir/log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def kill_at_first_checkpoint(cmd, out_dir, timeout=240):
    """Run cmd (a training run writing to out_dir) and SIGKILL it as soon as out_dir/ckpt.pt is on disk.
    Returns the finished process (its returncode is -SIGKILL unless the run ended first)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(out_dir, "ckpt.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc
