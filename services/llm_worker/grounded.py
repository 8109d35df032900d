"""How a turn uses the tenant's documents: small talk, retrieval on one snapshot, a provider answering from it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol

from services.llm_worker.citations import CitedFinish, citations_of
from services.llm_worker.knowledge.grounding import CitationScanner, GroundingMode, grounded_messages
from services.llm_worker.knowledge.models import Retrieval
from services.llm_worker.knowledge.smalltalk import small_talk
from services.llm_worker.plugin_api import (
    ChatMessage,
    Delta,
    Finish,
    GenerationParams,
    Hit,
    Provider,
    ProviderError,
    StreamEvent,
    Usage,
)

log = logging.getLogger(__name__)

PASSAGES_K = 8
"""Passages retrieved per turn (numbered [1]..[k] in an LLM's prompt): with the 400-token chunks, 8 bring
the gold answer span into the prompt for 0.99 of the CMRC 2018 trial questions, 5 for 0.985 (make bench-kb)."""
SMALL_TALK_MODEL = "small-talk"
"""`Done.model` of a greeting, thanks or goodbye answered by the worker itself."""
HANDOFF: Final = "handoff"

PlanKind = Literal["small_talk", "handoff", "grounded", "ungrounded"]


class TenantSnapshot(Protocol):
    """One tenant's knowledge at one moment (kb.library.TenantKnowledge): a whole turn reads only this."""

    @property
    def version(self) -> int:
        """0 when the tenant never had documents."""

    def retrieve(self, question: str, *, previous_user_turns: Sequence[str] = (), k: int = 5) -> Retrieval:
        """The passages for `question` (a follow-up resolved against the earlier turns) and whether they answer it."""

    async def fused(self, retrieval: Retrieval, k: int = 5) -> Retrieval:
        """With embeddings, `retrieval`'s passages in the order fused with dense retrieval (else as they are)."""


class KnowledgeSource(Protocol):
    """Where the worker gets a tenant's snapshot (kb.library.KnowledgeLibrary)."""

    async def snapshot(self, tenant: str) -> TenantSnapshot: ...


@dataclass(frozen=True, slots=True)
class Grounding:
    """The tenant's settings that shape a grounded answer (from the edge, per request)."""

    mode: GroundingMode = "strict"
    """"strict": facts only from the documents, else a handoff; "open": the model may answer from
    general knowledge and says so."""
    assistant_name: str = ""

    @classmethod
    def of(cls, mode: str, assistant_name: str) -> Grounding:
        """Lenient: an unknown or empty mode is "strict" (the safe one)."""
        return cls("open" if mode == "open" else "strict", assistant_name.strip()[:64])


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What a turn does before any provider is asked."""

    kind: PlanKind
    """small_talk: `reply` is the answer; handoff: nothing in the documents answers (strict), hand over
    with no text; grounded: answer from `hits`; ungrounded: the tenant has no documents, the route's
    provider answers as it always did."""
    reply: str = ""
    knowledge_version: int = 0
    hits: tuple[Hit, ...] = ()
    answerable: bool = False
    """Retrieval found support for an answer (False with kind "grounded" only in open mode)."""
    follow_up: bool = False
    """Retrieval joined the question with an earlier turn: the answer depends on the conversation."""
    retrieval_seconds: float = 0.0


def last_user_turns(messages: Sequence[ChatMessage]) -> tuple[str, tuple[str, ...]]:
    """The question (the last user message) and the user messages before it, oldest first."""
    users = [m.content for m in messages if m.role == "user"]
    if not users:
        return "", ()
    return users[-1], tuple(users[:-1])


async def plan_turn(source: KnowledgeSource | None, tenant: str, messages: Sequence[ChatMessage],
                    grounding: Grounding, *, offline: bool, k: int = PASSAGES_K) -> TurnPlan:
    """Retrieval on ONE snapshot of the tenant's knowledge (the whole turn, cache key included, uses
    that snapshot's version), after small talk: a greeting, thanks or goodbye gets a short reply from
    the worker whenever the answer would otherwise come from documents or an offline provider (which
    would hand it over); an LLM route of a tenant without documents answers it itself, as before."""
    question, earlier = last_user_turns(messages)
    start = time.perf_counter()
    try:
        snapshot = await source.snapshot(tenant) if source is not None and tenant else None
    except Exception as error:
        # Answering without the tenant's documents could break its strict grounding: fail the turn (retryable).
        log.warning("knowledge of tenant %s unavailable: %s", tenant, type(error).__name__)
        raise ProviderError("the knowledge base is unavailable", retryable=True) from error
    version = snapshot.version if snapshot is not None else 0
    if version > 0 or offline:
        chat = small_talk(question, assistant_name=grounding.assistant_name)
        if chat is not None:
            return TurnPlan("small_talk", reply=chat.reply, knowledge_version=version)
    if snapshot is None or version <= 0:
        return TurnPlan("ungrounded", retrieval_seconds=time.perf_counter() - start)
    retrieval = snapshot.retrieve(question, previous_user_turns=earlier, k=k)
    follow_up = retrieval.query != question
    if retrieval.answerable or grounding.mode == "open":
        # Only passages that will be used are worth an embeddings request (a handoff needs none).
        retrieval = await snapshot.fused(retrieval, k)
        seconds = time.perf_counter() - start
        return TurnPlan("grounded", knowledge_version=version, hits=tuple(retrieval.hits),
                        answerable=retrieval.answerable, follow_up=follow_up, retrieval_seconds=seconds)
    return TurnPlan(HANDOFF, knowledge_version=version, follow_up=follow_up,
                    retrieval_seconds=time.perf_counter() - start)


def grounded_prompt(messages: Sequence[ChatMessage], hits: Sequence[Hit], grounding: Grounding) -> list[ChatMessage]:
    """What an LLM is sent: the tenant's system prompt, the numbered passages and the instructions,
    then the conversation (K1's grounded_messages)."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    conversation = [m for m in messages if m.role != "system"]
    return grounded_messages(system, hits, conversation, mode=grounding.mode,
                             assistant_name=grounding.assistant_name)


class GroundedProvider:
    """A route's provider, answering from one turn's passages; its Finish carries the citations.

    Offline providers (the "offline" capability) get the passages in `GenerationParams.passages`
    and name what they quoted in `Finish.cited`. An LLM gets them in its prompt; its deltas go through
    the CitationScanner, so a decline marker is never shown (even in part) and becomes a handoff.
    """

    def __init__(self, inner: Provider, hits: Sequence[Hit]) -> None:
        self._inner = inner
        self._hits = tuple(hits)
        self.capabilities = inner.capabilities

    @property
    def offline(self) -> bool:
        return "offline" in self.capabilities

    async def setup(self) -> None:
        """The inner provider is set up by its generation."""

    async def self_test(self) -> None:
        """Tested as part of its generation."""

    async def aclose(self) -> None:
        """Closed with its generation."""

    async def stream(self, messages: Sequence[ChatMessage], params: GenerationParams,
                     ) -> AsyncGenerator[StreamEvent, None]:
        if self.offline:
            events = self._extractive(messages, params)
        else:
            events = self._scanned(messages, params)
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                yield event

    async def _extractive(self, messages: Sequence[ChatMessage], params: GenerationParams,
                          ) -> AsyncGenerator[StreamEvent, None]:
        async with contextlib.aclosing(self._inner.stream(messages, replace(params, passages=self._hits))) as events:
            async for event in events:
                if isinstance(event, Finish):
                    yield CitedFinish(event.finish_reason, event.usage, event.model, event.cited, event.quotes,
                                      citations=citations_of(self._hits, event.cited, event.quotes))
                    return
                yield event

    async def _scanned(self, messages: Sequence[ChatMessage], params: GenerationParams,
                       ) -> AsyncGenerator[StreamEvent, None]:
        scanner = CitationScanner(len(self._hits))
        async with contextlib.aclosing(self._inner.stream(messages, params)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    safe = scanner.feed(event.text)
                    if safe:
                        yield Delta(safe)
                elif isinstance(event, Finish):
                    tail = scanner.finish()
                    if scanner.declined:
                        yield CitedFinish(HANDOFF, event.usage, event.model)
                        return
                    if tail:
                        yield Delta(tail)
                    cited = tuple(n - 1 for n in scanner.cited)
                    yield CitedFinish(event.finish_reason, event.usage, event.model, cited,
                                      citations=citations_of(self._hits, cited))
                    return


def handoff_finish(model: str) -> CitedFinish:
    """The end of a turn the documents do not answer: no text, a handoff."""
    return CitedFinish(HANDOFF, Usage(0, 0), model)
