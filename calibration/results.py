"""One file format for every calibration result, its writer and its loaders.

A result file is YAML::

    format: armada-calibration/1
    kind: camera_intrinsics        # camera_intrinsics | hand_eye | joint_calibration | camera_latency
    name: wrist_cam                # what it belongs to: a camera or driver name (optional)
    method: ChArUco, cv2.calibrateCameraExtended, radial3 distortion, 1 outlier view dropped
    date: '2026-01-05T14:03:11Z'   # ISO 8601, UTC
    tool_version: armada 0.1.0, opencv 4.13.0, numpy 2.2.6
    residual:                      # every residual: value, unit, and the limit it was checked against
      rms_reprojection: {value: 0.21, unit: px, max: 0.5}
    forced: false                  # true when written (--force) although a check failed; then
                                   # forced_past: [the reasons] follows
    inputs: {views: 14, image_size: [640, 480], board: {...}}
    values: {...}                  # what the kind defines (see the loaders)

The writer refuses a result whose residual exceeds its limit (or that failed another check,
such as coverage) unless forced, and a forced file says so. Loaders check what they read and
raise CalibrationFileError naming the file, the key and the reason; joint calibrations are loaded
by their kind's plugin (calibration/joint_kinds.py), which may also read a device's own format.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from armada.calibration.joints import JointCalibrationError
from armada.calibration.types import CameraIntrinsics, CameraLatency, HandEyeCalibration
from armada.runtime.errors import ConfigError

log = logging.getLogger("armada.calibration")

FORMAT = "armada-calibration/1"
KINDS = ("camera_intrinsics", "hand_eye", "joint_calibration", "camera_latency")


class CalibrationFileError(ConfigError):
    """A calibration file that cannot be used: ``file``, ``key`` and ``reason`` say why.

    A ConfigError, so a cell that references a bad calibration file fails the same way a bad
    cell file does."""


class ResultRefused(Exception):
    """The writer refused: a residual exceeds its limit, or a check failed, and it was not forced."""


@dataclass(frozen=True)
class Residual:
    value: float
    unit: str
    max: float | None = None  # the limit; None when there is none

    @property
    def exceeded(self) -> bool:
        return self.max is not None and not self.value <= self.max  # NaN exceeds too


@dataclass(frozen=True)
class CalibrationRecord:
    """A result file's contents."""

    kind: str
    method: str
    residual: dict[str, Residual]
    values: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    date: str = ""
    tool_version: str = ""
    forced: bool = False
    path: Path | None = None
    # Checks other than residuals that failed (coverage, tilt, ...): writing needs force.
    refusals: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- writing


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def tool_version() -> str:
    import cv2

    try:
        from importlib.metadata import version

        armada = version("armada")
    except Exception:  # running from a checkout without an install
        armada = "unknown"
    return f"armada {armada}, opencv {cv2.__version__}, numpy {np.__version__}"


def write_result(path: str | Path, record: CalibrationRecord, force: bool = False) -> Path:
    """Write ``record`` to ``path`` (atomically). Raises ResultRefused when a residual exceeds its
    limit or ``record.refusals`` is not empty, unless ``force``; a forced file carries
    ``forced: true`` and the reasons, and loaders warn about it."""
    if record.kind not in KINDS:
        raise ValueError(f"unknown calibration kind {record.kind!r}; known: {KINDS}")
    over = [f"{k} {r.value:.4g} {r.unit} > {r.max:g} {r.unit}" for k, r in record.residual.items() if r.exceeded]
    reasons = [f"residual too high: {o}" for o in over] + list(record.refusals)
    if reasons and not force:
        raise ResultRefused(f"not writing {path}: {'; '.join(reasons)}; fix the cause and calibrate again, "
                            "or force it")
    doc = {
        "format": FORMAT,
        "kind": record.kind,
        **({"name": record.name} if record.name else {}),
        "method": record.method,
        "date": record.date or now_utc(),
        "tool_version": record.tool_version or tool_version(),
        "residual": {k: {"value": _plain(r.value), "unit": r.unit,
                         **({"max": _plain(r.max)} if r.max is not None else {})} for k, r in record.residual.items()},
        "forced": bool(reasons),
        **({"forced_past": reasons} if reasons else {}),
        "inputs": _plain(record.inputs),
        "values": _plain(record.values),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def _plain(value: Any) -> Any:
    """numpy and tuples to plain YAML types, floats at full precision."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- records for each kind


def intrinsics_values(intr: CameraIntrinsics, model: str) -> dict[str, Any]:
    return {"image_size": list(intr.image_size), "camera_matrix": intr.K, "dist_coeffs": intr.dist,
            "distortion_model": model}


def hand_eye_values(mode: str, transform: np.ndarray, board_pose: np.ndarray) -> dict[str, Any]:
    import cv2

    parent = "gripper" if mode == "eye_in_hand" else "base"
    return {"mode": mode, "parent": parent, "child": "camera", "transform": transform,
            # The same transform in the two forms people type into robot software, for reading only.
            "translation_m": transform[:3, 3], "rotation_vector": cv2.Rodrigues(transform[:3, :3])[0].reshape(3),
            "board_pose": board_pose}


# --------------------------------------------------------------------------- loading


def load_result(path: str | Path, kind: str | None = None) -> CalibrationRecord:
    """Read and check the common part of a result file (of ``kind``, when given)."""
    path = Path(path)
    doc = _read_mapping(path)
    if doc.get("format") != FORMAT:
        raise CalibrationFileError(path, "format", f"expected {FORMAT!r}, got {doc.get('format')!r} "
                                   "(not an armada calibration file?)")
    for key in ("kind", "method", "date", "residual", "values"):
        if key not in doc:
            raise CalibrationFileError(path, key, "missing")
    if doc["kind"] not in KINDS:
        raise CalibrationFileError(path, "kind", f"unknown kind {doc['kind']!r}; known: {list(KINDS)}")
    if kind is not None and doc["kind"] != kind:
        raise CalibrationFileError(path, "kind", f"this is a {doc['kind']} file, a {kind} file is needed here")
    if not isinstance(doc["values"], dict):
        raise CalibrationFileError(path, "values", "must be a mapping")
    record = CalibrationRecord(doc["kind"], str(doc["method"]), _residuals(path, doc["residual"]), doc["values"],
                               doc.get("inputs") or {}, doc.get("name"), str(doc["date"]),
                               str(doc.get("tool_version", "")), bool(doc.get("forced", False)), path)
    if record.forced:
        why = doc.get("forced_past") or ["?"]
        log.warning("%s was written with --force past its checks: %s", path, "; ".join(map(str, why)))
    return record


def load_intrinsics(path: str | Path, expect_size: tuple[int, int] | None = None) -> CameraIntrinsics:
    """K, distortion and image size. ``expect_size`` (width, height): refuse a file calibrated
    at another resolution (intrinsics do not carry over when a camera mode crops or bins)."""
    rec = load_result(path, "camera_intrinsics")
    v = rec.values
    size = _int_pair(rec.path, "values.image_size", v.get("image_size"))
    K = matrix(rec.path, "values.camera_matrix", v.get("camera_matrix"), (3, 3))
    dist = matrix(rec.path, "values.dist_coeffs", v.get("dist_coeffs"), None).reshape(-1)
    if len(dist) not in (4, 5, 8, 12, 14):
        raise CalibrationFileError(rec.path, "values.dist_coeffs",
                                   f"has {len(dist)} coefficients; OpenCV takes 4, 5, 8, 12 or 14")
    if not (K[0, 0] > 0 and K[1, 1] > 0 and K[2, 2] == 1 and K[1, 0] == K[2, 0] == K[2, 1] == 0):
        raise CalibrationFileError(rec.path, "values.camera_matrix",
                                   "is not a camera matrix [[fx,0,cx],[0,fy,cy],[0,0,1]]")
    if expect_size is not None and tuple(expect_size) != size:
        raise CalibrationFileError(rec.path, "values.image_size", f"calibrated at {size[0]}x{size[1]}, but the camera "
                                   f"runs at {expect_size[0]}x{expect_size[1]}; calibrate at this resolution")
    return CameraIntrinsics(K, dist, size)


def load_hand_eye(path: str | Path, expect_mode: str | None = None) -> HandEyeCalibration:
    """gripper_T_camera (eye_in_hand) or base_T_camera (eye_to_hand), metres."""
    rec = load_result(path, "hand_eye")
    v = rec.values
    mode = v.get("mode")
    if mode not in ("eye_in_hand", "eye_to_hand"):
        raise CalibrationFileError(rec.path, "values.mode", f"must be eye_in_hand or eye_to_hand, got {mode!r}")
    if expect_mode is not None and mode != expect_mode:
        raise CalibrationFileError(rec.path, "values.mode", f"is {mode}, but {expect_mode} is needed here")
    T = _rigid(rec.path, "values.transform", v.get("transform"))
    board = _rigid(rec.path, "values.board_pose", v.get("board_pose"))
    return HandEyeCalibration(mode, T, board)


def load_joint_calibration(path: str | Path, expect_kind: str | None = None) -> Any:
    """A joint calibration, loaded by its kind's plugin (calibration/joint_kinds.py): the file's
    ``values.embodiment`` names the kind; a file in a device's own format (a vendor's or library's
    JSON, no ``format`` key) is read by the kind that knows it. ``expect_kind``: refuse files of other kinds
    (a backend applies only its own kind)."""
    from armada.calibration.joint_kinds import JOINT_CALIBRATIONS

    path = Path(path)
    doc = _read_mapping(path)
    kinds = JOINT_CALIBRATIONS.all()
    if "format" not in doc:  # a device's own file
        natives = [k for k in kinds.values() if k.load_native is not None
                   and (expect_kind is None or k.name == expect_kind)]
        problems = []
        for kind in natives:
            try:
                return kind.load_native(path, doc)
            except JointCalibrationError as exc:
                problems.append(f"{kind.name}: {exc}")
        why = "; ".join(problems) or f"no {expect_kind or 'joint calibration'} kind reads files without it"
        raise CalibrationFileError(path, "format", f"missing: neither an armada calibration file nor a device's "
                                   f"own ({why})")
    rec = load_result(path, "joint_calibration")
    name = rec.values.get("embodiment")
    if name not in kinds:
        raise CalibrationFileError(path, "values.embodiment", f"must be one of {sorted(kinds)}, got {name!r}")
    if expect_kind is not None and name != expect_kind:
        command = kinds[expect_kind].command if expect_kind in kinds else expect_kind
        raise CalibrationFileError(path, "values.embodiment", f"is {name!r}, but this driver takes a {expect_kind} "
                                   f"calibration (armada calibrate joints {command})")
    try:
        return kinds[name].load(rec.path, rec.values, rec.residual)
    except JointCalibrationError as exc:
        raise CalibrationFileError(path, "values", str(exc)) from None


def load_latency(path: str | Path) -> CameraLatency:
    rec = load_result(path, "camera_latency")
    delay = rec.values.get("delay_s")
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not math.isfinite(delay) or not 0 <= delay < 5:
        raise CalibrationFileError(rec.path, "values.delay_s", f"must be a number of seconds in [0, 5), got {delay!r}")
    return CameraLatency(float(delay), rec.method)


# --------------------------------------------------------------------------- checks


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibrationFileError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CalibrationFileError(path, "", "not UTF-8 text") from None
    try:
        # JSON is YAML; one parser reads our files and the devices' own JSON.
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise CalibrationFileError(path, "", f"does not parse: {exc}") from None
    if not isinstance(doc, dict):
        raise CalibrationFileError(path, "", "must hold a mapping at the top level")
    return doc


def _residuals(path: Path, data: Any) -> dict[str, Residual]:
    if not isinstance(data, dict):
        raise CalibrationFileError(path, "residual", "must map names to {value, unit, max}")
    out = {}
    for name, r in data.items():
        if not isinstance(r, dict) or not isinstance(r.get("value"), (int, float)) or "unit" not in r:
            raise CalibrationFileError(path, f"residual.{name}", "needs a numeric value and a unit")
        out[str(name)] = Residual(float(r["value"]), str(r["unit"]), None if r.get("max") is None else float(r["max"]))
    return out


def matrix(path: Path | None, key: str, data: Any, shape: tuple[int, int] | None) -> np.ndarray:
    try:
        a = np.array(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise CalibrationFileError(path, key, "must be a list of numbers (or of rows of numbers)") from None
    if data is None or a.size == 0:
        raise CalibrationFileError(path, key, "missing")
    if shape is not None and a.shape != shape:
        raise CalibrationFileError(path, key, f"must be {shape[0]}x{shape[1]}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise CalibrationFileError(path, key, "contains NaN or infinity")
    return a


def _rigid(path: Path | None, key: str, data: Any) -> np.ndarray:
    T = matrix(path, key, data, (4, 4))
    R = T[:3, :3]
    if not np.allclose(T[3], [0, 0, 0, 1]) or not np.allclose(R.T @ R, np.eye(3), atol=1e-6) \
            or np.linalg.det(R) < 0:
        raise CalibrationFileError(path, key, "is not a rigid transform (rotation and translation, last row 0 0 0 1)")
    return T


def _int_pair(path: Path | None, key: str, data: Any) -> tuple[int, int]:
    if not (isinstance(data, list) and len(data) == 2 and all(isinstance(x, int) and x > 0 for x in data)):
        raise CalibrationFileError(path, key, f"must be [width, height] in pixels, got {data!r}")
    return int(data[0]), int(data[1])
