"""The camera process: capture on a fixed schedule, stamp, publish without copying.

Every frame carries a capture time on the host wall clock (``capture_ns``, the one clock all
processes of a cell share), a sequence number and a running count of frames the camera
dropped, so a consumer can tell a fresh frame from a stale one.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import zmq

from drivers.cameras.synthetic import SyntheticCamera
from runtime.config import CameraConfig, load_cell, named
from runtime.transport import FramePublisher, start_authenticator

log = logging.getLogger("armada.camera")


class CameraProcess:
    def __init__(self, cfg: CameraConfig, curve=None):
        self.cfg = cfg
        self.camera = SyntheticCamera(cfg.width, cfg.height)
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, curve)
        self.pub = FramePublisher(self.ctx, cfg.frames, curve=curve)
        self.stop_event = threading.Event()
        self.frames_sent = 0
        self.drops = 0  # capture deadlines missed

    def run(self, max_frames: int | None = None) -> None:
        period = int(1e9 / self.cfg.fps)
        deadline = time.monotonic_ns()
        seq = 0
        log.info("camera %s up: %dx%d at %.1f fps on %s", self.cfg.name, self.cfg.width, self.cfg.height,
                 self.cfg.fps, self.cfg.frames)
        try:
            while not self.stop_event.is_set() and (max_frames is None or seq < max_frames):
                remaining = deadline - time.monotonic_ns()
                if remaining > 0:
                    time.sleep(remaining * 1e-9)
                capture_ns = time.time_ns()
                pixels = self.camera.grab(seq)
                self.pub.send(pixels, camera=self.cfg.name, frame_seq=seq, capture_ns=capture_ns,
                              width=self.cfg.width, height=self.cfg.height, channels=3, dtype="uint8",
                              encoding="raw", drops=self.drops)
                seq += 1
                self.frames_sent = seq
                deadline += period
                late = time.monotonic_ns() - deadline
                if late > 0:
                    missed = late // period + 1
                    self.drops += int(missed)
                    deadline += missed * period
        finally:
            self.pub.close()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()


def run_camera(cell_path: str | Path | None, name: str | None, run_dir: str | Path | None) -> None:
    cell = load_cell(cell_path, run_dir)
    process = CameraProcess(named(cell.camera, name, cell_path), cell.curve)
    signal.signal(signal.SIGTERM, process.request_stop)
    signal.signal(signal.SIGINT, process.request_stop)
    process.run()
