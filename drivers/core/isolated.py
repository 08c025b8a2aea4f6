"""Run a device backend in its own worker process, behind the same Backend interface.

Vendor SDKs are kept out of the driver process when they can take it down or starve it:
  * ur-rtde blocks without a timeout on a silent peer while holding the GIL, and (1.6.5) crashed
    the process with SIGSEGV from its reconnect thread after a dropped link;
  * piper_sdk parses every CAN frame in a Python thread: a PiPer sends about 2000 frames/s, and two
    of them (a Cobot Magic) kept the driver loop waiting for the GIL, at 124 Hz instead of 200 Hz.
In a worker, a hang or a crash ends only the worker, and its parsing runs on another core. Every
call has a timeout; a worker that does not answer, or dies, becomes a device error (the driver
faults), and the operator's ``clear_fault`` (``recover``) starts a new one.

When the driver faults for any reason, ``on_fault`` ends the worker at once (SIGKILL): an SDK can
recover by itself (ur-rtde reconnects and restarts its control script from its own thread) or hold
queued commands, and nothing may reach the device between a fault and the operator's recovery.

Each tick costs one round trip: ``write`` is sent without waiting and its answer is checked with
the next call's. The worker's readings carry ``time.monotonic_ns`` stamps, one clock host-wide.

    python -m armada.drivers.core.isolated FD      (the worker; FD is its end of a socket pair)

The worker builds its backend with ``factory(**kwargs)``: ``factory`` is "module:function" and
the kwargs are plain msgpack data (no pickle), so each backend module provides a small factory.
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.core.ipc import recv_message, send_message

log = logging.getLogger("armada.isolated")

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_UNANSWERED_WRITES = 8  # writes in flight before the worker counts as stuck
# A worker ends itself with this code when its device closed the link, so that the SDK cannot
# reconnect by itself (drivers/ur3/rtde_backend.py).
WORKER_EXIT_LINK_LOST = 75
WORKER_GIL_SWITCH_INTERVAL_S = 0.0002


@dataclass(frozen=True)
class WorkerTimeouts:
    io_s: float = 0.02  # read: a few ticks; a later answer is a (transient) device error
    stop_s: float = 0.25  # estop and close
    connect_extra_s: float = 5.0  # on top of the driver's connect timeout: starting Python, imports
    recover_s: float = 8.0  # the least a recovery (unlock, restart a program) is given


class IsolatedBackend(Backend):
    def __init__(self, factory: str, kwargs: dict[str, Any], name: str, timeouts: WorkerTimeouts = WorkerTimeouts(),
                 realtime_priority: int | None = None, lost_link_note: str = ""):
        self.factory, self.kwargs, self.name = factory, kwargs, name
        self.timeouts = timeouts
        self.realtime_priority = realtime_priority
        self.lost_link_note = lost_link_note  # what happens to the arm when nothing can reach it
        self._worker: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._unanswered_writes: set[int] = set()
        self._write_error: BackendError | None = None
        self._ended_by_fault: str | None = None  # why on_fault ended the worker, until recover
        self._unreaped: list[subprocess.Popen] = []  # killed workers not yet waited for

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        self.close()
        self._start_worker()
        try:
            self._call("connect", timeout_s + self.timeouts.connect_extra_s, factory=self.factory,
                       kwargs=self.kwargs, timeout_s=timeout_s)
        except BackendError as exc:
            self._kill_worker()
            raise BackendError(str(exc), transient=False) from None

    def close(self) -> None:
        """The backend's own close (which never cuts torque), then the worker goes."""
        if self._worker_alive():
            try:
                self._call("close", self.timeouts.stop_s)
            except BackendError as exc:
                log.warning("%s: closing without a clean stop: %s", self.name, exc)
        self._kill_worker()

    def _start_worker(self) -> None:
        self._reap()
        ours, theirs = socket.socketpair()
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        try:
            self._worker = subprocess.Popen([sys.executable, "-m", "armada.drivers.core.isolated", str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), env=dict(os.environ, PYTHONPATH=path),
                                            stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise BackendError(f"{self.name}: cannot start its worker process: {exc}", transient=False) from None
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
            log.warning("%s: cannot make its worker real-time (%s): expect more jitter", self.name, exc)

    def _worker_alive(self) -> bool:
        return self._sock is not None and self._worker is not None and self._worker.poll() is None

    def _kill_worker(self, wait: bool = True) -> None:
        """SIGKILL the worker: whatever it has queued dies with it. ``wait=False`` leaves the reaping
        to a later call (the control loop must not wait for the kernel to tear down a process)."""
        worker, sock = self._worker, self._sock
        self._worker = self._sock = None
        self._unanswered_writes.clear()
        self._write_error = None
        if worker is not None:
            worker.kill()  # before closing our end, so the worker cannot act on a broken link
        if sock is not None:
            sock.close()
        if worker is not None:
            self._unreaped.append(worker)
        if wait:
            self._reap(wait_s=5.0)

    def _reap(self, wait_s: float = 0.0) -> None:
        """Wait for killed workers (no zombies); without ``wait_s``, only those already gone."""
        still = []
        for worker in self._unreaped:
            try:
                worker.wait(timeout=wait_s) if wait_s > 0 else worker.poll()
            except subprocess.TimeoutExpired:
                pass
            if worker.returncode is None:
                still.append(worker)
        self._unreaped = still

    # ------------------------------------------------------------------ i/o

    def read(self) -> Reading:
        if self._unreaped:
            self._reap()
        r = self._call("read", self.timeouts.io_s)
        velocity = None if r["velocity"] is None else np.asarray(r["velocity"], dtype=np.float64)
        return Reading(position=np.asarray(r["position"], dtype=np.float64), mono_ns=int(r["mono_ns"]),
                       velocity=velocity, estopped=bool(r["estopped"]), fault=r["fault"], extras=r["extras"])

    def write(self, position: np.ndarray) -> None:
        """Sent without waiting; its answer is checked with the next call's."""
        if len(self._unanswered_writes) >= MAX_UNANSWERED_WRITES:
            raise BackendError(f"{self.name}: write: its worker has not answered the last "
                               f"{len(self._unanswered_writes)} writes")
        self._unanswered_writes.add(self._send("write", position=[float(v) for v in position]))

    # ------------------------------------------------------------------ stops and recovery

    def on_fault(self, reason: str) -> None:
        """End the worker now, without waiting: the SDK must not recover or resend by itself.

        Called from the control loop; SIGKILL and closing a socket take microseconds. The worker is
        reaped by a later call. ``recover`` (the operator's clear_fault) starts a new one.
        """
        if self._worker is None and self._sock is None:
            return
        log.warning("%s: the driver faulted (%s): ending its worker until the operator recovers", self.name, reason)
        self._ended_by_fault = reason
        self._kill_worker(wait=False)

    def estop(self) -> None:
        if self._ended_by_fault is not None and self._worker is None:
            raise BackendError(f"{self.name}: nothing can be sent: its worker was ended when the driver faulted "
                               f"({self._ended_by_fault}){self.lost_link_note}", transient=False)
        try:
            self._call("estop", self.timeouts.stop_s)
        except BackendError as exc:
            self._kill_worker()  # nothing reaches the arm through it any more
            raise BackendError(f"{self.name}: e-stop could not be sent ({exc}){self.lost_link_note}",
                               transient=False) from None

    def release_estop(self) -> None:
        """The operator's reset_estop: through a new worker if a fault (or a crash) ended the last one,
        since reset_estop is then the only way out of the e-stop latch."""
        if not self._worker_alive():
            self.connect(self.timeouts.recover_s)
            self._ended_by_fault = None
        self._call("release_estop", self.timeouts.recover_s)

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: a new worker if the old one is gone or cannot read, then the backend's own."""
        self._write_error = None  # a refused write is why we are here, not a reason to restart
        if not self._worker_alive() or not self._reads_ok():
            self.connect(timeout_s)
        self._ended_by_fault = None
        self._call("recover", max(timeout_s, self.timeouts.recover_s), timeout_s=timeout_s)

    def _reads_ok(self) -> bool:
        try:
            self.read()
            return True
        except BackendError:
            return False

    # ------------------------------------------------------------------ the worker call

    def _send(self, op: str, **args: Any) -> int:
        if self._sock is None or self._worker is None:
            if self._ended_by_fault is not None:
                raise BackendError(f"{self.name}: its worker was ended when the driver faulted; clear_fault "
                                   "starts a new one", transient=False)
            raise BackendError(f"{self.name} is not connected", transient=False)
        call_id = next(self._ids)
        try:
            send_message(self._sock, {"id": call_id, "op": op, **args})
        except OSError as exc:
            raise self._worker_failure(op, f"the link to its worker failed: {exc}", 0.0, broken=True) from None
        return call_id

    def _call(self, op: str, wait_s: float, **args: Any) -> dict[str, Any]:
        call_id = self._send(op, **args)
        try:
            reply = self._await_reply(call_id, time.monotonic() + wait_s)
        except (OSError, ValueError) as exc:
            raise self._worker_failure(op, f"the link to its worker failed: {exc}", wait_s, broken=True) from None
        if reply is None:
            raise self._worker_failure(op, "its worker did not answer", wait_s)
        write_error, self._write_error = self._write_error, None
        if not reply["ok"]:
            raise BackendError(f"{self.name}: {op}: {reply['error']}", transient=bool(reply.get("transient")))
        if write_error is not None:
            raise write_error
        return reply

    def _await_reply(self, call_id: int, deadline: float) -> dict[str, Any] | None:
        """The reply to ``call_id``. Answers to earlier writes are checked on the way; answers to
        calls that already timed out are dropped."""
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
            if reply.get("id") in self._unanswered_writes:
                self._unanswered_writes.discard(reply["id"])
                if not reply["ok"] and self._write_error is None:
                    self._write_error = BackendError(f"{self.name}: write: {reply['error']}",
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
            return BackendError(f"{self.name}: {op}: {what}: {cause}", transient=False)
        # Alive but slow: one late answer is a transient error; the driver faults if it persists.
        return BackendError(f"{self.name}: {op}: {what} within {1e3 * timeout_s:.0f} ms", transient=True)


def _exit_reason(code: int) -> str:
    if code == WORKER_EXIT_LINK_LOST:
        return "it ended itself: the device closed the link, and no SDK may reconnect on its own"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------- the worker process


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the driver dies, even while an SDK call blocks."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _build(factory: str, kwargs: dict[str, Any]) -> Backend:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _reading(r: Reading) -> dict[str, Any]:
    return {"position": r.position.tolist(), "mono_ns": r.mono_ns,
            "velocity": None if r.velocity is None else r.velocity.tolist(),
            "estopped": r.estopped, "fault": r.fault, "extras": r.extras}


def _dispatch(backend: Backend | None, msg: dict[str, Any]) -> tuple[Backend | None, dict[str, Any]]:
    op = msg.get("op")
    if op == "connect":
        backend = _build(msg["factory"], msg["kwargs"])
        backend.connect(float(msg["timeout_s"]))
        return backend, {}
    if backend is None:
        raise BackendError(f"{op!r} before connect", transient=False)
    if op == "read":
        return backend, _reading(backend.read())
    if op == "write":
        backend.write(np.asarray(msg["position"], dtype=np.float64))
    elif op == "recover":
        backend.recover(float(msg["timeout_s"]))
    elif op in ("estop", "release_estop", "close"):
        getattr(backend, op)()
    else:
        raise BackendError(f"unknown op {op!r}", transient=False)
    return backend, {}


def serve(sock: socket.socket) -> int:
    backend: Backend | None = None
    while True:
        try:
            msg = recv_message(sock)
        except (OSError, ValueError):
            break
        if msg is None:
            break  # the driver closed its end
        reply: dict[str, Any] = {"id": msg.get("id", 0), "ok": True}
        try:
            backend, data = _dispatch(backend, msg)
            reply.update(data)
        except BackendError as exc:
            reply.update(ok=False, error=str(exc), transient=exc.transient)
        except Exception as exc:  # an SDK's own exception: report it, keep serving
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
    # SDK reader threads (piper_sdk parses ~2000 CAN frames/s per arm) would otherwise keep the GIL
    # for up to 5 ms while a request waits: ask for a hand-over within 0.2 ms, as the driver loop does.
    sys.setswitchinterval(WORKER_GIL_SWITCH_INTERVAL_S)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock = socket.socket(fileno=int(args[0]))
    try:
        return serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
