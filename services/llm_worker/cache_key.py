"""What makes two turns the same question: the cache rule and the cache key (pure)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import opencc

from services.llm_worker.plugin_api import ChatMessage, GenerationParams

_T2S = opencc.OpenCC("t2s")
# What makes a message personal whatever the knowledge base says: five or more digits in a row
# (order, phone, tracking numbers; NFKC turns full-width digits into these) or an e-mail address.
_PERSONAL = re.compile(r"\d{5,}|[^\s@]+@[^\s@]+\.[^\s@]+")


def looks_personal(text: str) -> bool:
    return _PERSONAL.search(unicodedata.normalize("NFKC", text)) is not None


def normalize_question(text: str) -> str:
    """NFKC, case folded, traditional folded to simplified, punctuation dropped, whitespace collapsed."""
    folded = _T2S.convert(unicodedata.normalize("NFKC", text)).casefold()
    kept = "".join(ch if unicodedata.category(ch)[0] in "LN" else " " for ch in folded)
    return " ".join(kept.split())


def cacheable_question(messages: Sequence[ChatMessage],
                       standalone: Callable[[str], bool] | None = None) -> str | None:
    """The (normalised) question if the turn may use the cache, else None.

    The rule (README, "The answer cache"): a turn is cacheable only if it is the first user message of its
    conversation, or it is standalone and so is every earlier user message (general FAQ
    questions, judged by the knowledge base), with nothing but the AI's answers between
    them; and no user message may look personal (an order or phone number, an e-mail), not
    even a first one. A human agent's message, or any user message that is not a general question
    (an order number, an address), may make the context user-specific: such a turn is never
    served from nor stored into the cache.
    """
    if any(m.role not in ("user", "system", "assistant") for m in messages):
        return None
    users = [m.content for m in messages if m.role == "user"]
    if not users or messages[-1].role != "user" or any(looks_personal(text) for text in users):
        return None
    if len(users) > 1 and (standalone is None or not all(standalone(text) for text in users)):
        return None
    if len(users) == 1 and any(m.role == "assistant" for m in messages):
        return None
    return normalize_question(users[-1]) or None


@lru_cache(maxsize=1024)
def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def target_version(plugins_fingerprint: str, provider: str, settings: Mapping[str, object]) -> str:
    """The serving version: another model, other settings, or any change to the plugins folder
    (code, routes, FAQ data) gives new keys, so a swap never serves the old version's answers."""
    visible = {k: v for k, v in settings.items() if "key" not in k.lower() and "secret" not in k.lower()}
    return _digest(plugins_fingerprint, provider, json.dumps(visible, sort_keys=True, default=str))


def system_digest(messages: Sequence[ChatMessage]) -> str:
    """The system prompt's part of a key (its version: any change gives new keys)."""
    return _digest("\n".join(m.content for m in messages if m.role == "system"))


def knowledge_part(version: int, grounding: str, assistant_name: str) -> str:
    """The key part of a grounded answer: the tenant's knowledge version and what shapes the prompt."""
    return f"kb{version}\0{grounding}\0{assistant_name}"


@dataclass(frozen=True, slots=True)
class CacheKey:
    tenant: str
    route: str
    digest: str

    @classmethod
    def of(cls, tenant: str, route: str, version: str, messages: Sequence[ChatMessage], question: str,
           params: GenerationParams, epochs: str, knowledge: str = "") -> CacheKey:
        """Keyed on the question alone (plus prompt and version): earlier turns, when allowed at
        all, are general questions that do not change the answer. `knowledge` names what the answer
        is grounded on (the tenant's knowledge version and grounding settings, see `knowledge_part`):
        after a document changes, no answer built on the old text is found."""
        parts = [tenant, route, version, system_digest(messages), question, str(params.max_tokens),
                 str(params.temperature), epochs]
        if knowledge:  # left out when empty: the keys of tenants without documents stay as they were
            parts.append(knowledge)
        return cls(tenant, route, _digest(*parts))

    @property
    def kv_key(self) -> str:
        # Tenant first: a key of tenant A can never be computed from tenant B's request.
        return f"{self.tenant}.{self.digest}"
