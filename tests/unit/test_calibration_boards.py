"""Board specs, detection on rendered boards, and rendering for print."""

import numpy as np
import pytest

from armada.calibration.boards import Board, CharucoBoardSpec, CheckerboardSpec, board_from_dict, board_to_dict, \
    parse_squares, render_for_print

CHARUCO = CharucoBoardSpec(7, 5, 0.03, 0.022)
CHECKER = CheckerboardSpec(8, 5, 0.03)


def _expected_px(board: Board, det, pixels_per_square: int) -> np.ndarray:
    """Where each detected corner lies in a flat render, in OpenCV's pixel-centre coordinates."""
    ppm = pixels_per_square / board.spec.square_length_m
    return board.origin_px(pixels_per_square) + det.object_points[:, :2] * ppm - 0.5


def test_charuco_corners_on_a_flat_render_are_exact():
    # Guards the +0.5 px bias of OpenCV's CharucoDetector (refined away in Board.detect).
    board = Board(CHARUCO)
    det = board.detect(board.render(60))
    assert det is not None and det.count == CHARUCO.corner_count == 24
    err = np.abs(det.image_points - _expected_px(board, det, 60))
    assert err.max() < 0.05, err.max()
    assert sorted(det.ids.tolist()) == list(range(24))
    assert np.allclose(det.object_points[:, 2], 0)


def test_checkerboard_corners_on_a_flat_render_are_exact():
    board = Board(CHECKER)
    det = board.detect(board.render(40))
    assert det is not None and det.count == 40
    expected = _expected_px(board, det, 40)
    # A checkerboard's corner order can start from either end (180 degrees): accept both.
    err = min(np.abs(det.image_points - expected).max(), np.abs(det.image_points[::-1] - expected).max())
    assert err < 0.1, err


def test_charuco_partly_covered_still_detected_with_consistent_ids():
    board = Board(CHARUCO)
    img = board.render(60)
    img[:, : img.shape[1] // 2] = 128  # cover the left half
    det = board.detect(img)
    assert det is not None and 6 <= det.count < 24
    assert np.abs(det.image_points - _expected_px(board, det, 60)).max() < 0.05
    assert np.allclose(det.object_points, board.all_object_points[det.ids])


def test_no_board_gives_none():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (240, 320), dtype=np.uint8)
    assert Board(CHARUCO).detect(noise) is None
    assert Board(CHECKER).detect(noise) is None


def test_colour_and_16_bit_images_are_accepted():
    board = Board(CHARUCO)
    grey = board.render(40)
    assert board.detect(np.dstack([grey] * 3)).count == 24
    assert board.detect(grey.astype(np.uint16) * 200).count == 24


@pytest.mark.parametrize("kwargs, message", [
    ({"marker_length_m": 0.03}, "smaller than the square"),
    ({"dictionary": "DICT_NOPE"}, "unknown ArUco dictionary"),
    ({"squares_x": 12, "squares_y": 10, "dictionary": "DICT_4X4_50"}, "has only 50"),
    ({"squares_x": 1}, "at least 2x2"),
])
def test_bad_charuco_specs_are_refused(kwargs, message):
    base = {"squares_x": 7, "squares_y": 5, "square_length_m": 0.03, "marker_length_m": 0.022}
    with pytest.raises(ValueError, match=message):
        CharucoBoardSpec(**{**base, **kwargs})


def test_spec_dict_round_trip_and_errors():
    for spec in (CHARUCO, CHECKER):
        assert board_from_dict(board_to_dict(spec)) == spec
    with pytest.raises(ValueError, match="kind"):
        board_from_dict({"kind": "circles"})
    with pytest.raises(ValueError, match="checkerboard board"):
        board_from_dict({"kind": "checkerboard", "inner_cols": 3})


def test_parse_squares():
    assert parse_squares("7x5") == (7, 5)
    assert parse_squares(" 9 X 6 ") == (9, 6)
    with pytest.raises(ValueError, match="COLSxROWS"):
        parse_squares("7,5")


def test_print_render_has_the_right_scale_and_is_detectable():
    board = Board(CHARUCO)
    img = render_for_print(board, dpi=150)
    per_square = round(0.03 / 0.0254 * 150)  # 177 px
    margin = per_square // 2
    assert img.shape == (5 * per_square + 2 * margin, 7 * per_square + 2 * margin)
    det = board.detect(img)
    assert det is not None and det.count == 24
    # The caption sits in the bottom margin and must not disturb the corners.
    assert np.abs(det.image_points - _expected_px(board, det, per_square)).max() < 0.05
