"""A UR3 through ur-rtde, in the calling process. The driver runs it in a worker process
(drivers/ur3/backend.py, drivers/core/isolated.py say why); it is a plain Backend so that it can be
used and tested directly too.

Connecting probes the controller with plain sockets first (drivers/ur3/probe.py), so a missing or
silent controller fails with a clear message within the probe's deadline instead of hanging in
ur-rtde's constructors.

The RTDE watchdog and servoJ share one register. ur-rtde's control script reads its command register
(input_int_register_0) once per controller cycle and takes a new servo target only when it finds
servoJ (11) there; kickWatchdog writes "no command" (0) into that same register. A kick sent in the
same tick as a servoJ can be the value a cycle sees, and that cycle gets no new target: the next
one jumps to catch up. The watchdog itself watches that register for updates, which every servoJ
package is. So the watchdog is kicked only in ticks that send no servoJ (disarmed, holding).

ur-rtde 1.6.5 asks for TCP_NODELAY on its RTDE socket before ``boost::asio::connect``, which closes
and reopens the socket, so the option is lost (observed: getsockopt says 0 on every ur-rtde socket).
With Nagle on, a servoJ waits for the previous package's ACK and is merged with the next one: the
script sees only the later. ``_set_nodelay`` sets it on the connected sockets after construction.

A dropped link must not recover by itself. ur-rtde's receive thread reconnects the moment its RTDE
socket fails: it stops the running script, uploads a new one (without our watchdog) and resends the
servoJ that was in progress, all before the driver has seen 0.1 s of failed reads. In the worker
(``exit_on_link_loss``) a thread therefore waits on the RTDE sockets and ends the process the moment
the controller closes one: one syscall against ur-rtde's dozen round trips. A link that goes silent
instead (a pulled cable) gives ur-rtde nothing to reconnect to; the driver faults on stale data and
ends the worker (``IsolatedBackend.on_fault``) before the link can come back.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.core.isolated import WORKER_EXIT_LINK_LOST
from armada.drivers.ur3.probe import ProbeError, probe_controller

log = logging.getLogger("armada.ur3")

STALE_S = 0.05  # no new controller timestamp for this long: the stream has stopped
SCRIPT_START_S = 2.0
REFUSAL_REASON_WAIT_S = 0.01
PROBE_TIMEOUT_S = 3.0  # a live controller answers in milliseconds; the rest goes to ur-rtde
RTDE_PORT = 30004  # ur-rtde hard-codes it
LINK_WATCH_RESCAN_S = 0.1  # how often the link watcher looks for new RTDE sockets (a restarted script)

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


class UR3RtdeBackend(Backend):
    """ur-rtde's three interfaces for one controller, behind the Backend interface."""

    def __init__(self, host: str, dashboard_port: int, rate_hz: float, watchdog_min_hz: float,
                 stop_deceleration: float, lookahead_s: float, gain: float, exit_on_link_loss: bool = False):
        self.host, self.dashboard_port = host, dashboard_port
        self.rate_hz, self.period_s = rate_hz, 1.0 / rate_hz
        self.watchdog_min_hz = watchdog_min_hz
        self.stop_deceleration = stop_deceleration  # rad/s^2, within every joint's limit
        self.lookahead_s, self.gain = lookahead_s, gain
        self._sdk = None
        self.receive = None
        self.control = None
        self.last_stamp, self.last_stamp_mono = -1.0, 0.0
        self._servoj_since_read = False  # a servoJ went out after the last read: it kicked the watchdog
        self.nodelay_set = 0  # RTDE sockets we had to set TCP_NODELAY on (ur-rtde's own setting is lost)
        self.exit_on_link_loss = exit_on_link_loss  # only in a worker process: it ends the process
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"UR3 at {self.host}"

    def connect(self, timeout_s: float) -> None:
        try:
            probe_controller(self.host, self.dashboard_port, min(timeout_s, PROBE_TIMEOUT_S))
        except ProbeError as exc:
            raise BackendError(f"{exc}. Is it powered on and reachable, with Remote Control "
                               "enabled on an e-Series pendant?", transient=False) from None
        self._sdk = _import_sdk()
        try:
            self.receive = self._sdk[0].RTDEReceiveInterface(self.host, self.rate_hz)
        except RuntimeError as exc:
            raise BackendError(f"RTDE receive failed: {exc}", transient=False) from None
        self._wait(lambda: self.receive.getTimestamp() > 0.0, 2.0, "the first RTDE data")
        self._set_nodelay()
        self._start_link_watch()
        r = self.receive
        if r.getSafetyMode() in (SAFETY_NORMAL, SAFETY_REDUCED) and r.getRobotMode() == ROBOT_RUNNING:
            self._start_control()
        else:  # connected, but stopped: read() says why; the operator recovers explicitly
            log.warning("%s: connected while stopped; no control script until the operator recovers", self.where)

    def _start_control(self) -> None:
        try:
            # Uploads the control script; ur-rtde gives up after 5 s if it does not start.
            self.control = self._sdk[1].RTDEControlInterface(self.host, self.rate_hz)
            self.control.setWatchdog(self.watchdog_min_hz)
        except RuntimeError as exc:
            self.control = None
            raise BackendError(f"the control script did not start: {exc}", transient=False) from None
        self._set_nodelay()

    def _set_nodelay(self) -> None:
        """TCP_NODELAY on every socket of this process connected to our controller's RTDE port."""
        for sock in _rtde_sockets(self.host):
            with sock:  # a duplicate: the option belongs to the socket they share
                if not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.nodelay_set += 1

    def _start_link_watch(self) -> None:
        if not self.exit_on_link_loss or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch_link, name="ur3-link-watch", daemon=True)
        self._watcher.start()

    def _watch_link(self) -> None:
        """End the worker the moment the controller closes an RTDE connection (see module notes)."""
        watched: dict[int, socket.socket] = {}
        poller = select.poll()
        events = select.POLLRDHUP | select.POLLHUP | select.POLLERR
        next_scan = 0.0
        while not self._watch_stop.is_set():
            if time.monotonic() >= next_scan:  # ur-rtde opens new sockets when a script is restarted
                for sock in _rtde_sockets(self.host):
                    if any(_same_socket(sock, w) for w in watched.values()):
                        sock.close()
                        continue
                    watched[sock.fileno()] = sock
                    poller.register(sock.fileno(), events)
                next_scan = time.monotonic() + LINK_WATCH_RESCAN_S
            for fd, _ in poller.poll(1e3 * LINK_WATCH_RESCAN_S):
                if self._watch_stop.is_set():
                    return
                log.error("%s: the controller closed an RTDE connection: ending the worker before ur-rtde "
                          "reconnects and restarts its script by itself", self.where)
                os._exit(WORKER_EXIT_LINK_LOST)  # no clean-up: nothing else may reach the controller

    def read(self) -> Reading:
        r = self.receive
        if r is None:
            raise BackendError("not connected", transient=False)
        if not r.isConnected():
            raise BackendError("the RTDE connection was lost")
        now = time.monotonic()
        stamp = r.getTimestamp()
        if stamp != self.last_stamp:
            self.last_stamp, self.last_stamp_mono = stamp, now
        elif now - self.last_stamp_mono > STALE_S:
            raise BackendError(f"no new RTDE data for {(now - self.last_stamp_mono) * 1e3:.0f} ms")
        safety, robot_mode = r.getSafetyMode(), r.getRobotMode()
        running = bool(r.getRobotStatus() & PROGRAM_RUNNING_BIT)
        if self.control is not None and running and not self._servoj_since_read:
            self.control.kickWatchdog()  # no servoJ last tick; while streaming, servoJ refreshes it
        self._servoj_since_read = False
        extras = {"tcp_pose": r.getActualTCPPose(), "safety_mode": safety, "robot_mode": robot_mode,
                  "controller_time_s": stamp, "program_running": running}
        return Reading(position=np.asarray(r.getActualQ(), dtype=np.float64), mono_ns=time.monotonic_ns(),
                       velocity=np.asarray(r.getActualQd(), dtype=np.float64), estopped=safety in SAFETY_ESTOPS,
                       fault=describe_fault(safety, robot_mode, running, self.control is not None), extras=extras)

    def write(self, position: np.ndarray) -> None:
        if self.control is None:
            raise BackendError("no control script is running (clear_fault restarts it)",
                               transient=False)
        q = [float(v) for v in position]
        if len(q) != 6 or not all(np.isfinite(q)):
            raise BackendError(f"servoJ needs 6 finite joint values, got {q!r}", transient=False)
        # speed and acceleration are unused by servoJ; time is one tick so targets are interpolated.
        if not self.control.servoJ(q, 0.5, 0.5, self.period_s, self.lookahead_s, self.gain):
            reason = self._why_refused()
            if reason in SAFETY_ESTOPS.values():
                # Not an error of ours: the reading that follows reports the e-stop and the driver
                # latches it. An error here would reach the driver in place of that reading (the
                # worker reports a write's outcome with the next call), fault it, and end this worker.
                log.warning("%s: servoJ refused: %s", self.where, reason)
                return
            raise BackendError(f"servoJ refused: {reason}", transient=False)
        self._servoj_since_read = True

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

    def estop(self) -> None:
        """Decelerate, then end our script: nothing moves until the operator resets."""
        if self.control is not None:
            self.control.servoStop(self.stop_deceleration)
            self.control.stopScript()

    def release_estop(self) -> None:
        self.recover(SCRIPT_START_S)

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: unlock a protective stop, restart the control script."""
        r = self.receive
        if r is None or not r.isConnected():
            self.connect(timeout_s)
            r = self.receive
        safety = r.getSafetyMode()
        if safety in SAFETY_ESTOPS:
            raise BackendError(f"{SAFETY_ESTOPS[safety]} is still engaged: release it on the robot first",
                               transient=False)
        if safety == SAFETY_PROTECTIVE:
            self._unlock_protective_stop()
        elif safety not in (SAFETY_NORMAL, SAFETY_REDUCED):
            raise BackendError(f"{SAFETY_FAULTS.get(safety, safety)}: resolve it on the pendant first", transient=False)
        if r.getRobotMode() != ROBOT_RUNNING:
            raise BackendError(f"robot mode is {ROBOT_MODES.get(r.getRobotMode())}: power on and release the "
                               "brakes on the pendant first", transient=False)
        if self.control is not None and r.getRobotStatus() & PROGRAM_RUNNING_BIT:
            return  # running: a new worker's connect has just started it, with its watchdog
        self._restart_script()

    def _unlock_protective_stop(self) -> None:
        dash = self._sdk[2].DashboardClient(self.host, self.dashboard_port)
        try:
            dash.connect(2000)
            dash.closeSafetyPopup()
            dash.unlockProtectiveStop()
        except RuntimeError as exc:  # e.g. "Cannot unlock protective stop until 5s after occurrence"
            raise BackendError(f"the controller refused to unlock: {exc}", transient=False) from None
        finally:
            dash.disconnect()
        self._wait(lambda: self.receive.getSafetyMode() in (SAFETY_NORMAL, SAFETY_REDUCED), 2.0,
                   "the protective stop to clear after unlocking")

    def _restart_script(self) -> None:
        if self.control is None:
            self._start_control()
            return
        if not self.control.reuploadScript():
            raise BackendError("re-uploading the control script failed", transient=False)
        self._wait(lambda: bool(self.receive.getRobotStatus() & PROGRAM_RUNNING_BIT), SCRIPT_START_S,
                   "the control script to start")
        self.control.setWatchdog(self.watchdog_min_hz)

    def close(self) -> None:
        """Stop our script: the arm holds, powered. Never powers the arm off.

        ur-rtde's disconnect() calls take 0.5 s each; the worker process is ended instead, which
        closes the connections just as well.
        """
        self._watch_stop.set()  # our own close is not a lost link
        self.estop()

    def _wait(self, done, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise BackendError(f"timed out after {timeout_s:.1f} s waiting for {what}", transient=False)
            time.sleep(0.005)


def _rtde_sockets(host: str) -> list[socket.socket]:
    """Duplicates of this process's sockets connected to ``host``'s RTDE port (the caller closes them)."""
    found = []
    for fd in _socket_fds():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM \
                    and sock.getpeername() == (host, RTDE_PORT):
                found.append(sock)
                continue
        except OSError:
            pass  # not connected (closing, listening): not an RTDE link
        sock.close()
    return found


def _same_socket(a: socket.socket, b: socket.socket) -> bool:
    """Two descriptors of one socket (dup'd): the same local and remote address."""
    try:
        return a.getsockname() == b.getsockname() and a.getpeername() == b.getpeername()
    except OSError:
        return False


def _socket_fds() -> list[int]:
    """This process's open sockets (Linux: /proc/self/fd)."""
    fds = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.append(int(name))
        except (OSError, ValueError):
            continue
    return fds


def _import_sdk():
    try:
        import dashboard_client
        import rtde_control
        import rtde_receive
    except ImportError as exc:
        raise BackendError(f"ur-rtde is not installed ({exc}): pip install 'armada[devices]'", transient=False) from None
    return rtde_receive, rtde_control, dashboard_client
