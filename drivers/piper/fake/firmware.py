"""A fake PiPer main controller on a python-can bus (``virtual`` in one process, ``udp_multicast``
across processes: see ``drivers.piper.fake.bus`` and ``drivers.piper.fake.serve``).

It answers the frames piper_sdk 0.6.x sends for the calls our backend makes and streams the
feedback frames the SDK parses, at ``rate_hz``. Only that much of the protocol exists here:
all frames are standard 11-bit ids, DLC 8, big-endian.

Commands understood:
  0x150  motion ctrl 1: byte0 0x01 e-stop, 0x02 resume/reset (the SDK's ResetPiper sends the
         same bytes; here, as the SDK documents for reset, it clears the e-stop, leaves CAN
         control mode and disables the motors)
  0x151  motion ctrl 2: byte0 ctrl mode (0x00 standby, 0x01 CAN command, ...), byte1 move mode,
         byte2 speed %, byte3 mit mode
  0x155-0x157  joint targets, two int32 each, 0.001 deg
  0x159  gripper: int32 0.001 mm, uint16 effort 0.001 N·m, uint8 code (bit0 enable), uint8 zero
  0x471  enable/disable: byte0 motor (1-6, 7 = all), byte1 0x02 enable / 0x01 disable
Feedback streamed:
  0x2A1  status: ctrl_mode, arm_status (0x01 = e-stop), mode_feed, teach, motion, traj, err_code u16
  0x2A5-0x2A7  joint angles, int32 0.001 deg
  0x2A8  gripper: int32 0.001 mm, int16 effort, uint8 status (bit6 enabled)
  0x251-0x256  motor high speed: int16 speed 0.001 rad/s, int16 current 0.001 A, int32 position
  0x261-0x266  motor low speed: u16 voltage 0.1 V, i16 driver temp, i8 motor temp,
               u8 foc status (bit5 driver error, bit6 enabled), u16 bus current

Modes and enables, modelled on the worst case: the arm moves only in CAN command mode (0x01) and
only on enabled motors; in standby (0x00, the mode after power-on) and teaching mode (0x02, entered
with the arm's teach button, where the arm is moved by hand) joint frames do not move it, but the
firmware keeps the last target it heard, so an arm switched back to CAN mode goes to that target at
once (a jump, unless the sender first re-sent the pose it measures). A power cycle leaves the arm in
standby with every motor and the gripper disabled, its target where it stands (``power_cycle``,
optionally after the arm sagged or was moved while off). Fault injection: ``disable_motors``,
``set_mode``, ``power_cycle``, ``move_by_hand`` (joints move with no command, as in teaching mode).

Joint and gripper targets come from anyone on the bus: this driver, or a master arm in teaching
mode (``drivers.piper.fake.master``). Like the real puppet, the fake follows both.

Timing: each cycle steps the joints toward the target, then sends the feedback; between cycles
it handles frames as they arrive (so ``received`` times are arrival times). With
``time_constant_s=0`` a target received before a cycle shows in that cycle's feedback exactly,
which is how ``drivers.piper.bench`` measures command-to-feedback latency.
"""

from __future__ import annotations

import math
import struct
import threading
import time

import can
import numpy as np

from armada.drivers.piper.fake.bus import open_bus

ENABLE_BIT = 1 << 6
DRIVER_ERROR_BIT = 1 << 5
# What this fake sends; on udp_multicast it hears these back and must ignore them.
FEEDBACK_IDS = frozenset([0x2A1, 0x2A5, 0x2A6, 0x2A7, 0x2A8, *range(0x251, 0x257), *range(0x261, 0x267)])


class PiperFirmware:
    """A simulated PiPer. Start it before connecting the SDK; ``close()`` when done."""

    def __init__(self, channel: str, rate_hz: float = 200.0, initial_deg: np.ndarray | None = None,
                 initial_gripper_mm: float = 0.0, time_constant_s: float = 0.03,
                 motors_enabled: bool = False, bustype: str = "virtual", port: int | None = None,
                 max_history: int | None = None, motor_info_every: tuple[int, int] = (2, 4)):
        """``max_history`` bounds ``received`` and ``joint_targets`` (a long-running fake process);
        None keeps everything (tests). ``motor_info_every`` sends the motor high-/low-speed frames
        (0x251-0x256, 0x261-0x266) every n-th cycle: twelve frames a cycle are most of the bus load,
        and over udp_multicast every frame costs both processes CPU."""
        self.motor_info_every = motor_info_every
        self._cycle = 0
        self.channel = channel
        self.bustype = bustype
        self.max_history = max_history
        self.period = 1.0 / rate_hz
        self.tau = time_constant_s
        self._lock = threading.Lock()
        q = np.zeros(6) if initial_deg is None else np.asarray(initial_deg, dtype=np.float64)
        self.q_mdeg = q * 1000.0  # joint angles, 0.001 deg
        self.target_mdeg = self.q_mdeg.copy()
        self.qd_mdeg_s = np.zeros(6)
        self.gripper_um = initial_gripper_mm * 1000.0  # 0.001 mm
        self.gripper_target_um = self.gripper_um
        self.gripper_enabled = False
        self.enabled = np.full(6, motors_enabled)
        self.refuse_enable = np.zeros(6, dtype=bool)  # motors that ignore enable commands
        self.driver_error = np.zeros(6, dtype=bool)
        self.ctrl_mode = 0x00
        self.move_mode = 0x01
        self.speed_pct = 0
        self.estopped = False
        self.err_code = 0
        self.arm_status_code = 0x00  # what 0x2A1 byte1 reports when not e-stopped
        self.silenced = False
        # What the fake received: (monotonic s, arbitration id, bytes), and each complete joint
        # target (after 0x157) as (monotonic s, targets in 0.001 deg).
        self.received: list[tuple[float, int, bytes]] = []
        self.joint_targets: list[tuple[float, np.ndarray]] = []
        self.frames_sent = 0
        self._stop = threading.Event()
        self._bus = open_bus(channel, bustype, port)
        self._thread = threading.Thread(target=self._run, name=f"piper-fake-{channel}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ fault injection

    def silence(self, on: bool = True) -> None:
        """Stop (or resume) sending feedback, as if the arm lost power or the cable came off."""
        self.silenced = on

    def inject_error(self, code: int, arm_status: int | None = None) -> None:
        """Set the status frame's err_code bits (bits 0-5 joint comm, 8-13 angle limit)."""
        with self._lock:
            self.err_code = code & 0xFFFF
            if arm_status is not None:
                self.arm_status_code = arm_status

    def clear_error(self) -> None:
        with self._lock:
            self.err_code = 0
            self.arm_status_code = 0x00

    def disable_motors(self, *motors: int, stuck: bool = True) -> None:
        """Disable motors (1-6; none given: all). ``stuck`` ones then refuse enable commands."""
        idx = [m - 1 for m in (motors or range(1, 7))]
        with self._lock:
            self.enabled[idx] = False
            self.refuse_enable[idx] = stuck

    def press_estop(self) -> None:
        with self._lock:
            self._do_estop()

    def enable_motors(self, *motors: int) -> None:
        """Let motors (none given: all) accept enable commands again; they stay disabled until one."""
        idx = [m - 1 for m in (motors or range(1, 7))]
        with self._lock:
            self.refuse_enable[idx] = False

    def set_mode(self, ctrl_mode: int) -> None:
        """Switch the arm's control mode as its buttons do: 0x00 standby, 0x02 teaching."""
        with self._lock:
            self.ctrl_mode = ctrl_mode & 0xFF

    def power_cycle(self, q_deg: np.ndarray | None = None) -> None:
        """Power off and on: standby, every motor and the gripper disabled, no e-stop, no error.
        ``q_deg``: where the joints are after it (an arm sags or is moved while off)."""
        with self._lock:
            if q_deg is not None:
                self.q_mdeg = np.asarray(q_deg, dtype=np.float64) * 1000.0
            self.ctrl_mode = 0x00
            self.enabled[:] = False
            self.refuse_enable[:] = False
            self.gripper_enabled = False
            self.estopped = False
            self.err_code = 0
            self.arm_status_code = 0x00
            self.target_mdeg = self.q_mdeg.copy()
            self.gripper_target_um = self.gripper_um
            self.qd_mdeg_s = np.zeros(6)

    def move_by_hand(self, q_deg: np.ndarray) -> None:
        """The joints are now at ``q_deg`` without any command (dragged in teaching mode)."""
        with self._lock:
            self.q_mdeg = np.asarray(q_deg, dtype=np.float64) * 1000.0

    def state(self) -> dict:
        """A JSON-ready snapshot, in SI units (rad, m) beside the raw values."""
        with self._lock:
            return {
                "q": (np.radians(self.q_mdeg / 1000.0)).tolist(), "gripper_m": self.gripper_um * 1e-6,
                "target": (np.radians(self.target_mdeg / 1000.0)).tolist(),
                "gripper_target_m": self.gripper_target_um * 1e-6, "enabled": self.enabled.tolist(),
                "gripper_enabled": self.gripper_enabled, "ctrl_mode": int(self.ctrl_mode),
                "speed_pct": int(self.speed_pct), "estopped": self.estopped, "err_code": int(self.err_code),
                "arm_status": int(self.arm_status_code), "silenced": self.silenced,
                "frames_sent": self.frames_sent, "targets_received": len(self.joint_targets),
            }

    def joint_targets_since(self, t_mono: float) -> list[tuple[float, list[float]]]:
        """Complete joint targets received after ``t_mono`` (monotonic s), in rad."""
        with self._lock:
            return [(t, np.radians(q / 1000.0).tolist()) for t, q in self.joint_targets if t > t_mono]

    @property
    def bus(self) -> can.BusABC:
        return self._bus

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._bus.shutdown()

    # ------------------------------------------------------------------ the controller loop

    def _run(self) -> None:
        next_t = time.monotonic()
        last = next_t
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                self._step(now - last)
                frames = [] if self.silenced else self._feedback()
                self._trim()
            last = now
            for arb_id, data in frames:
                try:
                    self._bus.send(can.Message(arbitration_id=arb_id, data=data, is_extended_id=False), timeout=0.01)
                    self.frames_sent += 1
                except can.CanError:
                    pass
            next_t += self.period
            if next_t < time.monotonic():
                next_t = time.monotonic()  # late: skip ahead rather than burst
            self._receive_until(next_t)

    def _receive_until(self, deadline: float) -> None:
        """Handle frames as they arrive until the next cycle is due, and what is queued even when late
        (a fake behind schedule must still obey commands)."""
        while not self._stop.is_set():
            try:
                msg = self._bus.recv(timeout=max(0.0, deadline - time.monotonic()))
            except can.CanError:
                self._stop.wait(max(0.0, deadline - time.monotonic()))
                return
            if msg is None:
                return
            self._handle(msg)

    def _trim(self) -> None:
        n = self.max_history
        if n is not None:
            for history in (self.received, self.joint_targets):
                if len(history) > 2 * n:
                    del history[:-n]

    def _handle(self, msg: can.Message) -> None:
        d = bytes(msg.data)
        if len(d) < 8:
            d = d + bytes(8 - len(d))
        arb = msg.arbitration_id
        if arb in FEEDBACK_IDS:
            return  # our own feedback, heard back on udp_multicast
        now = time.monotonic()
        with self._lock:
            self.received.append((now, arb, d))
            if arb == 0x150:
                if d[0] == 0x01:
                    self._do_estop()
                elif d[0] == 0x02:
                    self.estopped = False
                    self.ctrl_mode = 0x00
                    self.enabled[:] = False
                    self.target_mdeg = self.q_mdeg.copy()
            elif arb == 0x151:
                self.ctrl_mode, self.move_mode, self.speed_pct = d[0], d[1], d[2]
            elif arb in (0x155, 0x156, 0x157):
                a, b = struct.unpack(">ii", d)
                i = 2 * (arb - 0x155)
                if not self.estopped:  # kept in any mode: the worst case (see the module notes)
                    self.target_mdeg[i], self.target_mdeg[i + 1] = a, b
                if arb == 0x157:
                    t = self.target_mdeg.copy()
                    t[i], t[i + 1] = a, b
                    self.joint_targets.append((now, t))
            elif arb == 0x159:
                angle, _effort, code, _zero = struct.unpack(">iHBB", d)
                self.gripper_enabled = bool(code & 0x01)
                if self.gripper_enabled and not self.estopped:
                    self.gripper_target_um = float(angle)
            elif arb == 0x471:
                motor, flag = d[0], d[1]
                idx = list(range(6)) if motor in (7, 0xFF) else [motor - 1] if 1 <= motor <= 6 else []
                for i in idx:
                    if flag == 0x02:
                        if not self.refuse_enable[i]:
                            self.enabled[i] = True
                    elif flag == 0x01:
                        self.enabled[i] = False

    def _do_estop(self) -> None:
        self.estopped = True
        self.target_mdeg = self.q_mdeg.copy()
        self.gripper_target_um = self.gripper_um

    def _accepts_motion(self) -> bool:
        return self.ctrl_mode == 0x01 and not self.estopped

    def _step(self, dt: float) -> None:
        alpha = 1.0 if self.tau <= 0 else 1.0 - math.exp(-dt / self.tau)
        moving = self.enabled & self._accepts_motion()
        prev = self.q_mdeg.copy()
        self.q_mdeg = np.where(moving, self.q_mdeg + alpha * (self.target_mdeg - self.q_mdeg), self.q_mdeg)
        self.qd_mdeg_s = (self.q_mdeg - prev) / dt if dt > 0 else np.zeros(6)
        if self.gripper_enabled and self._accepts_motion():
            self.gripper_um += alpha * (self.gripper_target_um - self.gripper_um)

    def _feedback(self) -> list[tuple[int, bytes]]:
        arm_status = 0x01 if self.estopped else self.arm_status_code
        moving = int(np.max(np.abs(self.target_mdeg - self.q_mdeg)) > 100)
        frames = [(0x2A1, struct.pack(">BBBBBBH", self.ctrl_mode, arm_status, self.move_mode, 0, moving, 0,
                                      self.err_code))]
        q = np.round(self.q_mdeg).astype(np.int64)
        for k in range(3):
            frames.append((0x2A5 + k, struct.pack(">ii", int(q[2 * k]), int(q[2 * k + 1]))))
        g_status = ENABLE_BIT if self.gripper_enabled else 0
        frames.append((0x2A8, struct.pack(">ihBB", int(round(self.gripper_um)), 0, g_status, 0)))
        self._cycle += 1
        high_every, low_every = self.motor_info_every
        for i in range(6 if self._cycle % high_every == 0 else 0):
            speed = int(np.clip(round(math.radians(self.qd_mdeg_s[i] / 1000.0) * 1000.0), -32768, 32767))
            pos = int(round(math.radians(self.q_mdeg[i] / 1000.0) * 1000.0))
            frames.append((0x251 + i, struct.pack(">hhi", speed, 0, pos)))
        for i in range(6 if self._cycle % low_every == 0 else 0):
            foc = (ENABLE_BIT if self.enabled[i] else 0) | (DRIVER_ERROR_BIT if self.driver_error[i] else 0)
            frames.append((0x261 + i, struct.pack(">HhbBH", 240, 30, 30, foc, 0)))
        return frames
