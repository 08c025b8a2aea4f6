"""SO-101 behind the Backend interface, through lerobot's own classes: ``SOFollower`` / ``SOLeader``
(lerobot.robots.so_follower, lerobot.teleoperators.so_leader) give the SO-101 motor table (six
STS3215, IDs 1-6, lerobot's normalisation modes) and their ``FeetechMotorsBus`` does every
transaction. We do not call their ``connect`` / ``configure`` / ``disconnect``: those disable torque
(``configure`` runs under ``torque_disabled()``, ``disconnect`` disables torque by default), which
would drop a raised arm. The same steps are done here, in lerobot's order, without cutting torque.

Units (action and state, configs/embodiments/so101.yaml): the five arm joints in rad, lerobot's
DEGREES mode times pi/180, i.e. ``q = (raw - mid) * 2 pi / 4095`` with ``mid`` the middle of the
joint's calibrated range (so 0 rad is the middle of the range, the pose lerobot's calibration asks
the user to hold); the gripper as lerobot's RANGE_0_100 / 100: 0 at the calibrated ``range_min``,
1 at ``range_max`` (a fraction, not metres: the SO-101 jaw is a rotating finger, and lerobot's
datasets record it this way, so policies trained on them apply unchanged). The leader's reading is
in the same units through its own calibration: lerobot's teleop sends it to the follower as is.
With ``leader_in_state`` each read adds one sync read of the leader's Present_Position and publishes
``device["leader"]`` or None and ``device["leader_error"]``; a leader lost (unplugged, silent) never
faults the follower and comes back by itself when it is plugged in again (drivers/core/leader.py).

Calibration: lerobot's format (see drivers/so101/calibration.py). At connect the servos' Homing_Offset
and Min/Max_Position_Limit are compared with the file (lerobot's ``is_calibrated``); on a mismatch it
is written to them (lerobot's ``write_calibration``), as lerobot's connect does, but only to servos
with torque off: a new Homing_Offset under torque would move the joint. Torque on and a mismatch is
refused (support the arm, power-cycle it).

Per tick: one sync read of Present_Position (56, 2 bytes) and one of Status (65, 1 byte) from the six
servos, one sync write of Goal_Position (42). The Status read is needed because scservo_sdk's
GroupSyncRead discards each status packet's error byte: an overload or overheat is seen only there.

Safety:
- connect fails naming the IDs found on the bus, the ones missing and wrong models.
- Position mode; a servo found with torque on in another mode is refused (changing the mode needs
  torque off). Servos with torque off get lerobot's configuration (return delay 0, acceleration,
  P/I/D, Phase bit 4 clear; the gripper's torque / current limits), then Goal_Position =
  Present_Position and torque on (nothing jumps), confirmed by reading Torque_Enable back.
- Nothing here ever disables torque: not close (the port is closed without lerobot's
  ``disable_torque``; the configs say ``disable_torque_on_disconnect=False`` so their ``__del__``
  cannot either), not estop (goal = present position), not a fault, not recover.
- A Status bit on any servo is a device fault at the next read; a vanished port (EIO) a
  non-transient error there too. A lost reply or a bad checksum is transient; after ``stale_s``
  without a complete reading it is not. ``on_fault`` stops every write until ``recover``.

Isolation: the plugin runs this backend in a worker process (drivers/core/isolated.py), like ALOHA:
scservo_sdk's receive loop spins on a non-blocking port until its timeout (lerobot adds 50 ms to
it), pyserial's write has no timeout, and importing lerobot's motor modules imports torch (lerobot's
utils package does, about 1.3 s): none of that belongs in the driver process.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from armada.drivers.core.leader import LeaderPoll
from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.so101.config import ARM_JOINTS, JOINTS

log = logging.getLogger("armada.so101")
T = TypeVar("T")

STATUS_BITS = {0x01: "input voltage", 0x02: "angle sensor", 0x04: "overheat", 0x08: "overcurrent",
               0x20: "overload"}
STS3215_MAX_RES = 4095  # lerobot's model_resolution_table["sts3215"] - 1
ESTOP_READ_ATTEMPTS = 3
DEG = 180.0 / math.pi
# The leader's reply timeout, instead of the 50 ms lerobot adds to every packet timeout: a leader
# that stops answering (unpowered) would otherwise cost 51 ms a read, every tick for LEADER_STALE_S,
# past the worker's 30 ms read bound: the follower would fault for want of its leader (measured:
# 51 ms a read). A real bus answers a 6-servo sync read in under 1 ms plus the adapter's latency
# (1 ms set by udev); 5 ms, like ALOHA's 2 x latency + 2 ms, keeps a silent leader's reads inside the
# 20 ms tick (15 ms made the loop overrun to 40 ms ticks while it was being declared lost).
LEADER_REPLY_TIMEOUT_MS = 5.0


def _leader_packet_timeout(self, packet_length):  # noqa: N802 (replaces scservo_sdk's PortHandler method)
    self.packet_start_time = self.getCurrentTime()
    self.packet_timeout = self.tx_time_per_byte * (packet_length + 3.0) + LEADER_REPLY_TIMEOUT_MS


def describe_status(bits: int) -> str:
    return ", ".join(name for bit, name in STATUS_BITS.items() if bits & bit) or f"0x{bits:02X}"


@dataclass
class So101Settings:
    """Everything the backend needs, as plain values (it crosses into the worker as msgpack)."""

    port: str
    calibration: dict[str, dict[str, int]]  # lerobot's motor map
    leader_port: str | None = None
    leader_calibration: dict[str, dict[str, int]] | None = None
    stale_s: float = 0.2
    leader_in_state: bool = False
    pid: tuple[int, int, int] | list[int] = (16, 0, 32)


class _Arm:
    """One SO-101 arm: lerobot's robot (or teleoperator) object and its Feetech bus."""

    def __init__(self, name: str, port: str, calibration: dict[str, dict[str, int]], leader: bool):
        self.name, self.port, self.leader = name, port, leader
        self.calibration = calibration
        self.robot: Any = None
        self.dead: str | None = None

    @property
    def bus(self) -> Any:
        return self.robot.bus

    def open(self, handshake: bool = True) -> None:
        """Build lerobot's object, open the port and run lerobot's handshake (ping each ID, same firmware)."""
        from lerobot.motors import MotorCalibration

        if not os.path.exists(self.port):
            raise BackendError(f"{self.name}: no serial port {self.port} (adapter plugged in? udev name right?)",
                               transient=False)
        # lerobot loads <calibration_dir>/<id>.json itself; we hand it the file's values instead (an armada
        # calibration file is not lerobot's), so it gets an empty folder and no file to find.
        empty = tempfile.mkdtemp(prefix="armada-so101-")
        try:
            if self.leader:
                from lerobot.teleoperators.so_leader import SOLeader, SOLeaderTeleopConfig

                self.robot = SOLeader(SOLeaderTeleopConfig(port=self.port, id="armada", calibration_dir=Path(empty),
                                                           use_degrees=True))
            else:
                from lerobot.robots.so_follower import SOFollower, SOFollowerRobotConfig

                # disable_torque_on_disconnect=False: lerobot's default would cut torque in disconnect and __del__.
                self.robot = SOFollower(SOFollowerRobotConfig(port=self.port, id="armada", calibration_dir=Path(empty),
                                                              use_degrees=True, disable_torque_on_disconnect=False))
        finally:
            shutil.rmtree(empty, ignore_errors=True)
        cal = {name: MotorCalibration(**self.calibration[name]) for name in JOINTS}
        wrong_ids = {n: (cal[n].id, m.id) for n, m in self.bus.motors.items() if cal[n].id != m.id}
        if wrong_ids:
            raise BackendError(f"{self.name}: the calibration's motor IDs differ from the SO-101's: "
                               + ", ".join(f"{n} {a} (SO-101: {b})" for n, (a, b) in wrong_ids.items()),
                               transient=False)
        self.robot.calibration = cal
        self.bus.calibration = cal
        try:
            self.bus.connect(handshake=handshake)
        except RuntimeError as exc:  # lerobot's handshake: missing IDs / wrong models / mixed firmware
            # lerobot's ping counts a servo whose reply carries an error bit (overload, overheat) as missing;
            # such a servo is there, and the Status check after connect reports it (as a fault, not as a
            # wrong wiring). Anything else fails here, naming what is on the bus.
            expected = {m.id: n for n, m in self.bus.motors.items()}
            answers = {i: self._raw_ping(i) for i in expected}
            if all(a is not None and a[0] == 777 for a in answers.values()):
                log.warning("%s: %s answer with error bits (%s); lerobot's handshake counts them as missing",
                            self.name, [i for i, a in answers.items() if a[1]],
                            "; ".join(f"ID {i}: {describe_status(a[1])}" for i, a in answers.items() if a[1]))
            else:
                found = self._found()
                found.update({i: a[0] for i, a in answers.items() if a is not None})
                missing = [f"{i} ({expected[i]})" for i in sorted(expected) if i not in found]
                wrong = [f"{i} ({expected[i]}) is model {found[i]}" for i in sorted(expected)
                         if i in found and found[i] != 777]
                self.close()
                raise BackendError(
                    f"{self.name} on {self.port}: " + (f"no answer from servo IDs {', '.join(missing)}; " if missing
                                                       else "") + (f"wrong models: {', '.join(wrong)}; " if wrong else "")
                    + f"IDs found on the bus: {sorted(found) or 'none'}; the SO-101 needs STS3215 (model 777) at IDs "
                    f"{sorted(expected)} (power on? right port? IDs set with lerobot-setup-motors?). "
                    f"lerobot: {' '.join(str(exc).split())}", transient=False) from None
        except ConnectionError as exc:
            self.close()
            raise BackendError(f"{self.name}: cannot open {self.port}: {exc.__cause__ or exc}", transient=False) from None
        self.dead = None

    def _raw_ping(self, sid: int) -> tuple[int, int] | None:
        """(model number, error bits) of one servo through scservo_sdk's ping, None when it does not answer."""
        for _ in range(3):  # a reply lost to a busy host is not a missing servo
            model, comm, error = self.bus.packet_handler.ping(self.bus.port_handler, sid)
            if comm == 0:
                return int(model), int(error)
        return None

    def _found(self) -> dict[int, int]:
        try:
            return self.bus.broadcast_ping() or {}
        except Exception:  # noqa: BLE001 (only for the error message)
            return {}

    def close(self) -> None:
        """Close the port, never through lerobot's disable_torque."""
        if self.robot is None:
            return
        try:
            if self.bus.port_handler.is_open:
                self.bus.disconnect(disable_torque=False)
        except Exception:  # noqa: BLE001 (a vanished port may fail to close; it is gone either way)
            try:
                self.bus.port_handler.is_open = False
            except Exception:  # noqa: BLE001
                pass

    def use_leader_timeout(self) -> None:
        """From now on (the per-tick reads, after connect's) a reply is waited for LEADER_REPLY_TIMEOUT_MS."""
        self.bus.port_handler.setPacketTimeout = _leader_packet_timeout.__get__(self.bus.port_handler)

    # --- connect steps ---------------------------------------------------------------------
    def read_raw(self, register: str) -> dict[str, int]:
        self._drain()
        return self.bus.sync_read(register, normalize=False, num_retry=2)

    def ensure_calibrated(self) -> None:
        if self.bus.is_calibrated:
            return
        torque = self.read_raw("Torque_Enable")
        on = [n for n, v in torque.items() if v]
        if on and not self.leader:
            raise BackendError(f"{self.name}: the servos' calibration (Homing_Offset, position limits) differs from "
                               f"the calibration file, and {on} have torque on: writing it would move those joints. "
                               "Support the arm and power-cycle it (torque off), or give the file that matches",
                               transient=False)
        log.warning("%s: writing the calibration to the servos (it differed), as lerobot does", self.name)
        for name in JOINTS:
            self.bus.write("Lock", name, 0)  # EEPROM writes persist only unlocked (lerobot unlocks with torque off)
        self.bus.write_calibration(self.bus.calibration)
        if not self.bus.is_calibrated:
            raise BackendError(f"{self.name}: wrote the calibration but the servos do not read it back",
                               transient=False)

    def take_control(self, pid: list[int]) -> None:
        """Position mode and torque on at the present pose, confirmed. Never disables torque."""
        torque = self.read_raw("Torque_Enable")
        modes = self.read_raw("Operating_Mode")
        bad = [f"{n} (mode {modes[n]})" for n in JOINTS if torque[n] and modes[n] != 0]
        if bad:
            raise BackendError(f"{self.name}: {', '.join(bad)} have torque on in a mode other than position; changing "
                               "it needs torque off, which would drop the arm: support it and power-cycle it",
                               transient=False)
        off = [n for n in JOINTS if not torque[n]]
        if off:  # lerobot's configure() (SOFollower.configure, FeetechMotorsBus.configure_motors), torque-off servos only
            for n in off:
                self.bus.write("Return_Delay_Time", n, 0)
                self.bus.write("Maximum_Acceleration", n, 254)
                self.bus.write("Acceleration", n, 254)
                phase = self.bus.read("Phase", n, normalize=False)
                if phase & 0x10:
                    self.bus.write("Phase", n, phase & ~0x10)
                self.bus.write("Operating_Mode", n, 0)
                self.bus.write("P_Coefficient", n, int(pid[0]))
                self.bus.write("I_Coefficient", n, int(pid[1]))
                self.bus.write("D_Coefficient", n, int(pid[2]))
                if n == "gripper":
                    self.bus.write("Max_Torque_Limit", n, 500)  # lerobot: 50% of max torque to avoid burnout
                    self.bus.write("Protection_Current", n, 250)
                    self.bus.write("Overload_Torque", n, 25)
        present = self.read_raw("Present_Position")
        self.bus.sync_write("Goal_Position", present, normalize=False)  # hold where it is: nothing jumps
        if off:
            self.bus.enable_torque(off, num_retry=2)  # Torque_Enable 1 and Lock 1, lerobot's way
        torque = self.read_raw("Torque_Enable")
        still_off = [n for n in JOINTS if torque[n] != 1]
        if still_off:
            raise BackendError(f"{self.name}: torque did not come on for {still_off}", transient=False)

    # --- per tick ------------------------------------------------------------------------
    def _drain(self) -> None:
        """Drop unread input before a transaction: scservo_sdk's GroupSyncRead takes the next bytes
        of the right length as each servo's reply, so the late replies of a transaction that timed out
        (a starved host) would be read as this one's: a position's low byte as Status error bits."""
        self.bus.port_handler.ser.reset_input_buffer()

    def positions(self) -> np.ndarray:
        """JOINTS order, our units (rad, gripper 0..1), through lerobot's normalisation."""
        self._drain()
        norm = self.bus.sync_read("Present_Position")
        return np.array([norm[n] / DEG for n in ARM_JOINTS] + [norm["gripper"] / 100.0])

    def status(self) -> dict[str, int]:
        """Servos whose Status register (65) has bits set. Bits are confirmed by a second read at once
        (one more transaction, only when there are bits): a fault stops the arm, so one reply garbled
        into plausible bits must not."""
        self._drain()
        bits = {n: v for n, v in self.bus.sync_read("Status", normalize=False).items() if v}
        if bits:
            self._drain()
            again = self.bus.sync_read("Status", normalize=False)
            bits = {n: again[n] for n in bits if again[n]}
        return bits

    def goal_ticks(self, q: np.ndarray) -> dict[str, int]:
        """Raw goals as lerobot's _unnormalize computes them, checked within each calibrated range."""
        out, bad = {}, []
        for k, n in enumerate(JOINTS):
            c = self.calibration[n]
            lo, hi = c["range_min"], c["range_max"]
            if n == "gripper":
                raw = int(q[k] * (hi - lo) + lo)
            else:
                raw = int(q[k] * DEG * STS3215_MAX_RES / 360 + (lo + hi) / 2)
            if not lo <= raw <= hi:
                bad.append(f"{n}={q[k]:.4f} ({raw} ticks, calibrated {lo}..{hi})")
            out[n] = raw
        if bad:
            raise BackendError(f"{self.name}: goal outside the calibrated range: {', '.join(bad)}", transient=False)
        return out

    def write_goals(self, q: np.ndarray) -> None:
        self.goal_ticks(q)  # refuses before anything is sent
        values = {n: float(q[k] * DEG) for k, n in enumerate(ARM_JOINTS)}
        values["gripper"] = float(q[-1] * 100.0)
        self.bus.sync_write("Goal_Position", values)

    def hold(self) -> None:
        self.bus.sync_write("Goal_Position", self.read_raw("Present_Position"), normalize=False)


class So101Backend(Backend):
    def __init__(self, settings: So101Settings):
        self.s = settings
        self._faulted: str | None = None  # set by on_fault: nothing is written until recover
        self._in_control = False
        self._last_ok = time.monotonic()
        self.follower = _Arm("SO-101 follower", settings.port, settings.calibration, leader=False)
        self.leader = (_Arm("SO-101 leader", settings.leader_port, settings.leader_calibration, leader=True)
                       if settings.leader_port is not None and settings.leader_calibration is not None else None)
        self._leader_poll = (LeaderPoll("SO-101 leader", self.read_leader, self._leader_dead, self._reopen_leader)
                             if settings.leader_in_state and self.leader is not None else None)

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        """Open, check and take control. Servos already reporting a Status error do not fail connect:
        nothing is enabled, ``read`` reports it as a device fault, and clear_fault (``recover``) decides."""
        self._take_control(time.monotonic() + timeout_s, defer_errors=True)

    def _take_control(self, deadline: float, defer_errors: bool) -> None:
        self.close()
        self._in_control = False
        try:
            for arm in [self.follower] + (self._strict_leader()):
                arm.open()
                if time.monotonic() > deadline:
                    raise BackendError(f"SO-101: connect took longer than its deadline (at the {arm.name})",
                                       transient=False)
            self._open_optional_leader()
            # Status first: lerobot's single reads (the calibration check) raise on a reply's error bits.
            errors = _on(self.follower, self.follower.status)
            if errors:
                what = "; ".join(f"{n} (ID {self.follower.calibration[n]['id']}): {describe_status(b)}"
                                 for n, b in errors.items())
                if not defer_errors:
                    raise BackendError(f"{self.follower.name}: servos report errors: {what}; clear the cause (a "
                                       "blocked joint, heat) and power-cycle the arm (support it first)",
                                       transient=False)
                log.error("%s: servo errors at connect: %s; not taking control until clear_fault",
                          self.follower.name, what)
                self._faulted = "servo errors at connect"
                self._last_ok = time.monotonic()
                return
            for arm in [self.follower] + (self._strict_leader()):
                _on(arm, arm.ensure_calibrated)
            for arm in self._strict_leader():
                arm.use_leader_timeout()
            _on(self.follower, lambda: self.follower.take_control(list(self.s.pid)))
        except BackendError:
            self.close()
            raise
        self._faulted = None
        self._in_control = True
        self._last_ok = time.monotonic()

    def _strict_leader(self) -> list[_Arm]:
        """The leader when it is opened with the follower (no leader_in_state: read_leader only)."""
        return [self.leader] if self.leader is not None and self._leader_poll is None else []

    def _open_optional_leader(self) -> None:
        """With ``leader_in_state`` the leader is optional for the follower: opened and checked here as
        lerobot's connect would (handshake, calibration), and one that cannot be is reported in the state
        (``leader_error``) and its port reopened every 0.25 s (drivers/core/leader.py); it fails
        neither connect nor clear_fault."""
        if self._leader_poll is None:
            return
        arm = self.leader
        try:
            arm.open()
            _on(arm, arm.ensure_calibrated)
            arm.use_leader_timeout()
        except Exception as exc:  # noqa: BLE001 (lerobot's handshake can trip over a garbled reply: IndexError)
            log.warning("the SO-101 leader is not read for now: %s: %s", type(exc).__name__, exc)
            arm.close()
            arm.robot = None
            self._leader_poll.start(error=f"{arm.name}: {type(exc).__name__}: {exc}" if not isinstance(
                exc, BackendError) else str(exc))
            return
        self._leader_poll.start()

    def _leader_dead(self) -> bool:
        arm = self.leader
        return arm.robot is None or arm.dead is not None or not arm.bus.port_handler.is_open

    def _reopen_leader(self) -> None:
        """Reopen the leader's port after it failed or never opened (the adapter plugged in again), in
        the tick, so cheaply: no handshake; the position read that follows checks that every ID answers
        (connect checked models and calibration)."""
        arm = self.leader
        arm.close()
        try:
            arm.open(handshake=False)
            arm.use_leader_timeout()
        except Exception as exc:  # noqa: BLE001 (whatever failed, the leader stays closed and reported)
            arm.close()
            arm.robot = None
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"{arm.name}: reopening failed: {type(exc).__name__}: {exc}", transient=False) from None

    def close(self) -> None:
        """Close the ports. Never disables torque: a raised arm must not fall."""
        for arm in [self.follower] + ([self.leader] if self.leader else []):
            arm.close()

    # ------------------------------------------------------------------ i/o

    def read(self) -> Reading:
        t = time.monotonic_ns()
        try:
            q = _on(self.follower, self.follower.positions)
            errors = _on(self.follower, self.follower.status)
        except BackendError as exc:
            raise self._stale(str(exc)) if exc.transient else exc from None
        self._last_ok = time.monotonic()
        fault = "; ".join(f"{self.follower.name}: {n} (ID {self.follower.calibration[n]['id']}) status: "
                          f"{describe_status(b)}" for n, b in errors.items()) or None
        # The leader's pose (or None and why) for teleop and the recorder; never fails this read.
        extras = self._leader_poll.extras() if self._leader_poll is not None else {}
        return Reading(position=q, mono_ns=t, fault=fault, extras=extras or None)

    def _stale(self, why: str) -> BackendError:
        age = time.monotonic() - self._last_ok
        if age > self.s.stale_s:
            return BackendError(f"{why} (no complete reading for {age * 1e3:.0f} ms, bound "
                                f"{self.s.stale_s * 1e3:.0f} ms)", transient=False)
        return BackendError(why, transient=True)

    def write(self, position: np.ndarray) -> None:
        if self._faulted is not None or not self._in_control:
            raise BackendError(f"SO-101: not writing: {self._faulted or 'not connected'}; clear_fault first",
                               transient=False)
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (len(JOINTS),) or not np.all(np.isfinite(p)):
            raise BackendError(f"SO-101 write needs 6 finite values, got {p!r}", transient=False)
        _on(self.follower, lambda: self.follower.write_goals(p))

    def read_leader(self) -> np.ndarray:
        """The leader's pose in the follower's action units (rad, gripper 0..1), through its own calibration."""
        if self.leader is None:
            raise BackendError("SO-101: no leader arm configured", transient=False)
        return _on(self.leader, self.leader.positions)

    # ------------------------------------------------------------------ stops

    def estop(self) -> None:
        """Hold: Goal_Position = Present_Position; torque stays on. After a fault nothing is written."""
        if self._faulted is not None or not self._in_control:
            return
        for attempt in range(ESTOP_READ_ATTEMPTS):  # a reply lost to a busy host is worth another try
            try:
                _on(self.follower, self.follower.hold)
                return
            except BackendError as exc:
                if not exc.transient or attempt == ESTOP_READ_ATTEMPTS - 1:
                    raise BackendError(f"SO-101 e-stop: holding at the present position failed ({exc}); the servos "
                                       "stop at their last goal", transient=False) from None

    def on_fault(self, reason: str) -> None:
        self._faulted = f"the driver faulted ({reason})"

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: reopen, re-read the servos' Status (an error still set is refused: clear
        its cause), then position mode and torque on at the present pose, confirmed."""
        self._take_control(time.monotonic() + timeout_s, defer_errors=False)


def _on(arm: _Arm, call: Callable[[], T]) -> T:
    """``call()`` on one arm's bus, its failures as BackendErrors naming the arm: pyserial's errors (the
    adapter unplugged: EIO) are non-transient and stay until recover; lerobot's ConnectionError (no
    reply, a bad checksum) is transient, like the SDK's parser tripping over a garbled reply."""
    import serial

    if arm.dead is not None:
        raise BackendError(arm.dead, transient=False)
    if arm.robot is None:
        raise BackendError(f"{arm.name}: {arm.port} is not open", transient=False)
    try:
        return call()
    except BackendError:
        raise
    except (serial.SerialException, OSError, termios.error) as exc:
        if isinstance(exc, ConnectionError) and not isinstance(exc.__cause__, (OSError, serial.SerialException)):
            raise BackendError(f"{arm.name}: {' '.join(str(exc).split())}") from None  # lerobot: no (good) reply
        arm.dead = f"{arm.name}: the serial port {arm.port} failed: {type(exc).__name__}: {exc}"
        raise BackendError(arm.dead, transient=False) from None
    except Exception as exc:  # noqa: BLE001 (the SDK's parser on a garbled reply; lerobot's not-connected)
        try:
            arm.bus.port_handler.is_using = False
        except Exception:  # noqa: BLE001
            pass
        raise BackendError(f"{arm.name}: {type(exc).__name__}: {exc}") from None


def build_in_worker(**settings: Any) -> So101Backend:
    """What the isolated driver's worker process runs (drivers/core/isolated.py): plain arguments."""
    return So101Backend(So101Settings(**settings))
