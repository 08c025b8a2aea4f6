"""ALOHA behind the Backend interface: two ViperX 300 S followers as one 14-value robot, two WidowX
250 S leaders read for teleop, all over Dynamixel Protocol 2.0 through ROBOTIS's dynamixel_sdk.

Action layout (configs/embodiments/aloha.yaml): left waist, shoulder, elbow, forearm_roll,
wrist_angle, wrist_rotate (rad), left gripper opening (m), then the same for the right arm. Each arm
is its own serial bus (a U2D2 at /dev/ttyDXL_puppet_left etc.), 1 Mbaud.

Servos per arm (Interbotix vx300s / wx250s IDs, configurable): waist 1, shoulder 2 with its shadow
3, elbow 4 with its shadow 5, forearm roll 6, wrist angle 7, wrist rotate 8, gripper 9. A shadow is
a second motor on the same joint, mounted reversed, whose Secondary_ID (address 12) is its
primary's ID: it executes every write addressed to the primary and never answers for it. So, as
Interbotix's driver does, a joint is one value: we read Present_Position from the primary and write
Goal_Position to the primary, and the shadow follows in hardware. The shadows are still pinged,
their Secondary_ID checked at connect (an unlinked shadow would fight its primary), and their
Hardware_Error_Status read every tick (an overloaded shadow is an overloaded shoulder).

Per tick, per follower bus: one GroupSyncRead of Present_Position (132, 4 bytes) from the
primaries, one GroupSyncRead of Hardware_Error_Status (70, 1 byte) from every servo (the SDK's
GroupSyncRead drops each status packet's error byte, so its alert bit is never seen by a position
read alone), and one GroupSyncWrite of Goal_Position (116, 4 bytes). Ticks: 4096 per turn, 2048
is 0 rad (the convention of ALOHA's code). Grippers: raw ticks <-> opening in metres through a
``GripperCalibration`` (a linear map between the ticks read fully open and fully closed).

Modes: arm joints in position mode (3), grippers in current-based position mode (5) with Goal
Current set to the configured limit, so a gripper closing on an object squeezes with bounded
current instead of stalling at full current. Leaders are only read, never written: no torque or
mode change (ALOHA's setup puts the leaders in PWM mode with torque off; that is the operator's
setup, not this driver's business). With ``leaders_in_state`` each read adds one sync read of
Present_Position per leader bus and publishes ``device["leader"]`` (the followers' 14-value layout)
or None and ``device["leader_error"]``; a leader lost (unplugged, silent) never faults the followers
and comes back by itself when it is plugged in again (drivers/core/leader.py).

Safety:
- connect pings every configured ID and fails naming the IDs found, the ones missing and any wrong
  model numbers; a shadow not linked to its primary fails it too. A servo already reporting a
  hardware error does not: connect then changes nothing (no mode, no torque), ``read`` reports the
  error as a device fault, ``write`` refuses, and the operator's clear_fault decides.
- Operating modes are EEPROM: a servo whose mode must change is written with torque off. Turning
  torque off on an arm joint would drop a raised arm, so an arm joint found with torque on in the
  wrong mode is refused (support the arm and power-cycle it); a gripper may be switched.
- Torque is enabled with Goal_Position first set to Present_Position, so nothing jumps, and
  confirmed by reading Torque_Enable back from every servo.
- Nothing here ever disables torque on an arm joint: not ``close``, not ``estop`` (goal = present
  position, torque stays on), not a fault, not ``recover`` (a reboot, which does cut torque, is only
  sent to servos whose torque their own shutdown already cut, and only when the cell asks for it).
  The one torque-off is a gripper found in the wrong mode at connect (a gripper does not fall).
- A hardware error bit on any servo is reported as a device fault at the next read, and a vanished
  port (EIO) is a non-transient BackendError there too: within one 50 Hz tick (12 ms measured through
  a driver process). A missing reply or a bad CRC is a transient error; the core faults after 0.1 s
  of them, and this backend after ``stale_s`` (0.2 s) without a complete reading, whichever first
  (150 ms measured). The core then calls ``on_fault``: the plugin's worker process is killed, and
  this backend itself also refuses every ``write`` until ``recover``.

Isolation: the plugin runs this backend in a worker process (drivers/core/isolated.py). The SDK's
receive loop busy-waits on a non-blocking pyserial port until its packet timeout (it never
sleeps), and pyserial's write has no timeout: in the driver process the spin would compete with
the command thread for the GIL on every tick, and a write into a wedged adapter would block the
loop. In a worker the spin has its own core and a stuck call ends only the worker.
"""

from __future__ import annotations

import logging
import math
import os
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from armada.drivers.aloha.calibration import GripperCalibration
from armada.drivers.core.leader import LeaderPoll
from armada.drivers.core.backend import Backend, BackendError, Reading

log = logging.getLogger("armada.aloha")
T = TypeVar("T")

# X-series control table (Protocol 2.0).
ADDR_MODEL_NUMBER = 0
ADDR_RETURN_DELAY = 9
ADDR_OPERATING_MODE = 11
ADDR_SECONDARY_ID = 12
ADDR_CURRENT_LIMIT = 38
ADDR_MAX_POSITION_LIMIT = 48
ADDR_MIN_POSITION_LIMIT = 52
ADDR_TORQUE_ENABLE = 64
ADDR_HARDWARE_ERROR = 70
ADDR_GOAL_CURRENT = 102
ADDR_GOAL_POSITION = 116
ADDR_PRESENT_POSITION = 132
MODE_POSITION = 3
MODE_CURRENT_POSITION = 5
MODE_NAMES = {0: "current", 1: "velocity", 3: "position", 4: "extended position", 5: "current-based position",
              16: "PWM"}

TICKS_PER_TURN = 4096
CENTER_TICKS = 2048  # 0 rad, as ALOHA's code converts
RAD_PER_TICK = 2 * math.pi / TICKS_PER_TURN

SIDES = ("left", "right")
JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")
ARM_DOF = len(JOINTS)
SHADOWS = {"shoulder": "shoulder_shadow", "elbow": "elbow_shadow"}  # joint -> its shadow motor's key

MODEL_NAMES = {1120: "XM540-W270", 1020: "XM430-W350", 1060: "XL430-W250", 1070: "XC430-W150",
               1030: "XM430-W210", 1130: "XM540-W150"}
# ViperX 300 S (followers): XM540-W270 everywhere but the wrist rotate and gripper (XM430-W350).
FOLLOWER_MODELS = {"waist": 1120, "shoulder": 1120, "elbow": 1120, "forearm_roll": 1120, "wrist_angle": 1120,
                   "wrist_rotate": 1020, "gripper": 1020}
# WidowX 250 S (leaders): XM430-W350, an XL430-W250 on the wrist rotate, an XC430-W150 gripper.
LEADER_MODELS = {"waist": 1020, "shoulder": 1020, "elbow": 1020, "forearm_roll": 1020, "wrist_angle": 1020,
                 "wrist_rotate": 1060, "gripper": 1070}

HW_ERRORS = {0x01: "input voltage", 0x04: "overheating", 0x08: "motor encoder", 0x10: "electrical shock",
             0x20: "overload"}

# SDK results
COMM_SUCCESS = 0

ESTOP_READ_ATTEMPTS = 3
PING_RETRY_S = 0.5  # a servo that does not answer for this long at connect is missing
PING_BACKOFF_S, PING_BACKOFF_MAX_S = 0.005, 0.08  # the pause between unanswered setup transactions, doubling


def retry_tries() -> Iterator[int]:
    """Yields once before each try of a setup transaction whose reply was lost, for PING_RETRY_S.

    The pauses between tries double (PING_BACKOFF_S up to PING_BACKOFF_MAX_S): requests sent back to
    back at something that answers late (a servo behind a slow adapter, a fake on a loaded host) queue
    up there, each late reply is flushed before the next request, and none would ever be read in time.
    No pause follows the last try."""
    give_up = time.monotonic() + PING_RETRY_S
    pause = PING_BACKOFF_S
    attempt = 0
    while True:
        yield attempt
        if time.monotonic() > give_up:
            return
        time.sleep(pause)
        pause = min(2 * pause, PING_BACKOFF_MAX_S)
        attempt += 1


def ticks_to_rad(ticks: np.ndarray | float) -> np.ndarray:
    return (np.asarray(ticks, np.float64) - CENTER_TICKS) * RAD_PER_TICK


def rad_to_ticks(rad: np.ndarray | float) -> np.ndarray:
    return np.asarray(rad, np.float64) / RAD_PER_TICK + CENTER_TICKS


def describe_hw_error(bits: int) -> str:
    names = [name for bit, name in HW_ERRORS.items() if bits & bit]
    return ", ".join(names) or f"0x{bits:02X}"


@dataclass(frozen=True)
class Servo:
    key: str  # joint name, or "shoulder_shadow" / "elbow_shadow"
    id: int
    model: int  # expected model number

    @property
    def joint(self) -> str:
        return self.key.removesuffix("_shadow")

    @property
    def is_shadow(self) -> bool:
        return self.key.endswith("_shadow")

    @property
    def mode(self) -> int:
        return MODE_CURRENT_POSITION if self.joint == "gripper" else MODE_POSITION


def arm_servos(ids: Mapping[str, int | None], models: Mapping[str, int]) -> list[Servo]:
    """The servos of one arm from its ID map (joint -> id; shadows may be None: that arm has none)."""
    out = []
    for joint in JOINTS:
        out.append(Servo(joint, int(ids[joint]), models[joint]))
        shadow = SHADOWS.get(joint)
        if shadow is not None and ids.get(shadow) is not None:
            out.append(Servo(shadow, int(ids[shadow]), models[joint]))
    return out


def _port_latency_timer_ms(port: str) -> int | None:
    """The FTDI latency timer of a USB serial port (sysfs), None when the port is not one (a pty)."""
    try:
        dev = Path(os.path.realpath(port)).name
        return int(Path(f"/sys/bus/usb-serial/devices/{dev}/latency_timer").read_text().strip())
    except (OSError, ValueError):
        return None


class _Bus:
    """One arm's serial bus: port, packet handler, and the per-tick sync read/write groups."""

    def __init__(self, name: str, port: str, baud: int, servos: list[Servo], latency_timer_ms: float,
                 calibration: GripperCalibration):
        self.name, self.port_name, self.baud = name, port, baud
        self.servos = servos
        self.primaries = [s for s in servos if not s.is_shadow]  # JOINTS order
        self.latency_timer_ms = latency_timer_ms
        self.calibration = calibration
        self.port = None
        self.dead: str | None = None  # why the port failed (EIO: unplugged); cleared when reopened
        self.ph = None
        self.pos_read = None
        self.err_read = None
        self.goal_write = None

    # --- wording -------------------------------------------------------------------------------
    def label(self, servo: Servo) -> str:
        return f"servo {servo.id} ({servo.key}, {MODEL_NAMES.get(servo.model, servo.model)})"

    def _comm(self, result: int, error: int = 0) -> str:
        text = self.ph.getTxRxResult(result) if result != COMM_SUCCESS else ""
        if error:
            text = (text + "; " if text else "") + self.ph.getRxPacketError(error)
        return text

    # --- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        import dynamixel_sdk as dxl
        import serial

        latency = self.latency_timer_ms

        class PortHandler(dxl.PortHandler):
            """dynamixel_sdk assumes a 16 ms adapter latency in every packet timeout; ALOHA's adapters
            are set to 1 ms (udev), so a missing reply is noticed within a tick instead of 34 ms."""

            def setPacketTimeout(self, packet_length):  # noqa: N802 (the SDK's name)
                self.packet_start_time = self.getCurrentTime()
                self.packet_timeout = self.tx_time_per_byte * packet_length + latency * 2.0 + 2.0

        if not os.path.exists(self.port_name):
            raise BackendError(f"{self.name}: no serial port {self.port_name} (U2D2 plugged in? udev rule for "
                               "the ttyDXL_* names installed?)", transient=False)
        adapter_latency = _port_latency_timer_ms(self.port_name)
        if adapter_latency is not None and adapter_latency > latency:
            raise BackendError(f"{self.name}: {self.port_name} has a USB latency timer of {adapter_latency} ms, "
                               f"above the {latency:g} ms this cell assumes: every read would take that long "
                               "(set it to 1 ms with a udev rule, as the ALOHA setup does)", transient=False)
        port = PortHandler(self.port_name)
        try:
            if not port.setBaudRate(self.baud):
                raise BackendError(f"{self.name}: dynamixel_sdk cannot set {self.baud} baud on {self.port_name}",
                                   transient=False)
        except (serial.SerialException, OSError, termios.error) as exc:
            raise BackendError(f"{self.name}: cannot open {self.port_name}: {exc}", transient=False) from None
        self.port = port
        self.dead = None
        self.ph = dxl.PacketHandler(2.0)
        self.pos_read = dxl.GroupSyncRead(port, self.ph, ADDR_PRESENT_POSITION, 4)
        for s in self.primaries:
            self.pos_read.addParam(s.id)
        self.err_read = dxl.GroupSyncRead(port, self.ph, ADDR_HARDWARE_ERROR, 1)
        for s in self.servos:
            self.err_read.addParam(s.id)
        self.goal_write = dxl.GroupSyncWrite(port, self.ph, ADDR_GOAL_POSITION, 4)

    def close(self) -> None:
        port, self.port = self.port, None
        if port is not None and port.ser is not None:
            try:
                port.closePort()
            except Exception:  # noqa: BLE001 (a vanished port may fail to close; it is gone either way)
                pass

    # --- checks at connect ---------------------------------------------------------------------
    def check_servos(self, check_models: bool) -> None:
        """Ping every configured ID; fail naming what answered, what is missing, what is the wrong model."""
        found: dict[int, int] = {}
        missing, wrong = [], []
        for s in self.servos:
            for _ in retry_tries():  # a lost reply (a busy host, a glitch) is not a missing servo
                model, result, _error = self.ph.ping(self.port, s.id)
                if result == COMM_SUCCESS:
                    break
            if result != COMM_SUCCESS:
                missing.append(s)
                continue
            found[s.id] = model
            if check_models and model != s.model:
                wrong.append(f"{self.label(s)} is a {MODEL_NAMES.get(model, 'model')} ({model})")
        if missing:
            others, _ = self.ph.broadcastPing(self.port)  # what is on the bus at all, for the message
            present = sorted(set(found) | set(others))
            raise BackendError(f"{self.name} on {self.port_name}: no answer from "
                               f"{', '.join(self.label(s) for s in missing)}; IDs found on the bus: "
                               f"{present or 'none'} (power on? right port? IDs set?)", transient=False)
        if wrong:
            raise BackendError(f"{self.name} on {self.port_name}: wrong servo models: {'; '.join(wrong)}",
                               transient=False)

    def check_shadows(self) -> None:
        ids = {s.key: s.id for s in self.servos}
        for s in self.servos:
            if not s.is_shadow:
                continue
            linked, result, error = self._read(1, s.id, ADDR_SECONDARY_ID)
            self._require(result, error, f"reading the Secondary_ID of {self.label(s)}")
            if linked != ids[s.joint]:
                raise BackendError(f"{self.name}: {self.label(s)} has Secondary_ID {linked}, not its primary's ID "
                                   f"{ids[s.joint]}: it would not follow the {s.joint} and would fight it; set it "
                                   "(Dynamixel Wizard) before running", transient=False)

    def check_ranges(self, ranges: list[list[float]]) -> None:
        """The embodiment's range of each arm joint must lie inside the servo's own Min/Max Position
        Limit (EEPROM 52/48, enforced in position mode): else a goal the driver allows would be refused
        by the servo, silently (sync writes get no status), and the joint would stop short."""
        bad = []
        for s, (lo, hi) in zip(self.primaries, ranges):
            servo_lo, r1, e1 = self._read(4, s.id, ADDR_MIN_POSITION_LIMIT)
            servo_hi, r2, e2 = self._read(4, s.id, ADDR_MAX_POSITION_LIMIT)
            self._require(r1 or r2, (e1 | e2) & 0x7F, f"reading the position limits of {self.label(s)}")
            want_lo, want_hi = float(rad_to_ticks(lo)), float(rad_to_ticks(hi))
            if want_lo < servo_lo or want_hi > servo_hi:
                bad.append(f"{s.key} needs ticks {want_lo:.0f}..{want_hi:.0f} ({lo:.3f}..{hi:.3f} rad), the servo "
                           f"allows {servo_lo}..{servo_hi}")
        if bad:
            raise BackendError(f"{self.name}: the embodiment's ranges exceed the servos' position limits: "
                               f"{'; '.join(bad)} (narrow the embodiment, or the servos' limits with Dynamixel "
                               "Wizard)", transient=False)

    def warn_return_delay(self) -> None:
        """Each status packet waits Return_Delay_Time (2 us units; X-series default 250 = 0.5 ms) before
        it is sent: 16 replies a tick per follower bus would add 8 ms. Interbotix sets it to 0."""
        slow = {}
        for s in self.servos:
            value, result, _ = self._read(1, s.id, ADDR_RETURN_DELAY)
            if result == COMM_SUCCESS and value:
                slow[s.id] = value
        if slow:
            primaries = {p.id for p in self.primaries}  # answer twice a tick: position and error status
            per_tick_ms = sum(2e-3 * v * (2 if sid in primaries else 1) for sid, v in slow.items())
            log.warning("%s: Return_Delay_Time is not 0 on servos %s: about %.1f ms more bus time per tick; set it "
                        "to 0 (Dynamixel Wizard) as ALOHA's setup does", self.name, sorted(slow), per_tick_ms)

    def hardware_errors(self) -> dict[Servo, int]:
        errors = {}
        for s in self.servos:
            bits, result, error = self._read(1, s.id, ADDR_HARDWARE_ERROR)
            self._require(result, error & 0x7F, f"reading the hardware error status of {self.label(s)}")
            if bits:
                errors[s] = bits
        return errors

    def torque(self, servo: Servo) -> int:
        value, result, error = self._read(1, servo.id, ADDR_TORQUE_ENABLE)
        self._require(result, error & 0x7F, f"reading Torque_Enable of {self.label(servo)}")
        return value

    def _require(self, result: int, error: int, what: str) -> None:
        if result != COMM_SUCCESS or error:
            raise BackendError(f"{self.name}: {what} failed: {self._comm(result, error)}", transient=False)

    def _read(self, size: int, servo_id: int, address: int) -> tuple[int, int, int]:
        """One register (value, result, error). Setup transactions are repeated while the reply is lost
        (a reply is lost on a busy host or a glitching bus; a servo's own error is never retried)."""
        fn = {1: self.ph.read1ByteTxRx, 2: self.ph.read2ByteTxRx, 4: self.ph.read4ByteTxRx}[size]
        for _ in retry_tries():
            value, result, error = fn(self.port, servo_id, address)
            if result == COMM_SUCCESS:
                break
        return value, result, error

    def _write(self, servo: Servo, address: int, size: int, value: int, what: str) -> None:
        """Write one register and wait for its status (the write is idempotent: a lost reply is retried)."""
        fn = {1: self.ph.write1ByteTxRx, 2: self.ph.write2ByteTxRx, 4: self.ph.write4ByteTxRx}[size]
        for _ in retry_tries():
            result, error = fn(self.port, servo.id, address, int(value) & ((1 << (8 * size)) - 1))
            if result == COMM_SUCCESS:
                break
        self._require(result, error & 0x7F, f"writing {what} of {self.label(servo)}")

    # --- taking control ------------------------------------------------------------------------
    def take_control(self, gripper_current: int) -> None:
        """Operating modes, gripper current, then torque on at the present position, confirmed."""
        for s in self.servos:
            mode, result, error = self._read(1, s.id, ADDR_OPERATING_MODE)
            self._require(result, error & 0x7F, f"reading the operating mode of {self.label(s)}")
            if mode == s.mode:
                continue
            if self.torque(s):
                if s.joint != "gripper":
                    raise BackendError(f"{self.name}: {self.label(s)} is in {MODE_NAMES.get(mode, mode)} mode with "
                                       f"torque on; switching it to {MODE_NAMES[s.mode]} mode needs torque off, which "
                                       "would drop a raised arm: support the arm and power-cycle it", transient=False)
                self._write(s, ADDR_TORQUE_ENABLE, 1, 0, "Torque_Enable (to change the gripper's mode)")
            self._write(s, ADDR_OPERATING_MODE, 1, s.mode, "Operating_Mode")
        for s in self.primaries:
            if s.joint == "gripper":
                limit, result, error = self._read(2, s.id, ADDR_CURRENT_LIMIT)
                self._require(result, error & 0x7F, f"reading Current_Limit of {self.label(s)}")
                if gripper_current > limit:
                    raise BackendError(f"{self.name}: gripper_current {gripper_current} is above {self.label(s)}'s "
                                       f"Current_Limit {limit}", transient=False)
                self._write(s, ADDR_GOAL_CURRENT, 2, gripper_current, "Goal_Current")
        present, lost = None, None
        for _ in retry_tries():  # the pose to hold: a lost reply is asked again, like every setup transaction
            try:
                present = self.read_positions()
                break
            except BackendError as exc:
                lost = exc
        if present is None:
            raise BackendError(f"{lost} (reading the pose to enable torque at)", transient=False) from None
        for s, ticks in zip(self.primaries, present):
            # Goal first (a shadow gets it too, through its Secondary_ID): torque then holds here.
            self._write(s, ADDR_GOAL_POSITION, 4, int(ticks), "Goal_Position (the present position)")
        for s in self.primaries:
            self._write(s, ADDR_TORQUE_ENABLE, 1, 1, "Torque_Enable")
        off = [self.label(s) for s in self.servos if self.torque(s) != 1]
        if off:
            raise BackendError(f"{self.name}: torque did not come on for {', '.join(off)} (a hardware error "
                               "latched by its shutdown?)", transient=False)

    def reboot_failed(self, deadline: float) -> list[str]:
        """Reboot servos whose hardware error already cut their torque; returns what was rebooted.

        A servo with an error but torque still on is refused: a reboot resets it to torque off."""
        errors = self.hardware_errors()
        on = [f"{self.label(s)} ({describe_hw_error(b)})" for s, b in errors.items() if self.torque(s)]
        if on:
            raise BackendError(f"{self.name}: {', '.join(on)} report a hardware error with torque still on; a reboot "
                               "would cut it and drop the arm: support the arm and power-cycle it", transient=False)
        done = []
        for s in errors:
            result, error = self.ph.reboot(self.port, s.id)
            self._require(result, 0, f"rebooting {self.label(s)}")
            done.append(self.label(s))
        for s in errors:
            while True:
                _, result, _ = self.ph.ping(self.port, s.id)
                if result == COMM_SUCCESS:
                    break
                if time.monotonic() > deadline:
                    raise BackendError(f"{self.name}: {self.label(s)} did not answer after its reboot", transient=False)
                time.sleep(0.02)
        return done

    # --- per tick ------------------------------------------------------------------------------
    def read_positions(self) -> np.ndarray:
        """Present_Position of the primaries, raw ticks (signed), JOINTS order. Raises on a failed read."""
        result = self.pos_read.txRxPacket()
        if result != COMM_SUCCESS:
            raise BackendError(f"{self.name}: position read: {self._comm(result)}")
        out = np.empty(len(self.primaries))
        for k, s in enumerate(self.primaries):
            if not self.pos_read.isAvailable(s.id, ADDR_PRESENT_POSITION, 4):
                raise BackendError(f"{self.name}: position read: no data from {self.label(s)}")
            raw = self.pos_read.getData(s.id, ADDR_PRESENT_POSITION, 4)
            out[k] = raw - (1 << 32) if raw & 0x80000000 else raw
        return out

    def read_errors(self) -> dict[Servo, int]:
        result = self.err_read.txRxPacket()
        if result != COMM_SUCCESS:
            raise BackendError(f"{self.name}: hardware error status read: {self._comm(result)}")
        return {s: bits for s in self.servos
                if (bits := self.err_read.getData(s.id, ADDR_HARDWARE_ERROR, 1))}

    def to_si(self, ticks: np.ndarray) -> np.ndarray:
        out = ticks_to_rad(ticks)
        out[-1] = float(self.calibration.opening(ticks[-1]))
        return out

    def write_goals(self, si: np.ndarray) -> None:
        ticks = rad_to_ticks(si)
        ticks[-1] = float(self.calibration.raw(si[-1]))
        ticks = np.rint(ticks).astype(np.int64)
        bad = [f"{s.key}={t}" for s, t in zip(self.primaries, ticks) if not 0 <= t < TICKS_PER_TURN]
        if bad:
            raise BackendError(f"{self.name}: goal outside one turn (0..4095 ticks): {', '.join(bad)}", transient=False)
        self.goal_write.clearParam()
        for s, t in zip(self.primaries, ticks):
            self.goal_write.addParam(s.id, list(int(t).to_bytes(4, "little")))
        result = self.goal_write.txPacket()
        if result != COMM_SUCCESS:
            raise BackendError(f"{self.name}: goal write: {self._comm(result)}")


@dataclass
class AlohaSettings:
    """Everything the backend needs, as plain values (it crosses into the worker process as msgpack)."""

    follower_ports: dict[str, str]  # side -> port
    leader_ports: dict[str, str] = field(default_factory=dict)  # side -> port; empty: no leaders
    baud: int = 1_000_000
    follower_ids: dict[str, int | None] = field(default_factory=dict)
    leader_ids: dict[str, int | None] = field(default_factory=dict)
    check_models: bool = True
    gripper_current: int = 300
    stale_s: float = 0.2
    latency_timer_ms: float = 1.0
    leaders_in_state: bool = False
    reboot_on_recover: bool = False
    # "left"/"right" (followers) and "left_leader"/"right_leader": GripperCalibration fields
    grippers: dict[str, dict[str, float]] = field(default_factory=dict)
    # side -> [[min, max] rad] of the six arm joints (the embodiment's ranges); empty: not checked
    arm_ranges: dict[str, list[list[float]]] = field(default_factory=dict)


class AlohaBackend(Backend):
    def __init__(self, settings: AlohaSettings):
        self.s = settings
        self._faulted: str | None = None  # set by on_fault: nothing is written until recover
        self._in_control = False  # modes set and torque on at the present pose, confirmed
        self._last_ok = time.monotonic()
        self.followers = [self._bus(f"{side} follower", settings.follower_ports[side], settings.follower_ids,
                                    FOLLOWER_MODELS, settings.grippers[side]) for side in SIDES]
        self.leaders = [self._bus(f"{side} leader", settings.leader_ports[side], settings.leader_ids, LEADER_MODELS,
                                  settings.grippers[f"{side}_leader"])
                        for side in SIDES if side in settings.leader_ports]
        if self.leaders and len(self.leaders) != 2:
            raise ValueError("ALOHA: give both leader ports or neither")
        self._leader_poll = (LeaderPoll("ALOHA leaders", self.read_leaders, self._leaders_dead, self._reopen_leaders)
                             if settings.leaders_in_state and self.leaders else None)

    def _bus(self, name: str, port: str, ids: dict[str, int | None], models: dict[str, int],
             grip: dict[str, float]) -> _Bus:
        return _Bus(name, port, self.s.baud, arm_servos(ids, models), self.s.latency_timer_ms,
                    GripperCalibration(**grip))

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        """Open, check and take control. A servo already reporting a hardware error does not fail
        connect: nothing is enabled, ``read`` reports it as a device fault, and the operator's
        clear_fault (``recover``) deals with it; this is also the way back after a fault ended the
        worker process, whose replacement connects first."""
        self._take_control(time.monotonic() + timeout_s, reboot=False, defer_hardware_errors=True)

    def _take_control(self, deadline: float, reboot: bool, defer_hardware_errors: bool = False) -> None:
        self.close()
        self._in_control = False
        try:
            for bus in self.followers:
                bus.open()
                bus.check_servos(self.s.check_models)
                if time.monotonic() > deadline:
                    raise BackendError(f"ALOHA: connect took longer than its deadline (at the {bus.name})",
                                       transient=False)
            self._open_leaders()
            for side, bus in zip(SIDES, self.followers):
                bus.check_shadows()
                if self.s.arm_ranges:
                    bus.check_ranges(self.s.arm_ranges[side])
                bus.warn_return_delay()
                if reboot:
                    rebooted = bus.reboot_failed(deadline)
                    if rebooted:
                        log.warning("%s: rebooted %s", bus.name, ", ".join(rebooted))
                errors = bus.hardware_errors()
                if errors and defer_hardware_errors:
                    log.error("%s: hardware errors at connect: %s; not taking control until clear_fault", bus.name,
                              "; ".join(f"{bus.label(s)}: {describe_hw_error(b)}" for s, b in errors.items()))
                    self._faulted = "hardware errors at connect"
                    self._last_ok = time.monotonic()
                    return
                if errors:
                    raise BackendError(f"{bus.name}: " + "; ".join(
                        f"{bus.label(s)} reports a hardware error ({describe_hw_error(b)})" for s, b in errors.items())
                        + (": power-cycle the arm (support it first)" if not self.s.reboot_on_recover else
                           ": clear_fault reboots servos whose torque it cut"), transient=False)
            for bus in self.followers:
                bus.take_control(self.s.gripper_current)
        except BackendError:
            self.close()
            raise
        except Exception as exc:  # pyserial's own errors while talking (a port that vanished midway)
            self.close()
            raise BackendError(f"ALOHA: connect failed: {type(exc).__name__}: {exc}", transient=False) from None
        self._faulted = None
        self._in_control = True
        self._last_ok = time.monotonic()

    def _open_leaders(self) -> None:
        """Open the leaders and check them (every ID pinged, models). Without ``leaders_in_state``
        (``read_leaders`` only) a missing leader fails connect. With it the leaders are optional for
        the followers: one that cannot be opened is reported in the state (``leader_error``) and its
        port reopened every 0.25 s (drivers/core/leader.py); it fails neither connect nor clear_fault."""
        try:
            for bus in self.leaders:
                bus.open()
                _on(bus, lambda: bus.check_servos(self.s.check_models))
        except Exception as exc:  # noqa: BLE001 (with leaders_in_state nothing about a leader fails connect)
            if self._leader_poll is None:
                raise
            log.warning("the leaders are not read for now: %s", exc)
            self._close_leaders()
            self._leader_poll.start(error=str(exc) if isinstance(exc, BackendError) else
                                    f"ALOHA leaders: {type(exc).__name__}: {exc}")
            return
        if self._leader_poll is not None:
            self._leader_poll.start()

    def _leaders_dead(self) -> bool:
        return any(bus.port is None or bus.dead is not None for bus in self.leaders)

    def _reopen_leaders(self) -> None:
        """Reopen the port of each leader whose port failed or never opened (an unplugged adapter
        plugged in again), in the tick, so cheaply: no pings; the position read that follows checks
        that every ID answers (connect checked the models)."""
        for bus in self.leaders:
            if bus.port is not None and bus.dead is None:
                continue
            bus.close()
            bus.open()

    def _close_leaders(self) -> None:
        for bus in self.leaders:
            bus.close()

    def close(self) -> None:
        """Close the ports. Never disables torque: a raised arm must not fall."""
        for bus in self.followers + self.leaders:
            bus.close()

    # ------------------------------------------------------------------ i/o

    def read(self) -> Reading:
        t = time.monotonic_ns()
        try:
            ticks = [_on(bus, bus.read_positions) for bus in self.followers]
            errors = [(bus, _on(bus, bus.read_errors)) for bus in self.followers]
        except BackendError as exc:
            raise self._stale(str(exc)) if exc.transient else exc from None
        self._last_ok = time.monotonic()
        faults = [f"{bus.name}: {bus.label(s)} hardware error: {describe_hw_error(bits)}"
                  for bus, errs in errors for s, bits in errs.items()]
        # The leaders' pose (or None and why) for teleop and the recorder; never fails this read.
        extras = self._leader_poll.extras() if self._leader_poll is not None else {}
        return Reading(position=np.concatenate([bus.to_si(tk) for bus, tk in zip(self.followers, ticks)]),
                       mono_ns=t, fault="; ".join(faults) or None, extras=extras or None)

    def _stale(self, why: str) -> BackendError:
        age = time.monotonic() - self._last_ok
        if age > self.s.stale_s:
            return BackendError(f"{why} (no complete reading for {age * 1e3:.0f} ms, bound {self.s.stale_s * 1e3:.0f} "
                                "ms)", transient=False)
        return BackendError(why, transient=True)

    def write(self, position: np.ndarray) -> None:
        if self._faulted is not None or not self._in_control:
            raise BackendError(f"ALOHA: not writing: {self._faulted or 'not connected'}; clear_fault first",
                               transient=False)
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (2 * ARM_DOF,) or not np.all(np.isfinite(p)):
            raise BackendError(f"ALOHA write needs 14 finite values, got {p!r}", transient=False)
        for k, bus in enumerate(self.followers):
            _on(bus, lambda: bus.write_goals(p[k * ARM_DOF:(k + 1) * ARM_DOF]))

    def read_leaders(self) -> np.ndarray:
        """The leaders' pose in the followers' action layout (14 values, rad and m): arm joints as read,
        each gripper mapped the way ALOHA's teleop does: the leader's opening normalised between its
        closed (0) and open (1) readings, then placed on the follower's closed..open range."""
        if not self.leaders:
            raise BackendError("ALOHA: no leader arms configured", transient=False)
        out = []
        for leader, follower in zip(self.leaders, self.followers):
            ticks = _on(leader, leader.read_positions)
            si = ticks_to_rad(ticks)
            n = float(leader.calibration.normalized(ticks[-1]))
            fc = follower.calibration
            si[-1] = fc.closed_m + n * (fc.open_m - fc.closed_m)
            out.append(si)
        return np.concatenate(out)

    # ------------------------------------------------------------------ stops

    def estop(self) -> None:
        """Hold: Goal_Position = Present_Position on every joint; torque stays on. After a fault nothing
        is written (the servos keep their last goal, torque on where it was)."""
        if self._faulted is not None or not self._in_control:
            return
        errors = []
        for bus in self.followers:
            for attempt in range(ESTOP_READ_ATTEMPTS):  # a reply lost to a busy host is worth another try
                try:
                    ticks = _on(bus, bus.read_positions)
                    _on(bus, lambda: bus.write_goals(bus.to_si(ticks)))
                    break
                except BackendError as exc:  # the other arm must still be stopped
                    if not exc.transient or attempt == ESTOP_READ_ATTEMPTS - 1:
                        errors.append(str(exc))
                        break
        if errors:
            # Position mode: each servo still stops at its last goal, one filtered tick from where it was.
            raise BackendError(f"ALOHA e-stop: holding at the present position failed ({'; '.join(errors)}); those "
                               "servos stop at their last goal", transient=False)

    def on_fault(self, reason: str) -> None:
        self._faulted = f"the driver faulted ({reason})"

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: reopen the ports, reboot servos whose hardware error cut their torque
        (only with ``reboot_on_recover``), then modes and torque on at the present pose, confirmed."""
        self._take_control(time.monotonic() + timeout_s, reboot=self.s.reboot_on_recover)


def _on(bus: _Bus, call: Callable[[], T]) -> T:
    """``call()`` on one bus, its failures as BackendErrors naming the bus: pyserial's errors (the
    adapter unplugged: EIO; the port closed) are non-transient; any other exception is the SDK
    tripping over a garbled or partial reply (an IndexError in its parser), which is transient like
    a CRC error: the SDK's busy flag is cleared (it stays set when its parser raises, and would
    refuse every later packet) and the stale bound faults the driver if it goes on."""
    import serial

    if bus.port is None:
        raise BackendError(f"{bus.name}: {bus.port_name} is not open", transient=False)
    if bus.dead is not None:  # a port that failed stays failed until recover reopens it
        raise BackendError(bus.dead, transient=False)
    try:
        return call()
    except BackendError:
        raise
    except (serial.SerialException, OSError, termios.error) as exc:  # termios: pyserial's flush of a dead tty
        bus.dead = f"{bus.name}: the serial port {bus.port_name} failed: {type(exc).__name__}: {exc}"
        raise BackendError(bus.dead, transient=False) from None
    except Exception as exc:  # noqa: BLE001 (the SDK's parser on a garbled reply)
        bus.port.is_using = False
        raise BackendError(f"{bus.name}: garbled reply ({type(exc).__name__} in dynamixel_sdk: {exc})") from None


def build_in_worker(**settings: Any) -> AlohaBackend:
    """What the isolated driver's worker process runs (drivers/core/isolated.py): plain arguments."""
    return AlohaBackend(AlohaSettings(**settings))
