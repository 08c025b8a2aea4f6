"""The PiPer backend sees a lost motor or a lost mode, and takes control back only when asked, with
confirmation and without a jump: the real piper_sdk against the fake firmware on a virtual bus."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

pytest.importorskip("piper_sdk")
pytest.importorskip("can")

from armada.drivers.core.backend import BackendError  # noqa: E402
from armada.drivers.piper.backend import PiperBackend  # noqa: E402
from armada.drivers.piper.fake.firmware import PiperFirmware  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402

pytestmark = pytest.mark.hil

EMB = load_embodiment("piper")
HOME_DEG = np.degrees(EMB.home[:6])
FAULT_BOUND_S = 0.3  # motor frames every 20 ms in the fake; the rest is a loaded host


@pytest.fixture
def channel():
    return f"piper-ctl-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fw(channel):
    firmware = PiperFirmware(channel, initial_deg=HOME_DEG)
    yield firmware
    firmware.close()


@pytest.fixture
def backend(channel, fw):
    b = PiperBackend(channel, EMB, bustype="virtual")
    b.connect(2.0)
    yield b
    b.close()


def _fault_within(backend, bound_s: float) -> tuple[str, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound_s + 1.0:
        fault = backend.read().fault
        if fault:
            return fault, time.monotonic() - t0
        time.sleep(0.002)
    raise AssertionError(f"no fault within {bound_s + 1.0} s")


@pytest.mark.parametrize("motors", [(3,), (1, 2, 3, 4, 5, 6)])
def test_a_disabled_motor_faults_naming_it(fw, backend, motors):
    assert backend.read().fault is None
    fw.disable_motors(*motors, stuck=False)
    fault, took = _fault_within(backend, FAULT_BOUND_S)
    assert took < FAULT_BOUND_S, took
    assert all(f"joint_{m}" in fault for m in motors) and "disabled" in fault, fault
    if len(motors) == 1:
        assert "joint_1" not in fault


@pytest.mark.parametrize("mode,name", [(0x02, "teaching"), (0x00, "standby")])
def test_a_mode_other_than_can_command_faults_naming_it(fw, backend, mode, name):
    fw.set_mode(mode)
    fault, took = _fault_within(backend, FAULT_BOUND_S)
    assert took < FAULT_BOUND_S, took
    assert f"{name} mode, not CAN command mode" in fault, fault


def test_recover_after_a_power_cycle_confirms_and_holds_where_the_arm_is(fw, backend):
    sagged = HOME_DEG + np.array([0.0, -4.0, 3.0, 0.0, 2.0, 0.0])  # it sagged while off
    backend.write(np.append(np.radians(HOME_DEG + 8.0), 0.01))  # an old target the firmware keeps
    fw.power_cycle(sagged)
    # Frames sent to an arm in standby move nothing but are kept: a later CAN mode would jump there.
    backend.write(np.append(np.radians(HOME_DEG + 10.0), 0.02))
    time.sleep(0.05)
    assert np.allclose(np.degrees(fw.state()["q"]), sagged, atol=1e-3)
    fault, _ = _fault_within(backend, FAULT_BOUND_S)
    assert "standby" in fault
    t0 = time.monotonic()
    backend.recover(2.0)
    took = time.monotonic() - t0
    state = fw.state()
    assert state["ctrl_mode"] == 0x01 and all(state["enabled"]) and state["gripper_enabled"], state
    reading = backend.read()
    assert reading.fault is None and took < 1.0
    time.sleep(0.3)  # the arm holds where it was measured: no jump to the kept target
    assert np.allclose(np.degrees(fw.state()["q"]), sagged, atol=0.01), np.degrees(fw.state()["q"]) - sagged
    assert np.allclose(np.degrees(reading.position[:6]), sagged, atol=0.01)


def test_recover_from_teaching_mode_does_not_jump_to_the_old_target(fw, backend):
    backend.write(np.append(np.radians(HOME_DEG), 0.0))
    fw.set_mode(0x02)
    moved = HOME_DEG + np.array([15.0, 5.0, -5.0, 0.0, 0.0, 10.0])
    fw.move_by_hand(moved)  # dragged by hand; the firmware still holds the old (home) target
    assert "teaching" in _fault_within(backend, FAULT_BOUND_S)[0]
    backend.recover(2.0)
    time.sleep(0.3)
    assert np.allclose(np.degrees(fw.state()["q"]), moved, atol=0.01)
    assert backend.read().fault is None


def test_recover_names_the_motor_that_stays_disabled(fw, backend):
    fw.disable_motors(4, stuck=True)
    assert "joint_4" in _fault_within(backend, FAULT_BOUND_S)[0]
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="joint_4 stayed disabled") as err:
        backend.recover(0.5)
    assert not err.value.transient and time.monotonic() - t0 < 1.0
    fw.enable_motors(4)  # the operator fixed it
    backend.recover(1.0)
    assert backend.read().fault is None and fw.state()["enabled"][3]


def test_recover_refuses_an_engaged_estop(fw, backend):
    fw.press_estop()
    assert wait_estopped(backend)
    with pytest.raises(BackendError, match="e-stop is engaged"):
        backend.recover(0.5)


def wait_estopped(backend, timeout_s: float = 1.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if backend.read().estopped:
            return True
        time.sleep(0.005)
    return False
