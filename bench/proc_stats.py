"""CPU time and memory of processes and of the machine, read from /proc (Linux; empty elsewhere)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devtools.devstack.stack import Stack

Processes = dict[str, int]
"""The pids whose CPU time and memory a report shows, by name."""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads; None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def live_cpu_seconds(pid: int) -> float:
    """cpu_seconds of a process that must still be running: an error when it has gone."""
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise ProcessLookupError(f"no CPU time for pid {pid}: the process has gone")
    return seconds


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def memory_mib(pid: int) -> dict[str, float]:
    """Resident set now (`rss_mib`) and its peak (`peak_mib`); empty when it cannot be read."""
    try:
        kib = memory_kib(pid)
    except (OSError, ValueError, IndexError):
        return {}
    wanted = {"VmRSS": "rss_mib", "VmHWM": "peak_mib"}
    return {wanted[key]: round(value / 1024, 1) for key, value in kib.items()}


def cpu_snapshot(processes: Processes) -> dict[str, float]:
    readings = {name: cpu_seconds(pid) for name, pid in processes.items()}
    return {name: value for name, value in readings.items() if value is not None}


def machine_busy_seconds() -> float | None:
    """CPU time all cores of the machine spent busy (not idle, not waiting on I/O) since boot."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def stack_pids(stack: Stack, nats_name: str = "nats") -> Processes:
    """The pid of each of a stack's processes, nats-server's (when the stack started one) last."""
    pids = {name: process.pid for name, process in stack.processes.items()}
    if stack.nats is not None:
        pids[nats_name] = stack.nats.process.pid
    return pids


def cpu_of(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds of each process so far; 0 where it cannot be read."""
    return {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()}


def idle_cpu_percent(pids: Mapping[str, int], seconds: float) -> dict[str, float]:
    """Percent of one core each process used over the next `seconds` while nothing is asked of it, and the total."""
    before = cpu_of(pids)
    time.sleep(seconds)
    after = cpu_of(pids)
    used = {name: round(100 * (after[name] - before[name]) / seconds, 2) for name in pids}
    return {**used, "total": round(sum(used.values()), 2)}


def rss_of(pids: Mapping[str, int]) -> dict[str, float]:
    """VmRSS of each process in MiB, and the total."""
    rss = {name: memory_mib(pid).get("rss_mib", 0.0) for name, pid in pids.items()}
    return {**rss, "total": round(sum(rss.values()), 1)}


def pss_mib(pid: int) -> float:
    """Proportional set size in MiB: the process's own pages plus its share of pages mapped by others too
    (shared libraries, another edge's), so that a sum over processes counts each page once; 0.0 unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def pss_of(pids: Mapping[str, int]) -> dict[str, float]:
    """PSS of each process in MiB, and the total: the memory the processes take together."""
    pss = {name: pss_mib(pid) for name, pid in pids.items()}
    return {**pss, "total": round(sum(pss.values()), 1)}
