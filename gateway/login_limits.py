"""Console login limits: argon2 verifications per process, failed logins per client address and per user name."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.errors import ApiError
from gateway.ratelimit import Decision, TokenBucketLimiter
from gateway.settings import GatewaySettings

SLOT_WAIT_S = 1.0
"""How long a login waits for a verification slot before it gets 429 `busy` (a person barely notices)."""
WAITERS_PER_SLOT = 4
"""Logins that may wait for a slot, per slot; beyond that a login gets 429 at once (no unbounded queue)."""
ARGON2_NICE = 10
"""How much lower than the event loop the argon2 threads run (Linux niceness is per thread)."""
BUSY = "too many logins at once; try again in a moment"
MAX_VERIFICATIONS_PER_S = 10.0
"""KEFU_LOGIN_MAX_PER_S's default: argon2 verifications a second per process (~40 ms of a core each here)."""
_ALL = "all"

log = logging.getLogger(__name__)
MAX_TRACKED_KEYS = 20_000
"""Addresses and user names whose failures are remembered (least recently seen forgotten first; ~235
bytes each). Only logins that got a verification slot are remembered, at most ~45 a second per process,
so flushing a guessed user's entry out takes minutes, longer than its bucket takes to refill anyway."""


class LoginThrottled(ApiError):
    """429 `rate_limited`: too many failed logins from an address or for a user name, or every slot busy."""

    status = 429

    def __init__(self, message: str, decision: Decision, outcome: str = "throttled") -> None:
        # The headers of every other 429 (gateway/handlers/widget_token.take_address_token).
        super().__init__("rate_limited", message, headers={
            "Retry-After": str(max(1, decision.retry_after_s)), "RateLimit-Limit": str(decision.limit),
            "RateLimit-Remaining": "0", "RateLimit-Reset": str(max(1, decision.reset_s))})
        self.decision = decision
        self.outcome = outcome
        """kefu_console_logins_total's outcome: "throttled" (a failure bucket) or "busy" (no slot)."""


@dataclass(frozen=True, slots=True)
class FailureCharge:
    """The failure tokens a login took before verifying; given back when it succeeds."""

    address: str
    user: str


class LoginLimits:
    """One per edge process. Every argon2 verification runs in a pool of `max_concurrent` threads behind
    as many slots, so a login flood costs at most `max_concurrent` x the hash's memory
    (issue 17 item 4: ten 64 MiB verifications at once grew the edge by 386 MiB). A bounded pool
    also bounds glibc's per-thread arenas, which keep freed hash memory around."""

    def __init__(self, max_concurrent: int, address_failures: int, user_failures: int, window_s: float, *,
                 max_per_s: float = MAX_VERIFICATIONS_PER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="argon2",
                                           initializer=_lower_priority)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_waiters = max_concurrent * WAITERS_PER_SLOT
        self._busy = Decision(False, max_concurrent, 0, 1, 1)
        self._waiters = 0
        # Slots bound the memory; this bounds the CPU. A flood from a botnet (an address and a user name of
        # its own per login) passes every per-address and per-user bucket, and two slots kept busy cost
        # over a core (issue 17: the other visitors' p99 went 2.2x); at this rate it costs at most
        # max_per_s x one verification, and the rest get 429 `busy` before any hashing.
        self._verifications = TokenBucketLimiter(max_per_s, max(1, math.ceil(max_per_s)), max_keys=1, clock=clock)
        # A bucket of N failures refilling over the window: N wrong guesses at once, then one per window/N.
        self._addresses = TokenBucketLimiter(address_failures / window_s, address_failures,
                                             max_keys=MAX_TRACKED_KEYS, clock=clock)
        self._users = TokenBucketLimiter(user_failures / window_s, user_failures, max_keys=MAX_TRACKED_KEYS,
                                         clock=clock)

    @classmethod
    def of(cls, settings: GatewaySettings) -> LoginLimits:
        return cls(settings.login_max_concurrent, settings.login_address_failures, settings.login_user_failures,
                   settings.login_failure_window_s, max_per_s=settings.login_max_per_s)

    def check(self, address: str, tenant: str, username: str) -> None:
        """429 at once when the address's or the user name's failure bucket is empty; remembers nothing, so
        refused floods cannot push the entries of the users they guess at out of the tables."""
        for limiter, key, what in ((self._addresses, address, "from this address"),
                                   (self._users, _user_key(tenant, username), "for this user name")):
            decision = limiter.peek(key)
            if not decision.allowed:
                raise LoginThrottled(f"too many failed logins {what}; try again later", decision)

    def charge(self, address: str, tenant: str, username: str) -> FailureCharge:
        """Take a failure token from the address's and the user name's bucket before verifying (so parallel
        guesses count too); 429 when either is empty. Unknown user names are charged like real ones."""
        user = _user_key(tenant, username)
        decision = self._addresses.take(address)
        if not decision.allowed:
            raise LoginThrottled("too many failed logins from this address; try again later", decision)
        decision = self._users.take(user)
        if not decision.allowed:
            self._addresses.give_back(address)
            raise LoginThrottled("too many failed logins for this user name; try again later", decision)
        return FailureCharge(address, user)

    def forgive(self, charge: FailureCharge) -> None:
        """A login that succeeded was no failure."""
        self._addresses.give_back(charge.address)
        self._users.give_back(charge.user)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A verification slot, waited for at most SLOT_WAIT_S; 429 when none frees up, too many wait, or the
        process already verified its KEFU_LOGIN_MAX_PER_S this second."""
        if (self._slots.locked() and self._waiters >= self._max_waiters) or not self._verifications.peek(_ALL).allowed:
            raise LoginThrottled(BUSY, self._busy, "busy")
        self._waiters += 1
        try:
            async with asyncio.timeout(SLOT_WAIT_S):
                await self._slots.acquire()
        except TimeoutError:
            raise LoginThrottled(BUSY, self._busy, "busy") from None
        finally:
            self._waiters -= 1
        try:
            if not self._verifications.take(_ALL).allowed:  # spent by those who got a slot meanwhile
                raise LoginThrottled(BUSY, self._busy, "busy")
            yield
        finally:
            self._slots.release()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _user_key(tenant: str, username: str) -> str:
    return f"{tenant}/{username.strip().lower()}"


def _lower_priority() -> None:
    """Run this argon2 thread below everything else, so a login flood spends the CPU the edge's event
    loop and the other processes leave idle instead of slowing every visitor's answer."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ARGON2_NICE)
    except (AttributeError, OSError) as error:  # not Linux, or not allowed: logins still work
        log.debug("argon2 thread priority unchanged: %s", error)
