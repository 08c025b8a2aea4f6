"""The process that holds ur-rtde for one UR3 driver.

ur-rtde is kept out of the driver process because two of its failures would take the whole driver
(and its e-stop handling) down with it:
  * its constructors and its waiting calls (servoStop, stopScript, ...) block forever on a silent
    peer, holding the GIL, so no other thread of the process runs again;
  * with 1.6.5, a dropped connection makes its reconnect thread crash the process (SIGSEGV),
    reproduced against the loopback fake (tests/hil/test_ur3_driver.py).
Here a hang or a crash only ends this worker. The driver's UR3Backend talks to it over a socket
pair with a timeout on every call, sees the failure, and faults; recovery starts a new worker.

Wire format: 4-byte big-endian length, then a msgpack map. Requests ``{"id", "op", ...}``; replies
``{"id", "ok": true, ...}`` or ``{"id", "ok": false, "error": str, "transient": bool}``.
Nothing but msgpack is ever decoded.

    python -m drivers.ur3.rtde_worker FD      (FD: this end of the socket pair)
"""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
import sys
import time
from typing import Any

import msgpack

STALE_S = 0.05  # no new controller timestamp for this long: the stream has stopped
SCRIPT_START_S = 2.0
REFUSAL_REASON_WAIT_S = 0.01
MAX_MESSAGE = 1 << 16

SAFETY_NORMAL, SAFETY_REDUCED, SAFETY_PROTECTIVE = 1, 2, 3
SAFETY_ESTOPS = {6: "system emergency stop", 7: "robot emergency stop"}
SAFETY_FAULTS = {
    3: "protective stop", 4: "recovery mode (a joint is outside its limits)", 5: "safeguard stop",
    8: "safety violation", 9: "safety fault", 10: "validating joint ids", 11: "undefined safety mode",
    12: "automatic mode safeguard stop", 13: "three-position enabling stop",
}
ROBOT_RUNNING = 7
ROBOT_MODES = {-1: "NO_CONTROLLER", 0: "DISCONNECTED", 1: "CONFIRM_SAFETY", 2: "BOOTING", 3: "POWER_OFF",
               4: "POWER_ON", 5: "IDLE", 6: "BACKDRIVE", 7: "RUNNING", 8: "UPDATING_FIRMWARE"}
PROGRAM_RUNNING_BIT = 0b10  # robot_status_bits


class WorkerError(Exception):
    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def describe_fault(safety: int, robot_mode: int, program_running: bool, have_control: bool) -> str | None:
    """Why the arm cannot be commanded now, or None. E-stops are reported separately."""
    if safety in SAFETY_ESTOPS:
        return None
    if safety in SAFETY_FAULTS:
        return f"{SAFETY_FAULTS[safety]} on the controller"
    if robot_mode != ROBOT_RUNNING:
        return f"robot mode is {ROBOT_MODES.get(robot_mode, robot_mode)}, not RUNNING (power on, brakes?)"
    if not have_control or not program_running:
        return ("our control script is not running on the controller (stopped on the pendant, by another "
                "client, or by the RTDE watchdog)")
    return None


class RtdeSession:
    """ur-rtde's three interfaces for one controller, and what the backend asks of them."""

    def __init__(self, host: str, dashboard_port: int, rate_hz: float, watchdog_min_hz: float,
                 stop_deceleration: float):
        import dashboard_client
        import rtde_control
        import rtde_receive

        self._sdk = (rtde_receive, rtde_control, dashboard_client)
        self.host, self.dashboard_port = host, dashboard_port
        self.rate_hz, self.watchdog_min_hz = rate_hz, watchdog_min_hz
        self.stop_deceleration = stop_deceleration  # rad/s^2, within every joint's limit
        self.receive = None
        self.control = None
        self.last_stamp, self.last_stamp_mono = -1.0, 0.0

    def connect(self) -> dict[str, Any]:
        try:
            self.receive = self._sdk[0].RTDEReceiveInterface(self.host, self.rate_hz)
        except RuntimeError as exc:
            raise WorkerError(f"RTDE receive failed: {exc}") from None
        self._wait(lambda: self.receive.getTimestamp() > 0.0, 2.0, "the first RTDE data")
        r = self.receive
        if r.getSafetyMode() in (SAFETY_NORMAL, SAFETY_REDUCED) and r.getRobotMode() == ROBOT_RUNNING:
            self._start_control()
        return {"control": self.control is not None}

    def _start_control(self) -> None:
        try:
            # Uploads the control script; ur-rtde gives up after 5 s if it does not start.
            self.control = self._sdk[1].RTDEControlInterface(self.host, self.rate_hz)
            self.control.setWatchdog(self.watchdog_min_hz)
        except RuntimeError as exc:
            self.control = None
            raise WorkerError(f"the control script did not start: {exc}") from None

    def read(self) -> dict[str, Any]:
        r = self.receive
        if r is None:
            raise WorkerError("not connected")
        if not r.isConnected():
            raise WorkerError("the RTDE connection was lost", transient=True)
        now = time.monotonic()
        stamp = r.getTimestamp()
        if stamp != self.last_stamp:
            self.last_stamp, self.last_stamp_mono = stamp, now
        elif now - self.last_stamp_mono > STALE_S:
            raise WorkerError(f"no new RTDE data for {(now - self.last_stamp_mono) * 1e3:.0f} ms", transient=True)
        safety, robot_mode = r.getSafetyMode(), r.getRobotMode()
        running = bool(r.getRobotStatus() & PROGRAM_RUNNING_BIT)
        if self.control is not None and running:
            self.control.kickWatchdog()
        return {"q": r.getActualQ(), "qd": r.getActualQd(), "tcp_pose": r.getActualTCPPose(),
                "safety_mode": safety, "robot_mode": robot_mode, "controller_time_s": stamp,
                "program_running": running, "estopped": safety in SAFETY_ESTOPS,
                "fault": describe_fault(safety, robot_mode, running, self.control is not None)}

    def servo(self, q: list[float], period_s: float, lookahead_s: float, gain: float) -> dict[str, Any]:
        if self.control is None:
            raise WorkerError("no control script is running (clear_fault restarts it)")
        # speed and acceleration are unused by servoJ; time is one tick so targets are interpolated.
        if not self.control.servoJ(q, 0.5, 0.5, period_s, lookahead_s, gain):
            raise WorkerError(f"servoJ refused: {self._why_refused()}")
        return {}

    def _why_refused(self) -> str:
        """The controller's reason, once the receive stream has caught up with the stop (a few ms)."""
        r = self.receive
        deadline = time.monotonic() + REFUSAL_REASON_WAIT_S
        while True:
            safety, mode = r.getSafetyMode(), r.getRobotMode()
            if safety in SAFETY_ESTOPS:
                return SAFETY_ESTOPS[safety]
            reason = describe_fault(safety, mode, bool(r.getRobotStatus() & PROGRAM_RUNNING_BIT), True)
            if reason is not None or time.monotonic() > deadline:
                return reason or "the control script is not running"
            time.sleep(0.001)

    def stop(self) -> dict[str, Any]:
        """Decelerate, then end our script: nothing moves until the operator recovers."""
        if self.control is not None:
            self.control.servoStop(self.stop_deceleration)
            self.control.stopScript()
        return {}

    def recover(self) -> dict[str, Any]:
        r = self.receive
        if r is None or not r.isConnected():
            raise WorkerError("not connected")
        safety = r.getSafetyMode()
        if safety in SAFETY_ESTOPS:
            raise WorkerError(f"{SAFETY_ESTOPS[safety]} is still engaged: release it on the robot first")
        if safety == SAFETY_PROTECTIVE:
            self._unlock_protective_stop()
        elif safety not in (SAFETY_NORMAL, SAFETY_REDUCED):
            raise WorkerError(f"{SAFETY_FAULTS.get(safety, safety)}: resolve it on the pendant first")
        if r.getRobotMode() != ROBOT_RUNNING:
            raise WorkerError(f"robot mode is {ROBOT_MODES.get(r.getRobotMode())}: power on and release the "
                              "brakes on the pendant first")
        self._restart_script()
        return {}

    def _unlock_protective_stop(self) -> None:
        dash = self._sdk[2].DashboardClient(self.host, self.dashboard_port)
        try:
            dash.connect(2000)
            dash.closeSafetyPopup()
            dash.unlockProtectiveStop()
        except RuntimeError as exc:  # e.g. "Cannot unlock protective stop until 5s after occurrence"
            raise WorkerError(f"the controller refused to unlock: {exc}") from None
        finally:
            dash.disconnect()
        self._wait(lambda: self.receive.getSafetyMode() in (SAFETY_NORMAL, SAFETY_REDUCED), 2.0,
                   "the protective stop to clear after unlocking")

    def _restart_script(self) -> None:
        if self.control is None:
            self._start_control()
            return
        if not self.control.reuploadScript():
            raise WorkerError("re-uploading the control script failed")
        self._wait(lambda: bool(self.receive.getRobotStatus() & PROGRAM_RUNNING_BIT), SCRIPT_START_S,
                   "the control script to start")
        self.control.setWatchdog(self.watchdog_min_hz)

    def close(self) -> dict[str, Any]:
        """Stop our script: the arm holds, powered. Never powers the arm off.

        ur-rtde's disconnect() calls take 0.5 s each; the backend kills this worker instead, which
        closes the connections just as well.
        """
        return self.stop()

    def _wait(self, done, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise WorkerError(f"timed out after {timeout_s:.1f} s waiting for {what}")
            time.sleep(0.005)


# ---------------------------------------------------------------------- framing (both sides)


def send_message(sock: socket.socket, msg: dict[str, Any]) -> None:
    body = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """One message, or None when the peer closed. Uses the socket's own timeout."""
    header = _recv_exact(sock, 4)
    if header is None:
        return None
    (size,) = struct.unpack(">I", header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes exceeds {MAX_MESSAGE}")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    msg = msgpack.unpackb(body, raw=False)
    if not isinstance(msg, dict):
        raise ValueError(f"expected a map, got {type(msg).__name__}")
    return msg


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# ---------------------------------------------------------------------- the worker's loop


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the driver process dies, even while ur-rtde blocks."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _dispatch(session: RtdeSession | None, msg: dict[str, Any]) -> tuple[RtdeSession | None, dict[str, Any]]:
    op = msg.get("op")
    if op == "connect":
        session = RtdeSession(msg["host"], msg["dashboard_port"], msg["rate_hz"], msg["watchdog_min_hz"],
                              msg["stop_deceleration"])
        return session, session.connect()
    if session is None:
        raise WorkerError(f"{op!r} before connect")
    if op == "read":
        return session, session.read()
    if op == "servo":
        return session, session.servo(msg["q"], msg["period_s"], msg["lookahead_s"], msg["gain"])
    if op in ("stop", "recover", "close"):
        return session, getattr(session, op)()
    raise WorkerError(f"unknown op {op!r}")


def serve(sock: socket.socket) -> int:
    session: RtdeSession | None = None
    while True:
        try:
            msg = recv_message(sock)
        except (OSError, ValueError):
            break
        if msg is None:
            break  # the driver closed its end: disconnect and go
        reply: dict[str, Any] = {"id": msg.get("id", 0), "ok": True}
        try:
            session, data = _dispatch(session, msg)
            reply.update(data)
        except WorkerError as exc:
            reply.update(ok=False, error=str(exc), transient=exc.transient)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            reply.update(ok=False, error=f"{type(exc).__name__}: {exc}", transient=False)
        try:
            send_message(sock, reply)
        except OSError:
            break  # the driver is gone or has given up on us
        if msg.get("op") == "close":
            break
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    sock = socket.socket(fileno=int(args[0]))
    try:
        return serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
