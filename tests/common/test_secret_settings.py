"""The shared settings helpers for secrets: the internal token, the JWT secret's length, NATS credentials."""

from __future__ import annotations

import pytest

from services.common.nats_client import NatsEndpoint, redacted
from services.common.settings import SettingsError, internal_token, nats_url

TOKEN = "t" * 32


def test_internal_token_is_required_unless_turned_off_explicitly() -> None:
    assert internal_token({"KEFU_INTERNAL_TOKEN": TOKEN}) == TOKEN
    assert internal_token({"KEFU_INTERNAL_AUTH": "off"}) == ""
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_TOKEN is not set"):
        internal_token({})
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_TOKEN is too short: 31 bytes"):
        internal_token({"KEFU_INTERNAL_TOKEN": TOKEN[:-1]})
    with pytest.raises(SettingsError, match="KEFU_INTERNAL_AUTH=off contradicts"):
        internal_token({"KEFU_INTERNAL_AUTH": "off", "KEFU_INTERNAL_TOKEN": TOKEN})
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_AUTH must be required or off"):
        internal_token({"KEFU_INTERNAL_AUTH": "maybe", "KEFU_INTERNAL_TOKEN": TOKEN})


def test_nats_credentials_ride_in_the_url_and_come_out_intact() -> None:
    password = "p@ss:w/rd%?#"  # every character a URL would misread
    url = nats_url({"KEFU_NATS_URL": "nats://n1:4222,nats://n2:4222", "KEFU_NATS_USER": "edge",
                    "KEFU_NATS_PASSWORD": password})
    endpoint = NatsEndpoint.parse(url)
    assert (endpoint.servers, endpoint.user, endpoint.password) == (("nats://n1:4222", "nats://n2:4222"), "edge",
                                                                     password)
    assert endpoint.inbox_prefix == "_INBOX.edge"
    assert password not in repr(endpoint) and password not in redacted(url) and "edge" in redacted(url)
    assert NatsEndpoint.parse("nats://127.0.0.1:4222").inbox_prefix == "_INBOX"


@pytest.mark.parametrize(("env", "message"), [
    ({"KEFU_NATS_USER": "edge"}, "must be set together"),
    ({"KEFU_NATS_PASSWORD": "x"}, "must be set together"),
    ({"KEFU_NATS_USER": "edge.x", "KEFU_NATS_PASSWORD": "x"}, "KEFU_NATS_USER must be"),
    ({"KEFU_NATS_URL": "nats://a:b@h:1", "KEFU_NATS_USER": "edge", "KEFU_NATS_PASSWORD": "x"}, "use one"),
])
def test_bad_nats_credentials_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        nats_url(env)
