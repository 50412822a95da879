"""Helpers for the tests that run train_gpt1.py / train_elmo.py as subprocesses."""
import json
import os

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
