"""The PiPer backend through the real piper_sdk against a fake controller on a virtual CAN bus."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("piper_sdk")
pytest.importorskip("can")

from armada.drivers.core.backend import BackendError  # noqa: E402
from armada.drivers.core.driver import Driver, Mode  # noqa: E402
from armada.drivers.piper.backend import PiperBackend  # noqa: E402
from armada.drivers.piper.fake.firmware import PiperFirmware  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402
from armada.runtime.protocol import MessageFactory, ProtocolError  # noqa: E402

pytestmark = pytest.mark.hil

EMB = load_embodiment("piper")
DT_NS = int(1e9 / EMB.control_rate_hz)
F = MessageFactory()
MDEG_PER_RAD = math.degrees(1.0) * 1000.0


@pytest.fixture
def channel():
    return f"piper-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fw(channel):
    firmware = PiperFirmware(channel)
    yield firmware
    firmware.close()


@pytest.fixture
def backend(channel, fw):
    b = PiperBackend(channel, EMB, bustype="virtual")
    b.connect(2.0)
    yield b
    b.close()


def wait_for(pred, timeout_s: float, step_s: float = 0.005):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step_s)
    return pred()


def test_connect_enables_every_motor_and_selects_can_joint_mode(fw, backend):
    assert fw.enabled.all()
    assert fw.ctrl_mode == 0x01 and fw.move_mode == 0x01 and fw.speed_pct == 50
    assert wait_for(lambda: fw.gripper_enabled, 0.2)
    r = backend.read()
    assert r.position.shape == (7,) and not r.estopped and r.fault is None


def test_targets_are_followed_in_the_right_units(fw, backend):
    target = np.array([0.5, 0.3, -0.4, 0.2, -0.1, 1.0, 0.03])
    backend.write(target)
    assert wait_for(lambda: np.allclose(backend.read().position, target, atol=1e-3), 1.0)
    # On the wire: 0.001 deg and 0.001 mm.
    assert fw.joint_targets[-1][1][0] == round(0.5 * MDEG_PER_RAD)
    assert wait_for(lambda: abs(fw.q_mdeg[0] - 28647.9) < 5 and abs(fw.gripper_um - 30000) < 5, 1.0)


def test_estop_is_reported_and_holds(fw, backend):
    backend.estop()
    assert wait_for(lambda: backend.read().estopped, 0.2)
    held = backend.read().position.copy()
    backend.write(held + np.r_[0.3, np.zeros(6)])
    time.sleep(0.1)
    assert np.allclose(backend.read().position, held, atol=1e-4)
    # Resume: the SDK's resume frame is its reset frame (motor power cut): refused by default ...
    with pytest.raises(BackendError, match="cuts motor power"):
        backend.release_estop()
    assert backend.read().estopped
    # ... and done, re-enabling and re-selecting the mode, only when the cell says the arm is supported.
    backend.allow_reset_on_resume = True
    backend.release_estop()
    assert wait_for(lambda: not backend.read().estopped and fw.enabled.all() and fw.ctrl_mode == 0x01, 0.5)
    backend.write(held + np.r_[0.1, np.zeros(6)])
    assert wait_for(lambda: abs(backend.read().position[0] - held[0] - 0.1) < 1e-3, 1.0)


def test_controller_errors_become_a_fault(fw, backend):
    fw.inject_error(1 << 2)  # joint 3 communication
    assert wait_for(lambda: backend.read().fault is not None, 0.2)
    assert "joint_3 communication" in backend.read().fault


def test_silent_bus_is_a_transient_read_error_within_100_ms(fw, backend):
    backend.read()
    fw.silence()
    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        while time.monotonic() - t0 < 0.5:
            backend.read()
            time.sleep(0.002)
    assert err.value.transient
    assert time.monotonic() - t0 < 0.1
    assert "stale" in str(err.value)


def test_motors_that_stay_disabled_fail_connect_clearly(channel, fw):
    fw.disable_motors(2, 5)
    b = PiperBackend(channel, EMB, bustype="virtual")
    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        b.connect(0.5)
    assert time.monotonic() - t0 < 0.8
    assert not err.value.transient
    msg = str(err.value)
    assert "joint_2" in msg and "joint_5" in msg and "joint_1" not in msg


def test_no_controller_fails_connect_within_the_deadline(channel):
    b = PiperBackend(channel, EMB, bustype="virtual")
    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        b.connect(0.3)
    assert time.monotonic() - t0 < 0.6 and not err.value.transient
    assert "no joint feedback" in str(err.value)


def test_driver_refuses_to_arm_at_the_folded_rest_pose(fw, backend):
    # All zeros puts joint_2/joint_3/gripper on their range ends: arming would move the arm.
    drv = Driver(EMB, backend, lease_ttl_s=1.0)
    drv.connect(2.0)
    lease = drv.handle(F.make("acquire", client="t"), 0)["lease"]
    with pytest.raises(ProtocolError):
        drv.handle(F.make("arm", lease=lease), 0)


def test_driver_runs_a_trajectory_within_the_velocity_limit(channel):
    home_deg = np.degrees(EMB.home[:6])
    fw = PiperFirmware(channel, initial_deg=home_deg, initial_gripper_mm=EMB.home[6] * 1e3)
    backend = PiperBackend(channel, EMB, bustype="virtual")
    try:
        _run_trajectory(fw, backend)
    finally:
        backend.close()
        fw.close()


def _run_trajectory(fw, backend):
    drv = Driver(EMB, backend, lease_ttl_s=1.0)
    drv.connect(2.0)
    now = 0

    def cmd(kind, **fields):
        return drv.handle(F.make(kind, **fields), now)

    lease = cmd("acquire", client="t")["lease"]
    cmd("arm", lease=lease)
    # 0.3 rad in 0.2 s on joint 1 asks 1.5 rad/s; the limit is 1.0 rad/s, so the filter must cap it.
    n = 40
    s = np.linspace(0.0, 1.0, n)[:, None]
    start = EMB.home.copy()
    goal = np.array([0.3, 0.2, -0.2, 0.1, -0.1, 0.2, 0.02])
    pts = start + s * (goal - start)
    cmd("trajectory", lease=lease, t0_ns=now + DT_NS, dt=0.005, points=pts, final=True)
    first_target = len(fw.joint_targets)
    for _ in range(400):
        now += DT_NS
        cmd("heartbeat", lease=lease)
        drv.tick(now)
        time.sleep(DT_NS * 1e-9)  # the fake runs on real time; keep its feedback fresh
        if drv.mode == Mode.ARMED:
            break
    assert drv.mode == Mode.ARMED, drv.reason
    assert drv.counters.read_errors == 0
    # The chunk asks for more than the limits allow, so the driver ends short of the goal, holding
    # where its filter got to; the arm must settle exactly there.
    held = drv.filter.position.copy()
    assert held[0] > 0.05
    ok = wait_for(lambda: np.allclose(backend.read().position, held, atol=2e-3), 1.0)
    assert ok, (backend.read().position, held, goal)
    # Everything the fake received, one target per tick: never faster than the limits.
    sent = np.array([t for _, t in fw.joint_targets[first_target:]]) / MDEG_PER_RAD
    assert len(sent) > 40
    step = np.abs(np.diff(sent, axis=0)).max(axis=0)
    vmax = np.array([j.max_velocity for g in EMB.groups for j in g.joints])
    rounding = 1.0 / MDEG_PER_RAD
    assert np.all(step <= vmax[:6] * DT_NS * 1e-9 + rounding), step / (DT_NS * 1e-9)
    # ... nor with more than the acceleration limit (the chunk's 1.5 rad/s ramp is what caps it here).
    dt = DT_NS * 1e-9
    amax = np.array([j.max_acceleration for g in EMB.groups for j in g.joints])
    accel = np.abs(np.diff(sent, n=2, axis=0)).max(axis=0) / dt**2
    assert np.all(accel <= amax[:6] + 2 * rounding / dt**2), accel  # 0.001 deg rounding of 3 samples
    assert step[0] / dt > 0.5  # it did move fast enough for the limits to matter
    grip = np.array(_gripper_targets(fw)[-len(sent):]) / 1e6
    assert np.abs(np.diff(grip)).max() <= vmax[6] * DT_NS * 1e-9 + 1e-6


def _gripper_targets(fw) -> list[int]:
    return [int.from_bytes(d[:4], "big", signed=True) for _, arb, d in fw.received if arb == 0x159]


def test_a_zero_calibration_from_the_cell_corrects_readings_and_shifts_targets(channel, fw, tmp_path):
    from armada.calibration.results import CalibrationRecord, Residual, write_result
    from armada.drivers.piper.calibration import PiperZero, piper_zero_values, zero_offsets
    from armada.runtime.config import DriverConfig

    offsets = np.radians([1.0, -0.5, 0.0, 0.25, 0.0, -2.0])
    zero = PiperZero([f"joint_{i + 1}" for i in range(6)], offsets, 0.0)
    write_result(tmp_path / "zero.yaml", CalibrationRecord("joint_calibration", "test", {"hold_spread": Residual(
        0.0, "rad", 0.01)}, piper_zero_values(zero), {"samples": 10}))
    cfg = DriverConfig(name="arm", embodiment="piper", backend={"kind": "piper", "can": channel, "bustype": "virtual"},
                       state="ipc://x", cmd="ipc://y", joint_calibration="zero.yaml")
    # What make_backend hands the driver's worker process (which a virtual bus cannot reach).
    b = PiperBackend(channel, EMB, bustype="virtual", zero_offsets_rad=zero_offsets(cfg, tmp_path))
    b.connect(2.0)
    try:
        raw = fw.q_mdeg.copy() / MDEG_PER_RAD
        assert np.allclose(b.read().position[:6], raw - offsets, atol=1e-4)
        target = np.array([0.2, 0.3, -0.4, 0.1, 0.0, 0.5, 0.02])
        b.write(target)
        sent = round((0.2 + offsets[0]) * MDEG_PER_RAD)
        assert wait_for(lambda: len(fw.joint_targets) > 0 and fw.joint_targets[-1][1][0] == sent, 1.0)
    finally:
        b.close()
