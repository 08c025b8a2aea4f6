"""The fake Dynamixel X-series bus (drivers/aloha/fake) against the real, unmodified dynamixel_sdk."""

from __future__ import annotations

import os
import sys
import termios
import time

import pytest

dx = pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is in the `devices` extra")
import serial  # noqa: E402  (pyserial comes with the SDK)

from armada.drivers.aloha.fake.dynamixel import (  # noqa: E402
    CURRENT_LIMIT,
    GOAL_CURRENT,
    GOAL_POSITION,
    HARDWARE_ERROR_STATUS,
    LED,
    MAX_POSITION_LIMIT,
    OPERATING_MODE,
    PRESENT_CURRENT,
    PRESENT_POSITION,
    PRESENT_TEMPERATURE,
    PROFILE_VELOCITY,
    TORQUE_ENABLE,
    DynamixelBusFake,
    crc16,
    packet,
    stuff,
    unstuff,
)

SERVOS = {1: "xm540-w270", 2: "xm540-w270", 3: "xm430-w350", 4: "xm430-w350", 9: "xl430-w250"}
MODEL_NUMBERS = {1: 1120, 2: 1120, 3: 1020, 4: 1020, 9: 1060}

# Packets from the Protocol 2.0 documentation's examples (instruction and status packets).
DOC_PACKETS = [
    "FF FF FD 00 01 03 00 01 19 4E",  # ping id 1
    "FF FF FD 00 01 07 00 55 00 06 04 26 65 5D",  # its status: model 1030, firmware 38
    "FF FF FD 00 01 07 00 02 84 00 04 00 1D 15",  # read id 1, address 132, 4 bytes
    "FF FF FD 00 01 08 00 55 00 A6 00 00 00 8C C0",  # its status: position 166
    "FF FF FD 00 01 09 00 03 74 00 00 02 00 00 CA 89",  # write goal position 512
    "FF FF FD 00 FE 09 00 82 84 00 04 00 01 02 CE FA",  # sync read ids 1, 2
    "FF FF FD 00 FE 11 00 83 74 00 04 00 01 96 00 00 00 02 AA 00 00 00 82 87",  # sync write
    "FF FF FD 00 01 03 00 08 2F 4E",  # reboot id 1
]


def bitwise_crc(data: bytes) -> int:
    """CRC-16/BUYPASS the slow way (poly 0x8005, init 0, no reflection), independent of any table."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


@pytest.mark.parametrize("hexbytes", DOC_PACKETS)
def test_crc_matches_the_documented_packets(hexbytes):
    raw = bytes.fromhex(hexbytes)
    documented = raw[-2] | (raw[-1] << 8)
    assert bitwise_crc(raw[:-2]) == documented
    assert crc16(raw[:-2]) == documented


def test_status_packets_are_built_byte_for_byte_as_documented():
    assert packet(1, 0x55, bytes([0x00, 0x06, 0x04, 0x26])) == bytes.fromhex(DOC_PACKETS[1])
    assert packet(1, 0x55, bytes([0x00, 0xA6, 0x00, 0x00, 0x00])) == bytes.fromhex(DOC_PACKETS[3])


def test_byte_stuffing_both_ways_on_hand_made_examples():
    # FF FF FD inside the data gets an extra FD; the length field counts it; the CRC covers it.
    plain = bytes([0x55, 0x00, 0xFF, 0xFF, 0xFD, 0x00])
    stuffed = bytes([0x55, 0x00, 0xFF, 0xFF, 0xFD, 0xFD, 0x00])
    assert stuff(plain) == stuffed and unstuff(stuffed) == plain
    # nothing to do without the full FF FF FD; the length bytes before count as preceding bytes
    assert stuff(bytes([0xFF, 0xFD, 0xFF, 0xFF, 0xFE])) == bytes([0xFF, 0xFD, 0xFF, 0xFF, 0xFE])
    assert stuff(bytes([0xFD, 0x01]), before=bytes([0xFF, 0xFF])) == bytes([0xFD, 0xFD, 0x01])
    # status of id 1 reading 4 bytes FF FF FD 00: length 8 unstuffed, 9 stuffed
    body = bytes([0xFF, 0xFF, 0xFD, 0x00, 0x01, 0x09, 0x00, 0x55, 0x00, 0xFF, 0xFF, 0xFD, 0xFD, 0x00])
    crc = bitwise_crc(body)
    expected = body + bytes([crc & 0xFF, crc >> 8])
    assert packet(1, 0x55, bytes([0x00, 0xFF, 0xFF, 0xFD, 0x00])) == expected


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
    fake = DynamixelBusFake(SERVOS, max_speed=4000.0)
    port = fake.start()
    ph = patient(dx.PortHandler(port))
    assert ph.openPort() and ph.setBaudRate(1_000_000)
    pk = dx.PacketHandler(2.0)
    yield fake, ph, pk
    try:
        ph.closePort()
    except Exception:
        pass
    fake.stop()


def sync_read(ph, pk, addr, size, ids):
    reader = dx.GroupSyncRead(ph, pk, addr, size)
    for i in ids:
        reader.addParam(i)
    result = reader.txRxPacket()
    assert result == dx.COMM_SUCCESS, pk.getTxRxResult(result)
    return {i: reader.getData(i, addr, size) for i in ids}


def sync_write4(ph, pk, addr, values):
    writer = dx.GroupSyncWrite(ph, pk, addr, 4)
    for i, v in values.items():
        assert writer.addParam(i, list((v & 0xFFFFFFFF).to_bytes(4, "little")))
    assert writer.txPacket() == dx.COMM_SUCCESS


def wait_until(predicate, timeout=2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_ping_finds_exactly_the_configured_ids_with_model_and_firmware(bus):
    fake, ph, pk = bus
    found = {}
    for i in sorted(set(SERVOS) | {0, 5, 10}):  # each absent id costs a timeout
        model, result, error = pk.ping(ph, i)
        if result == dx.COMM_SUCCESS:
            found[i] = model
        else:
            assert result == dx.COMM_RX_TIMEOUT
    assert found == MODEL_NUMBERS


def test_broadcast_ping_lists_every_servo(bus):
    fake, ph, pk = bus
    data, result = pk.broadcastPing(ph)  # the SDK waits its fixed ~0.8 s window
    assert result == dx.COMM_SUCCESS
    assert data == {i: [m, 48] for i, m in MODEL_NUMBERS.items()}


def test_read_and_write_each_register_width(bus):
    fake, ph, pk = bus
    assert pk.write1ByteTxRx(ph, 3, LED, 1) == (dx.COMM_SUCCESS, 0)
    assert pk.read1ByteTxRx(ph, 3, LED) == (1, dx.COMM_SUCCESS, 0)
    assert pk.write2ByteTxRx(ph, 3, GOAL_CURRENT, 300) == (dx.COMM_SUCCESS, 0)
    assert pk.read2ByteTxRx(ph, 3, GOAL_CURRENT) == (300, dx.COMM_SUCCESS, 0)
    assert pk.write4ByteTxRx(ph, 3, PROFILE_VELOCITY, 70000) == (dx.COMM_SUCCESS, 0)
    assert pk.read4ByteTxRx(ph, 3, PROFILE_VELOCITY) == (70000, dx.COMM_SUCCESS, 0)
    assert pk.read2ByteTxRx(ph, 1, CURRENT_LIMIT)[0] == 2047
    assert pk.read2ByteTxRx(ph, 3, CURRENT_LIMIT)[0] == 1193
    # read-only and out-of-table accesses are refused with the access error
    assert pk.write4ByteTxRx(ph, 3, PRESENT_POSITION, 5) == (dx.COMM_SUCCESS, 7)
    assert pk.readTxRx(ph, 3, 700, 4)[2] == 7


def test_stuffed_bytes_survive_both_directions_through_the_sdk(bus):
    fake, ph, pk = bus
    indirect_data = 224
    value = int.from_bytes(bytes([0xFF, 0xFF, 0xFD, 0x00]), "little")
    assert pk.write4ByteTxRx(ph, 4, indirect_data, value) == (dx.COMM_SUCCESS, 0)
    assert fake.register(4, indirect_data, 4) == value
    assert pk.read4ByteTxRx(ph, 4, indirect_data) == (value, dx.COMM_SUCCESS, 0)


def test_eeprom_writes_are_refused_while_torque_is_on(bus):
    fake, ph, pk = bus
    assert pk.write1ByteTxRx(ph, 2, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)
    assert pk.write1ByteTxRx(ph, 2, OPERATING_MODE, 4) == (dx.COMM_SUCCESS, 7)
    assert "not available" in pk.getRxPacketError(7)
    assert pk.read1ByteTxRx(ph, 2, OPERATING_MODE)[0] == 3
    assert pk.write1ByteTxRx(ph, 2, TORQUE_ENABLE, 0) == (dx.COMM_SUCCESS, 0)
    assert pk.write1ByteTxRx(ph, 2, OPERATING_MODE, 4) == (dx.COMM_SUCCESS, 0)
    assert pk.read1ByteTxRx(ph, 2, OPERATING_MODE)[0] == 4


def test_sync_write_goals_then_sync_reads_track_them(bus):
    fake, ph, pk = bus
    ids = [1, 2, 3, 4]
    for i in ids:
        assert pk.write1ByteTxRx(ph, i, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)
    start = sync_read(ph, pk, PRESENT_POSITION, 4, ids)
    assert start == {i: 2048 for i in ids}
    goals = {1: 3000, 2: 1000, 3: 2500, 4: 2048}
    sync_write4(ph, pk, GOAL_POSITION, goals)
    time.sleep(0.05)
    mid = sync_read(ph, pk, PRESENT_POSITION, 4, ids)
    assert mid != start
    for i, goal in goals.items():
        assert min(2048, goal) <= mid[i] <= max(2048, goal)
    assert wait_until(lambda: sync_read(ph, pk, PRESENT_POSITION, 4, ids) == goals)
    # GroupBulkRead reads different registers of different servos in one go
    bulk = dx.GroupBulkRead(ph, pk)
    assert bulk.addParam(1, PRESENT_POSITION, 4) and bulk.addParam(3, TORQUE_ENABLE, 1)
    assert bulk.txRxPacket() == dx.COMM_SUCCESS
    assert bulk.getData(1, PRESENT_POSITION, 4) == 3000 and bulk.getData(3, TORQUE_ENABLE, 1) == 1


def test_goals_beyond_the_position_limits(bus):
    fake, ph, pk = bus
    assert pk.write4ByteTxRx(ph, 1, MAX_POSITION_LIMIT, 2500) == (dx.COMM_SUCCESS, 0)
    assert pk.write1ByteTxRx(ph, 1, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)
    # a single write beyond the limit: data limit error, the goal is not taken
    assert pk.write4ByteTxRx(ph, 1, GOAL_POSITION, 3000) == (dx.COMM_SUCCESS, 6)
    sync_write4(ph, pk, GOAL_POSITION, {1: 3500})
    time.sleep(0.1)
    assert pk.read4ByteTxRx(ph, 1, PRESENT_POSITION)[0] == 2048
    assert (1, 3000) in fake.received_goals and (1, 3500) in fake.received_goals
    # the clamping variant stops at the limit
    with DynamixelBusFake({1: "xm430-w350"}, goal_out_of_limit="clamp", max_speed=4000.0) as clamp:
        ph2 = patient(dx.PortHandler(clamp.port))
        assert ph2.openPort()
        assert pk.write4ByteTxRx(ph2, 1, MAX_POSITION_LIMIT, 2500) == (dx.COMM_SUCCESS, 0)
        assert pk.write1ByteTxRx(ph2, 1, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)
        sync_write4(ph2, pk, GOAL_POSITION, {1: 3500})
        assert wait_until(lambda: pk.read4ByteTxRx(ph2, 1, PRESENT_POSITION)[0] == 2500)
        time.sleep(0.05)
        assert pk.read4ByteTxRx(ph2, 1, PRESENT_POSITION)[0] == 2500
        ph2.closePort()


def test_torque_off_holds_position_and_follows_a_hand(bus):
    fake, ph, pk = bus
    assert pk.write4ByteTxRx(ph, 3, GOAL_POSITION, 3000) == (dx.COMM_SUCCESS, 0)
    time.sleep(0.1)
    assert pk.read4ByteTxRx(ph, 3, PRESENT_POSITION)[0] == 2048
    fake.move_by_hand(3, 1800, speed=5000)
    assert wait_until(lambda: pk.read4ByteTxRx(ph, 3, PRESENT_POSITION)[0] == 1800)
    assert pk.write1ByteTxRx(ph, 3, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)
    time.sleep(0.1)
    assert pk.read4ByteTxRx(ph, 3, PRESENT_POSITION)[0] == 1800  # holds, not the stale goal


def test_gripper_in_current_based_position_mode_stops_on_an_object(bus):
    fake, ph, pk = bus
    assert pk.write1ByteTxRx(ph, 4, OPERATING_MODE, 5) == (dx.COMM_SUCCESS, 0)
    assert pk.write2ByteTxRx(ph, 4, GOAL_CURRENT, 300) == (dx.COMM_SUCCESS, 0)
    assert pk.write2ByteTxRx(ph, 4, GOAL_CURRENT, 5000)[1] == 6  # above Current Limit
    assert pk.write1ByteTxRx(ph, 4, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)
    fake.block_at(4, 1500)
    assert pk.write4ByteTxRx(ph, 4, GOAL_POSITION, 1000) == (dx.COMM_SUCCESS, 0)
    assert wait_until(lambda: pk.read4ByteTxRx(ph, 4, PRESENT_POSITION)[0] == 1500)
    current = pk.read2ByteTxRx(ph, 4, PRESENT_CURRENT)[0]
    assert current - (1 << 16) == -300  # two's complement, toward the goal
    assert pk.write4ByteTxRx(ph, 4, GOAL_POSITION, 2000) == (dx.COMM_SUCCESS, 0)  # opening is free
    assert wait_until(lambda: pk.read4ByteTxRx(ph, 4, PRESENT_POSITION)[0] == 2000)


def test_reg_write_waits_for_action(bus):
    fake, ph, pk = bus
    assert pk.regWriteTxRx(ph, 3, LED, 1, [1]) == (dx.COMM_SUCCESS, 0)
    assert pk.read1ByteTxRx(ph, 3, LED)[0] == 0
    assert pk.action(ph, dx.BROADCAST_ID) == dx.COMM_SUCCESS
    assert wait_until(lambda: pk.read1ByteTxRx(ph, 3, LED)[0] == 1)

def test_missing_servo_times_out_and_breaks_a_sync_read(bus):
    fake, ph, pk = bus
    fake.set_missing(2)
    assert pk.ping(ph, 2)[1] == dx.COMM_RX_TIMEOUT
    reader = dx.GroupSyncRead(ph, pk, PRESENT_POSITION, 4)
    for i in (1, 2, 3):
        reader.addParam(i)
    assert reader.txRxPacket() != dx.COMM_SUCCESS
    assert pk.ping(ph, 1)[1] == dx.COMM_SUCCESS


def test_bad_crc_is_reported_as_corrupt(bus):
    fake, ph, pk = bus
    fake.set_bad_crc(3)
    assert pk.read4ByteTxRx(ph, 3, PRESENT_POSITION)[1] == dx.COMM_RX_CORRUPT
    fake.set_bad_crc(3, False)
    assert pk.read4ByteTxRx(ph, 3, PRESENT_POSITION)[1] == dx.COMM_SUCCESS


def test_overload_sets_the_alert_bit_cuts_torque_and_latches_until_reboot(bus):
    fake, ph, pk = bus
    assert pk.write1ByteTxRx(ph, 1, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)
    fake.set_error(1, overload=True)
    value, result, error = pk.read4ByteTxRx(ph, 1, PRESENT_POSITION)
    assert result == dx.COMM_SUCCESS and error & 0x80
    assert "Hardware error" in pk.getRxPacketError(error)
    assert pk.read1ByteTxRx(ph, 1, HARDWARE_ERROR_STATUS)[0] == 0x20
    assert pk.read1ByteTxRx(ph, 1, TORQUE_ENABLE)[0] == 0  # shutdown
    pk.write1ByteTxRx(ph, 1, TORQUE_ENABLE, 1)
    assert pk.read1ByteTxRx(ph, 1, TORQUE_ENABLE)[0] == 0  # stays off until reboot
    fake.set_error(1)  # cause gone, the status latches
    assert pk.read1ByteTxRx(ph, 1, HARDWARE_ERROR_STATUS)[0] == 0x20
    assert pk.reboot(ph, 1) == (dx.COMM_SUCCESS, 0x80)
    assert wait_until(lambda: pk.read1ByteTxRx(ph, 1, HARDWARE_ERROR_STATUS) == (0, dx.COMM_SUCCESS, 0))
    assert pk.write1ByteTxRx(ph, 1, TORQUE_ENABLE, 1) == (dx.COMM_SUCCESS, 0)


def test_overheat_sets_the_alert_and_the_temperature(bus):
    fake, ph, pk = bus
    fake.set_error(3, overheat=True)
    temp, result, error = pk.read1ByteTxRx(ph, 3, PRESENT_TEMPERATURE)
    assert result == dx.COMM_SUCCESS and error == 0x80 and temp > 80
    assert pk.read1ByteTxRx(ph, 3, HARDWARE_ERROR_STATUS)[0] == 0x04
    # GroupSyncRead drops the error byte: the hardware error shows in a sync read of address 70
    assert sync_read(ph, pk, HARDWARE_ERROR_STATUS, 1, [1, 3, 4]) == {1: 0, 3: 0x04, 4: 0}
    assert pk.ping(ph, 4)[2] == 0  # the others are fine


def test_unplugged_port_raises_in_the_sdk_and_the_path_vanishes(bus):
    fake, ph, pk = bus
    port = fake.port
    assert pk.ping(ph, 1)[1] == dx.COMM_SUCCESS
    fake.unplug()
    # clearPort's tcdrain/tcflush fails with EIO (termios.error), or a read with SerialException
    with pytest.raises((termios.error, serial.SerialException, OSError)) as info:
        for _ in range(3):
            pk.ping(ph, 1)
    message = str(info.value)
    assert "Input/output" in message or "read failed" in message or "device" in message
    assert not os.path.exists(port)
