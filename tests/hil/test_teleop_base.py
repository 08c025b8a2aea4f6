"""Teleop of a mobile manipulator: the arms follow one source while a gamepad drives the base
(the ARX Lift 2 on its kinematic fakes, a real driver process). The base source here is scripted;
the gamepad's mapping is unit-tested in tests/unit/test_teleop_sources.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import yaml

from armada.runtime.config import CONFIG_DIR, load_embodiment
from armada.runtime.supervisor import CellProcesses
from armada.runtime.teleop.session import TeleopError, TeleopSession
from armada.runtime.teleop.sources import KeyboardSource
from tests.hil.helpers import StateRecorder

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "arx_lift2_fake.yaml"
EMB = load_embodiment("arx_lift2")
BASE = slice(15, 18)
ARMS_AND_LIFT = np.r_[0:15]


class ScriptedBase:
    """A base source whose command the test sets (a gamepad stick, without the gamepad)."""

    name = "scripted base"
    reason = ""

    def __init__(self) -> None:
        self.command = np.zeros(3)
        self.lock = threading.Lock()

    def set(self, vx: float, vy: float, wz: float) -> None:
        with self.lock:
            self.command = np.array([vx, vy, wz])

    def velocity(self) -> np.ndarray:
        with self.lock:
            return self.command.copy()

    def close(self) -> None:
        pass


@pytest.fixture
def cell(short_tmp):
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["backend"]["fake_dir"] = str(short_tmp / "arx")
    data["drivers"][0]["lease_ttl_s"] = 1.0  # a loaded 2-core host; this test is about teleop
    data["cameras"] = []
    path = short_tmp / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    with CellProcesses(path, short_tmp) as procs:
        procs.spawn("driver", "robot")
        procs.wait_ready(20.0)
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        try:
            yield procs, rec
        finally:
            rec.stop()


def wait_for(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_the_base_drives_from_its_source_while_the_arms_hold_their_source(cell):
    procs, rec = cell
    base = ScriptedBase()
    session = TeleopSession(procs.cell, "robot", KeyboardSource(), ctx=procs.ctx, say=print, arm=True, base=base)
    try:
        session.engage(lambda q: True)
        assert session.following, session.status
        held = np.array(rec.latest()["commanded"])
        base.set(0.2, 0.0, 0.3)
        assert wait_for(lambda: np.allclose(rec.latest()["commanded"][15:18], [0.2, 0.0, 0.3], atol=1e-6), 5.0), \
            rec.latest()["commanded"][15:18]
        assert wait_for(lambda: abs(rec.latest()["measured"][15] - 0.2) < 0.03, 3.0), rec.latest()["measured"][15:18]
        base.set(0.0, 0.0, 0.0)  # stick released
        assert wait_for(lambda: not np.any(rec.latest()["commanded"][15:18]), 5.0), rec.latest()["commanded"][15:18]
        moving = [m for m in rec.messages if np.any(m["commanded"][15:18])]
        assert session.following, session.status
    finally:
        session.close()
    assert moving
    q = np.array([m["commanded"] for m in moving])
    # The arms and the lift stayed where the keyboard source held them while the base drove.
    assert np.max(np.abs(q[:, ARMS_AND_LIFT] - held[ARMS_AND_LIFT])) < 1e-6
    assert np.all(np.abs(q[:, BASE]) <= EMB.upper[BASE] + 1e-9)


def test_a_base_source_that_goes_quiet_stops_the_base_and_closing_the_session_leaves_it_at_rest(cell):
    procs, rec = cell
    base = ScriptedBase()
    session = TeleopSession(procs.cell, "robot", KeyboardSource(), ctx=procs.ctx, say=print, arm=True, base=base)
    try:
        session.engage(lambda q: True)
        base.set(0.15, 0.05, 0.0)
        assert wait_for(lambda: abs(rec.latest()["commanded"][15] - 0.15) < 1e-6, 5.0)
    finally:
        session.close()  # the lease goes: the driver ramps the base to zero and holds the arms
    assert wait_for(lambda: not np.any(rec.latest()["commanded"][15:18]), 3.0), rec.latest()["commanded"][15:18]
    assert rec.latest()["mode"] in ("armed", "idle"), rec.latest()["mode"]


def test_a_base_source_on_a_robot_without_a_base_is_refused(short_tmp):
    from armada.runtime.config import load_cell

    cell = load_cell(CONFIG_DIR / "cells" / "teleop_mock.yaml", short_tmp)
    with pytest.raises(TeleopError, match="no mobile base"):
        TeleopSession(cell, "arm", KeyboardSource(), say=print, base=ScriptedBase())
