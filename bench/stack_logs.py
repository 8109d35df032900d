"""The warnings and errors a bench's stack wrote to its process logs, grouped for the report."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

PROBLEM = re.compile(r"Traceback|ERROR|CRITICAL|WARNING|Too many open files|EMFILE|out of system resource",
                     re.IGNORECASE)


def log_problems(log_dir: Path, limit: int = 12, pattern: re.Pattern[str] = PROBLEM) -> dict[str, list[str]]:
    """The distinct lines matching `pattern` (warnings and errors) of each process log (numbers blanked to
    group them), most frequent first."""
    found: dict[str, list[str]] = {}
    for path in sorted(log_dir.glob("*.log")):
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for line in path.read_text(errors="replace").splitlines():
            if not pattern.search(line):
                continue
            key = re.sub(r"\d+", "N", _message_of(line))[:200]
            counts[key] += 1
            examples.setdefault(key, line[:400])
        if counts:
            found[path.stem] = [f"{n}× {examples[k]}" for k, n in counts.most_common(limit)]
    return found


def _message_of(line: str) -> str:
    """The message and level of a JSON log line (so timestamps and request ids do not split groups)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    return f"{record.get('level', '')} {record.get('logger', '')} {record.get('message', record.get('msg', line))}"
