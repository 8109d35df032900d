"""Generations of plugins: load a snapshot as fresh module objects, check it, swap it in atomically."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from services.common.errors import KefuError
from services.llm_worker.plugin_api import (
    CanonicalQuestions,
    KnowsQuestions,
    PluginContext,
    Provider,
    ProviderFactory,
)
from services.llm_worker.routes import RouteSpec, TargetSpec, parse_routes, pick_target
from services.llm_worker.snapshot import FolderSnapshot, take_snapshot

log = logging.getLogger(__name__)

PROVIDER_METHODS = ("setup", "stream", "self_test", "aclose")


class GenerationClosed(KefuError):
    """Work was asked of a plugin generation that has been dropped."""


class PluginLoadError(KefuError):
    """A generation cannot go live; the message names the plugin or route and what is wrong."""


@dataclass
class Target:
    spec: TargetSpec
    provider: Provider

    @property
    def model(self) -> str:
        return str(self.spec.settings.get("model", ""))


@dataclass
class Route:
    name: str
    targets: list[Target]

    def pick(self, session_id: str, fallback_key: str) -> Target:
        target: Target = pick_target(self.targets, [t.spec.weight for t in self.targets], self.name,
                                     session_id, fallback_key)
        return target


@dataclass
class Generation:
    """One loaded snapshot of plugins and routes; closed when retired and its last request ends."""

    attempt: int
    fingerprint: str
    folder: Path
    routes: dict[str, Route] = field(default_factory=dict)
    modules: list[ModuleType] = field(default_factory=list)
    number: int = 0
    active: int = 0
    retired: bool = False
    closed: bool = False
    knowers: dict[int, KnowsQuestions | None] = field(default_factory=dict, repr=False)
    """answering.py's lookups by id(target) (a target lives as long as its generation), made once: a runtime
    protocol's isinstance check costs microseconds, and a turn asks several times."""
    canonizers: dict[int, CanonicalQuestions | None] = field(default_factory=dict, repr=False)

    def route(self, name: str) -> Route | None:
        return self.routes.get(name)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for route in self.routes.values():
            for target in route.targets:
                try:
                    await target.provider.aclose()
                except Exception:
                    log.exception("generation %d: route %s: aclose failed", self.number, route.name)
        for module in self.modules:
            sys.modules.pop(module.__name__, None)
        self.modules.clear()
        self.routes.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def _import_fresh(path: Path, attempt: int) -> ModuleType:
    """Import `path` under a name unique to this load attempt (never importlib.reload)."""
    name = f"kefu_plugins_a{attempt}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"plugin {path.name}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # Registered while the generation lives: dataclasses and pickling look modules up here.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as error:
        sys.modules.pop(name, None)
        if not isinstance(error, Exception):
            raise
        raise PluginLoadError(f"plugin {path.name}: import failed: {type(error).__name__}: {error}") from error
    return module


def _factory_of(module: ModuleType, path: Path) -> ProviderFactory:
    factory: object = getattr(module, "plugin", None)
    if factory is None:
        raise PluginLoadError(f"plugin {path.name}: exports no `plugin` object")
    name = getattr(factory, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginLoadError(f"plugin {path.name}: `plugin.name` must be a non-empty string")
    if not callable(factory):
        raise PluginLoadError(f"plugin {path.name}: `plugin` must be callable as plugin(settings, context)")
    assert isinstance(factory, ProviderFactory)  # what the checks above established: a `name` and a `__call__`
    return factory


def _check_provider(provider: object, where: str) -> Provider:
    for member in PROVIDER_METHODS:
        if not callable(getattr(provider, member, None)):
            raise PluginLoadError(f"{where}: provider has no method {member}()")
    if not inspect.isasyncgenfunction(getattr(provider, "stream", None)):
        raise PluginLoadError(f"{where}: provider.stream must be an async generator function")
    if not isinstance(getattr(provider, "capabilities", None), frozenset):
        raise PluginLoadError(f"{where}: provider.capabilities must be a frozenset")
    assert isinstance(provider, Provider)
    return provider


async def load_generation(snapshot: FolderSnapshot, folder: Path, attempt: int, routes_file: str,
                          route_overrides: Mapping[str, RouteSpec], extra: Mapping[str, object] | None = None,
                          ) -> Generation:
    """Write `snapshot` to `folder`, import every plugin, build, set up and self-test every target.

    Raises PluginLoadError naming what is wrong; on failure nothing of the attempt stays
    alive (providers closed, modules unregistered, folder removed).
    """
    snapshot.write_to(folder)
    generation = Generation(attempt, snapshot.fingerprint, folder)
    try:
        factories: dict[str, ProviderFactory] = {}
        for path in sorted(folder.glob("*.py")):
            module = _import_fresh(path, attempt)
            generation.modules.append(module)
            factory = _factory_of(module, path)
            if factory.name in factories:
                raise PluginLoadError(f"plugin {path.name}: provider name {factory.name!r} is taken twice")
            factories[factory.name] = factory
        routes_text = snapshot.files.get(routes_file)
        if routes_text is None:
            raise PluginLoadError(f"routes: {routes_file} is missing")
        try:
            specs = {**parse_routes(routes_text.decode("utf-8")), **route_overrides}
        except (ValueError, UnicodeDecodeError) as error:
            raise PluginLoadError(f"routes: {error}") from error
        if "default" not in specs:
            raise PluginLoadError("routes: there is no `default` route")
        context = PluginContext(plugins_dir=folder, extra=dict(extra or {}))
        for spec in specs.values():
            route = Route(spec.name, [])
            generation.routes[spec.name] = route
            for index, target_spec in enumerate(spec.targets, start=1):
                where = f"route {spec.name} target {index} ({target_spec.provider})"
                target_factory = factories.get(target_spec.provider)
                if target_factory is None:
                    raise PluginLoadError(f"{where}: no plugin provides it (have {sorted(factories)})")
                try:
                    provider = _check_provider(target_factory(target_spec.settings, context), where)
                    route.targets.append(Target(target_spec, provider))
                    await provider.setup()
                    await provider.self_test()
                except PluginLoadError:
                    raise
                except Exception as error:
                    raise PluginLoadError(f"{where}: {type(error).__name__}: {error}") from error
    except BaseException:
        await generation.aclose()
        raise
    return generation


class PluginHost:
    """Owns the generation serving new requests; older ones live until their last request ends."""

    def __init__(self, plugins_dir: Path, routes_file: str, route_overrides: Mapping[str, RouteSpec], *,
                 work_dir: Path | None = None, settle_s: float = 0.05) -> None:
        self.plugins_dir = plugins_dir
        self._routes_file = routes_file
        self._overrides = dict(route_overrides)
        self._own_work_dir = work_dir is None
        self._work_dir = work_dir or Path(tempfile.mkdtemp(prefix="kefu-plugins-"))
        self._settle_s = settle_s
        self._attempts = 0
        self._current: Generation | None = None
        self._lock = asyncio.Lock()
        self.generations_alive: set[int] = set()
        self.last_error: str = ""

    @property
    def current(self) -> Generation:
        assert self._current is not None, "start() first"
        return self._current

    async def start(self) -> None:
        """Load the first generation; a broken folder at start-up stops the worker (PluginLoadError)."""
        await self.reload()

    async def reload(self) -> bool:
        """Load the folder as a new generation and swap it in; False if nothing changed.

        Raises PluginLoadError when the new version is refused; the old one keeps serving.
        The folder is read until two reads `settle_s` apart agree, so a copy in progress
        is loaded only once it is complete.
        """
        async with self._lock:
            snapshot = await self._settled_snapshot()
            if self._current is not None and snapshot.fingerprint == self._current.fingerprint:
                return False
            self._attempts += 1
            try:
                generation = await load_generation(
                    snapshot, self._work_dir / f"a{self._attempts}", self._attempts, self._routes_file,
                    self._overrides)
            except PluginLoadError as error:
                self.last_error = str(error)
                log.error("plugin reload refused: %s", error)
                raise
            old, self._current = self._current, generation
            generation.number = old.number + 1 if old else 1
            self.generations_alive.add(generation.number)
            log.info("plugin generation %d serving routes %s", generation.number, sorted(generation.routes))
            if old is not None:
                await self._retire(old)
            return True

    async def _settled_snapshot(self) -> FolderSnapshot:
        snapshot = await asyncio.to_thread(take_snapshot, self.plugins_dir)
        for _ in range(100):
            await asyncio.sleep(self._settle_s)
            again = await asyncio.to_thread(take_snapshot, self.plugins_dir)
            if again.fingerprint == snapshot.fingerprint:
                return snapshot
            snapshot = again
        return snapshot

    async def _retire(self, generation: Generation) -> None:
        generation.retired = True
        if generation.active == 0:
            await self._close(generation)

    async def _close(self, generation: Generation) -> None:
        await generation.aclose()
        self.generations_alive.discard(generation.number)

    def lease(self) -> AbstractAsyncContextManager[Generation]:
        """The current generation, kept alive until the block ends."""
        return self.hold(self.current)

    @asynccontextmanager
    async def hold(self, generation: Generation) -> AsyncIterator[Generation]:
        """Keep `generation` alive until the block ends (background work that outlives its request);
        GenerationClosed if it was already dropped."""
        if generation.closed:
            raise GenerationClosed(f"plugin generation {generation.number} was dropped")
        generation.active += 1
        try:
            yield generation
        finally:
            generation.active -= 1
            if generation.retired and generation.active == 0:
                await self._close(generation)

    async def aclose(self) -> None:
        if self._current is not None:
            await self._retire(self._current)
        if self._own_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)
