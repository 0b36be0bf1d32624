"""One timer task for every connection's deadlines, and one nursery for their
short tasks.

A connection asks for a tick at a time (its session's `ScheduleTick`); the
scheduler keeps one heap for all of them instead of a sleeping task per
connection. A tick may come late or more than once for the same time: the
session re-checks its own deadlines and asks again. The connections' short
tasks (a catch-up read, a recheck: SQL in a worker thread) run in the
scheduler's nursery, instead of a nursery per connection.

Times are wall-clock seconds (`time.time`), because token expiry is.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
import trio.lowlevel

__all__ = ["TICK_CHUNK", "Scheduler", "Ticked"]

TICK_CHUNK = 2000
"""Ticks handled between two checkpoints of the timer task."""


class Ticked(Protocol):
    """What the scheduler calls back."""

    def on_timer(self, now: float) -> None:
        """A tick this object asked for came due (maybe late, maybe twice)."""


class Scheduler:
    """Timers and short tasks of every connection of one daemon."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        """The clock deadlines are on (wall-clock seconds)."""
        self._timers: list[tuple[float, int, Ticked]] = []
        self._seq = itertools.count()
        self._changed = trio.Event()
        self._tasks: trio.Nursery | None = None

    def schedule(self, target: Ticked, at: float) -> None:
        """Call `target.on_timer(now)` at `at` (or soon after)."""
        first = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (at, next(self._seq), target))
        if first is None or at < first:
            self._changed.set()

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Start a connection's short task (`run` must be running). The task must
        not raise, and must check whether its connection is still open after
        each await."""
        if self._tasks is None:
            raise RuntimeError("Scheduler.run is not running")
        self._tasks.start_soon(fn, *args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every deadline and hold the nursery of the short tasks; runs until
        cancelled."""
        try:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                task_status.started()
                await self._run_timers()
        finally:
            self._tasks = None

    async def _run_timers(self) -> None:
        timers = self._timers
        while True:
            self._changed = trio.Event()
            # Deadlines are on the wall clock (token expiry is); sleep on trio's.
            delay = timers[0][0] - self.clock() if timers else float("inf")
            with trio.move_on_after(max(0.0, delay)):
                await self._changed.wait()
            now = self.clock()
            budget = TICK_CHUNK
            while timers and timers[0][0] <= now:
                _, _, target = heapq.heappop(timers)
                target.on_timer(now)
                budget -= 1
                if budget <= 0:
                    budget = TICK_CHUNK
                    await trio.lowlevel.checkpoint()
                    now = self.clock()
