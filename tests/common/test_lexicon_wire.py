"""The lexicon's NATS KV value: what moderation writes is what the worker reads, and nothing else is."""

from __future__ import annotations

import json
import zlib

import pytest

from services.common.lexicon import wire
from services.common.lexicon.model import Action, Category, Lexicon
from services.common.lexicon.wire import LexiconWireError, decode, encode
from services.moderation.lexicon import load_lexicon
from services.moderation.settings import BUNDLED_LEXICON

SMALL = Lexicon((Category("fraud", Action.BLOCK, ("刷单返利", "网络赌博")), Category("abuse", Action.MASK, ("傻逼",))),
                ("刷单返利骗局",))


def test_lexicon_wire_round_trips_the_bundled_lexicon_byte_for_byte() -> None:
    lexicon = load_lexicon(BUNDLED_LEXICON)
    data = encode(lexicon)
    assert decode(data) == lexicon
    assert encode(decode(data)) == data  # the same lexicon, the same bytes: a publisher can skip it


def _raw(document: object) -> bytes:
    return zlib.compress(json.dumps(document, ensure_ascii=False).encode())


@pytest.mark.parametrize(("value", "reason"), [
    (b"not compressed", "not a compressed lexicon"),
    (zlib.compress(b"{not json"), "not JSON"),
    (_raw({"format": 2, "categories": [], "whitelist": []}), "format"),
    (_raw({"format": 1, "categories": [{"name": "x", "action": "allow", "words": ["a"]}], "whitelist": []}),
     "action must be"),
    (_raw({"format": 1, "categories": [{"name": "x", "action": "block", "words": ["", 3]}], "whitelist": []}),
     "non-empty strings"),
    (_raw({"format": 1, "categories": [{"name": "x", "action": "block", "words": []}], "whitelist": []}),
     "no words"),
    (encode(SMALL)[:-5], "truncated"),
])
def test_lexicon_wire_refuses_what_is_not_a_whole_lexicon(value: bytes, reason: str) -> None:
    with pytest.raises(LexiconWireError, match=reason):
        decode(value)


def test_lexicon_wire_bounds_what_a_value_may_inflate_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_DECODED_BYTES", 1000)
    bomb = _raw({"format": 1, "categories": [{"name": "x", "action": "block", "words": ["a" * 5000]}],
                 "whitelist": []})
    assert len(bomb) < 200
    with pytest.raises(LexiconWireError, match="larger than 1000"):
        decode(bomb)


def test_lexicon_wire_refuses_a_lexicon_beyond_one_nats_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_VALUE_BYTES", 20)
    with pytest.raises(LexiconWireError, match="more than 20"):
        encode(SMALL)
