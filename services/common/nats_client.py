"""Connecting to NATS and creating the JetStream buckets and streams a service needs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NatsEndpoint:
    """A `nats://[user:pass@]host:port[,...]` setting split into bare server URLs and credentials."""

    servers: tuple[str, ...]
    user: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def parse(cls, url: str) -> NatsEndpoint:
        servers: list[str] = []
        user = password = ""
        for server in (part.strip() for part in url.split(",")):
            if not server:
                continue
            parts = urlsplit(server if "://" in server else f"nats://{server}")
            if parts.username is not None:
                user, password = unquote(parts.username), unquote(parts.password or "")
            servers.append(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
        return cls(tuple(servers), user, password)

    @property
    def inbox_prefix(self) -> str:
        """Replies and push deliveries come to `_INBOX.<user>.>`: NATS permissions give each user only its own."""
        return f"_INBOX.{self.user}" if self.user else "_INBOX"

    def redacted(self) -> str:
        """For logs: the servers and the user, never the password."""
        return ",".join(self.servers) + (f" as {self.user}" if self.user else "")


class NatsCredentialsRefused(nats.errors.Error):
    """NATS answered 'Authorization Violation' to the first connect: a wrong user or password, not an outage."""

    def __init__(self, endpoint: NatsEndpoint) -> None:
        who = f"user {endpoint.user!r}" if endpoint.user else "a client without a user"
        super().__init__(f"NATS at {','.join(endpoint.servers)} refused {who}: check KEFU_NATS_USER and "
                         "KEFU_NATS_PASSWORD (or the credentials in KEFU_NATS_URL)")


async def check_credentials(endpoint: NatsEndpoint, timeout_s: float = 2.0) -> None:
    """Raise NatsCredentialsRefused when the server rejects the credentials; anything else (no server yet)
    is left to the retrying connect. One short connection, so a bad password stops a process at start
    with one line instead of retrying forever."""
    refused: list[str] = []

    async def on_error(error: Exception) -> None:
        if "authorization violation" in str(error).lower():
            refused.append(str(error))

    probe = NatsClient()
    try:
        # nats-py annotates connect_timeout as int, but only hands it to asyncio.wait_for: a float is right.
        await probe.connect(list(endpoint.servers), connect_timeout=timeout_s,  # type: ignore[arg-type]
                            allow_reconnect=False,
                            max_reconnect_attempts=0, error_cb=on_error, user=endpoint.user or None,
                            password=endpoint.password or None, name="kefu-credentials-check")
    except (OSError, TimeoutError, nats.errors.Error) as error:
        if refused or "authorization violation" in str(error).lower():
            raise NatsCredentialsRefused(endpoint) from None
    finally:
        with contextlib.suppress(OSError, nats.errors.Error):
            await probe.close()


def redacted(url: str) -> str:
    """A NATS URL setting fit for a log line (its password left out)."""
    return NatsEndpoint.parse(url).redacted()


async def connect_nats(url: str, name: str, *, max_reconnect_attempts: int = -1,
                       reconnected: Callable[[], None] | None = None) -> NatsClient:
    """Connect and keep reconnecting forever (a restarted nats-server is picked up by itself).

    `url` may carry the process's user and password (services.common.settings.nats_url puts
    KEFU_NATS_USER / KEFU_NATS_PASSWORD there); they are handed to nats-py apart from the servers,
    so that no error or log line of nats-py ever contains them.
    `reconnected` is called after each reconnect: core subscriptions come back by themselves,
    JetStream consumers kept in a restarted server's memory do not."""
    endpoint = NatsEndpoint.parse(url)
    await check_credentials(endpoint)

    async def on_error(error: Exception) -> None:
        # nats-py's default callback logs a full traceback on every failed attempt.
        log.warning("nats: %s", error or type(error).__name__)

    async def on_disconnected() -> None:
        log.info("nats: disconnected")

    async def on_reconnected() -> None:
        log.info("nats: reconnected")
        if reconnected is not None:
            reconnected()

    return await nats.connect(
        list(endpoint.servers), name=name, connect_timeout=2, reconnect_time_wait=0.5,
        max_reconnect_attempts=max_reconnect_attempts, error_cb=on_error,
        disconnected_cb=on_disconnected, reconnected_cb=on_reconnected,
        inbox_prefix=endpoint.inbox_prefix, user=endpoint.user or None, password=endpoint.password or None,
    )


async def close_nats(nc: NatsClient, timeout_s: float = 5.0) -> None:
    """Drain (flush what is pending), but never hang a shutdown on an unreachable server."""
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except (TimeoutError, OSError, nats.errors.Error):
        # The server may be gone already: closing then only releases the client's side.
        with contextlib.suppress(OSError, nats.errors.Error):
            await nc.close()


SHORT_DUPLICATE_WINDOW_S = 1.0
"""The duplicate window of kefu's buckets and of the streams it never deduplicates (every stream but
KEFU_MESSAGES). No such write carries a `Nats-Msg-Id`, yet at every start nats-server reads back each
message stored within a stream's window to rebuild its duplicate table; under nats-py's 2-minute default,
a restart after a burst of writes (a bulk import, a busy hour) reads that whole burst first (at 300,000
conversations written just before: 5.3 s of CPU against 2.5; bench/README.md, scale section)."""


async def ensure_key_value(js: JetStreamContext, config: KeyValueConfig, *, reconcile: bool = False) -> KeyValue:
    """Open a bucket, creating it on first use (two processes racing to create it is fine).

    A bucket this call creates gets the short duplicate window (SHORT_DUPLICATE_WINDOW_S); `reconcile`: an
    existing one too, and direct gets when `config.direct` asks for them (a bucket made by an older kefu).
    Only for the bucket's owner: changing it takes `$JS.API.STREAM.UPDATE` permission."""
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        try:
            kv = await js.create_key_value(config)
        except BadRequestError:
            # Another process created it between our two calls.
            return await js.key_value(config.bucket)
        reconcile = True
    if reconcile and await reconcile_stream(js, f"KV_{config.bucket}", SHORT_DUPLICATE_WINDOW_S,
                                            allow_direct=bool(config.direct)):
        kv = await js.key_value(config.bucket)  # a handle reads with direct gets only if the stream allowed them
    return kv


async def reconcile_stream(js: JetStreamContext, stream: str, window_s: float, *, allow_direct: bool = False) -> bool:
    """Bring a stream's duplicate window down to `window_s` (never above its max age: the server refuses it)
    and allow direct gets if asked; whether it changed the stream."""
    config = (await js.stream_info(stream)).config
    target = min(window_s, config.max_age) if config.max_age else window_s
    narrow = config.duplicate_window is None or config.duplicate_window > target
    direct = allow_direct and not config.allow_direct
    if not narrow and not direct:
        return False
    if narrow:
        config.duplicate_window = target
    config.allow_direct = config.allow_direct or allow_direct
    log.info("%s: duplicate window %s s, direct gets %s", stream, config.duplicate_window,
             "allowed" if config.allow_direct else "not allowed")
    await js.update_stream(config)
    return True


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create a stream on first use; an existing one is updated to `config`."""
    assert config.name
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError:
            pass
    await js.update_stream(config)


async def fetch_batch(subscription: JetStreamContext.PullSubscription, batch: int, timeout_s: float) -> list[Msg]:
    """The pull subscription's next messages (up to `batch`), or [] when none came within `timeout_s`.

    nats-py's fetch can turn a cancellation that lands as its wait times out into a TimeoutError (seen on Python
    3.11 under load): a loop fetching until cancelled would then never end. A task being cancelled gets its
    CancelledError back instead of an empty batch."""
    try:
        return await subscription.fetch(batch, timeout=timeout_s)
    except TimeoutError:  # nats-py's own subclass, or asyncio's when the deadline ran out
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        return []
