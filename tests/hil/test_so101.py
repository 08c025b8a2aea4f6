"""The SO-101 backend in-process (lerobot's FeetechMotorsBus, unmodified) against the fake STS3215
buses: calibration files as lerobot writes them, wiring errors, torque, the per-tick Status read,
goal limits and the leader."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("lerobot.motors.feetech", reason="lerobot is installed without dependencies (README)")

from armada.drivers.core.backend import BackendError  # noqa: E402
from armada.drivers.so101.backend import So101Backend, So101Settings  # noqa: E402
from armada.drivers.so101.bench import BENCH_CALIBRATION  # noqa: E402
from armada.drivers.so101.config import JOINTS, So101BackendConfig, settings  # noqa: E402
from armada.drivers.so101.fake.feetech import (  # noqa: E402
    HOMING_OFFSET, MAX_POSITION_LIMIT, MIN_POSITION_LIMIT, TORQUE_ENABLE, FeetechBusFake)
from armada.drivers.so101.fake.so101 import So101Fake  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402

pytestmark = pytest.mark.hil

# lerobot's own file for an arm calibrated away from the fake's power-on state (offsets not 0).
LEROBOT_JSON = {
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -37, "range_min": 760, "range_max": 3340},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": 112, "range_min": 880, "range_max": 3230},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": -5, "range_min": 870, "range_max": 3120},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": 60, "range_min": 890, "range_max": 3210},
    "wrist_roll": {"id": 5, "drive_mode": 0, "homing_offset": -1400, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": -100, "range_min": 1990, "range_max": 3420},
}


@pytest.fixture(autouse=True)
def quick_thread_switches():
    """The fake answers from a thread of this process: hand the GIL over sooner than every 5 ms."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


def torque_off_writes(bus: FeetechBusFake) -> list[int]:
    """Spy on the fake: every servo ID that was written Torque_Enable = 0 (by anyone)."""
    seen: list[int] = []
    write = bus._write

    def spy(s, addr, data):
        if addr <= TORQUE_ENABLE < addr + len(data) and data[TORQUE_ENABLE - addr] == 0:
            seen.append(s.id)
        return write(s, addr, data)

    bus._write = spy
    return seen


def backend(port: str, calibration=BENCH_CALIBRATION, **kw) -> So101Backend:
    return So101Backend(So101Settings(port=port, calibration=calibration, **kw))


def test_an_existing_lerobot_calibration_file_loads_is_written_to_the_servos_and_maps_to_radians(short_tmp):
    path = short_tmp / "my_awesome_follower_arm.json"  # as lerobot-calibrate names it: <id>.json
    path.write_text(json.dumps(LEROBOT_JSON, indent=4))
    # lerobot's own loader reads the same file to the same values
    from lerobot.robots.so_follower import SOFollower, SOFollowerRobotConfig
    theirs = SOFollower(SOFollowerRobotConfig(port="/dev/null", id=path.stem, calibration_dir=short_tmp,
                                              disable_torque_on_disconnect=False)).calibration
    cfg = So101BackendConfig(port="unused")
    ctx = SimpleNamespace(driver=SimpleNamespace(backend=cfg, joint_calibration=path.name), cell_dir=short_tmp,
                          embodiment=load_embodiment("so101"))
    ours = settings(ctx)["calibration"]
    assert {n: vars(c) for n, c in theirs.items()} == ours
    with FeetechBusFake(range(1, 7)) as fake:
        b = backend(fake.port, ours)
        b.connect(5.0)
        try:
            for n, c in LEROBOT_JSON.items():  # written, as lerobot's connect writes a mismatching calibration
                off = fake.register(c["id"], HOMING_OFFSET, 2)
                assert (-(off & 0x7FF) if off & 0x800 else off) == c["homing_offset"], n
                assert fake.register(c["id"], MIN_POSITION_LIMIT, 2) == c["range_min"]
                assert fake.register(c["id"], MAX_POSITION_LIMIT, 2) == c["range_max"]
            q = b.read().position
            for k, n in enumerate(JOINTS):
                c, present = LEROBOT_JSON[n], fake.present_position(k + 1)
                want = ((present - c["range_min"]) / (c["range_max"] - c["range_min"]) if n == "gripper"
                        else (present - (c["range_min"] + c["range_max"]) / 2) * 2 * math.pi / 4095)
                assert q[k] == pytest.approx(want, abs=1e-9), n
        finally:
            b.close()


@pytest.mark.parametrize("ids, found, missing", [
    (range(1, 6), "[1, 2, 3, 4, 5]", "6 (gripper)"),
    ([1, 2, 3, 4, 5, 7], "[1, 2, 3, 4, 5, 7]", "6 (gripper)"),  # the gripper's servo never got its ID
    ([2, 3, 4, 5, 6], "[2, 3, 4, 5, 6]", "1 (shoulder_pan)"),
])
def test_a_missing_or_wrong_servo_id_is_an_error_naming_the_ids_found(ids, found, missing):
    with FeetechBusFake(ids) as fake:
        b = backend(fake.port)
        with pytest.raises(BackendError) as info:
            b.connect(5.0)
        b.close()
    msg = str(info.value)
    assert info.value.transient is False
    assert f"no answer from servo IDs {missing}" in msg and f"IDs found on the bus: {found}" in msg, msg
    assert all(fake.register(i, TORQUE_ENABLE) == 0 for i in fake.ids())  # nothing was enabled


def test_a_servo_of_the_wrong_model_is_named():
    with FeetechBusFake({1: 777, 2: 777, 3: 777, 4: 777, 5: 777, 6: 1}) as fake:
        b = backend(fake.port)
        with pytest.raises(BackendError, match=r"wrong models: 6 \(gripper\) is model 1"):
            b.connect(5.0)
        b.close()


def test_no_port_is_a_clear_error(short_tmp):
    b = backend(str(short_tmp / "ttySO101_none"))
    with pytest.raises(BackendError, match="no serial port .*ttySO101_none") as info:
        b.connect(2.0)
    assert info.value.transient is False


def test_the_driver_never_disables_torque_connect_estop_fault_close_recover_reconnect():
    with FeetechBusFake(range(1, 7)) as fake:
        offs = torque_off_writes(fake)
        b = backend(fake.port)
        b.connect(5.0)
        assert all(fake.register(i, TORQUE_ENABLE) == 1 for i in fake.ids())
        q = b.read().position
        b.write(q + np.array([0.1, 0, 0, 0, 0, 0]))
        b.estop()
        b.on_fault("test")
        with pytest.raises(BackendError, match="not writing"):
            b.write(q)
        b.estop()  # after a fault: nothing is written at all
        b.close()
        b.recover(5.0)
        b.close()
        b2 = backend(fake.port)  # a new process finds the servos with torque on: it keeps it on
        before = [fake.present_position(i) for i in fake.ids()]
        b2.connect(5.0)
        time.sleep(0.1)
        assert [fake.present_position(i) for i in fake.ids()] == before  # nothing jumped
        b2.close()
        assert offs == [], f"Torque_Enable = 0 written to {offs}"
        assert all(fake.register(i, TORQUE_ENABLE) == 1 for i in fake.ids())


def test_a_calibration_mismatch_with_torque_on_is_refused_and_nothing_is_written():
    with FeetechBusFake(range(1, 7)) as fake:
        b = backend(fake.port)
        b.connect(5.0)
        b.close()  # torque stays on
        other = {n: dict(c, homing_offset=c["homing_offset"] + 50) for n, c in BENCH_CALIBRATION.items()}
        b = backend(fake.port, other)
        with pytest.raises(BackendError, match="torque on: writing it would move those joints"):
            b.connect(5.0)
        b.close()
        assert all(fake.register(i, HOMING_OFFSET, 2) == 0 for i in fake.ids())


def test_a_goal_outside_the_calibrated_range_is_refused_before_anything_is_sent():
    with FeetechBusFake(range(1, 7)) as fake:
        b = backend(fake.port)
        b.connect(5.0)
        try:
            q = b.read().position
            sent = len(fake.received_goals)
            far = q.copy()
            far[0] = 2.2  # shoulder_pan is calibrated 750..3350: +-1.995 rad
            with pytest.raises(BackendError, match="shoulder_pan=2.2000") as info:
                b.write(far)
            assert info.value.transient is False
            grip = q.copy()
            grip[5] = 1.2
            with pytest.raises(BackendError, match="gripper"):
                b.write(grip)
            assert len(fake.received_goals) == sent
        finally:
            b.close()


def test_an_error_bit_is_a_fault_at_the_next_read_and_recover_waits_for_it_to_clear():
    with FeetechBusFake(range(1, 7)) as fake:
        b = backend(fake.port)
        b.connect(5.0)
        try:
            assert b.read().fault is None
            fake.set_error(4, overheat=True)
            assert b.read().fault == "SO-101 follower: wrist_flex (ID 4) status: overheat"
            b.on_fault("overheat")
            with pytest.raises(BackendError, match=r"wrist_flex \(ID 4\): overheat"):
                b.recover(5.0)
            fake.set_error(4)
            b.recover(5.0)  # torque on again where it stands (the servo's protection had cut it)
            assert all(fake.register(i, TORQUE_ENABLE) == 1 for i in fake.ids())
            assert b.read().fault is None
            b.write(b.read().position)
        finally:
            b.close()


def test_an_unplugged_port_is_a_non_transient_error_that_stays_until_recover():
    with FeetechBusFake(range(1, 7)) as fake:
        b = backend(fake.port)
        b.connect(5.0)
        try:
            b.read()
            fake.unplug()
            with pytest.raises(BackendError, match="the serial port .* failed") as info:
                for _ in range(3):
                    b.read()
            assert info.value.transient is False
            with pytest.raises(BackendError, match="failed"):
                b.write(np.zeros(6))
        finally:
            b.close()


def test_the_leader_is_read_in_the_followers_units_and_never_written():
    with So101Fake() as fake:
        b = backend(fake.ports["follower"], leader_port=fake.ports["leader"], leader_calibration=BENCH_CALIBRATION,
                    leader_in_state=True)
        b.connect(5.0)
        try:
            deadline = time.monotonic() + 3.0  # with leader_in_state the leader is opened in the background
            while b.read().extras["leader"] is None and time.monotonic() < deadline:
                time.sleep(0.02)
            leader = fake.bus("leader")
            leader.move_by_hand(1, 2048 + 300)  # the operator turns the leader's shoulder_pan
            leader.move_by_hand(6, 3400)  # and opens its gripper
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                try:
                    q = b.read_leader()
                except BackendError as exc:  # the leader's 5 ms reply bound, the fake a thread of a loaded host
                    assert exc.transient, exc
                    continue
                if abs(q[0] - 298 * 2 * math.pi / 4095) < 1e-6 and q[5] > 0.9999:
                    break
                time.sleep(0.02)
            assert q[0] == pytest.approx((2348 - 2050) * 2 * math.pi / 4095, abs=1e-6)
            assert q[5] == pytest.approx(1.0)
            r = b.read()
            assert r.extras["leader"] == pytest.approx(q.tolist(), abs=1e-6)
            assert leader.received_goals == []
            assert all(leader.register(i, TORQUE_ENABLE) == 0 for i in leader.ids())
        finally:
            b.close()


def test_late_replies_of_a_timed_out_transaction_are_not_read_as_the_next_ones():
    """scservo_sdk's sync read takes the next bytes as each servo's reply: late position replies (a
    host starved past the timeout) read as Status would be error bits, a false fault."""
    from armada.drivers.so101.fake.feetech import status_packet

    with FeetechBusFake(range(1, 7)) as fake:
        b = backend(fake.port)
        b.connect(5.0)
        try:
            b.read()
            for _ in range(3):
                late = b"".join(status_packet(i, 0, bytes([0x03, 0x08])) for i in range(1, 7))
                with fake._lock:
                    fake._send(late)  # Present_Position replies arriving after their transaction gave up
                time.sleep(0.01)
                r = b.read()
                assert r.fault is None, r.fault
                assert np.allclose(r.position[:5], b.read().position[:5], atol=0.01)
        finally:
            b.close()
