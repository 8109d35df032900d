"""Where bench results go, how they are written, and the machine they were measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file (git-ignored) so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def machine(loadavg_start: tuple[float, ...]) -> dict[str, object]:
    """CPU count, Python, platform and the load average at start and now: what a figure was measured on."""
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()}


def cell(value: float | None, fmt: str = ".1f") -> str:
    """A number for a markdown table, `–` when there is none."""
    return "–" if value is None else format(value, fmt)
