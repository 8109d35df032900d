"""Plugin generations: load, refuse broken versions, swap, drain in-flight streams, free memory."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.llm_worker.plugin_api import ChatMessage, Delta, Finish, GenerationParams
from services.llm_worker.plugin_host import Generation, PluginHost, PluginLoadError
from tests.llm_worker.plugin_fixtures import plugin_source, replace_file, write_canary, write_version

HELLO = [ChatMessage("user", "hello")]


async def answer(generation: Generation, session_id: str = "s1") -> str:
    target = generation.routes["default"].pick(session_id, "req")
    parts = []
    async for event in target.provider.stream(HELLO, GenerationParams()):
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            assert isinstance(event, Finish)
    return "".join(parts)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[PluginHost]:
    folder = tmp_path / "plugins"
    write_version(folder, "v1")
    plugin_host = PluginHost(folder, "routes.toml", {}, work_dir=tmp_path / "work", settle_s=0.01)
    await plugin_host.start()
    yield plugin_host
    await plugin_host.aclose()


async def test_host_reload_swaps_to_a_new_generation(host: PluginHost) -> None:
    assert host.current.number == 1 and await answer(host.current) == "v1/model-a " * 3
    write_version(host.plugins_dir, "v2", model="model-b")
    assert await host.reload() is True
    assert host.current.number == 2 and await answer(host.current) == "v2/model-b " * 3


async def test_host_unchanged_folder_is_not_a_reload(host: PluginHost) -> None:
    (host.plugins_dir / ".versioned.py.swp").write_text("editor state")
    (host.plugins_dir / "versioned.py~").write_text("backup")
    assert await host.reload() is False and host.current.number == 1


@pytest.mark.parametrize("breakage", ["syntax", "import", "self_test", "routes", "unknown_provider", "no_plugin"])
async def test_host_refuses_broken_versions_and_keeps_serving(host: PluginHost, breakage: str) -> None:
    folder = host.plugins_dir
    if breakage == "syntax":
        replace_file(folder / "versioned.py", plugin_source("v2") + "\ndef broken(:\n")
    elif breakage == "import":
        replace_file(folder / "versioned.py", "import kefu_no_such_module\n" + plugin_source("v2"))
    elif breakage == "self_test":
        write_version(folder, "v2", self_test="raise RuntimeError('upstream key missing')")
    elif breakage == "routes":
        replace_file(folder / "routes.toml", "[routes.default\nprovider = 'versioned'\n")
    elif breakage == "unknown_provider":
        replace_file(folder / "routes.toml", "[routes.default]\nprovider = 'nope'\n")
    else:
        replace_file(folder / "extra.py", "VALUE = 1\n")
    with pytest.raises(PluginLoadError) as refused:
        await host.reload()
    expected = {"syntax": "versioned.py", "import": "kefu_no_such_module", "self_test": "upstream key missing",
                "routes": "TOML", "unknown_provider": "(nope): no plugin provides it",
                "no_plugin": "extra.py"}[breakage]
    assert expected in str(refused.value)
    assert host.current.number == 1 and await answer(host.current) == "v1/model-a " * 3
    assert not [name for name in sys.modules if name.startswith("kefu_plugins_a2")]


async def test_host_in_flight_stream_finishes_on_its_generation(host: PluginHost) -> None:
    write_version(host.plugins_dir, "v1", chunks=5, delay_s=0.01)
    await host.reload()
    async with host.lease() as old:
        target = old.routes["default"].pick("s", "r")
        stream = target.provider.stream(HELLO, GenerationParams())
        first = await anext(stream)
        write_version(host.plugins_dir, "v2")
        await host.reload()
        rest = [event async for event in stream]
        assert not old.closed  # still leased
    assert isinstance(first, Delta)
    texts = [first.text] + [e.text for e in rest if isinstance(e, Delta)]
    assert texts == ["v1/model-a "] * 5
    assert old.closed and getattr(target.provider, "closed", False)
    assert await answer(host.current) == "v2/model-a " * 3


async def test_host_hundred_reloads_leak_no_module(host: PluginHost, tmp_path: Path) -> None:
    modules: list[weakref.ref[object]] = []
    for version in range(2, 102):
        write_version(host.plugins_dir, f"v{version}")
        assert await host.reload()
        modules.append(weakref.ref(sys.modules[f"kefu_plugins_a{host.current.attempt}.versioned"]))
    gc.collect()
    assert sum(ref() is not None for ref in modules) == 1  # only the current generation's module
    assert [n for n in sys.modules if n.startswith("kefu_plugins_")] == [
        f"kefu_plugins_a{host.current.attempt}.versioned"]
    assert [p.name for p in (tmp_path / "work").iterdir()] == [f"a{host.current.attempt}"]
    assert host.generations_alive == {101}


async def test_host_canary_split_is_stable_per_session(host: PluginHost) -> None:
    write_canary(host.plugins_dir, 90, 10)
    await host.reload()
    route = host.current.routes["default"]
    picks = [route.pick(f"session-{i}", "r").model for i in range(4000)]
    share_b = picks.count("model-b") / len(picks)
    assert 0.07 < share_b < 0.13
    assert all(route.pick(f"session-{i}", "other").model == picks[i] for i in range(200))


async def test_host_copy_in_progress_loads_only_the_finished_copy(host: PluginHost) -> None:
    path = host.plugins_dir / "versioned.py"
    source = plugin_source("v2")

    async def slow_copy() -> None:
        with path.open("w") as out:  # in place, in pieces, like `cp` of a large file
            for start in range(0, len(source), 40):
                out.write(source[start:start + 40])
                out.flush()
                await asyncio.sleep(0.003)

    copy = asyncio.create_task(slow_copy())
    await asyncio.sleep(0.005)
    swapped = await host.reload()
    await copy
    if not swapped or "v1/" in await answer(host.current):
        await host.reload()
    assert await answer(host.current) == "v2/model-a " * 3
