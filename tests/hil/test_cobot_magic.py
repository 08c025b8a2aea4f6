"""The Cobot Magic backend (two puppet PiPers as one robot) through the real piper_sdk.

Most tests run two fake firmwares on python-can virtual buses in this process (so the test can
look inside them); the last ones run them in a fake process over udp_multicast, the transport a
cell uses, where both arms share one UDP port and the SDK hears its own commands.
"""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("piper_sdk")
pytest.importorskip("can")

from armada.drivers.cobot_magic.backend import CobotMagicBackend  # noqa: E402
from armada.drivers.core.backend import BackendError, Reading  # noqa: E402
from armada.drivers.core.driver import Driver, Mode  # noqa: E402
from armada.drivers.piper.fake.client import FakePiperProcess, free_udp_port, random_group  # noqa: E402
from armada.drivers.piper.fake.firmware import PiperFirmware  # noqa: E402
from armada.drivers.piper.fake.master import PiperMaster  # noqa: E402
from armada.drivers.cobot_magic.config import CobotMagicBackendConfig  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402
from armada.runtime.protocol import MessageFactory, ProtocolError  # noqa: E402

pytestmark = pytest.mark.hil

EMB = load_embodiment("cobot_magic")
DT = 1.0 / EMB.control_rate_hz
DT_NS = int(DT * 1e9)
F = MessageFactory()
MDEG_PER_RAD = math.degrees(1.0) * 1000.0
HOME_DEG = np.degrees(EMB.home[:6])
HOME_GRIPPER_MM = EMB.home[6] * 1e3


def wait_for(pred, timeout_s: float, step_s: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step_s)
    return pred()


def reading_or_none(backend) -> Reading | None:
    try:
        return backend.read()
    except BackendError:
        return None


def wait_reading(backend, pred=lambda r: True, timeout_s: float = 2.0) -> Reading:
    """The first reading that satisfies ``pred``. On a loaded 2-core machine the fakes can miss the
    50 ms staleness bound now and then; such transient read errors are polled through."""
    deadline = time.monotonic() + timeout_s
    last: Reading | None = None
    error: BackendError | None = None
    while True:
        try:
            last = backend.read()
            if pred(last):
                return last
        except BackendError as exc:
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"no reading within {timeout_s} s satisfied the condition; last reading: {last}; "
                                 f"last read error: {error}")
        time.sleep(0.005)


@pytest.fixture
def channels():
    tag = uuid.uuid4().hex[:8]
    return f"cm-left-{tag}", f"cm-right-{tag}"


@pytest.fixture
def fws(channels):
    pair = [PiperFirmware(ch, initial_deg=HOME_DEG, initial_gripper_mm=HOME_GRIPPER_MM) for ch in channels]
    yield pair
    for fw in pair:
        fw.close()


# Feedback older than this is a read error. Tests use more than the 50 ms default: the in-process
# fakes share one interpreter with four SDK threads, on a 2-core machine shared with other work.
# The silence test checks the real default.
TEST_STALE_S = 0.15


def make_backend(channels, bustype: str = "virtual", stale_s: float = TEST_STALE_S, **kwargs) -> CobotMagicBackend:
    cfg = CobotMagicBackendConfig(left_can=channels[0], right_can=channels[1], bustype=bustype, stale_s=stale_s)
    return CobotMagicBackend(cfg, EMB, **kwargs)


@pytest.fixture
def backend(channels, fws):
    b = make_backend(channels)
    b.connect(3.0)
    yield b
    b.close()


@pytest.fixture
def masters(channels):
    made: list[PiperMaster] = []

    def start(side: int, **kwargs) -> PiperMaster:
        made.append(PiperMaster(channels[side], **kwargs))
        return made[-1]

    yield start
    for m in made:
        m.close()


def test_connect_enables_both_puppets(fws, backend):
    for fw in fws:
        assert fw.enabled.all() and fw.ctrl_mode == 0x01
    r = wait_reading(backend)
    assert r.position.shape == (14,) and r.velocity is not None and r.velocity.shape == (14,)
    assert np.allclose(r.position, EMB.home, atol=1e-4)
    assert not r.estopped and r.fault is None


def test_fourteen_values_round_trip_in_the_right_units(fws, backend):
    left = np.array([0.3, 0.4, -0.5, 0.2, -0.1, 0.6, 0.03])
    right = np.array([-0.2, 0.7, -0.3, -0.2, 0.1, -0.4, 0.05])
    target = np.concatenate([left, right])
    backend.write(target)
    wait_reading(backend, lambda r: np.allclose(r.position, target, atol=1e-3))
    # On each bus: that arm's half, in 0.001 deg and 0.001 mm.
    for fw, half in zip(fws, (left, right)):
        assert np.array_equal(fw.joint_targets[-1][1], np.round(half[:6] * MDEG_PER_RAD))
        assert abs(fw.gripper_target_um - half[6] * 1e6) < 1


def test_estop_on_one_arm_estops_the_reading_and_the_driver_stops_both(fws, backend):
    drv = Driver(EMB, backend, lease_ttl_s=1.0)
    drv.connect(2.0)
    now = 0
    lease = drv.handle(F.make("acquire", client="t"), now)["lease"]
    drv.handle(F.make("arm", lease=lease), now)
    fws[0].press_estop()  # the left arm's own e-stop
    assert wait_reading(backend, lambda r: r.estopped).extras["estopped_arms"] == ["left"]

    def estopped() -> bool:
        nonlocal now
        now += DT_NS
        drv.tick(now)
        return drv.mode == Mode.ESTOP

    assert wait_for(estopped, 2.0), drv.mode
    # The driver's e-stop went to both puppets: the right one was not pressed but is stopped too.
    assert wait_for(lambda: fws[1].estopped and fws[0].estopped, 2.0)
    assert any(arb == 0x150 and d[0] == 0x01 for _, arb, d in fws[1].received)


def test_estop_reaches_the_second_arm_when_the_first_fails(fws, backend):
    backend.arms[0].backend.close()  # the left arm is gone: its estop call fails
    with pytest.raises(BackendError, match="left arm"):
        backend.estop()
    assert wait_for(lambda: fws[1].estopped, 2.0)


def test_a_fault_names_the_arm(fws, backend):
    fws[1].inject_error(1 << 2)  # joint 3 communication, right arm
    fault = wait_reading(backend, lambda r: r.fault is not None).fault
    assert "right arm" in fault and "joint_3 communication" in fault and "left arm" not in fault


def test_silence_on_one_arm_is_a_transient_read_error_naming_it(channels, fws):
    backend = make_backend(channels, stale_s=0.05)  # the default
    backend.connect(3.0)
    try:
        wait_reading(backend)
        fws[0].silence()
        t0 = time.monotonic()
        with pytest.raises(BackendError) as err:
            while time.monotonic() - t0 < 0.5:
                backend.read()
                time.sleep(0.002)
        elapsed = time.monotonic() - t0
    finally:
        backend.close()
    assert elapsed < 0.05 + 0.07, elapsed  # the staleness bound plus a fake cycle and scheduling
    assert err.value.transient and "left arm" in str(err.value) and "stale" in str(err.value)


@pytest.mark.parametrize("absent", [0, 1])
def test_connect_fails_clearly_within_the_deadline_when_one_arm_is_absent(channels, absent):
    present = PiperFirmware(channels[1 - absent], initial_deg=HOME_DEG)
    b = make_backend(channels)
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError) as err:
            b.connect(0.6)
        elapsed = time.monotonic() - t0
    finally:
        b.close()
        present.close()
    side = ("left", "right")[absent]
    assert elapsed < 0.6 + 0.2, elapsed
    assert not err.value.transient
    assert f"{side} arm ({channels[absent]})" in str(err.value) and "no joint feedback" in str(err.value)
    # The arm that did connect was closed again.
    assert all(arm.backend._piper is None for arm in b.arms)


def matches_some_recent_pose(master: PiperMaster, got: np.ndarray, t_read: float) -> bool:
    """Each CAN frame's values (joint pairs, gripper) equal the scripted pose at some instant of the
    last 0.1 s (read_masters' staleness bound): exact up to the grid's step and 0.001 deg rounding."""
    step_s = 0.0005
    ts = t_read - np.arange(0.0, 0.1 + step_s, step_s)
    poses = np.stack([master.pose_at(t) for t in ts])
    tol = master.max_speed() * step_s / 2 + 1.0 / MDEG_PER_RAD
    frames = ([0, 1], [2, 3], [4, 5], [6])
    return all(np.any(np.all(np.abs(poses[:, f] - got[f]) <= tol[f], axis=1)) for f in frames)


def test_masters_are_read_in_si_units(fws, channels, masters):
    ms = [masters(0), masters(1, center=np.array([0.1, 0.8, -0.9, -0.1, 0.2, 0.4, 0.05]))]
    b = make_backend(channels, follow_masters=True)
    b.connect(3.0)
    try:
        assert wait_for(lambda: b.read_masters() is not None, 2.0)
        for _ in range(20):
            got = b.read_masters()
            t_read = time.monotonic()
            assert got is not None and got.shape == (14,)
            assert matches_some_recent_pose(ms[0], got[:7], t_read), got[:7]
            assert matches_some_recent_pose(ms[1], got[7:], t_read), got[7:]
            time.sleep(0.01)
        # In teleop the puppets follow their masters in hardware (the fake does too) ...
        wait_reading(b, lambda r: np.allclose(r.position, np.concatenate([m.pose_at(time.monotonic()) for m in ms]),
                                              atol=0.05), 2.0)
        # ... and this backend never commands them.
        with pytest.raises(BackendError, match="follows the master"):
            b.write(EMB.home)
        ms[1].set_broadcasting(False)
        assert wait_for(lambda: b.read_masters() is None, 2.0)
    finally:
        b.close()


def test_a_broadcasting_master_faults_the_driver_and_blocks_writes(fws, backend, masters):
    drv = Driver(EMB, backend, lease_ttl_s=1.0)
    drv.connect(2.0)
    now = 0
    lease = drv.handle(F.make("acquire", client="t"), now)["lease"]
    drv.handle(F.make("arm", lease=lease), now)
    for _ in range(20):  # commanding alone is fine: our own frames are not a master
        now += DT_NS
        drv.tick(now)
        time.sleep(DT)
    assert drv.mode == Mode.ARMED, drv.reason
    master = masters(1)  # the right master starts broadcasting

    def faulted() -> bool:
        nonlocal now
        now += DT_NS
        drv.tick(now)
        return drv.mode == Mode.FAULT

    assert wait_for(faulted, 2.0), drv.mode
    assert "right arm" in drv.reason and "master" in drv.reason and "left arm" not in drv.reason
    with pytest.raises(BackendError, match="master"):
        backend.write(EMB.home)
    with pytest.raises(ProtocolError, match="master"):  # cannot clear the fault while it broadcasts
        drv.handle(F.make("clear_fault", lease=lease), now)
    master.set_broadcasting(False)
    wait_reading(backend, lambda r: r.fault is None)
    drv.handle(F.make("clear_fault", lease=lease), now)
    assert drv.mode == Mode.IDLE


def test_driver_runs_a_trajectory_and_both_arms_stay_within_the_velocity_limits(fws, backend):
    drv = Driver(EMB, backend, lease_ttl_s=1.0)
    drv.connect(2.0)
    now = 0

    def cmd(kind, **fields):
        return drv.handle(F.make(kind, **fields), now)

    lease = cmd("acquire", client="t")["lease"]
    cmd("arm", lease=lease)
    # 0.2 s for up to 0.3 rad asks 1.5 rad/s; the limit is 1.0 rad/s, so the filter must cap it.
    goal = EMB.home + np.array([0.3, 0.2, -0.2, 0.1, -0.1, 0.2, 0.01, -0.3, 0.15, -0.25, -0.1, 0.1, -0.2, 0.02])
    pts = EMB.home + np.linspace(0.0, 1.0, 40)[:, None] * (goal - EMB.home)
    cmd("trajectory", lease=lease, t0_ns=now + DT_NS, dt=0.005, points=pts, final=True)
    first = [len(fw.joint_targets) for fw in fws]
    for _ in range(400):
        now += DT_NS
        cmd("heartbeat", lease=lease)
        drv.tick(now)
        time.sleep(DT)  # the fakes run on real time; keep their feedback fresh
        if drv.mode == Mode.ARMED:
            break
    assert drv.mode == Mode.ARMED, drv.reason
    assert drv.counters.read_errors == 0
    held = drv.filter.position.copy()
    wait_reading(backend, lambda r: np.allclose(r.position, held, atol=2e-3))
    vmax = EMB.max_velocity
    rounding = 1.0 / MDEG_PER_RAD
    for side, (fw, start) in enumerate(zip(fws, first)):
        sent = np.array([t for _, t in fw.joint_targets[start:]]) / MDEG_PER_RAD
        assert len(sent) > 40
        step = np.abs(np.diff(sent, axis=0)).max(axis=0)
        arm_vmax = vmax[7 * side:7 * side + 6]
        assert np.all(step <= arm_vmax * DT + rounding), (side, step / DT)
        assert step[0] / DT > 0.5  # it moved fast enough for the limit to matter
        grips = [int.from_bytes(d[:4], "big", signed=True) for _, arb, d in fw.received if arb == 0x159]
        grip = np.array(grips[-len(sent):]) / 1e6
        assert np.abs(np.diff(grip)).max() <= vmax[7 * side + 6] * DT + 1e-6


# --------------------------------------------------------------------------- across processes


@pytest.fixture
def fake_process(monkeypatch):
    port = free_udp_port()
    groups = [random_group(), random_group()]
    while groups[1] == groups[0]:
        groups[1] = random_group()
    monkeypatch.setenv("CAN_CONFIG", f'{{"port": {port}}}')  # this process's python-can buses use it too
    with FakePiperProcess(groups, port, "--home", "--master", "off") as fake:
        yield fake


def test_over_udp_multicast_the_arms_are_isolated_and_our_echo_is_not_a_master(fake_process):
    fake = fake_process
    b = make_backend(fake.channels, bustype="udp_multicast")
    b.connect(3.0)
    try:
        left = EMB.home[:7] + np.array([0.1, 0.1, -0.1, 0.1, 0.1, 0.1, 0.01])
        right = EMB.home[:7] + np.array([-0.1, 0.2, -0.2, -0.1, -0.1, -0.1, 0.0])
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:  # commanding at the control rate, hearing our own frames back
            r = reading_or_none(b)
            assert r is None or r.fault is None, r.fault
            b.write(np.concatenate([left, right]))
            time.sleep(DT)
        # Each fake got its own arm's half only: the two groups share a UDP port but not traffic.
        for ch, half in zip(fake.channels, (left, right)):
            assert np.allclose(fake.state(ch)["target"], half[:6], atol=1e-5), ch
        wait_reading(b, lambda r: np.allclose(r.position, np.concatenate([left, right]), atol=2e-3))
        fake.cmd(f"master {fake.channels[0]} 1")
        fault = wait_reading(b, lambda r: r.fault is not None).fault
        assert "left arm" in fault and "master" in fault and "right arm" not in fault
    finally:
        b.close()


def test_a_disabled_motor_or_a_lost_mode_on_one_puppet_faults_naming_the_arm(fws, backend):
    wait_reading(backend, lambda r: r.fault is None)
    fws[1].disable_motors(2, stuck=False)
    r = wait_reading(backend, lambda r: r.fault is not None, timeout_s=0.3 + 0.5)
    assert "right arm" in r.fault and "joint_2" in r.fault and "left arm" not in r.fault, r.fault
    fws[0].set_mode(0x02)
    r = wait_reading(backend, lambda r: "left arm" in (r.fault or ""), timeout_s=0.8)
    assert "teaching mode" in r.fault, r.fault


def test_recover_after_a_power_cycle_brings_both_puppets_back_where_they_stand(fws, backend):
    sagged = HOME_DEG + np.array([0.0, -3.0, 2.0, 0.0, 1.0, 0.0])
    fws[0].power_cycle(sagged)
    wait_reading(backend, lambda r: "standby" in (r.fault or ""), timeout_s=0.8)
    backend.recover(3.0)
    for fw in fws:
        assert fw.ctrl_mode == 0x01 and fw.enabled.all()
    r = wait_reading(backend, lambda r: r.fault is None)
    time.sleep(0.3)
    assert np.allclose(np.degrees(fws[0].state()["q"]), sagged, atol=0.01)
    assert np.allclose(np.degrees(r.position[:6]), sagged, atol=0.01)


def test_recover_names_the_arm_whose_motor_stays_disabled(fws, backend):
    fws[0].disable_motors(5, stuck=True)
    wait_reading(backend, lambda r: r.fault is not None, timeout_s=0.8)
    with pytest.raises(BackendError, match="left arm.*joint_5 stayed disabled"):
        backend.recover(0.5)


def test_the_driver_faults_on_a_power_cycled_puppet_and_clear_fault_re_anchors_where_it_stands(fws, backend):
    drv = Driver(EMB, backend, lease_ttl_s=5.0)
    drv.connect(2.0)
    now = 0
    lease = drv.handle(F.make("acquire", client="t"), now)["lease"]
    drv.handle(F.make("arm", lease=lease), now)
    sagged = HOME_DEG + np.array([0.0, -3.0, 2.0, 0.0, 1.0, 0.0])
    fws[1].power_cycle(sagged)

    def faulted() -> bool:
        nonlocal now
        now += DT_NS
        drv.tick(now)
        return drv.mode == Mode.FAULT

    assert wait_for(faulted, 0.3 + 0.5), drv.mode
    assert "right arm" in drv.reason and "standby mode" in drv.reason, drv.reason
    drv.handle(F.make("clear_fault", lease=lease), now)
    assert drv.mode == Mode.IDLE, drv.reason
    assert fws[1].ctrl_mode == 0x01 and fws[1].enabled.all()
    drv.handle(F.make("arm", lease=lease), now)
    first = len(fws[1].joint_targets)
    for _ in range(20):
        now += DT_NS
        drv.tick(now)
        time.sleep(DT)
    assert drv.mode == Mode.ARMED, drv.reason
    held = np.array([t for _, t in fws[1].joint_targets[first:]]) / 1000.0  # deg
    assert len(held) > 5 and np.abs(held - sagged).max() < 0.05, np.abs(held - sagged).max()
    assert np.allclose(np.degrees(fws[1].state()["q"]), sagged, atol=0.05)


# --------------------------------------------------------------------------- as a composite of two arms


def test_a_broadcasting_master_on_one_arm_means_neither_arm_is_commanded(fws, backend, masters):
    masters(1)  # the right master broadcasts; the left bus has only our own frames
    wait_reading(backend, lambda r: r.fault is not None)
    before = [len(fws[0].joint_targets), sum(arb == 0x159 for _, arb, _ in fws[0].received)]
    for _ in range(5):
        with pytest.raises(BackendError, match="right arm.*master") as err:
            backend.write(EMB.home)
        assert not err.value.transient and "left arm" not in str(err.value)
        time.sleep(DT)
    time.sleep(0.05)  # anything sent would have reached the fake firmware by now
    assert [len(fws[0].joint_targets), sum(arb == 0x159 for _, arb, _ in fws[0].received)] == before


def test_the_state_carries_both_masters_as_one_leader_and_names_the_quiet_one(channels, fws, masters):
    cfg = CobotMagicBackendConfig(left_can=channels[0], right_can=channels[1], bustype="virtual", stale_s=TEST_STALE_S,
                                  masters_in_state=True)
    b = CobotMagicBackend(cfg, EMB, follow_masters=True)
    b.connect(3.0)
    try:
        masters(0)  # only the left master is on (the right bus still carries our connect's anchoring frames a moment)
        r = wait_reading(b, lambda r: "no master command frames" in r.extras.get("leader_error", "")
                         and "left arm" not in r.extras["leader_error"])
        assert r.extras["leader"] is None and r.extras["leader_follows_in_hardware"] is True
        assert r.extras["leader_error"].startswith(f"Cobot Magic right arm ({channels[1]}): no master command frames")
        assert r.extras["master_arms"] == [] and r.extras["estopped_arms"] == [] and r.fault is None
        masters(1)
        r = wait_reading(b, lambda r: r.extras["leader"] is not None)
        assert len(r.extras["leader"]) == 14 and "leader_error" not in r.extras
        assert np.allclose(r.extras["leader"], b.read_masters(), atol=0.05)
        assert set(r.extras) == {"estopped_arms", "master_arms", "leader", "leader_follows_in_hardware"}
    finally:
        b.close()
