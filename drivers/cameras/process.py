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

Any thread that dies (a grab thread inside a camera's SDK, say) takes the process down with
exit 1 and a log line naming the thread and why: a camera process that lost a part would
otherwise stall, reopen and stall again for ever while its supervisor sees it alive.
"""

from __future__ import annotations

import logging
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
from armada.runtime.transport import FramePublisher, start_authenticator

log = logging.getLogger("armada.camera")

READ_SLICE_S = 0.2  # reads are cut in slices this long so a stop request is seen promptly


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

    @property
    def drops(self) -> int:
        return self.drop_counter.drops

    def run(self, max_frames: int | None = None) -> None:
        try:
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
                                  "capture_ns": captured.capture_ns, "drops": self.drops,
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
    process = CameraProcess(cfg, cell.curve, base_dir)
    process.notifier = Notifier.from_env()
    on_stop_signals(process.request_stop, deadline)
    threading.excepthook = process.thread_died
    try:
        process.run()
    except SourceError as exc:  # a config or wiring problem at start-up: say it once, exit non-zero
        raise SystemExit(f"armada camera: {exc}") from None
    if process.fatal:
        raise SystemExit(f"armada camera {cfg.name}: {process.fatal}")
