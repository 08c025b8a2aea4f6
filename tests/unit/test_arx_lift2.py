"""ARX Lift 2 backend pieces in-process: the parts over the fakes, the adapters' edges, the config."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armada.drivers.arx_lift2.adapter import AdapterError, MecanumGeometry
from armada.drivers.arx_lift2.backend import DOF, build_backend, check_layout
from armada.drivers.arx_lift2.config import ArxLift2BackendConfig
from armada.drivers.arx_lift2.sim import SimArm, SimBody, read_commands, write_control
from armada.drivers.arx_lift2.parts import BODY_PERIOD_S, BodyPart, ArmPart
from armada.drivers.core.backend import BackendError
from armada.runtime.config import load_embodiment

EMB = load_embodiment("arx_lift2")
GEO = MecanumGeometry(0.076, 0.2, 0.2)
BODY = slice(14, 18)
DECEL = EMB.max_acceleration[15:18]


def wait_for(pred, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def read_soon(backend, timeout_s: float = 1.0):
    """A reading, polling through transient errors (a loaded host)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return backend.read()
        except BackendError as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


# --------------------------------------------------------------------------- config and layout


def test_the_embodiment_is_the_backends_layout():
    check_layout(EMB)
    assert EMB.dof == DOF == 18
    assert [g.mode for g in EMB.groups] == ["joint_position", "gripper_position", "joint_position",
                                            "gripper_position", "lift_height", "base_velocity"]


def test_a_wrong_embodiment_is_refused_naming_the_layout():
    with pytest.raises(ValueError, match="ARX Lift 2 backend needs the groups"):
        check_layout(load_embodiment("cobot_magic"))


def test_config_needs_three_buses_and_fake_dir_only_with_fake():
    with pytest.raises(ValueError, match="three buses"):
        ArxLift2BackendConfig(left_can="can1", right_can="can1")
    with pytest.raises(ValueError, match="fake: true only"):
        ArxLift2BackendConfig(fake_dir="/tmp/x")
    assert ArxLift2BackendConfig().fake is False  # a real robot unless the cell says otherwise


@given(st.tuples(*[st.floats(-1, 1)] * 3))
def test_mecanum_odometry_inverts_the_wheel_speeds(v):
    assert np.allclose(GEO.body_velocity(GEO.wheel_speeds(*v)), v, atol=1e-12)


# --------------------------------------------------------------------------- the real adapters' edges


def test_the_real_arm_adapter_on_a_missing_bus_is_a_clear_error_at_once():
    pytest.importorskip("arx5_interface")
    from armada.drivers.arx_lift2.arm_arx5 import Arx5Arm

    started = time.monotonic()
    with pytest.raises(AdapterError, match="arx5-sdk X5 on can_nothing_here: .*CAN"):
        Arx5Arm("X5", "can_nothing_here").open()
    assert time.monotonic() - started < 5.0


def test_the_real_body_adapter_without_arx_library_says_how_to_build_it():
    from armada.drivers.arx_lift2.body_lift import LiftMiniBody

    if importlib.util.find_spec("lift_controller") is not None:
        pytest.skip("ARX's lift_controller is installed here")
    with pytest.raises(AdapterError, match="lift_controller is not installed.*build.sh"):
        LiftMiniBody("can5", "LIFT2026_4310_3519").open()
    with pytest.raises(ValueError, match="robot type"):
        LiftMiniBody("can5", "LIFT9")


# --------------------------------------------------------------------------- the arm part


@pytest.fixture
def arm(tmp_path):
    fake = SimArm("left_arm", EMB.home[:6], EMB.home[6], str(tmp_path))
    part = ArmPart(fake, "left arm (fake)")
    part.connect(2.0)
    yield part, fake, tmp_path
    part.close()


def test_arm_connects_holding_where_it_is_and_follows_writes(arm):
    part, fake, _ = arm
    assert fake.kp_on and not fake.emergency
    r = read_soon(part)
    assert np.allclose(r.position, EMB.home[:7], atol=1e-9) and r.fault is None
    target = r.position + np.array([0.1, 0.05, 0.05, 0, 0, 0, 0.01])
    for _ in range(100):
        part.write(target)
        time.sleep(0.002)
    assert wait_for(lambda: np.allclose(read_soon(part).position, target, atol=1e-3))


def test_arm_bad_writes_are_refused_and_change_nothing(arm):
    part, fake, tmp = arm
    before = read_commands(tmp, "left_arm")
    for bad in (np.zeros(6), np.full(7, np.nan), np.full(7, np.inf)):
        with pytest.raises(BackendError, match="7 finite values") as info:
            part.write(bad)
        assert not info.value.transient
    assert read_commands(tmp, "left_arm") == before and np.allclose(fake.target, EMB.home[:6])


def test_arm_silence_is_a_read_error_within_the_frozen_bound(arm):
    part, _, tmp = arm
    read_soon(part)
    write_control(tmp, {"left_arm": {"silent": True}})
    started = time.monotonic()
    with pytest.raises(BackendError, match="feedback has not changed") as info:
        while time.monotonic() - started < 2.0:
            part.read()
            time.sleep(0.005)
    assert info.value.transient  # the driver faults when it lasts past its read-failure bound
    assert time.monotonic() - started < 0.1 + 0.2


def test_arm_motor_error_is_a_fault_and_recovery_says_restart(arm):
    part, fake, tmp = arm
    write_control(tmp, {"left_arm": {"motor_error": True}})
    assert wait_for(lambda: read_soon(part).fault is not None)
    assert "damping" in read_soon(part).fault
    part.on_fault("test")
    with pytest.raises(BackendError, match="not commanding after a fault"):
        part.write(read_soon(part).position)
    with pytest.raises(BackendError, match="restart the driver"):
        part.recover(1.0)


def test_arm_estop_holds_here_and_refuses_writes_until_released(arm):
    part, fake, _ = arm
    r = read_soon(part)
    part.estop()
    assert fake.kp_on  # holding, torque on
    assert np.allclose(fake.target, r.position[:6], atol=1e-6)
    with pytest.raises(BackendError, match="e-stop"):
        part.write(r.position)
    part.release_estop()
    part.write(r.position)


def test_arm_close_never_drops_the_gains(arm):
    part, fake, _ = arm
    part.close()
    assert fake.kp_on and not fake.emergency


def test_an_unpowered_arm_is_a_clear_connect_error(tmp_path):
    write_control(tmp_path, {"power": False})
    part = ArmPart(SimArm("left_arm", EMB.home[:6], EMB.home[6], str(tmp_path)), "left arm (fake)")
    with pytest.raises(BackendError, match="None of the motors are initialized") as info:
        part.connect(1.0)
    assert not info.value.transient


# --------------------------------------------------------------------------- the body part


def body_part(fake: SimBody, watchdog_s: float = 0.1) -> BodyPart:
    return BodyPart(fake, GEO, "lift and base (fake)", EMB.lower[BODY], EMB.upper[BODY], DECEL, watchdog_s=watchdog_s)


@pytest.fixture
def body(tmp_path):
    fake = SimBody(GEO, start_height=0.1, fake_dir=str(tmp_path))
    part = body_part(fake)
    part.connect(2.0)
    yield part, fake, tmp_path
    part.close()


def test_body_starts_holding_the_measured_height_never_a_blind_setpoint(body):
    part, fake, _ = body
    assert wait_for(lambda: fake.fw_height is not None)
    assert fake.fw_height == pytest.approx(0.1)  # never 0: the column must not drop at start
    assert np.allclose(read_soon(part).position, [0.1, 0, 0, 0], atol=1e-3)


def test_body_drives_the_base_and_lift_and_reads_odometry(body):
    part, fake, _ = body
    target = np.array([0.15, 0.1, -0.05, 0.2])
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        part.write(target)
        r = read_soon(part)
        if np.allclose(r.position, target, atol=5e-3):
            break
        time.sleep(0.005)
    assert np.allclose(r.position, target, atol=5e-3), r.position


def test_body_watchdog_ramps_the_base_to_zero_when_writes_stop(tmp_path):
    fake = SimBody(GEO, start_height=0.1, fake_dir=str(tmp_path))
    part = body_part(fake, watchdog_s=0.3)  # longer than a loaded host's gap between two writes here
    part.connect(2.0)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not np.allclose(fake.fw_chassis, [0.15, 0.0, 0.3]):
            part.write(np.array([0.1, 0.15, 0.0, 0.3]))
            time.sleep(0.005)
        part.write(np.array([0.1, 0.15, 0.0, 0.3]))
        stopped_writing = time.monotonic()
        assert np.allclose(fake.fw_chassis, [0.15, 0.0, 0.3]) and part.watchdog_trips == 0
        # watchdog + the ramp at the deceleration limit (0.3 / 1.0 rad/s²) + slack for a loaded host
        assert wait_for(lambda: not np.any(fake.fw_chassis), timeout_s=0.3 + 0.3 + 1.0)
        assert time.monotonic() - stopped_writing > 0.3 and part.watchdog_trips == 1
        assert fake.fw_height == pytest.approx(0.1)  # the lift holds
    finally:
        part.close()


class RecordingBody(SimBody):
    """Every chassis setpoint the part hands to the SDK, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chassis_calls: list[np.ndarray] = []

    def set_chassis(self, vx: float, vy: float, wz: float) -> None:
        self.chassis_calls.append(np.array([vx, vy, wz]))
        super().set_chassis(vx, vy, wz)


def test_body_fault_ramps_the_base_down_at_its_deceleration_and_holds_the_lift(tmp_path):
    fake = RecordingBody(GEO, start_height=0.1, fake_dir=str(tmp_path))
    part = body_part(fake)
    part.connect(2.0)
    try:
        for _ in range(int(1.0 / 0.005)):
            part.write(np.array([0.12, 0.15, 0.0, 0.0]))
            time.sleep(0.005)
        assert wait_for(lambda: part.base_sent[0] == pytest.approx(0.15))
        first = len(fake.chassis_calls)
        part.on_fault("test")
        assert wait_for(lambda: not np.any(part.base_sent), 1.0)
        sent = np.array(fake.chassis_calls[first - 1:])
        steps = np.abs(np.diff(sent, axis=0))
        assert np.all(steps <= DECEL * BODY_PERIOD_S + 1e-12), steps.max(0)
        assert not np.any(sent[-1])
        with pytest.raises(BackendError, match="not commanding after a fault"):
            part.write(np.array([0.12, 0.0, 0.0, 0.0]))
        assert fake.fw_height == pytest.approx(0.12)
    finally:
        part.close()




def test_body_bad_writes_are_refused_and_change_nothing(body):
    part, fake, _ = body
    part.write(np.array([0.1, 0.0, 0.0, 0.0]))
    for bad, why in ((np.zeros(3), "4 finite"), (np.array([0.1, np.nan, 0, 0]), "4 finite"),
                     (np.array([0.5, 0, 0, 0]), "outside the limits"), (np.array([0.1, 0.5, 0, 0]), "outside")):
        with pytest.raises(BackendError, match=why):
            part.write(bad)
    assert part.height_target == 0.1 and not np.any(part.base_target)


def test_body_silence_is_a_read_error_and_power_loss_too(body):
    part, fake, tmp = body
    read_soon(part)
    write_control(tmp, {"power": False})
    with pytest.raises(BackendError, match="feedback has not changed"):
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            part.read()
            time.sleep(0.005)


def test_body_close_ramps_the_base_to_zero_first(body):
    part, fake, _ = body
    for _ in range(100):
        part.write(np.array([0.1, 0.1, 0.0, 0.0]))
        time.sleep(0.005)
    part.close()
    assert not np.any(part.base_sent) and not np.any(fake.fw_chassis)


def test_an_unpowered_body_is_a_clear_connect_error(tmp_path):
    write_control(tmp_path, {"power": False})
    part = body_part(SimBody(GEO, fake_dir=str(tmp_path)))
    with pytest.raises(BackendError, match="no live feedback.*body powered"):
        part.connect(0.5)
    assert part._thread is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.floats(-0.2, 0.2), st.floats(-0.2, 0.2), st.floats(-0.45, 0.45)),
                          st.sampled_from(["fault", "estop", "release", "stall"])), min_size=1, max_size=60))
def test_body_setpoints_never_step_faster_than_the_slew_limit(events):
    """Whatever is written, and whatever stops come in between, the base setpoint sent to the SDK
    changes by at most twice the deceleration limit per cycle (the limit itself while stopping)."""
    fake = SimBody(GEO)
    part = body_part(fake, watchdog_s=10.0)
    fake.open()
    part.height_target = 0.1
    sent = [part.base_sent.copy()]
    for e in events:
        if e == "fault":
            part.on_fault("test")
        elif e == "estop":
            part.estop()
        elif e == "release":
            part.stopped = None
        elif e == "stall":
            part.last_write = time.monotonic() - 20.0
        elif part.stopped is None:
            part.write(np.array([0.1, *e]))
        for _ in range(3):
            part._cycle()
            sent.append(part.base_sent.copy())
    steps = np.abs(np.diff(np.array(sent), axis=0))
    assert np.all(steps <= 2.0 * DECEL * BODY_PERIOD_S + 1e-12)
    assert np.all(np.abs(np.array(sent)) <= EMB.upper[15:18] + 1e-12)


# --------------------------------------------------------------------------- the composite


def test_the_robot_is_three_parts_and_one_fault_names_its_part(tmp_path):
    backend = build_backend(ArxLift2BackendConfig(fake=True, fake_dir=str(tmp_path / "f")), EMB)
    assert [p.name for p in backend.parts] == ["left_arm", "right_arm", "body"]
    backend.connect(3.0)
    try:
        r = read_soon(backend)
        assert r.position.shape == (18,) and r.fault is None
        write_control(tmp_path / "f", {"right_arm": {"motor_error": True}})
        assert wait_for(lambda: read_soon(backend).fault is not None)
        assert read_soon(backend).fault.startswith("right arm (fake): arx5-sdk dropped to damping")
    finally:
        backend.close()


def test_the_real_arm_adapter_builds_the_sdks_own_types():
    """No arm here, so a stand-in controller; but the JointState, Gain and ControllerConfig the
    adapter builds and reads are arx5_interface's own (pybind11 checks every argument's type)."""
    sdk = pytest.importorskip("arx5_interface")
    from armada.drivers.arx_lift2.arm_arx5 import Arx5Arm

    cfg = sdk.ControllerConfigFactory.get_instance().get_config("joint_controller", 6)

    class Controller:
        def __init__(self):
            self.cmd, self.gain = None, sdk.Gain(6)  # arx5-sdk starts in damping: kp = 0

        def set_joint_cmd(self, cmd):
            assert isinstance(cmd, sdk.JointState)
            self.cmd = cmd

        def get_joint_state(self):
            z = np.zeros(6)
            state = sdk.JointState(np.arange(6) * 0.1, z, np.ones(6), 0.03)
            state.timestamp = 1.5
            return state

        def get_gain(self):
            return self.gain

        def set_gain(self, gain):
            assert isinstance(gain, sdk.Gain)
            self.gain = gain

        def get_controller_config(self):
            return cfg

    arm = Arx5Arm("X5", "can1")
    arm._sdk, arm._ctrl = sdk, Controller()
    s = arm.read()
    assert np.allclose(s.pos, np.arange(6) * 0.1) and s.gripper_pos == pytest.approx(0.03) and s.damping
    arm.command(np.full(6, 0.2), 0.04)
    assert np.allclose(arm._ctrl.cmd.pos(), 0.2) and arm._ctrl.cmd.gripper_pos == pytest.approx(0.04)
    assert arm._ctrl.cmd.timestamp == 0.0  # applied at once
    arm.hold()
    assert np.allclose(arm._ctrl.gain.kp(), cfg.default_kp) and not arm.read().damping


class RecordingArm(SimArm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[np.ndarray] = []

    def command(self, pos, gripper_pos):
        self.sent.append(np.append(pos, gripper_pos))
        super().command(pos, gripper_pos)


_value = st.one_of(st.floats(-4, 4), st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(_value, min_size=6, max_size=8), min_size=1, max_size=30))
def test_only_whole_finite_arm_writes_ever_reach_the_sdk(writes):
    arm = RecordingArm("left_arm", EMB.home[:6], EMB.home[6])
    part = ArmPart(arm, "left arm (sim)")
    part.connect(2.0)
    arm.sent.clear()
    expected = []
    for w in writes:
        p = np.array(w, dtype=np.float64)
        try:
            part.write(p)
            expected.append(p)
        except BackendError as exc:
            assert not exc.transient and (p.shape != (7,) or not np.all(np.isfinite(p)))
    assert len(arm.sent) == len(expected)
    for got, want in zip(arm.sent, expected):
        np.testing.assert_array_equal(got, want)


class RecordingHeights(SimBody):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.heights: list[float] = []

    def set_height(self, height_m):
        self.heights.append(height_m)
        super().set_height(height_m)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-0.05, 0.45), st.floats(-0.3, 0.3)), min_size=1, max_size=30))
def test_the_lift_setpoint_handed_to_the_sdk_is_always_within_its_range(writes):
    fake = RecordingHeights(GEO, start_height=0.1)
    part = body_part(fake, watchdog_s=10.0)
    fake.open()
    part.height_target = 0.1
    for h, vx in writes:
        try:
            part.write(np.array([h, vx, 0.0, 0.0]))
        except BackendError:
            assert not (EMB.lower[14] <= h <= EMB.upper[14] and abs(vx) <= 0.2)
        part._cycle()
    assert fake.heights and all(0.0 <= h <= 0.38 for h in fake.heights)
