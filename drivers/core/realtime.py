"""Timing internals of the driver's control loop: how it waits for a deadline, when Python's
garbage collector may run, and memory that never pages out. None of this changes what a tick
does; it changes only when the tick starts.

Why each piece (issue 15, measured on a loaded 2-core VM; docs/benchmarks.md has the numbers):

- Waking up. A SCHED_FIFO thread that sleeps to its deadline wakes 50-250 us late on that VM
  (the kernel's wake-up path and the hypervisor, not other processes: FIFO preempts them). So
  a real-time loop sleeps to ``spin_ns`` before the deadline (``Waiter``: the recent wake-ups'
  lateness) and yields the CPU in a loop for the rest (``os.sched_yield`` releases the GIL, so the command thread, the e-stop's path, can still
  take it; under SCHED_FIFO only a task of equal or higher priority runs meanwhile). That costs
  ``spin_ns`` of one core per tick, so it is only done for a real-time loop; a normal-scheduler
  loop sets its timer slack to 1 ns instead (the default 50 us slack is pure lateness).
- Garbage collection. CPython collects the young generation whenever 700 more container objects
  are alive than before, in whichever thread allocates: inside a tick, or in the command thread
  while the loop waits for the GIL. The loop freezes what start-up allocated (a full collection
  then skips it) and disables automatic collection; ``GcGate.maybe_collect`` collects after a
  tick, only when the next deadline is far enough away, the older generations every 10th and
  100th time, as CPython's own thresholds would.
- Memory. ``mlockall`` keeps the process's pages resident, so a tick never waits for a page to
  come back. Only done when the process may lock without limit (CAP_IPC_LOCK or an unlimited
  RLIMIT_MEMLOCK): with MCL_FUTURE under a finite limit, a later allocation past the limit
  would fail, and a driver must not fail for that.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("armada.driver")

_PR_SET_TIMERSLACK = 29
_MCL_CURRENT, _MCL_FUTURE = 1, 2
_CAP_IPC_LOCK = 14

# How much of each period a real-time loop spends yielding before its deadline instead of
# sleeping: the recent wake-ups' 99th-percentile lateness plus a guard, within these bounds.
SPIN_MIN_NS = 50_000
SPIN_GUARD_NS = 50_000
SPIN_MAX_FRACTION = 0.2  # of the period: at 500 Hz at most 0.4 ms of a core per 2 ms tick
SPIN_WINDOW = 500  # wake-ups per estimate (one second at 500 Hz)
# Collect only when the next deadline is at least this far away: a young-generation collection
# of a driver takes tens of microseconds.
GC_SLACK_NS = 1_000_000
GC_YOUNG_THRESHOLD = 700  # CPython's default threshold for generation 0


def set_timer_slack(ns: int = 1) -> bool:
    """The calling thread's timer slack (Linux; 50 us by default for normal-scheduler threads)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def may_lock_all_memory() -> bool:
    """Whether mlockall(MCL_FUTURE) cannot make a later allocation fail: CAP_IPC_LOCK, or no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def lock_memory() -> str:
    """mlockall(MCL_CURRENT | MCL_FUTURE) when that is safe; returns what happened, for the log."""
    if not may_lock_all_memory():
        return "memory not locked: no CAP_IPC_LOCK and RLIMIT_MEMLOCK is finite (LimitMEMLOCK=infinity allows it)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        return f"memory not locked: mlockall failed ({os.strerror(ctypes.get_errno())})"
    return "memory locked (mlockall)"


class Waiter:
    """Waits for each deadline. ``spin=False``: a plain sleep. ``spin=True`` (a real-time loop): a
    sleep to ``spin_ns`` before the deadline, then yields until it; ``spin_ns`` follows how late this
    machine's wake-ups have been (99th percentile over the last ``SPIN_WINDOW``, plus a guard), so
    a quiet machine pays little CPU and a loaded one still starts its ticks on time."""

    def __init__(self, period_ns: int, spin: bool):
        self.spin = spin
        self.max_ns = int(period_ns * SPIN_MAX_FRACTION)
        self.spin_ns = min(SPIN_MIN_NS + SPIN_GUARD_NS, self.max_ns) if spin else 0
        self._late = np.zeros(SPIN_WINDOW, np.int64)  # preallocated: the loop never allocates for this
        self._count = 0

    def wait(self, deadline_ns: int) -> None:
        """Return at ``deadline_ns`` (monotonic), or at once if it has passed."""
        target = deadline_ns - self.spin_ns
        remaining = target - time.monotonic_ns()
        if remaining <= 0:
            return self._yield_until(deadline_ns)
        time.sleep(remaining * 1e-9)
        if self.spin:
            self._late[self._count] = time.monotonic_ns() - target
            self._count += 1
            if self._count == SPIN_WINDOW:
                self._count = 0
                wanted = int(np.percentile(self._late, 99)) + SPIN_GUARD_NS
                self.spin_ns = max(SPIN_MIN_NS, min(wanted, self.max_ns))
        self._yield_until(deadline_ns)

    def _yield_until(self, deadline_ns: int) -> None:
        if self.spin:
            while time.monotonic_ns() < deadline_ns:
                os.sched_yield()  # releases the GIL each turn: the command thread can still take it


@dataclass
class GcGate:
    """Automatic collection off while the loop runs; collections happen at safe points instead."""

    young_threshold: int = GC_YOUNG_THRESHOLD
    slack_ns: int = GC_SLACK_NS
    collections: int = 0
    was_enabled: bool = True

    def __enter__(self) -> "GcGate":
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()  # start-up's objects: never scanned again
        gc.disable()
        return self

    def __exit__(self, *_: object) -> None:
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()

    def maybe_collect(self, now_ns: int, deadline_ns: int) -> None:
        """After a tick: collect if enough objects accumulated and the next deadline is far enough."""
        count = gc.get_count()[0]
        if count < self.young_threshold:
            return
        if deadline_ns - now_ns < self.slack_ns and count < 10 * self.young_threshold:
            return  # wait for a tick with room; a loop that never has any still collects, late
        self.collections += 1
        gc.collect(2 if self.collections % 100 == 0 else 1 if self.collections % 10 == 0 else 0)
