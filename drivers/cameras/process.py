"""The camera process: read a source, stamp, count, publish; reopen a camera that stalls.

Every frame carries a capture time on the host wall clock (``capture_ns``, the one clock all
processes of a cell share; how each source maps its device clock is in its module), a sequence
number (``frame_seq``: consecutive over the process's life, so a gap seen downstream is a frame
lost in transport), a running count of frames the camera lost before we got them (``drops``),
the number of times the camera was reopened (``recoveries``) and how the stamp was obtained
(``clock``); with the device's own frame counter and timestamp when it has them. A consumer
tells a fresh frame from a stale one by ``capture_ns``.

Recovery: when no frame comes within the frame timeout (3 frame intervals, at least 0.5 s, by
default; longer right after opening), nothing is published (never a repeat of the last frame), the stall is
logged, the device is closed and reopened with exponential backoff. Every wait has a timeout.

Clock pings: a camera whose config names a ``clock`` endpoint answers ``ping`` there with its host's
wall and monotonic clocks, from a thread of its own, so the inference host can measure this
host's clock offset when no driver runs here (runtime/remote/clock.py). For tests only,
``ARMADA_TEST_CLOCK_SKEW_S`` shifts every wall-clock stamp of a *synthetic* camera (frames and clock
replies alike), as a host whose clock is off would; any other camera kind refuses to start with it set.

Any thread that dies (a grab thread inside a camera's SDK, say) takes the process down with
exit 1 and a log line naming the thread and why: a camera process that lost a part would
otherwise stall, reopen and stall again for ever while its supervisor sees it alive.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from armada.drivers.cameras.factory import make_source
from armada.drivers.cameras.source import Captured, CameraSource, SourceError
from armada.drivers.cameras.timing import DropCounter
from armada.drivers.core.notify import Notifier, WatchdogPacer
from armada.runtime.config import DEFAULT_CELL, CameraConfig, CurveConfig, load_cell, named
from armada.runtime.exit_deadline import ExitDeadline, on_stop_signals
from armada.runtime.protocol import ErrorCode
from armada.runtime.transport import CommandServer, FramePublisher, start_authenticator

log = logging.getLogger("armada.camera")

READ_SLICE_S = 0.2  # reads are cut in slices this long so a stop request is seen promptly
CLOCK_SKEW_ENV = "ARMADA_TEST_CLOCK_SKEW_S"  # tests only: a synthetic camera's host clock made wrong
MAX_TEST_SKEW_S = 3600.0


def clock_skew_for_tests_ns(kind: str, environ: dict[str, str] | os._Environ) -> int:
    """The wall-clock skew a test asks of this camera (0 without ``ARMADA_TEST_CLOCK_SKEW_S``).

    Only a synthetic camera (no device: tests and benchmarks) takes it; a real camera's process
    refuses to start, so a stray variable can never make a robot's frames lie about their age."""
    raw = environ.get(CLOCK_SKEW_ENV)
    if raw is None or raw == "":
        return 0
    if kind != "synthetic":
        raise SystemExit(f"armada camera: {CLOCK_SKEW_ENV}={raw} is set, which is for tests of synthetic "
                         f"cameras only; this camera is {kind!r}: unset it")
    try:
        skew = float(raw)
    except ValueError:
        skew = math.nan
    if not abs(skew) <= MAX_TEST_SKEW_S:
        raise SystemExit(f"armada camera: {CLOCK_SKEW_ENV}={raw!r}: seconds within +-{MAX_TEST_SKEW_S:.0f}")
    return int(skew * 1e9)


class CameraProcess:
    def __init__(self, cfg: CameraConfig, curve: CurveConfig | None = None, base_dir: Path | None = None,
                 source: CameraSource | None = None):
        self.cfg = cfg
        self.source = source if source is not None else make_source(cfg, base_dir)
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, curve)
        self.pub = FramePublisher(self.ctx, cfg.frames, curve=curve)
        self.stop_event = threading.Event()
        self.frames_sent = 0
        self.drop_counter = DropCounter(int(1e9 / cfg.fps))
        self.recoveries = 0  # successful reopens after a stall
        self.stalls = 0
        self._fresh = True  # just (re)opened: the first frame may take longer
        self.fatal: str | None = None  # why a thread died, if one did
        self.notifier = Notifier()  # systemd's, set by run_camera; does nothing by default
        self._watchdog = WatchdogPacer(self.notifier)
        self.curve = curve
        self.clock_skew_ns = 0  # tests only (clock_skew_for_tests_ns): added to every wall-clock stamp
        self.clock_pings = 0
        self._clock_thread: threading.Thread | None = None
        self._clock_bound = threading.Event()

    @property
    def drops(self) -> int:
        return self.drop_counter.drops

    def run(self, max_frames: int | None = None) -> None:
        try:
            self._start_clock()
            info = self.source.open()
            log.info("camera %s up: %s; publishing on %s", self.cfg.name, info, self.cfg.frames)
            self.notifier.ready("streaming")
            self._watchdog = WatchdogPacer(self.notifier)
            while not self.stop_event.is_set() and (max_frames is None or self.frames_sent < max_frames):
                self._watchdog.tick()  # from this loop: a read that never returns trips systemd's watchdog
                captured = self._read()
                if captured is not None:
                    self._publish(captured)
                elif not self.stop_event.is_set():
                    self._recover()
        finally:
            self.notifier.stopping()
            self.stop_event.set()  # the clock thread ends with us
            if self._clock_thread is not None:
                self._clock_thread.join(timeout=2.0)
            self.source.close()
            self.pub.close()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()

    def _read(self) -> Captured | None:
        """The next frame within the frame timeout, or None (a stall, or a stop request)."""
        timeout = self.cfg.first_frame_timeout_s if self._fresh else self.cfg.frame_timeout()
        deadline = time.monotonic() + timeout
        while not self.stop_event.is_set():
            remaining = deadline - time.monotonic()
            # At least one try, even past the deadline: a process that was itself descheduled
            # (or SIGSTOPped) finds the camera's frames waiting; that is not a camera stall.
            captured = self.source.read(max(0.0, min(READ_SLICE_S, remaining)))
            if captured is not None:
                self._fresh = False
                return captured
            if remaining <= 0:
                return None
        return None

    def _publish(self, captured: Captured) -> None:
        self.drop_counter.update(captured.device_frame, captured.capture_ns)
        header: dict[str, Any] = {"camera": self.cfg.name, "frame_seq": self.frames_sent,
                                  "capture_ns": captured.capture_ns + self.clock_skew_ns, "drops": self.drops,
                                  "recoveries": self.recoveries, "clock": captured.clock}
        if captured.device_frame is not None:
            header["device_frame"] = captured.device_frame
        if captured.device_ts_ns is not None:
            header["device_ts_ns"] = captured.device_ts_ns
            header["device_domain"] = captured.device_domain
        self.pub.send(captured.rgb, jpeg_quality=self.cfg.jpeg_quality, depth=captured.depth,
                      depth_scale_m=captured.depth_scale_m, **header)
        self.frames_sent += 1

    def _recover(self) -> None:
        """Publish nothing, close the camera, reopen it with backoff until it works or we stop."""
        self.stalls += 1
        stalled_at = time.monotonic()
        log.warning("camera %s: no frame for %.2f s; publishing nothing and reopening (stall %d)", self.cfg.name,
                    self.cfg.first_frame_timeout_s if self._fresh else self.cfg.frame_timeout(), self.stalls)
        self.source.close()
        self.notifier.status(f"stalled: reopening (stall {self.stalls})")
        backoff = self.cfg.reopen_backoff_s
        while not self.stop_event.wait(backoff):
            self._watchdog.tick()  # reopening is this loop's work, not a hang
            try:
                info = self.source.open()
            except SourceError as exc:
                log.warning("camera %s: reopening failed, next try in %.1f s: %s", self.cfg.name,
                            min(backoff * 2, self.cfg.reopen_backoff_max_s), exc)
                backoff = min(backoff * 2, self.cfg.reopen_backoff_max_s)
                continue
            self.recoveries += 1
            self.drop_counter.restart()
            self._fresh = True
            log.info("camera %s: reopened after %.2f s (recovery %d): %s", self.cfg.name,
                     time.monotonic() - stalled_at, self.recoveries, info)
            self.notifier.status("streaming")
            return

    def _start_clock(self) -> None:
        """Answer clock pings on the camera's ``clock`` endpoint, if it names one; bound before the
        camera reports ready, so a clock endpoint that cannot bind fails the start, loudly."""
        endpoint = self.cfg.clock
        if not endpoint:
            return
        failed: list[BaseException] = []
        self._clock_thread = threading.Thread(target=self._serve_clock, args=(endpoint, failed), daemon=True,
                                              name=f"clock-{self.cfg.name}")
        self._clock_thread.start()
        self._clock_bound.wait(5.0)
        if failed:
            raise SourceError(f"camera {self.cfg.name}: cannot answer clock pings on {endpoint}: {failed[0]}")

    def _serve_clock(self, endpoint: str, failed: list[BaseException]) -> None:
        try:
            server = CommandServer(self.ctx, endpoint, self.curve)
        except (zmq.ZMQError, ValueError) as exc:
            failed.append(exc)
            self._clock_bound.set()
            return
        self._clock_bound.set()
        log.info("camera %s: answering clock pings on %s", self.cfg.name, endpoint)
        try:
            while not self.stop_event.is_set():
                if not server.poll(READ_SLICE_S):
                    continue
                req = server.recv()
                if req is None:
                    continue
                if req.error is not None:
                    server.reply_error(req, req.error.code, req.error.reason)
                elif req.msg["kind"] != "ping":
                    server.reply_error(req, ErrorCode.UNKNOWN_KIND,
                                       f"a camera's clock endpoint answers ping only, not {req.msg['kind']}")
                else:
                    self.clock_pings += 1
                    server.reply_ok(req, t_ns=time.time_ns() + self.clock_skew_ns, mono_ns=time.monotonic_ns())
        finally:
            server.close()

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()

    def thread_died(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook: remember why, and stop the process (run_camera exits 1)."""
        name = args.thread.name if args.thread is not None else "?"
        reason = f"thread {name} died: {args.exc_type.__name__}: {args.exc_value}"
        log.critical("camera %s: %s; shutting the camera process down", self.cfg.name, reason,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        self.fatal = self.fatal or reason
        self.request_stop()


def run_camera(cell_path: str | Path | None, name: str | None, run_dir: str | Path | None,
               deadline: ExitDeadline | None = None) -> None:
    cell = load_cell(cell_path, run_dir)
    cfg = named(cell.camera, name, cell_path)
    base_dir = Path(cell_path).resolve().parent if cell_path is not None else DEFAULT_CELL.parent
    skew_ns = clock_skew_for_tests_ns(getattr(cfg, "kind", "synthetic"), os.environ)  # refused before binding
    process = CameraProcess(cfg, cell.curve, base_dir)
    process.clock_skew_ns = skew_ns
    if process.clock_skew_ns:
        log.warning("camera %s: %s: every wall-clock stamp is %+.3f s off (a test of clock offsets)", cfg.name,
                    CLOCK_SKEW_ENV, process.clock_skew_ns / 1e9)
    process.notifier = Notifier.from_env()
    on_stop_signals(process.request_stop, deadline)
    threading.excepthook = process.thread_died
    try:
        process.run()
    except SourceError as exc:  # a config or wiring problem at start-up: say it once, exit non-zero
        raise SystemExit(f"armada camera: {exc}") from None
    if process.fatal:
        raise SystemExit(f"armada camera {cfg.name}: {process.fatal}")
