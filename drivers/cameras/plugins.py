"""The shipped camera kinds: synthetic, realsense, opencv. Each is a config model and a
``CameraPlugin`` registered under ``armada.cameras`` in pyproject.toml.

The models live here, not beside their sources, because the sources import their vendor library
(cv2, pyrealsense2) at the top: validating a cell must not import a camera stack, so each
``build`` imports its source module only when a camera process opens one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from armada.drivers.cameras.registry import CameraPlugin
from armada.runtime.config import CameraBaseConfig

if TYPE_CHECKING:
    from armada.drivers.cameras.source import CameraSource


class SyntheticCameraConfig(CameraBaseConfig):
    """A moving pattern with the frame number drawn in; no device."""

    kind: Literal["synthetic"] = "synthetic"


class RealSenseCameraConfig(CameraBaseConfig):
    """An Intel RealSense through pyrealsense2 (or a recording of one played through the real pipeline)."""

    kind: Literal["realsense"]
    serial: str | None = None  # None: the only connected camera
    depth: bool = False  # a depth image aligned to colour travels with each frame
    depth_width: int | None = Field(default=None, gt=0, le=4096)  # None: the colour size
    depth_height: int | None = Field(default=None, gt=0, le=4096)
    # A recording (.db3, relative to the cell file) played instead of a device, e.g. the test fake.
    playback: str | None = None
    repeat_playback: bool = True  # false: the recording's end is a stall (then it is reopened)
    auto_exposure: bool = True
    exposure_us: float | None = Field(default=None, gt=0, le=200_000)  # manual exposure
    gain: float | None = Field(default=None, ge=0)
    # librealsense maps the device clock to host time itself (global time domain).
    global_time: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "RealSenseCameraConfig":
        if self.exposure_us is not None and self.auto_exposure:
            raise ValueError("exposure_us is a manual exposure: set auto_exposure: false with it")
        if (self.depth_width is None) != (self.depth_height is None):
            raise ValueError("give both depth_width and depth_height, or neither")
        return self


class OpenCVCameraConfig(CameraBaseConfig):
    """A UVC camera through OpenCV's V4L2 backend (or a video file played through the same code)."""

    kind: Literal["opencv"]
    # /dev/v4l/by-id/... (stable across reboots and replugging), /dev/videoN, an index, or a
    # video file (relative to the cell file), which plays paced at its own frame rate.
    device: str | int
    fourcc: str = Field(default="MJPG", min_length=4, max_length=4)
    buffer_size: int = Field(default=1, ge=1, le=10)  # driver-side queue: 1 keeps frames fresh
    auto_exposure: bool | None = None  # None: leave the camera's setting alone
    exposure: float | None = Field(default=None, gt=0)  # V4L2 exposure_time_absolute (100 us units)
    repeat_playback: bool = True  # a video file: loop at its end (false: the end is a stall)

    @model_validator(mode="after")
    def _consistent(self) -> "OpenCVCameraConfig":
        if self.exposure is not None and self.auto_exposure:
            raise ValueError("exposure is a manual exposure: set auto_exposure: false with it")
        return self


def _synthetic(cfg: SyntheticCameraConfig, cell_folder: Path | None) -> "CameraSource":
    from armada.drivers.cameras.synthetic import SyntheticSource  # cv2 draws the frame number

    return SyntheticSource(cfg)


def _realsense(cfg: RealSenseCameraConfig, cell_folder: Path | None) -> "CameraSource":
    from armada.drivers.cameras.realsense import RealSenseSource  # pyrealsense2 is imported when it opens

    return RealSenseSource(cfg, cell_folder)


def _opencv(cfg: OpenCVCameraConfig, cell_folder: Path | None) -> "CameraSource":
    from armada.drivers.cameras.opencv_camera import OpenCVSource  # imports cv2

    return OpenCVSource(cfg, cell_folder)


SYNTHETIC = CameraPlugin(kind="synthetic", config_model=SyntheticCameraConfig, build=_synthetic)
REALSENSE = CameraPlugin(kind="realsense", config_model=RealSenseCameraConfig, build=_realsense)
OPENCV = CameraPlugin(kind="opencv", config_model=OpenCVCameraConfig, build=_opencv)


# --------------------------------------------------------------------------- mujoco (simulated cells)


class MujocoCameraConfig(CameraBaseConfig):
    """A camera of a simulated cell: renders the sim driver's newest published scene state.

    The sim driver (backend kind ``mujoco``) owns the only stepping physics and publishes the full
    scene state in each state message (``device["sim"]["qpos"]``); this camera loads the same scene
    model, sets that state and renders its MJCF camera, in its own process so that rendering
    (10-50 ms a frame on a CPU) never delays the driver's ticks. drivers/cameras/mujoco_camera.py.
    """

    kind: Literal["mujoco"]
    scene: str = Field(min_length=1)  # the scene model (drivers/sim/world.py SCENES: so101, aloha)
    camera: str = Field(min_length=1)  # the MJCF camera's name in that scene
    # The sim driver's state PUB endpoint (its ``state`` in the cell), on this host: ipc only (the
    # camera process holds no CURVE client keys).
    state: str

    @model_validator(mode="after")
    def _local_state(self) -> "MujocoCameraConfig":
        from armada.drivers.sim.world import SCENES  # imports no mujoco
        from armada.runtime.endpoints import check_endpoint  # no ZeroMQ import

        if self.scene not in SCENES:
            raise ValueError(f"scene {self.scene!r} is not a sim scene; known scenes: {', '.join(SCENES)}")
        if not self.state.startswith("ipc://"):
            raise ValueError(f"state {self.state!r}: a mujoco camera reads the sim driver's state on this "
                             "host; use its ipc:// endpoint (ipc://{run_dir}/...)")
        check_endpoint(self.state)
        return self


def _mujoco(cfg: MujocoCameraConfig, cell_folder: Path | None) -> "CameraSource":
    from armada.drivers.cameras.mujoco_camera import MujocoCameraSource  # mujoco is imported when it opens

    return MujocoCameraSource(cfg)


MUJOCO = CameraPlugin(kind="mujoco", config_model=MujocoCameraConfig, build=_mujoco)
