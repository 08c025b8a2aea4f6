"""The generic driver process: a fixed-rate control loop plus a command server.

Three threads share one lock. The loop thread ticks on monotonic deadlines (never ``sleep(dt)``)
and owns the state PUB socket; the command thread owns the ROUTER socket so a command is answered
at once instead of at the next tick; a worker thread runs the slow half of a command (planning a
move, a device recovery) outside the lock, one at a time. The lock is only ever held briefly: the
loop waits on it every tick.

The stop path. Nothing that arrives on the command socket may delay an e-stop by more than a
tick (issue 9: a flood of cheap-to-send, costly-to-decode messages delayed e-stop replies by
seconds). So the command thread never decodes on arrival. It drains what is queued (a bounded
count), reads each message's top-level kind cheaply (``protocol.peek_kind``, a few hundred bytes
at most), and acts on every ``estop`` at once: latch, buffer cleared, device e-stop, under the
lock. Everything else waits in a bounded backlog, one fair queue per connection, and is decoded
and handled one message at a time, with the socket drained again before each, so an e-stop that
arrives meanwhile jumps the queue: it waits for at most one decode (bounded by
``protocol.COMMAND_LIMITS``) and one short handler. What does not fit the backlog is dropped and
counted (``dropped_requests`` in state); its sender times out, as it would with a dead driver.
A message whose kind reads ``estop`` stops the arm even if the rest of it is malformed: a
garbled stop is still a stop, and anyone may press the e-stop anyway.

A thread that dies takes the process down (exit status 1, after the device is closed holding
position), so its supervisor restarts it: disarmed, with the e-stop latch kept in the run dir (or in
``$ARMADA_STATE_DIR``, systemd's StateDirectory=, when set).

Under systemd (``Type=notify``, drivers/core/notify.py): READY=1 once the device is connected and
the command thread serves, with the mode as STATUS (idle, or estop from a latch); STATUS again on
every change of mode; WATCHDOG=1 from the control loop itself, so a loop stuck in a device call
is what trips ``WatchdogSec=``, not a process that is merely alive; STOPPING=1 on the way out.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from armada.drivers.core import registry
from armada.drivers.core.backend import Backend, BackendError
from armada.drivers.core.driver import Driver, Mode, SlowJob, TickResult
from armada.drivers.core.notify import Notifier, WatchdogPacer
from armada.runtime import protocol
from armada.runtime.config import CellConfig, DriverConfig, EmbodimentConfig, load_cell
from armada.runtime.exit_deadline import ExitDeadline, on_stop_signals
from armada.runtime.protocol import ErrorCode, ProtocolError
from armada.runtime.rundir import RunDirError, prepare_run_dir
from armada.runtime.transport import CommandServer, Publisher, Request, start_authenticator

log = logging.getLogger("armada.driver")

CONNECT_TIMEOUT_S = 5.0
GIL_SWITCH_INTERVAL_S = 0.0002
_PR_SET_TIMERSLACK = 29  # linux/prctl.h
PERIOD_HISTORY = 60_000  # ticks of period history kept for `stats` (two minutes at 500 Hz)
# The command backlog: messages drained per look at the socket, waiting per connection and in all.
# A client waits for each reply, so a connection with more than a few requests queued is flooding.
DRAIN_MAX = 256
BACKLOG_PER_CONNECTION = 4
BACKLOG_TOTAL = 64
# How often the command thread looks for a finished slow job when one is running.
SLOW_POLL_S = 0.002
# An e-stop this small is decoded before it acts (microseconds); a larger one acts first.
SMALL_ESTOP_BYTES = 1024
# Where the e-stop latch lives when not in the run dir: systemd's StateDirectory= (the run dir is
# a RuntimeDirectory= on tmpfs, gone at reboot; a latched e-stop must not be).
STATE_DIR_ENV = "ARMADA_STATE_DIR"


def make_backend(cfg: DriverConfig, emb: EmbodimentConfig, cell_dir: Path | None = None) -> Backend:
    """The backend of the driver's kind, built by its plugin (which imports only its own SDK, lazily:
    no torch, no other device's SDK). ``cell_dir``: the cell file's folder."""
    plugin = registry.get(cfg.backend.kind)
    return plugin.build(registry.BuildContext(driver=cfg, embodiment=emb, cell_dir=cell_dir))


@dataclass
class LoopTiming:
    """Tick start lateness and periods, kept in a fixed ring so the loop never allocates."""

    period_ns: int
    lateness_ns: np.ndarray
    periods_ns: np.ndarray
    count: int = 0
    last_start_ns: int = 0

    @classmethod
    def create(cls, rate_hz: float) -> "LoopTiming":
        return cls(int(round(1e9 / rate_hz)), np.zeros(PERIOD_HISTORY, np.int64), np.zeros(PERIOD_HISTORY, np.int64))

    def record(self, start_ns: int, deadline_ns: int) -> None:
        i = self.count % PERIOD_HISTORY
        self.lateness_ns[i] = start_ns - deadline_ns
        self.periods_ns[i] = start_ns - self.last_start_ns if self.last_start_ns else self.period_ns
        self.last_start_ns = start_ns
        self.count += 1

    def summary(self) -> dict[str, float]:
        n = min(self.count, PERIOD_HISTORY)
        if n < 2:
            return {"ticks": self.count}
        periods = self.periods_ns[:n] * 1e-6
        error = np.abs(periods - self.period_ns * 1e-6)
        return {"ticks": self.count, "window": n, "period_ms": self.period_ns * 1e-6,
                "period_p50_ms": float(np.percentile(periods, 50)), "period_p99_ms": float(np.percentile(periods, 99)),
                "period_max_ms": float(periods.max()), "error_p50_ms": float(np.percentile(error, 50)),
                "error_p99_ms": float(np.percentile(error, 99)), "error_max_ms": float(error.max()),
                "lateness_p99_ms": float(np.percentile(self.lateness_ns[:n], 99) * 1e-6)}

    def reset(self) -> None:
        self.count, self.last_start_ns = 0, 0


class Backlog:
    """Requests waiting to be decoded: one FIFO per connection, served round-robin, bounded.

    Round-robin keeps one flooding connection from starving the others: a legitimate client's
    request waits behind at most one request of each other connection.
    """

    def __init__(self, per_connection: int = BACKLOG_PER_CONNECTION, total: int = BACKLOG_TOTAL):
        self.per_connection, self.total = per_connection, total
        self._queues: collections.OrderedDict[bytes, collections.deque] = collections.OrderedDict()
        self._count = 0
        self.dropped = 0

    def push(self, identity: bytes, parts: list) -> bool:
        """Queue one raw request; False (and counted) when it does not fit."""
        q = self._queues.get(identity)
        if self._count >= self.total or (q is not None and len(q) >= self.per_connection):
            self.dropped += 1
            return False
        if q is None:
            q = self._queues[identity] = collections.deque()
        q.append(parts)
        self._count += 1
        return True

    def pop(self) -> tuple[bytes, list] | None:
        if not self._queues:
            return None
        identity, q = next(iter(self._queues.items()))
        parts = q.popleft()
        self._count -= 1
        if q:
            self._queues.move_to_end(identity)
        else:
            del self._queues[identity]
        return identity, parts

    def __len__(self) -> int:
        return self._count


class SlowWorker:
    """Runs one slow job at a time outside the loop's lock; its reply comes back to the command thread."""

    def __init__(self, guard: Callable[[str, Callable[[], None]], Callable[[], None]],
                 on_start: Callable[[], None] = lambda: None):
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self.busy: str | None = None  # what is running, for the refusal of a second one
        self._on_start = on_start
        self._thread = threading.Thread(target=guard("slow commands", self._run), name="slow", daemon=True)
        self._thread.start()

    def submit(self, job: SlowJob, finish: Callable[[SlowJob, Any], None]) -> None:
        self.busy = job.what
        self._jobs.put_nowait((job, finish))

    def stop(self, timeout_s: float) -> None:
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout_s)

    def _run(self) -> None:
        self._on_start()
        while (item := self._jobs.get()) is not None:
            job, finish = item
            try:
                finish(job, job.run())
            finally:
                self.busy = None


class DriverProcess:
    def __init__(self, cfg: DriverConfig, emb: EmbodimentConfig, backend: Backend, cell: CellConfig | None = None,
                 run_dir: Path | None = None, state_dir: Path | None = None, notifier: Notifier | None = None):
        self.cfg = cfg
        # The e-stop latch lives in the state dir (else the run dir) so a restarted driver starts
        # latched; in-process tests and tools without either keep it in memory only.
        latch_dir = state_dir if state_dir is not None else run_dir
        latch = Path(latch_dir) / f"{cfg.name}.estop" if latch_dir is not None else None
        # systemd (Type=notify): READY once connected, disarmed and serving; WATCHDOG=1 from the
        # control loop; STATUS on every change of mode; STOPPING=1 on the way out.
        self.notifier = notifier if notifier is not None else Notifier()
        self._notified: tuple[Mode, str | None] | None = None
        self.driver = Driver(emb, backend, cfg.lease_ttl_s, latch)
        self.ctx = zmq.Context()
        if cfg.realtime_priority is not None and realtime_allowed(max(cfg.realtime_priority - 1, 1)):
            # ZeroMQ's I/O thread moves every e-stop from the socket to the command thread: it gets
            # the command thread's priority, or a busy host delays the stop in a queue we never see.
            # Applied when the thread starts, with the first socket.
            self.ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_FIFO)
            self.ctx.set(zmq.THREAD_PRIORITY, max(cfg.realtime_priority - 1, 1))
        curve = cell.curve if cell else None
        self.auth = start_authenticator(self.ctx, curve)
        self.state_pub = Publisher(self.ctx, cfg.state, hwm=100, curve=curve)
        self.server = CommandServer(self.ctx, cfg.cmd, curve=curve)
        self.timing = LoopTiming.create(emb.control_rate_hz)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.decimation = emb.state_decimation
        self.backlog = Backlog()
        self.fatal: str | None = None  # why a thread died; the process then exits non-zero
        self.slow: SlowWorker | None = None
        self._replies: collections.deque = collections.deque()  # (request, ok, data) from the slow worker

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        # When the command thread holds the GIL, the loop thread waits up to the switch interval
        # (5 ms by default: two and a half ticks at 500 Hz). Ask for a hand-over within 0.2 ms.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            self.driver.connect(CONNECT_TIMEOUT_S)
        except BackendError as exc:
            raise SystemExit(f"driver {self.cfg.name}: cannot connect to the device: {exc}") from None
        log.info("driver %s up: %s at %.0f Hz, %s, disarmed", self.cfg.name, self.driver.emb.name,
                 self.driver.emb.control_rate_hz, self.cfg.cmd)
        # Real-time too when configured, below the command thread: a thread of this process that
        # holds the GIL while other processes preempt it would stall the real-time ones (inversion).
        self.slow = SlowWorker(self._guard, lambda: self._raise_priority(below=2, what="slow-command thread"))
        commands = threading.Thread(target=self._guard("commands", self._serve_commands), name="commands", daemon=True)
        commands.start()
        try:
            self._guard("control loop", self._control_loop)()
        finally:
            self.stop_event.set()
            self.notifier.stopping(f"stopping: {self.fatal}" if self.fatal else "stopping")
            commands.join(timeout=1.0)
            self.slow.stop(timeout_s=1.0)
            self._shutdown()
        if self.fatal is not None:
            raise SystemExit(f"driver {self.cfg.name}: {self.fatal}; exiting so that its supervisor restarts it, "
                             "disarmed")

    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """``target``, so that if it raises anything the whole process stops: a driver whose command
        thread is dead still publishes state, so nothing would restart it, but no e-stop reaches it."""
        def guarded() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - whatever it was, the process must not limp on
                log.critical("driver %s: the %s thread died", self.cfg.name, name, exc_info=True)
                if self.fatal is None:
                    self.fatal = f"the {name} thread died: {type(exc).__name__}: {protocol.bounded_reason(str(exc))}"
                self.stop_event.set()
        return guarded

    def _control_loop(self) -> None:
        self._raise_priority()
        _set_timer_slack_ns(1)  # a normal thread's timer slack (50 us) is pure lateness for a loop
        period = self.timing.period_ns
        spin = self._spin_ns(period)
        deadline = time.monotonic_ns() + period
        # READY from here: the device is connected, the driver disarmed (or still e-stopped from
        # its latch), the command thread serving and this loop about to tick.
        self._notify_mode(ready=True)
        watchdog = WatchdogPacer(self.notifier)
        while not self.stop_event.is_set():
            _sleep_until(deadline, spin)
            start = time.monotonic_ns()
            self.timing.record(start, deadline)
            with self.lock:
                # Tick at the deadline, not the wake-up time: targets are sampled on the fixed
                # grid the safety filter assumes, so wake-up jitter shifts when a command leaves,
                # never what it is.
                result = self.driver.tick(deadline)
                if self.driver.counters.ticks % self.decimation == 0:
                    self._publish_state(result, deadline)
            # Outside the lock, once per interval: only a loop that ticks keeps systemd's watchdog fed.
            watchdog.tick(start)
            if self.notifier.enabled:
                self._notify_mode()
            deadline += period
            now = time.monotonic_ns()
            if now > deadline:
                # Missed one or more deadlines: count it and skip ahead rather than burst.
                missed = (now - deadline) // period + 1
                with self.lock:
                    self.driver.counters.overruns += int(missed)
                deadline += missed * period

    def _spin_ns(self, period_ns: int) -> int:
        """The configured spin, at most half a period (the rest of the core is the other threads')."""
        spin = int(self.cfg.loop_spin_us * 1e3)
        if spin > period_ns // 2:
            log.warning("driver %s: loop_spin_us %.0f is over half the %.0f us period; spinning %.0f us",
                        self.cfg.name, self.cfg.loop_spin_us, period_ns / 1e3, period_ns / 2e3)
            spin = period_ns // 2
        if spin:
            log.info("driver %s: the loop yields the CPU for the last %.0f us before each tick", self.cfg.name, spin / 1e3)
        return spin

    def _notify_mode(self, ready: bool = False) -> None:
        """STATUS (with READY=1 the first time) when the mode or its reason changed; two attribute
        reads per tick otherwise."""
        d = self.driver
        key = (d.mode, d.reason)
        if key == self._notified and not ready:
            return
        self._notified = key
        status = f"{d.mode.value}: {d.reason}" if d.reason and d.mode in (Mode.ESTOP, Mode.FAULT) else d.mode.value
        if ready:
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    def _raise_priority(self, below: int = 0, what: str = "control loop") -> None:
        """Run this thread under SCHED_FIFO when configured: the loop at the configured priority, the
        command thread (the e-stop's path) just below it, so that no other process starves either."""
        if self.cfg.realtime_priority is None:
            return
        priority = max(self.cfg.realtime_priority - below, 1)
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(priority))
            log.info("%s runs SCHED_FIFO priority %d", what, priority)
        except (PermissionError, OSError) as exc:
            log.warning("cannot run the %s real-time (%s): expect more jitter and overruns; "
                        "grant CAP_SYS_NICE or LimitRTPRIO (see systemd/armada-driver@.service)", what, exc)

    def _publish_state(self, r: TickResult, now_ns: int) -> None:
        d = self.driver
        counters = d.counters.as_dict()
        counters["clamps"] = d.filter.counters.as_dict()
        counters["rejected_messages"] = self.server.counters.rejected
        counters["dropped_requests"] = self.backlog.dropped
        fields = {"mono_ns": now_ns, "mode": d.mode.value, "measured": r.measured, "requested": r.requested,
                  "commanded": r.commanded, "velocity": r.velocity, "counters": counters}
        if r.episode is not None:
            fields["episode"] = r.episode
        if r.chunk is not None:
            fields["chunk"] = r.chunk
        if d.reason:
            fields["reason"] = d.reason
        if d.recovering:
            fields["recovering"] = True  # clear_fault in progress: the device is not being read
        if d.lease.holder:
            fields["lease_holder"] = d.lease.holder
        if d.last_reading is not None and d.last_reading.extras:
            fields["device"] = d.last_reading.extras
        self.state_pub.publish("state", **fields)

    # ------------------------------------------------------------------ commands

    def _serve_commands(self) -> None:
        self._raise_priority(below=1, what="command thread")
        while not self.stop_event.is_set():
            waiting = len(self.backlog) or self._replies
            timeout = 0.0 if waiting else SLOW_POLL_S if self.slow and self.slow.busy else 0.05
            if self.server.poll(timeout):
                self._take_in()
            self._send_slow_replies()
            item = self.backlog.pop()
            if item is not None:
                self._process(*item)

    def _take_in(self) -> None:
        """Drain what is queued on the socket: e-stops act now, the rest waits in the backlog."""
        sock = self.server.socket
        for _ in range(DRAIN_MAX):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = parts[0].bytes
            if len(parts) != 2:
                # Refused now, not queued: ZeroMQ bounds each part, not their number, so holding
                # many-part messages in the backlog would let a client pin megabytes per slot.
                err = ProtocolError(ErrorCode.BAD_ENCODING, f"expected one message part, got {len(parts) - 1}")
                self.server.counters.received += 1
                self.server.counters.reject(err)
                self.server.reply_error(Request(identity, None, err), err.code, err.reason)
                continue
            if protocol.peek_kind(parts[1].buffer) == "estop":
                self._estop_now(identity, parts)
            else:
                self.backlog.push(identity, parts)

    def _estop_now(self, identity: bytes, parts: list) -> None:
        """The stop path. A normal e-stop (tens of bytes) is decoded first, in microseconds, for its
        reason; a large or malformed one latches first and is read afterwards, for the reply."""
        size = len(parts[1].buffer)
        req = self._parse(identity, parts) if size <= SMALL_ESTOP_BYTES else None
        if req is not None and req.error is None:
            self._handle(req)  # latches under the lock, replies with the mode
            return
        with self.lock:
            self.driver.estop(f"estop command (a {'malformed' if req is not None else 'large'} message of "
                              f"{size} bytes)")
        if req is None:
            req = self._parse(identity, parts)
        if req.error is not None:
            self.server.reply_error(req, req.error.code, f"{req.error.reason} (the e-stop is latched all the same)")
        else:
            self.server.reply_ok(req, mode=Mode.ESTOP.value)

    def _parse(self, identity: bytes, parts: list) -> Request:
        """Decode and validate one raw request (identity + one part), within the command limits."""
        counters = self.server.counters
        counters.received += 1
        msg: dict[str, Any] | None = None
        try:
            msg = protocol.decode(parts[1].buffer, protocol.COMMAND_LIMITS)
            protocol.validate(msg)
        except ProtocolError as err:
            counters.reject(err)
            seq = msg.get("seq", -1) if msg is not None else -1
            return Request(identity, None, err, raw_seq=seq if type(seq) is int else -1)
        return Request(identity, msg, None, raw_seq=msg["seq"])

    def _process(self, identity: bytes, parts: list) -> None:
        req = self._parse(identity, parts)
        if req.error is not None:
            self.server.reply_error(req, req.error.code, req.error.reason)
            return
        self._handle(req)

    def _handle(self, req: Request) -> None:
        msg = req.msg
        assert msg is not None
        try:
            if self.slow is not None and self.slow.busy and msg["kind"] in ("move_to", "clear_fault"):
                raise ProtocolError(ErrorCode.BAD_STATE, f"busy: a {self.slow.busy} is in progress; try again")
            with self.lock:
                result = self.driver.start(msg, time.monotonic_ns(), req.identity)
            if msg["kind"] == "stats":
                # Percentiles over a minute of ticks take milliseconds: outside the lock. The loop
                # may write one ring entry meanwhile; a statistic does not need that tick.
                result["loop"] = self.timing.summary()
                if msg.get("reset"):
                    with self.lock:
                        self.timing.reset()
        except ProtocolError as err:
            self.server.reply_error(req, err.code, err.reason)
            return
        except Exception as exc:  # a bug in one handler must not take the arm's loop down
            log.exception("command %s failed", msg.get("kind"))
            self.server.reply_error(req, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if isinstance(result, SlowJob):
            assert self.slow is not None
            self.slow.submit(result, lambda job, outcome: self._finish_slow(req, job, outcome))
            return
        self.server.reply_ok(req, **result)

    def _finish_slow(self, req: Request, job: SlowJob, outcome: Any) -> None:
        """In the slow worker: swap the result in under the lock; the command thread replies."""
        try:
            with self.lock:
                data = self.driver.finish(job, outcome, time.monotonic_ns(), req.identity)
        except ProtocolError as err:
            self._replies.append((req, False, (err.code, err.reason)))
            return
        except Exception as exc:
            log.exception("command %s failed", job.what)
            self._replies.append((req, False, (ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")))
            return
        self._replies.append((req, True, data))

    def _send_slow_replies(self) -> None:
        while self._replies:
            req, ok, data = self._replies.popleft()
            if ok:
                self.server.reply_ok(req, **data)
            else:
                self.server.reply_error(req, *data)

    # ------------------------------------------------------------------ shutdown

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()

    def _shutdown(self) -> None:
        with self.lock:
            if self.driver.mode in (Mode.ARMED, Mode.RUNNING):
                log.warning("driver %s stopping while %s: holding position, torque stays on",
                            self.cfg.name, self.driver.mode.value)
            try:
                self.driver.backend.close()  # backends hold position on close; they never cut torque
            except BackendError as exc:
                log.error("closing the device failed: %s", exc)
        self.state_pub.close()
        self.server.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.notifier.close()


def realtime_allowed(priority: int) -> bool:
    """Whether this process may use SCHED_FIFO at ``priority``: tried on this thread, then undone.

    Asked before ZeroMQ is told to run its I/O thread real-time, because libzmq aborts the whole
    process (src/thread.cpp, posix_assert) when it cannot apply the policy.
    """
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        os.sched_setscheduler(0, policy, param)
        return True
    except OSError:
        return False


def _sleep_until(deadline_ns: int, spin_ns: int = 0) -> None:
    """Sleep until ``spin_ns`` before the deadline, then yield the CPU in a loop until it: the
    kernel's wake-up is late by a tail we cannot shorten, a yielding loop is not. os.sched_yield
    releases the GIL on every turn, so the command thread (the e-stop's path) still gets it; under
    SCHED_FIFO only threads of equal or higher priority run on this core meanwhile."""
    remaining = deadline_ns - spin_ns - time.monotonic_ns()
    if remaining > 0:
        time.sleep(remaining * 1e-9)
    if spin_ns:
        while time.monotonic_ns() < deadline_ns:
            os.sched_yield()


def _set_timer_slack_ns(ns: int) -> None:
    """This thread's timer slack (Linux prctl PR_SET_TIMERSLACK); elsewhere nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def run_driver(cell_path: str | Path | None, name: str | None, run_dir: str | Path | None,
               deadline: ExitDeadline | None = None) -> None:
    """Run one driver of a cell until SIGTERM/SIGINT; ``run_dir`` (resolved and locked by the CLI)
    keeps the e-stop latch across restarts; ``deadline`` bounds the stop once asked for."""
    cell = load_cell(cell_path, run_dir)
    cfg = cell.driver(name)
    emb = cell.embodiment(cfg)
    try:
        backend = make_backend(cfg, emb, cell.folder)
    except ValueError as exc:  # a backend that cannot work with this embodiment or bus: say so, no traceback
        raise SystemExit(f"driver {cfg.name}: {exc}") from None
    state_dir = os.environ.get(STATE_DIR_ENV) or None
    if state_dir is not None:
        try:  # private like the run dir: whoever can write the latch can clear an e-stop
            state_dir = prepare_run_dir(state_dir)
        except RunDirError as exc:
            raise SystemExit(f"driver {cfg.name}: {STATE_DIR_ENV}: {exc}") from None
    process = DriverProcess(cfg, emb, backend, cell, Path(run_dir) if run_dir is not None else None,
                            state_dir=state_dir, notifier=Notifier.from_env())
    on_stop_signals(process.request_stop, deadline)
    process.run()
