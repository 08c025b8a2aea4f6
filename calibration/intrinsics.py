"""Camera intrinsics from views of a board: calibration, quality checks, guided capture.

A result is refused (``CalibrationRefused``) rather than returned when it would quietly be
wrong: too few views, corners that never reached the image edges (distortion there is then
extrapolated), boards never tilted (focal length is then unobservable: a fronto-parallel
board looks the same nearer with a longer lens), or a reprojection error above threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from armada.calibration.boards import Board, Detection
from armada.calibration.types import CameraIntrinsics

DistortionModel = Literal["radial2", "radial3", "rational"]

# Which coefficients each model lets the solver move. radial2 suits narrow lenses (a free k3
# over-fits there), radial3 is OpenCV's default, rational is for wide lenses.
MODEL_FLAGS: dict[str, int] = {
    "radial2": cv2.CALIB_FIX_K3,
    "radial3": 0,
    "rational": cv2.CALIB_RATIONAL_MODEL,
}

DEFAULT_MAX_RMS_PX = 0.5
DEFAULT_MIN_VIEWS = 8
DEFAULT_MIN_COVERAGE = 0.5
DEFAULT_MIN_TILT_DEG = 20.0
DEFAULT_GRID = (8, 6)


class CalibrationRefused(Exception):
    """A calibration that must not be used. ``result`` is set when one was computed (for --force)."""

    def __init__(self, reasons: list[str], result: object | None = None):
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.result = result


# --------------------------------------------------------------------------- coverage


@dataclass(frozen=True)
class Coverage:
    grid_fraction: float  # fraction of the image's grid cells that hold at least one corner
    tilt_range_x_deg: float  # spread of board tilt about the camera's x axis (up/down) over views
    tilt_range_y_deg: float  # spread of board tilt about the camera's y axis (left/right)
    views: int
    grid: tuple[int, int]

    @property
    def tilt_range_deg(self) -> float:
        """The smaller of the two: fx needs tilt about y, fy tilt about x."""
        return min(self.tilt_range_x_deg, self.tilt_range_y_deg)


def grid_cells(det: Detection, grid: tuple[int, int] = DEFAULT_GRID) -> set[tuple[int, int]]:
    """The cells of a ``grid`` (columns, rows) over the image that this detection's corners touch."""
    w, h = det.image_size
    cols = np.clip((det.image_points[:, 0] / w * grid[0]).astype(int), 0, grid[0] - 1)
    rows = np.clip((det.image_points[:, 1] / h * grid[1]).astype(int), 0, grid[1] - 1)
    return set(zip(cols.tolist(), rows.tolist()))


def board_tilt_deg(rotation: np.ndarray) -> tuple[float, float]:
    """Tilt of the board normal about the camera's x and y axes, degrees (0, 0 when facing it)."""
    n = rotation[:, 2]  # board z axis in the camera frame: points away from the camera when visible
    return float(np.degrees(np.arctan2(n[1], n[2]))), float(np.degrees(np.arctan2(n[0], n[2])))


def guess_camera_matrix(image_size: tuple[int, int]) -> np.ndarray:
    """A plausible K before calibration (about 60 degrees horizontal field of view): good enough
    to tell a tilted board from a flat one while guiding capture."""
    w, h = image_size
    f = 0.87 * w
    return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], np.float64)


def approximate_tilt(det: Detection, K: np.ndarray | None = None) -> tuple[float, float] | None:
    K = guess_camera_matrix(det.image_size) if K is None else K
    ok, rvec, _ = cv2.solvePnP(det.object_points, det.image_points, K, None, flags=cv2.SOLVEPNP_IPPE)
    if not ok:
        return None
    return board_tilt_deg(cv2.Rodrigues(rvec)[0])


def measure_coverage(detections: Sequence[Detection], tilts: Sequence[tuple[float, float]] | None = None,
                     grid: tuple[int, int] = DEFAULT_GRID) -> Coverage:
    if not detections:
        return Coverage(0.0, 0.0, 0.0, 0, grid)
    cells: set[tuple[int, int]] = set()
    for det in detections:
        cells |= grid_cells(det, grid)
    if tilts is None:
        tilts = [t for t in (approximate_tilt(d) for d in detections) if t is not None]
    tx = [t[0] for t in tilts] or [0.0]
    ty = [t[1] for t in tilts] or [0.0]
    return Coverage(len(cells) / (grid[0] * grid[1]), max(tx) - min(tx), max(ty) - min(ty), len(detections), grid)


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class IntrinsicsResult:
    intrinsics: CameraIntrinsics
    rms_px: float  # RMS reprojection error over all corners of the views used
    per_view_rms_px: list[float]  # one per view used, same order as ``used``
    used: list[int]  # indices into the detections given
    rejected: list[int]  # views dropped as outliers
    coverage: Coverage
    model: DistortionModel
    board_poses: list[np.ndarray]  # camera_T_board (4x4) per view used
    std_dev: dict[str, float] = field(default_factory=dict)  # 1-sigma estimates: fx fy cx cy k1 ...


@dataclass(frozen=True)
class IntrinsicsLimits:
    max_rms_px: float = DEFAULT_MAX_RMS_PX
    min_views: int = DEFAULT_MIN_VIEWS
    min_coverage: float = DEFAULT_MIN_COVERAGE
    min_tilt_deg: float = DEFAULT_MIN_TILT_DEG
    # A view whose own RMS exceeds max(factor * median, floor) is dropped and the rest re-solved.
    outlier_factor: float = 3.0
    outlier_floor_px: float = 0.3


def calibrate_intrinsics(detections: Sequence[Detection], *, model: DistortionModel = "radial3",
                         limits: IntrinsicsLimits = IntrinsicsLimits(), grid: tuple[int, int] = DEFAULT_GRID,
                         refuse: bool = True) -> IntrinsicsResult:
    """Calibrate from board detections (all from one camera at one resolution).

    Raises CalibrationRefused (with the result attached when one was computed) when a limit is
    not met and ``refuse`` is true.
    """
    detections = list(detections)
    _check_inputs(detections, limits)
    used = list(range(len(detections)))
    rejected: list[int] = []
    for _ in range(3):  # a few rounds: dropping a bad view can expose the next one
        solved = _solve(detections, used, model)
        bad = _outliers(solved[2], limits)
        if not bad or len(used) - len(bad) < limits.min_views:
            break
        rejected += [used[i] for i in bad]
        used = [u for i, u in enumerate(used) if i not in bad]
    intr, rms, per_view, poses, std = solved
    tilts = [board_tilt_deg(T[:3, :3]) for T in poses]
    cov = measure_coverage([detections[i] for i in used], tilts, grid)
    result = IntrinsicsResult(intr, rms, per_view, used, sorted(rejected), cov, model, poses, std)
    problems = check_intrinsics(result, limits)
    if problems and refuse:
        raise CalibrationRefused(problems, result)
    return result


def calibrate_images(images: Iterable[np.ndarray], board: Board, **kwargs) -> IntrinsicsResult:
    """Detect ``board`` in each image and calibrate; images without the board are skipped."""
    detections = [d for d in (board.detect(img) for img in images) if d is not None]
    return calibrate_intrinsics(detections, **kwargs)


def check_intrinsics(result: IntrinsicsResult, limits: IntrinsicsLimits) -> list[str]:
    """Why this result must not be used ([] when it may)."""
    problems = []
    cov = result.coverage
    if result.rms_px > limits.max_rms_px:
        worst = sorted(zip(result.per_view_rms_px, result.used), reverse=True)[:3]
        problems.append(f"RMS reprojection error {result.rms_px:.3f} px exceeds {limits.max_rms_px} px (worst views: "
                        + ", ".join(f"#{i} {e:.2f} px" for e, i in worst)
                        + "); check the board is flat, the square size is right, and the images are sharp")
    if cov.grid_fraction < limits.min_coverage:
        problems.append(f"corners cover only {cov.grid_fraction:.0%} of the image (need {limits.min_coverage:.0%}); "
                        "show the board near every edge and corner of the image")
    if cov.tilt_range_deg < limits.min_tilt_deg:
        axis = "left-right (about the vertical)" if cov.tilt_range_y_deg < cov.tilt_range_x_deg else \
            "up-down (about the horizontal)"
        problems.append(f"board tilt varies by only {cov.tilt_range_deg:.0f} degrees {axis} (need "
                        f"{limits.min_tilt_deg:.0f}); without tilted views the focal length is not observable")
    return problems


def _check_inputs(detections: list[Detection], limits: IntrinsicsLimits) -> None:
    if len(detections) < limits.min_views:
        raise CalibrationRefused([f"only {len(detections)} views with the board found (need at least "
                                  f"{limits.min_views})"])
    sizes = {d.image_size for d in detections}
    if len(sizes) > 1:
        raise CalibrationRefused([f"images have different sizes {sorted(sizes)}; intrinsics hold for one resolution"])


def _solve(detections: list[Detection], used: list[int], model: DistortionModel):
    obj = [detections[i].object_points.reshape(-1, 1, 3) for i in used]
    img = [detections[i].image_points.reshape(-1, 1, 2) for i in used]
    size = detections[used[0]].image_size
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
    rms, K, dist, rvecs, tvecs, std_intr, _, per_view = cv2.calibrateCameraExtended(
        obj, img, size, None, None, flags=MODEL_FLAGS[model], criteria=criteria)
    n_dist = 8 if model == "rational" else 5
    dist = dist.reshape(-1)[:n_dist].astype(np.float64)
    poses = [_pose(r, t) for r, t in zip(rvecs, tvecs)]
    names = ["fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"][:4 + n_dist]
    std = {n: float(s) for n, s in zip(names, std_intr.reshape(-1))}
    return CameraIntrinsics(K, dist, size), float(rms), [float(e) for e in per_view.reshape(-1)], poses, std


def _outliers(per_view: list[float], limits: IntrinsicsLimits) -> list[int]:
    cut = max(limits.outlier_factor * float(np.median(per_view)), limits.outlier_floor_px)
    return [i for i, e in enumerate(per_view) if e > cut]


def _pose(rvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(rvec)[0]
    T[:3, 3] = tvec.reshape(3)
    return T


def board_pose(det: Detection, intr: CameraIntrinsics) -> tuple[np.ndarray, float]:
    """camera_T_board for one detection, and its RMS reprojection error in pixels."""
    ok, rvec, tvec = cv2.solvePnP(det.object_points, det.image_points, intr.K, intr.dist, flags=cv2.SOLVEPNP_IPPE)
    if not ok:
        raise ValueError("solvePnP found no board pose")
    rvec, tvec = cv2.solvePnPRefineLM(det.object_points, det.image_points, intr.K, intr.dist, rvec, tvec)
    proj, _ = cv2.projectPoints(det.object_points, rvec, tvec, intr.K, intr.dist)
    err = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - det.image_points) ** 2, axis=1))))
    return _pose(rvec, tvec), err


# --------------------------------------------------------------------------- guided capture


@dataclass(frozen=True)
class CaptureProgress:
    frames_seen: int
    views_accepted: int
    coverage: float  # grid fraction, 0..1
    tilt_range_deg: float
    last: str  # what happened to the last frame offered
    hint: str  # what the person holding the board should do next
    done: bool

    def line(self) -> str:
        return (f"views {self.views_accepted:3d}  coverage {self.coverage:4.0%}  tilt {self.tilt_range_deg:4.0f} deg"
                f"  | {self.last}" + (f"  -> {self.hint}" if self.hint and not self.done else ""))


@dataclass(frozen=True)
class CaptureTargets:
    views: int = 15
    coverage: float = 0.7
    tilt_deg: float = 30.0
    max_views: int = 40
    min_new_cells: int = 2  # a view must reach this many new grid cells, or ...
    min_new_tilt_deg: float = 8.0  # ... hold the board at an orientation this far from every kept view
    still_px: float | None = 1.0  # corners must move less than this between two frames (None: no check)


class GuidedCapture:
    """Takes frames one by one and keeps those that add something: the board detected, held
    still (motion blur biases corners), and either reaching new parts of the image or at a new
    orientation. ``on_progress`` is called after every frame."""

    def __init__(self, board: Board, targets: CaptureTargets = CaptureTargets(), grid: tuple[int, int] = DEFAULT_GRID,
                 on_progress: Callable[[CaptureProgress], None] | None = None, keep_images: bool = False):
        self.board, self.targets, self.grid = board, targets, grid
        self.on_progress = on_progress
        self.keep_images = keep_images
        self.detections: list[Detection] = []
        self.images: list[np.ndarray] = []
        self._tilts: list[tuple[float, float]] = []
        self._cells: set[tuple[int, int]] = set()
        self._previous: Detection | None = None
        self.frames_seen = 0

    @property
    def done(self) -> bool:
        t, cov = self.targets, self.coverage()
        return len(self.detections) >= t.max_views or (
            len(self.detections) >= t.views and cov.grid_fraction >= t.coverage and cov.tilt_range_deg >= t.tilt_deg)

    def coverage(self) -> Coverage:
        return measure_coverage(self.detections, self._tilts, self.grid) if self.detections else \
            Coverage(0.0, 0.0, 0.0, 0, self.grid)

    def offer(self, image: np.ndarray) -> bool:
        """Consider one frame; True when it was kept."""
        self.frames_seen += 1
        accepted, why = self._consider(image)
        if self.on_progress is not None:
            self.on_progress(self.progress(why))
        return accepted

    def run(self, frames: Iterable[np.ndarray]) -> list[Detection]:
        """Offer frames until the targets are met or the frames run out."""
        for image in frames:
            if self.done:
                break
            self.offer(image)
        return self.detections

    def _consider(self, image: np.ndarray) -> tuple[bool, str]:
        if self.done:
            return False, "targets met"
        det = self.board.detect(image)
        previous, self._previous = self._previous, det
        if det is None:
            return False, "no board"
        if self.targets.still_px is not None and not _still(previous, det, self.targets.still_px):
            return False, "board moving: hold it still"
        cells = grid_cells(det, self.grid)
        tilt = approximate_tilt(det)
        new_cells = len(cells - self._cells)
        novel_tilt = tilt is not None and all(np.hypot(tilt[0] - a, tilt[1] - b) >= self.targets.min_new_tilt_deg
                                              for a, b in self._tilts)
        if new_cells < self.targets.min_new_cells and not novel_tilt:
            return False, "nothing new: move or tilt the board"
        self.detections.append(det)
        self._tilts.append(tilt if tilt is not None else (0.0, 0.0))
        self._cells |= cells
        if self.keep_images:
            self.images.append(np.array(image, copy=True))
        return True, f"kept ({det.count} corners, +{new_cells} cells" + (", new tilt)" if novel_tilt else ")")

    def progress(self, last: str = "") -> CaptureProgress:
        cov = self.coverage()
        return CaptureProgress(self.frames_seen, len(self.detections), cov.grid_fraction, cov.tilt_range_deg,
                               last, self._hint(cov), self.done)

    def _hint(self, cov: Coverage) -> str:
        t = self.targets
        if cov.grid_fraction < t.coverage:
            empty = self._emptiest_region()
            return f"move the board towards the {empty}"
        if cov.tilt_range_y_deg < t.tilt_deg:
            return "tilt the board left and right"
        if cov.tilt_range_x_deg < t.tilt_deg:
            return "tilt the board up and down"
        if len(self.detections) < t.views:
            return "more views at new positions"
        return ""

    def _emptiest_region(self) -> str:
        gx, gy = self.grid
        names = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "centre",
                 (2, 1): "right", (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
        filled = {k: 0 for k in names}
        total = {k: 0 for k in names}
        for cx in range(gx):
            for cy in range(gy):
                key = (min(3 * cx // gx, 2), min(3 * cy // gy, 2))
                total[key] += 1
                filled[key] += (cx, cy) in self._cells
        return names[min(names, key=lambda k: filled[k] / max(total[k], 1))]


def _still(previous: Detection | None, det: Detection, max_px: float) -> bool:
    if previous is None:
        return False  # one frame tells nothing about motion; the next one will
    common, a, b = np.intersect1d(previous.ids, det.ids, return_indices=True)
    if len(common) < 4:
        return False
    return float(np.max(np.linalg.norm(previous.image_points[a] - det.image_points[b], axis=1))) <= max_px
