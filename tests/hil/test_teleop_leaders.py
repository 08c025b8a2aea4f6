"""Teleop on a follower that obeys its leader in hardware (a PiPer in follow_master mode, against the
fake firmware and its scripted master in their own process): teleop only watches, takes no lease,
arms nothing, sends nothing, and says so."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml

from armada.runtime.config import CONFIG_DIR
from armada.runtime.supervisor import CellProcesses
from armada.runtime.teleop.session import TeleopSession
from armada.runtime.teleop.sources import LeaderSource
from tests.hil.helpers import StateRecorder

pytestmark = pytest.mark.hil


def test_a_piper_following_its_master_in_hardware_is_watched_never_commanded(short_tmp, monkeypatch):
    pytest.importorskip("piper_sdk")
    pytest.importorskip("can")
    from armada.drivers.piper.fake.client import FakePiperProcess, free_udp_port, random_group

    port = free_udp_port()
    monkeypatch.setenv("CAN_CONFIG", json.dumps({"port": port}))  # the driver child inherits it
    group = random_group()
    data = yaml.safe_load((CONFIG_DIR / "cells" / "piper_leader_fake.yaml").read_text())
    data["drivers"][0]["backend"]["can"] = group
    cell = short_tmp / "cell.yaml"
    cell.write_text(yaml.safe_dump(data))
    said: list[str] = []
    with FakePiperProcess([group], port, "--home", "--master"), CellProcesses(cell, short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready(30.0)
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        try:
            with TeleopSession(procs.cell, "arm", LeaderSource(), ctx=procs.ctx, say=said.append, arm=True) as s:
                s.engage(lambda q: pytest.fail(f"asked to confirm: {q}"))
                assert s.status.startswith("watching"), s.status
                time.sleep(0.5)
                assert s.lease is None and s.stats.sent == 0
            last = rec.fresh()
        finally:
            rec.stop()
    assert last["device"]["leader_follows_in_hardware"] is True
    assert last["mode"] == "idle" and "lease_holder" not in last  # nothing armed, no lease taken
    assert np.all(np.isfinite(last["device"]["leader"]))
    assert any("watching only" in line for line in said), said


def test_aloha_followers_follow_their_leaders_moved_by_hand_and_hold_when_one_is_unplugged(short_tmp):
    pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is in the `devices` extra")
    from armada.drivers.aloha.fake.aloha import AlohaFakeProcess

    data = yaml.safe_load((CONFIG_DIR / "cells" / "aloha_leader_fake.yaml").read_text())
    data["drivers"][0]["lease_ttl_s"] = 1.0  # a loaded 2-core host; not a lease-timing test
    data["drivers"][0]["backend"]["latency_timer_ms"] = 4.0  # the fake shares the 2 cores
    data["cameras"] = []
    cell = short_tmp / "cell.yaml"
    cell.write_text(yaml.safe_dump(data))
    with AlohaFakeProcess(short_tmp) as fake, CellProcesses(cell, short_tmp) as procs:
        procs.spawn("driver", "robot")
        procs.wait_ready(30.0)
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        try:
            with TeleopSession(procs.cell, "robot", LeaderSource(), ctx=procs.ctx, arm=True) as s:
                s.engage(lambda q: True)
                assert s.status == "following", s.status
                time.sleep(0.5)
                fake.call("move_by_hand", bus="master_left", id=1, position=2048 + 300)  # the left waist, +0.46 rad
                time.sleep(2.0)  # the fake's hand moves at 3 rad/s, twice the follower's limit: it catches up

                def caught_up() -> tuple[np.ndarray, np.ndarray]:
                    last = rec.fresh()
                    return np.asarray(last["device"]["leader"]), np.asarray(last["measured"])

                # On a loaded host the session's loop (and so the follower) runs late: give it up to 6 s more.
                deadline = time.monotonic() + 6.0
                leader, measured = caught_up()
                while abs(measured[0] - leader[0]) >= 0.03 and time.monotonic() < deadline:
                    time.sleep(0.1)
                    leader, measured = caught_up()
                assert abs(leader[0]) > 0.4, leader[0]
                assert abs(measured[0] - leader[0]) < 0.03, (measured[0], leader[0], s.stats.summary())
                assert s.status == "following", s.status
                fake.call("unplug", bus="master_left")
                deadline = time.monotonic() + 2.0
                while not s.status.startswith("holding") and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert s.status.startswith("holding: leader lost"), s.status
                time.sleep(0.3)
                last = rec.fresh()
                assert last["mode"] == "armed" and "reason" not in last, last.get("reason")
        finally:
            rec.stop()
