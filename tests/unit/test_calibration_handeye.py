"""Hand-eye from synthetic pose sets (exact and noisy) and from rendered images.

Tolerances: exact poses, every method within 1e-6 (this pins each method's frame conventions
in both modes). Noisy poses (robot and board poses each with 0.5 mm and 0.1 deg of noise, 15
views): the chosen answer within 3 mm and 0.5 deg (achieved about 1-2.5 mm and 0.1-0.3 deg).
"""

import cv2
import numpy as np
import pytest

from armada.calibration.boards import Board, CharucoBoardSpec
from armada.calibration.handeye import ALL_METHODS, HandEyeLimits, HandEyeRefused, calibrate_hand_eye, fixed_poses, \
    invert, make_pose, pose_from_ur, pose_to_ur, rotation_angle_deg
from armada.calibration.intrinsics import board_pose
from armada.calibration.synthetic import default_camera, render_view, sample_board_poses
from armada.calibration.types import CameraIntrinsics

MM_TOL, DEG_TOL = 3.0, 0.5


def _rot(rng: np.random.Generator, deg: float) -> np.ndarray:
    return cv2.Rodrigues(np.radians(rng.uniform(-deg, deg, 3)))[0]


def _noisy(T: np.ndarray, rng: np.random.Generator, mm: float, deg: float) -> np.ndarray:
    R = cv2.Rodrigues(np.radians(rng.normal(0, deg, 3)))[0]
    return make_pose(R @ T[:3, :3], T[:3, 3] + rng.normal(0, mm / 1000, 3))


def _camera_views(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """camera_T_board for a 0.28 x 0.2 m board seen from 0.35-0.55 m, tilted up to 30 deg."""
    out = []
    for _ in range(n):
        R = _rot(rng, 30)
        t = np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.08, 0.08), rng.uniform(0.35, 0.55)])
        out.append(make_pose(R, t - R @ np.array([0.14, 0.1, 0.0])))
    return out


def make_scene(mode: str, n: int, seed: int, camera_views: list[np.ndarray] | None = None):
    """Truth X (gripper_T_camera or base_T_camera), the fixed board pose, and consistent pose pairs."""
    rng = np.random.default_rng(seed)
    cams = camera_views or _camera_views(rng, n)
    if mode == "eye_in_hand":
        X = make_pose(_rot(rng, 180), rng.uniform(-0.08, 0.08, 3))  # camera near the flange
        board = make_pose(_rot(rng, 10), [0.45, 0.05, 0.0])  # base_T_board, on the table
        robot = [board @ invert(C) @ invert(X) for C in cams]
    else:
        X = make_pose(_rot(rng, 180), [0.7, 0.3, 0.6])  # a camera on a stand
        board = make_pose(_rot(rng, 10), [0.0, 0.0, 0.06])  # gripper_T_board, held in the gripper
        robot = [X @ C @ invert(board) for C in cams]
    return X, board, robot, cams, rng


def _error(T: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return 1000 * float(np.linalg.norm(T[:3, 3] - truth[:3, 3])), rotation_angle_deg(T[:3, :3].T @ truth[:3, :3])


@pytest.mark.parametrize("mode", ["eye_in_hand", "eye_to_hand"])
def test_exact_poses_every_method_exact(mode):
    X, board, robot, cams, _ = make_scene(mode, 10, seed=0)
    result = calibrate_hand_eye(robot, cams, mode)
    assert {m.method for m in result.methods} == set(ALL_METHODS) and not result.failed
    for m in result.methods:
        mm, deg = _error(m.transform, X)
        assert mm < 1e-3 and deg < 1e-6, (m.method, mm, deg)
        assert m.residual_mm < 1e-3 and m.residual_deg < 1e-6
        assert _error(m.board_pose, board)[0] < 1e-3


@pytest.mark.parametrize("mode", ["eye_in_hand", "eye_to_hand"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noisy_poses_recovered_within_tolerance(mode, seed):
    X, _, robot, cams, rng = make_scene(mode, 15, seed)
    robot = [_noisy(T, rng, 0.5, 0.1) for T in robot]
    cams = [_noisy(T, rng, 0.5, 0.1) for T in cams]
    result = calibrate_hand_eye(robot, cams, mode)
    mm, deg = _error(result.transform, X)
    assert mm < MM_TOL and deg < DEG_TOL, (result.best.method, mm, deg)
    # The residual is the scatter of the fixed pose; with this noise it is a few millimetres.
    assert 0.3 < result.residual_mm < 5 and 0.02 < result.residual_deg < 1
    ranked = [m.residual_mm / 5 + m.residual_deg / 1 for m in result.methods]
    assert ranked == sorted(ranked)


def test_residual_is_the_scatter_of_the_fixed_pose():
    X, _, robot, cams, rng = make_scene("eye_in_hand", 12, seed=4)
    cams = [_noisy(T, rng, 2.0, 0.0) for T in cams]
    result = calibrate_hand_eye(robot, cams, "eye_in_hand", limits=HandEyeLimits(max_mm=10))
    fixed = fixed_poses(robot, cams, result.transform, "eye_in_hand")
    centre = np.mean([T[:3, 3] for T in fixed], axis=0)
    rms = 1000 * np.sqrt(np.mean([np.sum((T[:3, 3] - centre) ** 2) for T in fixed]))
    assert result.residual_mm == pytest.approx(rms, rel=1e-6)
    assert 2.0 < result.residual_mm < 5.0  # sqrt(3) * 2 mm of camera noise, give or take


def test_too_noisy_refused_with_residual_in_mm_and_deg():
    _, _, robot, cams, rng = make_scene("eye_to_hand", 12, seed=5)
    robot = [_noisy(T, rng, 10.0, 1.0) for T in robot]
    with pytest.raises(HandEyeRefused, match=r"residual .* mm / .* deg exceeds 5.0 mm / 1.0 deg") as info:
        calibrate_hand_eye(robot, cams, "eye_to_hand")
    assert info.value.result is not None and len(info.value.result.methods) == len(ALL_METHODS)


def test_rotation_about_one_axis_refused():
    rng = np.random.default_rng(6)
    X = make_pose(_rot(rng, 180), [0.0, 0.05, 0.1])
    board = make_pose(np.eye(3), [0.5, 0.0, 0.0])
    robot = [make_pose(cv2.Rodrigues(np.array([0.0, 0.0, a]))[0], [0.3, 0.1 * a, 0.4]) for a in np.linspace(-1, 1, 8)]
    cams = [invert(X) @ invert(G) @ board for G in robot]
    with pytest.raises(HandEyeRefused, match="one axis"):
        calibrate_hand_eye(robot, cams, "eye_in_hand")


def test_too_few_views_and_mismatched_inputs():
    _, _, robot, cams, _ = make_scene("eye_in_hand", 8, seed=7)
    with pytest.raises(HandEyeRefused, match="only 4 views"):
        calibrate_hand_eye(robot[:4], cams[:4], "eye_in_hand")
    with pytest.raises(ValueError, match="pair up"):
        calibrate_hand_eye(robot, cams[:7], "eye_in_hand")
    with pytest.raises(ValueError, match="mode"):
        calibrate_hand_eye(robot, cams, "eye_on_hand")
    bad = [T.copy() for T in robot]
    bad[2][:3, :3] *= 2
    with pytest.raises(ValueError, match="robot pose 2 has no proper rotation"):
        calibrate_hand_eye(bad, cams, "eye_in_hand")


def test_ur_pose_conversion():
    T = pose_from_ur([0.1, -0.2, 0.3, 0.0, 0.0, np.pi / 2])
    assert np.allclose(T[:3, 3], [0.1, -0.2, 0.3])
    assert np.allclose(T[:3, :3] @ [1, 0, 0], [0, 1, 0])  # a quarter turn about z takes x to y
    p = np.array([0.4, 0.1, 0.25, 0.3, -1.2, 2.0])
    assert np.allclose(pose_to_ur(pose_from_ur(p)), p)
    with pytest.raises(ValueError, match="6 finite numbers"):
        pose_from_ur([0, 0, 0, np.nan, 0, 0])


def test_eye_in_hand_from_rendered_images():
    """End to end: images rendered from the wrist camera, real detection and PnP, noisy robot."""
    cam = default_camera()
    board = Board(CharucoBoardSpec(7, 5, 0.04, 0.03))
    rng = np.random.default_rng(8)
    views = sample_board_poses(board, cam, 12, rng, distance_m=(0.3, 0.5), max_tilt_deg=30)
    X, _, robot, _, rng = make_scene("eye_in_hand", 12, seed=8, camera_views=views)
    intr = CameraIntrinsics(cam.K, cam.dist, cam.image_size)
    cams = []
    for T in views:
        det = board.detect(render_view(board, cam, T, rng=rng))
        C, err = board_pose(det, intr)
        assert err < 0.5
        cams.append(C)
    robot = [_noisy(T, rng, 0.3, 0.05) for T in robot]
    result = calibrate_hand_eye(robot, cams, "eye_in_hand")
    mm, deg = _error(result.transform, X)
    assert mm < MM_TOL and deg < DEG_TOL, (result.best.method, mm, deg)
