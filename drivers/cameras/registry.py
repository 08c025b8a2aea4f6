"""Cameras are plugins, like backends: the camera process and the cell loader look a camera up by
its ``kind`` and never name one.

Each kind exposes one ``CameraPlugin`` under the ``armada.cameras`` entry-point group in
pyproject.toml (drivers/cameras/plugins.py holds the shipped ones); a lab's own camera package
registers its kind the same way. Plugins import their vendor library (pyrealsense2, cv2) in
``build`` only, so loading the registry to validate a cell imports no camera stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from armada.drivers.core.registry import PluginRegistry, RegistryError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from armada.drivers.cameras.source import CameraSource

ENTRY_POINT_GROUP = "armada.cameras"
DEFAULT_KIND = "synthetic"  # a camera map without ``kind``, as cells were written before kinds existed


@dataclass(frozen=True)
class CameraPlugin:
    kind: str  # the ``kind`` of a cell's camera map
    # Pydantic model of the camera map (extra keys forbidden, ``kind`` included); subclass
    # runtime.config.CameraBaseConfig for the fields every camera process needs.
    config_model: "type[BaseModel]"
    # (camera config, cell folder for relative files, None for a cell built in code) -> source.
    build: "Callable[[Any, Path | None], CameraSource]"


CAMERAS: PluginRegistry[CameraPlugin] = PluginRegistry(ENTRY_POINT_GROUP, CameraPlugin, "camera kind")

__all__ = ["CAMERAS", "CameraPlugin", "DEFAULT_KIND", "ENTRY_POINT_GROUP", "RegistryError"]
