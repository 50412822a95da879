"""GPT-1's byte-pair-encoding tokenizer, written from scratch.

GPT-1 (Radford et al. 2018, §4.1; openai/finetune-transformer-lm text_utils.py) tokenises in two steps:

1. Pre-tokenisation into lower-cased words. The original runs ftfy + a text_standardize regex pass +
   spaCy; Hugging Face's ``OpenAIGPTTokenizer`` (transformers 5.x) replaces that with BERT's basic
   tokenizer: ``BertNormalizer(lowercase=True)`` (drop control characters, map whitespace to a space,
   put spaces around CJK ideographs, strip accents by NFD + dropping non-spacing marks, lower-case)
   and ``BertPreTokenizer`` (split on whitespace, every punctuation character is a word of its own).
   ``basic_tokenize`` below is that path, so token ids match HF exactly (tests/test_bpe.py).
2. Word-level BPE (Sennrich et al. 2016): a word starts as its characters, the last one carrying the
   end-of-word marker ``</w>``; the learned merges are applied lowest rank first; a symbol that is not
   in the vocabulary becomes ``<unk>``.

The files are GPT-1's own: ``vocab.json`` (token -> id; the original is ``encoder_bpe_40000.json``)
and ``merges.txt`` (``#version: 0.2`` then one ``a b`` merge per line; originally ``vocab_40000.bpe``).
"""
from __future__ import annotations

import heapq
import json
import operator
import os
import unicodedata
from collections import Counter, defaultdict

from minilm.files import first_line, write_atomic

UNK = "<unk>"
EOW = "</w>"  # end-of-word marker carried by the last symbol of every word
_MERGES_HEADER = "#version: 0.2"


class DataError(ValueError):
    """Bad text or tokenizer files: a one-line message for the user (scripts print it and exit 1).

    Defined here, the lowest layer, and re-exported by ``minilm.data``.
    """

# --------------------------------------------------------------------------------------------
# Pre-tokenisation: BertNormalizer(lowercase=True) + BertPreTokenizer, as in HF's tokenizers crate.

# Rust's char::is_whitespace (the Unicode White_Space property). Python's str.isspace also accepts
# U+001C..U+001F, but those are control characters and are dropped before whitespace matters.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
# The "Chinese character" blocks of BERT's tokenizer (CJK ideographs; not Hangul, kana or punctuation).
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


# clean_text drops "other" characters as the tokenizers crate classifies them: control (Cc), format
# (Cf), surrogate (Cs) and private use (Co), but keeps unassigned ones (Cn). Checked against HF on
# every code point: all agree except ~560 characters that Python's Unicode tables and the crate's
# (older categories, newer case mappings) classify differently -- rare scripts and recent additions.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})


def _is_punctuation(ch: str) -> bool:
    # BERT counts every ASCII non-alphanumeric printable ($, +, <, ^, ...) as punctuation too.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _normalize_char(ch: str) -> str:
    """What one input character becomes after normalisation, with spaces around split points."""
    if ch in ("\t", "\n", "\r"):
        return " "
    if ch == "\x00" or ch == "\ufffd" or unicodedata.category(ch) in _DROPPED_CATEGORIES:
        return ""  # clean_text
    if ch in _WHITESPACE:
        return " "
    cp = ord(ch)
    is_cjk = any(lo <= cp <= hi for lo, hi in _CJK_RANGES)
    # strip_accents (on by default with lowercase): NFD, then drop the non-spacing marks (Mn).
    # NFD also splits Hangul syllables into their conjoining jamo; decode() recomposes them (NFC).
    out = "".join(c for c in unicodedata.normalize("NFD", ch) if unicodedata.category(c) != "Mn")
    out = out.lower()  # per character, as Rust's char::to_lowercase (no final-sigma rule)
    out = "".join(f" {c} " if _is_punctuation(c) else c for c in out)
    return f" {out} " if is_cjk else out


# ord(char) -> replacement, filled lazily with the characters seen so far: str.translate then does the
# per-character work in C, which keeps pre-tokenising megabytes of text well under a second.
_TRANSLATION: dict[int, str] = {}


def basic_tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation characters, as HF's OpenAIGPTTokenizer pre-tokenises.

    >>> basic_tokenize("Héllo, World!  中文")
    ['hello', ',', 'world', '!', '中', '文']
    """
    for ch in set(text):
        if ord(ch) not in _TRANSLATION:
            _TRANSLATION[ord(ch)] = _normalize_char(ch)
    # After translation the only whitespace left is " ", so str.split() splits exactly there.
    return text.translate(_TRANSLATION).split()


# --------------------------------------------------------------------------------------------
# BPE


def _word_symbols(word: str) -> list[str]:
    # "hello" -> ["h", "e", "l", "l", "o</w>"]
    return list(word[:-1]) + [word[-1] + EOW]


def _merge_pair(symbols: list[str], first: str, second: str) -> tuple[list[str], list[int]]:
    """Replace every non-overlapping (first, second), left to right, by first+second.

    Returns the new symbols and where the merged ones stand in them. The scan for `first` is list.index
    and the copying is slicing, both in C, so a very long word (text without spaces) costs little per merge.
    """
    out, merged, i, n = [], [], 0, len(symbols)
    while True:
        try:
            j = symbols.index(first, i, n - 1)   # a `first` with a symbol after it
        except ValueError:
            break
        if symbols[j + 1] == second:
            out += symbols[i:j]
            merged.append(len(out))
            out.append(first + second)
            i = j + 2
        else:
            out += symbols[i:j + 1]
            i = j + 1
    out += symbols[i:]
    return out, merged


class BPETokenizer:
    """Word-level BPE with GPT-1's vocabulary/merges format.

    ``vocab`` maps each token (a symbol, with ``</w>`` when it ends a word) to an id in 0..N-1 and must
    contain ``<unk>``; ``merges`` lists the symbol pairs in the order they were learned (their rank).
    """

    _CACHE_LIMIT = 200_000  # words whose ids are memoised by encode()

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        if UNK not in vocab:
            raise DataError(f"the vocabulary has no {UNK!r} token")
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):
            raise DataError("vocabulary ids must be 0..N-1, each used once")
        for rank, (a, b) in enumerate(merges):
            for tok in (a, b, a + b):
                if tok not in vocab:
                    raise DataError(f"merge {rank} ({a!r} {b!r}) uses {tok!r}, which is not in the vocabulary")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in vocab.items()}
        self.merges = [tuple(m) for m in merges]
        self.bpe_ranks = {m: r for r, m in enumerate(self.merges)}
        self.unk_id = vocab[UNK]
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # ---- training ---------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Learn merges on ``text`` until the vocabulary has ``vocab_size`` tokens.

        The base vocabulary is ``<unk>``, every character of the (normalised) text, and each of those
        characters with ``</w>`` (so any word spelled with known characters can be encoded). Then the
        most frequent adjacent pair is merged, again and again (ties: the lexicographically smaller
        pair, so training is deterministic). If the text runs out of pairs first, training stops
        there and the vocabulary is smaller than asked for. A ``vocab_size`` below the base
        vocabulary is an error.
        """
        if not isinstance(text, str):
            raise TypeError(f"train() takes a str, got {type(text).__name__}")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        words = Counter(basic_tokenize(text))
        if not words:
            raise DataError("cannot train a BPE tokenizer on empty text (no words after pre-tokenisation)")
        char_counts: Counter[str] = Counter()
        for word, n in words.items():
            for ch in word:
                char_counts[ch] += n
        alphabet = sorted(char_counts, key=lambda c: (-char_counts[c], c))  # most frequent first, as GPT-1
        base = [UNK] + alphabet + [c + EOW for c in alphabet]
        if vocab_size < len(base):
            raise DataError(
                f"vocab_size={vocab_size} is smaller than the base vocabulary of this text "
                f"({len(base)} = <unk> + {len(alphabet)} characters, each also with </w>): ask for at least {len(base)}"
            )
        vocab = {tok: i for i, tok in enumerate(base)}

        # The corpus as unique words with counts; pair statistics are kept up to date incrementally.
        symbols = [_word_symbols(w) for w in words]
        counts = list(words.values())
        pair_count: defaultdict[tuple[str, str], int] = defaultdict(int)
        pair_words: defaultdict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> words holding it
        for i, syms in enumerate(symbols):
            for pair in zip(syms, syms[1:]):
                pair_count[pair] += counts[i]
                pair_words[pair].add(i)
        # Max-heap of (-count, pair) with lazy deletion: an entry is valid only if its count is current.
        # Every count change pushes a fresh entry, so the first valid entry popped is the true maximum.
        heap = [(-n, pair) for pair, n in pair_count.items()]
        heapq.heapify(heap)

        merges: list[tuple[str, str]] = []
        while len(vocab) < vocab_size and heap:
            neg_n, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg_n or neg_n == 0:
                continue  # stale entry
            first, second = pair
            changed: set[tuple[str, str]] = set()
            for i in sorted(pair_words.pop(pair)):
                syms = symbols[i]
                new, merged = _merge_pair(syms, first, second)
                if not merged:
                    continue  # the word no longer holds the pair (a stale index)
                # Only the pairs that touch a merge change: in the old word the pair itself and its two
                # neighbours (the m-th merged symbol stood at k + m there), in the new word the two pairs
                # around the merged symbol. Sets, so that neighbouring merges count a pair once.
                n = counts[i]
                gone, come = set(), set()   # positions (in syms, in new) of the pairs that change
                for m, k in enumerate(merged):
                    gone.update(p for p in (k + m - 1, k + m, k + m + 1) if 0 <= p < len(syms) - 1)
                    come.update(p for p in (k - 1, k) if 0 <= p < len(new) - 1)
                for p in gone:
                    pair_count[syms[p], syms[p + 1]] -= n
                    changed.add((syms[p], syms[p + 1]))
                for p in come:
                    pair_count[new[p], new[p + 1]] += n
                    pair_words[new[p], new[p + 1]].add(i)
                    changed.add((new[p], new[p + 1]))
                symbols[i] = new
            for p in changed:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
                else:
                    del pair_count[p]
            merges.append(pair)
            vocab.setdefault(first + second, len(vocab))  # two merges may spell the same token
        return cls(vocab, merges)

    # ---- encoding / decoding ----------------------------------------------------------------

    def _bpe(self, word: str) -> list[int]:
        """GPT-1's bpe(): merge the lowest-ranked adjacent pair everywhere (left to right), until none is left.

        GPT-1 rescans the word for every merge: 5 s for a 40,000-letter word (text without spaces) against
        0.06 s here (README, Tokenizer). Here the symbols form a linked list and their adjacent pairs wait in a heap by (rank,
        position): every occurrence of the lowest rank is merged, left to right, before the pairs those
        merges create, exactly as GPT-1's loop does, at a heap operation per merge.
        """
        symbols: list = _word_symbols(word)   # a merged-away symbol becomes None
        ranks, n = self.bpe_ranks, len(symbols)
        after = list(range(1, n + 1))         # the next live symbol; n: none
        before = list(range(-1, n - 1))       # the previous one; -1: none
        heap = [(ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in ranks]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            first, second = self.merges[rank]
            starts = []
            while heap and heap[0][0] == rank:
                starts.append(heapq.heappop(heap)[1])
            for i in sorted(starts):
                j = after[i]
                if symbols[i] != first or j == n or symbols[j] != second:
                    continue  # this pair is gone: an earlier merge took one of its symbols
                symbols[i], symbols[j] = first + second, None
                k = after[i] = after[j]
                if k < n:
                    before[k] = i
                for a, b in ((before[i], i), (i, k)):  # the two pairs the merged symbol is now part of
                    if a >= 0 and b < n and (symbols[a], symbols[b]) in ranks:
                        heapq.heappush(heap, (ranks[symbols[a], symbols[b]], a))
        return [self.encoder.get(s, self.unk_id) for s in symbols if s is not None]

    def _encode_words(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in basic_tokenize(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= self._CACHE_LIMIT:
                    cache.clear()
                word_ids = cache[word] = self._bpe(word)
            ids.extend(word_ids)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. A literal "<unk>" in the text is the unknown token, as in HF."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        pieces = text.split(UNK)
        ids = self._encode_words(pieces[0])
        for piece in pieces[1:]:
            ids.append(self.unk_id)
            ids.extend(self._encode_words(piece))
        return ids

    def decode(self, ids) -> str:
        """Join the tokens, each ``</w>`` becoming a space: the lower-cased, re-spaced text.

        Punctuation comes back space-separated ("hello , world !"), as from GPT-1. The result is
        NFC-normalised so that Hangul syllables, split into jamo by the accent stripping, recompose.
        """
        if isinstance(ids, (str, bytes)):
            raise TypeError("decode() takes a sequence of token ids (ints), not a string")
        tokens = []
        n = self.vocab_size
        for i in ids:
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)   # ints, numpy and torch integers; not floats, which int() would truncate
            except TypeError:
                raise TypeError(f"decode() takes integer token ids, got {i!r}") from None
            if not 0 <= i < n:
                raise DataError(f"token id {i} is out of range for a vocabulary of {n}")
            tokens.append(self.decoder[i])
        text = "".join(tokens).replace(EOW, " ")
        if tokens and tokens[-1].endswith(EOW):
            text = text[:-1]
        return unicodedata.normalize("NFC", text)

    # ---- files ------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write ``vocab.json`` and ``merges.txt`` (GPT-1's / HF's format) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        vocab = json.dumps(self.encoder, ensure_ascii=False).encode("utf-8")
        merges = "\n".join([_MERGES_HEADER] + [f"{a} {b}" for a, b in self.merges]) + "\n"
        write_atomic(os.path.join(directory, "vocab.json"), vocab)
        write_atomic(os.path.join(directory, "merges.txt"), merges.encode("utf-8"))

    @classmethod
    def load(cls, directory: str) -> "BPETokenizer":
        return cls.from_files(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))

    @classmethod
    def from_files(cls, vocab_json: str, merges_txt: str) -> "BPETokenizer":
        """Load a vocabulary/merges pair: GPT-1's ``encoder_bpe_40000.json`` + ``vocab_40000.bpe``, or
        the same format as ``vocab.json`` + ``merges.txt``."""
        for path in (vocab_json, merges_txt):
            if not os.path.isfile(path):
                raise DataError(f"tokenizer file not found: {path}")
        try:
            with open(vocab_json, encoding="utf-8") as f:
                vocab = json.load(f)
        except (ValueError, RecursionError) as e:   # bad UTF-8 or JSON, a 5,000-digit number; deep nesting
            raise DataError(f"{vocab_json} is not a JSON vocabulary: {first_line(e)}") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
            raise DataError(f"{vocab_json} must map tokens to integer ids")
        merges = []
        try:
            with open(merges_txt, encoding="utf-8-sig") as f:   # a byte-order mark, as some editors write
                lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{merges_txt} is not UTF-8 (invalid byte at offset {e.start})") from None
        for lineno, line in enumerate(lines, 1):
            if (lineno == 1 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(f"{merges_txt}:{lineno}: expected a merge 'a b', got {line!r}")
            merges.append((parts[0], parts[1]))
        try:
            return cls(vocab, merges)
        except DataError as e:
            raise DataError(f"{vocab_json} + {merges_txt}: {e}") from None

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"
