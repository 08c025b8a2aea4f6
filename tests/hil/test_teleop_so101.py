"""Teleop on the SO-101 path, real processes: the fake Feetech buses in their own process (`armada fake
so101`), the driver process reading the leader arm every tick through lerobot's bus (published as
state device["leader"], `leader_in_state: true`), the teleop session here. The leader is moved "by
hand" and unplugged through the fake's control socket."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("lerobot.motors.feetech", reason="lerobot is installed without dependencies (README)")

from armada.drivers.so101.fake.so101 import So101FakeProcess  # noqa: E402
from armada.runtime.config import CONFIG_DIR, load_embodiment  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.teleop.session import TeleopSession  # noqa: E402
from armada.runtime.teleop.sources import LeaderSource  # noqa: E402
from tests.hil.helpers import StateRecorder, commanded_kinematics  # noqa: E402

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "teleop_so101_fake.yaml"
EMB = load_embodiment("so101")


def fake_cell(folder: Path) -> Path:
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["lease_ttl_s"] = 1.0  # a loaded 2-core host; these tests are not about lease timing
    for name in ("so101_fake_follower.json", "so101_fake_leader.json"):
        shutil.copy(CONFIG_DIR / "cells" / name, folder / name)
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def so101(short_tmp):
    with So101FakeProcess(short_tmp) as fake, CellProcesses(fake_cell(short_tmp), short_tmp) as procs:
        procs.spawn("driver", "robot")
        procs.wait_ready(30.0)
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        try:
            yield fake, procs, rec
        finally:
            rec.stop()


def since(rec: StateRecorder, t: float) -> list[dict]:
    """States stamped from t until now, once the recorder (which can lag on a loaded host) has them."""
    return rec.stamped_between(int(t * 1e9), time.monotonic_ns())


def test_the_follower_follows_the_leader_moved_by_hand_then_holds_when_it_is_unplugged(so101):
    fake, procs, rec = so101
    with TeleopSession(procs.cell, "robot", LeaderSource(), ctx=procs.ctx, arm=True) as s:
        s.engage(lambda q: True)
        assert s.status == "following", s.status
        time.sleep(0.5)
        # Move the leader's shoulder_pan and elbow by hand (about 0.46 rad each, at 800 ticks/s).
        pan = fake.call("position", bus="leader", id=1)["position"]
        elbow = fake.call("position", bus="leader", id=3)["position"]
        t_move = time.monotonic()
        fake.call("move_by_hand", bus="leader", id=1, position=pan + 300, speed=800.0)
        fake.call("move_by_hand", bus="leader", id=3, position=elbow - 300, speed=800.0)
        time.sleep(1.5)
        moved = since(rec, t_move)
        assert s.status == "following", s.status
        last = moved[-1]
        leader, measured = np.asarray(last["device"]["leader"]), np.asarray(last["measured"])
        assert abs(leader[0] - leader_start(moved)[0]) > 0.4  # the leader did move
        assert np.abs(measured - leader)[:5].max() < 0.03, (measured, leader)  # a tick or two of quantisation
        _, q, v = commanded_kinematics(moved)
        assert np.all(np.abs(v) <= EMB.max_velocity * (1 + 1e-6))
        assert np.all(q >= EMB.lower) and np.all(q <= EMB.upper)
        stats = s.stats.summary()
        lag = lag_ms(moved)
        onset = onset_ms(moved)
        print(f"so101 teleop: servo {stats['rate_hz']:.1f} Hz, interval median {stats['interval_median_ms']:.2f} ms, "
              f"p99 {stats['interval_p99_ms']:.2f} ms, rtt median {stats['rtt_median_ms']:.2f} ms; "
              f"leader->commanded {lag[0]:.0f} ms, leader->measured {lag[1]:.0f} ms (best shift over the move, "
              f"the follower's acceleration limit included); onset: leader starts -> commanded starts {onset:.0f} ms")
        assert onset < 150, onset

        # Unplug the leader: the driver publishes leader None with why; the follower holds, armed.
        t_unplug = time.monotonic()
        fake.call("unplug", bus="leader")
        deadline = time.monotonic() + 2.0
        while not s.status.startswith("holding") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.status.startswith("holding: leader lost"), s.status
        time.sleep(0.5)
        held = since(rec, t_unplug)
        assert held[-1]["device"]["leader"] is None and held[-1]["device"]["leader_error"]
        assert held[-1]["mode"] == "armed" and "reason" not in held[-1], held[-1].get("reason")
        t, q, _ = commanded_kinematics(held)
        changed = np.flatnonzero(np.abs(np.diff(q, axis=0)).max(axis=1) > 0)
        stopped_s = (t[changed[-1] + 1] if len(changed) else t[0]) - t_unplug
        print(f"so101 teleop: leader unplugged -> holding after {stopped_s * 1e3:.0f} ms ({s.status})")
        assert stopped_s < 0.6


def leader_start(msgs: list[dict]) -> np.ndarray:
    return np.asarray(msgs[0]["device"]["leader"])


def lag_ms(msgs: list[dict]) -> tuple[float, float]:
    """Leader -> commanded and leader -> measured delay: the shift that best lines them up."""
    msgs = [m for m in msgs if m["device"].get("leader") is not None]
    leader = np.stack([m["device"]["leader"] for m in msgs])[:, [0, 2]]
    period_s = np.median(np.diff([m["mono_ns"] for m in msgs])) * 1e-9
    out = []
    for key in ("commanded", "measured"):
        f = np.stack([m[key] for m in msgs])[:, [0, 2]]
        errs = [np.mean(np.abs(f[k:] - leader[:len(leader) - k])) for k in range(min(40, len(msgs) // 2))]
        out.append(int(np.argmin(errs)) * period_s * 1e3)
    return out[0], out[1]


def onset_ms(msgs: list[dict], threshold: float = 0.005) -> float:
    """From the first state whose leader has moved to the first whose commanded pose has (pan joint)."""
    leader = np.array([m["device"]["leader"][0] for m in msgs])
    commanded = np.array([m["commanded"][0] for m in msgs])
    t = np.array([m["mono_ns"] for m in msgs]) * 1e-6
    lead = np.flatnonzero(np.abs(leader - leader[0]) > threshold)[0]
    follow = np.flatnonzero(np.abs(commanded - commanded[0]) > threshold)[0]
    return float(t[follow] - t[lead])
