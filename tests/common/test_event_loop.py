"""KEFU_UVLOOP: every process runs on uvloop unless told otherwise (tests/e2e/test_lean_stream.py sees it live)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from devtools.devstack.stack import REPO_ROOT
from services.common.entrypoint import GC_YOUNG_THRESHOLD, loop_kind, run_on_loop
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


PROCESS_REPORTING_ITS_COLLECTOR = """
import asyncio, gc, json, sys
from dataclasses import dataclass
from services.common.entrypoint import run_process

@dataclass
class Settings:
    log_level: str = "warning"

async def serve(settings: Settings) -> None:
    print(json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}))

run_process("probe", Settings, serve)
"""


def test_a_process_collects_young_objects_rarely_and_froze_its_imports() -> None:
    # As every service starts (run_process): its own interpreter, so this test's collector is left alone.
    ran = subprocess.run([sys.executable, "-c", PROCESS_REPORTING_ITS_COLLECTOR], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    report = json.loads(ran.stdout)
    assert report["threshold"][0] == GC_YOUNG_THRESHOLD > 700  # CPython's default is 700
    assert report["frozen"] > 10_000  # the imports' objects (grpc, nats, uvloop) in the permanent generation
