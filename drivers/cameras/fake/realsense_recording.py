"""A synthetic RealSense recording, written by librealsense itself.

A ``rs.software_device`` with a colour and a depth sensor (intrinsics, a 15 mm baseline, depth
units of 1 mm) produces software frames with known frame numbers and hardware-clock
timestamps; ``rs.recorder`` writes them to a file that ``rs.pipeline`` then plays back through
``config.enable_device_from_file``, the same code path as a real camera from there on.

Facts (pyrealsense2 2.59): the recorder writes ROS 2 bags and refuses any file name not ending
in ``.db3``; real-time playback follows the time the frames reached the recorder, not their
timestamps, so the frames are fed at the recording's rate (a 2 s recording takes 2 s to make).

Colour frames are the synthetic pattern with the frame number drawn in; depth is a wall at
``wall_m`` with a box at ``box_m`` sliding across it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from armada.drivers.cameras.synthetic import SyntheticCamera

DEPTH_UNITS_M = 0.001
BASELINE_M = 0.015  # colour camera 15 mm to the side of the depth camera, as on a D435


@dataclass(frozen=True)
class Recording:
    path: Path
    serial: str
    width: int
    height: int
    depth_width: int
    depth_height: int
    fps: float
    first_frame: int  # the device frame number of the first recorded frame
    frames: int  # frame slots covered, including the skipped ones
    skipped: tuple[int, ...] = field(default=())  # device frame numbers never delivered (drops)
    first_ts_ms: float = 0.0  # hardware clock of the first frame
    wall_m: float = 0.8
    box_m: float = 0.5


def make_recording(path: str | Path, *, width: int = 320, height: int = 240, depth_size: tuple[int, int] | None = None,
                   fps: float = 30.0, seconds: float = 2.0, serial: str = "000000000042",
                   first_frame: int = 100, skipped: tuple[int, ...] = (), depth: bool = True,
                   first_ts_ms: float = 5_000_000.0) -> Recording:
    """Record ``seconds`` of synthetic frames to ``path`` (must end in .db3); returns what it holds."""
    import pyrealsense2 as rs

    path = Path(path)
    if path.suffix != ".db3":
        raise ValueError(f"{path}: librealsense 2.59 records ROS 2 bags only, the name must end in .db3")
    dw, dh = depth_size or (width, height)
    rec = Recording(path, serial, width, height, dw, dh, fps, first_frame, max(1, round(seconds * fps)),
                    tuple(skipped), first_ts_ms)
    dev = rs.software_device()
    dev.register_info(rs.camera_info.serial_number, serial)
    dev.register_info(rs.camera_info.name, "armada fake RealSense")
    colour_sensor = dev.add_sensor("RGB Camera")
    colour = colour_sensor.add_video_stream(_stream(rs, rs.stream.color, 1, width, height, fps, rs.format.rgb8, 3))
    streams = [(colour_sensor, colour)]
    if depth:  # fed before colour, so the pipeline's syncer pairs each colour frame with its own depth
        depth_sensor = dev.add_sensor("Stereo Module")
        depth_profile = depth_sensor.add_video_stream(_stream(rs, rs.stream.depth, 0, dw, dh, fps, rs.format.z16, 2))
        depth_sensor.add_read_only_option(rs.option.depth_units, DEPTH_UNITS_M)
        extrinsics = rs.extrinsics()
        extrinsics.rotation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        extrinsics.translation = [BASELINE_M, 0.0, 0.0]
        depth_profile.register_extrinsics_to(colour, extrinsics)
        streams.insert(0, (depth_sensor, depth_profile))
    path.parent.mkdir(parents=True, exist_ok=True)
    recorder = rs.recorder(str(path), dev)
    _feed(rs, rec, streams)
    del recorder  # closes the file
    return rec


def _stream(rs, kind, uid: int, w: int, h: int, fps: float, fmt, bpp: int):
    intr = rs.intrinsics()
    intr.width, intr.height = w, h
    intr.ppx, intr.ppy = w / 2, h / 2
    intr.fx = intr.fy = 0.9 * w  # about a D435's 69 degree horizontal field of view
    intr.model = rs.distortion.none
    intr.coeffs = [0.0] * 5
    vs = rs.video_stream()
    vs.type, vs.index, vs.uid = kind, 0, uid
    vs.width, vs.height, vs.fps, vs.bpp, vs.fmt = w, h, int(round(fps)), bpp, fmt
    vs.intrinsics = intr
    return vs


def _feed(rs, rec: Recording, streams: list) -> None:
    """Push the frames at the recording's rate (the recorder keeps their arrival times)."""
    queue = rs.frame_queue(64)
    for sensor, profile in streams:
        sensor.open(profile)
        sensor.start(queue)
    pattern = SyntheticCamera(rec.width, rec.height)
    period_ns = int(1e9 / rec.fps)
    deadline = time.monotonic_ns()
    try:
        for i in range(rec.frames):
            number = rec.first_frame + i
            deadline += period_ns
            time.sleep(max(0, deadline - time.monotonic_ns()) * 1e-9)
            if number in rec.skipped:
                continue
            ts_ms = rec.first_ts_ms + i * 1e3 / rec.fps
            for sensor, profile in streams:
                image = pattern.grab(number) if profile.stream_type() == rs.stream.color else depth_image(rec, i)
                sensor.on_video_frame(_software_frame(rs, image, profile, number, ts_ms))
            while queue.poll_for_frame():
                pass  # nobody watches the live stream; the recorder has its own copy
    finally:
        for sensor, _ in streams:
            sensor.stop()
            sensor.close()


def depth_image(rec: Recording, i: int) -> np.ndarray:
    """A wall with a box sliding across it, in depth units (1 mm)."""
    img = np.full((rec.depth_height, rec.depth_width), round(rec.wall_m / DEPTH_UNITS_M), np.uint16)
    side = rec.depth_height // 4
    x = (i * 4) % max(1, rec.depth_width - side)
    img[rec.depth_height // 8: rec.depth_height // 8 + side, x:x + side] = round(rec.box_m / DEPTH_UNITS_M)
    return img


def _software_frame(rs, image: np.ndarray, profile, number: int, ts_ms: float):
    frame = rs.software_video_frame()
    frame.pixels = np.ascontiguousarray(image)
    frame.bpp = image.itemsize * (image.shape[2] if image.ndim == 3 else 1)
    frame.stride = image.shape[1] * frame.bpp
    frame.timestamp = ts_ms
    frame.domain = rs.timestamp_domain.hardware_clock
    frame.frame_number = number
    frame.profile = profile.as_video_stream_profile()
    if image.dtype == np.uint16:
        frame.depth_units = DEPTH_UNITS_M
    return frame
