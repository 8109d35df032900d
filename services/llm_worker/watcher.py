"""Watching the plugins folder with watchfiles and reloading on every settled change."""

from __future__ import annotations

import asyncio
import logging

from watchfiles import awatch

from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_host import PluginHost, PluginLoadError

log = logging.getLogger(__name__)


async def reload_and_count(host: PluginHost, metrics: WorkerMetrics) -> str:
    """One reload attempt: "ok", "refused" or "unchanged" (not an attempt: nothing to swap)."""
    try:
        swapped = await host.reload()
    except PluginLoadError:
        metrics.plugin_reloads.labels("refused").inc()
        return "refused"
    if not swapped:
        return "unchanged"
    metrics.plugin_reloads.labels("ok").inc()
    metrics.plugin_generation.set(host.current.number)
    return "ok"


async def watch_plugins(host: PluginHost, metrics: WorkerMetrics, stop: asyncio.Event, *,
                        debounce_ms: int = 100, quiet_ms: int = 100, rescan_ms: int = 5000) -> None:
    """Reload after every batch of changes until `stop` is set.

    The whole folder is watched, never single files: an editor's save-by-rename and a
    ConfigMap's `..data` symlink swap replace inodes, and only the directory sees both.
    Which names changed does not matter (a ConfigMap reports only `..` names): the
    snapshot fingerprint tells whether anything a generation uses changed.
    """
    # Also wake every few seconds without events: a change inotify missed (one made before the
    # watch was registered, a network filesystem) is then still picked up; an unchanged folder
    # costs one read of a few small files. The watch thread takes the GIL every `quiet_ms` (watchfiles'
    # `step`) to look at its stop event: at 20 ms that was 0.2 % of a core idle, and as many GIL
    # hand-offs from the event loop under load.
    async for changes in awatch(host.plugins_dir, stop_event=stop, debounce=debounce_ms, step=quiet_ms,
                                recursive=False, rust_timeout=rescan_ms, yield_on_timeout=True):
        result = await reload_and_count(host, metrics)
        if changes or result != "unchanged":
            log.info("plugins folder changed: %s", result)
