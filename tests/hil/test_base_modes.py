"""A real driver process with a base-velocity group (arm, gripper, lift and base on a mock device):
teleop drives the base by servo while the arm follows a leader; a quiet gamepad ramps the base to
zero; losing the lease ramps the base to zero and holds the arm and the lift. The commanded base
velocity obeys its velocity, acceleration and jerk limits tick by tick in the published state."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from armada.drivers.core.stop_bench import DriverUnderTest
from armada.runtime.config import SCRIPTED_CELL
from tests.unit.test_modes import mobile_emb

pytestmark = pytest.mark.hil

EMB = mobile_emb(200.0)
DT = 1.0 / EMB.control_rate_hz
BASE = slice(4, 7)
VMAX = np.array([0.2, 0.2, 0.45])
AMAX = np.array([0.5, 0.5, 1.0])
JMAX = np.array([2.0, 2.0, 4.0])


@pytest.fixture
def dut(tmp_path: Path):
    (tmp_path / "cells").mkdir()
    (tmp_path / "embodiments").mkdir()
    (tmp_path / "embodiments" / "mobile.yaml").write_text(yaml.safe_dump(EMB.model_dump(mode="json")))
    cell = yaml.safe_load(SCRIPTED_CELL.read_text())
    cell["drivers"][0]["embodiment"] = "mobile"
    cell["drivers"][0]["lease_ttl_s"] = 1.0  # a loaded test host may pause a client for 0.3 s
    cell_path = tmp_path / "cells" / "cell.yaml"
    cell_path.write_text(yaml.safe_dump(cell))
    d = DriverUnderTest(cell_path)
    yield d
    d.close()


def _since(dut: DriverUnderTest, t0_ns: int) -> list[dict]:
    return [m for m in list(dut.states) if m["mono_ns"] >= t0_ns]


def _check_base_limits(states: list[dict]) -> None:
    """Velocity, acceleration and jerk of the commanded base velocity, over consecutive ticks."""
    ticks = np.array([m["counters"]["ticks"] for m in states])
    v = np.stack([m["commanded"][BASE] for m in states])
    assert np.all(np.abs(v) <= VMAX * (1 + 1e-9))
    acc = np.diff(v, axis=0) / DT
    consecutive = np.diff(ticks) == 1  # a state lost in transit would fake a big step
    assert consecutive.mean() > 0.9
    assert np.all(np.abs(acc[consecutive]) <= AMAX * (1 + 1e-9))
    both = consecutive[1:] & consecutive[:-1]
    jerk = np.diff(acc, axis=0) / DT
    assert np.all(np.abs(jerk[both]) <= JMAX * (1 + 1e-6))


def _base_at_rest_since(dut: DriverUnderTest, t0_ns: int) -> int | None:
    """When the commanded base became and stayed zero (driver clock), None if it is not at rest."""
    states = _since(dut, t0_ns)
    if not states or np.any(states[-1]["commanded"][BASE]):
        return None
    moving = [m["mono_ns"] for m in states if np.any(m["commanded"][BASE])]
    return moving[-1] if moving else t0_ns


def test_gamepad_base_with_leader_arm_then_the_gamepad_goes_quiet(dut):
    c = dut.client
    lease = c.request("acquire", client="teleop")["lease"]
    c.request("arm", lease=lease)
    t0 = c.request("ping")["mono_ns"]
    home = EMB.home
    start = time.monotonic()
    last_pad = -1.0
    quiet_at = None
    # Conditions, not sleeps: on a loaded host the loop skips late ticks and the filter ramps per tick.
    while (elapsed := time.monotonic() - start) < 10.0:
        arm = home[:2] + np.array([0.1, -0.1]) * np.sin(2 * np.pi * 0.5 * elapsed)  # the leader
        c.request("servo", lease=lease, group="arm", target=arm)
        if elapsed < 1.5 and elapsed - last_pad >= 0.05:  # a 20 Hz gamepad, for 1.5 s
            c.request("servo", lease=lease, group="base", target=np.array([0.15, -0.1, 0.3]))
            last_pad = elapsed
        elif elapsed >= 1.5 and quiet_at is None:
            quiet_at = c.request("ping")["mono_ns"]
        elif quiet_at is not None:
            rest = _base_at_rest_since(dut, quiet_at)
            if rest is not None and c.request("ping")["mono_ns"] - rest > 1e9:
                break  # at rest for 1 s while the arm still follows
        time.sleep(0.01)
    states = _since(dut, t0)
    driving = [m for m in states if m["mono_ns"] < quiet_at]
    assert np.allclose(driving[-1]["commanded"][BASE], [0.15, -0.1, 0.3], atol=1e-3)
    rest = _base_at_rest_since(dut, quiet_at)
    assert rest is not None, "the base did not stop after the gamepad went quiet"
    after = [m for m in states if m["mono_ns"] > rest]
    assert len(after) > 20 and all(np.all(m["commanded"][BASE] == 0.0) for m in after)
    # Followed for command_timeout_s (in ticks: 50 at 200 Hz) after the last servo, not stopped at once.
    quiet = [m for m in states if quiet_at <= m["mono_ns"] <= rest]
    assert quiet[-1]["counters"]["ticks"] - quiet[0]["counters"]["ticks"] > 50
    assert states[-1]["mode"] in ("running", "armed")  # following the leader (armed between two servos)
    # The arm kept following its leader (within its range) while the base stopped.
    arm = np.stack([m["commanded"][0] for m in after])
    assert np.ptp(arm) > 0.02 and np.all(np.abs(arm) <= 0.1 * 1.05)
    assert c.request("stats")["clamps"]["stale"] > 0
    _check_base_limits(states)


def test_losing_the_lease_ramps_the_base_and_holds_arm_and_lift(dut):
    c = dut.client
    lease = c.request("acquire", client="policy")["lease"]
    c.request("arm", lease=lease)
    now = c.request("ping")["mono_ns"]
    n = 400
    pts = np.tile(EMB.home, (n, 1))
    pts[:, 0] = np.linspace(0.0, 0.8, n)
    pts[:, 3] = np.linspace(0.0, 0.3, n)  # the lift rises
    pts[:, BASE] = [0.2, 0.1, -0.4]
    c.request("trajectory", lease=lease, t0_ns=now + 20_000_000, dt=0.02, points=pts)
    for _ in range(10):  # 1 s with the lease kept
        time.sleep(0.1)
        c.request("heartbeat", lease=lease)
    moving = c.request("ping")["mono_ns"]
    # The controller is gone: no heartbeats (lapse after 1 s, then a ramp of about 0.7 s).
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        rest = _base_at_rest_since(dut, moving)
        if rest is not None and c.request("ping")["mono_ns"] - rest > 0.5e9:
            break
    states = _since(dut, moving)
    assert states[-1]["mode"] == "armed" and c.request("stats")["counters"]["lease_lost"] == 1
    assert np.any(np.abs(states[0]["commanded"][BASE]) > 0.05)
    rest = _base_at_rest_since(dut, moving)
    assert rest is not None, "the base did not stop after the lease was lost"
    end = [m for m in states if m["mono_ns"] > rest]
    assert len(end) > 20 and all(np.all(m["commanded"][BASE] == 0.0) for m in end)
    held = np.stack([m["commanded"][:4] for m in end])
    assert np.all(held == held[-1])  # arm, gripper and lift hold still
    assert held[-1][3] > 0.01  # the lift did not drop: it holds where it stopped
    _check_base_limits(states)
