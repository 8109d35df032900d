"""The lexicon as data: categories of words with their action, and a whitelist."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Action(IntEnum):
    """Ordered by strength: the verdict of a text is its strongest hit's action."""

    ALLOW = 0
    MASK = 1
    REVIEW = 2
    BLOCK = 3


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    action: Action
    words: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Lexicon:
    categories: tuple[Category, ...]
    whitelist: tuple[str, ...]

    @property
    def word_count(self) -> int:
        return sum(len(c.words) for c in self.categories)
