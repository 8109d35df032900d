"""Writing lexicon folders the ways editors and kubelet do, and reading moderation metrics."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from services.moderation.metrics import ModerationMetrics

_stamps = itertools.count()


def write_files(folder: Path, files: Mapping[str, str | bytes]) -> None:
    """Replace each file atomically (write a temp file, rename it over), as editors do."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = folder / f"{name}.tmp"
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, folder / name)


def kubelet_update(folder: Path, files: Mapping[str, str]) -> None:
    """Update `folder` the way kubelet updates a ConfigMap volume (AtomicWriter, steps 5-11)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    stamped = folder / f"..2026_01_01_00_00_00.{next(_stamps)}"
    stamped.mkdir()
    for name, content in files.items():
        (stamped / name).write_text(content, encoding="utf-8")
    os.symlink(stamped.name, folder / "..data_tmp")
    os.rename(folder / "..data_tmp", data)
    for name in files:
        if not (folder / name).is_symlink():
            os.symlink(f"..data/{name}", folder / name)
    for entry in folder.iterdir():
        if entry.is_symlink() and not entry.name.startswith(".") and entry.name not in files:
            entry.unlink()
    if old is not None:
        shutil.rmtree(folder / old)


def reload_count(metrics: ModerationMetrics, result: str) -> float:
    return metrics.registry.get_sample_value("kefu_moderation_lexicon_reloads_total", {"result": result}) or 0.0


def gauge(metrics: ModerationMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)
