"""The control loop's timing internals (drivers/core/realtime.py): waiting for a deadline, garbage
collection only at safe points, locking memory only when that cannot fail later."""

from __future__ import annotations

import gc
import resource
import time

import pytest

from armada.drivers.core import realtime as rt


@pytest.mark.parametrize("spin", [False, True])
def test_waiter_never_returns_before_the_deadline(spin: bool) -> None:
    period = 1_000_000
    waiter = rt.Waiter(period, spin=spin)
    deadline = time.monotonic_ns() + period
    for _ in range(50):
        waiter.wait(deadline)
        assert time.monotonic_ns() >= deadline
        deadline += period
    waiter.wait(time.monotonic_ns() - period)  # a passed deadline returns at once


def test_spin_follows_the_wake_up_lateness_within_its_bounds() -> None:
    period = 5_000_000  # room for the sleep even on a loaded machine
    waiter = rt.Waiter(period, spin=True)
    assert waiter.spin_ns == rt.SPIN_MIN_NS + rt.SPIN_GUARD_NS
    waiter._late[:] = 10 * period  # as if every wake-up had been very late: capped at the maximum
    waiter._count = rt.SPIN_WINDOW - 1
    waiter.wait(time.monotonic_ns() + period)
    assert waiter.spin_ns == int(period * rt.SPIN_MAX_FRACTION)
    waiter._late[:] = 0  # punctual wake-ups: down to the minimum
    waiter._count = rt.SPIN_WINDOW - 1
    waiter.wait(time.monotonic_ns() + period)
    assert waiter.spin_ns == max(rt.SPIN_MIN_NS, rt.SPIN_GUARD_NS)
    assert rt.Waiter(period, spin=False).spin_ns == 0


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_gc_gate_collects_only_at_safe_points_and_restores_gc() -> None:
    assert gc.isenabled()
    with rt.GcGate() as gate:
        assert not gc.isenabled()
        for _ in range(2 * rt.GC_YOUNG_THRESHOLD):
            _Cycle()  # cyclic garbage: only a collection frees it
        now = time.monotonic_ns()
        gate.maybe_collect(now, now + rt.GC_SLACK_NS // 2)  # no room before the next deadline
        assert gate.collections == 0
        gate.maybe_collect(now, now + 2 * rt.GC_SLACK_NS)
        assert gate.collections == 1
        assert gc.get_count()[0] < rt.GC_YOUNG_THRESHOLD
        for _ in range(11 * rt.GC_YOUNG_THRESHOLD):
            _Cycle()
        gate.maybe_collect(now, now)  # never any room: far past the threshold it collects anyway
        assert gate.collections == 2
    assert gc.isenabled()


def test_memory_is_locked_only_when_no_limit_can_bite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert rt.may_lock_all_memory()
    monkeypatch.setattr(resource, "getrlimit", lambda _: (8 << 20, 8 << 20))
    monkeypatch.setattr(rt.Path, "read_text", lambda self: "Name:\tx\nCapEff:\t0000000000000000\n")
    assert not rt.may_lock_all_memory()
    assert rt.lock_memory().startswith("memory not locked")
    monkeypatch.setattr(rt.Path, "read_text", lambda self: f"CapEff:\t{1 << 14:016x}\n")
    assert rt.may_lock_all_memory()
