"""Per-tenant live-chat texts in the `kefu_tenants` bucket (key `<tenant>`), read through a short cache."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

from nats.js.errors import KeyNotFoundError

from gateway.directory.buckets import TENANTS, Buckets, DirectoryUnavailable, decode, encode, nats_errors

log = logging.getLogger(__name__)

DEFAULT_WELCOME = "Hi! Ask me anything about our shop. / 您好！有什么可以帮您？"
DEFAULT_OFFLINE = "No agent is online right now; leave a message and we will reply soon. / 当前没有客服在线，请留言。"
MAX_TEXT_CHARS = 2000
MAX_SYSTEM_PROMPT_CHARS = 8000
MAX_ASSISTANT_NAME_CHARS = 64
GROUNDING_MODES = ("strict", "open")


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """The texts live chat shows a tenant's visitors, and how its assistant answers. The session
    service reads `leave_message` from the same KV value: the field names are a contract."""

    welcome: str = DEFAULT_WELCOME
    """Sent to a visitor when a conversation opens."""
    offline: str = DEFAULT_OFFLINE
    """Shown when a visitor asks for a human and no agent of the tenant is online."""
    leave_message: str = DEFAULT_OFFLINE
    """The reply when nobody claimed a waiting conversation in time (KEFU_HANDOFF_WAIT_S)."""
    system_prompt: str = ""
    """The assistant's instructions for every turn of the tenant; empty: the edge's KEFU_SYSTEM_PROMPT."""
    assistant_name: str = ""
    """How the assistant calls itself (greetings, the grounded prompt); empty: no name."""
    route: str = ""
    """The model alias (GET /v1/models) answering the tenant's visitors; empty: `default`."""
    grounding: str = "strict"
    """"strict": facts only from the tenant's documents, else a handoff; "open": the model may answer
    from general knowledge and says so."""

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> TenantSettings:
        """Lenient: a missing or malformed field keeps its default."""
        values = {f.name: value for f in fields(cls) if isinstance(value := data.get(f.name), str) and value.strip()}
        if values.get("grounding") not in GROUNDING_MODES:
            values.pop("grounding", None)
        return cls(**values)


class TenantSettingsStore:
    """`get()` for live chat (cached `cache_s`, defaults when NATS is down); `load()`/`put()` for the API.

    Another edge's `put()` shows here within `cache_s`.
    """

    def __init__(self, buckets: Buckets, *, cache_s: float = 5.0, max_cached: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = buckets
        self._cache_s = cache_s
        self._max_cached = max_cached
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, TenantSettings]] = OrderedDict()

    async def get(self, tenant: str) -> TenantSettings:
        """The tenant's settings, at most `cache_s` old; the defaults (not cached) when the store is down."""
        cached = self._cache.get(tenant)
        if cached is not None and self._clock() - cached[0] < self._cache_s:
            return cached[1]
        try:
            return await self.load(tenant)
        except DirectoryUnavailable as error:
            if cached is not None:
                return cached[1]
            log.warning("tenant settings of %s not readable (%s); using the defaults", tenant, error)
            return TenantSettings()

    async def load(self, tenant: str) -> TenantSettings:
        """A fresh read (and cache refresh). Raises DirectoryUnavailable."""
        kv = await self._buckets.open(TENANTS)
        async with nats_errors():
            try:
                entry = await kv.get(tenant)
            except KeyNotFoundError:
                settings = TenantSettings()
            else:
                data = decode(entry.value, f"{TENANTS}/{tenant}")
                settings = TenantSettings.from_json(data) if data is not None else TenantSettings()
        self._remember(tenant, settings)
        return settings

    async def put(self, tenant: str, settings: TenantSettings) -> TenantSettings:
        kv = await self._buckets.open(TENANTS)
        async with nats_errors():
            await kv.put(tenant, encode(settings.to_json()))
        self._remember(tenant, settings)
        return settings

    def _remember(self, tenant: str, settings: TenantSettings) -> None:
        self._cache.pop(tenant, None)
        self._cache[tenant] = (self._clock(), settings)
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
