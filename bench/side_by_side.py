"""`python -m bench.side_by_side A B`: two checkouts' stacks up at once, the same closed-loop load on both in the
same seconds; each process's CPU ms per turn and the TTFT of each side, medians over rounds.

What one change buys is often 2-10 % of a turn's CPU, and this shared machine's speed moves more than that
between two runs minutes apart (the direct path's own client cost 0.8 ms a turn in one run, 1.5 in the next):
`python -m bench` run once per checkout cannot tell such a change from the machine. Here both sides run through
the same seconds, so whatever slows the machine slows both; the comparison within a round is what counts
(absolute figures are higher than `python -m bench`'s: two stacks share the cores).

A side is `DIR[,KEFU_NAME=VALUE...]`: a checkout (`git worktree add /tmp/base <rev>`, with `make proto` run in
it) and settings for its processes; the same checkout twice with a setting changed measures that setting.
Each side's stack runs from its own checkout's code, started by that checkout's `bench.chat_stack`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.chat_load import targets
from bench.loadgen import LoadSpec, run_load
from bench.proc_stats import cpu_of

SECRET = "side-by-side-bench-secret-0123456789abcdef"

SERVE = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, ".")
from bench.chat_params import BenchParams
from bench.chat_stack import start_stack, start_upstream
from bench.processes import stop_process
from bench.proc_stats import stack_pids
secret, env = sys.argv[1], dict(item.split("=", 1) for item in sys.argv[2:])
work = Path(tempfile.mkdtemp(prefix="kefu-side-"))
upstream, upstream_url = start_upstream(BenchParams(), work / "upstream.log")
try:
    stack = start_stack(work, upstream_url, secret, env)
    try:
        print(json.dumps({"edge": stack.base_url, "upstream": upstream_url, "pids": stack_pids(stack)}), flush=True)
        sys.stdin.read()  # until the bench closes it
    finally:
        stack.stop()
finally:
    stop_process(upstream)
"""
"""Run by each side's own interpreter in its checkout: that checkout's code starts its stack (any kefu with
bench.chat_stack), prints where it is, and stops it when standard input closes."""


@dataclass(frozen=True, slots=True)
class Side:
    label: str
    checkout: Path
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, label: str, spec: str) -> Side:
        """`DIR[,KEFU_NAME=VALUE...]`; ValueError names what is wrong."""
        folder, *settings = spec.split(",")
        checkout = Path(folder)
        if not (checkout / "bench" / "chat_stack.py").is_file():
            raise ValueError(f"{folder}: not a kefu checkout with bench/chat_stack.py")
        env: dict[str, str] = {}
        for setting in settings:
            name, equals, value = setting.partition("=")
            if not equals or not name.startswith("KEFU_"):
                raise ValueError(f"{setting!r}: settings are KEFU_NAME=VALUE")
            env[name] = value
        return cls(label, checkout, env)

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.checkout}{',' + extra if extra else ''}"


@dataclass
class Running:
    side: Side
    process: subprocess.Popen[str]
    edge: str
    upstream: str
    pids: dict[str, int]


def start(side: Side, python: str) -> Running:
    process = subprocess.Popen([python, "-c", SERVE, SECRET, *(f"{k}={v}" for k, v in side.env.items())],
                               cwd=side.checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=30)
        process.stdout.close()
        raise RuntimeError(f"side {side.label} ({side.name}) did not start (exit {process.returncode})")
    found = json.loads(line)  # the side's first line; it writes nothing more
    return Running(side, process, found["edge"], found["upstream"], {k: int(v) for k, v in found["pids"].items()})


def stop(running: Running) -> None:
    if running.process.stdin is not None:
        running.process.stdin.close()  # the side stops its stack and exits
    try:
        running.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        running.process.kill()
        running.process.wait()
    if running.process.stdout is not None:
        running.process.stdout.close()


async def one_round(sides: Sequence[Running], users: int, turns: int) -> dict[str, dict[str, float]]:
    """Both sides loaded at once; per side: CPU ms per turn of each process and all, TTFT p50, failures."""
    chosen = [targets(s.upstream, s.edge, SECRET)["kefu"] for s in sides]
    before = [cpu_of(s.pids) for s in sides]
    results = await asyncio.gather(*(run_load(target, LoadSpec(concurrency=users, requests=users * turns))
                                     for target in chosen))
    after = [cpu_of(s.pids) for s in sides]
    figures: dict[str, dict[str, float]] = {}
    for running, result, start_cpu, end_cpu in zip(sides, results, before, after, strict=True):
        done = max(result.succeeded, 1)
        row = {name: (end_cpu[name] - start_cpu[name]) * 1000 / done for name in running.pids}
        row["kefu total"] = sum(row.values())
        row["TTFT p50"] = result.ttft.p50 * 1000 if result.ttft is not None else float("nan")
        row["failed"] = float(result.failed)
        figures[running.side.label] = row
    return figures


def medians(rounds: Sequence[Mapping[str, Mapping[str, float]]], label: str) -> dict[str, float]:
    columns = rounds[0][label].keys()
    return {column: statistics.median(r[label][column] for r in rounds) for column in columns}


def report(sides: Sequence[Side], rounds: Sequence[Mapping[str, Mapping[str, float]]], users: int,
           turns: int) -> str:
    a, b = (medians(rounds, side.label) for side in sides)
    columns = list(a)
    lines = [f"Side by side: {users} users x {turns} turns per side per round, {len(rounds)} round(s), both "
             f"sides at once; medians of the rounds. CPU in ms per turn, TTFT in ms.", "",
             "| side | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for side, row in zip(sides, (a, b), strict=True):
        lines.append(f"| {side.label}: {side.name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    lines.append("| B - A | " + " | ".join(f"{b[c] - a[c]:+.2f}" for c in columns) + " |")
    return "\n".join(lines)


async def run(sides: Sequence[Side], users: int, turns: int, rounds: int, python: str) -> str:
    running: list[Running] = []
    try:
        for side in sides:
            running.append(start(side, python))
        await one_round(running, users, 2)  # warm-up: connections, tokenizers, the caches of each process
        measured = []
        for number in range(rounds):
            figures = await one_round(running, users, turns)
            summary = "; ".join(f"{label} total {row['kefu total']:.2f} ms, TTFT {row['TTFT p50']:.1f}"
                                for label, row in figures.items())
            print(f"round {number}: {summary}", file=sys.stderr, flush=True)
            measured.append(figures)
        return report(sides, measured, users, turns)
    finally:
        for each in running:
            stop(each)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.side_by_side", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="side A: DIR[,KEFU_NAME=VALUE...] (the baseline)")
    parser.add_argument("b", help="side B: DIR[,KEFU_NAME=VALUE...]")
    parser.add_argument("--users", type=int, default=5, help="closed-loop users per side (default 5)")
    parser.add_argument("--turns", type=int, default=40, help="turns per user per round (default 40)")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (default 4)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of both sides (default this one)")
    args = parser.parse_args(argv)
    if min(args.users, args.turns, args.rounds) < 1:
        parser.error("--users, --turns and --rounds must be at least 1")
    try:
        sides = [Side.parse("A", args.a), Side.parse("B", args.b)]
    except ValueError as error:
        parser.error(str(error))
    print(asyncio.run(run(sides, args.users, args.turns, args.rounds, args.python)))


if __name__ == "__main__":
    main()
