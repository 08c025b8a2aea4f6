"""Hand-eye calibration: where a camera is relative to the robot.

Eye-in-hand (a wrist camera): the board stays put, the arm moves; the answer is
``gripper_T_camera``. Eye-to-hand (a static camera): the board is held by the gripper; the
answer is ``base_T_camera``. ``A_T_B`` maps points in frame B into frame A, metres.

Inputs per view: the pose the driver reports, ``base_T_gripper``, and the board pose found in
the image, ``camera_T_board``. The views must be taken with the arm at rest (a moving arm and
a camera frame are never sampled at the same instant).

Every OpenCV method is tried; the one whose answer is most self-consistent wins. Consistency is
the residual: with the answer, each view predicts the pose of the thing that did not move (the
board in the base frame, or the board in the gripper frame); their scatter, in mm and degrees,
is what we report and refuse on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from armada.calibration.types import HandEyeMode

HAND_EYE_METHODS: dict[str, int] = {
    "TSAI": cv2.CALIB_HAND_EYE_TSAI,
    "PARK": cv2.CALIB_HAND_EYE_PARK,
    "HORAUD": cv2.CALIB_HAND_EYE_HORAUD,
    "ANDREFF": cv2.CALIB_HAND_EYE_ANDREFF,
    "DANIILIDIS": cv2.CALIB_HAND_EYE_DANIILIDIS,
}
# Robot-world-hand-eye solvers estimate the board pose together with the camera pose.
ROBOT_WORLD_METHODS: dict[str, int] = {
    "SHAH": cv2.CALIB_ROBOT_WORLD_HAND_EYE_SHAH,
    "LI": cv2.CALIB_ROBOT_WORLD_HAND_EYE_LI,
}
ALL_METHODS = (*HAND_EYE_METHODS, *ROBOT_WORLD_METHODS)

DEFAULT_MAX_MM = 5.0
DEFAULT_MAX_DEG = 1.0
DEFAULT_MIN_VIEWS = 6
MIN_ROTATION_DEG = 15.0  # the largest rotation between two views must reach this ...
MIN_AXIS_SPREAD_DEG = 20.0  # ... and the rotation axes must differ by this much


class HandEyeRefused(Exception):
    """A hand-eye result that must not be used. ``result`` is set when one was computed."""

    def __init__(self, reasons: list[str], result: "HandEyeResult | None" = None):
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.result = result


# --------------------------------------------------------------------------- poses


def make_pose(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.asarray(t, np.float64).reshape(3)
    return T


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform (exact, unlike a general matrix inverse)."""
    R, t = T[:3, :3], T[:3, 3]
    return make_pose(R.T, -R.T @ t)


def pose_from_ur(tcp_pose: Sequence[float]) -> np.ndarray:
    """base_T_tcp from a UR-style pose (x, y, z in metres, then a rotation vector in radians), as
    Universal Robots controllers report their TCP pose."""
    p = np.asarray(tcp_pose, np.float64).reshape(-1)
    if p.shape != (6,) or not np.all(np.isfinite(p)):
        raise ValueError(f"a UR pose is 6 finite numbers (x, y, z, rx, ry, rz), got {tcp_pose!r}")
    return make_pose(cv2.Rodrigues(p[3:])[0], p[:3])


def pose_to_ur(T: np.ndarray) -> np.ndarray:
    return np.concatenate([T[:3, 3], cv2.Rodrigues(np.ascontiguousarray(T[:3, :3]))[0].reshape(3)])


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation matrix. atan2 of sine and cosine stays accurate near zero, where
    arccos of the trace loses half the digits (a 1e-8 rad error reads as 1e-4 rad)."""
    sin = 0.5 * np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    cos = 0.5 * (np.trace(R) - 1)
    return float(np.degrees(np.arctan2(sin, cos)))


def mean_pose(poses: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of rigid transforms: mean translation, and the rotation nearest (Frobenius) to the mean
    rotation matrix (exact enough for the small scatter a calibration has)."""
    Rs = np.mean([T[:3, :3] for T in poses], axis=0)
    U, _, Vt = np.linalg.svd(Rs)
    R = U @ np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    return make_pose(R, np.mean([T[:3, 3] for T in poses], axis=0))


def scatter(poses: Sequence[np.ndarray]) -> tuple[float, float, np.ndarray]:
    """RMS distance (mm) and RMS angle (deg) of poses from their mean, and the mean."""
    m = mean_pose(poses)
    d_mm = [1000 * np.linalg.norm(T[:3, 3] - m[:3, 3]) for T in poses]
    d_deg = [rotation_angle_deg(m[:3, :3].T @ T[:3, :3]) for T in poses]
    return float(np.sqrt(np.mean(np.square(d_mm)))), float(np.sqrt(np.mean(np.square(d_deg)))), m


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MethodResult:
    method: str
    transform: np.ndarray  # gripper_T_camera (eye-in-hand) or base_T_camera (eye-to-hand)
    residual_mm: float
    residual_deg: float
    board_pose: np.ndarray  # base_T_board (eye-in-hand) or gripper_T_board (eye-to-hand)


@dataclass(frozen=True)
class HandEyeResult:
    mode: HandEyeMode
    best: MethodResult
    methods: list[MethodResult]  # every method that produced an answer, best first
    views: int
    rotation_spread_deg: float  # largest rotation between two views
    axis_spread_deg: float  # largest angle between the rotation axes of view pairs
    failed: dict[str, str] = field(default_factory=dict)  # method -> why it gave no answer

    @property
    def transform(self) -> np.ndarray:
        return self.best.transform

    @property
    def residual_mm(self) -> float:
        return self.best.residual_mm

    @property
    def residual_deg(self) -> float:
        return self.best.residual_deg


@dataclass(frozen=True)
class HandEyeLimits:
    max_mm: float = DEFAULT_MAX_MM
    max_deg: float = DEFAULT_MAX_DEG
    min_views: int = DEFAULT_MIN_VIEWS
    min_rotation_deg: float = MIN_ROTATION_DEG
    min_axis_spread_deg: float = MIN_AXIS_SPREAD_DEG


# --------------------------------------------------------------------------- calibration


def calibrate_hand_eye(base_T_gripper: Sequence[np.ndarray], camera_T_board: Sequence[np.ndarray],
                       mode: HandEyeMode, *, methods: Sequence[str] = ALL_METHODS,
                       limits: HandEyeLimits = HandEyeLimits(), refuse: bool = True) -> HandEyeResult:
    """Solve with every method in ``methods``; the best is the one with the smallest residual
    (millimetres and degrees, each divided by its limit, summed)."""
    robot = [np.asarray(T, np.float64) for T in base_T_gripper]
    board = [np.asarray(T, np.float64) for T in camera_T_board]
    _check_inputs(robot, board, mode, methods, limits)
    rot_spread, axis_spread = rotation_diversity(robot)
    results, failed = [], {}
    for name in methods:
        try:
            X = _solve(name, robot, board, mode)
        except cv2.error as exc:
            failed[name] = str(exc).strip().splitlines()[-1]
            continue
        if not np.all(np.isfinite(X)):
            failed[name] = "non-finite answer"
            continue
        mm, deg, fixed = scatter(fixed_poses(robot, board, X, mode))
        results.append(MethodResult(name, X, mm, deg, fixed))
    if not results:
        raise HandEyeRefused([f"no method produced an answer: {failed}"])
    results.sort(key=lambda r: r.residual_mm / limits.max_mm + r.residual_deg / limits.max_deg)
    result = HandEyeResult(mode, results[0], results, len(robot), rot_spread, axis_spread, failed)
    problems = check_hand_eye(result, limits)
    if problems and refuse:
        raise HandEyeRefused(problems, result)
    return result


def fixed_poses(base_T_gripper: Sequence[np.ndarray], camera_T_board: Sequence[np.ndarray], X: np.ndarray,
                mode: HandEyeMode) -> list[np.ndarray]:
    """What each view says about the pose that should not change: base_T_board (eye-in-hand,
    X = gripper_T_camera) or gripper_T_board (eye-to-hand, X = base_T_camera)."""
    if mode == "eye_in_hand":
        return [G @ X @ C for G, C in zip(base_T_gripper, camera_T_board)]
    return [invert(G) @ X @ C for G, C in zip(base_T_gripper, camera_T_board)]


def check_hand_eye(result: HandEyeResult, limits: HandEyeLimits) -> list[str]:
    problems = []
    if result.residual_mm > limits.max_mm or result.residual_deg > limits.max_deg:
        problems.append(f"residual {result.residual_mm:.2f} mm / {result.residual_deg:.3f} deg exceeds "
                        f"{limits.max_mm} mm / {limits.max_deg} deg (best method {result.best.method}); check "
                        "that the arm was at rest in every view, the board did not move, and the intrinsics "
                        "and the board's square size are right")
    return problems


def rotation_diversity(base_T_gripper: Sequence[np.ndarray]) -> tuple[float, float]:
    """Largest rotation between two gripper poses, and the largest angle between the rotation
    axes of view pairs that rotate by at least 5 degrees (both in degrees). Hand-eye needs
    rotations about at least two different axes; about one axis, the camera's offset along that
    axis cannot be told apart."""
    axes, largest = [], 0.0
    for i in range(len(base_T_gripper)):
        for j in range(i + 1, len(base_T_gripper)):
            rel = base_T_gripper[i][:3, :3].T @ base_T_gripper[j][:3, :3]
            rvec = cv2.Rodrigues(rel)[0].reshape(3)
            angle = float(np.degrees(np.linalg.norm(rvec)))
            largest = max(largest, angle)
            if angle >= 5.0:
                axes.append(rvec / np.linalg.norm(rvec))
    if len(axes) < 2:
        return largest, 0.0
    A = np.array(axes)
    cos = np.abs(A @ A.T)  # an axis and its opposite are the same axis
    return largest, float(np.degrees(np.arccos(np.clip(cos.min(), 0.0, 1.0))))


def _check_inputs(robot: list[np.ndarray], board: list[np.ndarray], mode: str, methods: Sequence[str],
                  limits: HandEyeLimits) -> None:
    if mode not in ("eye_in_hand", "eye_to_hand"):
        raise ValueError(f"mode must be 'eye_in_hand' or 'eye_to_hand', got {mode!r}")
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown hand-eye methods {unknown}; known: {list(ALL_METHODS)}")
    if len(robot) != len(board):
        raise ValueError(f"{len(robot)} robot poses but {len(board)} board poses: they must pair up view by view")
    for what, poses in (("robot", robot), ("board", board)):
        for i, T in enumerate(poses):
            if T.shape != (4, 4) or not np.all(np.isfinite(T)):
                raise ValueError(f"{what} pose {i} is not a finite 4x4 matrix")
            if abs(np.linalg.det(T[:3, :3]) - 1) > 1e-3:
                raise ValueError(f"{what} pose {i} has no proper rotation (det {np.linalg.det(T[:3, :3]):.4f})")
    if len(robot) < limits.min_views:
        raise HandEyeRefused([f"only {len(robot)} views (need at least {limits.min_views})"])
    largest, spread = rotation_diversity(robot)
    if largest < limits.min_rotation_deg:
        raise HandEyeRefused([f"the gripper rotates by at most {largest:.1f} deg between views (need "
                              f"{limits.min_rotation_deg}); turn the wrist more between views"])
    if spread < limits.min_axis_spread_deg:
        raise HandEyeRefused([f"the gripper rotations all turn about nearly one axis (spread {spread:.1f} deg, "
                              f"need {limits.min_axis_spread_deg}); rotate about other axes too"])


def _solve(name: str, robot: list[np.ndarray], board: list[np.ndarray], mode: str) -> np.ndarray:
    if name in HAND_EYE_METHODS:
        # Eye-to-hand is the same problem with the robot poses inverted (OpenCV's documented trick):
        # the "gripper" is then the base and the answer is base_T_camera.
        motion = robot if mode == "eye_in_hand" else [invert(T) for T in robot]
        R, t = cv2.calibrateHandEye([T[:3, :3] for T in motion], [T[:3, 3] for T in motion],
                                    [T[:3, :3] for T in board], [T[:3, 3] for T in board],
                                    method=HAND_EYE_METHODS[name])
        return make_pose(R, t)
    # calibrateRobotWorldHandEye solves cam_T_board = Y @ M_i @ Z for per-view M_i (its
    # "base2gripper"), returning Z^-1 ("base2world") and Y ("gripper2cam"). Eye-in-hand:
    # M_i = gripper_T_base, Y = camera_T_gripper. Eye-to-hand: M_i = base_T_gripper,
    # Y = camera_T_base.
    motion = [invert(T) for T in robot] if mode == "eye_in_hand" else robot
    _, _, R, t = cv2.calibrateRobotWorldHandEye([T[:3, :3] for T in board], [T[:3, 3] for T in board],
                                                [T[:3, :3] for T in motion], [T[:3, 3] for T in motion],
                                                method=ROBOT_WORLD_METHODS[name])
    return invert(make_pose(R, t))
