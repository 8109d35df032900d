"""Routes as data: model aliases mapped to a provider and its settings (routes.toml)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class RoutesError(ValueError):
    """The routes file is malformed; the message names the route and the field."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    provider: str
    settings: Mapping[str, Any] = field(default_factory=dict)


def parse_routes(text: str) -> dict[str, RouteSpec]:
    """`[routes.<alias>]` tables with `provider = "..."` and an optional `settings` table."""
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
            raise RoutesError(f"route {name!r}: name must be 1-64 letters, digits or . _ : -")
        if not isinstance(table, dict) or not isinstance(table.get("provider"), str):
            raise RoutesError(f"route {name!r}: needs provider = \"<plugin name>\"")
        settings = table.get("settings", {})
        if not isinstance(settings, dict):
            raise RoutesError(f"route {name!r}: settings must be a table")
        unknown = set(table) - {"provider", "settings"}
        if unknown:
            raise RoutesError(f"route {name!r}: unknown keys {sorted(unknown)}")
        routes[name] = RouteSpec(name, table["provider"], settings)
    return routes


def load_routes(path: Path) -> dict[str, RouteSpec]:
    try:
        return parse_routes(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RoutesError(f"routes file {path} does not exist") from None
