"""Text normalisation for matching (NFKC, case fold, traditional -> simplified, noise dropped)."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from itertools import compress

import opencc

# Character by character, never phrase by phrase: OpenCC's phrase tables look at the
# neighbours (乾隆 stays, 乾燥 -> 干燥), so a word's folding would depend on the text around
# it and a stream's result on where its deltas were cut. Character-level t2s maps every
# code point to exactly one (checked over all CJK blocks with opencc 1.4.2).
_T2S = opencc.OpenCC("t2s")

# Bounds the memory an attacker can make the translate table use by sending many distinct
# code points; characters beyond it take the slower per-character path.
TABLE_LIMIT = 1 << 16

_table: dict[int, str] = {}
"""Code point -> its folded text, for `str.translate` (runs in C)."""
_known: set[str] = set()
"""The characters in `_table`; written after it, so a known character is always in it."""


def _simplified(char: str) -> str:
    # A few t2s entries chain (薴 -> 苧 -> 苎): follow them so folding is idempotent.
    for _ in range(3):
        converted = _T2S.convert(char)
        if converted == char:
            break
        char = converted
    return char


@lru_cache(maxsize=4096)
def fold_char(char: str) -> str:
    """What one character adds to the normalised text: '' for noise, usually one character.

    Noise = anything that is not a letter or digit after NFKC (punctuation, spaces, zero-width
    and other format characters, emoji); it is skipped between the characters of a word.
    """
    out: list[str] = []
    for part in unicodedata.normalize("NFKC", char):
        # NFKC again after casefold: casefold can decompose (ΐ), NFKC composes it back.
        for folded in unicodedata.normalize("NFKC", _simplified(part).casefold()):
            if unicodedata.category(folded)[0] in "LN":
                out.append(folded)
    return "".join(out)


def _learn(text: str) -> bool:
    """Add the characters of `text` to the translate table; False once it is full."""
    for char in set(text).difference(_known):
        if len(_table) >= TABLE_LIMIT:
            return False
        _table[ord(char)] = fold_char(char)
        _known.add(char)
    return True


class Normalized:
    """`text` is `source` NFKC-normalised, case-folded, folded to simplified Chinese, noise removed."""

    __slots__ = ("source", "text", "_origin")

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text
        self._origin: list[int] | None = None

    @classmethod
    def joined(cls, source: str, text: str, origin: list[int]) -> Normalized:
        """A Normalized whose origin the caller kept (a stream appends delta by delta)."""
        norm = cls(source, text)
        norm._origin = origin
        return norm

    def origin(self) -> list[int]:
        """origin()[i] is the index in `source` of the character that produced text[i]."""
        if self._origin is None:
            # Built only when needed (a hit, a stream's open tail): most texts have neither.
            self._origin = _origin(self.source, self.text)
        return self._origin

    def source_index(self, index: int) -> int:
        return self.origin()[index]


def _origin(source: str, text: str) -> list[int]:
    try:
        # The source indices of the characters that are not noise, at C speed ...
        kept = list(compress(range(len(source)), map(_table.__getitem__, map(ord, source))))
    except KeyError:  # the table was full when this text was normalised
        kept = []
    if len(kept) == len(text):
        return kept
    # ... unless a character folded to several (ß -> ss, ㍻ -> 平成): the general way.
    return [index for index, char in enumerate(source) for _ in fold_char(char)]


def normalize(text: str) -> Normalized:
    if _known.issuperset(text) or _learn(text):
        return Normalized(text, text.translate(_table))
    return Normalized(text, "".join(map(fold_char, text)))


def normalize_word(word: str) -> str:
    return normalize(word).text
