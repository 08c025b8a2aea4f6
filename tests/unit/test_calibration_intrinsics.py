"""Intrinsics recovered from rendered board images with a known camera; refusals; guided capture.

Tolerances (stated here, checked below): fx, fy, cx, cy within 0.5 % of the truth, k1 within
0.01 (achieved: about 0.15 % and 0.003); the rendered views give about 0.1 px RMS, like a good
real calibration.
"""

import numpy as np
import pytest

from armada.calibration.boards import Board, CharucoBoardSpec, CheckerboardSpec, Detection
from armada.calibration.intrinsics import CalibrationRefused, CaptureTargets, GuidedCapture, IntrinsicsLimits, \
    calibrate_images, calibrate_intrinsics, measure_coverage
from armada.calibration.synthetic import default_camera, project, render_view, sample_board_poses

CAM = default_camera()
CHARUCO = Board(CharucoBoardSpec(7, 5, 0.04, 0.03))
REL_TOL = 0.005
K1_TOL = 0.01


def _render(board: Board, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    poses = sample_board_poses(board, CAM, n, rng)
    return [render_view(board, CAM, T, rng=rng) for T in poses], poses


@pytest.fixture(scope="module")
def charuco_views():
    return _render(CHARUCO, 12, seed=1)


def _assert_recovered(result) -> None:
    i = result.intrinsics
    got = np.array([i.fx, i.fy, i.cx, i.cy])
    truth = np.array([CAM.K[0, 0], CAM.K[1, 1], CAM.K[0, 2], CAM.K[1, 2]])
    assert np.all(np.abs(got / truth - 1) < REL_TOL), (got, truth)
    assert abs(i.dist[0] - CAM.dist[0]) < K1_TOL, i.dist
    assert i.image_size == CAM.image_size


def test_charuco_views_recover_the_camera(charuco_views):
    images, _ = charuco_views
    result = calibrate_images(images, CHARUCO)
    _assert_recovered(result)
    assert result.rms_px < 0.3
    assert len(result.per_view_rms_px) == len(result.used) == 12 - len(result.rejected)
    assert result.coverage.grid_fraction >= 0.5 and result.coverage.tilt_range_deg >= 20


def test_checkerboard_views_recover_the_camera():
    board = Board(CheckerboardSpec(8, 5, 0.035))
    images, _ = _render(board, 10, seed=3)
    result = calibrate_images(images, board, model="radial2")
    _assert_recovered(result)
    assert result.intrinsics.dist[4] == 0  # radial2 keeps k3 at zero


def test_board_poses_come_back_with_the_result(charuco_views):
    images, poses = charuco_views
    result = calibrate_images(images, CHARUCO)
    for view, T in zip(result.used, result.board_poses):
        assert np.linalg.norm(T[:3, 3] - poses[view][:3, 3]) < 0.005  # 5 mm at about half a metre


# --------------------------------------------------------------------------- refusals, on projected corners


def _projected(poses: list[np.ndarray], noise_px: float = 0.05, seed: int = 0) -> list[Detection]:
    """Detections made by projecting the board (no rendering): fast, for the refusal logic."""
    rng = np.random.default_rng(seed)
    obj = CHARUCO.all_object_points
    return [Detection((project(obj, CAM, T) + rng.normal(0, noise_px, (len(obj), 2))).astype(np.float32), obj,
                      np.arange(len(obj), dtype=np.int32), CAM.image_size) for T in poses]


@pytest.fixture(scope="module")
def good_poses():
    return sample_board_poses(CHARUCO, CAM, 12, np.random.default_rng(5))


def test_projected_views_calibrate(good_poses):
    _assert_recovered(calibrate_intrinsics(_projected(good_poses)))


def test_too_few_views_refused(good_poses):
    with pytest.raises(CalibrationRefused, match="only 3 views"):
        calibrate_intrinsics(_projected(good_poses[:3]))


def test_high_residual_refused_with_the_result_attached(good_poses):
    with pytest.raises(CalibrationRefused, match=r"RMS reprojection error .* exceeds 0.5 px") as info:
        calibrate_intrinsics(_projected(good_poses, noise_px=1.5))
    assert info.value.result is not None and info.value.result.rms_px > 0.5


def test_threshold_is_configurable(good_poses):
    limits = IntrinsicsLimits(max_rms_px=0.01)
    with pytest.raises(CalibrationRefused, match="exceeds 0.01 px"):
        calibrate_intrinsics(_projected(good_poses, noise_px=0.05), limits=limits)


def test_views_only_in_the_centre_refused_for_coverage():
    centre = sample_board_poses(CHARUCO, CAM, 10, np.random.default_rng(2), distance_m=(1.1, 1.3))
    with pytest.raises(CalibrationRefused, match="cover only"):
        calibrate_intrinsics(_projected(centre))


def test_untilted_views_refused():
    rng = np.random.default_rng(4)
    flat = sample_board_poses(CHARUCO, CAM, 10, rng, max_tilt_deg=3, max_roll_deg=40, distance_m=(0.3, 0.45))
    with pytest.raises(CalibrationRefused, match="tilt varies by only"):
        calibrate_intrinsics(_projected(flat), limits=IntrinsicsLimits(min_coverage=0.0))


def test_a_bad_view_is_dropped_as_an_outlier(good_poses):
    dets = _projected(good_poses)
    bad = dets[4]
    rng = np.random.default_rng(9)
    dets[4] = Detection((bad.image_points + rng.normal(0, 3.0, bad.image_points.shape)).astype(np.float32),
                        bad.object_points, bad.ids, bad.image_size)
    result = calibrate_intrinsics(dets)
    assert result.rejected == [4]
    assert 4 not in result.used and result.rms_px < 0.2
    _assert_recovered(result)


def test_mixed_image_sizes_refused(good_poses):
    dets = _projected(good_poses)
    d = dets[0]
    dets[0] = Detection(d.image_points, d.object_points, d.ids, (1280, 720))
    with pytest.raises(CalibrationRefused, match="different sizes"):
        calibrate_intrinsics(dets)


# --------------------------------------------------------------------------- coverage and guided capture


def test_coverage_counts_grid_cells(good_poses):
    dets = _projected(good_poses)
    one = measure_coverage(dets[:1])
    all_ = measure_coverage(dets)
    assert 0 < one.grid_fraction < all_.grid_fraction <= 1
    assert one.tilt_range_deg == 0 and all_.tilt_range_deg > 20


def test_guided_capture_keeps_new_still_views_and_reports_progress(charuco_views):
    images, _ = charuco_views
    progress = []
    capture = GuidedCapture(CHARUCO, CaptureTargets(views=6, coverage=0.3, tilt_deg=10), on_progress=progress.append)
    blank = np.full_like(images[0], 110)
    # Each view held for three frames (the first only shows the board is still), with a blank between.
    stream = [blank] + [img for img in images[:8] for _ in range(3)]
    kept = capture.run(stream)
    assert capture.done and len(kept) == 6
    lasts = [p.last for p in progress]
    assert lasts[0] == "no board"
    assert lasts[1] == "board moving: hold it still"  # a first sighting: no earlier frame to compare
    assert lasts[2].startswith("kept")
    assert lasts[3] == "nothing new: move or tilt the board"  # the same view again
    counts = [p.views_accepted for p in progress]
    assert counts == sorted(counts) and counts[-1] == 6
    assert progress[-1].done and progress[-1].coverage >= 0.3


def test_guided_capture_rejects_a_moving_board(charuco_views):
    images, _ = charuco_views
    capture = GuidedCapture(CHARUCO)
    assert [capture.offer(img) for img in images[:4]] == [False] * 4  # a new pose every frame
    assert capture.progress().hint.startswith("move the board")


def test_guided_capture_without_stillness_check_for_stored_images(charuco_views):
    images, _ = charuco_views
    capture = GuidedCapture(CHARUCO, CaptureTargets(still_px=None, views=100, max_views=100), keep_images=True)
    kept = capture.run(images)
    assert len(kept) == len(capture.images) >= 10
    _assert_recovered(calibrate_intrinsics(kept))
