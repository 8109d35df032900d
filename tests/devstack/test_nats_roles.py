"""The NATS permission table (devtools/devstack/nats_auth.py) covers every bucket, stream and subject the code uses.

A bucket added without a line there works in unit tests (their nats-server has no users) and fails only
against the real stack with a permissions violation: this test names it at once."""

from __future__ import annotations

import re
from pathlib import Path

from devtools.devstack.nats_auth import ROLES, STREAM_SUBJECTS, Access, kv, obj, permissions, stream_subjects

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for folder in ("gateway", "services") for p in (REPO_ROOT / folder).rglob("*.py")]
CONSTANT = re.compile(r'^(\w+)\s*=\s*f?"([^"{]+)"', re.MULTILINE)


def constants(pattern: str, names: str = r"\w+") -> dict[str, str]:
    """Module-level string constants whose name matches `names` and value `pattern`, as {value: where}."""
    found: dict[str, str] = {}
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for name, value in CONSTANT.findall(text):
            if re.fullmatch(names, name) and re.fullmatch(pattern, value):
                found[value] = f"{path.relative_to(REPO_ROOT)}:{name}"
    return found


def covered(subject: str, patterns: list[str]) -> bool:
    """Whether a NATS subject pattern list allows `subject` (tokens, `*` and a final `>`)."""
    tokens = subject.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        if wanted[-1] == ">" and len(tokens) >= len(wanted) and all(
                w in ("*", t) for w, t in zip(wanted[:-1], tokens, strict=False)):
            return True
        if len(wanted) == len(tokens) and all(w in ("*", t) for w, t in zip(wanted, tokens, strict=True)):
            return True
    return False


def test_every_bucket_in_the_code_belongs_to_a_role() -> None:
    buckets = constants(r"kefu_[a-z_]+", names=r"(?!\w*CONSUMER)\w+")  # durable consumers are not buckets
    assert {"kefu_sessions", "kefu_cache", "kefu_canned"} <= buckets.keys()  # the scan finds them
    streams = {stream for role in ROLES.values() for stream in role.streams}
    missing = {bucket: where for bucket, where in buckets.items() if not {kv(bucket), obj(bucket)} & streams}
    assert not missing, f"add these buckets (kv() or obj()) to devtools/devstack/nats_auth.py ROLES: {missing}"


def test_every_stream_and_core_subject_in_the_code_belongs_to_a_role() -> None:
    streams = constants(r"[A-Z][A-Z0-9_]+", names=r"\w*STREAM")
    assert "KEFU_MESSAGES" in streams
    for stream, where in streams.items():
        assert any(stream in role.streams for role in ROLES.values()), f"{stream} ({where}) is in no role"
        assert stream in STREAM_SUBJECTS, f"{stream} ({where}): add its subjects to STREAM_SUBJECTS"
    subjects = constants(r"kefu\.[a-z.]+")
    assert "kefu.live" in subjects and "kefu.cache.invalidate" in subjects
    allowed = [p for user, role in ROLES.items() if user != "admin"
               for p in (*permissions(user, role)["publish"]["allow"], *role.subscribe)]
    for subject, where in subjects.items():
        # A prefix (kefu.live, kefu.msg) is followed by tenant and id tokens.
        assert covered(subject, allowed) or covered(f"{subject}.x.y", allowed), f"{subject} ({where}) is in no role"


def test_each_kind_of_stream_writes_its_own_subjects() -> None:
    assert stream_subjects(kv("kefu_x")) == "$KV.kefu_x.>"
    assert stream_subjects(obj("kefu_docs")) == "$O.kefu_docs.>"
    assert stream_subjects("KEFU_MESSAGES") == "kefu.msg.>"


def test_only_admin_may_do_everything_and_the_edge_writes_no_log() -> None:
    for user, role in ROLES.items():
        rules = permissions(user, role)
        assert (">" in rules["publish"]["allow"]) == (user == "admin"), user
        assert rules["subscribe"]["allow"][0] == f"_INBOX.{user}.>"
    assert ROLES["edge"].streams["KEFU_MESSAGES"] is Access.READ
    assert not covered("kefu.msg.t.c", permissions("edge", ROLES["edge"])["publish"]["allow"])
    assert not covered("$JS.API.STREAM.DELETE.KEFU_MESSAGES",
                       [p for u, r in ROLES.items() if u != "admin" for p in permissions(u, r)["publish"]["allow"]])
