"""The ARX Lift 2's devices as Backends: each arm with its gripper (``ArmPart``, 7 values) and the
lift with the base (``BodyPart``, 4 values: height m, then vx m/s, vy m/s, wz rad/s). The robot is
their composite (drivers/arx_lift2/backend.py); the vendor calls are behind the adapters.

Both run in the driver process, not in worker processes (drivers/core/isolated.py): a worker is
SIGKILLed when the driver faults, and here that would end arx5-sdk's 500 Hz thread (the arm's
gravity compensation and hold) and the body's loop, leaving the chassis with whatever velocity it
had last. On a fault or an e-stop these parts stop and hold instead: the arms keep their last
target (the SDK keeps sending it), the lift keeps its height setpoint, and the base ramps to zero
velocity in the body's own 200 Hz thread, at the embodiment's deceleration limit.

Staleness. Neither SDK says whether a device answered (adapter.py), so a part whose feedback has
not changed at all for ``frozen_s`` reports a (transient) read error; the driver faults when it
lasts past its read-failure bound. The body's thread also watches the driver: no write for
``watchdog_s`` (a hung loop) and it ramps the base to zero on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from armada.drivers.arx_lift2.adapter import (ARM_JOINTS, AdapterError, ArmAdapter, BodyAdapter, MecanumGeometry)
from armada.drivers.core.backend import Backend, BackendError, Reading

log = logging.getLogger("armada.arx_lift2")

ARM_DOF = ARM_JOINTS + 1
BODY_DOF = 4  # lift height, vx, vy, wz
BODY_PERIOD_S = 0.005  # LIFT-mini's loop, 200 Hz
LIFT_RANGE = (0.0, 0.38)  # what set_height accepts (LIFT-mini readme), m
POLL_S = 0.005
# The body's own rate limit on the base setpoint, as a multiple of the embodiment's acceleration
# limit: loose enough to be transparent behind the driver's filter, tight enough that nothing it
# sends ever steps (after a watchdog stop, a late driver tick).
BASE_SLEW_FACTOR = 2.0


class FrozenWatch:
    """How long a device's feedback has not changed at all (s); 0 while it changes."""

    def __init__(self) -> None:
        self._last: bytes | None = None
        self._since: float | None = None

    def age(self, *values: Any, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        key = b"".join(np.asarray(v, dtype=np.float64).tobytes() for v in values)
        if key != self._last or self._since is None:
            self._last, self._since = key, now
            return 0.0
        return now - self._since

    def reset(self) -> None:
        self._last = self._since = None


def _adapter_call(call: Callable[[], Any], transient: bool = False) -> Any:
    try:
        return call()
    except AdapterError as exc:
        raise BackendError(str(exc), transient=transient) from None


def _wait_for_live_feedback(read: Callable[[], Any], values: Callable[[Any], tuple], timeout_s: float, what: str) -> Any:
    """The first sample after the feedback has changed once (a live device), else a clear error."""
    deadline = time.monotonic() + timeout_s
    first = read()
    while True:
        time.sleep(POLL_S)
        sample = read()
        if any(not np.array_equal(a, b) for a, b in zip(values(first), values(sample))):
            return sample
        if time.monotonic() > deadline:
            raise BackendError(f"no live feedback within {timeout_s:.1f} s ({what})", transient=False)


class ArmPart(Backend):
    """One ARX arm and its gripper: six joints (rad), then the gripper opening (m)."""

    def __init__(self, adapter: ArmAdapter, label: str, frozen_s: float = 0.1):
        self.adapter, self.label, self.frozen_s = adapter, label, frozen_s
        self.frozen = FrozenWatch()
        self.holding = False  # position gains on (so damping now means the SDK's emergency state)
        self.stopped: str | None = None  # why writes are refused (e-stop, fault) until released

    @staticmethod
    def _values(s) -> tuple:
        return (s.pos, s.vel, s.torque, s.gripper_pos, s.gripper_torque)

    def connect(self, timeout_s: float) -> None:
        _adapter_call(self.adapter.open)
        sample = _wait_for_live_feedback(lambda: _adapter_call(self.adapter.read),
                                         self._values, timeout_s, "arm powered? e-stop released? CAN up?")
        # arx5-sdk starts in damping at the measured pose: command exactly there, then position gains.
        _adapter_call(lambda: self.adapter.command(sample.pos, sample.gripper_pos))
        _adapter_call(self.adapter.hold)
        self.holding, self.stopped = True, None
        self.frozen.reset()

    def read(self) -> Reading:
        s = _adapter_call(self.adapter.read, transient=True)
        mono = time.monotonic_ns()
        age = self.frozen.age(*self._values(s))
        if age > self.frozen_s:
            raise BackendError(f"feedback has not changed for {age * 1e3:.0f} ms (CAN silent, or the "
                               "arm unpowered: e-stop?)")
        fault = None
        if self.holding and s.damping:
            fault = ("arx5-sdk dropped to damping (its emergency state: over-current or an impossible "
                     "reading, see its log); it leaves it only in a new process: support the arm, restart the driver")
        return Reading(position=np.append(s.pos, s.gripper_pos), mono_ns=mono, velocity=np.append(s.vel, s.gripper_vel),
                       fault=fault, extras={"damping": bool(s.damping), "sdk_time_s": float(s.timestamp),
                                            "torque": [float(v) for v in s.torque]})

    def write(self, position: np.ndarray) -> None:
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (ARM_DOF,) or not np.all(np.isfinite(p)):
            raise BackendError(f"write needs {ARM_DOF} finite values, got {p!r}", transient=False)
        if self.stopped is not None:
            raise BackendError(f"not commanding after {self.stopped}", transient=False)
        _adapter_call(lambda: self.adapter.command(p[:ARM_JOINTS], float(p[ARM_JOINTS])))

    def _hold_here(self) -> None:
        s = _adapter_call(self.adapter.read)
        _adapter_call(lambda: self.adapter.command(s.pos, s.gripper_pos))

    def estop(self) -> None:
        """Hold where the arm is now (the SDK keeps position gains and gravity compensation on)."""
        self.stopped = "an e-stop"
        self._hold_here()

    def release_estop(self) -> None:
        self._hold_here()
        self.stopped = None

    def on_fault(self, reason: str) -> None:
        """No call to the SDK: its thread keeps sending our last target, so the arm holds there."""
        self.stopped = f"a fault ({reason})"

    def recover(self, timeout_s: float) -> None:
        s = _wait_for_live_feedback(lambda: _adapter_call(self.adapter.read),
                                    self._values, timeout_s, "arm powered? e-stop released? CAN up?")
        if s.damping:
            raise BackendError("arx5-sdk is in damping (its emergency state), which only a new process "
                               "leaves: support the arm and restart the driver", transient=False)
        self._hold_here()
        self.frozen.reset()
        self.stopped = None

    def close(self) -> None:
        """The SDK keeps holding the last target (adapter notes); nothing here cuts torque."""
        self.adapter.close()


class BodyPart(Backend):
    """The lift (height, m) and the base (vx, vy in m/s, wz in rad/s) over one LIFT-mini interface.

    A thread of ours calls the SDK's ``loop()`` at 200 Hz with the latest setpoints: the lift's
    height and the base velocity, rate-limited, ramped to zero on a stop, an e-stop, a fault, a
    close, or when the driver has not written for ``watchdog_s``."""

    def __init__(self, adapter: BodyAdapter, geometry: MecanumGeometry, label: str, lower: np.ndarray,
                 upper: np.ndarray, base_decel: np.ndarray, frozen_s: float = 0.1, watchdog_s: float = 0.1):
        self.adapter, self.geometry, self.label = adapter, geometry, label
        self.lower, self.upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
        if self.lower.shape != (BODY_DOF,) or self.upper.shape != (BODY_DOF,):
            raise ValueError(f"{label}: limits need {BODY_DOF} values (lift, vx, vy, wz)")
        self.base_decel = np.asarray(base_decel, dtype=np.float64)
        self.frozen_s, self.watchdog_s = frozen_s, watchdog_s
        self.frozen = FrozenWatch()
        self.lock = threading.Lock()  # one caller of the SDK at a time: the driver's thread or ours
        self.height_target: float | None = None  # None until measured: never command the lift blind
        self.base_target = np.zeros(3)
        self.base_sent = np.zeros(3)
        self.last_write = time.monotonic()
        self.stopped: str | None = None
        self.ramp_down = False  # the base goes to zero whatever is written (stop, close)
        self.watchdog_trips = 0
        self.spin_error: str | None = None
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()

    # -- the body's own loop

    def _cycle(self) -> None:
        now = time.monotonic()
        stale = now - self.last_write > self.watchdog_s
        if stale and np.any(self.base_target):
            self.watchdog_trips += 1
            log.warning("%s: no write for %.0f ms: ramping the base to zero", self.label, (now - self.last_write) * 1e3)
            self.base_target = np.zeros(3)
        stopping = self.ramp_down or self.stopped is not None or stale
        goal = np.zeros(3) if stopping else self.base_target
        rate = self.base_decel * (1.0 if stopping else BASE_SLEW_FACTOR) * BODY_PERIOD_S
        sent = self.base_sent + np.clip(goal - self.base_sent, -rate, rate)
        self.adapter.set_chassis(*sent)
        self.base_sent = sent
        if self.height_target is not None:
            self.adapter.set_height(float(np.clip(self.height_target, *LIFT_RANGE)))
        self.adapter.spin()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._quit.is_set():
            with self.lock:
                try:
                    self._cycle()
                except Exception as exc:  # noqa: BLE001 (an SDK error: reported by the next read, loop goes on)
                    if self.spin_error is None:
                        self.spin_error = f"{type(exc).__name__}: {exc}"
                        log.error("%s: loop() failed: %s", self.label, self.spin_error)
            next_t += BODY_PERIOD_S
            delay = next_t - time.monotonic()
            if delay < -0.05:  # far behind (a stalled host): start again from now, do not burst
                next_t = time.monotonic()
            self._quit.wait(max(delay, 0.0))

    def _start_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._quit.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.label} loop", daemon=True)
        self._thread.start()

    # -- Backend

    def _sample(self, transient: bool = True):
        with self.lock:
            return _adapter_call(self.adapter.read, transient=transient)

    def connect(self, timeout_s: float) -> None:
        _adapter_call(self.adapter.open)
        self.height_target, self.base_target, self.base_sent = None, np.zeros(3), np.zeros(3)
        self.stopped, self.ramp_down, self.spin_error = None, False, None
        self.last_write = time.monotonic()
        self._start_thread()  # ARX's order: loop() first, then read the height, then set it
        try:
            sample = _wait_for_live_feedback(lambda: self._sample(False), lambda s: (s.accel, s.wheel_vel),
                                             timeout_s, "body powered? e-stop released? CAN up?")
        except BackendError:
            self._stop_thread()
            raise
        with self.lock:
            self.height_target = sample.height
        self.frozen.reset()

    def read(self) -> Reading:
        if self.spin_error is not None:
            raise BackendError(f"loop() failed: {self.spin_error}", transient=False)
        s = self._sample()
        mono = time.monotonic_ns()
        age = self.frozen.age(s.accel, s.wheel_vel)
        if age > self.frozen_s:
            raise BackendError(f"feedback has not changed for {age * 1e3:.0f} ms (CAN silent, or the body "
                               "unpowered: e-stop?)")
        position = np.concatenate([[s.height], self.geometry.body_velocity(s.wheel_vel)])
        return Reading(position=position, mono_ns=mono, extras={
            "height_setpoint": self.height_target, "base_sent": [float(v) for v in self.base_sent],
            "wheel_vel": [float(v) for v in s.wheel_vel], "watchdog_trips": self.watchdog_trips})

    def write(self, position: np.ndarray) -> None:
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (BODY_DOF,) or not np.all(np.isfinite(p)):
            raise BackendError(f"write needs {BODY_DOF} finite values, got {p!r}", transient=False)
        bad = (p < self.lower - 1e-9) | (p > self.upper + 1e-9)
        if bad.any():
            raise BackendError(f"write outside the limits: {p[bad].tolist()} (lift, vx, vy, wz within "
                               f"{self.lower.tolist()} .. {self.upper.tolist()})", transient=False)
        if self.stopped is not None:
            raise BackendError(f"not commanding after {self.stopped}", transient=False)
        with self.lock:
            self.height_target = float(p[0])
            self.base_target = p[1:].copy()
            self.last_write = time.monotonic()

    def _stop(self, why: str) -> None:
        """The base ramps to zero (our thread), the lift keeps its setpoint."""
        self.stopped = why
        with self.lock:
            self.base_target = np.zeros(3)

    def estop(self) -> None:
        self._stop("an e-stop")

    def release_estop(self) -> None:
        with self.lock:
            self.height_target = float(_adapter_call(self.adapter.read).height)
            self.base_target = np.zeros(3)
            self.last_write = time.monotonic()
        self.stopped = None

    def on_fault(self, reason: str) -> None:
        self._stop(f"a fault ({reason})")

    def recover(self, timeout_s: float) -> None:
        if self.spin_error is not None or self._thread is None or not self._thread.is_alive():
            self.connect(timeout_s)
            return
        s = _wait_for_live_feedback(lambda: self._sample(False), lambda s: (s.accel, s.wheel_vel),
                                    timeout_s, "body powered? e-stop released? CAN up?")
        with self.lock:
            self.height_target = s.height
            self.base_target = np.zeros(3)
            self.last_write = time.monotonic()
        self.frozen.reset()
        self.stopped = None

    def _stop_thread(self) -> None:
        self._quit.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self._thread = None

    def close(self, ramp_timeout_s: float = 2.0) -> None:
        """The base ramps to zero first (bounded wait); the lift keeps its setpoint in the device."""
        self.ramp_down = True
        deadline = time.monotonic() + ramp_timeout_s
        while (self._thread is not None and self._thread.is_alive() and np.any(self.base_sent)
               and time.monotonic() < deadline):
            time.sleep(POLL_S)
        self._stop_thread()
        self.ramp_down = False
        self.adapter.close()
