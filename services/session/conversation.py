"""Conversation status changes: which action is allowed from which status, and to whom (pure).

The store applies the returned state by compare-and-set on the session's metadata key;
when the CAS loses, it reads the key again and asks again, so every rule below is judged
against the state the change really replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgument, PermissionDenied
from services.session.errors import Conflict, WrongStatus
from services.session.models import OPEN_STATUSES, ConversationState, Principal

ACTIONS = frozenset({"handoff", "claim", "release_ai", "release_queue", "transfer", "close", "reopen"})
"""Actions a caller may ask for over gRPC."""
SYSTEM_ACTIONS = frozenset({"wait_timeout", "idle", "reopen_by_visitor"})
"""Actions only the service itself takes: its timers, and the reopen a visitor's message causes."""
HANDOFF_REASONS = frozenset({"visitor", "keyword", "no_answer", "rule"})
"""Why a conversation is handed to a human; also the `trigger` label of kefu_handoffs_total (bounded)."""
REASONS = HANDOFF_REASONS | {"created", "claim", "release", "transfer", "close", "wait_timeout", "idle", "reopen"}
DEFAULT_REASONS = {"claim": "claim", "release_ai": "release", "release_queue": "release", "transfer": "transfer",
                   "close": "close", "reopen": "reopen", "wait_timeout": "wait_timeout", "idle": "idle",
                   "reopen_by_visitor": "reopen"}
MAX_ASSIGNEE_CHARS = 256
MAX_NAME_CHARS = 128


@dataclass(frozen=True, slots=True)
class Change:
    """One requested status change, checked for shape (not yet against any state)."""

    action: str
    expected_version: int = 0
    """Non-zero: apply only while the state's version is still this one."""
    assignee: str = ""
    assignee_name: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS | SYSTEM_ACTIONS:
            raise InvalidArgument(f"action must be one of {sorted(ACTIONS)}")
        if self.action == "transfer" and not self.assignee:
            raise InvalidArgument("transfer needs an assignee")
        if len(self.assignee) > MAX_ASSIGNEE_CHARS:
            raise InvalidArgument(f"assignee must be at most {MAX_ASSIGNEE_CHARS} characters")
        if len(self.assignee_name) > MAX_NAME_CHARS:
            raise InvalidArgument(f"assignee_name must be at most {MAX_NAME_CHARS} characters")
        allowed = HANDOFF_REASONS if self.action == "handoff" else REASONS
        if self.reason and self.reason not in allowed:
            raise InvalidArgument(f"reason for {self.action} must be one of {sorted(allowed)}")


def decide(state: ConversationState, actor: Principal | None, change: Change, now: float) -> ConversationState | None:
    """The state after `change`, or None when nothing changes (a no-op the caller asked for).

    `actor` None is the service itself (timers). Checked in this order: the actor's role
    (PermissionDenied), `expected_version` (Conflict), the current status (WrongStatus, or
    Conflict for a conversation another agent holds), the actor's hold on it (PermissionDenied).
    """
    action = change.action
    if actor is not None:
        if action in SYSTEM_ACTIONS:
            raise InvalidArgument(f"action must be one of {sorted(ACTIONS)}")
        if not actor.is_staff and action != "handoff":
            raise PermissionDenied(f"a visitor may not {action}")
    if change.expected_version and change.expected_version != state.version:
        raise Conflict("claim_conflict" if action == "claim" else "version_conflict", state.version)
    status = state.status
    reason = change.reason or DEFAULT_REASONS.get(action, "")

    def moved(to: str, assignee: str = "", assignee_name: str = "", since: float = now) -> ConversationState:
        return ConversationState(status=to, version=state.version + 1, assignee=assignee,
                                 assignee_name=assignee_name, reason=reason, since=since)

    def require(*statuses: str) -> None:
        if status not in statuses:
            raise WrongStatus(action, status)

    if action == "handoff":
        if status == "waiting_human":
            return None  # asked twice (a double click): already queued
        require("ai")
        if not change.reason:
            reason = "rule" if actor is not None and actor.is_staff else "visitor"
        return moved("waiting_human")
    if action == "claim":
        assert actor is not None
        if status == "human":
            if state.assignee == actor.subject:
                return None
            raise Conflict("claim_conflict", state.version)
        require("ai", "waiting_human")
        return moved("human", actor.subject, change.assignee_name)
    if action == "release_ai":
        require("waiting_human", "human")
        _require_holder(state, actor, action)
        return moved("ai")
    if action == "release_queue":
        require("human")
        _require_holder(state, actor, action)
        return moved("waiting_human")
    if action == "transfer":
        require("human")
        _require_holder(state, actor, action)
        if change.assignee == state.assignee:
            return None
        # Still "human": `since` keeps the time the conversation left the queue.
        return moved("human", change.assignee, change.assignee_name, since=state.since)
    if action in ("close", "idle"):
        require(*OPEN_STATUSES)
        return moved("closed")
    if action in ("reopen", "reopen_by_visitor"):
        require("closed")
        return moved("ai")
    if action == "wait_timeout":
        require("waiting_human")
        return moved("ai")
    raise AssertionError(action)  # Change checked it


def _require_holder(state: ConversationState, actor: Principal | None, action: str) -> None:
    """A conversation an agent holds is released or passed on only by that agent, or an admin."""
    if state.status != "human" or actor is None or actor.role == "admin" or actor.subject == state.assignee:
        return
    raise PermissionDenied(f"only the assignee or an admin may {action}")


def describe(state: ConversationState) -> str:
    """The short text of a `state` event, e.g. "status: human (claim)"."""
    return f"status: {state.status} ({state.reason})"
