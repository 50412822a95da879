"""GPT-1 BPE tokenizer: pre-tokenisation, merges by rank, training, files, and parity with HF."""
import json
import os
import unicodedata

import pytest

from minilm.bpe import EOW, UNK, BPETokenizer, DataError, basic_tokenize

VARIED = [
    "",
    "Hello, World!",
    "To be, or not to be: that is the question.",
    "Don't stop--the 3 quick (brown) foxes #42 $9.99 a+b=c <tag> x^2 ~tilde~ back`tick",
    "Ünïcode naïve café résumé ÀÉÎÕÜ Straße",
    "中文字符 and 日本語のテキスト",
    "대한민국 헌법 제1조 대한민국은 민주공화국이다.",
    "tabs\tand\nnew\r\nlines   and\u00a0nbsp\u3000ideographic space",
    "control\x00chars\x07and\u200bzero width\ufeffbom",
    "ΣΑΣ σας Ἀθῆναι İstanbul ǅ ﬁ",
    "«quotes» “curly” ‘single’ — dashes – and… ellipsis",
    "123 4567 89.0 1,000,000 ٣٤٥",
    "unseen letters: ж ק ღ ✓",
    # the first and last code point of each CJK block that BERT's normaliser splits off (minilm.bpe._CJK_RANGES)
    "x\u4e00\u9fffx\u3400\u4dbfx\U00020000\U0002a6dfx\U0002a700\U0002b73fx\U0002b740\U0002b81fx"
    "\U0002b920\U0002ceafx\uf900\ufaffx\U0002f800\U0002fa1fx",
    "a<unk>b <unk> literal",
    "aaaaaa bbbbbb abababab",
]

CORPUS = "\n".join(VARIED[1:-4]) * 3 + "\nthe the the then there theory"


def test_basic_tokenize_lowercases_strips_accents_and_splits_punctuation():
    assert basic_tokenize("Héllo, World!") == ["hello", ",", "world", "!"]
    assert basic_tokenize("don't  a+b") == ["don", "'", "t", "a", "+", "b"]
    assert basic_tokenize("中文 ok") == ["中", "文", "ok"]  # CJK ideographs are words of their own
    cjk = VARIED[-3]  # every CJK block's first and last code point, between x's: each one a word
    assert basic_tokenize(cjk) == list(unicodedata.normalize("NFD", cjk))  # (NFD maps U+F900 to U+8C48)
    assert basic_tokenize("a\x00b\u200bc") == ["abc"]  # control and format characters are dropped
    assert basic_tokenize("a\u00a0b\u3000c") == ["a", "b", "c"]  # any Unicode space separates
    assert basic_tokenize("") == [] and basic_tokenize(" \n\t") == []


def test_basic_tokenize_matches_hf_normalizer_and_pretokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    norm = tokenizers.normalizers.BertNormalizer(lowercase=True)
    pre = tokenizers.pre_tokenizers.BertPreTokenizer()
    for text in VARIED:
        expected = [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]
        assert basic_tokenize(text) == expected, text


def _toy(merges):
    """A hand-written vocab/merges pair: a, b, c in both forms plus the merge results."""
    symbols = ["a", "b", "c"]
    vocab = [UNK] + symbols + [s + EOW for s in symbols] + ["".join(m) for m in merges]
    return BPETokenizer({t: i for i, t in enumerate(vocab)}, merges)


def test_merges_apply_by_rank():
    # "abc" -> a b c</w>: whichever merge has the lower rank wins, whatever its position.
    tok = _toy([("a", "b"), ("b", "c" + EOW)])
    assert [tok.decoder[i] for i in tok.encode("abc")] == ["ab", "c" + EOW]
    tok = _toy([("b", "c" + EOW), ("a", "b")])
    assert [tok.decoder[i] for i in tok.encode("abc")] == ["a", "bc" + EOW]
    # every non-overlapping occurrence of the best pair is merged, left to right
    tok = _toy([("a", "b")])
    assert [tok.decoder[i] for i in tok.encode("ababa")] == ["ab", "ab", "a" + EOW]
    # a character that is not in the vocabulary is <unk> (id 0); its neighbours stay as they are
    assert tok.encode("azb") == [tok.encoder["a"], 0, tok.encoder["b" + EOW]]


def test_train_merges_most_frequent_pair_first():
    tok = BPETokenizer.train("ab ab ab cd", vocab_size=100)
    assert tok.merges[0] == ("a", "b" + EOW)  # 3 occurrences beat ("c", "d</w>") with 1
    assert tok.encode("ab") == [tok.encoder["ab" + EOW]]
    # base vocabulary: <unk>, characters by frequency, then their </w> forms
    assert [tok.decoder[i] for i in range(5)] == [UNK, "a", "b", "c", "d"]


def test_train_order_counts_words_then_breaks_ties_by_the_smaller_pair():
    # Word counts matter: "cd" three times beats "ab" once, although ("a", "b</w>") sorts first.
    assert BPETokenizer.train("cd cd cd ab", vocab_size=100).merges[:2] == [("c", "d" + EOW), ("a", "b" + EOW)]
    # A tie (one each) goes to the lexicographically smaller pair, whatever the order in the text.
    assert BPETokenizer.train("cd ab", vocab_size=100).merges[:2] == [("a", "b" + EOW), ("c", "d" + EOW)]
    # The base alphabet is by frequency (z: 6), not alphabetical; equal counts (a, b: 1) alphabetical.
    tok = BPETokenizer.train("zz zz zz ab", vocab_size=100)
    assert [tok.decoder[i] for i in range(7)] == [UNK, "z", "a", "b", "z" + EOW, "a" + EOW, "b" + EOW]


def test_train_stops_cleanly_when_no_pair_is_left():
    tok = BPETokenizer.train("aaa bbb aaa", vocab_size=1000)
    assert tok.vocab_size < 1000
    assert tok.encode("aaa bbb") == [tok.encoder["aaa" + EOW], tok.encoder["bbb" + EOW]]


def test_train_reaches_vocab_size_and_is_the_same_in_every_process():
    # Set and dict orders of strings change with PYTHONHASHSEED: two runs in one process cannot show that
    # training does not depend on them, so train in two processes with different hash seeds. bpe.py is
    # loaded on its own (standard library only), without torch: ~0.1 s a process.
    import subprocess
    import sys

    import minilm.bpe

    a = BPETokenizer.train(CORPUS, vocab_size=300)
    assert a.vocab_size == 300
    code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('bpe', sys.argv[1]); "
            "bpe = importlib.util.module_from_spec(spec); spec.loader.exec_module(bpe); "
            "t = bpe.BPETokenizer.train(sys.stdin.read(), 300); print(json.dumps([t.merges, t.encoder]))")
    for seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", code, minilm.bpe.__file__], input=CORPUS, capture_output=True,
                              text=True, encoding="utf-8", env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONIOENCODING": "utf-8"}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        merges, encoder = json.loads(proc.stdout)
        assert [tuple(m) for m in merges] == a.merges and encoder == a.encoder, f"PYTHONHASHSEED={seed}"


def _naive_merge(symbols, pair):
    """Every non-overlapping occurrence of pair, left to right, merged into one symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _naive_bpe(tok, word):
    """GPT-1's bpe() as its text_utils.py writes it: rescan the word for the lowest-ranked pair, merge it
    everywhere (left to right, non-overlapping), repeat."""
    symbols = list(word[:-1]) + [word[-1] + EOW]
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda p: tok.bpe_ranks.get(p, float("inf")))
        if best not in tok.bpe_ranks:
            break
        symbols = _naive_merge(symbols, best)
    return [tok.encoder.get(s, tok.unk_id) for s in symbols]


def _naive_train_merges(words, n_merges):
    """The merges BPE learns, recounting every pair of every word before each merge (ties: smaller pair)."""
    import collections

    symbols = [list(w[:-1]) + [w[-1] + EOW] for w in words]
    merges = []
    for _ in range(n_merges):
        count = collections.Counter(p for syms in symbols for p in zip(syms, syms[1:]))
        if not count:
            break
        pair = min(count, key=lambda p: (-count[p], p))
        merges.append(pair)
        symbols = [_naive_merge(syms, pair) for syms in symbols]
    return merges


def test_training_and_encoding_equal_the_naive_algorithms_on_repetitive_and_long_words():
    # The trainer updates only the pairs around each merge and the encoder keeps a heap of pairs (both so
    # that a word of 100k letters stays fast); they must give exactly what the plain algorithms give,
    # overlapping runs ("aaaa", "abab") and words of thousands of letters included.
    import random

    rng = random.Random(0)
    for trial in range(40):
        alphabet = ["ab", "aab", "abc", "a", "abcdefg"][trial % 5]
        words = ["".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 5, 12, 40])))
                 for _ in range(rng.randint(1, 30))]
        if trial % 10 == 0:
            words.append("".join(rng.choice(alphabet) for _ in range(3000)))
        tok = BPETokenizer.train(" ".join(words), vocab_size=rng.randint(20, 150))
        assert tok.merges == _naive_train_merges(words, len(tok.merges)), trial
        for word in words[:10] + ["".join(rng.choice(alphabet) for _ in range(2000))]:
            assert tok._bpe(word) == _naive_bpe(tok, word), (trial, word[:50])
    # Two merges spelling one token ("abc" from a+bc and from ab+c), so that a merge can create a pair of a
    # lower rank than its own: GPT-1 still finishes the current rank everywhere first.
    merges = [("b", "c"), ("a", "bc"), ("abc", "ab"), ("a", "b"), ("ab", "c"), ("b", "c" + EOW)]
    tokens = [UNK, "a", "b", "c", "a" + EOW, "b" + EOW, "c" + EOW, "bc", "abc", "abcab", "ab", "bc" + EOW]
    tok = BPETokenizer({t: i for i, t in enumerate(tokens)}, merges)
    for _ in range(2000):
        word = "".join(rng.choice("abc") for _ in range(rng.randint(1, 25)))
        assert tok._bpe(word) == _naive_bpe(tok, word), word
    # ab c ab c x</w>: (ab, c) makes abc twice; merging (abc, ab) in between would take the second ab
    tokens = [UNK, "a", "b", "c", "x", "x" + EOW, "ab", "abc", "abcab"]
    tok = BPETokenizer({t: i for i, t in enumerate(tokens)}, [("a", "b"), ("abc", "ab"), ("ab", "c")])
    assert [tok.decoder[i] for i in tok._bpe("abcabcx")] == ["abc", "abc", "x" + EOW] == \
        [tok.decoder[i] for i in _naive_bpe(tok, "abcabcx")]


def test_train_errors():
    with pytest.raises(DataError, match="smaller than the base vocabulary"):
        BPETokenizer.train("abcdef", vocab_size=5)
    with pytest.raises(DataError, match="empty text"):
        BPETokenizer.train(" \n\x00 ", vocab_size=100)


@pytest.mark.parametrize("text", VARIED)
def test_round_trip(text):
    import unicodedata

    tok = BPETokenizer.train(CORPUS, vocab_size=400)
    words = basic_tokenize(text)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    if UNK not in text and all(tok.encoder.get(c) is not None for w in words for c in w):
        # decode gives the pre-tokenised words back, space-separated (NFC: Hangul recomposed)
        assert tok.decode(ids) == unicodedata.normalize("NFC", " ".join(words))
    assert tok.encode(text) == ids  # the word cache does not change results


def test_decode_rejects_ids_out_of_range():
    tok = BPETokenizer.train("ab ab", vocab_size=10)
    with pytest.raises(DataError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(DataError, match="out of range"):
        tok.decode([-1])


def test_save_load_round_trip(tmp_path):
    tok = BPETokenizer.train(CORPUS, vocab_size=300)
    tok.save(str(tmp_path))
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
    again = BPETokenizer.load(str(tmp_path))
    assert again.encoder == tok.encoder and again.merges == tok.merges
    for text in VARIED:
        assert again.encode(text) == tok.encode(text)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_from_files_reads_the_original_gpt1_names(tmp_path):
    # GPT-1 ships encoder_bpe_40000.json (ASCII-escaped JSON) and vocab_40000.bpe
    vocab = {UNK: 0, "t": 1, "h": 2, "e": 3, "t" + EOW: 4, "h" + EOW: 5, "e" + EOW: 6, "th": 7, "the" + EOW: 8}
    (tmp_path / "encoder_bpe_40000.json").write_text(json.dumps(vocab))
    (tmp_path / "vocab_40000.bpe").write_text("#version: 0.2\nt h\nth e</w>\n")
    tok = BPETokenizer.from_files(str(tmp_path / "encoder_bpe_40000.json"), str(tmp_path / "vocab_40000.bpe"))
    assert tok.encode("The the theth") == [8, 8, 7, 3, 1, 5]  # theth: th e t h</w>
    assert tok.decode([8, 8]) == "the the"
    # a merges file that an editor saved with a byte-order mark: the header is still the header
    (tmp_path / "vocab_40000.bpe").write_text("\ufeff#version: 0.2\nt h\nth e</w>\n", encoding="utf-8")
    tok = BPETokenizer.from_files(str(tmp_path / "encoder_bpe_40000.json"), str(tmp_path / "vocab_40000.bpe"))
    assert tok.encode("The the theth") == [8, 8, 7, 3, 1, 5]


def test_from_files_errors(tmp_path):
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    with pytest.raises(DataError, match="not found"):
        BPETokenizer.from_files(str(v), str(m))
    v.write_text("{not json")
    m.write_text("#version: 0.2\n")
    with pytest.raises(DataError, match="not a JSON vocabulary"):
        BPETokenizer.load(str(tmp_path))
    v.write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(DataError, match="no '<unk>' token"):
        BPETokenizer.load(str(tmp_path))
    v.write_text(json.dumps({UNK: 0, "a": 1, "b": 2}))
    m.write_text("#version: 0.2\na b c\n")
    with pytest.raises(DataError, match="expected a merge"):
        BPETokenizer.load(str(tmp_path))
    m.write_text("#version: 0.2\na b\n")
    with pytest.raises(DataError, match="'ab', which is not in the vocabulary"):
        BPETokenizer.load(str(tmp_path))
    v.write_text(json.dumps({UNK: 0, "a": 2}))
    m.write_text("#version: 0.2\n")
    with pytest.raises(DataError, match="0..N-1"):
        BPETokenizer.load(str(tmp_path))


def _hf_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.OpenAIGPTTokenizer(
        vocab=os.path.join(directory, "vocab.json"), merges=os.path.join(directory, "merges.txt")
    )


def test_parity_with_hf_on_a_trained_vocabulary(tmp_path):
    tok = BPETokenizer.train(CORPUS, vocab_size=400)
    tok.save(str(tmp_path))
    hf = _hf_tokenizer(str(tmp_path))
    for text in VARIED + [CORPUS]:
        assert tok.encode(text) == hf(text)["input_ids"], text


def test_parity_with_hf_on_a_hand_written_pair(tmp_path):
    # merges out of frequency order, a merge into a word-final symbol, and a character ("x") that
    # exists only word-internally: "x" at the end of a word is <unk>.
    vocab = [UNK, "a", "b", "n", "x", "a" + EOW, "b" + EOW, "n" + EOW, ",", "," + EOW,
             "an", "an" + EOW, "ban", "ban" + EOW, "bana", "banan", "banana" + EOW, "ax"]
    merges = [("a", "n"), ("a", "n" + EOW), ("b", "an"), ("b", "an" + EOW), ("ban", "a"),
              ("bana", "n"), ("banan", "a" + EOW), ("a", "x")]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = BPETokenizer.load(str(tmp_path))
    hf = _hf_tokenizer(str(tmp_path))
    for text in ["banana, ban an", "BANANA bananas nab", "axa ax xa", "bänäñä", "", "q, <unk>,"]:
        assert tok.encode(text) == hf(text)["input_ids"], text
    # b a n a n a</w> -> (a n) everywhere -> b an an a</w> -> (b an) -> ban an a</w>: (ban a) never applies
    assert [tok.decoder[i] for i in tok.encode("banana ax")] == ["ban", "an", "a" + EOW, "a", UNK]


def test_decode_and_train_refuse_what_is_not_ids_or_sizes():
    import numpy as np
    import torch

    tok = BPETokenizer.train("to be or not to be", vocab_size=30)
    assert tok.decode(np.array([1, 2], dtype=np.uint16)) == tok.decode(torch.tensor([1, 2])) == tok.decode([1, 2])
    for bad in ("12", [1.9], [True], torch.tensor([1.9])):   # a str would be read digit by digit, floats truncated
        with pytest.raises(TypeError, match="decode"):
            tok.decode(bad)
    for bad in (None, True, 300.0):
        with pytest.raises(TypeError, match="vocab_size must be an int"):
            BPETokenizer.train("to be", bad)


def test_from_files_refuses_bool_ids_and_unreadable_json(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    for content, message in (('{"<unk>": true, "a": 0}', "integer ids"),
                             ('{"<unk>": 1' + "0" * 5000 + "}", "not a JSON vocabulary"),   # past int() digit limit
                             ("[" * 100_000 + "]" * 100_000, "not a JSON vocabulary")):    # too deep to parse
        (tmp_path / "vocab.json").write_text(content)
        with pytest.raises(DataError, match=message):
            BPETokenizer.load(str(tmp_path))


def test_unknown_characters_get_the_vocabularys_own_unk_id():
    # HF / GPT-1 style files need not put <unk> first
    vocab = {"a": 0, "b": 1, "a" + EOW: 2, "b" + EOW: 3, UNK: 4, "ab" + EOW: 5}
    tok = BPETokenizer(vocab, [("a", "b" + EOW)])
    assert tok.encode("azb ab") == [0, 4, 3, 5]
    assert tok.encode("z") == [4] and tok.encode("a <unk>") == [2, 4]


def test_decode_keeps_the_last_symbol_of_a_word_cut_short():
    # generation can stop inside a word: the last token has no </w>, and nothing may be dropped
    tok = BPETokenizer.train("ab ab abc", vocab_size=8)          # one merge: (a, b</w>)
    ids = tok.encode("ab abc")
    assert [tok.decoder[i] for i in ids] == ["ab" + EOW, "a", "b", "c" + EOW]
    assert tok.decode(ids) == "ab abc"
    assert tok.decode(ids[:-1]) == "ab ab"                            # cut before c</w>
    assert tok.decode([tok.encoder["a"]]) == "a"
    assert tok.decode([tok.encoder["a" + EOW]]) == "a"
