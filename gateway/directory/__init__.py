"""The edge's own records in NATS KV: canned replies, the visitor blacklist, tenant settings, agent accounts."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.directory.agents import AgentAccounts
from gateway.directory.blacklist import BlacklistStore
from gateway.directory.buckets import Buckets
from gateway.directory.canned import CannedReplies


@dataclass(frozen=True, slots=True)
class Directory:
    """The stores the HTTP handlers read and write (the watched blacklist and the cached tenant
    settings have their own app keys: live chat uses them too)."""

    buckets: Buckets
    canned: CannedReplies
    blacklist: BlacklistStore
    agents: AgentAccounts

    @classmethod
    def over(cls, buckets: Buckets) -> Directory:
        return cls(buckets, CannedReplies(buckets), BlacklistStore(buckets), AgentAccounts(buckets))
