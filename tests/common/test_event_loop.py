"""KEFU_UVLOOP: every process runs on uvloop unless told otherwise (tests/e2e/test_lean_stream.py sees it live)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.entrypoint import loop_kind, run_on_loop
from services.common.settings import EventLoopSettings, SettingsError


async def running_loop() -> str:
    return loop_kind(asyncio.get_running_loop())


@pytest.mark.parametrize(("env", "expected"), [({}, "uvloop"), ({"KEFU_UVLOOP": "1"}, "uvloop"),
                                               ({"KEFU_UVLOOP": "0"}, "asyncio"),
                                               ({"KEFU_UVLOOP": "off"}, "asyncio")])
def test_event_loop_setting_picks_the_loop(env: dict[str, str], expected: str) -> None:
    assert run_on_loop(running_loop(), EventLoopSettings.load(env)) == expected


def test_event_loop_setting_refuses_a_bad_value_naming_it() -> None:
    with pytest.raises(SettingsError, match="KEFU_UVLOOP"):
        EventLoopSettings.load({"KEFU_UVLOOP": "maybe"})
