"""Choosing the newest messages that fit a token budget (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.session.models import StoredMessage
from services.session.tokens import MESSAGE_OVERHEAD_TOKENS, TokenCounter


@dataclass(frozen=True, slots=True)
class Context:
    messages: list[StoredMessage]
    total_tokens: int
    truncated: bool


def build_context(history: Sequence[StoredMessage], system_prompt: str, budget: int,
                  counter: TokenCounter) -> Context:
    """System prompt, then the newest messages that fit `budget`, oldest first.

    Every message costs its content plus MESSAGE_OVERHEAD_TOKENS, in `counter`'s
    encoding (a message counted in another one when stored is counted again, only as far
    back as the budget reaches). The system prompt comes first; the newest message is
    always kept, cut to its beginning if it alone is too long; older messages are added
    while they fit whole.
    """
    chosen: list[StoredMessage] = []
    used = 0
    truncated = False
    system: StoredMessage | None = None
    if system_prompt:
        room = budget - MESSAGE_OVERHEAD_TOKENS
        text = counter.cut_prefix(system_prompt, room)
        truncated = text != system_prompt
        if text:
            system = StoredMessage.system(text, counter.count(text), counter.name)
            used += system.tokens + MESSAGE_OVERHEAD_TOKENS
    for index, message in enumerate(reversed(history)):
        if message.encoding != counter.name:
            message = replace(message, tokens=counter.count(message.content), encoding=counter.name)
        cost = message.tokens + MESSAGE_OVERHEAD_TOKENS
        if used + cost <= budget:
            chosen.append(message)
            used += cost
            continue
        truncated = True
        if index == 0:
            text = counter.cut_prefix(message.content, budget - used - MESSAGE_OVERHEAD_TOKENS)
            if text:
                tokens = counter.count(text)
                chosen.append(replace(message, content=text, tokens=tokens))
                used += tokens + MESSAGE_OVERHEAD_TOKENS
        break
    chosen.reverse()
    if system is not None:
        chosen.insert(0, system)
    return Context(chosen, used, truncated)
