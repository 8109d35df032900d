"""NATS users per process role and their subject permissions: the local nats-server's config (make run, tests).

Each process connects as its role's user and may touch only the JetStream streams, KV buckets and core
subjects that role uses; anonymous connections are refused. k8s/overlays/*/nats.conf carries the same
table for the cluster (tests/k8s checks they agree). A new bucket or stream needs a line here.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Access(Enum):
    READ = "read"
    """Stream info, message and direct gets, consumers (create, fetch, ack, delete)."""
    CREATE = "create"
    """READ, and creating or updating the stream's config (every process ensures the buckets it opens)."""
    WRITE = "write"
    """CREATE, and publishing to the stream's subjects, purging it and deleting its messages."""


@dataclass(frozen=True, slots=True)
class Role:
    streams: Mapping[str, Access]
    """JetStream stream name (a KV bucket's is KV_<bucket>) -> what the role may do with it."""
    publish: tuple[str, ...] = ()
    """Core subjects the role publishes to."""
    subscribe: tuple[str, ...] = ()
    """Core subjects the role subscribes to (its own inbox, `_INBOX.<user>.>`, is always allowed)."""


def kv(bucket: str) -> str:
    """The stream of a KV bucket (its subjects: `$KV.<bucket>.>`)."""
    return f"KV_{bucket}"


def obj(bucket: str) -> str:
    """The stream of an object store bucket (its subjects: `$O.<bucket>.>`)."""
    return f"OBJ_{bucket}"


def stream_subjects(stream: str) -> str:
    if stream.startswith("KV_"):
        return f"$KV.{stream.removeprefix('KV_')}.>"
    if stream.startswith("OBJ_"):
        return f"$O.{stream.removeprefix('OBJ_')}.>"
    return STREAM_SUBJECTS[stream]


LOG_STREAM = "KEFU_MESSAGES"
KB_JOBS_STREAM = "KEFU_KB_JOBS"
TIMERS_STREAM = "KEFU_TIMERS"
STREAM_SUBJECTS: Mapping[str, str] = {LOG_STREAM: "kefu.msg.>", KB_JOBS_STREAM: "kefu.kb.jobs.>",
                                      TIMERS_STREAM: "kefu.timer.>"}
"""Subjects of the streams that are not KV or object store buckets."""

ROLES: Mapping[str, Role] = {
    # The internet-facing process: reads conversation logs but never writes them (the session does,
    # after moderation), and cannot touch the sessions' metadata, the answer cache or any stream's existence.
    "edge": Role(
        streams={LOG_STREAM: Access.READ, kv("kefu_canned"): Access.WRITE, kv("kefu_blacklist"): Access.WRITE,
                 kv("kefu_tenants"): Access.WRITE, kv("kefu_agents"): Access.WRITE,
                 kv("kefu_presence"): Access.WRITE},
        publish=("kefu.live.>",),
        subscribe=("kefu.live.>", "kefu.msg.>")),
    "session": Role(
        streams={LOG_STREAM: Access.WRITE, kv("kefu_sessions"): Access.WRITE,
                 kv("kefu_conversations"): Access.WRITE, kv("kefu_visitor_rates"): Access.WRITE,
                 kv("kefu_tenant_usage"): Access.WRITE, kv("kefu_tenants"): Access.CREATE,
                 TIMERS_STREAM: Access.WRITE}),
    "llm_worker": Role(
        # The knowledge base too: documents and index state (KV), files and built indexes (object
        # stores), and the shared ingestion work queue.
        streams={kv("kefu_cache"): Access.WRITE, kv("kefu_cache_epochs"): Access.WRITE,
                 kv("kefu_kb_documents"): Access.WRITE, kv("kefu_kb_tenants"): Access.WRITE,
                 obj("kefu_kb_files"): Access.WRITE, obj("kefu_kb_indexes"): Access.WRITE,
                 KB_JOBS_STREAM: Access.WRITE, kv("kefu_lexicon"): Access.READ},
        subscribe=("kefu.cache.invalidate",)),
    # Publishes the lexicon in use for the workers' output filters (issue 20); input checks need no NATS.
    "moderation": Role(streams={kv("kefu_lexicon"): Access.WRITE}),
    # Operators and tools (the accounts CLI, cache invalidation, tests): everything.
    "admin": Role(streams={}, publish=(">",), subscribe=(">",)),
}
PROCESS_ROLES: Mapping[str, str] = {"session": "session", "llm_worker": "llm_worker", "moderation": "moderation"}
"""Devstack process name -> NATS user; every edge process is `edge`."""


def _stream_api(stream: str, access: Access) -> list[str]:
    api = "$JS.API"
    subjects = [f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
                f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>",
                f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>", f"{api}.CONSUMER.INFO.{stream}.>",
                f"{api}.CONSUMER.DELETE.{stream}.>", f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
                f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]
    if access in (Access.CREATE, Access.WRITE):
        subjects += [f"{api}.STREAM.CREATE.{stream}", f"{api}.STREAM.UPDATE.{stream}"]
    if access is Access.WRITE:
        subjects += [f"{api}.STREAM.PURGE.{stream}", f"{api}.STREAM.MSG.DELETE.{stream}",
                     stream_subjects(stream)]
    return subjects


def permissions(user: str, role: Role) -> dict[str, dict[str, list[str]]]:
    """nats-server `permissions` of one user: allow lists only, everything else denied."""
    publish = ["$JS.API.INFO", "$JS.API.STREAM.NAMES", *role.publish]
    for stream, access in role.streams.items():
        publish += _stream_api(stream, access)
    subscribe = [f"_INBOX.{user}.>", *role.subscribe]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def password_variable(user: str) -> str:
    """The environment variable the cluster's nats-server reads `user`'s password from (k8s)."""
    return f"NATS_{user.upper()}_PASSWORD"


def secret_key(user: str) -> str:
    """The key of the `kefu-secrets` Secret holding `user`'s NATS password (k8s)."""
    return f"nats-{user.replace('_', '-')}-password"


def authorization(passwords: Mapping[str, str] | None = None) -> str:
    """nats-server's `authorization` block; without `passwords`, each refers to its environment variable.

    Strings are quoted (a quoted `$` is no variable); the k8s variant's `$NATS_<USER>_PASSWORD` is not."""
    users = [{"user": user, "password": passwords[user] if passwords else f"@{password_variable(user)}@",
              "permissions": permissions(user, role)} for user, role in ROLES.items()]
    text = "authorization " + json.dumps({"users": users}, indent=2) + "\n"
    if passwords is None:
        for user in ROLES:
            text = text.replace(f'"@{password_variable(user)}@"', f"${password_variable(user)}")
    return text


K8S_HEADER = ("# Generated by k8s/sync_config.py from devtools/devstack/nats_auth.py (the table make run uses too):\n"
              "# users per kefu process role and what each may publish and subscribe. Do not edit by hand.\n"
              "# Passwords come from the environment, which the StatefulSet fills from the Secret kefu-secrets.\n")


def k8s_authorization() -> str:
    """The cluster's `nats-auth.conf` (included by the overlays' nats.conf)."""
    return K8S_HEADER + authorization()


@dataclass(frozen=True)
class NatsUsers:
    """The passwords of one data dir's users, generated once and kept (0600) so a restart keeps them."""

    passwords: Mapping[str, str] = field(repr=False)

    @classmethod
    def load_or_create(cls, path: Path) -> NatsUsers:
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            stored = {}
        passwords = {user: stored.get(user) or secrets.token_urlsafe(24) for user in ROLES}
        if passwords != stored:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
                json.dump(passwords, file)
            temporary.replace(path)
        return cls(passwords)

    def server_config(self) -> str:
        """The `authorization` block of nats-server's config, with this data dir's passwords."""
        return authorization(self.passwords)

    def write_server_config(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            file.write(self.server_config())
        return path
