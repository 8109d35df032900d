"""Whether a staff token's account has been disabled since the token was issued.

A JWT stays valid until it expires (8 h for a console login), so disabling an agent's
account (`python -m gateway.accounts disable`) must also stop the tokens already out: the
edge asks the account before serving a staff principal, with a short cache so that an
agent's requests cost one KV read per KEFU_ACCOUNT_CHECK_S, and it closes such an agent's
open sockets. Principals without an account here (tokens of your own identity provider)
pass. Without NATS the check passes too: the token itself was verified, and the edge must
not stall every agent request on a store it cannot reach.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.auth import STAFF_ROLES, Principal
from gateway.directory.agents import AgentAccounts
from gateway.directory.buckets import DirectoryUnavailable

log = logging.getLogger(__name__)

MAX_CACHED = 4096


class AccountStatus:
    def __init__(self, accounts: AgentAccounts, connected: Callable[[], bool], *,
                 ttl_s: float = 10.0) -> None:
        self._accounts = accounts
        self._connected = connected
        self._ttl_s = ttl_s
        self._known: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()

    async def disabled(self, principal: Principal) -> bool:
        """True when a staff principal is an account of its tenant that has been disabled (never for visitors)."""
        if principal.role not in STAFF_ROLES:
            return False
        tenant, subject = principal.tenant, principal.subject
        key = (tenant, subject)
        known = self._known.get(key)
        now = time.monotonic()
        if known is not None and now - known[1] < self._ttl_s:
            return known[0]
        if not self._connected():
            return known[0] if known is not None else False
        try:
            account = await self._accounts.get(tenant, subject)
        except ValueError:
            account = None  # not a username this store could hold: no account of ours
        except DirectoryUnavailable as error:
            log.warning("account of a staff token not checked: %s", error.message)
            return known[0] if known is not None else False
        disabled = account is not None and account.username == subject and account.disabled
        self._known[key] = (disabled, now)
        self._known.move_to_end(key)
        while len(self._known) > MAX_CACHED:
            self._known.popitem(last=False)
        return disabled
