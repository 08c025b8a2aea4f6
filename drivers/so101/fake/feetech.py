"""Fake Feetech STS3215 servos on a pseudo-terminal, at the packet level.

What it models
--------------
A bus of STS3215 servos (model number 777; SO-101 uses IDs 1-6) behind a serial port, so that the
real ``scservo_sdk`` (feetech-servo-sdk) and lerobot's ``FeetechMotorsBus`` run unmodified against
it. The fake opens a pty pair; the SDK opens the slave path (``fake.port``) with pyserial at
1 Mbaud; the fake answers on the master side from a thread.

- Packets: ``FF FF id len instr params checksum`` with checksum ``~(id+len+instr+params) & 0xFF``.
  Instructions: ping (1, also broadcast: every servo answers, in ID order, as lerobot's
  ``broadcast_ping`` expects), read (2), write (3), reg write (4) / action (5), sync read (0x82,
  one status packet per listed servo, in the listed order), sync write (0x83, no reply).
  Instructions with a bad checksum are dropped, as the servo does. Unknown instructions are ignored.
- Status packets ``FF FF id len error data checksum``; error bits as scservo_sdk names them:
  voltage 1, angle sensor 2, overheat 4, overcurrent ("overele") 8, overload 32. The same bits
  are in the Status register (65).
- One control table per servo (the STS/SMS layout lerobot's tables.py uses): firmware 3.10 at
  0/1, model 777 at 3, ID 5, baud 6, return delay 7, status level 8, position limits 9/11,
  phase 18, unloading condition 19, P/D/I 21-23, homing offset 31 (sign-magnitude, bit 11),
  operating mode 33, torque enable 40, acceleration 41, goal position 42 (sign-magnitude, bit 15),
  goal time 44, goal velocity 46, torque limit 48, lock 55, present position 56, present velocity
  58 (bit 15), present load 60 (bit 10), voltage 62, temperature 63, status 65, moving 66,
  present current 69, maximum acceleration 85. Multi-byte values little-endian (scservo_sdk's
  protocol end 0). Any other address in 0..255 reads and writes as plain memory.
- Present_Position = (actual - Homing_Offset) mod 4096 (Phase bit 4 clear; with it set, the
  unwrapped difference in sign-magnitude). Writing ID moves the servo to the new ID; a servo whose
  Baud_Rate register does not match the port's speed (as pyserial set it on the pty) is silent.
- Dynamics, per tick of wall time: with torque on, the actual position moves toward the goal
  (clamped to Min/Max_Position_Limit when max > min) at Goal_Velocity steps/s (0 = ``max_speed``);
  with torque off it stays, or follows ``move_by_hand``. Enabling torque sets the goal to the
  present position (the servo holds where it is). An injected fault whose bit is set in
  Unloading_Condition (19, default 44: overheat, overcurrent, overload) cuts torque, as the
  servo's protection does.
- Lock (55, 1 at power-on): EEPROM writes take effect at once either way; they survive
  ``power_cycle()`` only if written while Lock is 0.

What it does not model
----------------------
Acceleration profiles, goal time, PID, load or current physics (load and current are small
constants while moving or holding), the return delay, baud rates as timing (the pty is as fast as
the host), multi-turn / step mode, the Protocol-1 (SCS) series, factory reset, half-duplex echo.
Replies from several servos are written back to back, not staggered. Power-on defaults (firmware
3.10, limits 0-4095, Unloading_Condition 44, Lock 1, hold-on-torque-enable) are this fake's
reading of the manual and lerobot's code, not measured on a servo.
Replies the host leaves unread beyond the pty's buffer (about 4 KiB) are dropped and counted in
``bytes_dropped``, as an adapter's buffer would overflow, rather than blocking the bus.

Faults to inject (methods): ``set_missing(id)`` (never answers), ``set_bad_checksum(id)``
(its replies carry a wrong checksum), ``set_error(id, overload=..., overheat=..., voltage=...,
overcurrent=..., angle=...)``, ``unplug()`` (closes the pty: the SDK's next read or write raises,
and the path vanishes). ``received_goals`` lists every (id, goal) written, before clamping.

Start it
--------
In-process: ``fake = FeetechBusFake(ids=range(1, 7)); port = fake.start(); ...; fake.stop()``
(``ids`` may be ``{id: model_number}`` to put a servo of the wrong model on the bus). Test helpers:
``set_position``, ``move_by_hand``, ``register(id, address, size)``, ``present_position``,
``power_cycle``.
One bus as its own process: ``python -m armada.drivers.so101.fake.feetech --ids 1 2 3 4 5 6`` prints the
pty path and serves until interrupted; a whole arm (follower and leader, symlinks, a control socket)
is drivers/so101/fake/so101.py (`armada fake so101`).
"""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import dataclass, field

from armada.drivers.core.fake.pty_bus import PtyServoBus

STS3215_MODEL = 777
BROADCAST_ID = 0xFE

INST_PING = 0x01
INST_READ = 0x02
INST_WRITE = 0x03
INST_REG_WRITE = 0x04
INST_ACTION = 0x05
INST_SYNC_READ = 0x82
INST_SYNC_WRITE = 0x83

# Error bits of the status packet (scservo_sdk's ERRBIT_*).
ERR_VOLTAGE = 0x01
ERR_ANGLE = 0x02
ERR_OVERHEAT = 0x04
ERR_OVERCURRENT = 0x08
ERR_OVERLOAD = 0x20

# Control table addresses (STS/SMS series).
FIRMWARE_MAJOR = 0
FIRMWARE_MINOR = 1
MODEL_NUMBER = 3
ID = 5
BAUD_RATE = 6
RETURN_DELAY = 7
STATUS_LEVEL = 8
MIN_POSITION_LIMIT = 9
MAX_POSITION_LIMIT = 11
MAX_TEMPERATURE = 13
MAX_VOLTAGE = 14
MIN_VOLTAGE = 15
MAX_TORQUE = 16
PHASE = 18
UNLOADING_CONDITION = 19
LED_ALARM = 20
P_COEFF = 21
D_COEFF = 22
I_COEFF = 23
PROTECTION_CURRENT = 28
HOMING_OFFSET = 31
OPERATING_MODE = 33
OVERLOAD_TORQUE = 36
TORQUE_ENABLE = 40
ACCELERATION = 41
GOAL_POSITION = 42
GOAL_TIME = 44
GOAL_VELOCITY = 46
TORQUE_LIMIT = 48
LOCK = 55
PRESENT_POSITION = 56
PRESENT_VELOCITY = 58
PRESENT_LOAD = 60
PRESENT_VOLTAGE = 62
PRESENT_TEMPERATURE = 63
STATUS = 65
MOVING = 66
PRESENT_CURRENT = 69
MAXIMUM_ACCELERATION = 85

EEPROM_END = 40  # addresses below this are EEPROM
READ_ONLY = set(range(0, 5)) | set(range(56, 71))

# Baud_Rate register value -> bits per second (STS series).
BAUD_TABLE = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200, 5: 57_600, 6: 38_400, 7: 19_200}


def checksum(body: bytes | bytearray) -> int:
    """Feetech checksum of the bytes after the two 0xFF header bytes (id .. last param)."""
    return (~sum(body)) & 0xFF


def encode_sign_magnitude(value: int, sign_bit: int) -> int:
    return (-value | (1 << sign_bit)) if value < 0 else value


def decode_sign_magnitude(raw: int, sign_bit: int) -> int:
    return -(raw & ((1 << sign_bit) - 1)) if raw & (1 << sign_bit) else raw


def status_packet(servo_id: int, error: int, data: bytes = b"", *, corrupt: bool = False) -> bytes:
    body = bytes([servo_id, len(data) + 2, error]) + bytes(data)
    chk = checksum(body)
    if corrupt:
        chk ^= 0x5A
    return b"\xff\xff" + body + bytes([chk])


@dataclass
class _Servo:
    """One STS3215: its register file and its physical state."""

    id: int
    model: int
    firmware: tuple[int, int]
    actual: float  # physical encoder position, steps
    mem: bytearray = field(default_factory=lambda: bytearray(256))
    saved_eeprom: bytes = b""
    faults: int = 0
    missing: bool = False
    bad_checksum: bool = False
    hand_target: float | None = None
    hand_speed: float = 2000.0
    velocity: float = 0.0
    registered: tuple[int, bytes] | None = None

    # register helpers (little-endian)
    def u8(self, addr: int) -> int:
        return self.mem[addr]

    def u16(self, addr: int) -> int:
        return self.mem[addr] | (self.mem[addr + 1] << 8)

    def set_u8(self, addr: int, value: int) -> None:
        self.mem[addr] = value & 0xFF

    def set_u16(self, addr: int, value: int) -> None:
        self.mem[addr] = value & 0xFF
        self.mem[addr + 1] = (value >> 8) & 0xFF

    def power_on(self) -> None:
        m = self.mem
        if self.saved_eeprom:
            m[:EEPROM_END] = self.saved_eeprom
        else:
            m[FIRMWARE_MAJOR], m[FIRMWARE_MINOR] = self.firmware
            self.set_u16(MODEL_NUMBER, self.model)
            m[ID] = self.id
            m[BAUD_RATE] = 0
            m[RETURN_DELAY] = 0
            m[STATUS_LEVEL] = 1
            self.set_u16(MIN_POSITION_LIMIT, 0)
            self.set_u16(MAX_POSITION_LIMIT, 4095)
            m[MAX_TEMPERATURE] = 70
            m[MAX_VOLTAGE] = 140
            m[MIN_VOLTAGE] = 40
            self.set_u16(MAX_TORQUE, 1000)
            m[PHASE] = 0x0C
            m[UNLOADING_CONDITION] = ERR_OVERHEAT | ERR_OVERCURRENT | ERR_OVERLOAD
            m[LED_ALARM] = 0x2F
            m[P_COEFF], m[D_COEFF], m[I_COEFF] = 32, 32, 0
            self.set_u16(PROTECTION_CURRENT, 500)
            self.set_u16(HOMING_OFFSET, 0)
            m[OPERATING_MODE] = 0
            m[OVERLOAD_TORQUE] = 80
            self.saved_eeprom = bytes(m[:EEPROM_END])
        m[EEPROM_END:] = bytes(len(m) - EEPROM_END)
        m[TORQUE_ENABLE] = 0
        self.set_u16(TORQUE_LIMIT, 1000)
        m[LOCK] = 1
        m[MAXIMUM_ACCELERATION] = 0
        self.velocity = 0.0
        self.registered = None
        self.set_u16(GOAL_POSITION, encode_sign_magnitude(self.present(), 15))
        self.refresh()

    # derived quantities
    def homing_offset(self) -> int:
        return decode_sign_magnitude(self.u16(HOMING_OFFSET), 11)

    def present(self) -> int:
        diff = int(round(self.actual)) - self.homing_offset()
        if self.mem[PHASE] & 0x10:
            return diff
        return diff % 4096

    def limits(self) -> tuple[int, int] | None:
        lo, hi = self.u16(MIN_POSITION_LIMIT), self.u16(MAX_POSITION_LIMIT)
        return (lo, hi) if hi > lo else None

    def target(self) -> float:
        goal = decode_sign_magnitude(self.u16(GOAL_POSITION), 15)
        lim = self.limits()
        if lim is not None:
            goal = min(max(goal, lim[0]), lim[1])
        return float(goal)

    def refresh(self) -> None:
        """Write the present-state registers from the physical state."""
        m = self.mem
        self.set_u16(PRESENT_POSITION, encode_sign_magnitude(self.present(), 15))
        self.set_u16(PRESENT_VELOCITY, encode_sign_magnitude(int(round(self.velocity)), 15))
        torque = m[TORQUE_ENABLE] == 1
        load = 0 if not torque else (60 if self.velocity else 20)
        if self.velocity < 0:
            load = -load
        self.set_u16(PRESENT_LOAD, encode_sign_magnitude(load, 10))
        m[PRESENT_VOLTAGE] = 35 if self.faults & ERR_VOLTAGE else 120
        m[PRESENT_TEMPERATURE] = m[MAX_TEMPERATURE] + 5 if self.faults & ERR_OVERHEAT else 30
        m[STATUS] = self.faults & 0xFF
        m[MOVING] = 1 if self.velocity else 0
        self.set_u16(PRESENT_CURRENT, (30 if self.velocity else 8) if torque else 0)

    def advance(self, dt: float, max_speed: float) -> None:
        m = self.mem
        if self.faults & m[UNLOADING_CONDITION]:
            m[TORQUE_ENABLE] = 0
        self.velocity = 0.0
        if m[TORQUE_ENABLE] == 1:
            target = self.target() + self.homing_offset()
            if self.mem[PHASE] & 0x10 == 0:
                # position mode moves within one turn of the present frame
                target = self.actual + (self.target() - self.present())
            speed = self.u16(GOAL_VELOCITY) or max_speed
            self.velocity = self._step(target, speed, dt)
        elif self.hand_target is not None:
            self.velocity = self._step(self.hand_target, self.hand_speed, dt)
        self.refresh()

    def _step(self, target: float, speed: float, dt: float) -> float:
        if dt <= 0:
            return 0.0
        delta = target - self.actual
        step = speed * dt
        if abs(delta) <= max(step, 0.5):
            self.actual = target
            return 0.0 if abs(delta) < 0.5 else delta / dt
        self.actual += step if delta > 0 else -step
        return speed if delta > 0 else -speed

    def error_byte(self) -> int:
        return self.faults & 0x7F


class FeetechBusFake(PtyServoBus["_Servo"]):
    """STS3215 servos answering the Feetech protocol (end 0) on a pty. See the module docstring;
    the pty, its thread and the common control API are drivers/core/fake/pty_bus.py's."""

    thread_name = "feetech-fake"

    def __init__(
        self,
        ids=range(1, 7),
        *,
        model: int = STS3215_MODEL,
        firmware: tuple[int, int] = (3, 10),
        positions: dict[int, int] | None = None,
        max_speed: float = 3000.0,
        tick_s: float = 0.005,
    ) -> None:
        # ids: an iterable of ids (all `model`), or {id: model number} to mix models (a wrong servo)
        models = dict(ids) if isinstance(ids, dict) else {i: model for i in ids}
        servos = {}
        for i, m in models.items():
            s = _Servo(id=i, model=m, firmware=firmware, actual=float((positions or {}).get(i, 2048)))
            s.power_on()
            servos[i] = s
        super().__init__(servos, max_speed=max_speed, tick_s=tick_s)

    # --- control API -----------------------------------------------------------------------
    def set_bad_checksum(self, servo_id: int, bad: bool = True) -> None:
        with self._lock:
            self._servo(servo_id).bad_checksum = bad

    def set_error(
        self,
        servo_id: int,
        *,
        overload: bool = False,
        overheat: bool = False,
        voltage: bool = False,
        overcurrent: bool = False,
        angle: bool = False,
    ) -> None:
        """Set (replace) the servo's fault bits; all False clears them."""
        bits = (
            (ERR_OVERLOAD if overload else 0)
            | (ERR_OVERHEAT if overheat else 0)
            | (ERR_VOLTAGE if voltage else 0)
            | (ERR_OVERCURRENT if overcurrent else 0)
            | (ERR_ANGLE if angle else 0)
        )
        with self._lock:
            s = self._servo(servo_id)
            s.faults = bits
            s.advance(0.0, self.max_speed)

    def move_by_hand(self, servo_id: int, position: float | None, speed: float = 2000.0) -> None:
        """An external motion: with torque off the servo moves toward `position` (present frame)."""
        with self._lock:
            s = self._servo(servo_id)
            s.hand_target = None if position is None else float(position) + s.homing_offset()
            s.hand_speed = float(speed)

    def set_position(self, servo_id: int, position: int) -> None:
        """Teleport the servo (present frame), e.g. to set up a test."""
        with self._lock:
            s = self._servo(servo_id)
            s.actual = float(position + s.homing_offset())
            s.refresh()

    def register(self, servo_id: int, address: int, size: int = 1) -> int:
        """Raw register value (unsigned, little-endian) as the bus would read it."""
        with self._lock:
            self._advance()
            s = self._servo(servo_id)
            return int.from_bytes(s.mem[address : address + size], "little")

    def power_cycle(self) -> None:
        with self._lock:
            servos = list(self._servos.values())
            for s in servos:
                s.power_on()
            self._servos = {s.mem[ID]: s for s in servos}

    # --- the bus ---------------------------------------------------------------------------
    def _respond(self, buf: bytearray) -> bytes:
        return b"".join(self._handle(packet) for packet in self._packets(buf))

    @staticmethod
    def _packets(buf: bytearray):
        """Yield complete, checksum-valid instruction packets from `buf`, consuming them."""
        while True:
            start = buf.find(b"\xff\xff")
            if start < 0:
                del buf[: max(0, len(buf) - 1)]
                return
            del buf[:start]
            if len(buf) >= 3 and buf[2] == 0xFF:  # FF FF FF: resync on the next byte
                del buf[0]
                continue
            if len(buf) < 4:
                return
            length = buf[3]
            total = length + 4
            if length < 2:
                del buf[:2]
                continue
            if len(buf) < total:
                return
            packet = bytes(buf[:total])
            del buf[:total]
            if checksum(packet[2:-1]) != packet[-1]:
                continue  # the servo ignores a corrupt instruction
            yield packet

    def _answers(self, s: _Servo) -> bool:
        if s.missing:
            return False
        port_baud = self._port_speed()
        want = BAUD_TABLE.get(s.mem[BAUD_RATE])
        return port_baud is None or want is None or port_baud == want

    def _reply(self, s: _Servo, data: bytes = b"", *, reply_id: int | None = None) -> bytes:
        rid = s.mem[ID] if reply_id is None else reply_id
        return status_packet(rid, s.error_byte(), data, corrupt=s.bad_checksum)

    def _handle(self, packet: bytes) -> bytes:
        self.packets_in += 1
        sid, inst, params = packet[2], packet[4], packet[5:-1]
        if inst == INST_SYNC_WRITE:
            self._sync_write(params)
            return b""
        if inst == INST_SYNC_READ:
            return self._sync_read(params)
        targets = list(self._servos.values()) if sid == BROADCAST_ID else [self._servos.get(sid)]
        out = bytearray()
        for s in sorted((t for t in targets if t is not None), key=lambda t: t.mem[ID]):
            if not self._answers(s):
                continue
            reply = self._instruction(s, inst, params)
            if reply is None:
                continue
            if sid == BROADCAST_ID and inst != INST_PING:
                continue  # only a broadcast ping is answered
            if inst not in (INST_PING, INST_READ) and s.mem[STATUS_LEVEL] == 0:
                continue
            out += reply
        return bytes(out)

    def _instruction(self, s: _Servo, inst: int, params: bytes) -> bytes | None:
        if inst == INST_PING:
            return self._reply(s)
        if inst == INST_READ:
            if len(params) != 2:
                return None
            addr, n = params
            return self._reply(s, bytes(s.mem[addr : addr + n]).ljust(n, b"\0"))
        if inst == INST_WRITE:
            if len(params) < 2:
                return None
            old_id = s.mem[ID]  # a servo answers an ID change under its old ID
            self._write(s, params[0], params[1:])
            return self._reply(s, reply_id=old_id)
        if inst == INST_REG_WRITE:
            if len(params) < 2:
                return None
            s.registered = (params[0], bytes(params[1:]))
            return self._reply(s)
        if inst == INST_ACTION:
            if s.registered is not None:
                addr, data = s.registered
                s.registered = None
                self._write(s, addr, data)
            return self._reply(s)
        return None

    def _write(self, s: _Servo, addr: int, data: bytes) -> None:
        old_id = s.mem[ID]
        old_torque = s.mem[TORQUE_ENABLE]
        for i, b in enumerate(data):
            a = addr + i
            if a < len(s.mem) and a not in READ_ONLY:
                s.mem[a] = b
        if addr < EEPROM_END and s.mem[LOCK] == 0:
            s.saved_eeprom = bytes(s.mem[:EEPROM_END])
        touched = range(addr, addr + len(data))
        if GOAL_POSITION in touched and GOAL_POSITION + 1 in touched:
            self.received_goals.append((s.mem[ID], decode_sign_magnitude(s.u16(GOAL_POSITION), 15)))
        if TORQUE_ENABLE in touched and s.mem[TORQUE_ENABLE] == 1 and old_torque == 0:
            if not (GOAL_POSITION in touched):
                s.set_u16(GOAL_POSITION, encode_sign_magnitude(s.present(), 15))
        if s.mem[ID] != old_id:
            new_id = s.mem[ID]
            self._servos.pop(old_id, None)
            self._servos[new_id] = s
            s.id = new_id
        s.refresh()

    def _sync_write(self, params: bytes) -> None:
        if len(params) < 2:
            return
        addr, n = params[0], params[1]
        body = params[2:]
        for k in range(0, len(body) - n, n + 1):
            s = self._servos.get(body[k])
            if s is not None and not s.missing:
                self._write(s, addr, body[k + 1 : k + 1 + n])

    def _sync_read(self, params: bytes) -> bytes:
        if len(params) < 2:
            return b""
        addr, n = params[0], params[1]
        out = bytearray()
        for sid in params[2:]:
            s = self._servos.get(sid)
            if s is None or not self._answers(s):
                continue
            out += self._reply(s, bytes(s.mem[addr : addr + n]).ljust(n, b"\0"))
        return bytes(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Feetech STS3215 servos on a pty")
    parser.add_argument("--ids", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--max-speed", type=float, default=3000.0, help="steps/s at Goal_Velocity 0")
    args = parser.parse_args(argv)
    fake = FeetechBusFake(ids=args.ids, max_speed=args.max_speed)
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
