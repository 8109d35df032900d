"""The provider plugin contract: what a module in plugins/ exports and the worker calls.

A plugin module exports one name, `plugin`: a factory (usually the provider class itself)
with a `name` attribute that routes refer to. The worker calls it once per route with that
route's settings, then `setup()`, then `self_test()` before the generation goes live.

Plugins import only this module (and their own libraries). They do no work at import time:
no sockets, no threads, no metrics; they acquire those in `setup()` and release them in
`aclose()`. The contract only grows: new arguments are keyword-only and optional.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from services.common.errors import KefuError
from services.llm_worker.knowledge.models import Chunk, Hit

__all__ = ["Chunk", "Hit"]  # the passages' types, re-exported: plugins import only this module

ROLES = frozenset({"system", "user", "assistant", "agent"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the context; `role` is one of ROLES ("agent" is a human agent's reply)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Knobs of one generation; None means the provider's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    passages: tuple[Hit, ...] | None = None
    """The tenant's document passages retrieved for the last user message, best first, all from one
    snapshot of its knowledge base; None when the tenant has no documents (the provider answers as it
    always did). A provider with the "offline" capability answers from these alone (extractively, e.g.
    with `services.llm_worker.knowledge.extractive.extract_answer`) and names what it quoted in
    `Finish.cited`; an empty answer with finish_reason "handoff" when they do not answer the question.
    An LLM provider finds them already numbered [1]..[k] in `messages` and may ignore this field.

    Each `Hit` has `chunk` (a `Chunk`: `text`, `title`, `heading`, `url`, `kind` "text" or "faq",
    an FAQ item's `answer`, `document_id`, `chunk_id`) and its retrieval `score`."""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Delta:
    """The next piece of the answer, in order."""

    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The last event of every successful stream."""

    finish_reason: str
    """"stop" when the answer is complete, "length" when `max_tokens` cut it, "handoff" when the
    provider has no answer and offers a human agent."""
    usage: Usage
    model: str
    """The model that answered (an upstream name, or the plugin's own for offline ones)."""
    cited: tuple[int, ...] = ()
    """Indexes into `GenerationParams.passages` of the passages the answer quotes, in order of first
    use (an answer from passages should cite what it used; the worker turns them into citations)."""
    quotes: tuple[str, ...] = ()
    """Per index of `cited`, the words of that passage the answer uses ("" or missing: the worker
    quotes the passage's start)."""


StreamEvent = Delta | Finish


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What the host gives every provider besides its route settings."""

    plugins_dir: Path
    """The folder the plugin was loaded from; data files sit beside the modules (flat: ConfigMaps hold no folders)."""
    extra: Mapping[str, object] = field(default_factory=dict)


class ProviderError(KefuError):
    """A provider failed for a reason the caller should see; `retryable` when trying again may help."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@runtime_checkable
class Provider(Protocol):
    """One configured provider instance, serving one route."""

    capabilities: frozenset[str]
    """What it can do, e.g. {"stream", "temperature", "max_tokens", "offline"}."""

    async def setup(self) -> None:
        """Acquire clients and load data. Called once, before `self_test()`."""

    def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncGenerator[StreamEvent, None]:
        """Stream the answer to `messages`: zero or more `Delta`, then exactly one `Finish`.

        An async generator function (`async def` with `yield`); the host closes it with
        `aclose()` when the consumer stops early, so `finally` blocks release the upstream.
        Raise `ProviderError` on failure. Cancellation (the client went away) arrives as
        `asyncio.CancelledError` at an `await`: stop at once and release the upstream request.
        """

    async def self_test(self) -> None:
        """Raise if the provider cannot serve; must not call paid upstreams."""

    async def aclose(self) -> None:
        """Release what `setup()` acquired. Called when the generation is dropped."""


@runtime_checkable
class ProviderFactory(Protocol):
    """The module's `plugin` object: builds a provider from a route's settings."""

    name: str
    """The provider name routes refer to, e.g. "knowledge_base"."""

    def __call__(self, settings: Mapping[str, object], context: PluginContext) -> Provider: ...


@runtime_checkable
class KnowsQuestions(Protocol):
    """Optional: a provider that knows the shop's common questions (the knowledge base does).

    The worker uses it for the cache rule (standalone questions) and pre-generates answers to
    the suggested next questions in the background.
    """

    def suggest_next(self, question: str, limit: int = 3) -> list[str]:
        """Up to `limit` likely next questions after `question`, in its language; [] when unsure."""

    def is_standalone(self, question: str) -> bool:
        """True when `question` is a general one (an FAQ question) whose answer depends on nobody."""


@runtime_checkable
class CanonicalQuestions(Protocol):
    """Optional: a provider that can tell which common question a visitor's wording asks.

    The worker keys the cache of standalone questions by this canonical wording too, so a
    paraphrase is served the answer generated for the canonical question (never another visitor's
    wording of it), and it warms the cache with the answers to `common_questions`.
    """

    def canonical_question(self, question: str) -> str | None:
        """The canonical wording (in the question's language) of the common question `question`
        asks, only when one answer serves both and the match is unambiguous; None when unsure,
        when the question is personal, or when it asks for something the cache must not answer."""

    def common_questions(self, like: str, limit: int = 100) -> list[str]:
        """Up to `limit` canonical questions in the language of `like`, most asked first: what the
        worker pre-generates to warm the cache (each is its own canonical question)."""
