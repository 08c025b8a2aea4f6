"""A Universal Robots UR3 (CB3 or e-Series) behind the Backend interface, through ur-rtde.

ur-rtde itself runs in a worker process (drivers/ur3/rtde_worker.py says why: it hangs holding the
GIL on a silent peer and can crash on a dropped link). Every call here has a timeout; a worker
that does not answer, or dies, becomes a device error, and the driver faults.

Streaming: one ``servoJ`` per control tick, with ``time`` equal to the tick period, so the robot
interpolates between our (already filtered) targets. The driver loop paces the ticks on absolute
monotonic deadlines; docs/driver-notes.md says why that replaces ur-rtde's initPeriod/waitPeriod.

Safety mapping, read every tick from the RTDE stream:
  * robot or system emergency stop -> ``Reading.estopped`` (the driver latches e-stop),
  * protective/safeguard stop, violation, fault, robot not RUNNING, or our control script no longer
    running on the controller -> ``Reading.fault`` (the driver stops commanding),
  * no new RTDE data for 50 ms, the connection gone, or the worker silent or dead -> a read error,
    which the driver turns into a fault after 0.1 s.
Nothing recovers by itself. ``recover`` (the driver's ``clear_fault``) and ``release_estop``
(``reset_estop``) reconnect if needed, unlock a protective stop through the dashboard and re-upload
the control script, only when the operator asks. Power-on and brake release stay on the pendant.

The RTDE watchdog is armed on the control script: if nothing kicks it (a hung loop, a killed
driver or worker), the controller itself stops the arm.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from drivers.core.backend import Backend, BackendError, Reading
from drivers.ur3.probe import ProbeError, probe_controller
from drivers.ur3.rtde_worker import recv_message, send_message
from runtime.config import EmbodimentConfig, UR3BackendConfig

log = logging.getLogger("armada.ur3")

N_JOINTS = 6
REPO_ROOT = Path(__file__).resolve().parents[2]
# Importing ur-rtde and connecting, after the probe has seen the controller answer. ur-rtde itself
# gives up after 5 s when the uploaded control script does not start (a stopped or local-mode robot).
WORKER_START_S = 8.0
# A live controller answers in milliseconds; the rest of a 5 s start-up budget goes to ur-rtde.
PROBE_TIMEOUT_S = 3.0
CALL_TIMEOUT_S = 0.02  # a read: a few ticks; a slower answer is a device error
MAX_UNANSWERED_SERVOS = 8  # servoJ calls in flight before the worker counts as stuck
STOP_TIMEOUT_S = 0.25  # servoStop + stopScript wait for the script's answers (about 20 ms live)
SCRIPT_RECOVERY_S = 8.0  # unlock, then re-upload (ur-rtde waits up to 5 s for the script)


class UR3Backend(Backend):
    def __init__(self, cfg: UR3BackendConfig, emb: EmbodimentConfig, realtime_priority: int | None = None):
        if emb.dof != N_JOINTS:
            raise ValueError(f"UR3 backend needs 6 dofs (the joints, no gripper), embodiment {emb.name} has {emb.dof}")
        self.cfg = cfg
        self.rate_hz = emb.control_rate_hz
        self.period_s = 1.0 / emb.control_rate_hz
        # servoStop decelerates every joint at one rate: the lowest of the joints' limits.
        self.stop_deceleration = float(np.min(emb.max_acceleration))
        self._worker: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._unanswered_servos: set[int] = set()
        self._servo_error: BackendError | None = None
        self.realtime_priority = realtime_priority

    @property
    def where(self) -> str:
        return f"UR3 at {self.cfg.host}"

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        self.close()
        started = time.monotonic()
        try:
            probe_controller(self.cfg.host, self.cfg.dashboard_port, min(timeout_s, PROBE_TIMEOUT_S))
        except ProbeError as exc:
            raise BackendError(f"{self.where}: {exc}. Is it powered on and reachable, with Remote Control "
                               "enabled on an e-Series pendant?", transient=False) from None
        self._start_worker()
        try:
            reply = self._call("connect", WORKER_START_S, host=self.cfg.host, dashboard_port=self.cfg.dashboard_port,
                               rate_hz=self.rate_hz, watchdog_min_hz=self.cfg.watchdog_min_hz,
                               stop_deceleration=self.stop_deceleration)
        except BackendError as exc:
            self._kill_worker()
            raise BackendError(str(exc), transient=False) from None
        log.info("%s: connected in %.2f s", self.where, time.monotonic() - started)
        if not reply["control"]:
            log.warning("%s: connected while stopped; no control script uploaded until the operator "
                        "recovers", self.where)

    def _start_worker(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        try:
            self._worker = subprocess.Popen([sys.executable, "-m", "drivers.ur3.rtde_worker", str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise BackendError(f"{self.where}: cannot start the ur-rtde worker: {exc}", transient=False) from None
        finally:
            theirs.close()
        self._sock = ours
        self._raise_worker_priority()

    def _raise_worker_priority(self) -> None:
        """The worker is half of every tick: give it the loop's real-time priority when the loop has one."""
        if self.realtime_priority is None:
            return
        try:
            os.sched_setscheduler(self._worker.pid, os.SCHED_FIFO, os.sched_param(self.realtime_priority))
        except OSError as exc:
            log.warning("%s: cannot make the ur-rtde worker real-time (%s): expect more jitter", self.where, exc)

    def close(self) -> None:
        """Stop our script (the arm holds, powered) and disconnect. Never powers the arm off."""
        if self._sock is not None and self._worker is not None and self._worker.poll() is None:
            try:
                self._call("close", STOP_TIMEOUT_S)
            except BackendError as exc:
                # A dead link: ur-rtde would wait forever; the controller's watchdog stops the arm.
                log.warning("%s: closing without a clean stop: %s", self.where, exc)
        self._kill_worker()

    def _kill_worker(self) -> None:
        worker, sock = self._worker, self._sock
        self._worker = self._sock = None
        self._unanswered_servos.clear()
        self._servo_error = None
        if sock is not None:
            sock.close()
        if worker is not None:
            worker.kill()
            worker.wait(timeout=5)

    # ------------------------------------------------------------------ i/o

    def read(self) -> Reading:
        s = self._call("read", CALL_TIMEOUT_S)
        extras = {k: s[k] for k in ("tcp_pose", "safety_mode", "robot_mode", "controller_time_s", "program_running")}
        return Reading(position=np.asarray(s["q"], dtype=np.float64), mono_ns=time.monotonic_ns(),
                       velocity=np.asarray(s["qd"], dtype=np.float64), estopped=bool(s["estopped"]),
                       fault=s["fault"], extras=extras)

    def write(self, position: np.ndarray) -> None:
        """Send one servoJ without waiting: its answer is checked with the next call's.

        One round trip per tick (the read) instead of two keeps the tick well inside 2 ms.
        """
        q = [float(v) for v in position]
        if len(q) != N_JOINTS or not all(np.isfinite(q)):
            raise BackendError(f"{self.where}: servoJ needs 6 finite joint values, got {q!r}", transient=False)
        if len(self._unanswered_servos) >= MAX_UNANSWERED_SERVOS:
            raise BackendError(f"{self.where}: servo: the ur-rtde worker has not answered the last "
                               f"{len(self._unanswered_servos)} servoJ calls")
        self._unanswered_servos.add(self._send("servo", q=q, period_s=self.period_s,
                                               lookahead_s=self.cfg.servo_lookahead_s, gain=self.cfg.servo_gain))

    # ------------------------------------------------------------------ stops and recovery

    def estop(self) -> None:
        """Decelerate and end our script: no motion command runs until the operator resets."""
        try:
            self._call("stop", STOP_TIMEOUT_S)
        except BackendError as exc:
            # Nothing can reach the arm; the worker is gone, so the RTDE watchdog stops it.
            self._kill_worker()
            raise BackendError(f"{self.where}: e-stop could not be sent ({exc}); the controller's RTDE "
                               f"watchdog stops the arm within {1e3 / self.cfg.watchdog_min_hz:.0f} ms",
                               transient=False) from None

    def release_estop(self) -> None:
        self.recover(SCRIPT_RECOVERY_S)

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: reconnect if the link or worker is gone, unlock, restart the script."""
        self._servo_error = None  # a refused servoJ is why we are here, not a reason to reconnect
        if not self._worker_alive() or not self._reads_ok():
            self.connect(timeout_s)
        self._call("recover", max(timeout_s, SCRIPT_RECOVERY_S))

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.poll() is None

    def _reads_ok(self) -> bool:
        try:
            self.read()
            return True
        except BackendError:
            return False

    # ------------------------------------------------------------------ the worker call

    def _send(self, op: str, **args: Any) -> int:
        if self._sock is None or self._worker is None:
            raise BackendError(f"{self.where} is not connected", transient=False)
        call_id = next(self._ids)
        try:
            send_message(self._sock, {"id": call_id, "op": op, **args})
        except OSError as exc:
            raise self._worker_failure(op, f"the ur-rtde worker link failed: {exc}", 0.0, broken=True) from None
        return call_id

    def _call(self, op: str, timeout_s: float, **args: Any) -> dict[str, Any]:
        call_id = self._send(op, **args)
        try:
            reply = self._await_reply(call_id, time.monotonic() + timeout_s)
        except (OSError, ValueError) as exc:
            raise self._worker_failure(op, f"the ur-rtde worker link failed: {exc}", timeout_s, broken=True) from None
        if reply is None:
            raise self._worker_failure(op, "the ur-rtde worker did not answer", timeout_s)
        servo_error, self._servo_error = self._servo_error, None
        if not reply["ok"]:
            raise BackendError(f"{self.where}: {op}: {reply['error']}", transient=bool(reply.get("transient")))
        if servo_error is not None:
            raise servo_error
        return reply

    def _await_reply(self, call_id: int, deadline: float) -> dict[str, Any] | None:
        """The reply to ``call_id``. Answers to earlier servoJ calls are checked on the way; answers
        to calls that already timed out are dropped."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                reply = recv_message(self._sock)
            except TimeoutError:
                return None
            if reply is None:
                raise OSError("the worker closed the link")
            if reply.get("id") == call_id:
                return reply
            if reply.get("id") in self._unanswered_servos:
                self._unanswered_servos.discard(reply["id"])
                if not reply["ok"] and self._servo_error is None:
                    self._servo_error = BackendError(f"{self.where}: servo: {reply['error']}",
                                                     transient=bool(reply.get("transient")))

    def _worker_failure(self, op: str, what: str, timeout_s: float, broken: bool = False) -> BackendError:
        code = self._worker.poll() if self._worker is not None else None
        if broken and code is None and self._worker is not None:
            try:  # the link broke because the worker is exiting: wait a moment to say why
                code = self._worker.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        if code is not None or broken:
            cause = f"it died ({_exit_reason(code)})" if code is not None else "the link is broken"
            self._kill_worker()
            return BackendError(f"{self.where}: {op}: {what}: {cause}", transient=False)
        # Alive but slow: one late answer is a transient error; the driver faults if it persists.
        return BackendError(f"{self.where}: {op}: {what} within {1e3 * timeout_s:.0f} ms", transient=True)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
