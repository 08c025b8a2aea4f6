"""The driver state machine and tick logic, without sockets: explicit clock, mock device."""

from __future__ import annotations

import numpy as np
import pytest

from armada.drivers.core.backend import BackendError, Reading
from armada.drivers.core.driver import Driver, Mode
from armada.drivers.mock.arm import MockArm
from armada.runtime.config import load_embodiment
from armada.runtime.protocol import ErrorCode, MessageFactory, ProtocolError

EMB = load_embodiment("mock_arm")
DT_NS = int(1e9 / EMB.control_rate_hz)
F = MessageFactory()


class FlakyArm(MockArm):
    """A mock arm whose reads can be made to fail or to return garbage."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.fail_reads = False
        self.nan_reads = False

    def read(self) -> Reading:
        if self.fail_reads:
            raise BackendError("bus timeout")
        r = super().read()
        if self.nan_reads:
            return Reading(np.full_like(r.position, np.nan), r.mono_ns)
        return r


@pytest.fixture
def drv():
    d = Driver(EMB, FlakyArm(EMB.home, time_constant_s=0.0), lease_ttl_s=0.3)
    d.connect(1.0)
    return d


def cmd(d: Driver, kind: str, now: int, **fields):
    return d.handle(F.make(kind, **fields), now)


def armed(d: Driver, now: int = 0) -> str:
    lease = cmd(d, "acquire", now, client="t")["lease"]
    cmd(d, "arm", now, lease=lease)
    return lease


def run_ticks(d: Driver, start: int, n: int, lease: str | None = None) -> int:
    now = start
    for _ in range(n):
        now += DT_NS
        if lease is not None:
            cmd(d, "heartbeat", now, lease=lease)
        d.tick(now)
    return now


def test_starts_disarmed_and_never_writes_while_idle(drv):
    assert drv.mode == Mode.IDLE
    run_ticks(drv, 0, 50)
    assert drv.backend.writes == 0


def test_arming_needs_the_lease_and_holds_the_current_pose(drv):
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "arm", 0, lease="nope")
    assert err.value.code == ErrorCode.NO_LEASE
    lease = armed(drv)
    assert drv.mode == Mode.ARMED
    run_ticks(drv, 0, 20, lease)
    assert np.allclose(drv.filter.position, EMB.home)
    assert np.allclose(drv.filter.velocity, 0.0)


def test_motion_commands_are_refused_when_idle(drv):
    lease = cmd(drv, "acquire", 0, client="t")["lease"]
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.01, points=np.tile(EMB.home, (3, 1)))
    assert err.value.code == ErrorCode.BAD_STATE and "arm it first" in err.value.reason


def test_running_dry_without_final_counts_starvation_and_holds(drv):
    lease = armed(drv)
    pts = np.tile(EMB.home, (5, 1))
    cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.002, points=pts, final=False)
    now = run_ticks(drv, 0, 20, lease)
    assert drv.mode == Mode.RUNNING
    assert drv.counters.starved_ticks >= 10
    cmd(drv, "trajectory", now, lease=lease, t0_ns=now, dt=0.002, points=pts, final=True)
    run_ticks(drv, now, 20, lease)
    assert drv.mode == Mode.ARMED


def test_lease_lapse_while_running_decelerates_to_a_hold(drv):
    lease = armed(drv)
    t = np.arange(1, 2001) * 0.002
    pts = EMB.home + np.outer(np.sin(2 * np.pi * 0.5 * t) * 0.5, np.r_[np.ones(6), 0])
    cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.002, points=pts)
    now = run_ticks(drv, 0, 200, lease)  # moving now
    assert np.any(np.abs(drv.filter.velocity) > 0.1)
    speeds = []
    for _ in range(400):  # no more heartbeats
        now += DT_NS
        drv.tick(now)
        speeds.append(np.max(np.abs(drv.filter.velocity)))
    assert drv.mode == Mode.ARMED
    assert drv.counters.lease_lost == 1
    assert speeds[-1] == 0.0
    lapsed_at = int(0.3e9 / DT_NS)
    decel = np.diff(speeds[lapsed_at:])
    assert np.all(decel <= 1e-12)  # monotone slow-down after the lapse, no further following


def test_device_estop_latches_and_stops_writes(drv):
    lease = armed(drv)
    now = run_ticks(drv, 0, 5, lease)
    drv.backend.button_pressed = True
    now = run_ticks(drv, now, 1, lease)
    assert drv.mode == Mode.ESTOP
    writes = drv.backend.writes
    drv.backend.button_pressed = False
    now = run_ticks(drv, now, 50, lease)
    assert drv.mode == Mode.ESTOP and drv.backend.writes == writes
    cmd(drv, "reset_estop", now, lease=lease)
    assert drv.mode == Mode.IDLE


def test_one_bad_read_does_not_fault_a_dead_bus_does(drv):
    lease = armed(drv)
    now = run_ticks(drv, 0, 5, lease)
    drv.backend.fail_reads = True
    now = run_ticks(drv, now, 3, lease)
    assert drv.mode == Mode.ARMED and drv.counters.read_errors == 3
    drv.backend.fail_reads = False
    now = run_ticks(drv, now, 3, lease)
    drv.backend.fail_reads = True
    now = run_ticks(drv, now, 100, lease)  # 0.2 s of silence
    assert drv.mode == Mode.FAULT and "bus timeout" in drv.reason
    with pytest.raises(ProtocolError):
        cmd(drv, "clear_fault", now, lease=lease)  # still failing
    drv.backend.fail_reads = False
    cmd(drv, "clear_fault", now, lease=lease)
    assert drv.mode == Mode.IDLE


def test_refuses_to_arm_outside_the_range(drv):
    outside = EMB.home.copy()
    outside[2] = EMB.upper[2] - EMB.position_margin / 2
    d = Driver(EMB, MockArm(outside, time_constant_s=0.0), lease_ttl_s=0.3)
    d.connect(1.0)
    lease = cmd(d, "acquire", 0, client="t")["lease"]
    with pytest.raises(ProtocolError) as err:
        cmd(d, "arm", 0, lease=lease)
    assert "elbow" in err.value.reason and d.mode == Mode.IDLE


def test_disarm_while_running_stops_first_then_goes_idle(drv):
    lease = armed(drv)
    t = np.arange(1, 1001) * 0.002
    pts = EMB.home + np.outer(t * 0.5, np.r_[1, np.zeros(6)])
    cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.002, points=pts)
    now = run_ticks(drv, 0, 100, lease)
    cmd(drv, "disarm", now, lease=lease)
    assert drv.mode == Mode.ARMED  # decelerating
    run_ticks(drv, now, 200, lease)
    assert drv.mode == Mode.IDLE and np.all(drv.filter.velocity == 0)


def test_chunk_entirely_in_the_past_is_refused(drv):
    now = 10 * 10**9
    lease = armed(drv, now)
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "trajectory", now, lease=lease, t0_ns=now - 10**9, dt=0.01, points=np.tile(EMB.home, (5, 1)))
    assert err.value.code == ErrorCode.LATE and "past" in err.value.reason


def test_device_estop_cannot_be_reset_while_the_button_is_pressed(drv):
    lease = armed(drv)
    drv.backend.button_pressed = True
    now = run_ticks(drv, 0, 2, lease)
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "reset_estop", now, lease=lease)
    assert err.value.code == ErrorCode.ESTOPPED and drv.mode == Mode.ESTOP


def test_non_finite_readings_are_read_errors_not_a_crash(drv):
    lease = armed(drv)
    now = run_ticks(drv, 0, 5, lease)
    drv.backend.nan_reads = True
    now = run_ticks(drv, now, 3, lease)  # must not raise
    assert drv.counters.read_errors == 3 and drv.mode == Mode.ARMED
    assert np.all(np.isfinite(drv.filter.position))
    now = run_ticks(drv, now, 100, lease)
    assert drv.mode == Mode.FAULT


def test_new_chunk_starts_from_the_held_pose_without_a_step(drv):
    lease = armed(drv)
    now = run_ticks(drv, 0, 5, lease)
    # A chunk stamped in the past whose point at "now" is 5 mrad away: the driver must ramp from
    # the held pose, never step onto the chunk.
    pts = EMB.home + np.outer(np.linspace(0.005, 0.05, 10), np.r_[np.ones(6), 0])
    cmd(drv, "trajectory", now, lease=lease, t0_ns=now - 5 * DT_NS, dt=0.01, points=pts)
    first = drv.tick(now + DT_NS).commanded
    assert np.max(np.abs(first - EMB.home)) < 0.005 / 2


class SlowStartArm(MockArm):
    """The first reads after connect fail: transiently (a busy worker), or for good."""

    def __init__(self, *a, failures: int, transient: bool, **kw):
        super().__init__(*a, **kw)
        self.failures, self.transient = failures, transient

    def read(self) -> Reading:
        if self.failures > 0:
            self.failures -= 1
            raise BackendError("late answer", transient=self.transient)
        return super().read()


def test_connect_retries_a_transient_first_read_within_its_deadline():
    d = Driver(EMB, SlowStartArm(EMB.home, failures=3, transient=True), lease_ttl_s=0.3)
    d.connect(1.0)
    assert d.mode == Mode.IDLE and np.allclose(d.last_reading.position, EMB.home)


def test_connect_gives_up_on_a_lasting_or_permanent_read_failure():
    with pytest.raises(BackendError, match="late answer"):
        Driver(EMB, SlowStartArm(EMB.home, failures=10**6, transient=True), lease_ttl_s=0.3).connect(0.1)
    with pytest.raises(BackendError, match="late answer"):
        Driver(EMB, SlowStartArm(EMB.home, failures=1, transient=False), lease_ttl_s=0.3).connect(1.0)


# ---------------------------------------------------------------- issue 9: the core's stop path


def test_estop_latch_survives_a_restart_and_reset_removes_it(tmp_path):
    latch = tmp_path / "arm.estop"
    d = Driver(EMB, MockArm(EMB.home, time_constant_s=0.0), lease_ttl_s=0.3, latch_path=latch)
    d.connect(1.0)
    cmd(d, "estop", 0, reason="operator saw smoke")
    assert latch.exists() and (latch.stat().st_mode & 0o777) == 0o600
    # The process dies; its supervisor starts a new one on the same run dir.
    arm = MockArm(EMB.home, time_constant_s=0.0)
    again = Driver(EMB, arm, lease_ttl_s=0.3, latch_path=latch)
    again.connect(1.0)
    assert again.mode == Mode.ESTOP and "latched before restart" in again.reason
    assert "operator saw smoke" in again.reason and arm._halted  # the device was stopped too
    twice = Driver(EMB, MockArm(EMB.home, time_constant_s=0.0), lease_ttl_s=0.3, latch_path=latch)
    twice.connect(1.0)  # a second restart says it once, not "latched before restart" twice
    assert twice.reason.count("latched before restart") == 1
    lease = cmd(again, "acquire", 0, client="t")["lease"]
    with pytest.raises(ProtocolError) as err:
        cmd(again, "arm", 0, lease=lease)
    assert err.value.code == ErrorCode.ESTOPPED
    cmd(again, "reset_estop", 0, lease=lease)
    assert again.mode == Mode.IDLE and not latch.exists()
    third = Driver(EMB, MockArm(EMB.home, time_constant_s=0.0), lease_ttl_s=0.3, latch_path=latch)
    third.connect(1.0)
    assert third.mode == Mode.IDLE


def test_an_unreadable_latch_file_still_latches(tmp_path):
    latch = tmp_path / "arm.estop"
    latch.write_bytes(b"\xff garbage")
    d = Driver(EMB, MockArm(EMB.home, time_constant_s=0.0), lease_ttl_s=0.3, latch_path=latch)
    d.connect(1.0)
    assert d.mode == Mode.ESTOP and "unreadable" in d.reason


def test_move_to_with_a_tiny_velocity_is_refused_at_once_naming_the_duration(drv):
    lease = armed(drv)
    target = EMB.home + np.r_[1.0, np.zeros(6)]
    for v in (1e-4, 2e-3):  # below the floor; above it but far too slow
        with pytest.raises(ProtocolError) as err:
            cmd(drv, "move_to", 0, lease=lease, target=target, max_velocity=v)
        assert err.value.code == ErrorCode.BAD_VALUE
    assert "500 s" in err.value.reason and "longer than" in err.value.reason
    assert drv.mode == Mode.ARMED and len(drv.buffer) == 0
    reply = cmd(drv, "move_to", 0, lease=lease, target=target, max_velocity=0.1)
    assert 10 < reply["duration_s"] < 12 and drv.mode == Mode.RUNNING


def test_move_to_is_planned_outside_and_rechecked_when_swapped_in(drv):
    lease = armed(drv)
    job = drv.start(F.make("move_to", lease=lease, target=EMB.home + np.r_[0.3 * np.ones(6), 0]), 0)
    points = job.run()  # outside the lock; meanwhile the operator presses the e-stop
    cmd(drv, "estop", 0)
    with pytest.raises(ProtocolError) as err:
        drv.finish(job, points, DT_NS)
    assert err.value.code == ErrorCode.ESTOPPED and len(drv.buffer) == 0


def test_a_move_to_that_completes_renews_its_holders_lease_and_one_that_outlived_it_is_refused(drv):
    # The holder waits for the move_to reply on its one connection and cannot heartbeat meanwhile.
    lease = armed(drv)
    goal = EMB.home + np.r_[0.3 * np.ones(6), 0]
    job = drv.start(F.make("move_to", lease=lease, target=goal), 0)
    done = int(0.25e9)  # planned and swapped in just inside the 0.3 s TTL
    drv.finish(job, job.run(), done)
    cmd(drv, "heartbeat", done + int(0.29e9), lease=lease)  # renewed at `done`, not at the request
    job = drv.start(F.make("move_to", lease=lease, target=EMB.home), done + int(0.29e9))
    with pytest.raises(ProtocolError) as err:
        drv.finish(job, job.run(), done + int(0.29e9) + int(0.31e9))  # lapsed while planned
    assert err.value.code == ErrorCode.NO_LEASE


class RecoveringArm(FlakyArm):
    """recover() is where the test decides what happens meanwhile (it runs outside the lock)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.during_recover = lambda: None
        self.estops = 0

    def recover(self, timeout_s: float) -> None:
        self.during_recover()

    def estop(self) -> None:
        self.estops += 1
        super().estop()


def test_estop_during_a_recovery_latches_at_once_and_reaches_the_device_after(drv):
    arm = RecoveringArm(EMB.home, time_constant_s=0.0)
    d = Driver(EMB, arm, lease_ttl_s=10.0)
    d.connect(1.0)
    lease = armed(d)
    arm.fail_reads = True
    now = run_ticks(d, 0, 100)
    assert d.mode == Mode.FAULT
    arm.fail_reads = False
    job = d.start(F.make("clear_fault", lease=lease), now)
    assert d.recovering
    reads = []
    arm.read = lambda: reads.append(1) or FlakyArm.read(arm)  # the loop must leave the device alone
    run_ticks(d, now, 20)
    assert reads == []
    d.estop("operator")  # the command thread, while the recovery runs
    assert d.mode == Mode.ESTOP and arm.estops == 0  # latched; the device still belongs to recover
    with pytest.raises(ProtocolError) as err:
        cmd(d, "reset_estop", now, lease=lease)  # not while the recovery owns the device
    assert "still running" in err.value.reason and d.mode == Mode.ESTOP
    result = job.run()
    with pytest.raises(ProtocolError) as err:
        d.finish(job, result, now)
    assert err.value.code == ErrorCode.ESTOPPED and arm.estops == 1 and not d.recovering


def test_a_recovery_that_succeeds_is_swapped_in_idle(drv):
    arm = RecoveringArm(EMB.home, time_constant_s=0.0)
    d = Driver(EMB, arm, lease_ttl_s=10.0)
    d.connect(1.0)
    lease = armed(d)
    arm.fail_reads = True
    now = run_ticks(d, 0, 100)
    arm.fail_reads = False
    job = d.start(F.make("clear_fault", lease=lease), now)
    assert d.finish(job, job.run(), now) == {"mode": "idle"} and not d.recovering


def test_reasons_print_huge_numbers_briefly(drv):
    lease = armed(drv)
    far = EMB.home.copy()
    far[0] = 1e300
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "move_to", 0, lease=lease, target=far)
    assert "1e+300" in err.value.reason and len(err.value.reason) < 300
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "servo", 0, lease=lease, target=far)
    assert err.value.code == ErrorCode.TOO_FAR and len(err.value.reason) < 300


class FaultReportingArm(FlakyArm):
    def on_fault(self, reason: str) -> None:
        raise BackendError("worker did not stop")


def test_a_failing_on_fault_is_noted_not_raised():
    d = Driver(EMB, FaultReportingArm(EMB.home, time_constant_s=0.0), lease_ttl_s=10.0)
    d.connect(1.0)
    armed(d)
    d.backend.fail_reads = True
    run_ticks(d, 0, 100)
    assert d.mode == Mode.FAULT and "worker did not stop" in d.reason and "bus timeout" in d.reason


def test_a_long_move_is_swapped_in_with_a_bounded_number_of_points_and_keeps_its_cap():
    # The swap into the buffer runs under the loop's lock: its cost must not grow with the move.
    d = Driver(EMB, MockArm(EMB.home, time_constant_s=0.0), lease_ttl_s=1e6)
    d.connect(1.0)
    lease = armed(d)
    target = EMB.home + np.r_[1.0, np.zeros(6)]
    reply = cmd(d, "move_to", 0, lease=lease, target=target, max_velocity=0.01)
    assert 100 < reply["duration_s"] < 110 and len(d.buffer) <= 2001
    now, fastest = 0, 0.0
    for _ in range(int(reply["duration_s"] * 500) + 100):
        now += DT_NS
        fastest = max(fastest, abs(d.tick(now).velocity[0]))
    assert fastest <= 0.01 and d.mode == Mode.ARMED and d.filter.position[0] == target[0]


def test_servo_faster_than_its_interpolation_follows_without_drifting():
    """A servo stream at an irregular 50-100 Hz, each target arriving before the last one's 20 ms
    interpolation ended, follows a moving leader. When every servo restarted from the filter's
    (lagging) pose, the reference jumped back at every command, the filter rang and drifted past
    the leader's range until a target was refused as TOO_FAR (a 200 Hz arm, 1 rad/s, 4 rad/s^2)."""
    from tests.unit.test_modes import mobile_emb

    emb = mobile_emb(200.0)
    emb = emb.model_copy(update={"groups": emb.groups[:3]})  # arm, gripper, lift: no base
    d = Driver(emb, MockArm(emb.home, time_constant_s=0.0), lease_ttl_s=5.0)
    d.connect(1.0)
    lease = armed(d)
    rng = np.random.default_rng(1)
    amplitude = np.r_[0.1, -0.1, 0.0, 0.0]
    next_cmd, worst, period = 0, 0.0, int(1e9 / emb.control_rate_hz)
    for k in range(1000):  # 5 s
        now = k * period
        while next_cmd <= now:
            target = emb.home + amplitude * np.sin(2 * np.pi * 0.5 * next_cmd * 1e-9)
            cmd(d, "servo", next_cmd, lease=lease, target=target)
            next_cmd += int(rng.uniform(10e6, 20e6))
        r = d.tick(now)
        worst = max(worst, float(np.max(np.abs(r.commanded - emb.home))))
    assert worst <= 0.1 * 1.02


def test_a_servo_right_after_rearming_starts_from_the_held_pose(drv):
    """The servo's start (the target followed last tick) is forgotten when the driver stops
    following: an e-stop mid-move, reset and arm, then a servo before any tick starts from the pose."""
    lease = armed(drv)
    far = EMB.home.copy()
    far[0] += 0.15
    cmd(drv, "servo", 0, lease=lease, target=far)
    now = run_ticks(drv, 0, 3, lease)  # moving toward it
    cmd(drv, "estop", now, reason="t")
    cmd(drv, "reset_estop", now, lease=lease)
    cmd(drv, "arm", now, lease=lease)
    held = drv.filter.position
    cmd(drv, "servo", now, lease=lease, target=held)
    assert drv._followed is None
    assert np.array_equal(drv.buffer.first_point_at_or_after(now), held)
