"""The pieces of CLIP's byte-level BPE: text cleaning, pre-tokenisation, byte map and merges.

`tokenizer.py` puts them together into the CLIP token-id scheme. Nothing here imports open_clip:
the vocabulary file is found through the import system only (`find_spec`), so neither torchvision
nor open_clip's model code is loaded.

Pre-tokenisation follows CLIP's pattern: special tokens, the contractions 's 't 're 've 'm 'll 'd,
runs of letters (Unicode category L*), single numeric characters (N*), and runs of anything else
that is neither whitespace, letter nor number. The classes are built from Python's `unicodedata`,
so the standard `re` module suffices (CLIP uses the third-party `regex` module for `\\p{L}` and
`\\p{N}`); characters assigned only in a newer Unicode version than Python's may be classed
differently.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import re
import sys
import unicodedata
from pathlib import Path
from typing import Sequence

from ..errors import TokenizerError

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # 48,894 merges: 256 bytes + 256 word-final bytes + merges + SOT + EOT = 49,408
WORD_END = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map byte -> printable character: printable Latin-1 bytes map to themselves, the
    other 68 bytes (controls, space, soft hyphen...) to code points 256, 257, ... in byte order.

    The dict's order is the vocabulary order of the 256 byte symbols: the 188 printable bytes
    first (ascending), then the 68 others (ascending)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def default_vocab_path() -> Path:
    """The BPE file shipped inside the installed open_clip package (located, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"cannot find the CLIP BPE vocabulary: open_clip is not installed; install "
                             f"open_clip_torch or pass vocab_path= to a copy of {VOCAB_FILENAME}")
    for location in spec.submodule_search_locations:
        path = Path(location) / VOCAB_FILENAME
        if path.is_file():
            return path
    raise TokenizerError(f"open_clip is installed but has no {VOCAB_FILENAME}; pass vocab_path= to a copy of it")


def read_merges(path: str | Path, *, count: int = CLIP_MERGES) -> list[tuple[str, str]]:
    """The first `count` merge rules of a CLIP BPE file (gzip text: a version line, then one
    space-separated pair per line, in priority order)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise TokenizerError(f"cannot read the BPE vocabulary {path}: {error}") from error
    if "#version" not in lines[0]:
        raise TokenizerError(f"{path} does not look like a CLIP BPE file (first line {lines[0][:60]!r})")
    merges = [tuple(line.split()) for line in lines[1:count + 1]]
    if len(merges) < count or any(len(pair) != 2 for pair in merges):
        raise TokenizerError(f"{path}: expected {count} merge lines of two symbols each")
    return merges  # type: ignore[return-value]


def _fix_text_fallback(text: str) -> str:
    """What ftfy does to ordinary captions, when ftfy is absent: curly quotes -> straight, NFC."""
    text = text.translate(str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'",
                                         "“": '"', "”": '"', "„": '"', "‟": '"'}))
    return unicodedata.normalize("NFC", text)


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy.fix_text (when installed), HTML-unescape twice, collapse whitespace,
    strip, lower-case."""
    try:
        import ftfy
    except ImportError:
        text = _fix_text_fallback(text)
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def _class_ranges(first_letters: str) -> str:
    """Regex character-class body of all code points whose category starts with one of `first_letters`."""
    parts, start = [], None
    for code in range(sys.maxunicode + 2):
        inside = code <= sys.maxunicode and unicodedata.category(chr(code))[0] in first_letters
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            parts.append(f"\\U{start:08x}" if start == code - 1 else f"\\U{start:08x}-\\U{code - 1:08x}")
            start = None
    return "".join(parts)


@functools.cache
def _word_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    letters, numbers = _class_ranges("L"), _class_ranges("N")
    alternatives = [re.escape(s) for s in specials] + [re.escape(c) for c in CONTRACTIONS]
    alternatives += [f"[{letters}]+", f"[{numbers}]", f"[^\\s{letters}{numbers}]+"]
    return re.compile("|".join(alternatives))


def pre_tokenize(text: str, *, specials: Sequence[str] = ()) -> list[str]:
    """Split cleaned text into the words BPE runs on (whitespace is dropped)."""
    return _word_pattern(tuple(specials)).findall(text)


class BytePairEncoder:
    """Applies merge rules to one pre-tokenised word; the lowest-ranked adjacent pair merges first,
    all its non-overlapping occurrences left to right, until no adjacent pair has a rule."""

    def __init__(self, merges: Sequence[tuple[str, str]], *, cache_size: int = 200_000) -> None:
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        self._cache: dict[str, tuple[str, ...]] = {}
        self._cache_size = cache_size

    def symbols(self, word: str) -> tuple[str, ...]:
        """A raw word (any Unicode) -> BPE symbols; the last one carries the `</w>` suffix."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        mapped = [self.byte_map[b] for b in word.encode("utf-8")]
        symbols = self._merge(mapped[:-1] + [mapped[-1] + WORD_END])
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[word] = symbols
        return symbols

    def _merge(self, symbols: list[str]) -> tuple[str, ...]:
        ranks = self.ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)
