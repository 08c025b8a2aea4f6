"""Fake Dynamixel X-series servos (Protocol 2.0) on a pseudo-terminal, at the packet level.

What it models
--------------
A bus of X-series servos (ALOHA: XM540-W270 and XM430-W350 on the ViperX followers, XM430-W350,
XL430-W250 and XC430-W150 on the WidowX leaders) behind a serial port, so that the real
``dynamixel_sdk`` (PortHandler, PacketHandler(2.0), GroupSyncRead/GroupSyncWrite, GroupBulkRead)
runs unmodified against it. The fake opens a pty pair; the SDK opens the slave path
(``fake.port``) with pyserial at 1 Mbaud; the fake answers on the master side from a thread.

- Packets ``FF FF FD 00 id len_l len_h instr params crc_l crc_h``; CRC-16 with polynomial 0x8005
  (init 0, not reflected) over everything before the CRC, as sent (stuffed); byte stuffing
  ``FF FF FD`` -> ``FF FF FD FD`` from the instruction byte on, both ways.
- Instructions: ping (1; reply: model number and firmware; broadcast ping: every servo answers,
  in ID order), read (2), write (3), reg write (4) / action (5), reboot (8; clears the hardware
  error unless its injected cause persists, and resets RAM: torque off), sync read (0x82, one status
  packet per listed servo in the listed order), sync write (0x83), bulk read (0x92), bulk write
  (0x93). Other instructions get an "instruction error" status (unicast) or nothing (broadcast);
  fast sync/bulk read (0x8A/0x9A) are not answered.
- Status packets (instruction 0x55) with the error byte: bit 7 (alert) whenever Hardware Error
  Status (70) is non-zero, plus an error number: 2 instruction, 4 data range, 5 data length,
  6 data limit (a Goal Position outside Min/Max Position Limit in position mode, a Goal Current
  above Current Limit), 7 access (a write to a read-only address, to EEPROM (< 64) while torque
  is on, or beyond the table). Corrupt instructions (bad CRC) are dropped.
- The X-series control table: model number 0, model information 2, firmware 6, ID 7, baud 8,
  return delay 9, drive mode 10, operating mode 11 (0 current, 1 velocity, 3 position,
  4 extended position, 5 current-based position, 16 PWM), homing offset 20, temperature limit 31,
  voltage limits 32/34, PWM limit 36, current limit 38, velocity limit 44, max/min position limit
  48/52, shutdown 63, torque enable 64, LED 65, status return level 68, registered instruction 69,
  hardware error status 70, gains 76-90, goal PWM 100, goal current 102, goal velocity 104,
  profile acceleration 108, profile velocity 112, goal position 116, realtime tick 120, moving
  122, present PWM 124, present current 126, present velocity 128, present position 132,
  present input voltage 144, present temperature 146. Little-endian, two's complement.
- Present_Position = actual + Homing_Offset. Dynamics per tick of wall time: with torque on, in
  modes 3/4/5 the position moves toward Goal Position at Profile Velocity (0.229 rpm units,
  0 = ``max_speed``), in mode 1 at Goal Velocity; modes 0 and 16 do not move by themselves. With
  torque off the servo stays, or follows ``move_by_hand``. ``block_at`` puts an obstacle in the
  way (a gripper closing on an object): the position stops there and, in mode 5, Present Current
  reads the Goal Current. Enabling torque sets Goal Position to Present Position (holds).
- Secondary_ID (12): a servo whose Secondary_ID names another ID also executes writes and sync/bulk
  writes addressed to that ID, silently (a ViperX's shadow motors; ``link_shadow``).
- A hardware error whose bit is in Shutdown (63, default 0x34: overheat, electrical shock,
  overload) turns torque off and keeps it off (writes of 1 are ignored) until reboot.

What it does not model
----------------------
Profile acceleration and time-based profiles, PID and real current/PWM physics, the return
delay, baud rates as timing, the multi-turn reset of Present Position on reboot, indirect
addresses (they read and write as plain memory), the backup/restore and factory reset
instructions, clear (0x10), protocol 1.0, the reversed direction of a shadow motor (Drive Mode
bit 0: a shadow here takes its primary's goal as is), and bus collisions; replies from several
servos are written back to back. Power-on defaults (firmware 48, limits 0-4095, Shutdown 0x34, the goal held on torque
enable, goals beyond the limits refused) are this fake's reading of the e-manual, not measured.
Replies the host leaves unread beyond the pty's buffer (about 4 KiB) are dropped and counted in
``bytes_dropped``, as an adapter's buffer would overflow, rather than blocking the bus.

Faults to inject (methods): ``set_missing(id)``, ``set_bad_crc(id)`` (its replies carry a wrong
CRC), ``set_error(id, overload=..., overheat=..., voltage=..., electrical_shock=...,
encoder=...)`` (Hardware Error Status bits, latched until reboot), ``unplug()``.
``received_goals`` lists every (id, goal position) written, before any limit check.

Start it
--------
In-process: ``fake = DynamixelBusFake({1: "xm540-w270", 2: "xm430-w350"}); port = fake.start()``.
``goal_out_of_limit="clamp"`` clamps such goals instead of refusing them. Test helpers:
``set_position``, ``move_by_hand``, ``block_at``, ``register(id, address, size, signed)``,
``present_position``, ``power_cycle``.
As its own process: ``python -m armada.drivers.aloha.fake.dynamixel --ids 1 2 3`` prints the pty path and
serves until interrupted; the whole ALOHA (four buses, a control socket to inject faults) is
``drivers/aloha/fake/aloha.py`` (``armada fake aloha``).
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from dataclasses import dataclass, field

from armada.drivers.core.fake.pty_bus import PtyServoBus

BROADCAST_ID = 0xFE

INST_PING = 0x01
INST_READ = 0x02
INST_WRITE = 0x03
INST_REG_WRITE = 0x04
INST_ACTION = 0x05
INST_REBOOT = 0x08
INST_STATUS = 0x55
INST_SYNC_READ = 0x82
INST_SYNC_WRITE = 0x83
INST_BULK_READ = 0x92
INST_BULK_WRITE = 0x93

ERR_RESULT_FAIL = 1
ERR_INSTRUCTION = 2
ERR_CRC = 3
ERR_DATA_RANGE = 4
ERR_DATA_LENGTH = 5
ERR_DATA_LIMIT = 6
ERR_ACCESS = 7
ERR_ALERT = 0x80

# Hardware Error Status (70) bits.
HW_VOLTAGE = 0x01
HW_OVERHEAT = 0x04
HW_ENCODER = 0x08
HW_ELECTRICAL_SHOCK = 0x10
HW_OVERLOAD = 0x20

# X-series control table.
MODEL_NUMBER = 0
MODEL_INFORMATION = 2
FIRMWARE_VERSION = 6
ID = 7
BAUD_RATE = 8
RETURN_DELAY = 9
DRIVE_MODE = 10
OPERATING_MODE = 11
SECONDARY_ID = 12
PROTOCOL_TYPE = 13
HOMING_OFFSET = 20
MOVING_THRESHOLD = 24
TEMPERATURE_LIMIT = 31
MAX_VOLTAGE_LIMIT = 32
MIN_VOLTAGE_LIMIT = 34
PWM_LIMIT = 36
CURRENT_LIMIT = 38
VELOCITY_LIMIT = 44
MAX_POSITION_LIMIT = 48
MIN_POSITION_LIMIT = 52
SHUTDOWN = 63
TORQUE_ENABLE = 64
LED = 65
STATUS_RETURN_LEVEL = 68
REGISTERED_INSTRUCTION = 69
HARDWARE_ERROR_STATUS = 70
VELOCITY_I_GAIN = 76
VELOCITY_P_GAIN = 78
POSITION_D_GAIN = 80
POSITION_I_GAIN = 82
POSITION_P_GAIN = 84
GOAL_PWM = 100
GOAL_CURRENT = 102
GOAL_VELOCITY = 104
PROFILE_ACCELERATION = 108
PROFILE_VELOCITY = 112
GOAL_POSITION = 116
REALTIME_TICK = 120
MOVING = 122
MOVING_STATUS = 123
PRESENT_PWM = 124
PRESENT_CURRENT = 126
PRESENT_VELOCITY = 128
PRESENT_POSITION = 132
VELOCITY_TRAJECTORY = 136
POSITION_TRAJECTORY = 140
PRESENT_INPUT_VOLTAGE = 144
PRESENT_TEMPERATURE = 146

MODE_CURRENT, MODE_VELOCITY, MODE_POSITION, MODE_EXTENDED, MODE_CURRENT_POSITION, MODE_PWM = 0, 1, 3, 4, 5, 16

EEPROM_END = 64
TABLE_SIZE = 662  # through the last indirect data byte
READ_ONLY = (
    set(range(0, 7)) | {REGISTERED_INSTRUCTION, HARDWARE_ERROR_STATUS} | set(range(REALTIME_TICK, 148))
)
EXTENDED_RANGE = 1_048_575
VELOCITY_UNIT_STEPS = 0.229 * 4096 / 60  # one velocity unit (0.229 rpm) in steps/s

# name: (model number, current limit, velocity limit)
MODELS = {
    "xm430-w350": (1020, 1193, 200),
    "xm540-w270": (1120, 2047, 167),
    "xl430-w250": (1060, 0, 265),
    "xc430-w150": (1070, 0, 460),
    "xm430-w210": (1030, 1193, 330),
    "xm540-w150": (1130, 2047, 230),
}

BAUD_TABLE = {
    0: 9600, 1: 57_600, 2: 115_200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000, 6: 4_000_000, 7: 4_500_000
}


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray) -> int:
    """Dynamixel Protocol 2.0 CRC-16 (polynomial 0x8005, init 0, MSB first)."""
    crc = 0
    for b in data:
        crc = ((crc << 8) ^ _CRC_TABLE[((crc >> 8) ^ b) & 0xFF]) & 0xFFFF
    return crc


def stuff(payload: bytes, before: bytes = b"") -> bytes:
    """Insert 0xFD after each FF FF FD in `payload` (`before`: the bytes preceding it on the wire)."""
    out = bytearray(before)
    for b in payload:
        out.append(b)
        if b == 0xFD and len(out) >= 3 and out[-2] == 0xFF and out[-3] == 0xFF:
            out.append(0xFD)
    return bytes(out[len(before) :])


def unstuff(payload: bytes, before: bytes = b"") -> bytes:
    """Undo `stuff`: drop the second FD of each FF FF FD FD."""
    out = bytearray(before)
    i = 0
    while i < len(payload):
        b = payload[i]
        out.append(b)
        if b == 0xFD and len(out) >= 3 and out[-2] == 0xFF and out[-3] == 0xFF:
            if i + 1 < len(payload) and payload[i + 1] == 0xFD:
                i += 1
        i += 1
    return bytes(out[len(before) :])


def packet(servo_id: int, instruction: int, params: bytes = b"", *, corrupt: bool = False) -> bytes:
    """A whole Protocol 2.0 packet: header, stuffed body, CRC."""
    raw_len = len(params) + 3  # instruction + params + CRC
    head = bytes([0xFF, 0xFF, 0xFD, 0x00, servo_id, raw_len & 0xFF, raw_len >> 8])
    body = stuff(bytes([instruction]) + bytes(params), head[-2:])
    n = len(body) + 2
    head = head[:5] + bytes([n & 0xFF, n >> 8])
    crc = crc16(head + body)
    if corrupt:
        crc ^= 0x5A5A
    return head + body + bytes([crc & 0xFF, crc >> 8])


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


@dataclass
class _Servo:
    id: int
    model: str
    firmware: int
    actual: float
    mem: bytearray = field(default_factory=lambda: bytearray(TABLE_SIZE))
    saved_eeprom: bytes = b""
    faults: int = 0  # injected causes of hardware errors
    missing: bool = False
    bad_crc: bool = False
    hand_target: float | None = None
    hand_speed: float = 2000.0
    block: float | None = None
    block_side: float = 1.0
    blocked: bool = False
    velocity: float = 0.0
    registered: tuple[int, bytes] | None = None
    t0: float = field(default_factory=time.monotonic)

    def get(self, addr: int, size: int, signed: bool = False) -> int:
        v = int.from_bytes(self.mem[addr : addr + size], "little")
        return _signed(v, 8 * size) if signed else v

    def put(self, addr: int, size: int, value: int) -> None:
        self.mem[addr : addr + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def power_on(self) -> None:
        """Power-up or reboot: EEPROM from its saved copy, RAM to defaults, torque off."""
        number, current_limit, velocity_limit = MODELS[self.model]
        m = self.mem
        if self.saved_eeprom:
            m[:EEPROM_END] = self.saved_eeprom
        else:
            self.put(MODEL_NUMBER, 2, number)
            m[FIRMWARE_VERSION] = self.firmware
            m[ID] = self.id
            m[BAUD_RATE] = 3
            m[RETURN_DELAY] = 0
            m[OPERATING_MODE] = MODE_POSITION
            m[SECONDARY_ID] = 255
            m[PROTOCOL_TYPE] = 2
            self.put(MOVING_THRESHOLD, 4, 10)
            m[TEMPERATURE_LIMIT] = 80
            self.put(MAX_VOLTAGE_LIMIT, 2, 160)
            self.put(MIN_VOLTAGE_LIMIT, 2, 95)
            self.put(PWM_LIMIT, 2, 885)
            self.put(CURRENT_LIMIT, 2, current_limit)
            self.put(VELOCITY_LIMIT, 4, velocity_limit)
            self.put(MAX_POSITION_LIMIT, 4, 4095)
            self.put(MIN_POSITION_LIMIT, 4, 0)
            m[SHUTDOWN] = HW_OVERHEAT | HW_ELECTRICAL_SHOCK | HW_OVERLOAD
            self.saved_eeprom = bytes(m[:EEPROM_END])
        m[EEPROM_END:] = bytes(TABLE_SIZE - EEPROM_END)
        m[STATUS_RETURN_LEVEL] = 2
        m[HARDWARE_ERROR_STATUS] = self.faults
        self.put(VELOCITY_I_GAIN, 2, 1920)
        self.put(VELOCITY_P_GAIN, 2, 100)
        self.put(POSITION_P_GAIN, 2, 800)
        self.put(GOAL_PWM, 2, 885)
        self.put(GOAL_CURRENT, 2, self.get(CURRENT_LIMIT, 2))
        self.put(GOAL_POSITION, 4, self.present())
        self.velocity = 0.0
        self.registered = None
        self.refresh()

    def present(self) -> int:
        return int(round(self.actual)) + self.get(HOMING_OFFSET, 4, signed=True)

    def mode(self) -> int:
        return self.mem[OPERATING_MODE]

    def limits(self) -> tuple[int, int]:
        if self.mode() == MODE_POSITION:
            return self.get(MIN_POSITION_LIMIT, 4), self.get(MAX_POSITION_LIMIT, 4)
        return -EXTENDED_RANGE, EXTENDED_RANGE

    def refresh(self) -> None:
        m = self.mem
        torque = m[TORQUE_ENABLE] == 1
        self.put(REALTIME_TICK, 2, int((time.monotonic() - self.t0) * 1000) % 32768)
        m[MOVING] = 1 if self.velocity else 0
        self.put(PRESENT_VELOCITY, 4, int(round(self.velocity / VELOCITY_UNIT_STEPS)))
        self.put(PRESENT_POSITION, 4, self.present())
        if not torque:
            current = 0
        elif self.blocked:
            if self.mode() == MODE_CURRENT_POSITION:
                current = self.get(GOAL_CURRENT, 2, signed=True)
            else:
                current = self.get(CURRENT_LIMIT, 2)
            goal = self.get(GOAL_POSITION, 4, signed=True)
            current = abs(current) if goal >= self.present() else -abs(current)
        else:
            current = 40 if self.velocity else 10
        self.put(PRESENT_CURRENT, 2, current)
        self.put(PRESENT_PWM, 2, 0 if not torque else (200 if self.velocity else 30))
        self.put(PRESENT_INPUT_VOLTAGE, 2, 80 if self.faults & HW_VOLTAGE else 120)
        m[PRESENT_TEMPERATURE] = m[TEMPERATURE_LIMIT] + 5 if self.faults & HW_OVERHEAT else 35

    def advance(self, dt: float, max_speed: float) -> None:
        m = self.mem
        if m[HARDWARE_ERROR_STATUS] & m[SHUTDOWN]:
            m[TORQUE_ENABLE] = 0
        self.velocity = 0.0
        self.blocked = False
        if m[TORQUE_ENABLE] == 1:
            mode = self.mode()
            if mode in (MODE_POSITION, MODE_EXTENDED, MODE_CURRENT_POSITION):
                lo, hi = self.limits()
                goal = min(max(self.get(GOAL_POSITION, 4, signed=True), lo), hi)
                target = goal - self.get(HOMING_OFFSET, 4, signed=True)
                profile = self.get(PROFILE_VELOCITY, 4)
                speed = profile * VELOCITY_UNIT_STEPS if profile else max_speed
                self.velocity = self._step(target, speed, dt)
            elif mode == MODE_VELOCITY:
                v = self.get(GOAL_VELOCITY, 4, signed=True) * VELOCITY_UNIT_STEPS
                target = self.actual + (1e9 if v > 0 else -1e9)
                self.velocity = self._step(target, abs(v), dt) if v else 0.0
        elif self.hand_target is not None:
            self.velocity = self._step(self.hand_target, self.hand_speed, dt)
        self.refresh()

    def _step(self, target: float, speed: float, dt: float) -> float:
        if dt <= 0:
            return 0.0
        start = self.actual
        delta = target - start
        step = speed * dt
        new = target if abs(delta) <= max(step, 0.5) else start + (step if delta > 0 else -step)
        if self.block is not None:
            # the obstacle is on one side: the servo cannot pass it from where it is
            side = self.block_side
            if (new - self.block) * side < 0 or (new == self.block and (target - self.block) * side < 0):
                new = self.block
                self.blocked = True
        self.actual = new
        return 0.0 if self.blocked or abs(new - start) < 1e-9 else (new - start) / dt

    def error_bits(self) -> int:
        return ERR_ALERT if self.mem[HARDWARE_ERROR_STATUS] else 0


class DynamixelBusFake(PtyServoBus["_Servo"]):
    """X-series servos answering Dynamixel Protocol 2.0 on a pty. See the module docstring; the
    pty, its thread and the common control API are drivers/core/fake/pty_bus.py's."""

    thread_name = "dynamixel-fake"

    def __init__(
        self,
        servos: dict[int, str] | list[int] | range = range(1, 8),
        *,
        firmware: int = 48,
        positions: dict[int, int] | None = None,
        max_speed: float = 3000.0,
        goal_out_of_limit: str = "reject",
        tick_s: float = 0.005,
    ) -> None:
        if goal_out_of_limit not in ("reject", "clamp"):
            raise ValueError("goal_out_of_limit is 'reject' (data limit error) or 'clamp'")
        if not isinstance(servos, dict):
            servos = {i: "xm430-w350" for i in servos}
        for sid, model in servos.items():
            if model not in MODELS:
                raise ValueError(f"unknown model {model!r} for id {sid}; known: {sorted(MODELS)}")
        self.goal_out_of_limit = goal_out_of_limit
        servo_objs = {}
        for sid, model in servos.items():
            s = _Servo(id=sid, model=model, firmware=firmware, actual=float((positions or {}).get(sid, 2048)))
            s.power_on()
            servo_objs[sid] = s
        super().__init__(servo_objs, max_speed=max_speed, tick_s=tick_s)

    # --- control API -----------------------------------------------------------------------
    def set_bad_crc(self, servo_id: int, bad: bool = True) -> None:
        with self._lock:
            self._servo(servo_id).bad_crc = bad

    set_bad_checksum = set_bad_crc

    def set_error(
        self,
        servo_id: int,
        *,
        overload: bool = False,
        overheat: bool = False,
        voltage: bool = False,
        electrical_shock: bool = False,
        encoder: bool = False,
    ) -> None:
        """Set (replace) the injected causes; new bits latch into Hardware Error Status until reboot."""
        bits = (
            (HW_OVERLOAD if overload else 0)
            | (HW_OVERHEAT if overheat else 0)
            | (HW_VOLTAGE if voltage else 0)
            | (HW_ELECTRICAL_SHOCK if electrical_shock else 0)
            | (HW_ENCODER if encoder else 0)
        )
        with self._lock:
            s = self._servo(servo_id)
            s.faults = bits
            s.mem[HARDWARE_ERROR_STATUS] |= bits
            s.advance(0.0, self.max_speed)

    def move_by_hand(self, servo_id: int, position: float | None, speed: float = 2000.0) -> None:
        """An external motion: with torque off the servo moves toward `position` (present frame)."""
        with self._lock:
            s = self._servo(servo_id)
            offset = s.get(HOMING_OFFSET, 4, signed=True)
            s.hand_target = None if position is None else float(position) - offset
            s.hand_speed = float(speed)

    def block_at(self, servo_id: int, position: float | None) -> None:
        """An obstacle at `position` (present frame): motion stops there, current rises."""
        with self._lock:
            s = self._servo(servo_id)
            s.block = None if position is None else float(position) - s.get(HOMING_OFFSET, 4, signed=True)
            if s.block is not None:
                s.block_side = 1.0 if s.actual >= s.block else -1.0

    def set_position(self, servo_id: int, position: int) -> None:
        with self._lock:
            s = self._servo(servo_id)
            s.actual = float(position - s.get(HOMING_OFFSET, 4, signed=True))
            s.refresh()

    def register(self, servo_id: int, address: int, size: int = 1, signed: bool = False) -> int:
        with self._lock:
            self._advance()
            return self._servo(servo_id).get(address, size, signed)

    def link_shadow(self, shadow_id: int, primary_id: int) -> None:
        """Set a servo's Secondary_ID (EEPROM): it then executes writes addressed to `primary_id`."""
        with self._lock:
            s = self._servo(shadow_id)
            s.mem[SECONDARY_ID] = primary_id
            s.saved_eeprom = bytes(s.mem[:EEPROM_END])

    def power_cycle(self) -> None:
        with self._lock:
            servos = list(self._servos.values())
            for s in servos:
                s.mem[HARDWARE_ERROR_STATUS] = 0
                s.power_on()
            self._servos = {s.mem[ID]: s for s in servos}

    # --- the bus ---------------------------------------------------------------------------
    def _respond(self, buf: bytearray) -> bytes:
        return b"".join(self._handle(sid, inst, params) for sid, inst, params in self._packets(buf))

    @staticmethod
    def _packets(buf: bytearray):
        """Yield (id, instruction, unstuffed params) of complete, CRC-valid packets in `buf`."""
        while True:
            start = buf.find(b"\xff\xff\xfd")
            if start < 0:
                del buf[: max(0, len(buf) - 2)]
                return
            del buf[:start]
            if len(buf) < 7:
                return
            if buf[3] != 0x00:  # FF FF FD FD is stuffed data, not a header
                del buf[:3]
                continue
            length = buf[5] | (buf[6] << 8)
            if length < 3:
                del buf[:3]
                continue
            total = 7 + length
            if len(buf) < total:
                return
            raw = bytes(buf[:total])
            del buf[:total]
            if crc16(raw[:-2]) != (raw[-2] | (raw[-1] << 8)):
                continue  # the servo drops a corrupt instruction
            body = unstuff(raw[7:-2], raw[5:7])
            yield raw[4], body[0], body[1:]

    def _answers(self, s: _Servo) -> bool:
        if s.missing:
            return False
        port_baud = self._port_speed()
        want = BAUD_TABLE.get(s.mem[BAUD_RATE])
        return port_baud is None or want is None or port_baud == want

    def _status(self, s: _Servo, err: int = 0, data: bytes = b"", *, reply_id: int | None = None) -> bytes:
        rid = s.mem[ID] if reply_id is None else reply_id
        return packet(rid, INST_STATUS, bytes([err | s.error_bits()]) + bytes(data), corrupt=s.bad_crc)

    def _handle(self, sid: int, inst: int, params: bytes) -> bytes:
        self.packets_in += 1
        if inst == INST_SYNC_WRITE:
            self._sync_write(params)
            return b""
        if inst == INST_BULK_WRITE:
            self._bulk_write(params)
            return b""
        if inst == INST_SYNC_READ:
            return self._sync_read(params)
        if inst == INST_BULK_READ:
            return self._bulk_read(params)
        targets = list(self._servos.values()) if sid == BROADCAST_ID else [self._servos.get(sid)]
        if inst == INST_WRITE and sid != BROADCAST_ID:
            for shadow in self._shadows_of(sid):
                if self._answers(shadow) and len(params) >= 3:
                    self._write(shadow, params[0] | (params[1] << 8), params[2:])  # silent: it never answers
        out = bytearray()
        for s in sorted((t for t in targets if t is not None), key=lambda t: t.mem[ID]):
            if not self._answers(s):
                continue
            reply = self._instruction(s, inst, params)
            if sid == BROADCAST_ID and inst != INST_PING:
                continue
            level = s.mem[STATUS_RETURN_LEVEL]
            if inst != INST_PING and (level == 0 or (level == 1 and inst != INST_READ)):
                continue
            out += reply
        return bytes(out)

    def _instruction(self, s: _Servo, inst: int, params: bytes) -> bytes:
        if inst == INST_PING:
            return self._status(s, 0, bytes([s.mem[0], s.mem[1], s.mem[FIRMWARE_VERSION]]))
        if inst == INST_READ:
            if len(params) != 4:
                return self._status(s, ERR_DATA_LENGTH)
            addr, n = params[0] | (params[1] << 8), params[2] | (params[3] << 8)
            if addr + n > TABLE_SIZE:
                return self._status(s, ERR_ACCESS)
            return self._status(s, 0, bytes(s.mem[addr : addr + n]))
        if inst == INST_WRITE:
            if len(params) < 3:
                return self._status(s, ERR_DATA_LENGTH)
            old_id = s.mem[ID]  # a servo answers an ID change under its old ID
            err = self._write(s, params[0] | (params[1] << 8), params[2:])
            return self._status(s, err, reply_id=old_id)
        if inst == INST_REG_WRITE:
            if len(params) < 3:
                return self._status(s, ERR_DATA_LENGTH)
            s.registered = (params[0] | (params[1] << 8), bytes(params[2:]))
            s.mem[REGISTERED_INSTRUCTION] = 1
            return self._status(s)
        if inst == INST_ACTION:
            err = 0
            if s.registered is not None:
                addr, data = s.registered
                s.registered = None
                s.mem[REGISTERED_INSTRUCTION] = 0
                err = self._write(s, addr, data)
            return self._status(s, err)
        if inst == INST_REBOOT:
            reply = self._status(s)
            s.mem[HARDWARE_ERROR_STATUS] = 0
            s.power_on()
            return reply
        return self._status(s, ERR_INSTRUCTION)

    def _write(self, s: _Servo, addr: int, data: bytes) -> int:
        """Apply a write as the servo would; returns the error number (0 when applied)."""
        end = addr + len(data)
        if end > TABLE_SIZE or any(a in READ_ONLY for a in range(addr, end)):
            return ERR_ACCESS
        m = s.mem
        if addr < EEPROM_END and m[TORQUE_ENABLE] == 1:
            return ERR_ACCESS
        new = bytearray(m)
        new[addr:end] = data
        touched = range(addr, end)
        if GOAL_POSITION in touched and GOAL_POSITION + 3 in touched:
            goal = _signed(int.from_bytes(new[GOAL_POSITION : GOAL_POSITION + 4], "little"), 32)
            self.received_goals.append((m[ID], goal))
            same_mode = new[OPERATING_MODE] == m[OPERATING_MODE]
            lo, hi = s.limits() if same_mode else (-EXTENDED_RANGE, EXTENDED_RANGE)
            if not lo <= goal <= hi:
                if self.goal_out_of_limit == "reject":
                    return ERR_DATA_LIMIT
                clamped = min(max(goal, lo), hi) & 0xFFFFFFFF
                new[GOAL_POSITION : GOAL_POSITION + 4] = clamped.to_bytes(4, "little")
        if GOAL_CURRENT in touched and GOAL_CURRENT + 1 in touched:
            current = _signed(int.from_bytes(new[GOAL_CURRENT : GOAL_CURRENT + 2], "little"), 16)
            if abs(current) > s.get(CURRENT_LIMIT, 2):
                return ERR_DATA_LIMIT
        if TORQUE_ENABLE in touched and new[TORQUE_ENABLE] > 1:
            return ERR_DATA_RANGE
        if OPERATING_MODE in touched and new[OPERATING_MODE] not in (0, 1, 3, 4, 5, 16):
            return ERR_DATA_RANGE
        old_id, old_torque = m[ID], m[TORQUE_ENABLE]
        if TORQUE_ENABLE in touched and new[TORQUE_ENABLE] == 1 and m[HARDWARE_ERROR_STATUS] & m[SHUTDOWN]:
            new[TORQUE_ENABLE] = 0  # shut down until reboot
        m[:] = new
        if addr < EEPROM_END:
            s.saved_eeprom = bytes(m[:EEPROM_END])
        if m[TORQUE_ENABLE] == 1 and old_torque == 0 and GOAL_POSITION not in touched:
            s.put(GOAL_POSITION, 4, s.present())
        if m[ID] != old_id:
            self._servos.pop(old_id, None)
            self._servos[m[ID]] = s
            s.id = m[ID]
        s.refresh()
        return 0

    def _sync_write(self, params: bytes) -> None:
        if len(params) < 4:
            return
        addr, n = params[0] | (params[1] << 8), params[2] | (params[3] << 8)
        body = params[4:]
        for k in range(0, len(body) - n, n + 1):
            for s in [self._servos.get(body[k]), *self._shadows_of(body[k])]:
                if s is not None and not s.missing:
                    self._write(s, addr, body[k + 1 : k + 1 + n])

    def _bulk_write(self, params: bytes) -> None:
        k = 0
        while k + 5 <= len(params):
            sid = params[k]
            addr, n = params[k + 1] | (params[k + 2] << 8), params[k + 3] | (params[k + 4] << 8)
            for s in [self._servos.get(sid), *self._shadows_of(sid)]:
                if s is not None and not s.missing:
                    self._write(s, addr, params[k + 5 : k + 5 + n])
            k += 5 + n

    def _shadows_of(self, sid: int) -> list[_Servo]:
        """Servos whose Secondary_ID (12) is `sid` (a ViperX shoulder's or elbow's second motor)."""
        return [s for s in self._servos.values() if s.mem[SECONDARY_ID] == sid and s.mem[ID] != sid]

    def _read_reply(self, sid: int, addr: int, n: int) -> bytes:
        s = self._servos.get(sid)
        if s is None or not self._answers(s):
            return b""
        if addr + n > TABLE_SIZE:
            return self._status(s, ERR_ACCESS)
        return self._status(s, 0, bytes(s.mem[addr : addr + n]))

    def _sync_read(self, params: bytes) -> bytes:
        if len(params) < 4:
            return b""
        addr, n = params[0] | (params[1] << 8), params[2] | (params[3] << 8)
        return b"".join(self._read_reply(sid, addr, n) for sid in params[4:])

    def _bulk_read(self, params: bytes) -> bytes:
        out = bytearray()
        for k in range(0, len(params) - 4, 5):
            sid = params[k]
            addr, n = params[k + 1] | (params[k + 2] << 8), params[k + 3] | (params[k + 4] << 8)
            out += self._read_reply(sid, addr, n)
        return bytes(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Dynamixel X-series servos (Protocol 2.0) on a pty")
    parser.add_argument("--ids", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8, 9])
    parser.add_argument("--model", default="xm430-w350", choices=sorted(MODELS))
    parser.add_argument("--max-speed", type=float, default=3000.0, help="steps/s at Profile Velocity 0")
    args = parser.parse_args(argv)
    fake = DynamixelBusFake({i: args.model for i in args.ids}, max_speed=args.max_speed)
    done = threading.Event()
    # Before the port is printed: whoever read it may stop us at once, and must get a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(fake.start(), flush=True)
    try:
        while not done.is_set() and fake.alive:
            done.wait(0.5)
    except KeyboardInterrupt:
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
