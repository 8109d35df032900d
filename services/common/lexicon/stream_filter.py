"""Filtering a stream of deltas: release only what no later delta can turn into a hit (pure)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from services.common.lexicon.matcher import Hit, Matcher, apply_masks
from services.common.lexicon.model import Action
from services.common.lexicon.normalize import Normalized, normalize


@dataclass(frozen=True, slots=True)
class StreamStep:
    safe_text: str
    """Text released by this step, masked where needed."""
    hits: tuple[Hit, ...]
    """Hits inside the released text, positions relative to the whole stream."""
    blocked: Hit | None = None
    """A BLOCK hit: the stream must end; nothing of the word was released."""


class StreamFilter:
    """Holds back the shortest tail that could still complete a listed word or whitelisted phrase.

    No hit ever straddles the released/held boundary, so re-checking only the held text
    gives the same result as checking the whole text at once.
    """

    def __init__(self, matcher: Matcher) -> None:
        self._matcher = matcher
        self._pending = ""
        # The normalised form of `_pending`, kept delta by delta (folding is per character):
        # noise after an open tail ("f" and then pages of dots) makes `_pending` long but not
        # this, so a delta costs the same however much noise is held.
        self._text = ""
        self._origin: list[int] = []
        self._released = 0
        self._blocked = False

    @property
    def held_chars(self) -> int:
        return len(self._pending)

    def feed(self, delta: str, *, final: bool = False) -> StreamStep:
        if self._blocked:
            raise RuntimeError("stream already blocked")
        added = normalize(delta)
        if added.text:
            base = len(self._pending)
            self._text += added.text
            self._origin.extend(base + index for index in added.origin())
        self._pending += delta
        norm = Normalized.joined(self._pending, self._text, self._origin)
        hits = self._matcher.hits(norm)
        offset = self._released
        if final:
            release = len(self._pending)
        else:
            tail = self._matcher.open_tail_start(norm)
            release = self._origin[tail] if tail < len(self._text) else len(self._pending)
            # A hit that starts before the open tail is final: no whitelisted phrase can still
            # cover it (the tail would then start at or before it). A BLOCK ends the stream now,
            # even if the hit overlaps the tail.
            for hit in hits:
                if hit.action is Action.BLOCK and hit.start < release:
                    return self._block(hit, offset)
            # A complete hit may straddle that point (it overlaps the open tail): hold all of it.
            moved = True
            while moved:
                moved = False
                for hit in hits:
                    if hit.start < release < hit.end:
                        release, moved = hit.start, True
        done = [h for h in hits if h.end <= release]
        for hit in done:
            if hit.action is Action.BLOCK:
                return self._block(hit, offset)
        safe = apply_masks(self._pending[:release], done)
        self._pending = self._pending[release:]
        kept = bisect_left(self._origin, release)
        self._text = self._text[kept:]
        self._origin = [index - release for index in self._origin[kept:]]
        self._released += release
        return StreamStep(safe, tuple(_shift(h, offset) for h in done))


    def _block(self, hit: Hit, offset: int) -> StreamStep:
        self._blocked = True
        return StreamStep("", (), _shift(hit, offset))


def _shift(hit: Hit, offset: int) -> Hit:
    return Hit(hit.category, hit.word, hit.action, hit.start + offset, hit.end + offset)
