"""Picks the source for a camera config. Apart from source.py (the interface its implementations
import) so that the interface module never imports them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from drivers.cameras.source import CameraSource

if TYPE_CHECKING:
    from runtime.config import CameraConfig


def make_source(cfg: "CameraConfig", base_dir: Path | None = None) -> CameraSource:
    """The source for a camera config; relative file paths are resolved against ``base_dir``."""
    if cfg.kind == "realsense":
        from drivers.cameras.realsense import RealSenseSource

        return RealSenseSource(cfg, base_dir)
    if cfg.kind == "opencv":
        from drivers.cameras.opencv_camera import OpenCVSource

        return OpenCVSource(cfg, base_dir)
    from drivers.cameras.synthetic import SyntheticSource

    return SyntheticSource(cfg)
