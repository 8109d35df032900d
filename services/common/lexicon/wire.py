"""The lexicon as one NATS KV value: moderation publishes it, every llm worker watches it."""

from __future__ import annotations

import json
import zlib

from nats.js.api import KeyValueConfig, StorageType

from services.common.errors import KefuError
from services.common.lexicon.model import Action, Category, Lexicon

LEXICON_BUCKET = "kefu_lexicon"
LEXICON_KEY = "shared"
"""Every tenant shares one lexicon today; a per-tenant lexicon would be one key per tenant."""
FORMAT = 1
MAX_VALUE_BYTES = 1024 * 1024
"""nats-server's default max_payload: a bigger value cannot be published (about 60,000 Chinese words fit)."""
MAX_DECODED_BYTES = 64 * 1024 * 1024
"""What a value may inflate to: a corrupt or hostile value cannot take the worker's memory."""


class LexiconWireError(KefuError, ValueError):
    """A KV value that is not a complete, valid lexicon; the message says what is wrong."""


def bucket_config(replicas: int = 1) -> KeyValueConfig:
    # History 1: a worker needs only the current lexicon; a restarted worker reads it back from here.
    return KeyValueConfig(bucket=LEXICON_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
                          description="kefu: the sensitive-word lexicon in use (written by moderation)")


def encode(lexicon: Lexicon) -> bytes:
    """The same lexicon always gives the same bytes, so a publisher can tell an unchanged one."""
    document = {
        "format": FORMAT,
        "categories": [{"name": c.name, "action": c.action.name.lower(), "words": list(c.words)}
                       for c in lexicon.categories],
        "whitelist": list(lexicon.whitelist),
    }
    data = zlib.compress(json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode(), 6)
    if len(data) > MAX_VALUE_BYTES:
        raise LexiconWireError(f"the lexicon is {len(data)} bytes compressed, more than {MAX_VALUE_BYTES}")
    return data


def decode(data: bytes) -> Lexicon:
    """Raises LexiconWireError for anything but a lexicon `encode` could have written, with words."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_DECODED_BYTES)
    except zlib.error as error:
        raise LexiconWireError(f"not a compressed lexicon ({error})") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise LexiconWireError(f"truncated, or larger than {MAX_DECODED_BYTES} bytes inflated")
    try:
        document = json.loads(text)
    except ValueError as error:
        raise LexiconWireError(f"not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise LexiconWireError(f"not a lexicon of format {FORMAT}")
    categories = document.get("categories")
    if not isinstance(categories, list):
        raise LexiconWireError("no categories")
    parsed = tuple(_category(entry) for entry in categories)
    lexicon = Lexicon(parsed, _words(document.get("whitelist"), "whitelist"))
    if lexicon.word_count == 0:
        # An emptied lexicon must not switch the output filter off (the same rule as moderation's folder).
        raise LexiconWireError("the lexicon has no words")
    return lexicon


def _category(entry: object) -> Category:
    if not isinstance(entry, dict) or not isinstance(name := entry.get("name"), str):
        raise LexiconWireError("a category without a name")
    action = entry.get("action")
    if not isinstance(action, str) or action.upper() not in ("BLOCK", "MASK", "REVIEW"):
        raise LexiconWireError(f"category {name!r}: action must be block, mask or review")
    return Category(name, Action[action.upper()], _words(entry.get("words"), name))


def _words(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(word, str) and word for word in value):
        raise LexiconWireError(f"{where}: words must be a list of non-empty strings")
    return tuple(value)
