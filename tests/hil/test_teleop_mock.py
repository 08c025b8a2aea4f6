"""Teleop on the mock cell, real processes: the driver process with the mock arm's scripted leader
(published in its state as device["leader"]), the teleop session in this process, and every state
message recorded beside it to check what the driver commanded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from armada.runtime.config import CONFIG_DIR, REPO_ROOT, load_embodiment
from armada.runtime.supervisor import CellProcesses
from armada.runtime.teleop.session import TeleopError, TeleopSession, follow_rate_hz
from armada.runtime.teleop.sources import KeyboardSource, LeaderSource
from tests.hil.helpers import StateRecorder, commanded_kinematics

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "teleop_mock.yaml"
EMB = load_embodiment("mock_arm")
DT = 1.0 / EMB.control_rate_hz


def teleop_cell(folder: Path, **leader) -> Path:
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["backend"]["leader"].update(leader)
    # Other test runs share this 2-core host: a heartbeat held up past the cell's 0.3 s lapses the
    # lease (the follower then holds, as designed); these tests are about teleop, not lease timing.
    data["drivers"][0]["lease_ttl_s"] = 1.0
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def start_cell(short_tmp):
    opened: list = []

    def start(**leader):
        procs = CellProcesses(teleop_cell(short_tmp, **leader), short_tmp)
        opened.append(procs)
        procs.spawn("driver", "arm")
        procs.wait_ready(20.0)
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        opened.append(rec)
        return procs, rec

    yield start
    for thing in reversed(opened):
        if isinstance(thing, StateRecorder):
            thing.stop()
        else:
            thing.close()


def session(procs, source=None, **kw) -> TeleopSession:
    return TeleopSession(procs.cell, "arm", source or LeaderSource(), ctx=procs.ctx, say=print, **kw)


def yes(question: str) -> bool:
    return True


def leaders(msgs: list[dict]) -> np.ndarray:
    return np.stack([m["device"]["leader"] for m in msgs])


def since(rec: StateRecorder, t_mono: float) -> list[dict]:
    """Messages stamped (driver monotonic clock = ours: same host) from t_mono until now, once the
    recorder has caught up with now (it can lag the driver on a loaded host)."""
    return rec.stamped_between(int(t_mono * 1e9), time.monotonic_ns())


def assert_within_limits(msgs: list[dict]) -> None:
    t, q, v = commanded_kinematics(msgs)
    assert np.all(np.abs(v) <= EMB.max_velocity * (1 + 1e-6)), np.abs(v).max(axis=0)
    assert np.all(q >= EMB.lower) and np.all(q <= EMB.upper)
    # No jump between consecutive ticks: a step is bounded by the velocity limit over the time between them.
    steps = np.abs(np.diff(q, axis=0))
    allowed = EMB.max_velocity * np.maximum(np.diff(t), DT)[:, None] * 1.05 + 1e-9
    assert np.all(steps <= allowed), (steps / allowed).max()


def lag_ticks(leader: np.ndarray, follower: np.ndarray, max_lag: int = 200) -> int:
    """The shift (in state messages) that best lines the follower up behind the leader."""
    errs = [np.mean(np.abs(follower[k:] - leader[:len(leader) - k])) for k in range(max_lag)]
    return int(np.argmin(errs))


def test_follows_the_scripted_leader_within_limits_and_measures_rate_and_latency(start_cell):
    procs, rec = start_cell()
    with session(procs) as s:
        s.engage(yes)
        assert s.status == "following"
        time.sleep(1.5)  # blend-in: the leader moved on during the confirmation
        t0 = time.monotonic()
        time.sleep(3.0)
        window = since(rec, t0)
        assert s.status == "following", (s.status, s.stats.summary(), window[-1]["counters"] if window else None)
        stats = s.stats.summary()
    assert_within_limits(since(rec, t0 - 1.5))
    assert all(m["mode"] in ("running", "armed") for m in window)
    leader, measured, commanded = leaders(window), np.stack([m["measured"] for m in window]), \
        np.stack([m["commanded"] for m in window])
    err = np.abs(measured - leader)[:, :6]
    # The leader moves at up to 2 pi 0.25 Hz 0.3 rad = 0.47 rad/s; the follower runs about two
    # servo periods behind (0.02 rad); a stall of this loaded 2-core host adds to it now and then.
    # A follower that does not track is off by up to the leader's amplitude, 0.3 rad.
    worst = int(np.argmax(err.max(axis=1)))
    assert np.percentile(err, 95) < 0.1 and err.max() < 0.25, \
        (err.max(axis=0), window[worst]["mono_ns"] * 1e-9 - t0, s.stats.summary())
    # The driver refused nothing but targets that reached it after their time (a loaded host; skipped).
    assert window[-1]["counters"]["refused_commands"] == stats["late"], (window[-1]["counters"], stats)
    assert window[-1]["counters"]["lease_lost"] == 0
    period_s = np.median(np.diff([m["mono_ns"] for m in window])) * 1e-9
    lag_cmd = lag_ticks(leader, commanded) * period_s * 1e3
    lag_meas = lag_ticks(leader, measured) * period_s * 1e3
    print(f"mock teleop: servo {stats['rate_hz']:.1f} Hz, interval median {stats['interval_median_ms']:.2f} ms, "
          f"p99 {stats['interval_p99_ms']:.2f} ms, rtt median {stats['rtt_median_ms']:.2f} ms; leader->commanded "
          f"{lag_cmd:.1f} ms, leader->measured {lag_meas:.1f} ms; max |measured-leader| {err[:, :6].max():.4f} rad")
    assert abs(stats["interval_median_ms"] - 1e3 / follow_rate_hz(EMB.control_rate_hz)) < 1.0, stats


def test_unplugging_the_leader_holds_and_plugging_it_back_needs_engage_again(start_cell, short_tmp):
    procs, rec = start_cell()
    unplug = Path(procs.cell.drivers[0].backend.leader.unplug_file)
    with session(procs) as s:
        s.engage(yes)
        time.sleep(1.5)
        t_unplug = time.monotonic()
        unplug.touch()
        time.sleep(1.0)
        assert s.status.startswith("holding: leader lost (mock leader unplugged"), s.status
        held = since(rec, t_unplug)
        # Holding: the commanded pose stops changing within a few ticks of the last servo
        # (the driver settles on the last target), the driver stays armed, no fault, no jump.
        t, q, v = commanded_kinematics(held)
        changed = np.flatnonzero(np.abs(np.diff(q, axis=0)).max(axis=1) > 0)
        stopped_s = (t[changed[-1] + 1] if len(changed) else t[0]) - t_unplug
        print(f"mock teleop: leader unplugged -> commanded pose constant after {stopped_s * 1e3:.0f} ms")
        # Seen at the next servo tick (20 ms), the last target reached in 20 ms, deceleration;
        # a loaded 2-core host adds its stalls.
        assert stopped_s < 0.5, stopped_s
        assert np.all(v[-10:] == 0)
        assert held[-1]["mode"] == "armed", held[-1]["mode"]
        assert "reason" not in held[-1]
        assert_within_limits(since(rec, t_unplug - 0.5))
        assert held[-1]["lease_holder"] == "teleop"  # kept by heartbeats: nobody else takes the arm
        # Plugged back: nothing resumes by itself.
        unplug.unlink()
        t_back = time.monotonic()
        time.sleep(1.0)
        assert s.status.startswith("holding"), s.status
        back = since(rec, t_back)
        t_b, q_back, _ = commanded_kinematics(back)
        assert np.ptp(q_back, axis=0).max() < 1e-9, [(round(tt - t_back, 3), m["mode"], m.get("lease_holder"), m["commanded"][2])
                                                     for tt, m in zip(t_b, back)][::10]
        # Engage again: a ramped move to where the leader is now, then following.
        t_engage = time.monotonic()
        s.engage(yes)
        assert s.status == "following"
        time.sleep(0.5)
    assert_within_limits(since(rec, t_engage))


def test_engaging_a_far_leader_is_a_ramped_move_not_a_jump(start_cell):
    offset = [0.0, 0.8, -0.8, 0.0, 0.0, 0.9, 0.0]  # far beyond max_engage_distance (0.2 rad)
    procs, rec = start_cell(amplitude=0.0, gripper_amplitude=0.0, offset=offset)
    start = np.asarray(rec.wait_mode("idle", 2.0)["measured"])
    with session(procs) as s:
        t0 = time.monotonic()
        s.engage(yes)
        took = time.monotonic() - t0
        moved = since(rec, t0)
        time.sleep(0.5)
        assert s.status == "following", s.status  # a leader standing still is followed, not "lost"
    t, q, v = commanded_kinematics(moved)
    ramp = EMB.move_to_velocity_fraction * EMB.max_velocity
    # move_to's ramp (a quarter of the limits) on the host's clock; a late tick of this loaded
    # 2-core host is caught up within the full limit now and then (the filter's own job), so the
    # bulk of the motion is checked here and the hard limit in assert_within_limits below.
    moving = np.abs(v).max(axis=1) > 0
    k = 5
    v_wall = np.abs((q[k:] - q[:-k]) / (t[k:] - t[:-k])[:, None]) / ramp
    assert np.median(v_wall[moving[k:]].max(axis=1)) <= 1.1, np.median(v_wall[moving[k:]].max(axis=1))
    distance = np.abs(EMB.home + offset - start)
    assert t[moving][-1] - t[moving][0] >= 0.9 * (distance / ramp).max()
    assert np.abs(q[-1] - (EMB.home + offset)).max() < 0.01
    # 0.9 rad at a quarter of 6.28 rad/s takes over half a second: not one tick.
    assert took > 0.5, took
    assert np.abs(q[-1] - start).max() > 0.8
    assert_within_limits(moved)


def test_a_follower_that_obeys_its_leader_in_hardware_is_only_watched(start_cell):
    procs, rec = start_cell(follows_in_hardware=True)
    with session(procs) as s:
        s.engage(yes)
        assert s.status.startswith("watching"), s.status
        time.sleep(0.5)
        assert s.lease is None and s.stats.sent == 0
    last = rec.fresh()
    assert last["mode"] == "idle" and "lease_holder" not in last
    assert np.abs(np.asarray(last["measured"]) - np.asarray(last["device"]["leader"])).max() < 0.05  # the arm obeys it


def test_a_disarmed_real_cell_is_not_armed_without_arm(start_cell, monkeypatch):
    procs, rec = start_cell()
    s = session(procs)
    s.allow_arm = False  # as on a cell that moves real hardware without --arm
    try:
        with pytest.raises(TeleopError, match="--arm"):
            s.engage(yes)
    finally:
        s.close()
    assert rec.latest()["mode"] == "idle"


def test_keyboard_jogging_moves_one_joint_by_its_steps(start_cell):
    procs, rec = start_cell()
    src = KeyboardSource(step=0.05)
    with session(procs, src) as s:
        s.engage(yes)
        start = np.asarray(rec.latest()["commanded"])
        for key in ["2", "up", "up", "up", "3", "down"]:
            src.on_key(key)
            time.sleep(0.1)  # a target never leads the commanded pose by more than half the engage distance
        expected = np.zeros(EMB.dof)
        expected[1], expected[2] = 0.15, -0.05
        # At least 0.5 s, then until the arm is there: a loaded host's recorder can lag the driver.
        time.sleep(0.5)
        deadline = time.monotonic() + 5.0
        while True:
            delta = np.asarray(rec.latest()["measured"]) - start
            if np.abs(delta - expected).max() < 0.005 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert np.abs(delta - expected).max() < 0.005, delta


def test_armada_teleop_cli_starts_the_driver_follows_and_stops(short_tmp):
    cell = teleop_cell(short_tmp)
    stats = short_tmp / "stats.json"
    result = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "teleop", str(cell), "--run-dir",
                             str(short_tmp), "--yes", "--duration", "2", "--stats", str(stats)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for line in ("starting them", "moving to the leader's pose", "yes (--yes)", "following the leader at 100 Hz",
                 "stopping the drivers it started"):
        assert line in out, out
    import json

    assert json.loads(stats.read_text())["arm"]["sent"] > 50, out[-3000:]


def test_intervention_takes_the_arm_from_the_policy_and_hands_it_back_without_a_jump(short_tmp):
    from armada.runtime.inference.client import EpisodeClient
    from armada.runtime.teleop.intervention import Intervention

    with CellProcesses(teleop_cell(short_tmp), short_tmp) as procs:
        procs.start_all()
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        client = EpisodeClient(procs.ctx, procs.cell)
        s = session(procs)
        iv = Intervention(procs.cell, [s], procs.ctx, print)
        try:
            with pytest.raises(TeleopError, match="intervene refused"):
                iv.take_over(yes)  # no episode runs
            episode = client.start("auto", duration_s=6.0, arm=True)
            time.sleep(1.0)
            t_take = time.monotonic()
            iv.take_over(yes)
            assert s.status == "following"
            time.sleep(1.0)
            assert rec.fresh().get("lease_holder") == "teleop", (s.status, s.stats.summary())
            t_back = time.monotonic()
            iv.hand_back()
            assert s.lease is None
            report = client.wait_report(episode, 15.0)
        finally:
            s.close()
            iv.close()
            client.close()
            msgs = rec.stop()
    print(f"intervention: episode {report['outcome']}, intervened {report.get('intervened_s', 0):.2f} s")
    assert report["outcome"] == "completed", report
    assert report.get("interventions") == 1 and report.get("intervened_s", 0) > 0.5
    window = [m for m in msgs if t_take - 0.5 <= m["mono_ns"] * 1e-9 <= t_back + 1.0]
    assert_within_limits(window)  # no jump into teleop, nor back into the policy
    holders = [m.get("lease_holder", "") for m in window]
    assert "teleop" in holders and holders[-1] not in ("", "teleop"), sorted(set(holders))


def test_a_silent_driver_is_a_lost_leader_and_the_follower_holds_when_it_comes_back(start_cell):
    import signal

    procs, rec = start_cell()
    driver = procs.child("arm").proc
    with session(procs) as s:
        s.engage(yes)
        time.sleep(0.5)
        driver.send_signal(signal.SIGSTOP)  # no state, no replies: as good as dead for 0.6 s
        try:
            time.sleep(0.6)
            assert s.status.startswith("holding: leader lost (no state from driver arm"), s.status
        finally:
            driver.send_signal(signal.SIGCONT)
        t_back = time.monotonic()
        time.sleep(0.8)
        assert s.status.startswith("holding"), s.status  # no resuming by itself
        back = since(rec, t_back)
        assert back[-1]["mode"] == "armed" and "reason" not in back[-1]
        _, q, _ = commanded_kinematics(back[len(back) // 2:])
        assert np.ptp(q, axis=0).max() == 0  # settled on the last target
    assert_within_limits(since(rec, t_back - 1.0))
