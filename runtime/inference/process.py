"""The inference process: subscribes to cameras and drivers, runs episodes on request.

The main thread serves the ``ctl`` socket (episode_start, episode_stop, intervene, resume, status,
shutdown);
an episode runs in a thread of its own. Telemetry goes out on ``events``.

Bad input on ctl gets an error reply and changes nothing; the serving loop takes a bounded
batch of requests between looks at the stop flag, so SIGTERM is honoured under a flood. Any
thread that dies takes the process down (exit 1, with a log line naming the thread and why):
its supervisor restarts a whole process rather than keep one that silently lost a part.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from armada.drivers.core.notify import Notifier, WatchdogPacer
from armada.runtime.config import CellConfig, load_cell
from armada.runtime.exit_deadline import ExitDeadline, on_stop_signals
from armada.runtime.inference.deadline import PolicyCaller
from armada.runtime.remote.clock import CameraClocks
from armada.runtime.inference.episode import (Deadlines, EpisodeReport, EpisodeRequest, EpisodeRunner,
                                              InterventionError)
from armada.runtime.inference.link import DriverLink
from armada.runtime.inference.observation import ObservationBuilder
from armada.runtime.inference.policy import Policy
from armada.runtime.inference.registry import POLICIES
from armada.runtime.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError, check_hello_version
from armada.runtime.transport import CommandServer, FrameSubscriber, Publisher, RemoteError, Request, start_authenticator

log = logging.getLogger("armada.inference")

MAX_REQUESTS_PER_POLL = 16  # ctl requests served between looks at the stop flag
SHUTDOWN_JOIN_S = 3.0
# A reply that cannot be encoded (it quotes too much of a hostile request) is replaced by this.
FALLBACK_REASON = "the reply could not be encoded; the request was refused"


def make_policy(cell: CellConfig) -> Policy:
    """The cell's policy, built by its kind's plugin (runtime/inference/registry.py)."""
    return POLICIES.get(cell.inference.policy.kind).build(cell)


def deadlines(cell: CellConfig) -> Deadlines:
    """Policy deadlines from the cell: by default a few seconds, at least twice a chunk's span;
    the first call of a model (it may load weights or warm up) gets a minute."""
    inf, c = cell.inference, cell.inference.chunking
    policy_s = inf.policy_timeout_s or max(2.0, 2 * c.size * c.dt)
    needs_model = POLICIES.get(inf.policy.kind).needs_model
    first_s = inf.first_policy_timeout_s or (max(60.0, policy_s) if needs_model else policy_s)
    return Deadlines(policy_s=policy_s, first_policy_s=first_s, driver_silence_s=inf.driver_silence_s,
                     progress_s=max(3 * inf.heartbeat_s, 0.15))


class InferenceProcess:
    def __init__(self, cell: CellConfig, policy: Policy):
        self.cell, self.policy = cell, policy
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, cell.curve)
        inf = cell.inference
        self.ctl = CommandServer(self.ctx, inf.ctl, cell.curve)
        self.events = Publisher(self.ctx, inf.events, hwm=1000, curve=cell.curve)
        self.events_lock = threading.Lock()  # the episode thread and the ctl thread both emit
        self.links = {d.name: DriverLink(self.ctx, d, cell.curve) for d in cell.drivers}
        cameras = {c.name: FrameSubscriber(self.ctx, c.frames, curve=cell.curve) for c in cell.cameras}
        self.builder = ObservationBuilder(cameras, {n: link.state for n, link in self.links.items()},
                                          inf.max_frame_age_s, inf.max_state_age_s,
                                          frame_shapes={c.name: (c.height, c.width, 3) for c in cell.cameras})
        # Cameras on hosts with no driver answer clock pings; their offsets age their frames (docs/remote.md).
        self.builder.camera_clocks = CameraClocks.of_cell(cell)
        self.caller = PolicyCaller()  # one per process: a hung call keeps the policy busy across episodes
        self.stop_event = threading.Event()
        self.fatal: str | None = None  # why a thread died, if one did
        self.episode_thread: threading.Thread | None = None
        # Cleared before episode_ended goes out, so a client that starts the next episode on that
        # event is not refused by a thread that is still on its way out.
        self.episode_active = False
        self.runner: EpisodeRunner | None = None
        self.episode_counter = 0
        self.last_report: EpisodeReport | None = None
        self.notifier = Notifier()  # systemd's, set by run_inference; does nothing by default

    def emit(self, event: str, data: dict[str, Any]) -> None:
        with self.events_lock:
            self.events.publish("event", event=event, data=data)

    # ------------------------------------------------------------------ ctl

    def run(self) -> None:
        log.info("inference up: ctl %s, events %s, %d driver(s), %d camera(s)", self.cell.inference.ctl,
                 self.cell.inference.events, len(self.links), len(self.builder.cameras))
        self.notifier.ready("serving")
        watchdog = WatchdogPacer(self.notifier)
        try:
            while not self.stop_event.is_set():
                watchdog.tick()  # from the ctl loop: a ctl thread that hangs trips systemd's watchdog
                if not self.episode_active:
                    # Between episodes too: else the state and frame streams queue up (seconds of them on
                    # a TCP link with large buffers) and the next episode starts on a stale backlog.
                    self.builder.poll()
                if not self.ctl.poll(0.05):
                    continue
                for _ in range(MAX_REQUESTS_PER_POLL):
                    req = self.ctl.recv()
                    if req is None or self.stop_event.is_set():
                        break
                    self._serve_safely(req)
        finally:
            self.notifier.stopping()
            self._shutdown()

    def _serve_safely(self, req: Request) -> None:
        """Serve one request; whatever goes wrong, the ctl loop goes on (and says why)."""
        try:
            self._serve(req)
        except Exception as exc:
            log.error("ctl: a request could not be served or answered: %s: %.200s", type(exc).__name__, exc)
            try:
                self.ctl.reply_error(req, ErrorCode.INTERNAL, FALLBACK_REASON)
            except Exception as again:
                log.error("ctl: not even the short error reply could be sent: %.200s", again)

    def _serve(self, req: Request) -> None:
        if req.error is not None:
            self.ctl.reply_error(req, req.error.code, req.error.reason[:500])
            return
        handler = getattr(self, f"_ctl_{req.msg['kind']}", None)
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"the inference process does not accept "
                                                             f"{req.msg['kind']!r} on ctl")
            data = handler(req.msg) or {}
        except ProtocolError as err:
            self.ctl.reply_error(req, err.code, err.reason)
            return
        except Exception as exc:
            log.exception("ctl %s failed", req.msg["kind"])
            self.ctl.reply_error(req, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])
            return
        self.ctl.reply_ok(req, **data)

    def _ctl_hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        check_hello_version(msg["version"])
        return {"version": PROTOCOL_VERSION, "drivers": list(self.links), "cameras": list(self.builder.cameras)}

    def _ctl_ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        # The wall clock too: `armada doctor` on another host measures this host's clock with it
        # (runtime/remote/clock.py ping_clock), where no driver or camera here could be asked.
        return {"mono_ns": time.monotonic_ns(), "t_ns": time.time_ns()}

    def _ctl_status(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"running": self._episode_running(), "episode": self.episode_counter,
                "last_report": self.last_report.as_dict() if self.last_report else None,
                "policy_busy": self.caller.busy(),
                "intervened": bool(self.runner is not None and self._episode_running() and self.runner.intervened)}

    def _ctl_episode_start(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._episode_running():
            raise ProtocolError(ErrorCode.BAD_STATE, f"episode {self.episode_counter} is still running; stop it first")
        for name, link in self.links.items():
            if not link.description:
                try:
                    link.handshake()
                except (TimeoutError, RemoteError) as exc:
                    raise ProtocolError(ErrorCode.BAD_STATE, f"driver {name} does not answer: {exc}") from None
                self.builder.state_dof[name] = link.dof
        self.episode_counter += 1  # only once it really starts: a refused start changes nothing
        req = EpisodeRequest(self.episode_counter, msg["instruction"],
                             msg.get("duration_s", self.cell.inference.episode_duration_s), msg.get("arm", False),
                             msg.get("task"), msg.get("min_margin", 0.0))
        inf = self.cell.inference
        self.runner = EpisodeRunner(self.links, self.builder, self.policy, inf.chunking, inf.heartbeat_s, self.emit,
                                    deadlines=deadlines(self.cell), caller=self.caller)
        self.episode_active = True
        self.episode_thread = threading.Thread(target=self._run_episode, args=(self.runner, req), daemon=True,
                                               name=f"episode-{req.episode}")
        self.episode_thread.start()
        return {"episode": req.episode}

    def _ctl_episode_stop(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.runner is not None:
            self.runner.stop_event.set()
        return {"running": self._episode_running()}

    def _ctl_intervene(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The operator takes over: see EpisodeRunner.intervene (bounded: one release per driver)."""
        runner = self._running_runner("intervene")
        try:
            return {"episode": runner.intervene()}
        except InterventionError as exc:
            raise ProtocolError(ErrorCode.BAD_STATE, str(exc)[:500]) from None

    def _ctl_resume(self, msg: dict[str, Any]) -> dict[str, Any]:
        runner = self._running_runner("resume")
        try:
            return runner.resume()
        except InterventionError as exc:
            raise ProtocolError(ErrorCode.BAD_STATE, str(exc)[:500]) from None

    def _running_runner(self, what: str) -> EpisodeRunner:
        if not self._episode_running() or self.runner is None:
            raise ProtocolError(ErrorCode.BAD_STATE, f"{what}: no episode is running")
        return self.runner

    def _ctl_shutdown(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.request_stop()
        return {}

    def _run_episode(self, runner: EpisodeRunner, req: EpisodeRequest) -> None:
        try:
            self.emit("episode_started", {"episode": req.episode, "instruction": req.instruction,
                                          "duration_s": req.duration_s})
            report = runner.run(req)
        except Exception as exc:  # run() reports its own failures; this is a bug in the reporting itself
            log.exception("episode %d: the runner raised", req.episode)
            report = EpisodeReport(req.episode, outcome=f"failed: unexpected {type(exc).__name__}: {exc}")
        self.last_report = report
        self.episode_active = False
        self.emit("episode_ended", report.as_dict())
        log.info("episode %d %s", req.episode, report.outcome)

    def _episode_running(self) -> bool:
        return self.episode_active

    # ------------------------------------------------------------------ shutdown

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()
        if self.runner is not None:
            self.runner.stop_event.set()

    def thread_died(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook: a dead thread takes the process down, saying which and why."""
        name = args.thread.name if args.thread is not None else "?"
        reason = f"thread {name} died: {args.exc_type.__name__}: {args.exc_value}"
        log.critical("%s; shutting the inference process down", reason,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        self.fatal = self.fatal or reason
        self.request_stop()

    def _shutdown(self) -> None:
        if self.episode_thread is not None:
            self.episode_thread.join(timeout=SHUTDOWN_JOIN_S)  # the runner releases its leases on the way out
            if self.episode_thread.is_alive():
                # Its sockets are still in use: closing them under it, or waiting in ctx.term(),
                # could hang. The drivers' lease watchdogs hold the arms.
                log.critical("the episode thread did not end within %.0f s; exiting without a clean shutdown",
                             SHUTDOWN_JOIN_S)
                _exit_now(1)
        for link in self.links.values():
            link.close()
        for sub in self.builder.cameras.values():
            sub.close()
        self.builder.close_clocks()
        self.ctl.close()
        self.events.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _exit_now(code: int) -> None:
    """Leave without waiting for threads: a policy call that never returns must not keep us."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_inference(cell_path: str | Path | None, run_dir: str | Path | None,
                  deadline: ExitDeadline | None = None) -> None:
    cell = load_cell(cell_path, run_dir)
    process = InferenceProcess(cell, make_policy(cell))
    process.notifier = Notifier.from_env()
    on_stop_signals(process.request_stop, deadline)
    threading.excepthook = process.thread_died
    process.run()
    if process.fatal:
        log.critical("inference process exiting: %s", process.fatal)
        _exit_now(1)
    if process.caller.busy() is not None:
        log.warning("exiting with the policy's %s call still running", process.caller.busy())
        _exit_now(0)
