"""minilm.files: the atomic writer's helpers that the training scripts share."""
import json
import os

import pytest

from minilm.files import FLOAT32_MAX, beyond_float32, compile_error_line, load_error_line, lock_out_dir, out_dir_in_use, make_dirs, os_error_line, remove_dirs, truncate_log, unlock_out_dir, write_atomic


def _log(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_truncate_log_keeps_the_records_up_to_the_checkpoint_each_on_its_own_line(tmp_path):
    rec = lambda it: json.dumps({"iter": it, "val_loss": 1.0 / (it + 1)})  # noqa: E731
    # the last record has no newline (a hand edit, or a kill right after the record): kept, and ended, so
    # that the next evaluation appended to the log starts a line of its own
    log = _log(tmp_path / "a.jsonl", f"{rec(0)}\n{rec(10)}\n{rec(20)}")
    truncate_log(log, 20)
    with open(log, "a") as f:
        f.write(rec(30) + "\n")
    assert [json.loads(line)["iter"] for line in open(log)] == [0, 10, 20, 30]
    # records after the checkpoint go; a last line a kill cut short goes too
    log = _log(tmp_path / "b.jsonl", f"{rec(0)}\n{rec(10)}\n\n{rec(20)}\n" + rec(30)[:9])
    truncate_log(log, 10)
    assert open(log).read() == f"{rec(0)}\n{rec(10)}\n"
    # a damaged line anywhere else is an error that names the file and the line, and changes nothing
    text = f"{rec(0)}\nnot json\n{rec(10)}\n"
    log = _log(tmp_path / "c.jsonl", text)
    with pytest.raises(ValueError, match=r"c\.jsonl, line 2, is not an evaluation record"):
        truncate_log(log, 10)
    assert open(log).read() == text
    for bad in (b'{"iter": "5"}', b"\xff\xfe", b"[" * 100_000):   # not an int; not UTF-8; nested past the parser's depth
        log = tmp_path / "d.jsonl"
        log.write_bytes(f"{rec(0)}\n".encode() + bad + f"\n{rec(10)}\n".encode())
        with pytest.raises(ValueError, match=r"d\.jsonl, line 2, is not an evaluation record"):
            truncate_log(str(log), 10)
    truncate_log(str(tmp_path / "missing.jsonl"), 10)          # no log yet: an empty one
    assert open(tmp_path / "missing.jsonl").read() == ""


def test_make_dirs_and_remove_dirs_take_away_only_what_they_made(tmp_path):
    made = make_dirs(tmp_path / "a" / "b" / "c")
    assert made == [str(tmp_path / "a" / "b" / "c"), str(tmp_path / "a" / "b"), str(tmp_path / "a")]
    remove_dirs([str(tmp_path / "a" / "b" / "c" / "data"), *made])   # one that never existed is passed over
    assert os.listdir(tmp_path) == []
    made = make_dirs(tmp_path / "x" / "y")
    write_atomic(str(tmp_path / "x" / "keep.txt"), b"the user's")
    remove_dirs(made)                                             # y goes; x holds a file, so it stays
    assert os.listdir(tmp_path / "x") == ["keep.txt"]
    assert make_dirs(tmp_path / "x") == []                        # already there: nothing made


def test_a_failed_atomic_write_names_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "loss.png"
    target.mkdir()                         # a directory where the file should go: the rename fails
    with pytest.raises(OSError) as info:
        write_atomic(str(target), b"png")
    assert info.value.filename == str(target) and os_error_line(info.value).startswith(f"{target}: ")
    assert os.listdir(tmp_path) == ["loss.png"] and os.listdir(target) == []


def test_torchrun_ranks_refuses_a_negative_local_rank(monkeypatch):
    from minilm.files import torchrun_ranks
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="LOCAL_RANK be >= 0"):
        torchrun_ranks()
    monkeypatch.setenv("LOCAL_RANK", " 0 ")
    assert torchrun_ranks() == (0, 0, 1)


def test_an_out_dir_lock_is_refused_while_another_process_holds_it_and_free_once_it_is_gone(tmp_path):
    from script_helpers import OutDirLockHolder

    with OutDirLockHolder(tmp_path):
        assert lock_out_dir(str(tmp_path)) is False
    assert lock_out_dir(str(tmp_path)) is True      # the holder was killed: no stale lock
    assert lock_out_dir(str(tmp_path)) is True      # this process holds it already
    unlock_out_dir(str(tmp_path))
    assert not (tmp_path / ".lock").exists()


def test_a_torch_compile_failure_is_one_line_and_other_errors_are_not_taken_for_one():
    CompileFailure = type("InductorError", (RuntimeError,), {"__module__": "torch._inductor.exc"})
    e = CompileFailure("InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1 for more")
    assert compile_error_line(e) == ("--compile True: torch.compile failed (InvalidCxxCompiler: No working C++ "
                                     "compiler found); run without --compile True")
    assert compile_error_line(RuntimeError("InvalidCxxCompiler")) is None
    # older torch: dynamo's BackendCompilerFailed, whose own text starts "backend='inductor' raised:", wraps it
    Wrapper = type("BackendCompilerFailed", (RuntimeError,), {"__module__": "torch._dynamo.exc"})
    wrapped = Wrapper("backend='inductor' raised:\nInvalidCxxCompiler: No working C++ compiler found")
    wrapped.inner_exception = RuntimeError("No working C++ compiler found")
    assert compile_error_line(wrapped) == ("--compile True: torch.compile failed (RuntimeError: No working C++ "
                                           "compiler found); run without --compile True")


def test_an_out_dir_made_again_is_locked_again_and_out_dir_in_use_takes_nothing(tmp_path):
    import shutil

    from script_helpers import OutDirLockHolder, locked_elsewhere

    out = tmp_path / "out"
    out.mkdir()
    assert lock_out_dir(str(out))
    shutil.rmtree(out)
    out.mkdir()                                   # the old lock guards nothing now: taken again
    assert lock_out_dir(str(out)) is True and locked_elsewhere(out)
    shutil.rmtree(out)
    out.mkdir()
    with OutDirLockHolder(out):                   # ... unless another run took the new one first
        assert lock_out_dir(str(out)) is False
        assert out_dir_in_use(str(out)) is True
    unlock_out_dir(str(out))
    assert out_dir_in_use(str(tmp_path / "missing")) is False
    empty = tmp_path / "empty"
    empty.mkdir()
    assert out_dir_in_use(str(empty)) is False and list(empty.iterdir()) == []   # no .lock made
    (empty / ".lock").touch()
    assert out_dir_in_use(str(empty)) is False and not locked_elsewhere(empty)   # the probe kept nothing


def test_taking_an_out_dir_lock_removes_the_checkpoint_temporaries_that_a_killed_run_left(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"the last whole checkpoint")
    # a run killed in the middle of writing its next checkpoint: write_atomic's temporary stays
    kill = ("import os, sys; from minilm.files import write_atomic; "
            "write_atomic(sys.argv[1], lambda f: (f.write(b'half of a checkpoint'), f.flush(), os._exit(9)))")
    subprocess.run([sys.executable, "-c", kill, str(out / "ckpt.pt")], check=False)
    (left,) = [p for p in out.iterdir() if p.name != "ckpt.pt"]
    features = out / ".tmp-x1y2-elmo_features.npz"   # --embed writes without the lock: not the lock's to remove
    features.write_bytes(b"features being written")
    assert lock_out_dir(str(out))
    assert not left.exists() and features.exists()
    assert (out / "ckpt.pt").read_bytes() == b"the last whole checkpoint"
    unlock_out_dir(str(out))


def test_load_error_line_names_the_exception_where_the_message_is_a_bare_value(tmp_path):
    import torch

    # a text file read as a checkpoint: the unpickler's KeyError says only the byte it stopped at
    assert load_error_line(KeyError(101)) == "KeyError 101"
    assert load_error_line(RuntimeError("")) == "RuntimeError"
    assert load_error_line(RuntimeError("a sentence. And more.\nline 2")) == "a sentence"
    half = tmp_path / "half.pt"
    torch.save({"w": torch.ones(8)}, half)
    half.write_bytes(half.read_bytes()[:200])           # a write cut short
    with pytest.raises(Exception) as e:
        torch.load(half, map_location="cpu", weights_only=True)
    line = load_error_line(e.value)
    assert " " in line and "\n" not in line


def test_compile_error_line_skips_blank_lines_and_is_bounded_and_float32s_largest_is_allowed():
    CompileFailure = type("InductorError", (RuntimeError,), {"__module__": "torch._inductor.exc"})
    assert "(real first line)" in compile_error_line(CompileFailure("\n  \nreal first line\nmore"))
    assert len(compile_error_line(CompileFailure("x" * 5000))) < 400
    assert beyond_float32("learning_rate", FLOAT32_MAX) is None
    assert beyond_float32("learning_rate", FLOAT32_MAX * 1.0000001) is not None
