"""The ALOHA driver (drivers/aloha) through the real dynamixel_sdk against the fake Dynamixel buses:
connect checks, an episode through the real driver core whose every goal stays inside the limits,
faults within their bound with nothing written after, torque never cut, leaders and their gripper
mapping, recovery."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is in the `devices` extra")

from armada.drivers.aloha.backend import (  # noqa: E402
    ADDR_GOAL_CURRENT,
    ADDR_OPERATING_MODE,
    ADDR_TORQUE_ENABLE,
    AlohaBackend,
    AlohaSettings,
    ticks_to_rad,
)
from armada.drivers.aloha.calibration import GripperCalibration  # noqa: E402
from armada.drivers.aloha.fake.aloha import AlohaFake  # noqa: E402
from armada.drivers.aloha.config import AlohaBackendConfig, settings  # noqa: E402
from armada.drivers.core.backend import BackendError  # noqa: E402
from armada.drivers.core.driver import Driver, Mode  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402
from armada.runtime.protocol import MessageFactory  # noqa: E402

pytestmark = pytest.mark.hil

EMB = load_embodiment("aloha")
DT = 1.0 / EMB.control_rate_hz
F = MessageFactory()
FOLLOWERS = ("puppet_left", "puppet_right")
# The stated bound: a fault is seen by the first read after it (one 50 Hz tick, 20 ms) or, for a
# silent bus, after the backend's stale bound (0.2 s) or the core's 0.1 s of failing reads, plus
# a loaded 2-core host.
FAULT_BOUND_S = 0.2 + 0.15
JOINT_OF_ID = {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 4, 8: 5, 9: 6}  # shadows 3 and 5 follow 2 and 4


def make_settings(ports: dict[str, str], **overrides) -> AlohaSettings:
    leaders = {"left_leader_port": ports["master_left"], "right_leader_port": ports["master_right"]} \
        if "master_left" in ports else {}
    # A 4 ms latency allowance instead of a real adapter's 1 ms: the fake's thread shares 2 loaded cores.
    overrides.setdefault("latency_timer_ms", 4.0)
    cfg = AlohaBackendConfig(left_follower_port=ports["puppet_left"], right_follower_port=ports["puppet_right"],
                             **leaders, **overrides)
    ctx = SimpleNamespace(driver=SimpleNamespace(backend=cfg, joint_calibration=None), embodiment=EMB, cell_dir=None)
    return AlohaSettings(**settings(ctx))


@pytest.fixture(autouse=True)
def gil_handover():
    """The fake answers from a thread of this process while dynamixel_sdk busy-waits for the reply in
    another: ask for the GIL hand-over within 0.2 ms, as the driver's worker process does (the
    default 5 ms would make the fake miss the SDK's packet timeouts)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def fake():
    with AlohaFake() as f:
        yield f


@pytest.fixture
def backend(fake):
    b = AlohaBackend(make_settings(fake.ports))
    b.connect(5.0)
    yield b
    b.close()


def torque(fake: AlohaFake, bus: str) -> dict[int, int]:
    return {i: fake.bus(bus).register(i, ADDR_TORQUE_ENABLE) for i in fake.bus(bus).ids()}


def wait_for(pred, timeout_s: float = 1.0) -> bool:
    end = time.monotonic() + timeout_s
    while not pred() and time.monotonic() < end:
        time.sleep(0.005)
    return bool(pred())


def assert_all_torque_on(fake: AlohaFake) -> None:
    for bus in FOLLOWERS:
        assert set(torque(fake, bus).values()) == {1}, f"{bus}: torque {torque(fake, bus)}"


def goals_si(fake: AlohaFake, bus: str, since: int = 0) -> list[tuple[int, float]]:
    """(joint index in the arm, goal in SI units) of every goal the fake received after ``since``."""
    cal = GripperCalibration(**make_settings(fake.ports).grippers["left" if bus.endswith("left") else "right"])
    out = []
    for sid, ticks in fake.bus(bus).received_goals[since:]:
        j = JOINT_OF_ID[sid]
        out.append((j, float(cal.opening(ticks)) if j == 6 else float(ticks_to_rad(ticks))))
    return out


# --------------------------------------------------------------------------- connect


def test_connect_sets_modes_and_enables_torque_at_the_present_pose(fake, backend):
    assert_all_torque_on(fake)
    for bus in FOLLOWERS:
        f = fake.bus(bus)
        modes = {i: f.register(i, ADDR_OPERATING_MODE) for i in f.ids()}
        assert modes == {1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 6: 3, 7: 3, 8: 3, 9: 5}
        assert f.register(9, ADDR_GOAL_CURRENT, 2) == 300
        # Every goal written at connect is where the servo was: enabling torque moved nothing.
        starts = {i: f.present_position(i) for i in f.ids()}
        assert f.received_goals and all(g == starts[i] for i, g in f.received_goals), f.received_goals
    # Leaders are only read: torque stays off there, modes untouched.
    for bus in ("master_left", "master_right"):
        assert set(torque(fake, bus).values()) == {0}
        assert fake.bus(bus).received_goals == []
    r = backend.read()
    assert r.fault is None and r.position.shape == (14,)
    # The fake rests folded, as a powered-up ALOHA does: waist 0, shoulder -0.96, elbow 1.16, wrist -0.3 rad.
    assert np.allclose(r.position[:6], [0.0, -0.96, 1.16, 0.0, -0.3, 0.0], atol=2e-3), r.position[:6]
    assert 0.0184 < r.position[6] < 0.058


def test_a_missing_servo_fails_connect_naming_the_ids_found_and_missing(fake):
    fake.bus("puppet_right").set_missing(4)
    b = AlohaBackend(make_settings(fake.ports))
    with pytest.raises(BackendError) as e:
        b.connect(5.0)
    msg = str(e.value)
    assert "right follower" in msg and "servo 4 (elbow" in msg
    assert "IDs found on the bus: [1, 2, 3, 5, 6, 7, 8, 9]" in msg
    assert not e.value.transient


def test_a_wrong_servo_id_or_model_fails_connect(fake):
    b = AlohaBackend(make_settings(fake.ports, follower_ids={"gripper": 10}))
    with pytest.raises(BackendError, match=r"servo 10 \(gripper.*IDs found on the bus: \[1, 2, 3, 4, 5, 6, 7, 8, 9\]"):
        b.connect(5.0)
    # Leader ports given as followers: XM430s where XM540s belong.
    swapped = dict(fake.ports, puppet_left=fake.ports["master_left"], master_left=fake.ports["puppet_left"])
    with pytest.raises(BackendError, match=r"wrong servo models: servo 1 \(waist, XM540-W270\) is a XM430-W350"):
        AlohaBackend(make_settings(swapped)).connect(5.0)


def test_an_unlinked_shadow_motor_fails_connect(fake):
    fake.bus("puppet_left").link_shadow(3, 255)
    with pytest.raises(BackendError, match=r"servo 3 \(shoulder_shadow.*Secondary_ID 255, not its primary's ID 2"):
        AlohaBackend(make_settings(fake.ports)).connect(5.0)


def test_an_embodiment_range_beyond_a_servos_position_limits_fails_connect(fake):
    f = fake.bus("puppet_right")
    with f._lock:  # noqa: SLF001 (someone set the elbow's Max Position Limit, EEPROM 48, to 3000 ticks)
        f._servos[4].put(48, 4, 3000)  # noqa: SLF001
    with pytest.raises(BackendError, match=r"right follower: the embodiment's ranges exceed the servos' position "
                                           r"limits: elbow needs ticks 899\.\.3095 .* the servo allows 0\.\.3000"):
        AlohaBackend(make_settings(fake.ports)).connect(5.0)


def test_an_arm_joint_in_the_wrong_mode_with_torque_on_is_refused_not_dropped(fake, backend):
    backend.close()
    f = fake.bus("puppet_left")
    # Someone left the elbow in velocity mode with torque on: switching needs torque off (a fall).
    f.register(4, ADDR_TORQUE_ENABLE)
    with f._lock:  # noqa: SLF001 (test setup inside the fake's memory)
        f._servos[4].mem[ADDR_OPERATING_MODE] = 1  # noqa: SLF001
    with pytest.raises(BackendError, match=r"servo 4 \(elbow.*velocity mode with torque on.*support the arm"):
        AlohaBackend(make_settings(fake.ports)).connect(5.0)
    assert f.register(4, ADDR_TORQUE_ENABLE) == 1


def test_a_servo_already_in_error_at_connect_changes_nothing_and_is_reported_as_a_fault(fake):
    fake.bus("puppet_left").set_error(6, overload=True)  # overload: its own shutdown cut its torque
    b = AlohaBackend(make_settings(fake.ports))
    b.connect(5.0)
    try:
        assert "left follower: servo 6 (forearm_roll, XM540-W270) hardware error: overload" in b.read().fault
        assert set(torque(fake, "puppet_left").values()) == {0} and set(torque(fake, "puppet_right").values()) == {0}
        with pytest.raises(BackendError, match="not writing: hardware errors at connect"):
            b.write(b.read().position)
        b.estop()
        assert all(fake.bus(bus).received_goals == [] for bus in FOLLOWERS)
        d = Driver(EMB, b, lease_ttl_s=5.0)
        d.connect(5.0)
        d.tick(time.monotonic_ns())
        assert d.mode == Mode.FAULT and "servo 6" in d.reason
    finally:
        b.close()


def test_no_port_is_a_clear_error(tmp_path):
    b = AlohaBackend(make_settings({"puppet_left": str(tmp_path / "ttyDXL_puppet_left"),
                                    "puppet_right": str(tmp_path / "ttyDXL_puppet_right")}))
    t = time.monotonic()
    with pytest.raises(BackendError, match=r"left follower: no serial port .*ttyDXL_puppet_left"):
        b.connect(5.0)
    assert time.monotonic() - t < 1.0


# --------------------------------------------------------------------------- the driver core


def cmd(d: Driver, kind: str, **fields):
    return d.handle(F.make(kind, **fields), time.monotonic_ns())


def run(d: Driver, seconds: float, lease: str | None = None, until=None) -> float:
    """Tick the real driver core at 50 Hz on monotonic deadlines; returns the elapsed time."""
    start = time.monotonic()
    next_t = start
    while time.monotonic() - start < seconds:
        if lease is not None:
            cmd(d, "heartbeat", lease=lease)
        d.tick(time.monotonic_ns())
        if until is not None and until(d):
            break
        next_t += DT
        time.sleep(max(0.0, next_t - time.monotonic()))
    return time.monotonic() - start


@pytest.fixture
def driver(backend):
    d = Driver(EMB, backend, lease_ttl_s=5.0)
    d.connect(5.0)
    return d


def armed(d: Driver) -> str:
    lease = cmd(d, "acquire", client="t")["lease"]
    cmd(d, "arm", lease=lease)
    return lease


def test_an_episode_of_chunks_keeps_every_goal_the_servos_receive_inside_the_limits(fake, driver):
    lease = armed(driver)
    marks = {bus: len(fake.bus(bus).received_goals) for bus in FOLLOWERS}
    # Four chunks, each from where the arm is commanded now (as a policy re-plans from its state),
    # asking for far too much: swings of 3x each joint's half range at 1 Hz, beyond every range and
    # ~10x the velocity limits.
    lo, hi = EMB.lower, EMB.upper
    amplitude = 1.5 * (hi - lo) * np.where(np.arange(14) % 2, 1.0, -1.0)
    for chunk in range(4):
        now = time.monotonic_ns() + 10_000_000  # starts just ahead: its first point is the current pose
        k = np.arange(40)[:, None]
        points = driver.filter.position + amplitude * np.sin(2 * np.pi * 1.0 * k * DT)
        cmd(driver, "trajectory", lease=lease, t0_ns=now, dt=DT, points=points, final=chunk == 3, episode=1,
            chunk=chunk)
        run(driver, 0.5, lease)
    clamps = driver.filter.counters.as_dict()
    assert clamps["velocity"] > 0 and clamps["position"] + clamps["braking"] > 0, clamps  # it did ask too much
    tol_rad = 0.5 * 2 * np.pi / 4096  # rounding to whole ticks
    for side, bus in zip((0, 7), FOLLOWERS):
        goals = goals_si(fake, bus, marks[bus])
        assert len(goals) > 9 * 80, f"{bus}: only {len(goals)} goals"
        cal = GripperCalibration(**make_settings(fake.ports).grippers["left" if side == 0 else "right"])
        tol_m = 0.5 * (cal.open_m - cal.closed_m) / abs(cal.raw_open - cal.raw_closed)
        for j, g in goals:
            tol = tol_m if j == 6 else tol_rad
            assert lo[side + j] - tol <= g <= hi[side + j] + tol, \
                f"{bus} joint {j}: goal {g} outside [{lo[side + j]}, {hi[side + j]}]"
        # Per joint, consecutive goals (one per tick) within the velocity limit.
        for j in range(7):
            seq = np.array([g for jj, g in goals if jj == j])
            if j in (1, 2):
                seq = seq[::2]  # the shoulder's and elbow's goals reach their shadows too: two per tick
            tol = tol_m if j == 6 else tol_rad
            step = np.abs(np.diff(seq)).max()
            assert step <= EMB.max_velocity[side + j] * DT * 1.001 + 2 * tol, (bus, j, step)
    assert_all_torque_on(fake)


def test_a_hardware_error_bit_faults_within_the_bound_and_nothing_is_written_after(fake, driver):
    lease = armed(driver)
    run(driver, 0.2, lease)
    fake.bus("puppet_right").set_error(7, overheat=True)
    t = time.monotonic()
    run(driver, 1.0, lease, until=lambda d: d.mode == Mode.FAULT)
    assert driver.mode == Mode.FAULT and time.monotonic() - t < FAULT_BOUND_S
    assert "right follower: servo 7 (wrist_angle, XM540-W270) hardware error: overheating" in driver.reason
    time.sleep(0.05)  # a write sent just before the fault lands in the fake
    counts = {bus: len(fake.bus(bus).received_goals) for bus in FOLLOWERS}
    run(driver, 0.5, lease)
    cmd(driver, "estop", reason="test")
    assert {bus: len(fake.bus(bus).received_goals) for bus in FOLLOWERS} == counts
    # Overheating is in the servo's Shutdown mask: it cut its own torque; every other servo holds.
    tq = torque(fake, "puppet_right")
    assert tq.pop(7) == 0 and set(tq.values()) == {1}
    assert set(torque(fake, "puppet_left").values()) == {1}


@pytest.mark.parametrize("how", ["unplug", "silent", "bad_crc"])
def test_an_unplugged_port_a_silent_servo_or_bad_crcs_fault_within_the_bound_and_nothing_is_written_after(
        fake, driver, how):
    lease = armed(driver)
    run(driver, 0.2, lease)
    if how == "unplug":
        fake.bus("puppet_left").unplug()
    elif how == "silent":
        fake.bus("puppet_left").set_missing(6)
    else:
        fake.bus("puppet_left").set_bad_crc(6)  # every reply of servo 6 fails its CRC
    mark = len(fake.bus("puppet_right").received_goals)
    t = time.monotonic()
    run(driver, 1.5, lease, until=lambda d: d.mode == Mode.FAULT)
    took = time.monotonic() - t
    assert driver.mode == Mode.FAULT and took < FAULT_BOUND_S, (driver.mode, took, driver.reason)
    assert "left follower" in driver.reason
    time.sleep(0.05)  # a write sent just before the fault lands in the fake
    written_by_fault = len(fake.bus("puppet_right").received_goals)
    assert written_by_fault >= mark
    run(driver, 0.5, lease)
    assert len(fake.bus("puppet_right").received_goals) == written_by_fault
    assert set(torque(fake, "puppet_right").values()) == {1}
    if how != "unplug":
        assert set(torque(fake, "puppet_left").values()) == {1}


def test_close_estop_and_lease_loss_never_disable_torque(fake, backend):
    d = Driver(EMB, backend, lease_ttl_s=0.1)
    d.connect(5.0)
    lease = armed(d)
    run(d, 0.3, lease)
    run(d, 0.5)  # no heartbeats: the lease lapses and the driver holds
    assert d.counters.lease_lost >= 1
    assert_all_torque_on(fake)
    mark = {bus: len(fake.bus(bus).received_goals) for bus in FOLLOWERS}
    cmd(d, "estop", reason="test")
    assert d.mode == Mode.ESTOP
    for bus in FOLLOWERS:  # e-stop holds: goal = present position on every joint
        f = fake.bus(bus)
        wait_for(lambda: len(f.received_goals) >= mark[bus] + 9)  # a sync write is not answered: let it land
        new = f.received_goals[mark[bus]:]
        assert new and all(abs(g - f.present_position(i)) <= 1 for i, g in new), (bus, new, d.reason)
    assert_all_torque_on(fake)
    backend.close()
    assert_all_torque_on(fake)


def test_recover_reboots_only_on_request_and_takes_control_where_the_arm_is(fake):
    b = AlohaBackend(make_settings(fake.ports, reboot_on_recover=True))
    b.connect(5.0)
    d = Driver(EMB, b, lease_ttl_s=5.0)
    d.connect(5.0)
    lease = armed(d)
    fake.bus("puppet_left").set_error(2, overload=True)  # the shoulder overloads; its torque goes
    run(d, 0.5, until=lambda dd: dd.mode == Mode.FAULT)
    assert d.mode == Mode.FAULT
    fake.bus("puppet_left").set_error(2)  # the cause is gone; the bit stays latched until a reboot
    assert cmd(d, "clear_fault", lease=lease)["mode"] == "idle"
    assert_all_torque_on(fake)
    assert b.read().fault is None
    # Without reboot_on_recover the operator is told what to do, and nothing is rebooted.
    b2 = AlohaBackend(make_settings(fake.ports))
    b2.connect(5.0)
    fake.bus("puppet_right").set_error(8, overload=True)
    fake.bus("puppet_right").set_error(8)
    with pytest.raises(BackendError, match=r"servo 8 \(wrist_rotate.*overload.*power-cycle"):
        b2.recover(5.0)
    assert fake.bus("puppet_right").register(8, 70) == 0x20  # still latched: not rebooted
    b.close()
    b2.close()


def test_recover_refuses_to_reboot_a_servo_whose_torque_is_still_on(fake):
    b = AlohaBackend(make_settings(fake.ports, reboot_on_recover=True))
    b.connect(5.0)
    fake.bus("puppet_left").set_error(1, voltage=True)  # input voltage: not in Shutdown, torque stays on
    assert "input voltage" in b.read().fault
    with pytest.raises(BackendError, match=r"torque still on; a reboot would cut it"):
        b.recover(5.0)
    assert set(torque(fake, "puppet_left").values()) == {1}
    b.close()


# --------------------------------------------------------------------------- leaders


def read_leaders(backend: AlohaBackend, timeout_s: float = 1.0) -> np.ndarray:
    """The leaders' pose; a reply lost on a loaded host (transient, which the leader poll rides out)
    is read again, for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return backend.read_leaders()
        except BackendError as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise


def test_leaders_read_in_si_with_alohas_gripper_mapping(fake, backend):
    s = make_settings(fake.ports)
    lead, fol = (GripperCalibration(**s.grippers[k]) for k in ("left_leader", "left"))
    f = fake.bus("master_left")
    f.move_by_hand(1, 2048 + 512)  # waist a quarter of a turn... an eighth: 512 of 4096 ticks
    f.move_by_hand(9, round(lead.raw_open))
    fake.bus("master_right").move_by_hand(9, round(lead.raw_closed))
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        q = read_leaders(backend)
        if abs(q[0] - np.pi / 4) < 1e-3 and abs(q[6] - fol.open_m) < 1e-4 and abs(q[13] - fol.closed_m) < 1e-4:
            break
        time.sleep(0.02)
    assert q[0] == pytest.approx(np.pi / 4, abs=1e-3)
    # Leader fully open -> follower fully open, leader closed -> follower closed, linear between.
    assert q[6] == pytest.approx(fol.open_m, abs=1e-4) and q[13] == pytest.approx(fol.closed_m, abs=1e-4)
    f.move_by_hand(9, round((lead.raw_open + lead.raw_closed) / 2))
    time.sleep(0.5)
    assert read_leaders(backend)[6] == pytest.approx((fol.open_m + fol.closed_m) / 2, abs=2e-4)


def test_leaders_in_state_travel_in_the_readings_extras(fake):
    b = AlohaBackend(make_settings(fake.ports, leaders_in_state=True))
    b.connect(5.0)
    assert wait_for(lambda: b.read().extras["leader"] is not None, 3.0)  # opened in the background
    r = b.read()
    assert len(r.extras["leader"]) == 14 and r.extras["leader_follows_in_hardware"] is False
    fake.bus("master_right").unplug()
    r = b.read()  # a leader gone: no leader pose, the followers still read
    assert r.extras["leader"] is None and "right leader" in r.extras["leader_error"] and r.fault is None
    b.close()
