"""Lexicon hot reload: atomic swaps, refused broken lexicons, ConfigMap symlink swaps, the watcher."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.moderation.lexicon import Action
from services.moderation.metrics import ModerationMetrics
from services.moderation.reload import LexiconReloader, ReloadResult
from tests.moderation.lexicon_helpers import gauge, kubelet_update, reload_count, wait_until, write_files

OLD = {"abuse.txt": "# action: mask\n傻逼\n", "fraud.txt": "刷单返利\n"}
NEW = {"abuse.txt": "# action: mask\n傻逼\n王八蛋\n", "fraud.txt": "刷单返利\n"}
def masks_new_word(reloader: LexiconReloader) -> bool:
    return reloader.matcher.check("王八蛋").verdict is Action.MASK


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "lexicon"


@pytest.fixture
def metrics() -> ModerationMetrics:
    return ModerationMetrics()


async def test_reload_swaps_in_the_new_lexicon_and_counts_it(folder: Path, metrics: ModerationMetrics) -> None:
    write_files(folder, OLD)
    reloader = LexiconReloader.load(folder, metrics)
    old = reloader.matcher
    assert gauge(metrics, "kefu_moderation_lexicon_words") == 2
    write_files(folder, NEW)
    assert await reloader.reload() is ReloadResult.OK
    assert masks_new_word(reloader) and not old.check("王八蛋").hits  # the old matcher is untouched
    assert reloader.generation == 2 and gauge(metrics, "kefu_moderation_lexicon_generation") == 2
    assert gauge(metrics, "kefu_moderation_lexicon_words") == 3
    assert (reload_count(metrics, "ok"), reload_count(metrics, "refused")) == (1, 0)


@pytest.mark.parametrize(("files", "reason"), [
    ({"abuse.txt": "# action: nuke\n傻逼\n"}, "abuse.txt:1: unknown action 'nuke'"),
    ({"abuse.txt": "傻逼\n王八".encode()[:-2]}, "abuse.txt: not UTF-8"),   # a write cut short
    ({"abuse.txt": "# action: mask\n", "fraud.txt": ""}, "has no words"),   # truncated files
    ({"abuse.txt": "# action: mask\n傻逼\n# action: block\n"}, "abuse.txt:3: the action line"),
])
async def test_reload_refuses_a_broken_lexicon_and_keeps_the_old(
        folder: Path, metrics: ModerationMetrics, caplog: pytest.LogCaptureFixture,
        files: dict[str, str | bytes], reason: str) -> None:
    write_files(folder, OLD)
    reloader = LexiconReloader.load(folder, metrics)
    old = reloader.matcher
    write_files(folder, files)
    with caplog.at_level(logging.WARNING, logger="services.moderation.reload"):
        assert await reloader.reload() is ReloadResult.REFUSED
    assert reloader.matcher is old and reloader.generation == 1
    assert reloader.matcher.check("傻逼").masked_text == "**"
    assert (reload_count(metrics, "ok"), reload_count(metrics, "refused")) == (0, 1)
    assert gauge(metrics, "kefu_moderation_lexicon_generation") == 1
    assert reason in caplog.text and "refused" in caplog.text
    write_files(folder, NEW)  # the writer finishes: the next change loads
    assert await reloader.reload() is ReloadResult.OK and masks_new_word(reloader)


async def test_reload_ignores_editor_temp_files(folder: Path, metrics: ModerationMetrics) -> None:
    write_files(folder, OLD)
    reloader = LexiconReloader.load(folder, metrics)
    old = reloader.matcher
    write_files(folder, {".abuse.txt.swp": b"\x00\xff", "abuse.txt~": "old\n", "4913": ""})
    os.symlink("root@host.1234:1700000000", folder / ".#abuse.txt")
    assert await reloader.reload() is ReloadResult.UNCHANGED
    assert reloader.matcher is old and reload_count(metrics, "ok") + reload_count(metrics, "refused") == 0


async def test_reload_reads_a_configmap_through_its_swapped_symlink(folder: Path, metrics: ModerationMetrics) -> None:
    kubelet_update(folder, OLD)
    reloader = LexiconReloader.load(folder, metrics)
    kubelet_update(folder, {**NEW, "contact.txt": "# action: review\n加微信\n"})
    assert await reloader.reload() is ReloadResult.OK
    assert masks_new_word(reloader) and reloader.matcher.check("加微信").verdict is Action.REVIEW
    kubelet_update(folder, OLD)  # a key removed: its user-visible symlink goes too
    assert await reloader.reload() is ReloadResult.OK
    assert not masks_new_word(reloader) and reloader.matcher.check("加微信").verdict is Action.ALLOW


async def test_reload_refuses_a_half_done_configmap_swap(folder: Path, metrics: ModerationMetrics) -> None:
    kubelet_update(folder, OLD)
    reloader = LexiconReloader.load(folder, metrics)
    # Between kubelet's steps: a user-visible symlink whose target is not in `..data` yet.
    os.symlink("..data/contact.txt", folder / "contact.txt")
    assert await reloader.reload() is ReloadResult.REFUSED
    assert reload_count(metrics, "refused") == 1 and reloader.generation == 1


@pytest.fixture
async def watching(folder: Path, metrics: ModerationMetrics) -> AsyncIterator[LexiconReloader]:
    """A reloader with its real watcher running; `folder` must be written before use."""
    kubelet_update(folder, OLD)
    reloader = LexiconReloader.load(folder, metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(reloader.watch(stop, quiet_ms=30, debounce_ms=1000))
    try:
        yield reloader
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_watch_reloads_on_a_kubelet_symlink_swap(
        watching: LexiconReloader, folder: Path, metrics: ModerationMetrics) -> None:
    kubelet_update(folder, NEW)
    await wait_until(lambda: watching.generation == 2)
    assert masks_new_word(watching)
    kubelet_update(folder, {**NEW, "abuse.txt": "# action: nuke\n"})  # broken: refused, old kept
    await wait_until(lambda: reload_count(metrics, "refused") >= 1)
    assert watching.generation == 2 and masks_new_word(watching)
    kubelet_update(folder, OLD)
    await wait_until(lambda: watching.generation == 3)
    assert not masks_new_word(watching)


async def test_watch_reloads_after_the_folder_itself_is_replaced(
        watching: LexiconReloader, folder: Path, tmp_path: Path) -> None:
    os.rename(folder, tmp_path / "old-lexicon")
    write_files(folder, NEW)
    # inotify followed the old folder; the watcher notices, watches the new one and reloads.
    await wait_until(lambda: watching.generation == 2)
    assert masks_new_word(watching)
    write_files(folder, {"abuse.txt": "# action: mask\n傻逼\n王八蛋\n他妈的\n"})
    await wait_until(lambda: watching.generation == 3)
    assert watching.matcher.check("他妈的").verdict is Action.MASK
