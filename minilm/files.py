"""Files that survive a kill. The tokenizer, token files, checkpoints, ELMo features and plots are written
whole by write_atomic; a log gets one line appended per evaluation, and a resumed run rewrites it (atomically)
without the lines an interrupted run wrote after its last checkpoint. A kill in the middle of a write can
leave a hidden `.tmp-*` file beside the target, never half of the target; such a file can be deleted (the
next run in an out_dir deletes a checkpoint's, see lock_out_dir).
Here too: how the scripts turn a failed write (os_error_line) or allocation (is_out_of_memory) into one line."""
import functools
import io
import json
import os
import sys
import tempfile

import torch


def torchrun_ranks():
    """(rank, local_rank, world) from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE; LOCAL_RANK 0
    when unset), or a one-line ValueError for values no launcher sets, which would otherwise end in a
    traceback or, for a RANK outside [0, WORLD_SIZE), a rendezvous that waits for ever."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    values = [os.environ.get(name, "0") for name in names]
    try:
        rank, local_rank, world = (int(v) for v in values)
    except ValueError:
        raise ValueError("RANK, LOCAL_RANK and WORLD_SIZE must be integers, got "
                         + ", ".join(f"{n}={v!r}" for n, v in zip(names, values))) from None
    if not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world}: a rank must lie in "
                         "[0, WORLD_SIZE) and LOCAL_RANK be >= 0 (launch the processes with torchrun)")
    return rank, local_rank, world


def torchrun_launch(need_local_rank=True):
    """A script's check that torchrun started it (RANK is set): (rank, local_rank, world), or a one-line
    ValueError when a variable torchrun sets is missing (LOCAL_RANK only where it picks the GPU) or holds
    a value no launcher sets (torchrun_ranks)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [v for v in names if v not in os.environ and (v != "LOCAL_RANK" or need_local_rank)]
    if missing:
        raise ValueError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                         "launch several processes with torchrun (or unset RANK)")
    return torchrun_ranks()


def os_error_line(e):
    """An OSError (a full disk, a read-only or missing directory) as one line: "path: reason"."""
    return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"


FLOAT32_MAX = torch.finfo(torch.float32).max


def beyond_float32(option, value):
    """The one-line error for an option whose value the optimizers, which compute in float32, cannot hold; None
    for one they can."""
    if value > FLOAT32_MAX:
        return f"--{option} {value} is beyond float32's range (at most {FLOAT32_MAX:.4g})"
    return None


def is_out_of_memory(e):
    """Whether an exception is an allocation failure, which the scripts report in one line (a smaller batch is the
    fix, not a traceback): Python's MemoryError, torch's RuntimeError from the CPU allocator (CUDA's
    OutOfMemoryError is a RuntimeError saying "out of memory" too), or a size whose byte count overflows."""
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("can't allocate memory", "out of memory", "Storage size calculation overflowed"))


def printable_output():
    """Let the script's stdout and stderr print any path: a file name that is not UTF-8 (which Python holds as
    surrogates) comes out with backslash escapes, where a strict stream (PYTHONIOENCODING=utf-8, most UTF-8
    locales) would end the run with a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def first_line(e, lines=1):
    """An exception's message cut to its first line (or first `lines` lines, joined), its type's name when it
    has none, for one-line errors."""
    return " ".join(line.strip() for line in str(e).strip().splitlines()[:lines]).rstrip(":") or type(e).__name__


def out_dir_problem(out_dir):
    """Why out_dir cannot hold a run's checkpoint, in one line, or None: it is a file, or its ckpt.pt is not a
    file (a directory of that name would have --resume find no checkpoint, a new run find one in the way, and
    --overwrite True train until its first save failed)."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"--out_dir {out_dir} is a file, not a directory"
    if os.path.exists(ckpt_path) and not os.path.isfile(ckpt_path):
        what = "a directory" if os.path.isdir(ckpt_path) else "not a regular file"
        return f"{ckpt_path} is {what}, not a checkpoint: move it away (a run keeps its checkpoint there)"
    return None


def state_dict_error_line(e):
    """Why load_state_dict refused a checkpoint's weights, on one line: torch's first line says only "Error(s) in
    loading state_dict for GPT1:", so its second, which names the missing, unexpected or misshapen weights,
    joins it (cut at 300 characters: a list of missing keys can run to thousands)."""
    text = first_line(e, lines=2)
    return text if len(text) <= 300 else text[:297] + "..."


def load_error_line(e):
    """Why torch.load could not read a file, on one line: the error's first sentence, after the exception's
    name where the message alone is a bare value (a text file read as a checkpoint: KeyError '101')."""
    first = first_line(e).split(". ")[0]
    return first if " " in first or first == type(e).__name__ else f"{type(e).__name__} {first}"


def compile_error_line(e):
    """The one-line message for a failure of torch.compile (its errors come from torch._dynamo or
    torch._inductor: no working C++ compiler, an unsupported platform, ...), which --compile True turned on;
    None for any other exception."""
    if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return None
    inner = getattr(e, "inner_exception", None)   # dynamo's BackendCompilerFailed wraps the backend's error
    if inner is not None:
        e = inner
        text = f"{type(e).__name__}: {e}"
    else:
        text = str(e)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"--compile True: torch.compile failed ({first[:300]}); run without --compile True"


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
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename == tmp and e.errno is not None:   # e.g. path is a directory
            raise OSError(e.errno, e.strerror, path) from None   # name the user's file, not the hidden temporary
        raise


def make_dirs(path):
    """os.makedirs(path, exist_ok=True), returning the directories it created, innermost first (remove_dirs
    takes them away again when a run fails before writing anything)."""
    made, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return made


_LOCKS = {}  # out_dir (real path) -> the open lock file this process holds


def lock_out_dir(out_dir):
    """Hold an exclusive lock on out_dir (flock on its file .lock) while this run goes on (until the function that
    releases_out_dir_locks marks returns, or the process ends, a kill too, so a stale lock never blocks), so
    that a second run started in the same out_dir (or a --resume of a run still going) is refused instead of
    splicing its log and checkpoint with this one's. False when another process holds it; True otherwise (also
    where the platform or the file system has no flock: then nothing is locked). Taking it removes the
    temporaries of checkpoints that a killed run left (a checkpoint is hundreds of MB; only the lock's holder
    writes them, so none is in use)."""
    key, path = os.path.realpath(out_dir), os.path.join(out_dir, ".lock")
    if key in _LOCKS:
        try:
            if os.fstat(_LOCKS[key].fileno()).st_ino == os.stat(path).st_ino:
                return True     # this process holds it already
        except OSError:
            pass
        _LOCKS.pop(key).close()   # out_dir was removed and made again since: that lock guards nothing
    try:
        import fcntl
    except ImportError:     # Windows
        return True
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    except OSError:         # a file system without locks (some network mounts)
        f.close()
        return True
    _LOCKS[key] = f
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-") and name.endswith("-ckpt.pt"):   # write_atomic's name for ckpt.pt
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass
    return True


def out_dir_in_use(out_dir):
    """Whether another process holds out_dir's lock (nothing is taken)."""
    if os.path.realpath(out_dir) in _LOCKS or not os.path.exists(os.path.join(out_dir, ".lock")):
        return False
    held = set(_LOCKS)
    if not lock_out_dir(out_dir):
        return True
    _release_locks_taken_since(held)
    return False


def out_dir_busy(out_dir):
    """The one-line error for an out_dir whose lock another process holds."""
    return (f"--out_dir {out_dir} is in use: another run holds its lock {os.path.join(out_dir, '.lock')}; wait for "
            "that run to end, or choose another --out_dir")


def unlock_out_dir(out_dir):
    """Release lock_out_dir's lock and remove its file (before remove_dirs takes away an out_dir this run made)."""
    f = _LOCKS.pop(os.path.realpath(out_dir), None)
    if f is not None:
        try:
            os.remove(f.name)
        except OSError:
            pass
        f.close()


def releases_out_dir_locks(fn):
    """Decorator of a run's entry point (the scripts' main, finetune): the out_dir locks that the run takes are
    released when it returns or raises, so that a run called in-process (a test, a notebook) leaves its
    out_dir free for the next one."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        held = set(_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            _release_locks_taken_since(held)
    return run


def _release_locks_taken_since(held):
    """Release the out_dir locks taken since `held` (a set of _LOCKS' keys) was read."""
    for key in set(_LOCKS) - held:
        _LOCKS.pop(key).close()


def remove_dirs(made):
    """Remove the directories make_dirs created, innermost first, while they are empty (one already gone
    is passed over)."""
    for path in made:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            continue
        except OSError:     # not empty: it, and the directories above it, stay
            return


def save_checkpoint(path, state):
    """torch.save(state) to path, atomically. Checkpoints hold plain types only (tensors, numbers,
    strings, lists, dicts), so torch.load(path, weights_only=True) reads them."""
    try:
        write_atomic(path, lambda f: torch.save(state, f))
    except RuntimeError as e:       # torch.save's writer reports a full disk as a RuntimeError
        raise OSError(f"cannot write {path}: {(str(e).strip().splitlines() or [''])[0]}") from None


OPTIMIZER_STATE_UNFIT = "its optimizer state does not fit the model, or holds NaN, infinite or negative accumulators"
SECOND_MOMENTS = ("sum", "exp_avg_sq")   # Adagrad's and Adam(W)'s sums of squared gradients: never negative


def optimizer_state_fits(optimizer):
    """Whether an optimizer's state, as a checkpoint's load_state_dict gave it, has its parameters' shapes and
    values a run can reach: finite, and second moments not negative (a damaged or foreign checkpoint would
    otherwise fail inside the first step, or train on to a NaN loss that looks like divergence)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                    continue
                if (v.dim() > 0 and v.shape != p.shape) or not torch.isfinite(v).all():
                    return False
                if name in SECOND_MOMENTS and (v < 0).any():
                    return False
    return True


def set_adamw_options(optimizer, options):
    """On resume, after optimizer.load_state_dict (which puts back the checkpoint's hyperparameters with its
    moments): this run's weight decay (group 0: matrices; group 1: none) and betas, as the learning rate is
    set at every step, so that a --weight_decay, --beta1 or --beta2 given on resume is not ignored."""
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = options["weight_decay"], 0.0
    for group in optimizer.param_groups:
        group["betas"] = (options["beta1"], options["beta2"])


def weights_finite(state_dict):
    """Whether a checkpoint's state dict holds tensors only, each floating one free of NaN and infinity (a
    damaged file, or a run that diverged, fails)."""
    return all(isinstance(t, torch.Tensor) and (not t.is_floating_point() or torch.isfinite(t).all())
               for t in state_dict.values())


def truncate_log(log_path, last_iter):
    """Keep the evaluations of a JSON-lines log up to last_iter (a resumed run redoes those that an
    interrupted one logged after its last checkpoint, and drops a last line that a kill cut short)."""
    keep, lines = [], []
    if os.path.exists(log_path):
        with open(log_path, "rb") as f:       # a line that is not UTF-8 is not a record (below)
            lines = io.StringIO(f.read().decode("utf-8", errors="replace"), newline="\n").readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            it = json.loads(line)["iter"]
            if type(it) is not int:
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):   # RecursionError: a line of nested brackets
            if n == len(lines) and not line.endswith("\n"):
                break                   # an append cut short: that evaluation came after the checkpoint
            raise ValueError(f"{log_path}, line {n}, is not an evaluation record: delete that line (or the log) "
                             "and resume again") from None
        if it <= last_iter:
            keep.append(line if line.endswith("\n") else line + "\n")   # the next evaluation starts a new line
    write_atomic(log_path, "".join(keep).encode("utf-8"))
