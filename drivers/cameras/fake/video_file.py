"""A generated video file for the OpenCV camera path: MJPG in an .avi, frame numbers drawn in.

The same pattern as the synthetic camera, so a test reads from the pixels which frame it got.
Played through the real ``cv2.VideoCapture`` by ``OpenCVSource``, paced at the file's rate.
"""

from __future__ import annotations

from pathlib import Path

import cv2

from armada.drivers.cameras.synthetic import SyntheticCamera


def make_video(path: str | Path, *, width: int = 320, height: int = 240, fps: float = 30.0, frames: int = 60) -> Path:
    path = Path(path)
    if path.suffix != ".avi":
        raise ValueError(f"{path}: MJPG goes in an .avi container")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an MJPG video to {path}")
    pattern = SyntheticCamera(width, height)
    try:
        for i in range(frames):
            writer.write(cv2.cvtColor(pattern.grab(i), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
