"""Reading docs/metrics.md: the metrics catalogue as {process section: {metric name: entry}}."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    name: str
    type: str
    labels: tuple[str, ...]
    meaning: str


_ROW = re.compile(r"^\|\s*`(?P<name>[a-z_:][a-z0-9_:]*)`\s*\|\s*(?P<type>[a-z]+)\s*\|"
                  r"(?P<labels>[^|]*)\|(?P<meaning>.*)\|\s*$")


Catalogue = dict[str, dict[str, CatalogueEntry]]
"""{section: {metric name: entry}}."""


def parse_catalogue(text: str) -> Catalogue:
    """docs/metrics.md as {section: {metric name: entry}}; sections are the `## ` headings."""
    sections: dict[str, dict[str, CatalogueEntry]] = {}
    current: dict[str, CatalogueEntry] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].split()[0].strip("`").lower(), {})
            continue
        match = _ROW.match(line)
        if match and current is not None:
            labels = tuple(re.findall(r"`([a-zA-Z_][a-zA-Z0-9_]*)`", match["labels"]))
            current[match["name"]] = CatalogueEntry(match["name"], match["type"], labels, match["meaning"].strip())
    return sections
