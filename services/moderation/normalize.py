"""Text normalisation for matching, keeping the way back to the original positions."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Normalized:
    text: str
    """NFKC, case-folded, noise removed."""
    origin: tuple[int, ...]
    """origin[i] is the index in the original text of normalized character i."""


@lru_cache(maxsize=65536)
def _fold(char: str) -> str:
    # Noise = anything that is not a letter or digit after NFKC (punctuation, spaces,
    # zero-width and other format characters, emoji); it is skipped between characters.
    folded = unicodedata.normalize("NFKC", char).casefold()
    return "".join(c for c in folded if unicodedata.category(c)[0] in "LN")


def normalize(text: str) -> Normalized:
    chars: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        for folded in _fold(char):
            chars.append(folded)
            origin.append(index)
    return Normalized("".join(chars), tuple(origin))


def normalize_word(word: str) -> str:
    return normalize(word).text
