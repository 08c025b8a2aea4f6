"""The driver loop's wait for a deadline: a plain sleep by default, sleep-then-yield with
loop_spin_us; the setting is bounded in the config and clamped to half a period."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from armada.drivers.core import process
from armada.drivers.core.process import DriverProcess, _sleep_until
from armada.runtime.config import DriverConfig


@pytest.fixture
def yields(monkeypatch):
    count = {"n": 0}
    real = os.sched_yield

    def counted() -> None:
        count["n"] += 1
        real()

    monkeypatch.setattr(process.os, "sched_yield", counted)
    return count


def test_without_spin_it_only_sleeps_and_never_returns_early(yields):
    for _ in range(20):
        deadline = time.monotonic_ns() + 1_000_000
        _sleep_until(deadline)
        assert time.monotonic_ns() >= deadline
    assert yields["n"] == 0


def test_with_spin_it_yields_until_the_deadline_and_never_returns_early(yields):
    for _ in range(20):
        deadline = time.monotonic_ns() + 1_000_000
        _sleep_until(deadline, 500_000)
        assert time.monotonic_ns() >= deadline
    assert yields["n"] > 20  # each wait ended in a yielding loop, not in the sleep


def test_a_passed_deadline_returns_at_once(yields):
    started = time.monotonic_ns()
    _sleep_until(started - 5_000_000, 300_000)
    assert time.monotonic_ns() - started < 5_000_000 and yields["n"] == 0


@pytest.mark.parametrize("value", [-1.0, 2500.0, float("nan")])
def test_the_config_refuses_a_spin_out_of_range(value):
    with pytest.raises(ValidationError, match="loop_spin_us"):
        DriverConfig(name="arm", embodiment="mock_arm", backend={"kind": "mock"}, state="ipc:///tmp/s",
                     cmd="ipc:///tmp/c", loop_spin_us=value)


def test_a_spin_over_half_the_period_is_clamped():
    def spin(us: float, period_ns: int) -> int:
        return DriverProcess._spin_ns(SimpleNamespace(cfg=SimpleNamespace(loop_spin_us=us, name="arm")), period_ns)

    assert spin(0.0, 2_000_000) == 0
    assert spin(300.0, 2_000_000) == 300_000
    assert spin(1500.0, 2_000_000) == 1_000_000  # 500 Hz: at most 1 ms of each 2 ms tick
