"""The SO-101 cell as an operator runs it: the fake buses in their own process (`armada fake so101`
equivalent), the driver process building its backend through the registry (lerobot's Feetech bus in
the isolated worker), an episode of the scripted policy's chunks through `armada run --arm`, and
faults injected through the fake's control socket."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("lerobot.motors.feetech", reason="lerobot is installed without dependencies (README)")

from armada.drivers.so101.config import JOINTS  # noqa: E402
from armada.drivers.so101.fake.so101 import So101FakeProcess  # noqa: E402
from armada.runtime.config import CONFIG_DIR, REPO_ROOT, load_embodiment  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.transport import CommandClient  # noqa: E402
from tests.hil.helpers import StateRecorder  # noqa: E402

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "so101_fake.yaml"
EMB = load_embodiment("so101")
CAL = json.loads((CONFIG_DIR / "cells" / "so101_fake_follower.json").read_text())
# Seen by the first read after the fault (a 50 Hz tick) or a silent bus's 0.2 s stale bound, plus
# the state stream and a loaded 2-core host.
FAULT_BOUND_S = 0.5


def fake_cell(folder: Path) -> Path:
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["lease_ttl_s"] = 10.0  # commands seconds apart, no heartbeats
    for name in ("so101_fake_follower.json", "so101_fake_leader.json"):
        shutil.copy(CONFIG_DIR / "cells" / name, folder / name)
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def goal_in_si(sid: int, ticks: int) -> tuple[int, float]:
    """A goal the fake received, back in the action's units (lerobot's DEGREES / RANGE_0_100 maps)."""
    j = sid - 1
    c = CAL[JOINTS[j]]
    if JOINTS[j] == "gripper":
        return j, (ticks - c["range_min"]) / (c["range_max"] - c["range_min"])
    return j, (ticks - (c["range_min"] + c["range_max"]) / 2) * 2 * math.pi / 4095


def test_an_episode_through_armada_run_keeps_every_goal_inside_the_limits(short_tmp):
    with So101FakeProcess(short_tmp) as fake:
        cell = fake_cell(short_tmp)
        result = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "run", str(cell), "--arm", "--duration", "3",
                                 "--run-dir", str(short_tmp)], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        goals = fake.call("goals", bus="follower")["goals"]
        assert len(goals) > 6 * 100, f"{len(goals)} goals"  # ~3 s at 50 Hz, 6 servos
        tol_rad, tol_grip = 1.5 * 2 * math.pi / 4095, 1.5 / 1400  # lerobot truncates to whole ticks
        moved = set()
        for sid, ticks in goals:
            j, g = goal_in_si(sid, ticks)
            tol = tol_grip if j == 5 else tol_rad
            assert EMB.lower[j] - tol <= g <= EMB.upper[j] + tol, (sid, ticks, g)
            if j < 5 and abs(g) > 0.05:
                moved.add(j)
        assert moved, "the episode moved nothing"
        assert set(fake.call("torque", bus="follower")["torque"].values()) == {1}  # the run's end cut no torque


@pytest.fixture
def cell(short_tmp):
    with So101FakeProcess(short_tmp) as fake, CellProcesses(fake_cell(short_tmp), short_tmp) as procs:
        procs.spawn("driver", "robot")
        procs.wait_ready(30.0)
        drv = procs.cell.drivers[0]
        client = CommandClient(procs.ctx, drv.cmd, default_timeout_s=15.0)
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
    client.request("move_to", lease=lease, target=start + np.array([0.4, -0.3, 0.3, 0.3, -0.3, 0.3]))
    rec.wait_mode("running", 2.0)
    time.sleep(0.2)
    return lease


@pytest.mark.parametrize("inject, reason", [
    ({"op": "set_error", "bus": "follower", "id": 3, "overload": True}, "elbow_flex (ID 3) status: overload"),
    ({"op": "set_error", "bus": "follower", "id": 2, "overheat": True}, "shoulder_lift (ID 2) status: overheat"),
    ({"op": "unplug", "bus": "follower"}, "the serial port"),
    # lerobot's packet timeout is the wire time plus 50 ms (its scservo_sdk patch), above the worker's 30 ms
    # answer bound: a silent servo shows as a worker that does not answer, and the core faults after 0.1 s.
    ({"op": "set_missing", "bus": "follower", "id": 5}, "SO-101 on"),
])
def test_a_fault_in_the_driver_process_is_seen_within_the_bound_and_nothing_is_written_after(cell, inject, reason):
    fake, client, rec = cell
    _start_moving(client, rec)
    injected = time.monotonic_ns()
    fake.call(**inject)
    state = rec.wait_mode("fault", 3.0)
    took = (state["mono_ns"] - injected) * 1e-9
    print(f"{inject}: fault after {took * 1e3:.0f} ms: {state['reason']}")
    assert took < FAULT_BOUND_S, took
    assert reason in state["reason"], state["reason"]
    if inject["op"] == "unplug":
        return  # no bus left to count goals on
    time.sleep(0.1)  # writes already in flight have landed
    count = len(fake.call("goals", bus="follower")["goals"])
    time.sleep(0.5)
    assert len(fake.call("goals", bus="follower")["goals"]) == count, "goals sent after the fault"
    tq = fake.call("torque", bus="follower")["torque"]
    if inject["op"] == "set_error":
        assert tq.pop(str(inject["id"])) == 0  # the servo's own protection (Unloading_Condition), not the driver
    assert set(tq.values()) == {1}, tq


def test_clear_fault_refuses_while_the_error_lasts_then_holds_where_the_arm_is(cell):
    fake, client, rec = cell
    lease = _start_moving(client, rec)
    fake.call("set_error", bus="follower", id=2, overload=True)  # the shoulder's protection cuts its torque
    rec.wait_mode("fault", 3.0)
    with pytest.raises(Exception, match="overload"):
        client.request("clear_fault", lease=lease)  # the cause is still there
    fake.call("set_error", bus="follower", id=2)  # the cause is gone (the load came off)
    client.request("clear_fault", lease=lease)
    rec.wait_mode("idle", 3.0)
    assert set(fake.call("torque", bus="follower")["torque"].values()) == {1}  # on again, at the present pose
    pose = [fake.call("position", bus="follower", id=i)["position"] for i in range(1, 7)]
    time.sleep(0.3)
    assert pose == [fake.call("position", bus="follower", id=i)["position"] for i in range(1, 7)]
    client.request("arm", lease=lease)
    rec.wait_mode("armed", 2.0)
