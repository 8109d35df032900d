"""The watchfiles loop: plain folder edits and a Kubernetes ConfigMap `..data` symlink swap."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_host import PluginHost
from services.llm_worker.watcher import watch_plugins
from tests.llm_worker.plugin_fixtures import ROUTES_ONE, plugin_source, replace_file, write_version


def configmap_swap(volume: Path, files: dict[str, str], stamp: str) -> None:
    """What kubelet does: a new `..<ts>` dir, a `..data_tmp` symlink renamed over `..data`."""
    new_dir = volume / f"..{stamp}"
    new_dir.mkdir()
    for name, text in files.items():
        (new_dir / name).write_text(text)
    old_target = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    os.symlink(new_dir.name, volume / "..data_tmp")
    os.replace(volume / "..data_tmp", volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            os.symlink(f"..data/{name}", volume / name)
    if old_target:
        for child in (volume / old_target).iterdir():
            child.unlink()
        (volume / old_target).rmdir()


def version_files(version: str, model: str = "model-a") -> dict[str, str]:
    return {"versioned.py": plugin_source(version),
            "routes.toml": ROUTES_ONE.format(model=model, chunks=1, delay_s=0)}


async def wait_for_generation(host: PluginHost, number: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while host.current.number < number:
        if time.monotonic() > deadline:
            raise TimeoutError(f"generation {number} not loaded; last error: {host.last_error}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running_watcher(host: PluginHost, metrics: WorkerMetrics) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(watch_plugins(host, metrics, stop, debounce_ms=50))
    await asyncio.sleep(0.2)  # let inotify register the folder before the first change
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def refused(metrics: WorkerMetrics) -> float:
    return metrics.registry.get_sample_value("kefu_plugin_reloads_total", {"result": "refused"}) or 0.0


async def test_watcher_reloads_a_plain_folder_and_refuses_a_broken_save(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    write_version(folder, "v1")
    host = PluginHost(folder, "routes.toml", {}, work_dir=tmp_path / "work", settle_s=0.02)
    await host.start()
    metrics = WorkerMetrics()
    try:
        async with running_watcher(host, metrics):
            write_version(folder, "v2")
            await wait_for_generation(host, 2)
            replace_file(folder / "versioned.py", "def broken(:\n")
            deadline = time.monotonic() + 10
            while refused(metrics) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert refused(metrics) == 1 and host.current.number == 2
            write_version(folder, "v3")
            await wait_for_generation(host, 3)
        assert metrics.registry.get_sample_value("kefu_plugin_generation") == 3
        assert metrics.registry.get_sample_value("kefu_plugin_reloads_total", {"result": "ok"}) == 2
    finally:
        await host.aclose()


async def test_watcher_sees_a_configmap_symlink_swap(tmp_path: Path) -> None:
    volume = tmp_path / "configmap"
    volume.mkdir()
    configmap_swap(volume, version_files("v1"), "2026_11_25_10_00_00.000000001")
    host = PluginHost(volume, "routes.toml", {}, work_dir=tmp_path / "work", settle_s=0.02)
    await host.start()
    metrics = WorkerMetrics()
    try:
        async with running_watcher(host, metrics):
            configmap_swap(volume, version_files("v2", "model-b"), "2026_11_25_10_01_00.000000001")
            await wait_for_generation(host, 2)
            route = host.current.routes["default"]
            assert route.targets[0].model == "model-b"
            configmap_swap(volume, version_files("v3"), "2026_11_25_10_02_00.000000001")
            await wait_for_generation(host, 3)
    finally:
        await host.aclose()
