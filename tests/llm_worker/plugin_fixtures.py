"""Writing small versioned provider plugins and routes into a folder, for host and reload tests."""

from __future__ import annotations

from pathlib import Path

VERSIONED_PLUGIN = '''
import asyncio
from services.llm_worker.plugin_api import Delta, Finish, Usage

VERSION = "{version}"


class Versioned:
    name = "versioned"

    def __init__(self, settings, context):
        self.capabilities = frozenset({{"stream"}})
        self.settings = dict(settings)
        self.closed = False

    async def setup(self):
        pass

    async def self_test(self):
        {self_test}

    async def aclose(self):
        self.closed = True

    async def stream(self, messages, params):
        model = self.settings.get("model", "m")
        for _ in range(int(self.settings.get("chunks", 3))):
            await asyncio.sleep(float(self.settings.get("delay_s", 0)))
            yield Delta(f"{{VERSION}}/{{model}} ")
        yield Finish("stop", Usage(1, 3), model)


plugin = Versioned
'''

ROUTES_ONE = '''
[routes.default]
provider = "versioned"
settings = {{ model = "{model}", chunks = {chunks}, delay_s = {delay_s} }}
'''

ROUTES_CANARY = '''
[[routes.default.targets]]
provider = "versioned"
weight = {weight_a}
settings = {{ model = "model-a", chunks = {chunks}, delay_s = {delay_s} }}

[[routes.default.targets]]
provider = "versioned"
weight = {weight_b}
settings = {{ model = "model-b", chunks = {chunks}, delay_s = {delay_s} }}
'''


def plugin_source(version: str, *, self_test: str = "pass") -> str:
    return VERSIONED_PLUGIN.format(version=version, self_test=self_test)


def write_version(folder: Path, version: str, *, model: str = "model-a", chunks: int = 3,
                  delay_s: float = 0.0, self_test: str = "pass") -> None:
    """Write the plugin and the routes (each by write-to-temp and rename, as careful tools do)."""
    folder.mkdir(parents=True, exist_ok=True)
    replace_file(folder / "versioned.py", plugin_source(version, self_test=self_test))
    replace_file(folder / "routes.toml", ROUTES_ONE.format(model=model, chunks=chunks, delay_s=delay_s))


def write_canary(folder: Path, weight_a: int, weight_b: int, *, chunks: int = 3, delay_s: float = 0.0) -> None:
    replace_file(folder / "routes.toml", ROUTES_CANARY.format(weight_a=weight_a, weight_b=weight_b,
                                                              chunks=chunks, delay_s=delay_s))


def replace_file(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)
