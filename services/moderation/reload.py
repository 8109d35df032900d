"""Lexicon hot reload: rebuild on a folder change, swap atomically, keep the old lexicon on any error."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from pathlib import Path
from typing import Self

from watchfiles import awatch

from services.common.lexicon.matcher import Matcher
from services.moderation.lexicon import Lexicon, LexiconError, load_lexicon
from services.moderation.metrics import ModerationMetrics

log = logging.getLogger(__name__)

RETRY_WATCH_S = 1.0


class ReloadResult(enum.Enum):
    OK = "ok"
    """A new lexicon serves new checks."""
    REFUSED = "refused"
    """The folder does not hold a valid, complete lexicon: the old one keeps serving."""
    UNCHANGED = "unchanged"
    """Same words as the one in use (an editor's temp file came and went): nothing swapped."""


def _build(folder: Path, current: Lexicon) -> Matcher | None:
    lexicon = load_lexicon(folder)
    return None if lexicon == current else Matcher(lexicon)


def _inode(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_ino
    except OSError:
        return None


def _fingerprint(folder: Path) -> frozenset[tuple[str, int, int, int]]:
    """What the folder's entries are (name, inode, size, mtime; through symlinks): cheap to take
    every second, and different after any write a reload would see."""
    entries: set[tuple[str, int, int, int]] = set()
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                try:
                    info = entry.stat(follow_symlinks=True)
                except OSError:
                    continue
                entries.add((entry.name, info.st_ino, info.st_size, info.st_mtime_ns))
    except OSError:
        pass
    return frozenset(entries)


class LexiconReloader:
    """Owns the matcher in use; callers read `matcher` once per check (or once per stream)."""

    def __init__(self, folder: Path, matcher: Matcher, metrics: ModerationMetrics) -> None:
        self.folder = folder
        self.generation = 1
        self._matcher = matcher
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self.swapped = asyncio.Event()
        """Set on every swap: the publisher (services.moderation.publish) clears it and sends the new lexicon."""
        metrics.lexicon_words.set(matcher.word_count)
        metrics.lexicon_generation.set(self.generation)

    @classmethod
    def load(cls, folder: Path, metrics: ModerationMetrics) -> Self:
        """The first generation; raises LexiconError, as the process cannot serve without one."""
        return cls(folder, Matcher(load_lexicon(folder)), metrics)

    @property
    def matcher(self) -> Matcher:
        return self._matcher

    async def reload(self) -> ReloadResult:
        """Read the folder again; swap the new matcher in only if the whole lexicon is valid."""
        async with self._lock:
            try:
                # Off the event loop: a 20,000-word lexicon takes about 0.1 s to build.
                matcher = await asyncio.to_thread(_build, self.folder, self._matcher.lexicon)
            except LexiconError as error:
                return self._refuse(str(error))
            except Exception as error:
                log.exception("lexicon reload failed unexpectedly")
                return self._refuse(f"{type(error).__name__}: {error}")
            if matcher is None:
                log.debug("lexicon folder changed, words did not: generation %d stays", self.generation)
                return ReloadResult.UNCHANGED
            # One reference assignment: a check sees either the old matcher or the new one.
            self._matcher = matcher
            self.generation += 1
            self.swapped.set()
            self._metrics.lexicon_generation.set(self.generation)
            self._metrics.lexicon_words.set(matcher.word_count)
            self._metrics.lexicon_reloads.labels(ReloadResult.OK.value).inc()
            log.info("lexicon generation %d in use: %d words, %d whitelisted phrases",
                     self.generation, matcher.word_count, len(matcher.lexicon.whitelist))
            return ReloadResult.OK

    def _refuse(self, reason: str) -> ReloadResult:
        self._metrics.lexicon_reloads.labels(ReloadResult.REFUSED.value).inc()
        log.warning("lexicon reload refused, generation %d keeps serving: %s", self.generation, reason)
        return ReloadResult.REFUSED

    async def watch(self, stop: asyncio.Event, *, quiet_ms: int = 200, debounce_ms: int = 1600) -> None:
        """Reload on every batch of changes under the folder, until `stop` is set.

        Any batch triggers a reload, whatever names it holds: a Kubernetes ConfigMap update
        swaps the `..data` symlink and reports no event for the `*.txt` names themselves
        (watchfiles only sees `..data` change); the reload reads through the symlinks.
        """
        started = False
        while not stop.is_set():
            watched = _inode(self.folder)
            try:
                if watched is None:
                    raise FileNotFoundError(f"lexicon folder {self.folder} does not exist")
                seen = _fingerprint(self.folder)
                if started:
                    # Changes made while nothing watched (the folder was replaced) sent no event.
                    await self.reload()
                started = True
                # Wake up every second even without events: a folder replaced before inotify
                # registered (or between two events) is then noticed by its inode, and a write
                # made before the new watch registered by the folder's fingerprint.
                async for changes in awatch(self.folder, stop_event=stop, step=quiet_ms, debounce=debounce_ms,
                                            rust_timeout=1000, yield_on_timeout=True):
                    current = _fingerprint(self.folder)
                    if changes or current != seen:
                        seen = current
                        await self.reload()
                    if _inode(self.folder) != watched:
                        # inotify follows the old folder's inode: it would never report again.
                        log.warning("lexicon folder %s was replaced; watching the new one", self.folder)
                        break
                else:
                    return  # awatch ends only once `stop` is set
                continue
            except OSError as error:
                log.warning("cannot watch the lexicon folder: %s; retrying in %.0f s", error, RETRY_WATCH_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_WATCH_S)
