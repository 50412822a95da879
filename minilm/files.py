"""Files that survive a kill: everything minilm writes (the tokenizer, token files, checkpoints, logs)
goes through write_atomic, so an interrupted run never leaves half a file behind."""
import json
import os
import tempfile

import torch


def write_atomic(path, data):
    """data (bytes, or a function that writes into a binary file) into a temporary file beside path,
    fsync'd, then renamed to path: a kill or a power cut leaves the old file or the new one, never half
    of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path, state):
    """torch.save(state) to path, atomically. Checkpoints hold plain types only (tensors, numbers,
    strings, lists, dicts), so torch.load(path, weights_only=True) reads them."""
    write_atomic(path, lambda f: torch.save(state, f))


def truncate_log(log_path, last_iter):
    """Keep the evaluations of a JSON-lines log up to last_iter (a resumed run redoes those that an
    interrupted one logged after its last checkpoint)."""
    keep = []
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line)["iter"] <= last_iter]
    write_atomic(log_path, "".join(keep).encode("utf-8"))
