"""The sim driver as an operator runs it: `armada driver` on configs/cells/sim_so101.yaml in its own
process (backend kind mujoco built through the registry), its state carrying device["sim"], the sim
control socket, a move, and an e-stop that latches and holds the simulated arm."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mujoco", reason="mujoco is in the `sim` extra")

from armada.drivers.sim.control import SimControl  # noqa: E402
from armada.runtime.config import CONFIG_DIR, load_embodiment  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.transport import CommandClient  # noqa: E402
from tests.hil.helpers import StateRecorder  # noqa: E402

pytestmark = pytest.mark.hil

EMB = load_embodiment("so101")


def sim_cell(folder: Path) -> Path:
    data = yaml.safe_load((CONFIG_DIR / "cells" / "sim_so101.yaml").read_text())
    data["drivers"][0]["lease_ttl_s"] = 10.0  # commands seconds apart, no heartbeats
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sim(short_tmp):
    with CellProcesses(sim_cell(short_tmp), short_tmp) as procs:
        procs.spawn("driver", "robot")
        procs.wait_ready(30.0)
        drv = procs.cell.drivers[0]
        client = CommandClient(procs.ctx, drv.cmd, default_timeout_s=10.0)
        rec = StateRecorder(procs.ctx, drv.state)
        control = SimControl(drv.backend.control, timeout_s=3.0, ctx=procs.ctx)
        try:
            yield client, rec, control
        finally:
            control.close()
            rec.stop()
            client.close()


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def test_state_carries_the_sim_and_a_move_then_estop_holds(sim):
    client, rec, control = sim
    first = _wait(lambda: len(rec.messages) > 20 and rec.messages, 5.0, "20 state messages")
    sims = [m["device"]["sim"] for m in first[-20:]]
    assert all(s["task"] == "reach_cube" and len(s["qpos"]) == 20 for s in sims)
    steps = np.diff([s["time_s"] for s in sims])
    assert np.allclose(steps[steps > 0], 0.02, atol=1e-9)  # one control period per tick, never a jump
    assert np.allclose(first[-1]["measured"], EMB.home, atol=0.01)

    objects = control.reset("press_button", 4)
    assert list(objects) == ["button"]
    _wait(lambda: rec.latest()["device"]["sim"]["task"] == "press_button", 2.0, "the reset in the state")
    assert control.state()["seed"] == 4

    lease = client.request("acquire", client="test")["lease"]
    client.request("arm", lease=lease)
    rec.wait_mode("armed", 2.0)
    target = EMB.home + np.array([0.3, -0.2, 0.2, 0.2, 0.0, -0.3])
    duration = client.request("move_to", lease=lease, target=target)["duration_s"]
    _wait(lambda: np.allclose(rec.latest()["measured"], target, atol=0.03), duration + 3.0, f"the arm at {target}")
    state = rec.latest()
    qpos = np.array(state["device"]["sim"]["qpos"])
    assert np.allclose(qpos[:5], state["measured"][:5], atol=1e-6)  # the published scene is the measured arm

    client.request("move_to", lease=lease, target=EMB.home)
    rec.wait_mode("running", 2.0)
    time.sleep(0.3)
    client.request("estop", reason="test")
    stopped = np.asarray(rec.wait_mode("estop", 2.0)["measured"])
    t0 = rec.latest()["device"]["sim"]["time_s"]
    time.sleep(1.0)
    last = rec.fresh()
    assert last["mode"] == "estop"  # latched
    assert last["device"]["sim"]["time_s"] > t0 + 0.5  # the physics runs on, holding
    assert np.allclose(last["measured"], stopped, atol=0.05), (last["measured"], stopped)
    assert np.abs(np.asarray(last["measured"]) - EMB.home).max() > 0.1  # it did not go on home
    client.request("reset_estop", lease=lease)
    rec.wait_mode("idle", 2.0)
