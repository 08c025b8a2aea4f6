"""A PiPer driver process against the fake firmware process: a motor that drops out, a mode switched
on the arm, a power cycle. Each faults the driver within a bound, nothing moves afterwards, and
clear_fault takes the arm back (confirmed) where it stands, so arming and moving do not jump."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("piper_sdk")
pytest.importorskip("can")

from armada.drivers.piper.fake.client import FakePiperProcess, free_udp_port, random_group  # noqa: E402
from armada.runtime.config import CONFIG_DIR, load_embodiment  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.transport import CommandClient  # noqa: E402
from tests.hil.helpers import StateRecorder  # noqa: E402

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "piper_fake.yaml"
EMB = load_embodiment("piper")
DT = 1.0 / EMB.control_rate_hz
MDEG_PER_RAD = math.degrees(1.0) * 1000.0
# Motor frames every 20 ms and status frames every 5 ms in the fake; the driver faults on the first
# reading that shows it. The rest is a loaded 2-core host.
FAULT_BOUND_S = 0.3


@pytest.fixture
def bus(monkeypatch):
    port = free_udp_port()
    monkeypatch.setenv("CAN_CONFIG", json.dumps({"port": port}))
    return random_group(), port


def fake_cell(folder: Path, group: str) -> Path:
    data = yaml.safe_load(CELL.read_text())
    drv = data["drivers"][0]
    drv["backend"]["can"] = group
    drv.pop("realtime_priority", None)  # the normal scheduler, as on CI
    drv["lease_ttl_s"] = 10.0  # commands seconds apart, no heartbeats: a lapsing lease is tested elsewhere
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def cell(bus, short_tmp):
    group, port = bus
    with FakePiperProcess([group], port, "--home") as fake, \
            CellProcesses(fake_cell(short_tmp, group), short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready(15.0)
        drv = procs.cell.drivers[0]
        client = CommandClient(procs.ctx, drv.cmd, default_timeout_s=10.0)
        rec = StateRecorder(procs.ctx, drv.state)
        try:
            yield fake, group, client, rec
        finally:
            rec.stop()
            client.close()


def _wait(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def _start_moving(client, rec, lease: str) -> np.ndarray:
    client.request("arm", lease=lease)
    start = np.asarray(rec.wait_mode("armed", 2.0)["measured"])
    goal = start + np.array([0.5, 0.3, -0.3, 0.2, -0.2, 0.4, 0.0])
    client.request("move_to", lease=lease, target=goal)
    rec.wait_mode("running", 2.0)
    time.sleep(0.2)  # well under way
    return goal


# What the fault names (a regular expression). Each motor reports its enable state in a frame of its
# own, so the driver faults on the first one that says disabled: with every motor disabled, the
# reason names the motors whose frames had arrived by then (one or all of them).
INJECTIONS = {
    "one motor disabled": ("disable {g} 3", r"motor joint_3 disabled"),
    "all motors disabled": ("disable {g}", r"motors? joint_[1-6](, joint_[1-6])* disabled"),
    "teaching mode": ("mode {g} teach", r"teaching mode, not CAN command mode"),
    "standby mode": ("mode {g} standby", r"standby mode, not CAN command mode"),
    "power cycle": ("powercycle {g}", r"standby mode, not CAN command mode"),
}


@pytest.mark.parametrize("what", list(INJECTIONS))
def test_a_lost_motor_or_mode_faults_within_the_bound_and_nothing_moves_after(cell, what):
    fake, g, client, rec = cell
    lease = client.request("acquire", client="test")["lease"]
    _start_moving(client, rec, lease)
    line, reason = INJECTIONS[what]
    injected_ns = time.monotonic_ns()
    fake.cmd(line.format(g=g))
    state = rec.wait_mode("fault", 2.0)
    took = (state["mono_ns"] - injected_ns) * 1e-9
    print(f"{what}: fault after {took * 1e3:.0f} ms: {state['reason']}")
    assert took < FAULT_BOUND_S, took
    assert re.search(reason, state["reason"]), state["reason"]
    fault_s = state["mono_ns"] * 1e-9
    time.sleep(0.3)  # whatever was in flight has arrived; an enabled joint settles on its last target
    q_settled = np.asarray(fake.state(g)["q"])
    time.sleep(0.5)
    assert fake.targets(g, fault_s + 0.05) == []  # no frame after the fault
    assert np.allclose(fake.state(g)["q"], q_settled, atol=1e-5)
    assert rec.latest()["mode"] == "fault"


def test_after_a_power_cycle_clear_fault_re_enables_and_the_next_move_starts_where_the_arm_is(cell):
    fake, g, client, rec = cell
    lease = client.request("acquire", client="test")["lease"]
    _start_moving(client, rec, lease)
    q_now = np.degrees(fake.state(g)["q"])
    sagged = q_now + np.array([0.0, -3.0, 2.0, 0.0, 1.5, 0.0])  # it sagged while the power was off
    fake.cmd(f"powercycle {g} " + " ".join(f"{v:.4f}" for v in sagged))
    rec.wait_mode("fault", 2.0)
    state = fake.state(g)
    assert state["ctrl_mode"] == 0 and not any(state["enabled"])
    t0 = time.monotonic()
    client.request("clear_fault", lease=lease)
    print(f"clear_fault after a power cycle: {1e3 * (time.monotonic() - t0):.0f} ms")
    state = fake.state(g)
    assert state["ctrl_mode"] == 1 and all(state["enabled"]), state  # confirmed before the reply
    idle = rec.wait_mode("idle", 2.0)
    assert np.allclose(idle["measured"][:6], np.radians(sagged), atol=1e-3)
    time.sleep(0.2)
    assert np.allclose(np.degrees(fake.state(g)["q"]), sagged, atol=0.01)  # it holds where it stands
    since = time.monotonic()
    client.request("arm", lease=lease)
    start = np.asarray(rec.wait_mode("armed", 2.0)["measured"])
    goal = start + np.array([0.1, 0.05, -0.05, 0.0, 0.05, 0.1, 0.0])
    client.request("move_to", lease=lease, target=goal)
    assert _wait(lambda: np.allclose(fake.state(g)["q"], goal[:6], atol=2e-3), 8.0), fake.state(g)["q"]
    sent = np.array([q for _, q in fake.targets(g, since)])
    assert np.abs(sent[0] - np.radians(sagged)).max() < 0.01, sent[0] - np.radians(sagged)  # first target: here
    step = np.abs(np.diff(sent, axis=0)).max(axis=0)
    assert np.all(step <= EMB.max_velocity[:6] * DT + 1.0 / MDEG_PER_RAD), step / DT
