"""Routes as data: a model alias maps to one or more weighted (provider, settings) targets.

routes.toml, two forms per alias:

    [routes.default]                      # one target
    provider = "knowledge_base"
    settings = { faq_file = "shop_faq.json" }

    [[routes.support.targets]]            # a canary split, stable per session
    provider = "openai_compatible"
    weight = 90
    settings = { model = "model-a", base_url = "http://upstream/v1" }
    [[routes.support.targets]]
    provider = "openai_compatible"
    weight = 10
    settings = { model = "model-b", base_url = "http://upstream/v1" }
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from services.common.errors import KefuError

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")
MAX_WEIGHT = 1_000_000
T = TypeVar("T")


class RoutesError(KefuError, ValueError):
    """The routes file is malformed; the message names the route and the field."""


@dataclass(frozen=True, slots=True)
class TargetSpec:
    provider: str
    settings: Mapping[str, object] = field(default_factory=dict)
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    targets: tuple[TargetSpec, ...]

    @classmethod
    def single(cls, name: str, provider: str, settings: Mapping[str, object]) -> RouteSpec:
        return cls(name, (TargetSpec(provider, settings, 1),))


def pick_target(targets: Sequence[T], weights: Sequence[int], route: str, session_id: str,
                fallback_key: str) -> T:
    """The target a conversation goes to: a hash of route and session over the weights.

    Deterministic, so one conversation stays on one version while the weights stay the
    same; a request without a session uses `fallback_key` (e.g. a request id) instead.
    """
    total = sum(weights)
    if len(targets) == 1 or total <= 0:
        return targets[0]
    digest = hashlib.blake2b(f"{route}\0{session_id or fallback_key}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") % total
    for target, weight in zip(targets, weights, strict=True):
        if point < weight:
            return target
        point -= weight
    return targets[-1]


def _target(route: str, raw: object, where: str) -> TargetSpec:
    provider = raw.get("provider") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or not isinstance(provider, str) or not provider:
        raise RoutesError(f"route {route!r}{where}: needs provider = \"<plugin name>\"")
    settings = raw.get("settings", {})
    if not isinstance(settings, dict):
        raise RoutesError(f"route {route!r}{where}: settings must be a table")
    weight = raw.get("weight", 1)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
        raise RoutesError(f"route {route!r}{where}: weight must be an integer 0..{MAX_WEIGHT}")
    return TargetSpec(provider, settings, weight)


def parse_routes(text: str) -> dict[str, RouteSpec]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RoutesError(f"routes file is not valid TOML: {error}") from None
    tables = data.get("routes")
    if not isinstance(tables, dict) or not tables:
        raise RoutesError("routes file needs at least one [routes.<alias>] table")
    routes: dict[str, RouteSpec] = {}
    for name, table in tables.items():
        if not ROUTE_NAME.fullmatch(name):
            raise RoutesError(f"route {name!r}: name must be 1-64 letters, digits or . _ : / -")
        if not isinstance(table, dict):
            raise RoutesError(f"route {name!r}: must be a table")
        if "targets" in table:
            unknown = set(table) - {"targets"}
            raw_targets = table["targets"]
            if not isinstance(raw_targets, list) or not raw_targets:
                raise RoutesError(f"route {name!r}: targets must be a non-empty array of tables")
            targets = tuple(_target(name, raw, f" target {i + 1}") for i, raw in enumerate(raw_targets))
        else:
            unknown = set(table) - {"provider", "settings", "weight"}
            targets = (_target(name, table, ""),)
        if unknown:
            raise RoutesError(f"route {name!r}: unknown keys {sorted(unknown)}")
        if sum(t.weight for t in targets) <= 0:
            raise RoutesError(f"route {name!r}: the weights add up to 0")
        routes[name] = RouteSpec(name, targets)
    return routes


def load_routes(path: Path) -> dict[str, RouteSpec]:
    try:
        return parse_routes(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RoutesError(f"routes file {path.name} does not exist") from None
    except UnicodeDecodeError:
        raise RoutesError(f"routes file {path.name} is not UTF-8") from None
