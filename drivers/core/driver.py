"""The driver's state machine and per-tick logic, independent of sockets and clocks.

``Driver.tick(now_ns)`` runs one control cycle: read the device, check the lease, sample the
trajectory buffer, pass the target through the safety filter, write the device.
``Driver.handle(msg, now_ns)`` applies one validated command. Both are called by
``drivers.core.process`` under one lock, so neither ever sees the other half-done.

States: idle (disarmed) -> armed (holding) <-> running (following the buffer); estop latches
until ``reset_estop``; fault until ``clear_fault``. The driver never arms itself.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.core.backend import Backend, BackendError, Reading
from drivers.core.lease import LeaseManager
from drivers.core.safety import SafetyFilter, SafetyLimits
from drivers.core.trajectory import TrajectoryBuffer, plan_move
from runtime.config import EmbodimentConfig
from runtime.protocol import ErrorCode, ProtocolError, check_hello_version, PROTOCOL_VERSION

# How long the device may fail to answer before a transient error becomes a fault. One bad
# read must not kill the loop (a lesson from LeRobot users), but a dead bus must not be ignored.
READ_FAILURE_FAULT_S = 0.1
# Servo targets are reached over this time, like servoJ's ``time`` argument.
SERVO_INTERPOLATION_S = 0.02
# The longest an operator-requested recovery (reconnect, unlock, script restart) may take.
RECOVER_TIMEOUT_S = 5.0


class Mode(enum.StrEnum):
    DISCONNECTED = "disconnected"
    IDLE = "idle"
    ARMED = "armed"
    RUNNING = "running"
    ESTOP = "estop"
    FAULT = "fault"


MOVING_MODES = (Mode.ARMED, Mode.RUNNING)


@dataclass
class Counters:
    ticks: int = 0
    overruns: int = 0
    starved_ticks: int = 0
    read_errors: int = 0
    write_errors: int = 0
    lease_lost: int = 0
    refused_commands: int = 0
    chunks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class TickResult:
    """What one tick measured, asked for and sent: the state message is built from this."""

    measured: np.ndarray
    requested: np.ndarray
    commanded: np.ndarray
    velocity: np.ndarray
    episode: int | None = None
    chunk: int | None = None


@dataclass
class _Activity:
    """What the buffer is currently playing, for starvation accounting and state."""

    final_received: bool = True
    episode: int | None = None
    chunk: int | None = None
    disarm_pending: bool = False
    hold_target: np.ndarray | None = None  # where a finished trajectory ended; None: stop where you are
    final_point: np.ndarray | None = None  # the last point of the trajectory marked final


class Driver:
    def __init__(self, emb: EmbodimentConfig, backend: Backend, lease_ttl_s: float):
        self.emb = emb
        self.backend = backend
        self.dt = 1.0 / emb.control_rate_hz
        self.limits = SafetyLimits.from_embodiment(emb)
        self.filter = SafetyFilter(self.limits, self.dt)
        self.buffer = TrajectoryBuffer(emb.dof)
        self.lease = LeaseManager(lease_ttl_s)
        self.counters = Counters()
        self.mode = Mode.DISCONNECTED
        self.reason = ""  # why we are in estop or fault
        self.activity = _Activity()
        self.last_reading: Reading | None = None
        self.requested = np.zeros(emb.dof)
        self._failing_since_ns: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.backend.connect(timeout_s)
        self.last_reading = self._first_reading(deadline)
        self.requested = self.last_reading.position.copy()
        self.filter.reset(self.last_reading.position)
        self.mode = Mode.IDLE  # always disarmed after (re)start: arming is the operator's call

    def _first_reading(self, deadline: float) -> Reading:
        """A transient error (a late answer on a busy host) is retried until the connect deadline."""
        while True:
            try:
                return self.backend.read()
            except BackendError as exc:
                if not exc.transient or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    # ------------------------------------------------------------------ one control cycle

    def tick(self, now_ns: int) -> TickResult:
        self.counters.ticks += 1
        reading = self._read(now_ns)
        self._watch_device(reading)
        self._watch_lease(now_ns)
        target = self._next_target(now_ns) if self.mode == Mode.RUNNING else self.activity.hold_target
        if self.mode in MOVING_MODES:
            commanded = self.filter.step(target) if target is not None else self.filter.decelerate()
            self._write(commanded, now_ns)
            if self.activity.disarm_pending and not np.any(self.filter.velocity):
                self.activity.disarm_pending = False
                self.mode = Mode.IDLE
        else:
            # Not commanding: keep the filter on the measured pose so arming never jumps.
            self.filter.reset(reading.position)
        return TickResult(reading.position, self.requested.copy(), self.filter.position, self.filter.velocity,
                          self.activity.episode, self.activity.chunk)

    def _read(self, now_ns: int) -> Reading:
        try:
            reading = self.backend.read()
            if reading.position.shape != (self.emb.dof,) or not np.all(np.isfinite(reading.position)):
                raise BackendError(f"device returned an unusable reading {reading.position!r}")
        except BackendError as exc:
            self.counters.read_errors += 1
            self._device_failed(exc, now_ns)
            assert self.last_reading is not None
            return self.last_reading
        self._failing_since_ns = None
        self.last_reading = reading
        return reading

    def _write(self, commanded: np.ndarray, now_ns: int) -> None:
        try:
            self.backend.write(commanded)
        except BackendError as exc:
            self.counters.write_errors += 1
            self._device_failed(exc, now_ns)

    def _device_failed(self, exc: BackendError, now_ns: int) -> None:
        if self._failing_since_ns is None:
            self._failing_since_ns = now_ns
        failing_for = (now_ns - self._failing_since_ns) * 1e-9
        if not exc.transient or failing_for > READ_FAILURE_FAULT_S:
            self._enter_fault(f"device: {exc}")

    def _watch_device(self, reading: Reading) -> None:
        if reading.estopped and self.mode != Mode.ESTOP:
            self._enter_estop("the device's e-stop is engaged")
        elif reading.fault and self.mode not in (Mode.FAULT, Mode.ESTOP):
            self._enter_fault(f"device reports: {reading.fault}")

    def _watch_lease(self, now_ns: int) -> None:
        lapsed = self.lease.lapsed(now_ns)
        if lapsed is None:
            return
        self.counters.lease_lost += 1
        if self.mode == Mode.RUNNING:
            # The controller is gone (killed, hung, unplugged): stop following its plan and
            # decelerate to a hold. Torque stays on; a raised arm must not fall.
            self._stop_motion()

    def _next_target(self, now_ns: int) -> np.ndarray | None:
        if self.mode != Mode.RUNNING:
            return None
        sample = self.buffer.sample(now_ns)
        if sample.status == "tracking":
            self.activity.episode, self.activity.chunk = sample.episode, sample.chunk
            self.requested = sample.target
            return sample.target
        if sample.status == "dry":
            if self.activity.final_received:
                # Finished: settle on the last point, even if a late tick left the filter behind.
                self.activity.hold_target = self.activity.final_point
                if self.activity.final_point is not None:
                    self.requested = self.activity.final_point.copy()
                self.mode = Mode.ARMED
                return self.activity.hold_target
            self.counters.starved_ticks += 1
        return None  # waiting for the first point, or starved: decelerate to a hold

    def _stop_motion(self) -> None:
        self.buffer.clear()
        self.activity.final_received = True
        self.activity.hold_target = None  # decelerate and hold wherever that ends
        if self.mode == Mode.RUNNING:
            self.mode = Mode.ARMED

    def _enter_estop(self, reason: str) -> None:
        try:
            self.backend.estop()
        except BackendError as exc:  # keep the latch even if the device did not answer
            self.reason = f"{reason}; device estop call failed: {exc}"
        self.buffer.clear()
        self.activity = _Activity()
        self.mode = Mode.ESTOP
        self.reason = reason

    def _enter_fault(self, reason: str) -> None:
        if self.mode in (Mode.ESTOP, Mode.FAULT):
            return  # the e-stop latch outranks a fault; the first cause of a fault is the one to keep
        self.buffer.clear()
        self.activity = _Activity()
        self.mode = Mode.FAULT
        self.reason = reason

    # ------------------------------------------------------------------ commands

    def handle(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """Apply one validated command; returns reply data or raises ProtocolError."""
        handler = getattr(self, f"_cmd_{msg['kind']}", None)
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"a driver does not accept {msg['kind']!r} commands")
        try:
            return handler(msg, now_ns) or {}
        except ProtocolError:
            self.counters.refused_commands += 1
            raise

    def _cmd_hello(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        check_hello_version(msg["version"])
        return {"version": PROTOCOL_VERSION, "mode": self.mode.value, "description": self.emb.describe()}

    def _cmd_ping(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        return {"mono_ns": now_ns, "mode": self.mode.value, "disarming": self.activity.disarm_pending}

    def _cmd_acquire(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        lease = self.lease.acquire(msg["client"], now_ns, msg.get("ttl_s"))
        return {"lease": lease.token, "ttl_s": lease.ttl_ns * 1e-9}

    def _cmd_heartbeat(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        return {"mode": self.mode.value}

    def _cmd_release(self, msg: dict[str, Any], now_ns: int) -> None:
        self.lease.release(msg["lease"], now_ns)
        self._stop_motion()

    def _cmd_arm(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        if self.mode in MOVING_MODES:
            self.activity.disarm_pending = False  # arming again cancels a disarm still decelerating
            return {"mode": self.mode.value}
        self._require_mode(Mode.IDLE, "arm")
        pose = self.last_reading.position if self.last_reading else None
        lo, hi = self.limits.lower + self.limits.margin, self.limits.upper - self.limits.margin
        outside = [] if pose is None else [
            f"{name}={pose[i]:.3f} not in [{lo[i]:.3f}, {hi[i]:.3f}]"
            for i, name in enumerate(self.emb.joint_names) if not lo[i] <= pose[i] <= hi[i]]
        if outside:
            raise ProtocolError(ErrorCode.BAD_STATE, "refusing to arm outside the configured range (arming would "
                                f"move the arm): {', '.join(outside)}; move it inside by hand first")
        self.filter.reset(pose)  # hold exactly where the arm is: arming never moves it
        self.requested = pose.copy()
        self.activity = _Activity()
        self.mode = Mode.ARMED
        return {"mode": self.mode.value}

    def _cmd_disarm(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        if self.mode in MOVING_MODES:
            self._stop_motion()
            self.activity.disarm_pending = True  # idle once decelerated to a stop
        return {"mode": self.mode.value}

    def _cmd_estop(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        # Anyone may press the e-stop; no lease needed.
        if self.mode != Mode.ESTOP:
            self._enter_estop(f"estop command: {msg.get('reason', 'no reason given')}")
        return {"mode": self.mode.value}

    def _cmd_reset_estop(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        self._require_mode(Mode.ESTOP, "reset_estop")
        if self.last_reading is not None and self.last_reading.estopped:
            raise ProtocolError(ErrorCode.ESTOPPED, "the device's own e-stop is still engaged; release it first")
        try:
            self.backend.release_estop()
        except BackendError as exc:
            raise ProtocolError(ErrorCode.BAD_STATE, f"the device did not reset: {exc}") from None
        self.mode, self.reason = Mode.IDLE, ""  # disarmed: the operator arms again explicitly
        return {"mode": self.mode.value}

    def _cmd_clear_fault(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        self._require_mode(Mode.FAULT, "clear_fault")
        try:
            self.backend.recover(RECOVER_TIMEOUT_S)
            reading = self.backend.read()
        except BackendError as exc:
            raise ProtocolError(ErrorCode.BAD_STATE, f"the device still fails: {exc}") from None
        if reading.fault:
            raise ProtocolError(ErrorCode.BAD_STATE, f"the device still reports: {reading.fault}")
        self.last_reading = reading
        self.filter.reset(reading.position)
        self._failing_since_ns = None
        self.mode, self.reason = Mode.IDLE, ""
        return {"mode": self.mode.value}

    def _cmd_move_to(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        self._require_moving("move_to")
        goal = self._check_vector(msg["target"], "target")
        self._check_inside(goal)
        fraction = self.emb.move_to_velocity_fraction
        vmax = self.limits.max_velocity * fraction
        if "max_velocity" in msg:
            vmax = np.minimum(vmax, msg["max_velocity"])
        points = plan_move(self.filter.position, goal, vmax, self.limits.max_acceleration * fraction, self.dt)
        # plan_move's first point is one tick after the start pose.
        self.buffer.add_chunk(now_ns + int(self.dt * 1e9), self.dt, points, "replace", now_ns,
                              anchor=self.filter.position)
        self._start_running(final_point=points[-1].copy())
        return {"duration_s": len(points) * self.dt}

    def _cmd_trajectory(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        self._require_moving("trajectory")
        points = msg["points"].astype(np.float64, copy=False)
        if points.ndim != 2 or points.shape[1] != self.emb.dof or points.shape[0] == 0:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"points must have shape (n>0, {self.emb.dof}), got {points.shape}")
        t0, dt = msg["t0_ns"], float(msg["dt"])
        first = _first_index_at_or_after(t0, dt, len(points), now_ns)
        if first is None:
            raise ProtocolError(ErrorCode.BAD_VALUE, "every point of the chunk is already in the past "
                                f"(chunk ended {(now_ns - t0) * 1e-6 - (len(points) - 1) * dt * 1e3:.1f} ms ago)")
        self._check_engage(points[first])
        try:
            kept = self.buffer.add_chunk(t0, dt, points, msg.get("merge", "replace"), now_ns,
                                         episode=msg.get("episode"), chunk=msg.get("chunk"),
                                         anchor=self.filter.position)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_VALUE, str(exc)) from None
        self.counters.chunks += 1
        self._start_running(final_point=points[-1].copy() if msg.get("final", False) else None)
        return {"kept": kept, "dropped": len(points) - kept, "driver_ns": now_ns}

    def _cmd_servo(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self.lease.check(msg["lease"], now_ns)
        self._require_moving("servo")
        target = self._check_vector(msg["target"], "target")
        self._check_engage(target)
        points = np.stack([self.filter.position, target])
        self.buffer.add_chunk(now_ns, SERVO_INTERPOLATION_S, points, "replace", now_ns)
        self._start_running(final_point=target)
        return {}

    def _cmd_stats(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        return {"counters": self.counters.as_dict(), "clamps": self.filter.counters.as_dict()}

    # ------------------------------------------------------------------ checks

    def _start_running(self, final_point: np.ndarray | None) -> None:
        """Follow the buffer; ``final_point`` is where it ends if this was the last chunk."""
        self.activity.final_received = final_point is not None
        self.activity.final_point = final_point
        self.activity.disarm_pending = False
        self.activity.hold_target = None
        self.mode = Mode.RUNNING

    def _require_mode(self, mode: Mode, what: str) -> None:
        if self.mode != mode:
            raise ProtocolError(ErrorCode.ESTOPPED if self.mode == Mode.ESTOP else ErrorCode.BAD_STATE,
                                f"{what} needs the driver {mode.value}, it is {self.mode.value}"
                                + (f" ({self.reason})" if self.reason else ""))

    def _require_moving(self, what: str) -> None:
        if self.mode not in MOVING_MODES:
            hint = {Mode.IDLE: "arm it first", Mode.ESTOP: "e-stop is latched; reset_estop then arm",
                    Mode.FAULT: "clear_fault then arm"}.get(self.mode, "")
            raise ProtocolError(ErrorCode.ESTOPPED if self.mode == Mode.ESTOP else ErrorCode.BAD_STATE,
                                f"{what} needs the driver armed, it is {self.mode.value}"
                                + (f": {hint}" if hint else "") + (f" ({self.reason})" if self.reason else ""))

    def _check_vector(self, value: np.ndarray, name: str) -> np.ndarray:
        if value.shape != (self.emb.dof,):
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"{name} must have shape ({self.emb.dof},), got {value.shape}")
        return value.astype(np.float64)

    def _check_inside(self, goal: np.ndarray) -> None:
        lo, hi = self.limits.lower + self.limits.margin, self.limits.upper - self.limits.margin
        bad = [f"{n}={goal[i]:.3f} not in [{lo[i]:.3f}, {hi[i]:.3f}]"
               for i, n in enumerate(self.emb.joint_names) if not lo[i] <= goal[i] <= hi[i]]
        if bad:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"target outside the joint limits: {', '.join(bad)}")

    def _check_engage(self, first_target: np.ndarray) -> None:
        """Refuse a stream whose first target is far from where the arm is commanded now."""
        gap = np.abs(first_target - self.filter.position)
        worst = int(np.argmax(gap))
        if gap[worst] > self.emb.max_engage_distance:
            raise ProtocolError(ErrorCode.TOO_FAR,
                                f"first target is {gap[worst]:.3f} from the current pose at joint "
                                f"{self.emb.joint_names[worst]} (limit {self.emb.max_engage_distance}); "
                                "use move_to, which ramps")


def _first_index_at_or_after(t0_ns: int, dt: float, n: int, now_ns: int) -> int | None:
    if now_ns <= t0_ns:
        return 0
    index = int(np.ceil((now_ns - t0_ns) / (dt * 1e9) - 1e-9))
    return index if index < n else None
