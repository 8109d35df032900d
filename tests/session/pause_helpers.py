"""A process frozen for a while (SIGSTOP, SIGCONT): calls into it hang, as behind a stalled backend."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _all_stopped(pid: int) -> bool:
    """Every thread of `pid` stopped: SIGSTOP reaches a busy multi-threaded process (nats-server) a moment late."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            state = (task / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # a thread that just ended
        if state not in ("T", "t"):
            return False
    return True


@contextmanager
def paused(pid: int, timeout_s: float = 5.0) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout_s
        while not _all_stopped(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} did not stop")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
