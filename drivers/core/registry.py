"""Devices are plugins: the driver core, the config loader and the CLI look a backend up by its
``kind`` and never name a device.

Each device folder (drivers/<device>/plugin.py) exposes one ``BackendPlugin`` and registers it
under the ``armada.backends`` entry-point group in pyproject.toml, the way ros2_control loads
hardware interfaces by name; a lab ships its own robot the same way, from its own package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pydantic import BaseModel

    from drivers.core.backend import Backend
    from runtime.config import DriverConfig, EmbodimentConfig

ENTRY_POINT_GROUP = "armada.backends"


@dataclass(frozen=True)
class BuildContext:
    """What a factory gets to build one driver's backend."""

    driver: "DriverConfig"  # ``driver.backend`` is an instance of the plugin's ``config_model``
    embodiment: "EmbodimentConfig"
    cell_dir: Path | None  # the cell file's folder: relative paths (calibration files) resolve here


@dataclass(frozen=True)
class BackendPlugin:
    kind: str  # the ``backend.kind`` a cell names
    # Pydantic model of the cell's ``backend:`` map (extra keys forbidden, ``kind`` included).
    config_model: "type[BaseModel]"
    # Builds the backend; imports the vendor SDK lazily (the driver process imports only its own).
    build: "Callable[[BuildContext], Backend]"
    # False only for mocks and simulators: decides whether `armada run` may arm without --arm.
    moves_hardware: bool
    # Run when the cell loads: raise ValueError (dof, joint names, ...) so a mismatch fails at
    # load naming the driver, not at driver start.
    check_embodiment: "Callable[[Any, EmbodimentConfig], None] | None" = None
    # The `armada calibrate joints` kind whose files this backend applies, if any.
    joint_calibration_kind: str | None = None
    # `armada fake KIND ARGS...`: a protocol-level fake of the device; returns an exit code.
    fake: "Callable[[list[str]], int] | None" = None
    # `armada bench KIND`: the real SDK against the fake; returns a dict of results to print.
    bench: "Callable[[float], dict[str, Any]] | None" = None
