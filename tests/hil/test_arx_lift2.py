"""A real ARX Lift 2 driver process (plugin, composite, parts, driver core) over the kinematic fakes.

The fakes run inside the driver process behind the vendor adapters; the test injects faults
through their control file and reads what reached each device from their status files
(drivers/arx_lift2/sim.py). Layout: 0-6 left arm + gripper, 7-13 right, 14 lift, 15-17 base.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from armada.drivers.arx_lift2.sim import read_commands, read_status, write_control
from armada.runtime.config import CONFIG_DIR, load_embodiment
from armada.runtime.supervisor import CellProcesses
from armada.runtime.transport import CommandClient
from tests.hil.helpers import StateRecorder

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "arx_lift2_fake.yaml"
EMB = load_embodiment("arx_lift2")
LIFT, BASE = 14, slice(15, 18)
POSITIONS = np.r_[0:15]
# A stopped base: measured (odometry with the fakes' wheel-encoder noise) within this of zero.
AT_REST = 0.01
LEASE_TTL_S = 2.0


class Robot:
    def __init__(self, procs: CellProcesses, fake_dir: Path):
        self.procs, self.fake_dir = procs, fake_dir
        drv = procs.cell.drivers[0]
        self.client = CommandClient(procs.ctx, drv.cmd, default_timeout_s=1.0)
        self.rec = StateRecorder(procs.ctx, drv.state)
        self.lease = ""

    def heartbeat(self) -> None:
        self.client.request("heartbeat", lease=self.lease)

    def arm(self) -> np.ndarray:
        if not self.lease:  # acquired just before arming: a loaded host must not lapse it in between
            self.lease = self.client.request("acquire", client="test")["lease"]
        self.client.request("arm", lease=self.lease)
        return np.array(self.rec.wait_mode("armed", 2.0)["commanded"])

    def send(self, points: np.ndarray, t0_ns: int, dt: float, final: bool) -> None:
        self.client.request("trajectory", lease=self.lease, t0_ns=t0_ns, dt=dt, points=points, final=final)

    def now_ns(self) -> int:
        return self.client.request("ping")["mono_ns"]

    def heartbeats_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.heartbeat()
            time.sleep(0.05)

    def status(self, device: str) -> dict:
        s = read_status(self.fake_dir, device)
        assert s is not None, f"no status from the fake {device}"
        return s

    def close(self) -> list[dict]:
        messages = self.rec.stop()
        self.client.close()
        return messages


@pytest.fixture
def robot(short_tmp):
    fake_dir = short_tmp / "arx"
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["backend"]["fake_dir"] = str(fake_dir)
    data["cameras"] = []
    # A lease that outlives a slow heartbeat on a loaded 2-core host; the lease test waits it out.
    data["drivers"][0]["lease_ttl_s"] = LEASE_TTL_S
    path = short_tmp / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    with CellProcesses(path, short_tmp) as procs:
        procs.spawn("driver", "robot")
        procs.wait_ready(20.0)
        r = Robot(procs, fake_dir)
        try:
            yield r
        finally:
            r.close()


def plan(start: np.ndarray, seconds: float, dt: float, base: np.ndarray, moving_s: float | None = None) -> np.ndarray:
    """Arms and grippers ramp, the lift rises, the base drives ``base`` (vx, vy, wz) for ``moving_s``."""
    t = np.arange(int(round(seconds / dt)))[:, None] * dt
    pts = np.repeat(start[None, :], len(t), axis=0)
    frac = np.minimum(t / seconds, 1.0)
    pts[:, 0:1] += 0.3 * frac  # left joint 1
    pts[:, 7:8] -= 0.3 * frac  # right joint 1
    pts[:, 1:2] += 0.2 * frac  # left joint 2 (up from its lower end)
    pts[:, 8:9] += 0.2 * frac
    pts[:, [6, 13]] += 0.03 * frac  # grippers open 3 cm
    pts[:, LIFT:LIFT + 1] = start[LIFT] + 0.06 * frac
    moving = t[:, 0] < (seconds if moving_s is None else moving_s)
    pts[:, BASE] = np.where(moving[:, None], base, 0.0)
    return pts


def check_limits(messages: list[dict]) -> None:
    """Commanded positions within the velocity limits, base velocities within their range and
    acceleration limit, between any two published states (ticks may be skipped on a loaded host)."""
    t = np.array([m["mono_ns"] for m in messages]) * 1e-9
    q = np.array([m["commanded"] for m in messages])
    dt = np.diff(t)[:, None]
    step = np.abs(np.diff(q, axis=0))
    assert np.all(step[:, POSITIONS] <= EMB.max_velocity[POSITIONS] * dt + 1e-9), (step[:, POSITIONS] / dt).max(0)
    assert np.all(np.abs(q[:, BASE]) <= EMB.upper[BASE] + 1e-9)
    assert np.all(step[:, BASE] <= EMB.max_acceleration[BASE] * dt + 1e-9), (step[:, BASE] / dt).max(0)


def test_an_episode_moves_arms_lift_and_base_together_from_chunks(robot):
    start = robot.arm()
    dt = 0.02
    pts = plan(start, 2.4, dt, np.array([0.1, 0.0, 0.2]), moving_s=1.8)
    t0 = robot.now_ns() + int(0.05e9)
    robot.send(pts[:60], t0, dt, final=False)  # two overlapping chunks, as inference sends them
    robot.heartbeats_for(1.0)
    robot.send(pts[50:], t0 + int(50 * dt * 1e9), dt, final=True)
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        robot.heartbeat()
        m = robot.rec.latest()
        if m["mode"] == "armed" and np.allclose(m["commanded"][:15], pts[-1][:15], atol=1e-9) \
                and not np.any(m["commanded"][15:]):
            break
        time.sleep(0.02)
    # The base comes to rest and the lift reaches its last point (its own speed, 0.1 m/s in the fake).
    assert _wait(lambda: (robot.heartbeat() or True) and abs(robot.status("body")["height"] - pts[-1][LIFT]) < 0.003
                 and np.all(np.abs(robot.rec.latest()["measured"][15:18]) < AT_REST), 3.0)
    robot.heartbeats_for(0.1)
    messages = robot.close()
    final = messages[-1]
    assert final["mode"] == "armed", final.get("reason")
    measured = np.array([m["measured"] for m in messages])
    assert measured[:, 15].max() > 0.08, measured[:, 15].max()  # the base drove (odometry from the wheels)
    assert measured[:, 17].max() > 0.15, measured[:, 17].max()
    assert np.all(np.abs(final["measured"][15:18]) < AT_REST), final["measured"][15:18]
    assert abs(final["measured"][LIFT] - pts[-1][LIFT]) < 0.005  # the lift rose 6 cm
    assert np.allclose(final["measured"][[0, 7]], pts[-1][[0, 7]], atol=0.01)
    check_limits([m for m in messages if m["mode"] in ("armed", "running")])
    assert read_commands(robot.fake_dir, "left_arm") > 100 and read_commands(robot.fake_dir, "body") > 10
    body = robot.status("body")
    assert body["height"] == pytest.approx(pts[-1][LIFT], abs=0.005)


def _drive_then(robot: Robot, seconds: float = 4.0) -> np.ndarray:
    """Armed, then a long chunk (not final) with the base at 0.1 m/s and everything moving."""
    start = robot.arm()
    pts = plan(start, seconds, 0.02, np.array([0.1, 0.05, 0.0]))
    robot.send(pts, robot.now_ns() + int(0.05e9), 0.02, final=False)
    # Until the base drives at about 0.1 m/s (the filter's jerk-limited ramp: about 0.4 s unloaded).
    assert _wait(lambda: (robot.heartbeat() or True) and robot.status("body")["velocity"][0] > 0.08, 3.0)
    m = robot.rec.latest()
    assert m["mode"] == "running", m.get("reason")
    return pts


def _settles(read, seconds: float, tolerance: float, timeout_s: float = 3.0) -> np.ndarray:
    """Polls ``read`` until it changes by less than ``tolerance`` over ``seconds``; the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        a = np.array(read())
        time.sleep(seconds)
        b = np.array(read())
        if np.all(np.abs(b - a) < tolerance):
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"still moving after {timeout_s} s: {a} -> {b}")


@pytest.mark.parametrize("fault, names", [
    ({"left_arm": {"motor_error": True}}, "left arm (fake): arx5-sdk dropped to damping"),
    ({"right_arm": {"silent": True}}, "right arm (fake): feedback has not changed"),
])
def test_a_fault_on_one_device_faults_and_holds_the_whole_robot(robot, fault, names):
    _drive_then(robot)
    injected = time.monotonic()
    write_control(robot.fake_dir, fault)
    faulted = robot.rec.wait_mode("fault", 2.0)
    # Seen here, through the state recorder: the fakes poll their control file every 20 ms; silence
    # then needs frozen_s (0.1 s) and the driver's read-failure bound (0.1 s). docs/arx-lift2.md.
    fault_s = time.monotonic() - injected
    assert names in faulted["reason"], faulted["reason"]
    print(f"\n{names.split(':')[0]} {list(fault)[0]}: fault after {fault_s * 1e3:.0f} ms", end="")
    assert fault_s < 1.0, fault_s
    # The base ramps to zero in the body's own thread; the lift keeps its setpoint; the arms hold.
    started = time.monotonic()
    assert _wait(lambda: robot.status("body")["chassis_setpoint"] == [0.0, 0.0, 0.0], 2.0)
    assert _wait(lambda: np.all(np.abs(robot.status("body")["velocity"]) < AT_REST), 1.0)
    ramp_s = time.monotonic() - started
    body = robot.status("body")
    height = _settles(lambda: robot.status("body")["height"], 0.3, 1e-4)
    assert height == pytest.approx(body["height_setpoint"], abs=1e-3)
    healthy = "right_arm" if "left_arm" in fault else "left_arm"
    _settles(lambda: robot.status(healthy)["q"], 0.3, 1e-4)  # holding, torque on
    assert robot.status(healthy)["torque_on"]
    # 0.1 m/s at 0.5 m/s² is 0.2 s; the status files and a loaded host add their share.
    print(f", base at rest {ramp_s * 1e3:.0f} ms after the fault was seen", end="")
    assert ramp_s < 1.5, ramp_s


def test_the_estop_switch_cuts_power_everywhere_and_the_driver_faults_naming_every_device(robot):
    _drive_then(robot)
    write_control(robot.fake_dir, {"power": False})
    faulted = robot.rec.wait_mode("fault", 2.0)
    for device in ("left arm (fake)", "right arm (fake)", "lift and base (fake)"):
        assert device in faulted["reason"], faulted["reason"]


def test_losing_the_lease_ramps_the_base_to_zero_and_holds_arms_and_lift(robot):
    _drive_then(robot, seconds=6.0)
    lapsed_at = time.monotonic()  # no more heartbeats from here: the lease lapses
    assert _wait(lambda: robot.rec.latest()["mode"] == "armed", LEASE_TTL_S + 2.0), robot.rec.latest()["mode"]
    assert _wait(lambda: np.all(np.abs(robot.rec.latest()["commanded"][15:18]) < 1e-9), 3.0), \
        (robot.rec.latest()["mode"], robot.rec.latest().get("reason"), robot.rec.latest()["commanded"][15:18])
    assert _wait(lambda: np.all(np.abs(robot.status("body")["velocity"]) < AT_REST), 2.0)
    stopped_s = time.monotonic() - lapsed_at
    print(f"\nlease lapse: base at rest {stopped_s * 1e3:.0f} ms after the last heartbeat (ttl {LEASE_TTL_S} s)",
          end="")
    assert _wait(lambda: not np.any(np.abs(robot.rec.latest()["velocity"]) > 1e-9), 2.0)
    m = robot.rec.latest()
    assert m["mode"] == "armed", m.get("reason")
    held = np.array(m["commanded"][:15])
    time.sleep(0.5)
    later = robot.rec.fresh()
    assert np.array_equal(np.array(later["commanded"][:15]), held)  # arms, grippers and lift hold
    assert np.allclose(later["measured"][:15], held, atol=0.01)
    messages = [x for x in robot.rec.messages if x["mode"] in ("armed", "running")]
    check_limits(messages)
    # The lease, then the base decelerates under its jerk limit (0.1 m/s: about 0.4 s); a loaded
    # host (a quarter of the ticks overrun) stretches both.
    assert stopped_s < LEASE_TTL_S + 4.0, stopped_s


def _wait(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# Check points may pass a limit by a little while braking on a curved path (drivers/core/workspace.py).
CARTESIAN_TOLERANCE = 0.005


def _run_to_rest(robot: Robot, goal_moves: dict[int, float], seconds: float) -> list[dict]:
    """A final chunk from the armed pose toward ``goal_moves`` (index: added), until the driver holds."""
    start = robot.arm()
    dt = 0.02
    frac = np.linspace(0.0, 1.0, int(seconds / dt))[:, None]
    delta = np.zeros(EMB.dof)
    for i, d in goal_moves.items():
        delta[i] = d
    pts = start + frac * delta
    robot.send(pts, robot.now_ns() + int(0.05e9), dt, final=True)
    deadline = time.monotonic() + seconds + 4.0
    while time.monotonic() < deadline:
        robot.heartbeat()
        m = robot.rec.latest()
        if m["mode"] == "armed" and not np.any(m["velocity"]) and time.monotonic() > deadline - 3.5:
            break
        time.sleep(0.02)
    messages = [m for m in robot.rec.messages if m["mode"] in ("armed", "running")]
    assert messages[-1]["mode"] == "armed"
    return messages


def test_a_stream_toward_the_floor_of_the_workspace_stops_at_the_box(robot):
    from armada.drivers.core.kinematics import ArmKinematics

    kin = ArmKinematics(EMB)
    floor = EMB.kinematics.arms[0].workspace.min[2]
    # Left joint 2 by +1.0 rad would take the left tool to z = 0.27 m, below the box's 0.35 m.
    messages = _run_to_rest(robot, {1: 1.0}, 2.5)
    z = np.array([kin.points(np.array(m["commanded"]))[0, :, 2].min() for m in messages])
    assert z.min() >= floor - CARTESIAN_TOLERANCE, z.min()
    assert z[-1] < floor + 0.03  # it went all the way to the floor, not stopped early
    assert messages[-1]["counters"]["clamps"]["workspace"] > 0
    assert robot.status("left_arm")["q"][1] < 1.0 - 0.1  # the arm itself stopped short of the goal


def test_two_arms_swung_at_each_other_keep_their_distance(robot):
    from armada.drivers.core.kinematics import ArmKinematics

    kin = ArmKinematics(EMB)
    gap = EMB.kinematics.min_separation
    # Joint 1 of each arm turned toward the other: the tools would cross the middle.
    messages = _run_to_rest(robot, {0: -1.4, 7: 1.4}, 3.0)
    closest = []
    for m in messages:
        left, right = kin.points(np.array(m["commanded"]))
        closest.append(min(np.linalg.norm(a - b) for a in left for b in right))
    assert min(closest) >= gap - CARTESIAN_TOLERANCE, min(closest)
    assert min(closest) < gap + 0.05  # they did come close: the limit, not something else, stopped them
    assert messages[-1]["counters"]["clamps"]["separation"] > 0


def test_a_gamepad_drives_the_base_by_servo_and_a_quiet_gamepad_stops_it(robot):
    """Teleop: servo of the base group alone at 20 Hz; the arms and lift keep their targets. When
    the servos stop, the base target goes stale after command_timeout_s and ramps to zero."""
    start = robot.arm()

    def at_speed() -> bool:
        measured = robot.rec.latest()["measured"]
        return measured[15] > 0.08 and measured[17] > 0.15

    # Servo for at least 1.5 s, and on until the base is at speed: on a loaded 2-core host the
    # recorder thread (or this loop) can lag the driver by a second, so a fixed sleep is no proof.
    began = time.monotonic()
    while time.monotonic() - began < 1.5 or (not at_speed() and time.monotonic() - began < 8.0):
        robot.client.request("servo", lease=robot.lease, target=np.array([0.1, 0.0, 0.2]), group="base")
        robot.heartbeat()
        time.sleep(0.05)
    driving = robot.rec.latest()
    assert at_speed(), driving["measured"][15:18]
    assert np.array_equal(np.array(driving["commanded"][:15]), start[:15])  # arms and lift untouched
    quiet_at = time.monotonic()
    robot.heartbeats_for(0.1)
    assert _wait(lambda: (robot.heartbeat() or True) and not np.any(robot.rec.latest()["commanded"][15:18]), 2.0)
    assert _wait(lambda: (robot.heartbeat() or True)
                 and np.all(np.abs(robot.rec.latest()["measured"][15:18]) < AT_REST), 2.0)
    stale = EMB.groups[-1].command_timeout_s
    assert time.monotonic() - quiet_at > stale  # followed for command_timeout_s, not stopped at once
    assert robot.rec.latest()["counters"]["clamps"]["stale"] > 0
    check_limits([m for m in robot.rec.messages if m["mode"] in ("armed", "running")])


def test_after_the_link_comes_back_clear_fault_recovers_and_the_robot_arms_again(robot):
    _drive_then(robot)
    write_control(robot.fake_dir, {"body": {"silent": True}})
    faulted = robot.rec.wait_mode("fault", 2.0)
    assert "lift and base (fake)" in faulted["reason"], faulted["reason"]
    write_control(robot.fake_dir, {})
    robot.client.request("clear_fault", lease=robot.lease, timeout_s=10.0)
    robot.rec.wait_mode("idle", 5.0)
    held = robot.arm()
    assert np.allclose(held[:15], robot.rec.latest()["measured"][:15], atol=0.01)


def test_the_fake_cell_runs_an_episode_of_the_inference_process(short_tmp):
    """The shipped cell as `armada run` starts it: camera, inference (scripted chunks) and the
    driver over the simulators; the episode completes and the base is at rest afterwards."""
    from armada.runtime.inference.client import EpisodeClient

    fake_dir = short_tmp / "arx"
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["backend"]["fake_dir"] = str(fake_dir)
    path = short_tmp / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    with CellProcesses(path, short_tmp) as procs:
        procs.start_all()
        client = EpisodeClient(procs.ctx, procs.cell)
        try:
            report = client.wait_report(client.start("wave", duration_s=3.0, arm=True), timeout_s=60.0)
        finally:
            client.close()
        assert report["outcome"] == "completed", report
        assert report["chunks"] >= 3
        assert _wait(lambda: read_status(fake_dir, "body")["chassis_setpoint"] == [0.0, 0.0, 0.0], 2.0)
    assert read_commands(fake_dir, "left_arm") > 100 and read_commands(fake_dir, "right_arm") > 100
    assert np.ptp(read_status(fake_dir, "left_arm")["q"]) > 0.05  # the arms followed the chunks


def test_a_driver_for_a_switched_off_robot_exits_with_a_clear_error(short_tmp):
    import subprocess

    fake_dir = short_tmp / "arx"
    fake_dir.mkdir()
    write_control(fake_dir, {"power": False})
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["backend"]["fake_dir"] = str(fake_dir)
    data["cameras"] = []
    path = short_tmp / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    procs = CellProcesses(path, short_tmp)
    try:
        child = procs.spawn("driver", "robot")
        try:
            code = child.proc.wait(timeout=20.0)
        except subprocess.TimeoutExpired:
            code = None
        log = child.log_tail(40)
    finally:
        procs.close()
    assert code not in (None, 0), f"driver did not exit with an error (code {code}):\n{log}"
    assert "left arm (fake)" in log and "None of the motors are initialized" in log, log
