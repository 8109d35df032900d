"""The lexicon as data: one UTF-8 file per category plus a whitelist, read from a folder."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

log = logging.getLogger(__name__)

WHITELIST_FILE = "whitelist.txt"
_ACTION_LINE = re.compile(r"^#\s*action:\s*(\w+)\s*$", re.IGNORECASE)


class Action(IntEnum):
    """Ordered by strength: the verdict of a text is its strongest hit's action."""

    ALLOW = 0
    MASK = 1
    REVIEW = 2
    BLOCK = 3


class LexiconError(ValueError):
    """A lexicon file is malformed; names the file and line."""


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


def parse_category(name: str, text: str) -> Category:
    action = Action.BLOCK
    words: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if number == 1 and (found := _ACTION_LINE.match(stripped)):
            try:
                action = Action[found.group(1).upper()]
            except KeyError:
                raise LexiconError(f"{name}.txt:1: unknown action {found.group(1)!r} (block, mask or review)") from None
            if action is Action.ALLOW:
                raise LexiconError(f"{name}.txt:1: action must be block, mask or review")
            continue
        if stripped and not stripped.startswith("#"):
            words.append(stripped)
    return Category(name, action, tuple(words))


def load_lexicon(folder: Path) -> Lexicon:
    """Read every `*.txt` of `folder`; the file name is the category, `whitelist.txt` the whitelist."""
    if not folder.is_dir():
        raise LexiconError(f"lexicon folder {folder} does not exist")
    categories: list[Category] = []
    whitelist: tuple[str, ...] = ()
    for path in sorted(folder.glob("*.txt")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise LexiconError(f"{path.name}: not UTF-8 ({error.reason} at byte {error.start})") from None
        if path.name == WHITELIST_FILE:
            whitelist = parse_category("whitelist", text).words
        else:
            categories.append(parse_category(path.stem, text))
    return Lexicon(tuple(categories), whitelist)
