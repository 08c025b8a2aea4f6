"""Following error: a device that stops obeying faults the driver, whatever its SDK reports."""

from __future__ import annotations

import numpy as np
import pytest

from armada.drivers.core.backend import Reading
from armada.drivers.core.driver import Driver, Mode, following_error_bounds
from armada.drivers.mock.arm import MockArm
from armada.runtime.config import load_embodiment
from armada.runtime.protocol import MessageFactory

EMB = load_embodiment("mock_arm")
DT_NS = int(1e9 / EMB.control_rate_hz)
F = MessageFactory()


class DisobedientArm(MockArm):
    """Reports success for every write; from ``freeze`` on, its joints (or some) stop moving."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.frozen: np.ndarray | None = None  # mask of joints that stopped obeying
        self.frozen_at: np.ndarray | None = None
        self.on_fault_reasons: list[str] = []

    def freeze(self, mask: np.ndarray) -> None:
        self.frozen, self.frozen_at = mask, super().read().position.copy()

    def read(self) -> Reading:
        r = super().read()
        if self.frozen is None:
            return r
        return Reading(np.where(self.frozen, self.frozen_at, r.position), r.mono_ns)

    def on_fault(self, reason: str) -> None:
        self.on_fault_reasons.append(reason)


def running(arm: MockArm) -> tuple[Driver, str, int]:
    d = Driver(EMB, arm, lease_ttl_s=10.0)
    d.connect(1.0)
    lease = d.handle(F.make("acquire", client="t"), 0)["lease"]
    d.handle(F.make("arm", lease=lease), 0)
    t = np.arange(1, 3001) * 0.002
    pts = EMB.home + np.outer(np.sin(2 * np.pi * 0.5 * t) * 0.8, np.r_[1, 0, 0, 0, 0, 0, 0])
    d.handle(F.make("trajectory", lease=lease, t0_ns=0, dt=0.002, points=pts), 0)
    return d, lease, 0


def tick_for(d: Driver, now: int, seconds: float) -> int:
    for _ in range(int(seconds * 1e9 / DT_NS)):
        now += DT_NS
        d.tick(now)
    return now


def test_arm_joints_are_checked_and_the_gripper_is_not_by_default():
    bounds = following_error_bounds(EMB)
    assert np.all(bounds[:6] == EMB.following_error.max_error) and np.isinf(bounds[6])


def test_an_obeying_arm_never_trips_it():
    # The mock's own lag runs on the host clock, not this test's; tests/hil/test_episode.py covers
    # the cell's configured lag and latency in real time.
    d, _, now = running(MockArm(EMB.home, time_constant_s=0.0))
    tick_for(d, now, 4.0)
    assert d.mode in (Mode.RUNNING, Mode.ARMED)


def test_a_joint_that_stops_obeying_faults_with_its_name_and_error():
    arm = DisobedientArm(EMB.home, time_constant_s=0.0)
    d, _, now = running(arm)
    now = tick_for(d, now, 0.2)
    arm.freeze(np.array([True, False, False, False, False, False, False]))
    now = tick_for(d, now, 0.2)  # the error grows past 0.15 rad, but not for 0.25 s yet
    assert d.mode == Mode.RUNNING
    now = tick_for(d, now, 0.6)
    assert d.mode == Mode.FAULT
    assert "following error: joint shoulder_pan" in d.reason and "bound 0.1" in d.reason
    assert arm.on_fault_reasons == [d.reason]  # the backend was told, so nothing recovers on its own
    writes = arm.writes
    tick_for(d, now, 0.1)
    assert arm.writes == writes  # faulted: nothing more is sent


def test_a_short_excursion_does_not_fault():
    arm = DisobedientArm(EMB.home, time_constant_s=0.0)
    d, _, now = running(arm)
    now = tick_for(d, now, 0.3)
    arm.freeze(np.r_[np.ones(6, bool), False])
    now = tick_for(d, now, 0.2)
    arm.frozen = None  # obeys again before max_time_s
    tick_for(d, now, 1.0)
    assert d.mode == Mode.RUNNING


@pytest.mark.parametrize("mode", ["estop", "idle"])
def test_not_checked_when_not_commanding(mode):
    arm = DisobedientArm(EMB.home, time_constant_s=0.0)
    d = Driver(EMB, arm, lease_ttl_s=10.0)
    d.connect(1.0)
    arm.freeze(np.ones(7, bool))
    arm.frozen_at = arm.frozen_at + 1.0  # far from anything, but nothing is commanded
    if mode == "estop":
        d.handle(F.make("estop"), 0)
    tick_for(d, 0, 1.0)
    assert d.mode == (Mode.ESTOP if mode == "estop" else Mode.IDLE)


def test_the_bound_grows_with_commanded_speed_by_the_configured_lag():
    """An arm that runs 0.1 s behind its commands (servoJ's lookahead) is obeying when the
    embodiment says so (`lag_s`); with no lag allowance the same tracking is a fault."""

    class DelayedArm(MockArm):
        """Measures exactly what was commanded 50 ticks (0.1 s at 500 Hz) earlier."""

        def __init__(self, initial: np.ndarray):
            super().__init__(initial, time_constant_s=0.0)
            self.history = [np.array(initial, dtype=float)] * 50

        def write(self, position: np.ndarray) -> None:
            super().write(position)
            self.history.append(np.array(position, dtype=float))

        def read(self) -> Reading:
            return Reading(self.history[-50].copy(), super().read().mono_ns)

    def laggy_run(lag_s: float) -> Driver:
        emb = EMB.model_copy(update={"following_error": EMB.following_error.model_copy(
            update={"lag_s": lag_s, "max_error": 0.05})})
        d = Driver(emb, DelayedArm(emb.home), lease_ttl_s=10.0)
        d.connect(1.0)
        lease = d.handle(F.make("acquire", client="t"), 0)["lease"]
        d.handle(F.make("arm", lease=lease), 0)
        t = np.arange(1, 1001) * 0.002
        pts = emb.home + np.outer(t * 1.0, np.r_[1, 0, 0, 0, 0, 0, 0])  # 1 rad/s on joint 0: 0.1 rad behind
        d.handle(F.make("trajectory", lease=lease, t0_ns=0, dt=0.002, points=pts), 0)
        tick_for(d, 0, 1.5)
        return d

    assert laggy_run(0.0).mode == Mode.FAULT
    assert laggy_run(0.15).mode in (Mode.RUNNING, Mode.ARMED)
