"""The ALOHA cell as an operator runs it: the fake buses in their own process (`armada fake aloha`
equivalent), the driver process building its backend through the registry (dynamixel_sdk in the
isolated worker), an episode of the scripted policy's chunks through `armada run --arm`, and faults
injected through the fake's control socket."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is in the `devices` extra")

from armada.drivers.aloha.fake.aloha import AlohaFakeProcess  # noqa: E402
from armada.drivers.aloha.config import ACT_FOLLOWER_GRIPPER  # noqa: E402
from armada.runtime.config import CONFIG_DIR, REPO_ROOT, load_embodiment  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.transport import CommandClient  # noqa: E402
from tests.hil.helpers import StateRecorder  # noqa: E402

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "aloha_fake.yaml"
EMB = load_embodiment("aloha")
FOLLOWERS = ("puppet_left", "puppet_right")
JOINT_OF_ID = {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 4, 8: 5, 9: 6}
# Seen by the first read after the fault (a 50 Hz tick) or a silent bus's 0.1-0.2 s bound, plus the
# state stream and a loaded 2-core host.
FAULT_BOUND_S = 0.5


def fake_cell(folder: Path, **backend) -> Path:
    data = yaml.safe_load(CELL.read_text())
    drv = data["drivers"][0]
    drv["backend"].update(backend)
    drv["lease_ttl_s"] = 10.0  # commands seconds apart, no heartbeats
    drv["backend"]["latency_timer_ms"] = 4.0  # the fake shares 2 loaded cores with everything else
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def goal_in_si(sid: int, ticks: int) -> tuple[int, float]:
    j = JOINT_OF_ID[sid]
    g = ACT_FOLLOWER_GRIPPER
    if j == 6:
        return j, g.closed_m + (ticks - g.raw_closed) * (g.open_m - g.closed_m) / (g.raw_open - g.raw_closed)
    return j, (ticks - 2048) * 2 * math.pi / 4096


def test_an_episode_through_armada_run_keeps_every_goal_inside_the_limits(short_tmp):
    with AlohaFakeProcess(short_tmp) as fake:
        cell = fake_cell(short_tmp)
        result = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "run", str(cell), "--arm", "--duration", "3",
                                 "--run-dir", str(short_tmp)], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        tol_rad, tol_m = math.pi / 4096, 0.5 * 0.04 / 1377
        for side, bus in zip((0, 7), FOLLOWERS):
            goals = fake.call("goals", bus=bus)["goals"]
            assert len(goals) > 9 * 100, f"{bus}: {len(goals)} goals"  # ~3 s at 50 Hz, 9 servos
            moved = set()
            for sid, ticks in goals:
                j, g = goal_in_si(sid, ticks)
                tol = tol_m if j == 6 else tol_rad
                assert EMB.lower[side + j] - tol <= g <= EMB.upper[side + j] + tol, (bus, sid, ticks, g)
                if j < 6 and abs(g) > 0.05:
                    moved.add(j)
            assert moved, f"{bus}: the episode moved nothing"
            assert set(fake.call("torque", bus=bus)["torque"].values()) == {1}  # the run's end cut no torque


@pytest.fixture
def cell(short_tmp):
    with AlohaFakeProcess(short_tmp) as fake, \
            CellProcesses(fake_cell(short_tmp, reboot_on_recover=True), short_tmp) as procs:
        procs.spawn("driver", "robot")
        procs.wait_ready(20.0)
        drv = procs.cell.drivers[0]
        client = CommandClient(procs.ctx, drv.cmd, default_timeout_s=10.0)
        rec = StateRecorder(procs.ctx, drv.state)
        try:
            yield fake, client, rec
        finally:
            rec.stop()
            client.close()


def _start_moving(client, rec) -> str:
    lease = client.request("acquire", client="test")["lease"]
    client.request("arm", lease=lease)
    start = np.asarray(rec.wait_mode("armed", 2.0)["measured"])
    goal = start + np.tile([0.3, -0.3, 0.3, 0.2, -0.2, 0.3, 0.0], 2)
    client.request("move_to", lease=lease, target=goal)
    rec.wait_mode("running", 2.0)
    time.sleep(0.2)
    return lease


@pytest.mark.parametrize("inject, reason", [
    ({"op": "set_error", "bus": "puppet_right", "id": 4, "overload": True},
     "right follower: servo 4 (elbow, XM540-W270) hardware error: overload"),
    ({"op": "unplug", "bus": "puppet_left"}, "left follower: the serial port"),
    ({"op": "set_missing", "bus": "puppet_left", "id": 7}, "left follower: position read"),
])
def test_a_fault_in_the_driver_process_is_seen_within_the_bound_and_nothing_is_written_after(cell, inject, reason):
    fake, client, rec = cell
    _start_moving(client, rec)
    injected = time.monotonic_ns()
    fake.call(**inject)
    state = rec.wait_mode("fault", 3.0)
    took = (state["mono_ns"] - injected) * 1e-9
    print(f"{inject['op']}: fault after {took * 1e3:.0f} ms: {state['reason']}")
    assert took < FAULT_BOUND_S, took
    assert reason in state["reason"], state["reason"]
    time.sleep(0.1)  # writes already in flight have landed
    counts = {bus: len(fake.call("goals", bus=bus)["goals"]) for bus in FOLLOWERS if bus != inject["bus"]}
    time.sleep(0.5)
    assert counts == {bus: len(fake.call("goals", bus=bus)["goals"]) for bus in counts}
    for bus in FOLLOWERS:
        if inject["op"] == "unplug" and bus == inject["bus"]:
            continue
        tq = fake.call("torque", bus=bus)["torque"]
        if inject["op"] == "set_error" and bus == inject["bus"]:
            assert tq.pop("4") == 0  # the servo's own shutdown (overload), not the driver
        assert set(tq.values()) == {1}, (bus, tq)


def test_clear_fault_reboots_the_servo_whose_error_cut_its_torque_and_holds_where_the_arm_is(cell):
    fake, client, rec = cell
    lease = _start_moving(client, rec)
    fake.call("set_error", bus="puppet_left", id=2, overload=True)  # the shoulder's shutdown cuts its torque
    rec.wait_mode("fault", 3.0)
    # The fault ended the worker; clear_fault starts a new one, which finds the latched error.
    with pytest.raises(Exception, match="overload"):
        client.request("clear_fault", lease=lease)  # the cause is still there: the reboot cannot clear it
    fake.call("set_error", bus="puppet_left", id=2)  # the cause is gone (it cooled down, the load came off)
    client.request("clear_fault", lease=lease)
    rec.wait_mode("idle", 3.0)
    for bus in FOLLOWERS:
        assert set(fake.call("torque", bus=bus)["torque"].values()) == {1}
    pose = {bus: [fake.call("position", bus=bus, id=i)["position"] for i in range(1, 10)] for bus in FOLLOWERS}
    time.sleep(0.3)
    assert pose == {bus: [fake.call("position", bus=bus, id=i)["position"] for i in range(1, 10)] for bus in FOLLOWERS}
    client.request("arm", lease=lease)  # and it arms again where it stands
    rec.wait_mode("armed", 2.0)
