"""A test's event loop closes even when a task swallows the first cancel.

`asyncio.Runner.close` (which pytest-asyncio uses per test) cancels every task once and then waits for
them for ever. Python 3.11's `asyncio.wait_for`, used by nats-py's requests, can swallow a cancel that
arrives together with its reply, so a teardown could hang the whole suite (seen in CI). Here the
leftover tasks are cancelled again until they end, and a task that never does fails the test by name
instead of hanging it."""

from __future__ import annotations

import asyncio
import asyncio.runners

RECANCEL_EVERY_S = 0.25
GIVE_UP_AFTER_S = 10.0


class TasksOutlivedTheTest(RuntimeError):
    pass


def cancel_all_tasks_until_done(loop: asyncio.AbstractEventLoop) -> None:
    to_cancel = asyncio.all_tasks(loop)
    if not to_cancel:
        return

    async def cancel_until_done() -> set[asyncio.Task[object]]:
        pending: set[asyncio.Task[object]] = set(to_cancel)
        for _ in range(int(GIVE_UP_AFTER_S / RECANCEL_EVERY_S)):
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY_S)
            if not pending:
                break
        return pending

    left = loop.run_until_complete(cancel_until_done())
    if left:
        names = ", ".join(sorted(repr(task.get_coro()) for task in left))
        raise TasksOutlivedTheTest(f"{len(left)} task(s) ignored cancellation for {GIVE_UP_AFTER_S:.0f} s: {names}")
    for task in to_cancel:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception during the test loop's shutdown",
                "exception": task.exception(), "task": task})


def install() -> None:
    """Replace the runner's one-shot cancel (looked up as a module global by `Runner.close`)."""
    asyncio.runners._cancel_all_tasks = cancel_all_tasks_until_done  # type: ignore[attr-defined]
