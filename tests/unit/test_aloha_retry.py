"""ALOHA setup transactions whose reply is lost are asked again after a pause that doubles.

A stand-in packet handler models a responder that falls behind: it answers a ping only after a
quiet gap since the previous request (back-to-back requests keep it busy, as a backlog of pings
does a fake or a slow adapter on a loaded host). Asking again at once would never get an answer."""

from __future__ import annotations

import time

import pytest

from armada.drivers.aloha import backend as aloha
from armada.drivers.aloha.backend import COMM_SUCCESS, Servo, _Bus
from armada.drivers.aloha.calibration import GripperCalibration

COMM_RX_TIMEOUT = -3001  # dynamixel_sdk's value


class BusyResponder:
    def __init__(self, quiet_s: float, ids: set[int]):
        self.quiet_s, self.ids = quiet_s, ids
        self.last = float("-inf")
        self.requests: list[float] = []

    def ping(self, port, servo_id: int):
        now = time.monotonic()
        self.requests.append(now)
        rested = now - self.last >= self.quiet_s
        self.last = now
        if rested and servo_id in self.ids:
            return 1120, COMM_SUCCESS, 0
        return 0, COMM_RX_TIMEOUT, 0

    def broadcastPing(self, port):
        return {i: (1120, 0) for i in self.ids}, COMM_SUCCESS

    def getTxRxResult(self, result):
        return "[TxRxResult] There is no status packet!"


def bus_with(ph: BusyResponder, ids: list[int]) -> _Bus:
    bus = _Bus("left follower", "/dev/fake", 1_000_000, [Servo(f"j{i}", i, 1120) for i in ids], 4.0,
               GripperCalibration(raw_open=2048.0, raw_closed=1024.0, open_m=0.08))
    bus.ph, bus.port = ph, object()
    return bus


def test_pauses_double_up_to_their_cap_and_none_follows_the_last_try(monkeypatch):
    monkeypatch.setattr(aloha, "PING_RETRY_S", 0.3)
    t0 = time.monotonic()
    tries = []
    for attempt in aloha.retry_tries():
        tries.append((attempt, time.monotonic()))
    t_end = time.monotonic()
    assert [a for a, _ in tries] == list(range(len(tries)))
    gaps = [b - a for (_, a), (_, b) in zip(tries, tries[1:])]
    for gap, pause in zip(gaps, [0.005, 0.01, 0.02, 0.04, 0.08, 0.08]):
        assert gap >= pause, gaps  # a loaded host may pause longer, never shorter
    assert tries[-1][1] - t0 >= 0.3  # the window is used...
    assert tries[-2][1] - t0 <= 0.3  # ...and the last try is the first one after it
    assert t_end - tries[-1][1] < 0.005  # nothing is slept after the last try


def test_a_responder_that_fell_behind_is_found_not_called_missing():
    ph = BusyResponder(quiet_s=0.015, ids={1, 2, 3})
    bus = bus_with(ph, [1, 2, 3])
    bus.check_servos(check_models=True)  # raised "no answer from servo 1..." when pings went back to back
    gaps = [b - a for a, b in zip(ph.requests, ph.requests[1:])]
    assert len(ph.requests) < 20, len(ph.requests)  # a few tries per servo, not a flood of the bus
    assert max(gaps) >= 0.015


def test_a_missing_servo_is_still_missing_after_the_retry_window(monkeypatch):
    monkeypatch.setattr(aloha, "PING_RETRY_S", 0.1)
    ph = BusyResponder(quiet_s=0.0, ids={1, 2})
    bus = bus_with(ph, [1, 2, 3])
    t0 = time.monotonic()
    with pytest.raises(aloha.BackendError, match=r"no answer from servo 3 \(j3.*IDs found on the bus: \[1, 2\]"):
        bus.check_servos(check_models=True)
    assert time.monotonic() - t0 < 0.1 + 2 * aloha.PING_BACKOFF_MAX_S
