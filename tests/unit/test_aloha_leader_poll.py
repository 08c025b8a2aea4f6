"""LeaderPoll (drivers/aloha/leader.py, used by the ALOHA and SO-101 backends): what a follower's
reading says about its leader through lost replies, a silent bus, an unplugged and replugged port,
with scripted read/reopen functions instead of a bus."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from armada.drivers.aloha.leader import LeaderPoll
from armada.drivers.core.backend import BackendError

STALE_S, RETRY_S = 0.05, 0.1


class Leader:
    """A scripted leader: its pose, whether it answers, whether its port is open."""

    def __init__(self):
        self.pose = np.array([0.1, 0.2, 0.3])
        self.answers = True
        self.port_open = False  # opened by the poll, as after connect
        self.plugged = True
        self.reads = self.reopens = self.closes = 0
        self.reopen_gate = threading.Event()
        self.reopen_gate.set()

    def read(self) -> np.ndarray:
        self.reads += 1
        if not self.port_open:
            raise BackendError("leader: the serial port failed: EIO", transient=False)
        if not self.plugged:
            self.port_open = False
            raise BackendError("leader: the serial port failed: EIO", transient=False)
        if not self.answers:
            raise BackendError("leader: no status packet")
        return self.pose.copy()

    def reopen(self) -> None:
        self.reopens += 1
        self.reopen_gate.wait(2.0)
        if not self.plugged:
            raise BackendError("leader: no serial port /dev/ttyLEADER", transient=False)
        self.port_open = True

    def close(self) -> None:
        self.closes += 1
        self.port_open = False

    def poll(self) -> LeaderPoll:
        p = LeaderPoll("leader", self.read, lambda: not self.port_open, self.reopen, self.close, stale_s=STALE_S,
                       retry_s=RETRY_S)
        p.start()
        return p


def until(poll: LeaderPoll, pred, timeout_s: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        out = poll.extras()
        if pred(out):
            return out
        assert time.monotonic() < deadline, f"not within {timeout_s} s; last: {out}"
        time.sleep(0.002)


def test_opened_in_the_background_then_read_every_tick():
    leader = Leader()
    poll = leader.poll()
    first = poll.extras()
    assert first["leader"] is None and "opening its port" in first["leader_error"]
    out = until(poll, lambda o: o["leader"] is not None)
    assert out == {"leader": [0.1, 0.2, 0.3], "leader_follows_in_hardware": False}
    leader.pose[0] = 0.5
    assert poll.extras()["leader"][0] == 0.5  # the very next tick
    assert leader.reopens == 1


def test_a_lost_reply_keeps_the_last_pose_a_silent_leader_is_none_then_tried_only_every_retry():
    leader = Leader()
    poll = leader.poll()
    until(poll, lambda o: o["leader"] is not None)
    leader.answers = False
    out = poll.extras()
    assert out["leader"] == [0.1, 0.2, 0.3] and "leader_error" not in out  # one lost reply: not a lost leader
    t0 = time.monotonic()
    out = until(poll, lambda o: o["leader"] is None)
    assert time.monotonic() - t0 < STALE_S + 0.03
    assert "no status packet" in out["leader_error"] and "no reading for" in out["leader_error"]
    reads = leader.reads
    t_end = time.monotonic() + 3 * RETRY_S
    while time.monotonic() < t_end:  # ticks at 500 Hz: the silent bus is tried about 3 times, not 150
        assert poll.extras()["leader"] is None
        time.sleep(0.002)
    assert 2 <= leader.reads - reads <= 4, leader.reads - reads
    leader.answers = True
    leader.pose[1] = -0.2
    out = until(poll, lambda o: o["leader"] is not None, 2 * RETRY_S)
    assert out["leader"] == [0.1, -0.2, 0.3] and "leader_error" not in out


def test_an_unplugged_port_is_none_at_once_and_reopened_when_it_is_back():
    leader = Leader()
    poll = leader.poll()
    until(poll, lambda o: o["leader"] is not None)
    leader.plugged = False
    out = poll.extras()
    assert out["leader"] is None and "EIO" in out["leader_error"]  # the first tick after the unplug
    time.sleep(3 * RETRY_S)
    out = until(poll, lambda o: "no serial port" in (o.get("leader_error") or ""))
    assert out["leader"] is None
    leader.plugged = True
    out = until(poll, lambda o: o["leader"] is not None, 4 * RETRY_S)
    assert out["leader"] == [0.1, 0.2, 0.3]
    assert leader.reopens >= 2


def test_a_slow_reopen_never_holds_up_a_tick_and_stop_closes_what_it_opens():
    leader = Leader()
    leader.reopen_gate.clear()  # the reopen hangs (a silent bus being pinged)
    poll = leader.poll()
    for _ in range(20):
        t = time.perf_counter()
        out = poll.extras()
        assert time.perf_counter() - t < 0.005 and out["leader"] is None
        time.sleep(0.002)
    assert leader.reopens == 1  # one at a time
    poll.stop()  # the backend closes while the reopen still runs
    leader.reopen_gate.set()
    deadline = time.monotonic() + 2.0
    while leader.closes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leader.closes == 1 and not leader.port_open


@pytest.mark.parametrize("exc", [RuntimeError("SDK bug"), BackendError("no port", transient=False)])
def test_a_reopen_that_raises_is_reported_not_raised(exc):
    poll = LeaderPoll("leader", lambda: np.zeros(3), lambda: True, lambda: (_ for _ in ()).throw(exc), lambda: None,
                      stale_s=STALE_S, retry_s=RETRY_S)
    poll.start()
    out = until(poll, lambda o: o["leader_error"] and "not read yet" not in o["leader_error"])
    assert out["leader"] is None and str(exc) in out["leader_error"]
