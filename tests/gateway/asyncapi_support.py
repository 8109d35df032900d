"""docs/asyncapi.yaml loaded once: `$ref`s resolved, and frames matched against its message payloads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

DOCUMENT_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
DOCUMENT: dict[str, Any] = yaml.safe_load(DOCUMENT_PATH.read_text(encoding="utf-8"))

Frame = dict[str, Any]


def pointer(ref: str) -> Any:
    """The node a local `$ref` ("#/a/b") names; KeyError when it names nothing."""
    if not ref.startswith("#/"):
        raise KeyError(f"only local references are used here, got {ref!r}")
    node: Any = DOCUMENT
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    """Every `$ref` value anywhere below `node`."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def inline(node: Any) -> Any:
    """A copy of `node` with every `$ref` replaced by what it names (siblings such as a description kept)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = inline(pointer(node["$ref"]))
            siblings = {key: inline(value) for key, value in node.items() if key != "$ref"}
            return {**target, **siblings}
        return {key: inline(value) for key, value in node.items()}
    if isinstance(node, list):
        return [inline(value) for value in node]
    return copy.deepcopy(node)


def operation_messages(action: str) -> dict[str, dict[str, Any]]:
    """The messages of the operations with `action` ("receive": client frames, "send": server frames), by
    component name, as inlined message objects."""
    messages: dict[str, dict[str, Any]] = {}
    for operation in DOCUMENT["operations"].values():
        if operation["action"] != action:
            continue
        for reference in operation["messages"]:
            name = reference["$ref"].rsplit("/", 1)[-1]
            messages[name] = inline(reference)
    return messages


def payload_validators(action: str) -> dict[str, Draft202012Validator]:
    return {name: Draft202012Validator(message["payload"]) for name, message in operation_messages(action).items()}


CLIENT_VALIDATORS = payload_validators("receive")
SERVER_VALIDATORS = payload_validators("send")


def matching_messages(frame: object, validators: dict[str, Draft202012Validator]) -> list[str]:
    """Names of the messages whose payload schema accepts `frame`."""
    return [name for name, validator in validators.items() if validator.is_valid(frame)]


def server_frame_problems(frame: Frame) -> list[str]:
    """Why a frame the edge sent does not match exactly one server message (empty: it does)."""
    matched = matching_messages(frame, SERVER_VALIDATORS)
    if len(matched) == 1:
        return []
    if matched:
        return [f"{frame.get('type')!r} matches {len(matched)} messages: {matched}"]
    same_type = [name for name, message in operation_messages("send").items()
                 if message["payload"]["properties"]["type"].get("const") == frame.get("type")]
    if not same_type:
        return [f"no server message has type {frame.get('type')!r}: {frame}"]
    validator = SERVER_VALIDATORS[same_type[0]]
    return [f"{same_type[0]}: {error.message} at {list(error.absolute_path)} in {frame}"
            for error in validator.iter_errors(frame)]
