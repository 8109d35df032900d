"""Filtering a stream of deltas: release only what no later delta can turn into a hit (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from services.moderation.lexicon import Action
from services.moderation.matcher import Hit, Matcher, apply_masks
from services.moderation.normalize import normalize


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
        self._released = 0
        self._blocked = False

    @property
    def held_chars(self) -> int:
        return len(self._pending)

    def feed(self, delta: str, *, final: bool = False) -> StreamStep:
        if self._blocked:
            raise RuntimeError("stream already blocked")
        self._pending += delta
        norm = normalize(self._pending)
        hits = self._matcher.hits(norm)
        if final:
            release = len(self._pending)
        else:
            tail = self._matcher.open_tail_start(norm)
            release = norm.origin[tail] if tail < len(norm.text) else len(self._pending)
            # A complete hit may straddle that point (it overlaps the open tail): hold all of it.
            moved = True
            while moved:
                moved = False
                for hit in hits:
                    if hit.start < release < hit.end:
                        release, moved = hit.start, True
        done = [h for h in hits if h.end <= release]
        offset = self._released
        for hit in done:
            if hit.action is Action.BLOCK:
                self._blocked = True
                return StreamStep("", (), _shift(hit, offset))
        safe = apply_masks(self._pending[:release], done)
        self._pending = self._pending[release:]
        self._released += release
        return StreamStep(safe, tuple(_shift(h, offset) for h in done))


def _shift(hit: Hit, offset: int) -> Hit:
    return Hit(hit.category, hit.word, hit.action, hit.start + offset, hit.end + offset)
