"""The UR3 driver process with the real ur-rtde against the loopback UR controller.

Every test runs real processes: the fake controller, the driver (its ur-rtde worker), and for
episodes the camera and inference processes. What the fake received is checked against the UR3
limits; faults are injected through the fake's control socket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rtde_control")

from armada.drivers.ur3.fake.launch import free_loopback_host  # noqa: E402
from armada.runtime.config import CONFIG_DIR, load_embodiment  # noqa: E402
from armada.runtime.inference.client import EpisodeClient  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.transport import CommandClient, RemoteError  # noqa: E402
from tests.hil.helpers import StateRecorder  # noqa: E402

pytestmark = pytest.mark.hil

EMB = load_embodiment("ur3")
DT = 1.0 / EMB.control_rate_hz
# How fast a lost link must become a fault: 50 ms without new RTDE data makes reads fail, and the
# driver faults after 100 ms of failing reads; the rest is scheduling slack on a loaded 2-core host.
LINK_LOSS_FAULT_BOUND_S = 0.4


@pytest.fixture
def fake(ur_fake):
    return ur_fake


def ur3_cell(folder: Path, host: str, duration_s: float = 3.0) -> Path:
    data = yaml.safe_load((CONFIG_DIR / "cells" / "ur3_fake.yaml").read_text())
    drv = data["drivers"][0]
    drv["backend"]["host"] = host
    drv["embodiment"] = str(CONFIG_DIR / "embodiments" / "ur3.yaml")
    drv.pop("realtime_priority", None)  # the normal scheduler, as on CI
    # These tests send commands seconds apart without heartbeats; a lapsing lease is tested elsewhere.
    drv["lease_ttl_s"] = 10.0
    data["inference"]["episode_duration_s"] = duration_s
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def driver(fake, short_tmp):
    """The fake plus a UR3 driver process connected to it; yields (procs, fake, client, recorder)."""
    with CellProcesses(ur3_cell(short_tmp, fake.host), short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready()
        client = CommandClient(procs.ctx, procs.cell.drivers[0].cmd, default_timeout_s=10.0)
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        try:
            yield procs, fake, client, rec
        finally:
            rec.stop()
            client.close()


def _lease(client) -> str:
    return client.request("acquire", client="test", ttl_s=5.0)["lease"]


def _assert_within_limits(targets: list[list[float]]) -> None:
    """Consecutive servoJ targets, one per tick, never faster or harder than the UR3 limits."""
    q = np.asarray(targets)
    assert len(q) > 10
    assert np.all(q >= EMB.lower) and np.all(q <= EMB.upper)
    v = np.diff(q, axis=0) / DT
    assert np.all(np.abs(v) <= EMB.max_velocity * (1 + 1e-6) + 1e-9), np.abs(v).max(axis=0)
    a = np.diff(v, axis=0) / DT
    assert np.all(np.abs(a) <= EMB.max_acceleration * (1 + 1e-6) + 1e-6), np.abs(a).max(axis=0)


def _wait(pred, timeout_s: float, poll_s: float = 0.005) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(poll_s)
    return bool(pred())


def _arm_and_move(client, rec, lease: str, delta: float = 0.3) -> np.ndarray:
    client.request("arm", lease=lease)
    start = np.asarray(rec.wait_mode("armed", 2.0)["measured"])
    goal = start + np.array([delta, -delta / 2, delta / 2, 0.2, -0.2, 0.3])
    client.request("move_to", lease=lease, target=goal, max_velocity=2.0)
    return goal


# --------------------------------------------------------------------------- normal operation


def test_state_carries_tcp_pose_safety_and_controller_time(driver):
    _, fake, client, rec = driver
    first = rec.wait_mode("idle", 2.0)
    assert first["device"]["safety_mode"] == 1 and first["device"]["robot_mode"] == 7
    assert len(first["device"]["tcp_pose"]) == 6 and first["device"]["program_running"]
    assert np.allclose(first["measured"], fake.state()["q"], atol=1e-3)
    assert _wait(lambda: rec.latest()["device"]["controller_time_s"] > first["device"]["controller_time_s"] + 0.05, 1.0)
    assert fake.targets() == []  # disarmed: connected, nothing commanded


def test_episode_of_chunks_moves_the_arm_within_limits(fake, short_tmp):
    with CellProcesses(ur3_cell(short_tmp, fake.host, duration_s=3.0), short_tmp) as procs:
        procs.start_all()
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        client = EpisodeClient(procs.ctx, procs.cell)
        q0 = np.asarray(fake.state()["q"])
        fake.targets()
        episode = client.start("wave", arm=True)
        report = client.wait_report(episode, timeout_s=30.0)
        states = rec.stop()
        client.close()
    assert report["outcome"] == "completed", report
    assert report["chunks"] >= 3
    sent = fake.targets()
    _assert_within_limits(sent)
    moved = np.abs(np.asarray(sent) - q0).max()
    assert moved > 0.05  # the arm really followed the chunks
    # A late worker answer (over 20 ms on a loaded host) is a counted transient read error, never a fault.
    assert all(s["mode"] != "fault" for s in states)


def test_move_to_reaches_the_goal_and_the_fake_follows(driver):
    _, fake, client, rec = driver
    lease = _lease(client)
    fake.targets()
    goal = _arm_and_move(client, rec, lease)
    assert _wait(lambda: np.allclose(fake.state()["q"], goal, atol=2e-3), 8.0), (fake.state()["q"], goal)
    _assert_within_limits(fake.targets())


def _wait_holding(client, lease: str, pred, timeout_s: float) -> bool:
    """Wait for ``pred``, sending heartbeats: the cell's lease lapses in 0.3 s without them."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        client.request("heartbeat", lease=lease)
        time.sleep(0.05)
    return bool(pred())


def _servo_cycles(cycles: list[list]) -> list[list]:
    """The controller cycles from the first to the last fresh servoJ target (the streaming window)."""
    fresh = [i for i, c in enumerate(cycles) if c[2]]
    assert fresh, "no controller cycle took a servoJ target"
    return cycles[fresh[0]:fresh[-1] + 1]


def test_every_controller_cycle_takes_a_fresh_servoj_target_and_no_step_jumps(driver):
    """The control script reads its command register once per 2 ms cycle and takes a new target only
    when it sees servoJ there; a watchdog kick ("no command") in the same register, or two packages
    merged by Nagle, leaves a cycle without one, and the next cycle jumps to catch up."""
    _, fake, client, rec = driver
    lease = _lease(client)
    client.request("arm", lease=lease)
    start = np.asarray(rec.wait_mode("armed", 2.0)["measured"])
    vmax = EMB.max_velocity * EMB.move_to_velocity_fraction  # what move_to plans with
    fake.cycles()
    goal = start + np.array([1.2, -0.6, 0.6, 1.0, -1.0, 1.5])
    duration = client.request("move_to", lease=lease, target=goal)["duration_s"]
    assert duration > 2.0
    rec.wait_mode("running", 2.0)
    assert _wait_holding(client, lease, lambda: rec.latest()["mode"] == "armed", duration + 5.0)
    window = _servo_cycles(fake.cycles())
    cycle_s = 0.002  # the fake is an e-Series controller
    fresh = float(np.mean([c[2] for c in window]))
    targets = np.asarray([c[3] for c in window])
    # Per time between cycles: a fake starved by a loaded host runs late cycles (a real controller
    # does not), and the target it then takes moved for that long.
    elapsed = np.maximum(np.diff([c[0] for c in window]), cycle_s)
    steps = np.abs(np.diff(targets, axis=0)) / elapsed[:, None]
    over = np.max(steps / vmax, axis=1)
    no_command = sum(1 for c in window if c[1] == 0)
    print(f"{len(window)} controller cycles, {fresh:.3f} took a fresh servoJ target, {no_command} saw 'no command'; "
          f"{int(np.sum(over > 1.01))} steps over the planned velocity, worst {over.max():.2f}x")
    assert len(window) > 0.8 * duration / cycle_s
    # The old worker kicked the watchdog before every servoJ: 20-65 % of the cycles saw "no command".
    assert no_command == 0
    # The rest is jitter between two 500 Hz clocks on a loaded host (about 0.99 when idle; 0.77-0.94 on the
    # 2-core test host with the fake controller, the worker, the driver and this test sharing it, with and
    # without the workspace guard alike; 0.61 with two CPU hogs beside the suite, load 4-7). The regression
    # this guards against (the old worker) is caught by no_command above and lost far more.
    assert fresh > 0.5, fresh
    # A cycle that missed its target costs the next one a double step; several in a row, a jump (old
    # worker: up to 24x the hardware limit). move_to plans at 0.2 of the hardware limits, so a missed
    # cycle now and then on a loaded host stays inside them.
    assert np.all(steps <= EMB.max_velocity * (1 + 1e-6) + 1e-9), over.max()


# --------------------------------------------------------------------------- stops


def test_protective_stop_faults_sends_nothing_more_and_recovers_on_request(driver):
    _, fake, client, rec = driver
    lease = _lease(client)
    _arm_and_move(client, rec, lease, delta=0.6)
    rec.wait_mode("running", 2.0)
    time.sleep(0.2)
    fake.cmd("unlock_delay 5")  # as a real controller, refuse to unlock for 5 s
    assert fake.cmd("pstop") == "ok"
    stopped = time.monotonic()
    state = rec.wait_mode("fault", 1.0)
    assert "protective stop" in state["reason"]
    assert time.monotonic() - stopped < 0.5
    time.sleep(0.05)  # servoJ calls already in flight when the stop happened
    fake.targets()
    q_stop = fake.state()["q"]
    time.sleep(0.5)
    assert fake.targets() == []  # no motion command after the fault
    assert fake.state()["q"] == q_stop
    with pytest.raises(RemoteError, match="5s after occurrence"):
        client.request("clear_fault", lease=lease)
    assert rec.latest()["mode"] == "fault"
    fake.cmd("unlock_delay 0")
    client.request("clear_fault", lease=lease)
    assert rec.wait_mode("idle", 2.0)["device"]["program_running"]
    goal = _arm_and_move(client, rec, lease, delta=-0.2)
    assert _wait(lambda: np.allclose(fake.state()["q"], goal, atol=2e-3), 8.0)


def test_robot_emergency_stop_latches_until_released_and_reset(driver):
    _, fake, client, rec = driver
    lease = _lease(client)
    _arm_and_move(client, rec, lease)
    assert fake.cmd("estop") == "ok"
    try:
        rec.wait_mode("estop", 1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {rec.latest().get('reason')}") from None
    time.sleep(0.05)
    fake.targets()
    time.sleep(0.3)
    assert fake.targets() == []
    with pytest.raises(RemoteError, match="still engaged"):
        client.request("reset_estop", lease=lease)
    fake.cmd("clear")  # released on the robot
    assert _wait(lambda: rec.latest()["device"]["safety_mode"] == 1, 1.0)
    client.request("reset_estop", lease=lease)
    state = rec.wait_mode("idle", 2.0)  # disarmed: the operator arms again
    assert _wait(lambda: rec.latest()["device"]["program_running"], 2.0), state


def test_estop_command_stops_the_script_and_nothing_moves(driver):
    _, fake, client, rec = driver
    lease = _lease(client)
    _arm_and_move(client, rec, lease)
    client.request("estop", reason="test")
    rec.wait_mode("estop", 1.0)
    assert _wait(lambda: not fake.state()["program_running"], 1.0)  # stopScript reached the robot
    fake.targets()
    time.sleep(0.3)
    assert fake.targets() == []
    client.request("reset_estop", lease=lease)
    assert _wait(lambda: fake.state()["program_running"], 2.0)


# --------------------------------------------------------------------------- lost links


@pytest.mark.parametrize("how", ["drop", "silent", "kill_worker"])
def test_connection_loss_faults_within_the_bound_and_recovers_on_request(driver, how):
    procs, fake, client, rec = driver
    lease = _lease(client)
    _arm_and_move(client, rec, lease)
    rec.wait_mode("running", 2.0)
    lost = time.monotonic()
    if how == "kill_worker":
        worker = _worker_pid(procs.child("arm").proc.pid)
        os.kill(worker, signal.SIGKILL)
    else:
        fake.cmd("drop" if how == "drop" else "silent 1")
    state = rec.wait_mode("fault", 2.0)
    took = time.monotonic() - lost
    print(f"link loss by {how}: fault after {took * 1e3:.0f} ms")  # shown with -s; quoted in docs
    assert took < LINK_LOSS_FAULT_BOUND_S, (took, state["reason"])
    if how == "kill_worker":
        assert "SIGKILL" in state["reason"]
    if how == "silent":
        fake.cmd("silent 0")
    client.request("clear_fault", lease=lease)
    rec.wait_mode("idle", 2.0)
    goal = _arm_and_move(client, rec, lease, delta=-0.2)
    assert _wait(lambda: np.allclose(fake.state()["q"], goal, atol=2e-3), 8.0)


def test_after_a_dropped_link_nothing_reaches_the_controller_until_clear_fault(driver):
    """ur-rtde reconnects by itself and restarts its control script, without our watchdog; servoJ
    calls it had queued would follow. The driver ends its worker when it faults: nothing recovers
    by itself, nothing is resent."""
    procs, fake, client, rec = driver
    lease = _lease(client)
    _arm_and_move(client, rec, lease, delta=0.6)
    rec.wait_mode("running", 2.0)
    worker = _worker_pid(procs.child("arm").proc.pid)
    fake.cmd("drop")
    state = rec.wait_mode("fault", 2.0)
    fake.targets()
    before = fake.state()
    # ur-rtde 1.6.5 reconnects and re-uploads its script within about a second.
    _wait_holding(client, lease, lambda: False, 3.0)
    after = fake.state()
    assert fake.targets() == [], "servoJ reached the controller after the fault"
    assert after["script_bytes"] == before["script_bytes"], "a control script was uploaded after the fault"
    assert after["program_starts"] == before["program_starts"] and not after["program_running"]
    assert rec.latest()["mode"] == "fault", state["reason"]
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)  # the worker that saw the drop is gone (and reaped)
    client.request("clear_fault", lease=lease)
    rec.wait_mode("idle", 5.0)
    assert fake.state()["program_starts"] == after["program_starts"] + 1  # on request, once
    goal = _arm_and_move(client, rec, lease, delta=-0.2)
    assert _wait_holding(client, lease, lambda: np.allclose(fake.state()["q"], goal, atol=2e-3), 8.0), \
        (rec.latest()["mode"], rec.latest().get("reason"), fake.state())


def test_frozen_driver_is_stopped_by_the_controllers_watchdog(driver):
    procs, fake, client, rec = driver
    lease = _lease(client)
    _arm_and_move(client, rec, lease, delta=0.6)
    rec.wait_mode("running", 2.0)
    pid = procs.child("arm").proc.pid
    os.kill(pid, signal.SIGSTOP)  # a hung driver: nothing kicks the RTDE watchdog any more
    try:
        frozen = time.monotonic()
        assert _wait(lambda: fake.state()["watchdog_trips"] >= 1, 1.0)
        took = time.monotonic() - frozen
        assert took < 0.1 + 0.1  # 1 / watchdog_min_hz plus the fake's tick and our polling
        assert not fake.state()["program_running"]
    finally:
        os.kill(pid, signal.SIGCONT)
    state = rec.wait_mode("fault", 2.0)
    assert "control script is not running" in state["reason"]


def _worker_pid(driver_pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(driver_pid), "-f", "armada.drivers.core.isolated"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, out
    return pids[0]


# --------------------------------------------------------------------------- no device


def _start_driver_expecting_failure(short_tmp: Path, host: str) -> tuple[float, str]:
    cell = ur3_cell(short_tmp, host)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "driver", str(cell), "--name", "arm",
                          "--run-dir", str(short_tmp)], capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t0
    assert out.returncode != 0
    return took, out.stderr


def test_driver_with_no_controller_fails_clearly_within_5_s(short_tmp):
    host = free_loopback_host()
    if host is None:
        pytest.skip("no free loopback address")
    took, err = _start_driver_expecting_failure(short_tmp, host)
    assert took < 5.0
    assert f"UR3 at {host}: connect: dashboard port 29999: cannot connect" in err, err


def test_driver_with_a_silent_peer_fails_clearly_within_5_s(short_tmp):
    import socket

    host = free_loopback_host()
    if host is None:
        pytest.skip("no free loopback address")
    silent = []
    try:
        for port in (29999, 30003, 30004):  # accepts connections, never answers
            s = socket.socket()
            s.bind((host, port))
            s.listen(8)
            silent.append(s)
        took, err = _start_driver_expecting_failure(short_tmp, host)
    finally:
        for s in silent:
            s.close()
    assert took < 5.0
    assert "silent peer" in err, err
