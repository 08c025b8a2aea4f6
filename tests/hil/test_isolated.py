"""A backend in a worker process (drivers/core/isolated.py): round trips, and every way it can fail."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from armada.drivers.core.backend import BackendError
from armada.drivers.core.isolated import IsolatedBackend

pytestmark = pytest.mark.hil

HOME = [0.1, -0.2, 0.3]


@pytest.fixture
def isolated():
    b = IsolatedBackend("tests.hil.isolated_targets:picky_arm", {"home": HOME, "refuse_above": 1.0}, "picky arm")
    b.connect(5.0)
    yield b
    b.close()


def test_readings_cross_the_process_boundary_intact(isolated):
    r = isolated.read()
    assert np.allclose(r.position, HOME) and r.extras == {"recovered": 0}
    assert abs(r.mono_ns - time.monotonic_ns()) < 1e9  # one monotonic clock on the host
    isolated.write(np.array([0.5, -0.2, 0.3]))
    deadline = time.monotonic() + 2.0
    while not np.isclose(isolated.read().position[0], 0.5, atol=1e-3):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_refused_write_is_reported_by_the_next_call(isolated):
    isolated.write(np.array([2.0, 0.0, 0.0]))
    with pytest.raises(BackendError, match="write: target 2.00 refused by the device") as err:
        isolated.read()
    assert not err.value.transient
    isolated.read()  # reported once; the worker is still there


def test_a_killed_worker_is_a_fault_naming_the_signal_and_recover_starts_a_new_one(isolated):
    os.kill(isolated._worker.pid, signal.SIGKILL)
    with pytest.raises(BackendError, match="died \\(killed by SIGKILL\\)") as err:
        isolated.read()
    assert not err.value.transient
    isolated.recover(5.0)
    assert isolated.read().extras == {"recovered": 1}


def test_a_stuck_worker_is_a_transient_error_within_the_timeout(isolated):
    pid = isolated._worker.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="did not answer within 20 ms") as err:
            isolated.read()
        assert err.value.transient and time.monotonic() - t0 < 0.2
    finally:
        os.kill(pid, signal.SIGCONT)
    # The late answer is dropped, not mistaken for the next call's.
    time.sleep(0.05)
    assert np.allclose(isolated.read().position, HOME, atol=1e-3)


def test_a_backend_that_fails_to_connect_says_why_and_leaves_no_worker():
    b = IsolatedBackend("tests.hil.isolated_targets:no_such_factory", {}, "ghost")
    with pytest.raises(BackendError, match="ghost: connect: AttributeError") as err:
        b.connect(2.0)
    assert not err.value.transient and b._worker is None


def test_on_fault_ends_the_worker_at_once_and_only_recover_starts_a_new_one(isolated):
    old = isolated._worker
    isolated.write(np.array([0.5, -0.2, 0.3]))  # in flight: must not outlive the fault
    t0 = time.monotonic()
    isolated.on_fault("following error")
    took = time.monotonic() - t0
    assert took < 0.05, took  # called from the control loop: no waiting for the process to go
    deadline = time.monotonic() + 2.0
    while old.poll() is None:
        assert time.monotonic() < deadline, "the worker outlived on_fault"
        time.sleep(0.01)
    assert old.returncode == -signal.SIGKILL
    with pytest.raises(BackendError, match="ended when the driver faulted") as err:
        isolated.read()
    assert not err.value.transient
    with pytest.raises(BackendError, match="following error"):
        isolated.estop()
    isolated.on_fault("again")  # nothing left to end: harmless
    isolated.recover(5.0)
    assert isolated._worker is not old and isolated._unreaped == []
    r = isolated.read()
    assert r.extras == {"recovered": 1} and np.allclose(r.position, HOME, atol=1e-3)


def test_an_estop_after_on_fault_can_still_be_reset_through_a_new_worker(isolated):
    """Fault, then e-stop: reset_estop is the only way out of the latch, so it must not need the
    worker that on_fault ended."""
    isolated.on_fault("following error")
    with pytest.raises(BackendError, match="nothing can be sent"):
        isolated.estop()
    isolated.release_estop()
    assert np.allclose(isolated.read().position, HOME, atol=1e-3)
