"""LeaderPoll (drivers/core/leader.py, used by the ALOHA and SO-101 backends): what a follower's
reading says about its leader through lost replies, a silent bus, an unplugged and replugged port,
with scripted read/reopen functions instead of a bus."""

from __future__ import annotations

import time

import numpy as np

from armada.drivers.core.leader import LeaderPoll
from armada.drivers.core.backend import BackendError

STALE_S, RETRY_S = 0.05, 0.1


class Leader:
    """A scripted leader: its pose, whether it answers, whether its port is open or plugged in."""

    def __init__(self):
        self.pose = np.array([0.1, 0.2, 0.3])
        self.answers = True
        self.port_open = True
        self.plugged = True
        self.reads = self.reopens = 0

    def read(self) -> np.ndarray:
        self.reads += 1
        if not self.plugged:
            self.port_open = False
        if not self.port_open:
            raise BackendError("leader: the serial port failed: EIO", transient=False)
        if not self.answers:
            raise BackendError("leader: no status packet")
        return self.pose.copy()

    def reopen(self) -> None:
        self.reopens += 1
        if not self.plugged:
            raise BackendError("leader: no serial port /dev/ttyLEADER", transient=False)
        self.port_open = True

    def poll(self, error: str | None = None) -> LeaderPoll:
        p = LeaderPoll("leader", self.read, lambda: not self.port_open, self.reopen, stale_s=STALE_S, retry_s=RETRY_S)
        p.start(error)
        return p


def until(poll: LeaderPoll, pred, timeout_s: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        out = poll.extras()
        if pred(out):
            return out
        assert time.monotonic() < deadline, f"not within {timeout_s} s; last: {out}"
        time.sleep(0.002)


def test_read_every_tick_in_the_followers_units():
    leader = Leader()
    poll = leader.poll()
    assert poll.extras() == {"leader": [0.1, 0.2, 0.3], "leader_follows_in_hardware": False}
    leader.pose[0] = 0.5
    assert poll.extras()["leader"][0] == 0.5  # the very next tick
    assert leader.reopens == 0


def test_a_lost_reply_keeps_the_last_pose_a_silent_leader_is_none_then_tried_only_every_retry():
    leader = Leader()
    poll = leader.poll()
    poll.extras()
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
    poll.extras()
    leader.plugged = False
    out = poll.extras()
    assert out["leader"] is None and "EIO" in out["leader_error"]  # the first tick after the unplug
    out = until(poll, lambda o: "no serial port" in o["leader_error"])  # the reopen, retry_s later
    t_end = time.monotonic() + 3 * RETRY_S
    reopens = leader.reopens
    while time.monotonic() < t_end:
        assert poll.extras()["leader"] is None
        time.sleep(0.002)
    assert 2 <= leader.reopens - reopens <= 4, leader.reopens - reopens  # every retry_s, not every tick
    leader.plugged = True
    out = until(poll, lambda o: o["leader"] is not None, 2 * RETRY_S)
    assert out["leader"] == [0.1, 0.2, 0.3] and "leader_error" not in out


def test_a_leader_that_failed_at_connect_is_reported_then_opened_when_it_comes():
    leader = Leader()
    leader.port_open = leader.plugged = False
    poll = leader.poll(error="leader: no answer from servo 3")
    out = poll.extras()
    assert out["leader"] is None and "no answer from servo 3" in out["leader_error"]
    assert leader.reopens == 0 and leader.reads == 0  # not retried before retry_s
    leader.plugged = True
    out = until(poll, lambda o: o["leader"] is not None, 3 * RETRY_S)
    assert leader.reopens == 1


def test_a_first_read_lost_is_none_without_a_pose_to_keep():
    leader = Leader()
    leader.answers = False
    poll = leader.poll()
    out = poll.extras()
    assert out["leader"] is None and "no status packet" in out["leader_error"]
    leader.answers = True
    assert poll.extras()["leader"] == [0.1, 0.2, 0.3]  # still within stale_s: read again at the next tick
