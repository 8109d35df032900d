"""Loading a generation of plugins as fresh module objects, checking it, and serving from it."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from services.llm_worker.plugin_api import PluginContext, Provider, ProviderFactory
from services.llm_worker.routes import RouteSpec, load_routes

log = logging.getLogger(__name__)

PROVIDER_METHODS = ("setup", "stream", "self_test", "aclose")


class PluginLoadError(Exception):
    """A generation cannot go live; the message names the plugin or route and what is wrong."""


@dataclass
class Route:
    spec: RouteSpec
    provider: Provider

    @property
    def model(self) -> str:
        return str(self.spec.settings.get("model", ""))


@dataclass
class Generation:
    """One loaded set of plugins and routes; dropped when retired and its last request ends."""

    number: int
    routes: dict[str, Route]
    modules: list[ModuleType] = field(default_factory=list)
    active: int = 0
    retired: bool = False
    closed: bool = False

    def route(self, name: str) -> Route | None:
        return self.routes.get(name)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for route in self.routes.values():
            try:
                await route.provider.aclose()
            except Exception:
                log.exception("generation %d: route %s: aclose failed", self.number, route.spec.name)
        for module in self.modules:
            sys.modules.pop(module.__name__, None)
        self.modules.clear()
        self.routes.clear()


def _import_fresh(path: Path, generation: int) -> ModuleType:
    """Import `path` under a name unique to this generation (never importlib.reload)."""
    name = f"kefu_plugins_g{generation}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"plugin {path.name}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # Registered while the generation lives: dataclasses and pickling look modules up here.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(name, None)
        raise PluginLoadError(f"plugin {path.name}: import failed: {type(error).__name__}: {error}") from error
    return module


def _factory_of(module: ModuleType, path: Path) -> ProviderFactory:
    factory = getattr(module, "plugin", None)
    if factory is None:
        raise PluginLoadError(f"plugin {path.name}: exports no `plugin` object")
    name = getattr(factory, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginLoadError(f"plugin {path.name}: `plugin.name` must be a non-empty string")
    if not callable(factory):
        raise PluginLoadError(f"plugin {path.name}: `plugin` must be callable as plugin(settings, context)")
    return factory


def _check_provider(provider: object, route: str) -> Provider:
    for member in PROVIDER_METHODS:
        if not callable(getattr(provider, member, None)):
            raise PluginLoadError(f"route {route}: provider has no method {member}()")
    if not inspect.isasyncgenfunction(getattr(provider, "stream")):
        raise PluginLoadError(f"route {route}: provider.stream must be an async generator function")
    capabilities = getattr(provider, "capabilities", None)
    if not isinstance(capabilities, frozenset):
        raise PluginLoadError(f"route {route}: provider.capabilities must be a frozenset")
    assert isinstance(provider, Provider)
    return provider


async def load_generation(plugins_dir: Path, routes_file: str, number: int,
                          route_overrides: Mapping[str, RouteSpec], extra: Mapping[str, Any] | None = None,
                          ) -> Generation:
    """Import every plugin, build every route's provider, set it up and self-test it.

    Raises PluginLoadError naming what is wrong; on failure nothing of the new
    generation stays alive (providers closed, modules unregistered).
    """
    generation = Generation(number, {})
    try:
        factories: dict[str, ProviderFactory] = {}
        for path in sorted(plugins_dir.glob("*.py")):
            if path.name.startswith(("_", ".")):
                continue
            module = _import_fresh(path, number)
            generation.modules.append(module)
            factory = _factory_of(module, path)
            if factory.name in factories:
                raise PluginLoadError(f"plugin {path.name}: provider name {factory.name!r} is taken twice")
            factories[factory.name] = factory
        try:
            specs = {**load_routes(plugins_dir / routes_file), **route_overrides}
        except ValueError as error:
            raise PluginLoadError(str(error)) from error
        if "default" not in specs:
            raise PluginLoadError("routes: there is no `default` route")
        context = PluginContext(plugins_dir=plugins_dir, extra=dict(extra or {}))
        for spec in specs.values():
            factory = factories.get(spec.provider)
            if factory is None:
                raise PluginLoadError(f"route {spec.name}: no plugin provides {spec.provider!r} "
                                      f"(have {sorted(factories)})")
            try:
                provider = _check_provider(factory(spec.settings, context), spec.name)
                generation.routes[spec.name] = Route(spec, provider)
                await provider.setup()
                await provider.self_test()
            except PluginLoadError:
                raise
            except Exception as error:
                raise PluginLoadError(f"route {spec.name} ({spec.provider}): {type(error).__name__}: {error}") from error
    except BaseException:
        await generation.aclose()
        raise
    return generation


class PluginHost:
    """Owns the generation serving new requests; older ones live until their last request ends."""

    def __init__(self, generation: Generation) -> None:
        self._current = generation
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Generation:
        return self._current

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Generation]:
        """The current generation, kept alive until the block ends."""
        generation = self._current
        generation.active += 1
        try:
            yield generation
        finally:
            generation.active -= 1
            if generation.retired and generation.active == 0:
                await generation.aclose()

    async def swap(self, generation: Generation) -> Generation:
        """Make `generation` serve new requests; the old one closes when idle."""
        async with self._lock:
            old, self._current = self._current, generation
            old.retired = True
            if old.active == 0:
                await old.aclose()
            return old

    async def aclose(self) -> None:
        self._current.retired = True
        if self._current.active == 0:
            await self._current.aclose()
