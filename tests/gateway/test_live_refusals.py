"""gateway.live.context.refusal: the one place a refused live-chat request becomes a `nack` or a close."""

from __future__ import annotations

from msgspec import UNSET

from gateway.errors import ApiError, FeedUnavailable, NotYours, Refused, SocketRefused
from gateway.live.context import refusal
from gateway.live.frames import CLOSE_FORBIDDEN, CLOSE_RATE_LIMITED, Nack

C = "c" * 32


def test_refusal_closes_a_visitor_asking_for_another_conversation() -> None:
    answer = refusal("send", NotYours(C), staff=False, cid="c1", conversation_id=C)
    assert isinstance(answer, SocketRefused)
    assert (answer.close_code, answer.code, answer.message) == (CLOSE_FORBIDDEN, "forbidden", "not your conversation")


def test_refusal_tells_an_agent_there_is_no_such_conversation() -> None:
    assert refusal("claim", NotYours(C), staff=True, cid="k1", conversation_id=C) == \
        Nack("claim", "forbidden", "no such conversation in your tenant", "k1", C)


def test_refusal_nacks_with_the_shared_codes_and_names_the_request() -> None:
    assert refusal("send", Refused("not_assigned", "claim it first"), staff=True, conversation_id=C) == \
        Nack("send", "not_assigned", "claim it first", UNSET, C)
    assert refusal("read", FeedUnavailable("down"), staff=False) == Nack("read", "unavailable", "down")
    assert refusal("send", ApiError("content_blocked", "blocked", 400), staff=False, cid="c1") == \
        Nack("send", "content_blocked", "blocked", "c1")


def test_refusal_nacks_every_limit_as_limit() -> None:
    for code in ("rate_limited", "quota_exceeded", "storage_full"):
        answer = refusal("send", ApiError(code, f"{code}: details", 429), staff=False, cid="c1")
        assert answer == Nack("send", "limit", f"{code}: details", "c1")


def test_refusal_that_ends_the_socket_is_kept() -> None:
    flood = SocketRefused(CLOSE_RATE_LIMITED, "rate_limited", "too many frames")
    assert refusal("send", flood, staff=False) is flood
