"""The fake STS3215 bus (drivers/so101/fake) against the real, unmodified scservo_sdk."""

from __future__ import annotations

import os
import sys
import termios
import time

import pytest

scs = pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is in the `devices` extra")
import serial  # noqa: E402  (pyserial comes with the SDK)

from armada.drivers.so101.fake.feetech import (  # noqa: E402
    ACCELERATION,
    BAUD_RATE,
    GOAL_POSITION,
    GOAL_VELOCITY,
    HOMING_OFFSET,
    ID,
    MAX_POSITION_LIMIT,
    MIN_POSITION_LIMIT,
    PRESENT_POSITION,
    PRESENT_TEMPERATURE,
    STATUS,
    TORQUE_ENABLE,
    FeetechBusFake,
    checksum,
)

IDS = [1, 2, 3, 4, 5, 6]


def patient(ph, margin_ms: float = 150.0):
    """Give the port handler's packet timeout a margin for a loaded CI box.

    The protocol code stays the SDK's own; only the timeout grows, as lerobot's Feetech bus does
    (it adds 50 ms). A missing servo then costs the margin too.
    """
    base = ph.setPacketTimeout

    def set_packet_timeout(packet_length):
        base(packet_length)
        ph.packet_timeout += margin_ms

    ph.setPacketTimeout = set_packet_timeout
    return ph


@pytest.fixture(autouse=True)
def quick_thread_switches():
    """The fake answers from a thread of this process: hand the GIL over sooner than every 5 ms."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def bus():
    fake = FeetechBusFake(IDS, max_speed=4000.0)
    port = fake.start()
    ph = patient(scs.PortHandler(port))
    assert ph.openPort()
    pk = scs.PacketHandler(0)
    yield fake, ph, pk
    try:
        ph.closePort()
    except Exception:
        pass
    fake.stop()


def sync_read(ph, pk, addr, size, ids):
    reader = scs.GroupSyncRead(ph, pk, addr, size)
    for i in ids:
        reader.addParam(i)
    result = reader.txRxPacket()
    assert result == scs.COMM_SUCCESS, pk.getTxRxResult(result)
    return {i: reader.getData(i, addr, size) for i in ids}


def sync_write(ph, pk, addr, size, values):
    writer = scs.GroupSyncWrite(ph, pk, addr, size)
    for i, v in values.items():
        data = [scs.SCS_LOBYTE(v), scs.SCS_HIBYTE(v)] if size == 2 else [v]
        assert writer.addParam(i, data)
    assert writer.txPacket() == scs.COMM_SUCCESS


def wait_until(predicate, timeout=2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_checksum_matches_a_hand_computed_packet():
    # ping of id 1: FF FF 01 02 01 chk, chk = ~(1 + 2 + 1) & 0xFF = 0xFB
    assert checksum(bytes([0x01, 0x02, 0x01])) == 0xFB
    # read of id 1, address 56, 2 bytes: ~(1 + 4 + 2 + 56 + 2) & 0xFF = ~65 & 0xFF = 0xBE
    assert checksum(bytes([0x01, 0x04, 0x02, 0x38, 0x02])) == 0xBE


def test_ping_finds_exactly_the_configured_ids_with_the_sts3215_model(bus):
    fake, ph, pk = bus
    found = {}
    for i in [0, *IDS, 7]:  # each absent id costs a timeout
        model, result, error = pk.ping(ph, i)
        if result == scs.COMM_SUCCESS:
            assert error == 0
            found[i] = model
        else:
            assert result == scs.COMM_RX_TIMEOUT
    assert found == {i: 777 for i in IDS}
    # firmware version as lerobot reads it at connect (addresses 0 and 1)
    assert pk.read1ByteTxRx(ph, 1, 0)[0] == 3
    assert pk.read1ByteTxRx(ph, 1, 1)[0] == 10


def test_broadcast_ping_is_answered_by_every_servo(bus):
    fake, ph, pk = bus
    ph.writePort(bytes([0xFF, 0xFF, 0xFE, 0x02, 0x01, checksum(bytes([0xFE, 0x02, 0x01]))]))
    data = b""
    end = time.monotonic() + 1.0
    while len(data) < 6 * len(IDS) and time.monotonic() < end:
        data += ph.readPort(64)
    replies = [data[k : k + 6] for k in range(0, len(data), 6)]
    assert [r[2] for r in replies] == IDS
    for r in replies:
        assert r[:2] == b"\xff\xff" and r[3] == 2 and r[4] == 0 and r[5] == checksum(r[2:5])


def test_read_and_write_each_register_width(bus):
    fake, ph, pk = bus
    assert pk.write1ByteTxRx(ph, 2, ACCELERATION, 254) == (scs.COMM_SUCCESS, 0)
    assert pk.read1ByteTxRx(ph, 2, ACCELERATION) == (254, scs.COMM_SUCCESS, 0)
    assert pk.write2ByteTxRx(ph, 2, GOAL_VELOCITY, 1234) == (scs.COMM_SUCCESS, 0)
    assert pk.read2ByteTxRx(ph, 2, GOAL_VELOCITY) == (1234, scs.COMM_SUCCESS, 0)
    assert fake.register(2, GOAL_VELOCITY, 2) == 1234  # little-endian, as protocol end 0 packs it
    # a 4-byte access spans Min_Position_Limit (9) and Max_Position_Limit (11)
    assert pk.write4ByteTxRx(ph, 2, MIN_POSITION_LIMIT, (3000 << 16) | 500) == (scs.COMM_SUCCESS, 0)
    assert pk.read2ByteTxRx(ph, 2, MIN_POSITION_LIMIT)[0] == 500
    assert pk.read2ByteTxRx(ph, 2, MAX_POSITION_LIMIT)[0] == 3000
    assert pk.read4ByteTxRx(ph, 2, MIN_POSITION_LIMIT)[0] == (3000 << 16) | 500


def test_homing_offset_is_sign_magnitude_and_shifts_present_position(bus):
    fake, ph, pk = bus
    fake.set_position(3, 1000)
    assert pk.write2ByteTxRx(ph, 3, HOMING_OFFSET, scs.SCS_TOSCS(-100, 11)) == (scs.COMM_SUCCESS, 0)
    assert fake.register(3, HOMING_OFFSET, 2) == 100 | (1 << 11)
    # Present_Position = actual - Homing_Offset
    assert pk.read2ByteTxRx(ph, 3, PRESENT_POSITION)[0] == 1100
    assert pk.write2ByteTxRx(ph, 3, HOMING_OFFSET, 1500) == (scs.COMM_SUCCESS, 0)
    assert pk.read2ByteTxRx(ph, 3, PRESENT_POSITION)[0] == (1000 - 1500) % 4096


def test_sync_write_goals_then_sync_reads_track_them_and_stop_at_the_limits(bus):
    fake, ph, pk = bus
    assert pk.write2ByteTxRx(ph, 2, MAX_POSITION_LIMIT, 2500) == (scs.COMM_SUCCESS, 0)
    for i in IDS:
        assert pk.write1ByteTxRx(ph, i, TORQUE_ENABLE, 1) == (scs.COMM_SUCCESS, 0)
    start = sync_read(ph, pk, PRESENT_POSITION, 2, IDS)
    assert start == {i: 2048 for i in IDS}
    goals = {1: 2400, 2: 3500, 3: 1500, 4: 2048, 5: 3000, 6: 1000}
    sync_write(ph, pk, GOAL_POSITION, 2, goals)
    time.sleep(0.05)
    mid = sync_read(ph, pk, PRESENT_POSITION, 2, IDS)
    for i, goal in goals.items():
        if goal != 2048:  # moved toward the goal, not past it
            assert min(2048, goal) <= mid[i] <= max(2048, goal)
    assert mid != start
    final_goals = {**goals, 2: 2500}  # id 2 is clamped by its Max_Position_Limit
    assert wait_until(lambda: sync_read(ph, pk, PRESENT_POSITION, 2, IDS) == final_goals)
    assert (2, 3500) in fake.received_goals  # what was sent, before clamping
    time.sleep(0.05)
    assert sync_read(ph, pk, PRESENT_POSITION, 2, IDS) == final_goals


def test_torque_off_holds_position_and_follows_a_hand(bus):
    fake, ph, pk = bus
    assert pk.write2ByteTxRx(ph, 4, GOAL_POSITION, 3000) == (scs.COMM_SUCCESS, 0)
    time.sleep(0.1)
    assert pk.read2ByteTxRx(ph, 4, PRESENT_POSITION)[0] == 2048
    fake.move_by_hand(4, 2200, speed=5000)
    assert wait_until(lambda: pk.read2ByteTxRx(ph, 4, PRESENT_POSITION)[0] == 2200)
    # enabling torque holds where the arm is, not at the stale goal
    assert pk.write1ByteTxRx(ph, 4, TORQUE_ENABLE, 1) == (scs.COMM_SUCCESS, 0)
    time.sleep(0.1)
    assert pk.read2ByteTxRx(ph, 4, PRESENT_POSITION)[0] == 2200


def test_reg_write_waits_for_action_and_broadcast_write_reaches_all(bus):
    fake, ph, pk = bus
    assert pk.regWriteTxRx(ph, 1, ACCELERATION, 1, [77]) == (scs.COMM_SUCCESS, 0)
    assert pk.read1ByteTxRx(ph, 1, ACCELERATION)[0] == 0
    assert pk.action(ph, 1) == scs.COMM_SUCCESS
    assert pk.read1ByteTxRx(ph, 1, ACCELERATION)[0] == 77
    assert pk.write1ByteTxRx(ph, scs.BROADCAST_ID, ACCELERATION, 9) == (scs.COMM_SUCCESS, 0)  # no reply
    assert all(pk.read1ByteTxRx(ph, i, ACCELERATION)[0] == 9 for i in IDS)

def test_missing_servo_times_out_and_breaks_a_sync_read(bus):
    fake, ph, pk = bus
    fake.set_missing(5)
    assert pk.ping(ph, 5)[1] == scs.COMM_RX_TIMEOUT
    assert pk.ping(ph, 4)[1] == scs.COMM_SUCCESS
    reader = scs.GroupSyncRead(ph, pk, PRESENT_POSITION, 2)
    for i in IDS:
        reader.addParam(i)
    assert reader.txRxPacket() != scs.COMM_SUCCESS


def test_bad_checksum_is_reported_as_corrupt(bus):
    fake, ph, pk = bus
    fake.set_bad_checksum(6)
    assert pk.read2ByteTxRx(ph, 6, PRESENT_POSITION)[1] == scs.COMM_RX_CORRUPT
    fake.set_bad_checksum(6, False)
    assert pk.read2ByteTxRx(ph, 6, PRESENT_POSITION)[1] == scs.COMM_SUCCESS


def test_overload_and_overheat_bits_in_the_error_byte(bus):
    fake, ph, pk = bus
    assert pk.write1ByteTxRx(ph, 1, TORQUE_ENABLE, 1) == (scs.COMM_SUCCESS, 0)
    fake.set_error(1, overload=True)
    value, result, error = pk.read2ByteTxRx(ph, 1, PRESENT_POSITION)
    assert result == scs.COMM_SUCCESS and error & scs.ERRBIT_OVERLOAD
    assert "Overload" in pk.getRxPacketError(error)
    assert pk.read1ByteTxRx(ph, 1, STATUS)[0] & scs.ERRBIT_OVERLOAD
    assert pk.read1ByteTxRx(ph, 1, TORQUE_ENABLE)[0] == 0  # the servo's protection unloads it
    fake.set_error(2, overheat=True)
    temp, result, error = pk.read1ByteTxRx(ph, 2, PRESENT_TEMPERATURE)
    assert result == scs.COMM_SUCCESS and error == scs.ERRBIT_OVERHEAT and temp > 70
    # GroupSyncRead drops the error byte; a sync read that spans Status (65) still shows it
    state = scs.GroupSyncRead(ph, pk, PRESENT_POSITION, 11)
    for i in IDS:
        state.addParam(i)
    assert state.txRxPacket() == scs.COMM_SUCCESS
    assert [state.getData(i, STATUS, 1) for i in IDS] == [scs.ERRBIT_OVERLOAD, scs.ERRBIT_OVERHEAT, 0, 0, 0, 0]
    fake.set_error(1)
    assert pk.ping(ph, 1)[2] == 0


def test_unplugged_port_raises_in_the_sdk_and_the_path_vanishes(bus):
    fake, ph, pk = bus
    port = fake.port
    assert pk.ping(ph, 1)[1] == scs.COMM_SUCCESS
    fake.unplug()
    # clearPort's tcdrain/tcflush fails with EIO (termios.error), or a read with SerialException
    with pytest.raises((termios.error, serial.SerialException, OSError)) as info:
        for _ in range(3):
            pk.ping(ph, 1)
    message = str(info.value)
    assert "Input/output" in message or "read failed" in message or "device" in message
    assert not os.path.exists(port)


def test_a_servo_of_another_model_reports_its_own_model_number():
    with FeetechBusFake({1: 777, 2: 2825}) as fake:
        ph = patient(scs.PortHandler(fake.port))
        assert ph.openPort()
        pk = scs.PacketHandler(0)
        assert [pk.ping(ph, i)[0] for i in (1, 2)] == [777, 2825]
        ph.closePort()


def test_id_and_baud_rate_writes_behave_like_the_servo(bus):
    fake, ph, pk = bus
    assert pk.write1ByteTxRx(ph, 6, ID, 10) == (scs.COMM_SUCCESS, 0)
    assert pk.ping(ph, 10)[:2] == (777, scs.COMM_SUCCESS)
    assert pk.ping(ph, 6)[1] == scs.COMM_RX_TIMEOUT
    assert pk.write1ByteTxRx(ph, 10, BAUD_RATE, 1) == (scs.COMM_SUCCESS, 0)  # 500 kbaud
    assert pk.ping(ph, 10)[1] == scs.COMM_RX_TIMEOUT
    assert ph.setBaudRate(500_000)
    assert pk.ping(ph, 10)[1] == scs.COMM_SUCCESS
    assert pk.ping(ph, 1)[1] == scs.COMM_RX_TIMEOUT


def test_lerobot_feetech_bus_runs_unmodified_against_the_fake():
    lerobot_feetech = pytest.importorskip("lerobot.motors.feetech", reason="lerobot is not installed")
    from lerobot.motors import Motor, MotorCalibration, MotorNormMode

    names = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
    with FeetechBusFake(IDS) as fake:
        motors = {n: Motor(i + 1, "sts3215", MotorNormMode.RANGE_M100_100) for i, n in enumerate(names)}
        cal = {n: MotorCalibration(id=i + 1, drive_mode=0, homing_offset=0, range_min=1000, range_max=3000)
               for i, n in enumerate(names)}
        bus = lerobot_feetech.FeetechMotorsBus(fake.port, motors, calibration=cal)
        bus.connect()
        assert bus.broadcast_ping() == {i: 777 for i in IDS}
        bus.write_calibration(cal)
        assert bus.is_calibrated
        bus.disable_torque()
        bus.configure_motors()
        bus.enable_torque()
        bus.sync_write("Goal_Position", {n: 50.0 for n in names})
        positions = lambda: bus.sync_read("Present_Position").values()  # noqa: E731
        assert wait_until(lambda: all(abs(v - 50.0) < 0.5 for v in positions()))
        bus.disconnect(disable_torque=True)
        assert all(fake.register(i, TORQUE_ENABLE) == 0 for i in IDS)
        # a missing servo: lerobot's handshake names it
        fake.set_missing(3)
        bus = lerobot_feetech.FeetechMotorsBus(fake.port, motors, calibration=cal)
        with pytest.raises(RuntimeError, match=r"Missing motor IDs:\n  - 3 "):
            bus.connect()
