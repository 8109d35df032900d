"""Reading the lexicon from a folder: one UTF-8 file per category plus a whitelist."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from services.common.errors import KefuError
from services.common.lexicon.model import Action, Category, Lexicon
from services.common.lexicon.normalize import normalize_word

log = logging.getLogger(__name__)

__all__ = ["Action", "Category", "Lexicon", "LexiconError", "load_lexicon", "parse_category"]

WHITELIST_FILE = "whitelist.txt"
_ACTION_LINE = re.compile(r"^#\s*action\s*:(.*)$", re.IGNORECASE)


class LexiconError(KefuError, ValueError):
    """A lexicon folder or file is unusable; the message names the file and line."""


def parse_category(name: str, text: str) -> Category:
    """Parse one file's text; every line that cannot be what it looks like is an error."""
    action = Action.BLOCK
    words: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if found := _ACTION_LINE.match(stripped):
            if number != 1:
                # Silently a comment otherwise, and the category would fall back to block.
                raise LexiconError(f"{name}.txt:{number}: the action line must be the first line")
            value = found.group(1).strip()
            try:
                action = Action[value.upper()]
            except KeyError:
                raise LexiconError(f"{name}.txt:1: unknown action {value!r} (block, mask or review)") from None
            if action is Action.ALLOW:
                raise LexiconError(f"{name}.txt:1: action must be block, mask or review")
            continue
        if not stripped or stripped.startswith("#"):
            continue
        if not normalize_word(stripped):
            raise LexiconError(f"{name}.txt:{number}: {stripped!r} has no letter or digit, so it can never match")
        words.append(stripped)
    return Category(name, action, tuple(words))


def _lexicon_files(folder: Path) -> list[Path]:
    # Dot files are editor lock files (emacs `.#abuse.txt` is a dangling symlink) and
    # kubelet's own entries (`..data`, `..2024_...`): never part of the lexicon.
    return sorted(p for p in folder.glob("*.txt") if not p.name.startswith("."))


def _identity(paths: list[Path]) -> list[tuple[str, int, int, int]]:
    """What changes when a file is rewritten or a ConfigMap's `..data` symlink is swapped."""
    identity = []
    for path in paths:
        try:
            stat = path.stat()  # through the symlinks, as the read is
        except OSError as error:
            raise LexiconError(f"{path.name}: cannot be read ({error.strerror})") from None
        identity.append((path.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return identity


def load_lexicon(folder: Path) -> Lexicon:
    """Read every `*.txt` of `folder`: the file name is the category, `whitelist.txt` the whitelist.

    Raises LexiconError for anything that is not a complete, valid lexicon, including files
    that change while they are read (a reload then waits for the next change).
    """
    if not folder.is_dir():
        raise LexiconError(f"lexicon folder {folder} does not exist")
    paths = _lexicon_files(folder)
    before = _identity(paths)
    categories: list[Category] = []
    whitelist: tuple[str, ...] = ()
    for path in paths:
        try:
            # utf-8-sig: a BOM would otherwise hide the action line and become part of a word.
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise LexiconError(f"{path.name}: not UTF-8 ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise LexiconError(f"{path.name}: cannot be read ({error.strerror})") from None
        if path.name == WHITELIST_FILE:
            whitelist = parse_category("whitelist", text).words
        else:
            categories.append(parse_category(path.stem, text))
    if _identity(_lexicon_files(folder)) != before:
        raise LexiconError(f"lexicon folder {folder} changed while it was read")
    lexicon = Lexicon(tuple(categories), whitelist)
    if lexicon.word_count == 0:
        # A half-swapped or emptied folder must not switch moderation off.
        raise LexiconError(f"lexicon folder {folder} has no words")
    return lexicon
