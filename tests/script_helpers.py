"""Helpers for the tests that run train_gpt1.py / train_elmo.py as subprocesses."""
import json
import os
import signal
import subprocess
import sys
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


def assert_decayed_on_matrices_only(state, lr):
    """For a model state after one step with lr · weight_decay = 1 (decoupled decay zeroes every decayed weight,
    then Adam's first step moves each weight by at most lr): matrices and embeddings lie within lr of 0,
    LayerNorm gains (not decayed) within lr of 1."""
    for name, p in state.items():
        if p.dim() >= 2:
            assert p.abs().max() <= lr * 1.01, name
        elif name.endswith(("ln_1.weight", "ln_2.weight")):
            assert (p - 1).abs().max() <= lr * 1.01, name


def load_script(name):
    """A training script (e.g. "train_gpt1") imported as a module, to call its main() in this process: the
    quick way to check options that must be refused before any work is done."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(directory):
    """{relative path: bytes} of every file under directory: to show that a refused run changed nothing."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


class OutDirLockHolder:
    """Another process holding out_dir's lock (minilm.files.lock_out_dir), as a run in it would: `with
    OutDirLockHolder(out_dir):` ... ; the lock goes when the process is killed on leaving the block."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def __enter__(self):
        code = ("import sys, time; from minilm.files import lock_out_dir; "
                "print(lock_out_dir(sys.argv[1]), flush=True); time.sleep(600)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, self.out_dir], cwd=ROOT, env=script_env(),
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "True"
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def locked_elsewhere(out_dir):
    """Whether another process finds out_dir's lock taken (minilm.files.lock_out_dir answers False there)."""
    code = "import sys; from minilm.files import lock_out_dir; print(lock_out_dir(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=60)
    return proc.stdout.strip() == "False"


def locked_while_running(cmd, out_dir, timeout=240):
    """Start cmd (a training run into out_dir), and once its first checkpoint is on disk, whether another process
    finds out_dir locked; the run is then killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not os.path.exists(os.path.join(out_dir, "ckpt.pt")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before its lock was looked at"
        return locked_elsewhere(out_dir)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
