"""A consistent copy of the plugins folder: what a generation is loaded from."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

# Editors' and copiers' temporary files never belong to a generation.
TEMP_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".temp", ".part", ".partial", ".crdownload", ".bak", ".orig")


@dataclass(frozen=True, slots=True)
class FolderSnapshot:
    files: dict[str, bytes]
    fingerprint: str

    def write_to(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=False)
        for name, content in self.files.items():
            (folder / name).write_bytes(content)


def is_plugin_file(name: str) -> bool:
    # Hidden names cover a ConfigMap volume's `..data`, `..<timestamp>` and `..data_tmp`.
    return not name.startswith((".", "_", "#")) and not name.endswith(TEMP_SUFFIXES)


def take_snapshot(folder: Path) -> FolderSnapshot:
    """Read every top-level plugin file, following symlinks (a ConfigMap's files are symlinks)."""
    files: dict[str, bytes] = {}
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not is_plugin_file(entry.name) or not entry.is_file(follow_symlinks=True):
            continue
        try:
            content = Path(entry.path).read_bytes()
        except FileNotFoundError:
            continue  # removed while we were reading; the next change event brings it back
        files[entry.name] = content
        digest.update(entry.name.encode() + b"\0" + hashlib.sha256(content).digest())
    return FolderSnapshot(files, digest.hexdigest())
