"""The driver's state machine and per-tick logic, independent of sockets and clocks.

``Driver.tick(now_ns)`` runs one control cycle: read the device, check the lease and the
following error, sample the trajectory buffer, pass the target through the safety filter, write
the device. ``Driver.start(msg, now_ns, identity)`` applies one validated command. Both are called
by ``drivers.core.process`` under one lock, so neither ever sees the other half-done; that lock is
only ever held briefly, because the loop waits on it.

Two commands are slow: planning a long ``move_to`` and a device recovery (``clear_fault``). For
those ``start`` returns a ``SlowJob``: its ``run`` executes outside the lock (the loop keeps
ticking, an e-stop keeps working) and its ``finish`` swaps the result in under the lock, after
checking again that it still applies. During a recovery the loop does not touch the device (the
recovery owns it); an e-stop then latches at once and the device e-stop is sent when the recovery
returns. ``handle`` runs both halves inline, for tests and tools without threads.

States: idle (disarmed) -> armed (holding) <-> running (following the buffer); estop latches
until ``reset_estop`` (and, with a latch file, across restarts); fault until ``clear_fault``.
The driver never arms itself.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.core.lease import LeaseManager
from armada.drivers.core.filters import build_filter
from armada.drivers.core.modes import base_mask
from armada.drivers.core.safety import SafetyLimits
from armada.drivers.core.trajectory import TrajectoryBuffer, move_duration, plan_move
from armada.runtime.config import EmbodimentConfig
from armada.runtime.protocol import ErrorCode, ProtocolError, check_hello_version, PROTOCOL_VERSION

# How long the device may fail to answer before a transient error becomes a fault. One bad
# read must not kill the loop (a lesson from LeRobot users), but a dead bus must not be ignored.
READ_FAILURE_FAULT_S = 0.1
# Servo targets are reached over this time, like servoJ's ``time`` argument.
SERVO_INTERPOLATION_S = 0.02
# The longest an operator-requested recovery (reconnect, unlock, script restart) may take.
RECOVER_TIMEOUT_S = 5.0
# A move_to longer than this is refused before it is planned (a tiny max_velocity once planned
# for seconds, took 951 MB and then failed). Long slow moves are better done in steps.
MAX_MOVE_S = 120.0
# The slowest move_to velocity accepted, in joint units per second.
MIN_MOVE_VELOCITY = 1e-3
# A move_to is planned with at most this many waypoints: a longer move spaces them further apart
# (whole ticks; the buffer interpolates and the filter bounds every tick). Swapping the plan into
# the buffer happens under the loop's lock, and costs about a microsecond per point.
MOVE_MAX_POINTS = 2000
MOVE_RAMP_WAYPOINTS = 5
# The e-stop latch file is small; anything bigger is not ours.
LATCH_MAX_BYTES = 65536

log = logging.getLogger("armada.driver")


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
    servo_target: np.ndarray | None = None  # the last servo target while servo is what plays (per-group servo)


@dataclass
class SlowJob:
    """The slow half of a command: ``run`` outside the loop's lock, then ``finish`` under it.

    ``run`` returns its result or the exception it raised (as a value), so ``finish`` always runs
    and always restores the driver's bookkeeping (a recovery in progress, say).
    """

    what: str
    work: Callable[[], Any]
    finish: Callable[[Any, int, bytes], dict[str, Any]]

    def run(self) -> Any:
        try:
            return self.work()
        except Exception as exc:  # handed to finish, which turns it into a clear error reply
            return exc


def following_error_bounds(emb: EmbodimentConfig) -> np.ndarray:
    """Per joint bound on |measured - commanded|; inf where unchecked (grippers stall on objects,
    a base's position is not what it is commanded) unless the group sets one."""
    bounds = []
    for group in emb.groups:
        bound = group.max_following_error
        if bound is None:
            checked = group.mode in ("joint_position", "lift_height")
            bound = emb.following_error.max_error if checked else np.inf
        bounds += [bound] * len(group.joints)
    return np.array(bounds, dtype=np.float64)


def write_latch(path: Path, reason: str) -> None:
    """Save the e-stop latch atomically (write, then rename), readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps({"reason": reason[:2000], "time": time.time()}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_latch(path: Path) -> str | None:
    """The reason saved with an e-stop latch, or None when there is no latch. A latch file that
    cannot be read is still a latch: the reason says so."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"latch file {path} unreadable ({exc.strerror})"
    try:
        raw = os.read(fd, LATCH_MAX_BYTES)
    finally:
        os.close(fd)
    try:
        reason = json.loads(raw)["reason"]
        return str(reason)[:2000]
    except (ValueError, KeyError, TypeError):
        return f"latch file {path} unreadable (not a latch record)"


class Driver:
    def __init__(self, emb: EmbodimentConfig, backend: Backend, lease_ttl_s: float, latch_path: Path | None = None):
        self.emb = emb
        self.backend = backend
        self.dt = 1.0 / emb.control_rate_hz
        self.limits = SafetyLimits.from_embodiment(emb)
        self.filter = build_filter(emb, self.dt)
        # Base-velocity dofs: their entries are velocities. move_to, the engage and range checks
        # skip them; the buffer interpolates them linearly; a trajectory's end stops them.
        self.base = base_mask(emb)
        self.has_base = bool(self.base.any())
        self.buffer = TrajectoryBuffer(emb.dof, linear=self.base if self.has_base else None)
        # Until when the base entries of what the buffer plays come from a command that covers
        # them (a chunk's last point, a base servo's interpolation): after that they are stale,
        # and the filter ramps the base to zero once stale for the group's command_timeout_s.
        self._base_fresh_until_ns = -1
        self._slices = emb.group_slices()
        self._base_groups = {g.name for g in emb.groups if g.mode == "base_velocity"}
        self.lease = LeaseManager(lease_ttl_s)
        self.counters = Counters()
        self.mode = Mode.DISCONNECTED
        self.reason = ""  # why we are in estop or fault
        self.activity = _Activity()
        self.last_reading: Reading | None = None
        self.requested = np.zeros(emb.dof)
        self._failing_since_ns: int | None = None
        self._identity = b""  # the connection of the command being handled (the lease is bound to it)
        # Where the e-stop latch is saved so a restart keeps it; None: not saved (tests, tools).
        self.latch_path = latch_path
        # A clear_fault is running outside the lock: the device belongs to it, not to the loop.
        self.recovering = False
        self._device_estop_pending = False  # an e-stop came during the recovery: send it after
        # Following error: the target sent last tick, how long each joint has been beyond its bound.
        self.fe_bounds = following_error_bounds(emb)
        self.fe_time_ns = int(emb.following_error.max_time_s * 1e9)
        self.fe_lag_s = emb.following_error.lag_s
        self._fe_reference: np.ndarray | None = None
        self._fe_since_ns = np.full(emb.dof, -1, dtype=np.int64)
        # The target the filter followed on the last tick (None: it decelerated): a servo starts
        # from it, so that the filter's reference stays continuous.
        self._followed: np.ndarray | None = None

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.backend.connect(timeout_s)
        self.last_reading = self._first_reading(deadline)
        self.requested = self.last_reading.position.copy()
        self.filter.reset(self.last_reading.position)
        self.mode = Mode.IDLE  # always disarmed after (re)start: arming is the operator's call
        latched = read_latch(self.latch_path) if self.latch_path is not None else None
        if latched is not None:
            # A crash or restart must not clear an e-stop: start latched, device stopped too. The
            # file keeps its first reason (no "latched before restart" nested at every restart).
            self.mode, self.reason = Mode.ESTOP, f"latched before restart: {latched}"
            self._device_estop()
            log.warning("e-stop latch found in %s: starting latched (%s)", self.latch_path, latched)

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
        if self.recovering:
            # The recovery owns the device (it may be reconnecting): publish the last reading, send nothing.
            assert self.last_reading is not None
            self._watch_lease(now_ns)
            return TickResult(self.last_reading.position, self.requested.copy(), self.filter.position,
                              self.filter.velocity, self.activity.episode, self.activity.chunk)
        reading, fresh = self._read(now_ns)
        self._watch_device(reading)
        if fresh:
            self._watch_following(reading.position, now_ns)
        self._watch_lease(now_ns)
        target = self._next_target(now_ns) if self.mode == Mode.RUNNING else self.activity.hold_target
        self._followed = target if self.mode in MOVING_MODES else None
        if self.mode in MOVING_MODES:
            if target is None:
                commanded = self.filter.decelerate()
            elif self.has_base:
                commanded = self.filter.step(target, now_ns <= self._base_fresh_until_ns)
            else:
                commanded = self.filter.step(target)
            self._write(commanded, now_ns)
            self._fe_reference = commanded
            if self.activity.disarm_pending and not np.any(self.filter.velocity):
                self.activity.disarm_pending = False
                self.mode = Mode.IDLE
        else:
            # Not commanding: keep the filter on the measured pose so arming never jumps.
            self.filter.reset(reading.position)
            self._fe_reference = None
        return TickResult(reading.position, self.requested.copy(), self.filter.position, self.filter.velocity,
                          self.activity.episode, self.activity.chunk)

    def _read(self, now_ns: int) -> tuple[Reading, bool]:
        """This tick's reading and whether it is fresh (else the last good one, after a failed read)."""
        try:
            reading = self.backend.read()
            if reading.position.shape != (self.emb.dof,) or not np.all(np.isfinite(reading.position)):
                raise BackendError("device returned an unusable reading "
                                   f"(shape {reading.position.shape}, finite: {bool(np.all(np.isfinite(reading.position)))})")
        except BackendError as exc:
            self.counters.read_errors += 1
            self._device_failed(exc, now_ns)
            assert self.last_reading is not None
            return self.last_reading, False
        self._failing_since_ns = None
        self.last_reading = reading
        return reading, True

    def _watch_following(self, measured: np.ndarray, now_ns: int) -> None:
        """Fault when a checked joint stays further than its bound from the target sent last tick
        for longer than the configured time: the device is not obeying, whatever its SDK says."""
        reference = self._fe_reference
        if self.mode not in MOVING_MODES or reference is None:
            self._fe_since_ns[:] = -1  # just armed or reset: nothing was commanded to compare with
            return
        error = np.abs(measured - reference)
        bound = self.fe_bounds + self.fe_lag_s * np.abs(self.filter.velocity)
        over = error > bound
        self._fe_since_ns[~over] = -1
        self._fe_since_ns[over & (self._fe_since_ns < 0)] = now_ns
        late = over & (now_ns - self._fe_since_ns > self.fe_time_ns)
        if not late.any():
            return
        j = int(np.argmax(np.where(late, error, -1.0)))
        held_ms = (now_ns - self._fe_since_ns[j]) * 1e-6
        self._enter_fault(f"following error: joint {self.emb.joint_names[j]} is {error[j]:.3g} from its commanded "
                          f"position (bound {bound[j]:.3g}) for {held_ms:.0f} ms: the device is not obeying")

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
        self.activity.hold_target = None  # decelerate and hold wherever that ends (the base: at zero)
        self.activity.servo_target = None
        self._followed = None
        self._base_fresh_until_ns = -1  # nothing renews the base's last target any more
        if self.mode == Mode.RUNNING:
            self.mode = Mode.ARMED

    def estop(self, reason: str) -> None:
        """Latch the e-stop now (the stop path: no lease, no decoding needed, nothing slow)."""
        if self.mode != Mode.ESTOP:
            self._enter_estop(reason)

    def _enter_estop(self, reason: str) -> None:
        # The latch first: from here on nothing moves the arm, whatever the device call does.
        self.mode = Mode.ESTOP
        self.reason = reason
        self.buffer.clear()
        self.activity = _Activity()
        self._fe_reference = None
        self._followed = None
        self._base_fresh_until_ns = -1  # nothing renews the base's last target any more
        if self.recovering:
            self._device_estop_pending = True  # the recovery owns the device; sent when it returns
        else:
            self._device_estop()
        self._save_latch()

    def _device_estop(self) -> None:
        try:
            self.backend.estop()
        except BackendError as exc:  # keep the latch even if the device did not answer
            self.reason = f"{self.reason}; device estop call failed: {exc}"

    def _save_latch(self) -> None:
        # A small write and a rename, no fsync: the run dir is normally a tmpfs, and the latch must
        # survive a restart of the process, not a reboot (which needs re-arming anyway).
        if self.latch_path is None:
            return
        try:
            write_latch(self.latch_path, self.reason)
        except OSError as exc:
            log.error("cannot save the e-stop latch to %s: %s", self.latch_path, exc)
            self.reason = f"{self.reason}; latch not saved ({exc.strerror})"

    def _enter_fault(self, reason: str) -> None:
        if self.mode in (Mode.ESTOP, Mode.FAULT):
            return  # the e-stop latch outranks a fault; the first cause of a fault is the one to keep
        self.buffer.clear()
        self.activity = _Activity()
        self.mode = Mode.FAULT
        self.reason = reason
        self._fe_reference = None
        self._followed = None
        self._base_fresh_until_ns = -1  # nothing renews the base's last target any more
        try:
            self.backend.on_fault(reason)  # nothing may recover or resend on its own now
        except BackendError as exc:
            self.reason = f"{reason}; stopping the device's SDK failed: {exc}"

    # ------------------------------------------------------------------ commands

    def handle(self, msg: dict[str, Any], now_ns: int, identity: bytes = b"") -> dict[str, Any]:
        """Apply one validated command, slow half included; returns reply data or raises ProtocolError."""
        result = self.start(msg, now_ns, identity)
        if isinstance(result, SlowJob):
            return self.finish(result, result.run(), now_ns, identity)
        return result

    def start(self, msg: dict[str, Any], now_ns: int, identity: bytes = b"") -> dict[str, Any] | SlowJob:
        """Apply one validated command from connection ``identity``: reply data, or a SlowJob
        whose ``run`` must happen outside the lock and whose result goes to ``finish``."""
        handler = getattr(self, f"_cmd_{msg['kind']}", None)
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"a driver does not accept {str(msg['kind'])[:64]!r} commands")
        self._identity = identity
        try:
            return handler(msg, now_ns) or {}
        except ProtocolError:
            self.counters.refused_commands += 1
            raise

    def finish(self, job: SlowJob, result: Any, now_ns: int, identity: bytes = b"") -> dict[str, Any]:
        """Swap a slow job's result in (under the lock)."""
        try:
            return job.finish(result, now_ns, identity)
        except ProtocolError:
            self.counters.refused_commands += 1
            raise

    def _check_lease(self, msg: dict[str, Any], now_ns: int) -> None:
        self.lease.check(msg["lease"], now_ns, self._identity)

    def _cmd_hello(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        check_hello_version(msg["version"])
        return {"version": PROTOCOL_VERSION, "mode": self.mode.value, "description": self.emb.describe()}

    def _cmd_ping(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        return {"mono_ns": now_ns, "mode": self.mode.value, "disarming": self.activity.disarm_pending}

    def _cmd_acquire(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        lease = self.lease.acquire(msg["client"], now_ns, msg.get("ttl_s"), self._identity)
        return {"lease": lease.token, "ttl_s": lease.ttl_ns * 1e-9}

    def _cmd_heartbeat(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self._check_lease(msg, now_ns)
        return {"mode": self.mode.value}

    def _cmd_release(self, msg: dict[str, Any], now_ns: int) -> None:
        self.lease.release(msg["lease"], now_ns, self._identity)
        self._stop_motion()

    def _cmd_arm(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self._check_lease(msg, now_ns)
        if self.mode in MOVING_MODES:
            self.activity.disarm_pending = False  # arming again cancels a disarm still decelerating
            return {"mode": self.mode.value}
        self._require_mode(Mode.IDLE, "arm")
        pose = self.last_reading.position if self.last_reading else None
        lo, hi = self.limits.lower + self.limits.margin, self.limits.upper - self.limits.margin
        # A base's entries are its measured velocity: arming ramps it to zero, whatever it is.
        outside = [] if pose is None else [
            f"{name}={pose[i]:.4g} not in [{lo[i]:.4g}, {hi[i]:.4g}]"
            for i, name in enumerate(self.emb.joint_names) if not self.base[i] and not lo[i] <= pose[i] <= hi[i]]
        if outside:
            raise ProtocolError(ErrorCode.BAD_STATE, "refusing to arm outside the configured range (arming would "
                                f"move the arm): {', '.join(outside)}; move it inside by hand first")
        self.filter.reset(pose)  # hold exactly where the arm is: arming never moves it
        self._fe_reference = None
        self._followed = None
        self._base_fresh_until_ns = -1  # nothing renews the base's last target any more
        self.requested = pose.copy()
        self.activity = _Activity()
        self.mode = Mode.ARMED
        return {"mode": self.mode.value}

    def _cmd_disarm(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self._check_lease(msg, now_ns)
        if self.mode in MOVING_MODES:
            self._stop_motion()
            self.activity.disarm_pending = True  # idle once decelerated to a stop
        return {"mode": self.mode.value}

    def _cmd_estop(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        # Anyone may press the e-stop; no lease needed.
        self.estop(f"estop command: {str(msg.get('reason', 'no reason given'))[:200]}")
        return {"mode": self.mode.value}

    def _cmd_reset_estop(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self._check_lease(msg, now_ns)
        self._require_mode(Mode.ESTOP, "reset_estop")
        if self.recovering:  # the device belongs to the recovery, and gets its e-stop when that returns
            raise ProtocolError(ErrorCode.BAD_STATE, "a clear_fault is still running; reset_estop when it has returned")
        if self.last_reading is not None and self.last_reading.estopped:
            raise ProtocolError(ErrorCode.ESTOPPED, "the device's own e-stop is still engaged; release it first")
        try:
            self.backend.release_estop()
        except BackendError as exc:
            raise ProtocolError(ErrorCode.BAD_STATE, f"the device did not reset: {exc}") from None
        if self.latch_path is not None:
            try:
                self.latch_path.unlink(missing_ok=True)
            except OSError as exc:  # the latch would come back on restart: say so, stay latched
                raise ProtocolError(ErrorCode.BAD_STATE, f"cannot remove the e-stop latch file {self.latch_path}: "
                                                         f"{exc.strerror}") from None
        self.mode, self.reason = Mode.IDLE, ""  # disarmed: the operator arms again explicitly
        return {"mode": self.mode.value}

    def _cmd_clear_fault(self, msg: dict[str, Any], now_ns: int) -> SlowJob:
        self._check_lease(msg, now_ns)
        self._require_mode(Mode.FAULT, "clear_fault")
        if self.recovering:
            raise ProtocolError(ErrorCode.BAD_STATE, "a clear_fault is already in progress")
        self.recovering = True  # from now until finish, the loop leaves the device alone

        def recover() -> Reading:
            self.backend.recover(RECOVER_TIMEOUT_S)
            return self.backend.read()

        return SlowJob("clear_fault", recover, self._finish_recovery)

    def _finish_recovery(self, result: Any, now_ns: int, identity: bytes) -> dict[str, Any]:
        self.recovering = False
        if self._device_estop_pending:
            self._device_estop_pending = False
            self._device_estop()
        if self.mode == Mode.ESTOP:
            raise ProtocolError(ErrorCode.ESTOPPED, f"e-stop during the recovery: {self.reason}")
        if isinstance(result, BackendError):
            raise ProtocolError(ErrorCode.BAD_STATE, f"the device still fails: {str(result)[:500]}")
        if isinstance(result, Exception):
            raise ProtocolError(ErrorCode.BAD_STATE,
                                f"the recovery failed: {type(result).__name__}: {str(result)[:500]}")
        reading: Reading = result
        if reading.fault:
            raise ProtocolError(ErrorCode.BAD_STATE, f"the device still reports: {str(reading.fault)[:500]}")
        if reading.position.shape != (self.emb.dof,) or not np.all(np.isfinite(reading.position)):
            raise ProtocolError(ErrorCode.BAD_STATE, "the device recovered but returned an unusable reading")
        self.last_reading = reading
        self.filter.reset(reading.position)
        self._failing_since_ns = None
        self.mode, self.reason = Mode.IDLE, ""
        return {"mode": self.mode.value}

    def _cmd_move_to(self, msg: dict[str, Any], now_ns: int) -> SlowJob:
        self._check_lease(msg, now_ns)
        self._require_moving("move_to")
        goal = self._check_vector(msg["target"], "target")
        if self.has_base and np.any(goal[self.base] != 0.0):
            moving = [f"{n}={goal[i]:.4g}" for i, n in enumerate(self.emb.joint_names) if self.base[i] and goal[i] != 0.0]
            raise ProtocolError(ErrorCode.BAD_VALUE, "move_to moves the position groups only: the base entries of "
                                f"the target must be 0, got {', '.join(moving)}; drive the base with trajectory or servo")
        self._check_inside(goal)
        fraction = self.emb.move_to_velocity_fraction
        vmax = self.limits.max_velocity * fraction
        if "max_velocity" in msg:
            if not msg["max_velocity"] >= MIN_MOVE_VELOCITY:
                raise ProtocolError(ErrorCode.BAD_VALUE, f"move_to: max_velocity {msg['max_velocity']:.3g} is below "
                                                         f"the slowest accepted, {MIN_MOVE_VELOCITY:g}")
            vmax = np.minimum(vmax, msg["max_velocity"])
        amax = self.limits.max_acceleration * fraction
        start = self.filter.position
        start[self.base] = 0.0  # the base is planned at rest (its target is 0); the filter ramps it there
        duration = move_duration(start, goal, vmax, amax)
        if duration > MAX_MOVE_S:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"move_to would take {duration:.4g} s, longer than the "
                                                     f"{MAX_MOVE_S:.4g} s a move may last: raise max_velocity or move in steps")
        # Slack for the reserve and the ramps below, which lengthen a spread-out move slightly.
        step = self.dt * max(math.ceil(duration / 0.98 / self.dt / (MOVE_MAX_POINTS - 4 * MOVE_RAMP_WAYPOINTS)), 1)
        if step > self.dt:
            # Waypoints further apart than a tick are interpolated by the buffer (cubic), which
            # overshoots a velocity step taken within one or two of them: spread each ramp over at
            # least five waypoints and keep a 2 % reserve, so the requested velocity cap holds.
            amax = np.minimum(amax, vmax / (MOVE_RAMP_WAYPOINTS * step))
            vmax = vmax * 0.98

        def plan() -> np.ndarray:
            return plan_move(start, goal, vmax, amax, step, max_points=MOVE_MAX_POINTS + 2)  # a backstop

        return SlowJob("move_to", plan, lambda points, now, ident: self._finish_move(points, start, step, now, ident))

    def _finish_move(self, points: Any, start: np.ndarray, step: float, now_ns: int, identity: bytes) -> dict[str, Any]:
        if isinstance(points, ValueError):
            raise ProtocolError(ErrorCode.BAD_VALUE, f"move_to: {str(points)[:500]}")
        if isinstance(points, Exception):
            raise points
        # Planned without the lock: check again that it still applies.
        self._require_moving("move_to")
        if not self.lease.renew_after_wait(now_ns, identity):
            raise ProtocolError(ErrorCode.NO_LEASE, "the lease was lost while the move was planned")
        drift = np.where(self.base, 0.0, np.abs(self.filter.position - start))
        worst = int(np.argmax(drift))
        if drift[worst] > self.emb.max_engage_distance:
            raise ProtocolError(ErrorCode.TOO_FAR, f"the arm moved {drift[worst]:.3g} at joint "
                                                   f"{self.emb.joint_names[worst]} while the move was planned; send it again")
        try:
            # plan_move's first point is one tick after the start pose; the anchor re-starts the
            # move from wherever the filter is now (at most a few ticks away).
            self.buffer.add_chunk(now_ns + int(step * 1e9), step, points, "replace", now_ns,
                                  anchor=self.filter.position)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"move_to: {exc}") from None
        self._start_running(final_point=points[-1].copy())
        return {"duration_s": len(points) * step}

    def _cmd_trajectory(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self._check_lease(msg, now_ns)
        self._require_moving("trajectory")
        points = msg["points"].astype(np.float64, copy=False)
        if points.ndim != 2 or points.shape[1] != self.emb.dof or points.shape[0] == 0:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"points must have shape (n>0, {self.emb.dof}), got {points.shape}")
        t0, dt = msg["t0_ns"], float(msg["dt"])
        first = _first_index_at_or_after(t0, dt, len(points), now_ns)
        if first is None:
            raise ProtocolError(ErrorCode.LATE, "every point of the chunk is already in the past "
                                f"(chunk ended {(now_ns - t0) * 1e-6 - (len(points) - 1) * dt * 1e3:.4g} ms ago)")
        self._check_engage(points[first])
        try:
            kept = self.buffer.add_chunk(t0, dt, points, msg.get("merge", "replace"), now_ns,
                                         episode=msg.get("episode"), chunk=msg.get("chunk"),
                                         anchor=self.filter.position)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_VALUE, str(exc)) from None
        self.counters.chunks += 1
        if self.has_base:
            # The chunk's base velocities are fresh until its last point. (A longer chunk merged
            # before may still play after this one ends: the later end is kept.)
            end_ns = t0 + int(round((len(points) - 1) * dt * 1e9))
            self._base_fresh_until_ns = max(self._base_fresh_until_ns, end_ns)
        final_point = None
        if msg.get("final", False):
            final_point = points[-1].copy()
            final_point[self.base] = 0.0  # a finished trajectory stops the base
        self._start_running(final_point=final_point)
        return {"kept": kept, "dropped": len(points) - kept, "driver_ns": now_ns}

    def _cmd_servo(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        self._check_lease(msg, now_ns)
        self._require_moving("servo")
        group = msg.get("group")
        if group is None:
            target = self._check_vector(msg["target"], "target")
            covers_base = True
        else:
            sl = self._slices.get(group)
            if sl is None:
                raise ProtocolError(ErrorCode.BAD_VALUE, f"servo: unknown group {str(group)[:64]!r}; "
                                                         f"this robot has {', '.join(self._slices)}")
            size = sl.stop - sl.start
            if msg["target"].shape != (size,):
                raise ProtocolError(ErrorCode.BAD_SHAPE, f"servo: target for group {group} must have shape "
                                                         f"({size},), got {msg['target'].shape}")
            target = self._current_target()  # the other groups keep theirs
            target[sl] = msg["target"].astype(np.float64)
            covers_base = group in self._base_groups
        self._check_engage(target)
        # Start from the target the filter followed last tick, not from where the filter is: the
        # filter lags its reference while moving, and a servo that restarted the reference there
        # at every command (faster than its interpolation) made it jump back each time; at an
        # irregular 50-100 Hz the filter then rang and drifted past the leader's range.
        start = self._followed if self._followed is not None else self.filter.position
        points = np.stack([start, target])
        self.buffer.add_chunk(now_ns, SERVO_INTERPOLATION_S, points, "replace", now_ns)
        if self.has_base:
            if covers_base:
                self._base_fresh_until_ns = now_ns + int(SERVO_INTERPOLATION_S * 1e9)
            else:  # the base keeps its last target, which no command renews: it goes stale from now
                self._base_fresh_until_ns = min(self._base_fresh_until_ns, now_ns)
        self._start_running(final_point=target, servo=True)
        return {}

    def _current_target(self) -> np.ndarray:
        """What each group is headed for now (a copy), for a servo that changes one group only."""
        if self.activity.servo_target is not None:
            return self.activity.servo_target.copy()
        if self.mode == Mode.RUNNING:
            return self.requested.copy()  # a trajectory's target at this tick
        if self.activity.hold_target is not None:
            return self.activity.hold_target.copy()
        here = self.filter.position  # holding where it stops, the base at rest
        here[self.base] = 0.0
        return here

    def _cmd_stats(self, msg: dict[str, Any], now_ns: int) -> dict[str, Any]:
        return {"counters": self.counters.as_dict(), "clamps": self.filter.counters.as_dict(),
                "mode": self.mode.value, "reason": self.reason, "lease_holder": self.lease.holder or ""}

    # ------------------------------------------------------------------ checks

    def _start_running(self, final_point: np.ndarray | None, servo: bool = False) -> None:
        """Follow the buffer; ``final_point`` is where it ends if this was the last chunk."""
        self.activity.final_received = final_point is not None
        self.activity.final_point = final_point
        self.activity.servo_target = final_point.copy() if servo and final_point is not None else None
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
        bad = [f"{n}={goal[i]:.4g} not in [{lo[i]:.4g}, {hi[i]:.4g}]"
               for i, n in enumerate(self.emb.joint_names) if not self.base[i] and not lo[i] <= goal[i] <= hi[i]]
        if bad:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"target outside the joint limits: {', '.join(bad)}")

    def _check_engage(self, first_target: np.ndarray) -> None:
        """Refuse a stream whose first target is far from where the arm is commanded now (a base's
        velocity is not a place: the filter ramps it, whatever the gap)."""
        gap = np.abs(first_target - self.filter.position)
        if self.has_base:
            gap[self.base] = 0.0
        worst = int(np.argmax(gap))
        if gap[worst] > self.emb.max_engage_distance:
            raise ProtocolError(ErrorCode.TOO_FAR,
                                f"first target is {gap[worst]:.4g} from the current pose at joint "
                                f"{self.emb.joint_names[worst]} (limit {self.emb.max_engage_distance:.4g}); "
                                "use move_to, which ramps")


def _first_index_at_or_after(t0_ns: int, dt: float, n: int, now_ns: int) -> int | None:
    if now_ns <= t0_ns:
        return 0
    index = int(np.ceil((now_ns - t0_ns) / (dt * 1e9) - 1e-9))
    return index if index < n else None
