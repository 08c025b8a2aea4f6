"""UVC cameras through OpenCV's V4L2 backend, and video files through the same code.

Opening: ``cv2.VideoCapture(path_or_index, cv2.CAP_V4L2)``; FOURCC (MJPG by default: a USB 2
camera cannot carry raw 720p at 30 fps) is set before size and rate, then a driver queue of
one buffer so a grab is never a frame that waited in the queue. What the device granted is read
back; a size other than the configured one is an error, a rate other than asked is logged.
Devices are named by ``/dev/v4l/by-id/...`` (stable across reboots and replugging) or
``/dev/videoN`` or an index; a path that does not exist is reported with the by-id entries
that do. A regular file is a video played at its own frame rate (the test fake).

Timestamps (host wall clock, like every frame):

- V4L2 device: ``CAP_PROP_POS_MSEC`` is the driver's buffer timestamp (``v4l2_buffer.timestamp``),
  which UVC stamps on CLOCK_MONOTONIC at the start of the frame's transfer. It is converted to
  the wall clock through the current monotonic-to-wall offset (clock = ``v4l2:monotonic``). It
  is trusted only when it is a plausible monotonic instant (within 1 s before arrival).
- Otherwise (video files, whose POS_MSEC is the media position, or drivers with other clocks):
  arrival time minus one frame interval, the exposure-plus-transfer estimate
  (clock = ``arrival-interval``).

Drops: a video file has a frame counter (frames played since opening, counting on across
loops), whose gaps are drops; a V4L2 device has none through OpenCV, so the camera process
counts drops from capture-stamp gaps longer than 1.5 frame intervals.

Never blocking forever: a grab thread owns the capture and leaves the newest frame in a
one-slot mailbox; ``read`` waits on it with a timeout (the watchdog). A grab stuck in the driver
is abandoned on close: the thread releases the capture when (if) the driver lets go.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2

from armada.drivers.cameras.source import Captured, SourceError, resolve
from armada.drivers.cameras.timing import wall_from_monotonic_ns

if TYPE_CHECKING:
    from armada.drivers.cameras.plugins import OpenCVCameraConfig

log = logging.getLogger("armada.camera.opencv")

BY_ID = Path("/dev/v4l/by-id")
PLAUSIBLE_NS = 1_000_000_000


def by_id_entries() -> list[str]:
    try:
        return sorted(str(p) for p in BY_ID.iterdir())
    except OSError:
        return []


def _no_such_device(name: str, what: str) -> SourceError:
    entries = by_id_entries()
    listing = f"{BY_ID} has {entries}" if entries else f"{BY_ID} is empty or missing: no V4L2 camera is connected"
    return SourceError(f"camera {name}: {what} does not exist; {listing}")


class OpenCVSource:
    def __init__(self, cfg: "OpenCVCameraConfig", base_dir: Path | None = None):
        self.cfg = cfg
        self.base_dir = base_dir
        self.grabber: _Grabber | None = None

    def open(self) -> dict[str, Any]:
        target, is_file = self._target()
        cap = cv2.VideoCapture(str(target)) if is_file else cv2.VideoCapture(target, cv2.CAP_V4L2)
        try:
            if not cap.isOpened():
                raise SourceError(f"camera {self.cfg.name}: OpenCV cannot open {target!s} "
                                  f"({'video file' if is_file else 'V4L2'}); is it in use by another process?")
            fps = self._configure(cap, target) if not is_file else self._check_file(cap, target)
        except Exception:
            cap.release()
            raise
        self.grabber = _Grabber(cap, fps, is_file, self.cfg.repeat_playback, self.cfg.name)
        return {"source": "opencv", "device": str(target), "backend": cap.getBackendName(), "fps": fps,
                "width": self.cfg.width, "height": self.cfg.height,
                "clock": "arrival-interval" if is_file else "v4l2:monotonic (arrival-interval if implausible)"}

    def _target(self) -> tuple[str | int, bool]:
        device = self.cfg.device
        if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
            return int(device), False
        if device.startswith("/dev/"):
            if not os.path.exists(device):
                raise _no_such_device(self.cfg.name, f"device {device}")
            return device, False
        path = resolve(device, self.base_dir)
        if not path.is_file():
            raise _no_such_device(self.cfg.name, f"`device` {device!r} (neither an index, a /dev path nor a "
                                                 f"video file at {path})")
        return str(path), True

    def _configure(self, cap: Any, target: str | int) -> float:
        cfg = self.cfg
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*cfg.fourcc))  # before size and rate
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
        cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, cfg.buffer_size)
        if cfg.auto_exposure is not None:  # V4L2 exposure_auto menu: 1 manual, 3 aperture priority
            cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 3 if cfg.auto_exposure else 1)
        if cfg.exposure is not None:
            cap.set(cv2.CAP_PROP_EXPOSURE, cfg.exposure)
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if got != (cfg.width, cfg.height):
            raise SourceError(f"camera {cfg.name}: {target} gives {got[0]}x{got[1]} in {cfg.fourcc}, the config "
                              f"asks {cfg.width}x{cfg.height} (its modes: `v4l2-ctl -d {target} --list-formats-ext`)")
        fps = cap.get(cv2.CAP_PROP_FPS)
        if fps <= 0 or abs(fps - cfg.fps) > 0.5:
            log.warning("camera %s: %s runs at %.2f fps, the config asks %.2f", cfg.name, target, fps, cfg.fps)
        return fps if fps > 0 else cfg.fps

    def _check_file(self, cap: Any, target: str | int) -> float:
        cfg = self.cfg
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if got != (cfg.width, cfg.height):
            raise SourceError(f"camera {cfg.name}: video {target} is {got[0]}x{got[1]}, the config asks "
                              f"{cfg.width}x{cfg.height}")
        fps = cap.get(cv2.CAP_PROP_FPS)
        if fps <= 0:
            raise SourceError(f"camera {cfg.name}: video {target} has no frame rate to pace playback by")
        return fps

    def read(self, timeout_s: float) -> Captured | None:
        return self.grabber.take(timeout_s) if self.grabber is not None else None

    def close(self) -> None:
        grabber, self.grabber = self.grabber, None
        if grabber is not None:
            grabber.stop()


class _Grabber:
    """Owns a VideoCapture in a thread; the newest frame waits in a one-slot mailbox."""

    def __init__(self, cap: Any, fps: float, is_file: bool, repeat: bool, name: str):
        self.cap, self.fps, self.is_file, self.repeat, self.name = cap, fps, is_file, repeat, name
        self.period_ns = int(1e9 / fps)
        self._cond = threading.Condition()
        self._frame: Captured | None = None
        self._stop = threading.Event()
        self._played = 0  # frames of a file played in earlier loops: its frame counter keeps counting
        self.ended = False  # the device failed or the file ended (without repeat)
        self._thread = threading.Thread(target=self._run, name=f"grab-{name}", daemon=True)
        self._thread.start()

    def take(self, timeout_s: float) -> Captured | None:
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout_s)
            frame, self._frame = self._frame, None
            return frame

    def stop(self, join_s: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(join_s)
        if self._thread.is_alive():
            log.error("camera %s: the grab thread is stuck in the driver; abandoning that capture", self.name)

    def _run(self) -> None:
        deadline = time.monotonic_ns()
        try:
            while not self._stop.is_set():
                if self.is_file:
                    deadline = self._pace(deadline)
                if not self._grab():
                    self.ended = True
                    log.warning("camera %s: %s", self.name, "end of the video" if self.is_file else "grab failed")
                    return
                self._post(self._retrieve())
        finally:
            self.cap.release()

    def _grab(self) -> bool:
        """Grab the next frame; a repeating file loops without losing a frame slot."""
        if self.cap.grab():
            return True
        if not (self.is_file and self.repeat):
            return False
        self._played += int(self.cap.get(cv2.CAP_PROP_POS_FRAMES))
        return bool(self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)) and self.cap.grab()

    def _pace(self, deadline: int) -> int:
        """Play a file at its own rate: wait for the next frame's instant; skip frames if far behind."""
        deadline += self.period_ns
        late = time.monotonic_ns() - deadline
        if late > 1.5 * self.period_ns:  # a stalled process does not play back in slow motion
            for _ in range(int(late // self.period_ns)):
                self._grab()  # skipped frames leave a gap in the frame counter: counted as drops
            deadline += int(late // self.period_ns) * self.period_ns
        self._stop.wait(max(0, deadline - time.monotonic_ns()) * 1e-9)
        return deadline

    def _retrieve(self) -> Captured | None:
        arrival_ns, arrival_mono = time.time_ns(), time.monotonic_ns()
        pos_ms = self.cap.get(cv2.CAP_PROP_POS_MSEC)
        number = self._played + int(self.cap.get(cv2.CAP_PROP_POS_FRAMES)) - 1 if self.is_file else None
        ok, bgr = self.cap.retrieve()
        if not ok or bgr is None:
            return None
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        device_ns = int(round(pos_ms * 1e6))
        if not self.is_file and 0 <= arrival_mono - device_ns < PLAUSIBLE_NS:
            return Captured(rgb, wall_from_monotonic_ns(device_ns), "v4l2:monotonic", None, device_ns, "v4l2_monotonic")
        domain = "media_position" if self.is_file else "v4l2_unknown"
        return Captured(rgb, arrival_ns - self.period_ns, "arrival-interval", number, device_ns, domain)

    def _post(self, frame: Captured | None) -> None:
        if frame is None:
            return
        with self._cond:
            self._frame = frame  # an unread older frame is replaced: the publisher was late
            self._cond.notify()
