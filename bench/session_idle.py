"""`python -m bench.session_idle`: what open conversations cost the session service while nothing happens (issue 19).

Starts its own nats-server, seeds `--conversations` open conversations straight into JetStream in the
production format (metadata, index entries, one visitor message each, and their idle timers, with
pipelined publishes), then starts `python -m services.session` on it and reports the time until it
serves and the CPU (user + system) of the session process and of nats-server over `--seconds` idle.
`--source DIR` runs the session service from another checkout of the repository (a before/after
comparison: `git archive <commit> | tar -x -C DIR`, with `make proto` or a copy of `kefu/` there).
`--backfill` leaves out the mark of armed timers, so the start includes the one-time backfill (backfill.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

import nats

from bench.proc_stats import live_cpu_seconds, memory_kib
from bench.processes import INTERNAL_TOKEN, bench_work_dir, stop_process, wait_serving
from devtools.devstack.nats_server import start_nats_server
from devtools.devstack.stack import REPO_ROOT, free_port
from services.common.conversation_log import log_subject
from services.session.backfill import MARK_SUBJECT
from services.session.index import index_entries
from services.session.models import ConversationState, SessionMeta, StoredMessage, new_id
from services.session.schedule import TimerLimits, TimerSchedule
from services.session.store import META_SUBJECT_PREFIX, SessionStore, meta_key
from services.session.tokens import CL100K, TokenCounters

INDEX_PREFIX = "$KV.kefu_conversations"
TENANTS = 10
WAIT_S, IDLE_S = 120.0, 600.0
LIMITS = TimerLimits(WAIT_S, IDLE_S, 7 * 24 * 3600.0)


async def seed(url: str, conversations: int, mark_armed: bool, *, statuses: Sequence[str] = ("ai",),
               tenants: int = TENANTS, limits: TimerLimits = LIMITS,
               open_streams: bool = True, first: int = 0, answered: bool = False) -> float:
    """Create the buckets and streams as the service does (unless `open_streams` is off: a running service
    made them), then write conversations `first`..`first + conversations - 1` over `tenants` tenants, each
    tenant's statuses cycling through `statuses`, with the timers each status arms; returns seconds.
    `answered`: each visitor message has the AI's answer after it (a socket joining owes no answer)."""
    nc = await nats.connect(url)
    try:
        counter = TokenCounters(CL100K).default_counter
        schedule = await TimerSchedule.open(nc, limits) if open_streams else TimerSchedule(nc, limits)
        if open_streams:
            await SessionStore.open(nc, counter, max_history=200, max_message_chars=32_000, ttl_s=7 * 24 * 3600.0,
                                    max_bytes=8 << 30)
        js = nc.jetstream()
        started = time.monotonic()
        pending: list[Awaitable[object]] = []
        for n in range(first, first + conversations):
            tenant, session_id, now = f"t{n % tenants}", new_id(), time.time()
            status = statuses[n // tenants % len(statuses)]  # every tenant gets every status
            message = StoredMessage(id=new_id(), role="user", content="您好，我的订单还没到，请帮我查一下。",
                                    created_at=now, tokens=16, encoding=counter.name)
            replies = [StoredMessage(id=new_id(), role="assistant", content="您好，请提供订单号，我马上为您查询。",
                                     created_at=now, tokens=16, encoding=counter.name)] if answered else []
            meta = SessionMeta(tenant, f"visitor-{n}", now, now, message_count=1 + len(replies),
                               user_message_count=1, token_count=16 * (1 + len(replies)),
                               state=ConversationState(status=status, since=now),
                               preview=message.content, preview_seq=1)
            pending += [
                *[await js.publish_async(log_subject(tenant, session_id), stored.to_json(),
                                         headers={"Nats-Msg-Id": stored.id}) for stored in (message, *replies)],
                # Status and visitor entries, and a waiting conversation's queue marker, as the index writes them.
                *[await js.publish_async(f"{INDEX_PREFIX}.{key}", value)
                  for key, value in index_entries(tenant, session_id, meta)],
                await js.publish_async(f"{META_SUBJECT_PREFIX}.{meta_key(tenant, session_id)}", meta.to_json()),
            ]
            pending.append(asyncio.ensure_future(schedule.changed(tenant, session_id, meta)))
            if len(pending) >= 4000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        if mark_armed:
            # As a store whose timers were always schedules: the one-time backfill has nothing to do.
            await js.publish(MARK_SUBJECT, str(conversations).encode())
        return time.monotonic() - started
    finally:
        await nc.close()


def start_session(source: Path, url: str, log_path: Path) -> tuple[subprocess.Popen[bytes], float]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    env.update({"KEFU_SESSION_PORT": str(port), "KEFU_SESSION_METRICS_PORT": str(free_port()),
                "KEFU_BIND_HOST": "127.0.0.1", "KEFU_LOG_LEVEL": "WARNING", "KEFU_NATS_URL": url,
                "KEFU_INTERNAL_TOKEN": INTERNAL_TOKEN, "KEFU_HANDOFF_WAIT_S": str(WAIT_S),
                "KEFU_IDLE_CLOSE_S": str(IDLE_S), "PYTHONPATH": str(source)})
    started = time.monotonic()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "services.session"], cwd=source, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    wait_serving(process, port, "session", log_path)
    return process, time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="checkout to run the session service from")
    parser.add_argument("--backfill", action="store_true",
                        help="leave the store unmarked: the session arms every stored conversation's timers at start")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    with bench_work_dir("kefu-session-idle-", args.keep_logs) as work:
        nats_server = start_nats_server(work.path / "nats")
        try:
            seed_s = asyncio.run(seed(nats_server.url, args.conversations, not args.backfill))
            session, ready_s = start_session(args.source.resolve(), nats_server.url, work.path / "session.log")
            try:
                time.sleep(5.0)  # past start-up: measure the steady idle state
                pids = {"session": session.pid, "nats-server": nats_server.process.pid}
                before = {name: live_cpu_seconds(pid) for name, pid in pids.items()}
                time.sleep(args.seconds)
                used = {name: live_cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                rss = {name: memory_kib(pid)["VmRSS"] // 1024 for name, pid in pids.items()}
            finally:
                stop_process(session)
        finally:
            nats_server.stop()
    print(json.dumps({
        "source": str(args.source), "conversations": args.conversations, "seed_s": round(seed_s, 1),
        "ready_s": round(ready_s, 2), "idle_seconds": args.seconds,
        "cpu_percent_of_a_core": {name: round(100 * value / args.seconds, 2) for name, value in used.items()},
        "rss_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
