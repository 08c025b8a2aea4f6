"""The driver with a base-velocity group (arm, gripper, lift, base): holds and finals stop the base,
stale base commands ramp to zero, the lease loss ramps the base and holds the rest, move_to and the
engage checks leave the base alone, servo per group. Explicit clock, mock device."""

from __future__ import annotations

import numpy as np
import pytest

from armada.drivers.core.driver import Driver, Mode
from armada.drivers.core.modes import GroupedFilter
from armada.drivers.mock.arm import MockArm
from armada.runtime.protocol import ErrorCode, MessageFactory, ProtocolError, validate

from tests.unit.test_modes import mobile_emb

EMB = mobile_emb(200.0)
DT_NS = int(1e9 / EMB.control_rate_hz)
BASE = slice(4, 7)
ARM = slice(0, 2)
HOME = EMB.home
TIMEOUT_TICKS = 50  # 0.25 s at 200 Hz
STOP_TICKS = 300  # 1.5 s: a base at full speed ramps to zero in about 0.7 s
F = MessageFactory()


@pytest.fixture
def drv():
    d = Driver(EMB, MockArm(HOME, time_constant_s=0.0), lease_ttl_s=0.3)
    d.connect(1.0)
    return d


def cmd(d: Driver, kind: str, now: int, **fields):
    return d.handle(validate(F.make(kind, **fields)), now)


def armed(d: Driver, now: int = 0) -> str:
    lease = cmd(d, "acquire", now, client="t")["lease"]
    cmd(d, "arm", now, lease=lease)
    return lease


def run_ticks(d: Driver, start: int, n: int, lease: str | None = None) -> tuple[int, np.ndarray]:
    """Tick ``n`` times; returns the time and the commanded vectors."""
    now, out = start, []
    for _ in range(n):
        now += DT_NS
        if lease is not None:
            cmd(d, "heartbeat", now, lease=lease)
        out.append(d.tick(now).commanded)
    return now, np.array(out)


def test_a_robot_with_a_base_gets_the_grouped_filter(drv):
    assert isinstance(drv.filter, GroupedFilter)
    assert list(np.flatnonzero(drv.base)) == [4, 5, 6]


def test_a_trajectory_drives_arm_lift_and_base_and_its_end_stops_the_base(drv):
    lease = armed(drv)
    n = 100  # 0.5 s at 50 Hz points
    pts = np.tile(HOME, (n, 1))
    pts[:, 0] = np.linspace(0.0, 0.3, n)
    pts[:, 3] = np.linspace(0.0, 0.02, n)  # the lift rises 2 cm
    pts[:, BASE] = [0.1, -0.05, 0.2]
    cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.02, points=pts, final=True)
    now, out = run_ticks(drv, 0, 150, lease)
    assert np.allclose(out[-1, BASE], [0.1, -0.05, 0.2])  # tracking the chunk's base velocities
    assert out[-1, 3] > 0.005
    now, out = run_ticks(drv, now, 400, lease)
    assert drv.mode == Mode.ARMED
    assert np.all(out[-1, BASE] == 0.0)  # the trajectory ended: the base stopped
    assert out[-1, 0] == pytest.approx(0.3) and out[-1, 3] == pytest.approx(0.02)
    assert drv.filter.counters.stale == 0  # stopped because the trajectory ended, not from staleness


def test_a_base_servo_is_followed_until_stale_then_ramps_to_zero(drv):
    lease = armed(drv)
    cmd(drv, "servo", 0, lease=lease, group="base", target=np.array([0.15, 0.0, -0.3]))
    now, out = run_ticks(drv, 0, 4 + TIMEOUT_TICKS - 5, lease)  # the 20 ms interpolation, then the timeout
    assert np.any(out[-1, BASE] != 0.0) and drv.filter.counters.stale == 0
    assert np.all(out[:, ARM] == HOME[ARM])  # the arms keep their targets
    now, out = run_ticks(drv, now, STOP_TICKS, lease)
    assert np.all(out[-1, BASE] == 0.0) and drv.filter.counters.stale > 0
    # A gamepad that keeps sending (here every 0.1 s) keeps the base going.
    for _ in range(10):
        cmd(drv, "servo", now, lease=lease, group="base", target=np.array([0.15, 0.0, -0.3]))
        now, out = run_ticks(drv, now, 20, lease)
    stale = drv.filter.counters.stale
    assert out[-1, 4] == pytest.approx(0.15) and out[-1, 6] == pytest.approx(-0.3)
    assert drv.filter.counters.stale == stale


def test_arm_servos_do_not_keep_a_quiet_base_going(drv):
    """Teleop: leaders drive the arm by servo while the gamepad drives the base. When the gamepad
    goes quiet, the arm servos must not renew the base's last velocity."""
    lease = armed(drv)
    now = 0
    for _ in range(10):  # the gamepad sends every 0.1 s: the base reaches 0.2 m/s
        cmd(drv, "servo", now, lease=lease, group="base", target=np.array([0.2, 0.0, 0.0]))
        now, _ = run_ticks(drv, now, 20, lease)
    arm = HOME[ARM].copy()
    for k in range(120):  # 0.6 s of arm servo at 200 Hz, the base untouched
        arm[0] = 0.001 * k
        cmd(drv, "servo", now, lease=lease, group="arm", target=arm.copy())
        now, out = run_ticks(drv, now, 1, lease)
        if k == 0:
            assert out[-1, 4] == pytest.approx(0.2)  # the base kept its target
    now, out = run_ticks(drv, now, STOP_TICKS, lease)
    assert np.all(out[-1, BASE] == 0.0) and drv.filter.counters.stale > 0
    assert out[-1, 0] == pytest.approx(0.119, abs=1e-6)  # the arm reached its last servo target


def test_losing_the_lease_ramps_the_base_to_zero_and_holds_the_arm_and_lift(drv):
    lease = armed(drv)
    n = 500
    pts = np.tile(HOME, (n, 1))
    pts[:, 0] = np.linspace(0.0, 1.0, n)
    pts[:, 3] = np.linspace(0.0, 0.2, n)
    pts[:, BASE] = [0.2, 0.1, 0.4]
    cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.01, points=pts)
    now, _ = run_ticks(drv, 0, 200, lease)
    _, out = run_ticks(drv, now, 600)  # no more heartbeats: the lease lapses after 0.3 s
    assert drv.mode == Mode.ARMED and drv.counters.lease_lost == 1
    assert np.all(out[-1, BASE] == 0.0) and not np.any(drv.filter.velocity)
    speeds = np.abs(out[:, BASE])
    lapsed = int(0.3e9 / DT_NS)
    assert np.all(np.diff(speeds[lapsed:], axis=0) <= 1e-12)  # the base only slows down
    assert np.all(out[-100:, :4] == out[-1, :4])  # arm, gripper and lift hold where they stopped


def test_disarm_waits_for_the_base_to_stop(drv):
    lease = armed(drv)
    cmd(drv, "servo", 0, lease=lease, group="base", target=np.array([0.2, 0.2, 0.45]))
    now, _ = run_ticks(drv, 0, 40, lease)
    cmd(drv, "disarm", now, lease=lease)
    now, _ = run_ticks(drv, now, 2, lease)
    assert drv.mode == Mode.ARMED and np.any(drv.filter.velocity)
    run_ticks(drv, now, STOP_TICKS, lease)
    assert drv.mode == Mode.IDLE


def test_move_to_moves_positions_only_and_refuses_a_base_target(drv):
    lease = armed(drv)
    goal = HOME.copy()
    goal[0], goal[3] = 0.5, 0.1
    goal[4] = 0.1
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "move_to", 0, lease=lease, target=goal)
    assert err.value.code == ErrorCode.BAD_VALUE and "vx=0.1" in err.value.reason
    cmd(drv, "servo", 0, lease=lease, group="base", target=np.array([0.1, 0.0, 0.0]))
    now, _ = run_ticks(drv, 0, 20, lease)
    goal[4] = 0.0
    cmd(drv, "move_to", now, lease=lease, target=goal)  # the base is moving: move_to stops it
    now, out = run_ticks(drv, now, 2000, lease)
    assert drv.mode == Mode.ARMED
    assert out[-1, 0] == pytest.approx(0.5) and out[-1, 3] == pytest.approx(0.1)
    assert np.all(out[-1, BASE] == 0.0)


def test_engage_and_range_checks_skip_the_base(drv):
    lease = armed(drv)
    pts = np.tile(HOME, (10, 1))
    pts[:, BASE] = [0.2, -0.2, 0.45]  # far from the commanded 0 in "position", but a velocity
    cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.02, points=pts)
    pts[:, 0] = 0.5  # an arm joint too far away is still refused
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.02, points=pts)
    assert err.value.code == ErrorCode.TOO_FAR and "j1" in err.value.reason


def test_arming_while_the_base_rolls_ramps_it_to_zero(drv):
    drv.backend._q[4] = drv.backend._target[4] = 0.3  # pushed faster than its limit: arming must not refuse or jump
    drv.tick(DT_NS)
    lease = armed(drv, DT_NS)
    now, out = run_ticks(drv, DT_NS, STOP_TICKS, lease)
    assert out[0, 4] == pytest.approx(0.3, abs=0.01)
    assert np.all(out[-1, BASE] == 0.0)


def test_servo_group_is_checked(drv):
    lease = armed(drv)
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "servo", 0, lease=lease, group="wheels", target=np.zeros(3))
    assert err.value.code == ErrorCode.BAD_VALUE and "base" in err.value.reason
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "servo", 0, lease=lease, group="base", target=np.zeros(2))
    assert err.value.code == ErrorCode.BAD_SHAPE
    with pytest.raises(ProtocolError) as err:
        cmd(drv, "servo", 0, lease=lease, group="arm", target=np.array([1.0, 0.0]))
    assert err.value.code == ErrorCode.TOO_FAR
    with pytest.raises(ProtocolError) as err:
        validate(F.make("servo", lease=lease, group=3, target=np.zeros(3)))
    assert err.value.code == ErrorCode.BAD_TYPE
    assert drv.mode == Mode.ARMED and drv.buffer.end_ns() is None  # nothing changed


def test_a_group_servo_keeps_a_running_trajectorys_current_targets(drv):
    lease = armed(drv)
    n = 100
    pts = np.tile(HOME, (n, 1))
    pts[:, 0] = np.linspace(0.0, 0.5, n)
    cmd(drv, "trajectory", 0, lease=lease, t0_ns=0, dt=0.01, points=pts)
    now, _ = run_ticks(drv, 0, 60, lease)
    here = drv.requested[0]
    cmd(drv, "servo", now, lease=lease, group="base", target=np.array([0.1, 0.0, 0.0]))
    now, out = run_ticks(drv, now, 200, lease)
    assert out[-1, 0] == pytest.approx(here, abs=1e-9)  # the arm stays at the target it had
