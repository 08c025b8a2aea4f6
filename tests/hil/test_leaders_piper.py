"""A single PiPer with its master (teaching) arm on the same bus (drivers/piper/master.py), through
the real piper_sdk against the fake firmware and the fake master on a python-can virtual bus in this
process: the master's commanded pose as device["leader"] in the arm's units (zero offsets included),
a master held by hand seen at the next reads, a quiet master None with an error, follow_master
refusing every write, and without it a broadcasting master faulting the driver while our own echoed
commands do not."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

pytest.importorskip("piper_sdk")
pytest.importorskip("can")

from armada.drivers.core.backend import BackendError, Reading  # noqa: E402
from armada.drivers.piper.backend import PiperBackend  # noqa: E402
from armada.drivers.piper.fake.firmware import PiperFirmware  # noqa: E402
from armada.drivers.piper.fake.master import PiperMaster  # noqa: E402
from armada.drivers.piper.master import MASTER_STALE_S, PiperWithMaster  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402

pytestmark = pytest.mark.hil

EMB = load_embodiment("piper")
HOME_DEG = np.degrees(EMB.home[:6])
# In-process fakes share one interpreter with the SDK's threads on a loaded 2-core host (see
# tests/hil/test_cobot_magic.py): feedback may be late now and then.
TEST_STALE_S = 0.15
OFFSETS = np.array([0.01, -0.02, 0.0, 0.03, 0.0, -0.01])  # a zero calibration, rad
POSE = np.array([0.3, 0.8, -0.7, 0.2, 0.4, -0.3, 0.045])  # the master held by hand (raw joints rad, gripper m)


@pytest.fixture
def channel():
    return f"piper-master-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fw(channel):
    firmware = PiperFirmware(channel, initial_deg=HOME_DEG, initial_gripper_mm=EMB.home[6] * 1e3)
    yield firmware
    firmware.close()


@pytest.fixture
def master(channel, fw):
    m = PiperMaster(channel, broadcasting=False)
    yield m
    m.close()


def make(channel, **flags) -> PiperWithMaster:
    b = PiperWithMaster(PiperBackend(channel, EMB, bustype="virtual", stale_s=TEST_STALE_S, zero_offsets_rad=OFFSETS),
                        **flags)
    b.connect(3.0)
    return b


def wait_reading(b, pred, timeout_s: float = 2.0) -> Reading:
    deadline = time.monotonic() + timeout_s
    last, error = None, None
    while True:
        try:
            last = b.read()
            if pred(last):
                return last
        except BackendError as exc:  # a late feedback frame on a loaded host
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"no reading within {timeout_s} s; last: {last}; last error: {error}")
        time.sleep(0.005)


def test_follow_master_publishes_the_master_in_the_arms_units_and_never_commands(channel, fw, master):
    b = make(channel, follow_master=True, master_in_state=True)
    try:
        r = b.read()
        assert r.extras["leader"] is None and r.extras["leader_error"]  # no master yet (or our anchoring's echo)
        master.move_by_hand(POSE)
        master.set_broadcasting(True)
        want = np.append(POSE[:6] - OFFSETS, POSE[6])  # what the arm reads once it is there
        r = wait_reading(b, lambda r: r.extras["leader"] is not None)
        assert np.allclose(r.extras["leader"], want, atol=2e-5), r.extras["leader"]
        assert r.extras["leader_follows_in_hardware"] is True and r.fault is None
        # The arm follows its master in hardware (the fake firmware too): measured comes to the leader.
        wait_reading(b, lambda r: np.allclose(r.position, want, atol=2e-3))
        # A hand move shows at once: the master sends at 200 Hz, the read takes the latest frame.
        moved = POSE + np.array([0.1, 0, 0, 0, 0, 0, 0])
        master.move_by_hand(moved)
        t0 = time.monotonic()
        wait_reading(b, lambda r: abs(r.extras["leader"][0] - (moved[0] - OFFSETS[0])) < 2e-5)
        assert time.monotonic() - t0 < 0.1
        with pytest.raises(BackendError, match="follows its master"):
            b.write(want)
        master.set_broadcasting(False)
        t0 = time.monotonic()
        r = wait_reading(b, lambda r: r.extras["leader"] is None)
        assert time.monotonic() - t0 < MASTER_STALE_S + 0.1
        assert "PiPer on" in r.extras["leader_error"] and r.fault is None
    finally:
        b.close()


def test_without_follow_master_a_broadcasting_master_faults_and_our_own_echo_does_not(channel, fw, master):
    b = make(channel, master_in_state=True)
    try:
        start = wait_reading(b, lambda r: True).position
        t_end = time.monotonic() + 0.4
        while time.monotonic() < t_end:  # commanding at the control rate; the virtual bus echoes our frames
            r = wait_reading(b, lambda r: True)
            assert r.fault is None, r.fault
            assert r.extras["leader"] is None and r.extras["leader_follows_in_hardware"] is False
            b.write(start)
            time.sleep(0.02)
        master.move_by_hand(POSE)
        master.set_broadcasting(True)
        r = wait_reading(b, lambda r: r.fault is not None)
        assert "master arm is broadcasting" in r.fault and r.extras["master_arms"] == ["arm"]
        with pytest.raises(BackendError, match="master arm is broadcasting"):
            b.write(start)
        with pytest.raises(BackendError, match="master arm is broadcasting"):
            b.recover(1.0)
    finally:
        b.close()
