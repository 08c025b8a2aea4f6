"""Synthetic board images from a known camera, for tests and for trying the tools without one.

The renderer traces each pixel back through the distortion model and the pinhole onto the
board plane and samples the printed board there, at twice the resolution, then averages down
like a sensor does. The real detectors run on the result, so a test that recovers the known
camera has exercised the same code a real calibration uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from armada.calibration.boards import Board


@dataclass(frozen=True)
class SyntheticCamera:
    K: np.ndarray
    dist: np.ndarray
    image_size: tuple[int, int]  # (width, height)


def default_camera() -> SyntheticCamera:
    """A 640x480 camera with a typical webcam's barrel distortion."""
    K = np.array([[610.0, 0.0, 322.0], [0.0, 606.0, 236.0], [0.0, 0.0, 1.0]])
    dist = np.array([-0.22, 0.08, 0.001, -0.0015, 0.0])
    return SyntheticCamera(K, dist, (640, 480))


def pose_matrix(rvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(np.asarray(rvec, np.float64).reshape(3))[0]
    T[:3, 3] = np.asarray(tvec, np.float64).reshape(3)
    return T


def render_view(board: Board, cam: SyntheticCamera, camera_T_board: np.ndarray, *,
                supersample: int = 2, blur_sigma: float = 0.6, noise_std: float = 2.0,
                background: int = 110, rng: np.random.Generator | None = None) -> np.ndarray:
    """A grey uint8 image of ``board`` at pose ``camera_T_board`` seen by ``cam``."""
    w, h = cam.image_size
    s = supersample
    R, t = camera_T_board[:3, :3], camera_T_board[:3, 3]
    # Texture resolution: about one texture pixel per supersampled image pixel where the board is
    # nearest, so sampling neither aliases much nor wastes time.
    nearest_m = max(float(t[2]) - 0.5 * max(board.spec.size_m), 0.05)
    pixels_per_square = int(np.clip(s * cam.K[0, 0] / nearest_m * board.spec.square_length_m, 16, 400))
    pixels_per_m = pixels_per_square / board.spec.square_length_m
    texture = board.render(pixels_per_square)
    origin = board.origin_px(pixels_per_square)
    norm = _normalized_grid(cam, s)
    # The plane z = 0 of the board maps to normalized coordinates by H = [r1 r2 t]; invert it.
    H_inv = np.linalg.inv(np.column_stack([R[:, 0], R[:, 1], t]))
    x, y = norm[:, 0], norm[:, 1]
    X, Y, W = (H_inv[i, 0] * x + H_inv[i, 1] * y + H_inv[i, 2] for i in range(3))
    behind = W <= 0
    X, Y = X / W, Y / W
    map_x = (origin + X * pixels_per_m - 0.5).astype(np.float32)
    map_y = (origin + Y * pixels_per_m - 0.5).astype(np.float32)
    map_x[behind] = -1e6  # outside the texture: background
    big = cv2.remap(texture, map_x.reshape(h * s, w * s), map_y.reshape(h * s, w * s), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=background)
    img = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    if blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur_sigma)
    if noise_std > 0:
        rng = rng or np.random.default_rng(0)
        img += rng.normal(0.0, noise_std, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


_GRIDS: dict[tuple[bytes, bytes, tuple[int, int], int], np.ndarray] = {}


def _normalized_grid(cam: SyntheticCamera, s: int) -> np.ndarray:
    """Normalized image coordinates of every supersampled pixel centre (the slow part: cached)."""
    key = (np.asarray(cam.K, np.float64).tobytes(), np.asarray(cam.dist, np.float64).tobytes(), cam.image_size, s)
    if key not in _GRIDS:
        w, h = cam.image_size
        # Centres of the supersampled pixels, in original image coordinates.
        u = (np.arange(w * s, dtype=np.float64) + 0.5) / s - 0.5
        v = (np.arange(h * s, dtype=np.float64) + 0.5) / s - 0.5
        uu, vv = np.meshgrid(u, v)
        pts = np.stack([uu.ravel(), vv.ravel()], axis=1).reshape(-1, 1, 2)
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 1e-10)
        _GRIDS.clear()  # one camera at a time is enough; these grids are large
        _GRIDS[key] = cv2.undistortPointsIter(pts, cam.K, cam.dist, None, None, criteria).reshape(-1, 2)
    return _GRIDS[key]


def sample_board_poses(board: Board, cam: SyntheticCamera, n: int, rng: np.random.Generator, *,
                       distance_m: tuple[float, float] = (0.35, 0.6), max_tilt_deg: float = 35.0,
                       max_roll_deg: float = 25.0, margin_px: float = 8.0) -> list[np.ndarray]:
    """``n`` poses camera_T_board with the whole board in view, spread over the image and tilted
    about both axes (what a careful person does with a board in front of a camera)."""
    poses: list[np.ndarray] = []
    w_m, h_m = board.spec.size_m
    centre = np.array([w_m / 2, h_m / 2, 0.0])
    corners = np.array([[0, 0, 0], [w_m, 0, 0], [w_m, h_m, 0], [0, h_m, 0]], np.float64)
    w, h = cam.image_size
    for _ in range(200 * n):
        if len(poses) == n:
            break
        tilt = np.radians(rng.uniform(-max_tilt_deg, max_tilt_deg, 2))
        roll = np.radians(rng.uniform(-max_roll_deg, max_roll_deg))
        R = _rot_z(roll) @ _rot_y(tilt[1]) @ _rot_x(tilt[0])
        pixel = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h])
        ray = np.linalg.solve(cam.K, np.array([pixel[0], pixel[1], 1.0]))
        t = ray * rng.uniform(*distance_m) - R @ centre
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, t
        if _in_view(T, corners, cam, margin_px) and _in_view(T, board.all_object_points, cam, margin_px):
            poses.append(T)
    if len(poses) < n:
        raise ValueError(f"could not place {n} board views in the image; got {len(poses)}")
    return poses


def _in_view(T: np.ndarray, points: np.ndarray, cam: SyntheticCamera, margin: float) -> bool:
    cam_pts = points @ T[:3, :3].T + T[:3, 3]
    if np.any(cam_pts[:, 2] < 0.05):
        return False
    rvec = cv2.Rodrigues(T[:3, :3])[0]
    img, _ = cv2.projectPoints(points.astype(np.float64), rvec, T[:3, 3], cam.K, cam.dist)
    img = img.reshape(-1, 2)
    w, h = cam.image_size
    return bool(np.all((img[:, 0] > margin) & (img[:, 0] < w - 1 - margin)
                       & (img[:, 1] > margin) & (img[:, 1] < h - 1 - margin)))


def project(board_points: np.ndarray, cam: SyntheticCamera, camera_T_board: np.ndarray) -> np.ndarray:
    rvec = cv2.Rodrigues(camera_T_board[:3, :3])[0]
    img, _ = cv2.projectPoints(board_points.astype(np.float64), rvec, camera_T_board[:3, 3], cam.K, cam.dist)
    return img.reshape(-1, 2)


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
