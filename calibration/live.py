"""Calibration from a running cell: frames from a camera process, poses from a driver's state.

The sockets are the cell's own (``runtime.transport``); nothing here talks to a device. The
logic that decides which views to keep is separate from the sockets so tests can feed it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from armada.calibration.boards import Board, Detection
from armada.calibration.handeye import invert, pose_from_ur, rotation_angle_deg
from armada.calibration.intrinsics import board_pose
from armada.calibration.types import CameraIntrinsics

# Where a driver's state carries the tool pose: ``device.tcp_pose`` (the backend's extras), as
# x, y, z (m) and a rotation vector (rad) in the base frame, published by backends that know it.
STATE_POSE_FIELD = "tcp_pose"


class LiveError(RuntimeError):
    """A live capture cannot go on (no frames, no pose in the state); the message says why."""


# --------------------------------------------------------------------------- streams


@dataclass
class CellStreams:
    """The sockets one calibration needs: a camera's frames and, optionally, a driver's state."""

    ctx: Any
    frames: Any
    state: Any | None
    camera_name: str
    driver_name: str | None
    joint_names: list[str]

    @classmethod
    def open(cls, cell_path: Path, camera: str | None, driver: str | None = None,
             run_dir: Path | None = None, frame_hwm: int = 8) -> "CellStreams":
        import zmq

        from armada.runtime.config import load_cell
        from armada.runtime.transport import FrameSubscriber, Subscriber

        cell = load_cell(cell_path, run_dir)
        cam = cell.camera(camera)
        ctx = zmq.Context()
        frames = FrameSubscriber(ctx, cam.frames, hwm=frame_hwm, curve=cell.curve)
        state, joints, drv_name = None, [], None
        if driver is not None:
            drv = cell.driver(driver)
            state = Subscriber(ctx, drv.state, curve=cell.curve)
            joints, drv_name = cell.embodiment(drv).joint_names, drv.name
        return cls(ctx, frames, state, cam.name, drv_name, joints)

    def iter_frames(self, timeout_s: float = 3.0, latest: bool = True) -> Iterator[Any]:
        """Frames (``runtime.transport.Frame``) until the caller stops; newest-only by default."""
        while True:
            rejected = self.frames.counters.rejected
            frame = self.frames.recv_latest(timeout_s) if latest else self.frames.recv(timeout_s)
            if frame is None and self.frames.counters.rejected > rejected:
                continue  # a malformed frame arrived (and was counted); wait for the next one
            if frame is None:
                raise LiveError(f"no frame from camera {self.camera_name!r} within {timeout_s:g} s: "
                                "is its `armada camera` process running?")
            yield frame

    def drain_state(self) -> list[dict[str, Any]]:
        return self.state.drain() if self.state is not None else []

    def close(self) -> None:
        self.frames.close()
        if self.state is not None:
            self.state.close()
        self.ctx.term()

    def __enter__(self) -> "CellStreams":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def state_pose(msg: dict[str, Any], driver: str | None = None) -> np.ndarray:
    """base_T_gripper from a driver's state message (``device.tcp_pose``)."""
    device = msg.get("device") if isinstance(msg.get("device"), dict) else {}
    pose = device.get(STATE_POSE_FIELD, msg.get(STATE_POSE_FIELD))
    if pose is None:
        raise LiveError(f"driver {driver or '?'} publishes no device.{STATE_POSE_FIELD} in its state, so live "
                        "hand-eye cannot read the arm's pose; record poses with the images and use --images/--poses")
    return pose_from_ur(np.asarray(pose, np.float64))


# --------------------------------------------------------------------------- hand-eye views


@dataclass(frozen=True)
class HandEyeView:
    base_T_gripper: np.ndarray
    camera_T_board: np.ndarray
    reprojection_px: float
    corners: int


@dataclass(frozen=True)
class StillnessLimits:
    window_s: float = 0.5  # the arm must have been at rest this long before a view is taken
    max_mm: float = 0.2
    max_deg: float = 0.05
    # A new view must differ from every kept one by this much (a repeat adds nothing).
    min_new_deg: float = 5.0
    min_new_mm: float = 20.0
    max_reprojection_px: float = 1.0


class HandEyeCollector:
    """Keeps a view when the arm has been at rest for a while, the board is seen, and the pose
    is new. The person (or a script) moves the arm between views; the collector never moves it."""

    def __init__(self, board: Board, intrinsics: CameraIntrinsics, limits: StillnessLimits = StillnessLimits(),
                 on_progress: Callable[[str], None] | None = None):
        self.board, self.intrinsics, self.limits = board, intrinsics, limits
        self.on_progress = on_progress or (lambda _line: None)
        self.views: list[HandEyeView] = []
        self.images: list[np.ndarray] = []
        self._poses: deque[tuple[float, np.ndarray]] = deque()
        self._last_status = ""

    def add_pose(self, t_s: float, base_T_gripper: np.ndarray) -> None:
        self._poses.append((t_s, base_T_gripper))
        while self._poses and self._poses[0][0] < t_s - 4 * self.limits.window_s:
            self._poses.popleft()

    def offer(self, image: np.ndarray, t_s: float) -> bool:
        """Consider a frame captured at ``t_s`` (same clock as the poses)."""
        pose, why = self._rest_pose(t_s)
        if pose is None:
            return self._status(why)
        if not self._novel(pose):
            return self._status("same pose as a kept view: move the arm")
        det = self.board.detect(image)
        if det is None:
            return self._status("arm at rest, but no board in view")
        T, err = board_pose(det, self.intrinsics)
        if err > self.limits.max_reprojection_px:
            return self._status(f"board pose reprojects at {err:.2f} px (limit {self.limits.max_reprojection_px}): "
                                "blurred or wrong intrinsics?")
        self.views.append(HandEyeView(pose, T, err, det.count))
        self.images.append(np.array(image, copy=True))
        self.on_progress(f"view {len(self.views)} kept: {det.count} corners, board pose {err:.2f} px")
        self._last_status = ""
        return True

    def _rest_pose(self, t_s: float) -> tuple[np.ndarray | None, str]:
        lim = self.limits
        recent = [T for t, T in self._poses if t_s - lim.window_s <= t <= t_s + 0.05]
        covered = self._poses and self._poses[0][0] <= t_s - lim.window_s
        if not recent or not covered:
            return None, "waiting for robot state"
        ref = recent[-1]
        for T in recent:
            if 1000 * np.linalg.norm(T[:3, 3] - ref[:3, 3]) > lim.max_mm or \
                    rotation_angle_deg(ref[:3, :3].T @ T[:3, :3]) > lim.max_deg:
                return None, "arm moving"
        return ref, ""

    def _novel(self, pose: np.ndarray) -> bool:
        for v in self.views:
            rel = invert(v.base_T_gripper) @ pose
            if rotation_angle_deg(rel[:3, :3]) < self.limits.min_new_deg and \
                    1000 * np.linalg.norm(rel[:3, 3]) < self.limits.min_new_mm:
                return False
        return True

    def _status(self, why: str) -> bool:
        if why != self._last_status:  # say each state once, not thirty times a second
            self.on_progress(why)
            self._last_status = why
        return False


# --------------------------------------------------------------------------- latency recording


@dataclass(frozen=True)
class LatencyRecording:
    ref_t: np.ndarray  # seconds, host wall clock (state t_ns)
    ref_x: np.ndarray  # the joint's measured position
    frame_t: np.ndarray  # seconds, host wall clock (frame capture_ns)
    board_u: np.ndarray  # image x of the board centre (NaN where not seen)
    board_v: np.ndarray  # image y of the board centre


def board_centre_px(det: Detection | None, board: Board) -> tuple[float, float]:
    """Where the board's centre is in the image, from a homography over the detected corners:
    unlike the mean of the corners, it does not jump when some corners drop out."""
    import cv2

    if det is None:
        return float("nan"), float("nan")
    H, _ = cv2.findHomography(det.object_points[:, :2], det.image_points)
    if H is None:
        return float("nan"), float("nan")
    w, h = board.spec.size_m
    c = H @ np.array([w / 2, h / 2, 1.0])
    return float(c[0] / c[2]), float(c[1] / c[2])


def record_latency(streams: CellStreams, board: Board, joint: str, seconds: float,
                   on_progress: Callable[[str], None] | None = None) -> LatencyRecording:
    """Record every frame and every state message for ``seconds`` while someone moves ``joint``
    so the board (held by the arm, or in front of a wrist camera) swings through the image."""
    from armada.calibration.boards import to_gray

    if joint not in streams.joint_names:
        raise LiveError(f"driver {streams.driver_name} has no joint {joint!r}; it has {streams.joint_names}")
    j = streams.joint_names.index(joint)
    ref_t, ref_x, frame_t, grays = [], [], [], []
    end = time.monotonic() + seconds
    for frame in streams.iter_frames(latest=False):
        frame_t.append(frame.header["capture_ns"] * 1e-9)
        grays.append(to_gray(frame.pixels))
        for msg in streams.drain_state():
            ref_t.append(msg["t_ns"] * 1e-9)
            ref_x.append(float(np.asarray(msg["measured"])[j]))
        if on_progress and len(frame_t) % 30 == 0:
            left = max(0.0, end - time.monotonic())
            on_progress(f"recording: {len(frame_t)} frames, {len(ref_t)} states, {left:.0f} s left")
        if time.monotonic() >= end:
            break
    centres = np.array([board_centre_px(board.detect(g), board) for g in grays]).reshape(-1, 2)
    return LatencyRecording(np.array(ref_t), np.array(ref_x), np.array(frame_t), centres[:, 0], centres[:, 1])
