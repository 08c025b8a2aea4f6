"""Picks the source for a camera config through the camera registry. Apart from source.py (the
interface its implementations import) so that the interface module never imports them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from armada.drivers.cameras.registry import CAMERAS
from armada.drivers.cameras.source import CameraSource


def make_source(cfg: Any, base_dir: Path | None = None) -> CameraSource:
    """The source for a camera config (a registered kind's model); relative file paths resolve
    against ``base_dir``, the cell's folder."""
    return CAMERAS.get(cfg.kind).build(cfg, base_dir)
