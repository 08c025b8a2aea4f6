"""`armada calibrate ...`: boards, intrinsics, hand-eye, joints, latency.

    armada calibrate board --out board.png [--dpi 300]
    armada calibrate intrinsics --images DIR --out cam.yaml
    armada calibrate intrinsics --live CELL --camera NAME --out cam.yaml [--save-frames DIR]
    armada calibrate hand-eye --mode eye-in-hand --intrinsics cam.yaml --images DIR --poses poses.csv --out he.yaml
    armada calibrate hand-eye --mode eye-to-hand --intrinsics cam.yaml --live CELL --camera C --driver D --out he.yaml
    armada calibrate joints KIND ... --out joints.yaml   (KIND: each device's own, see `joints --help`)
    armada calibrate latency --reference ref.csv --visual vis.csv --out lat.yaml
    armada calibrate latency --steps steps.csv --frames frames.csv --out lat.yaml
    armada calibrate latency --live CELL --camera C --driver D --joint J --out lat.yaml

Every result is refused (exit 2, nothing written) when its residual or coverage is out of
bounds, unless --force; a forced file says so and loaders warn. Board options are shared:
--board charuco|checkerboard --squares 7x5 --square 0.03 --marker 0.0225 --dict DICT_5X5_100.
CSV recordings have a header row; joint recordings one column per joint, latency series
columns t (seconds) and x.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class CalibrateError(Exception):
    """A calibration that cannot go on; the message is for the operator."""


# --------------------------------------------------------------------------- parser


def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `calibrate` and its subcommands to an argparse subparsers object."""
    cal = subparsers.add_parser("calibrate", help="camera intrinsics, hand-eye, joints, latency",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = cal.add_subparsers(dest="calibrate_command", required=True)

    board = sub.add_parser("board", help="render a board image for printing")
    _board_args(board)
    board.add_argument("--out", type=Path, required=True, help="PNG to write")
    board.add_argument("--dpi", type=float, default=300.0)

    intr = sub.add_parser("intrinsics", help="camera matrix and distortion from board views")
    _board_args(intr)
    _source_args(intr, driver=False)
    out_args(intr)
    intr.add_argument("--model", choices=["radial2", "radial3", "rational"], default="radial3",
                      help="distortion model: radial2 (k3 fixed) for narrow lenses, rational for wide ones")
    intr.add_argument("--max-rms", type=float, default=0.5, help="refuse above this RMS reprojection error, px")
    intr.add_argument("--min-views", type=int, default=8)
    intr.add_argument("--min-coverage", type=float, default=0.5, help="fraction of the image the corners must reach")
    intr.add_argument("--min-tilt", type=float, default=20.0, help="board tilt range needed about each axis, deg")
    intr.add_argument("--views", type=int, default=15, help="live: views to collect")
    intr.add_argument("--target-coverage", type=float, default=0.7, help="live: keep capturing until this coverage")
    intr.add_argument("--target-tilt", type=float, default=30.0, help="live: ... and this tilt range, deg")
    intr.add_argument("--timeout", type=float, default=300.0, help="live: give up after this many seconds")

    he = sub.add_parser("hand-eye", help="camera pose on the wrist (eye-in-hand) or in the cell (eye-to-hand)")
    _board_args(he)
    _source_args(he, driver=True)
    out_args(he)
    he.add_argument("--mode", choices=["eye-in-hand", "eye-to-hand"], required=True)
    he.add_argument("--intrinsics", type=Path, required=True, help="the camera's intrinsics file")
    he.add_argument("--poses", type=Path, help="with --images: robot poses per image (CSV image,x,y,z,rx,ry,rz "
                    "in m and a rotation vector, as UR reports TCP poses; or YAML/JSON with base_T_gripper 4x4)")
    he.add_argument("--method", action="append", default=None, help="only these methods (repeatable)")
    he.add_argument("--max-mm", type=float, default=5.0, help="refuse above this translation residual")
    he.add_argument("--max-deg", type=float, default=1.0, help="refuse above this rotation residual")
    he.add_argument("--min-views", type=int, default=6)
    he.add_argument("--views", type=int, default=15, help="live: views to collect")
    he.add_argument("--timeout", type=float, default=600.0, help="live: give up after this many seconds")

    _joints_parser(sub)
    _latency_parser(sub)
    return cal


def _board_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("board")
    g.add_argument("--board", choices=["charuco", "checkerboard"], default="charuco")
    g.add_argument("--squares", default="7x5",
                   help="charuco: squares COLSxROWS (default 7x5); checkerboard: inner corners COLSxROWS")
    g.add_argument("--square", type=float, default=0.03, help="square length in metres, as printed (default 0.03)")
    g.add_argument("--marker", type=float, default=None,
                   help="charuco marker length in metres (default 3/4 of the square)")
    g.add_argument("--dict", default="DICT_5X5_100", help="charuco ArUco dictionary")
    g.add_argument("--legacy", action="store_true", help="charuco board from OpenCV < 4.6 (even rows)")


def _source_args(p: argparse.ArgumentParser, driver: bool) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--images", type=Path, help="a folder of images (png, jpg)")
    g.add_argument("--live", type=Path, metavar="CELL", help="capture from this cell's running camera process")
    g.add_argument("--camera", help="with --live: which camera")
    if driver:
        g.add_argument("--driver", help="with --live: the driver whose state gives the arm's pose")
    g.add_argument("--run-dir", type=Path, default=None, help="with --live: {run_dir} of the cell's ipc endpoints")
    g.add_argument("--save-frames", type=Path, default=None, help="with --live: keep the views used, as PNG")


def out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="result file (YAML)")
    p.add_argument("--name", default=None, help="what the result belongs to (default: the camera or driver name)")
    p.add_argument("--force", action="store_true", help="write even a result that fails its checks (marked forced)")


def _joints_parser(sub: Any) -> None:
    from armada.calibration.joint_kinds import JOINT_CALIBRATIONS

    joints = sub.add_parser("joints", help="joint offsets and ranges (each kind from its device's plugin)")
    jsub = joints.add_subparsers(dest="joints_command", required=True)
    for kind in sorted(JOINT_CALIBRATIONS.all().values(), key=lambda k: k.command):
        kind.add_arguments(jsub.add_parser(kind.command, help=kind.help))


def live_driver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--live", type=Path, metavar="CELL", help="record from this cell's running driver instead")
    p.add_argument("--driver", help="with --live: which driver")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--seconds", type=float, default=1.0, help="with --live: how long to record each hold")


def _latency_parser(sub: Any) -> None:
    lat = sub.add_parser("latency", help="delay from the scene to a frame's capture stamp")
    _board_args(lat)
    lat.add_argument("--reference", type=Path, help="CSV t,x: a joint (or TCP) position, host clock")
    lat.add_argument("--visual", type=Path,
                     help="CSV t,x: the same motion seen in frames (e.g. marker x), capture stamps")
    lat.add_argument("--steps", type=Path, help="CSV t: host times a light was switched")
    lat.add_argument("--frames", type=Path, help="CSV t,x: frame capture stamps and mean brightness")
    lat.add_argument("--live", type=Path, metavar="CELL", help="record a joint and a camera of this running cell")
    lat.add_argument("--camera")
    lat.add_argument("--driver")
    lat.add_argument("--joint", help="with --live: the joint to move back and forth")
    lat.add_argument("--seconds", type=float, default=15.0)
    lat.add_argument("--run-dir", type=Path, default=None)
    lat.add_argument("--search", default="0,0.5", help="delays to search, seconds: MIN,MAX")
    lat.add_argument("--min-confidence", type=float, default=0.8, help="refuse below this peak correlation")
    lat.add_argument("--max-spread", type=float, default=0.02, help="step: refuse above this std of delays, s")
    out_args(lat)


# --------------------------------------------------------------------------- dispatch


def run_calibrate(args: argparse.Namespace, out: Callable[[str], None] | None = None) -> int:
    """Run one `calibrate` subcommand: 0 on success, 2 when refused or impossible (why on stderr)."""
    from armada.calibration.handeye import HandEyeRefused
    from armada.calibration.intrinsics import CalibrationRefused
    from armada.calibration.joints import JointCalibrationError
    from armada.calibration.latency import LatencyError
    from armada.calibration.live import LiveError
    from armada.calibration.results import ResultRefused
    from armada.runtime.config import ConfigError

    say = out or (lambda line: print(line, flush=True))
    handlers = {"board": _board, "intrinsics": _intrinsics, "hand-eye": _hand_eye, "joints": _joints,
                "latency": _latency}
    try:
        return handlers[args.calibrate_command](args, say)
    except (CalibrationRefused, HandEyeRefused) as exc:
        print("armada calibrate: refused:\n  - " + "\n  - ".join(exc.reasons), file=sys.stderr)
        if exc.result is not None:
            print("  (nothing written; --force writes it anyway, marked as forced)", file=sys.stderr)
    except (CalibrateError, JointCalibrationError, LatencyError, LiveError, ResultRefused, ConfigError,
            ValueError, OSError, TimeoutError) as exc:
        print(f"armada calibrate: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m armada.calibration.cli calibrate ...`) until runtime.cli wires it."""
    parser = argparse.ArgumentParser(prog="armada")
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    return run_calibrate(parser.parse_args(argv))


# --------------------------------------------------------------------------- board


def make_board(args: argparse.Namespace):
    from armada.calibration.boards import Board, CharucoBoardSpec, CheckerboardSpec, parse_squares

    cols, rows = parse_squares(args.squares)
    if args.board == "checkerboard":
        return Board(CheckerboardSpec(cols, rows, args.square))
    marker = args.marker if args.marker is not None else round(0.75 * args.square, 6)
    return Board(CharucoBoardSpec(cols, rows, args.square, marker, args.dict, args.legacy))


def _board(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    import cv2

    from armada.calibration.boards import render_for_print

    board = make_board(args)
    img = render_for_print(board, args.dpi)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), img):
        raise CalibrateError(f"cannot write {args.out} (unknown image type?)")
    h, w = img.shape
    say(f"wrote {args.out}: {board.spec.describe()}, {w}x{h} px at {args.dpi:g} dpi "
        f"({w / args.dpi * 25.4:.0f} x {h / args.dpi * 25.4:.0f} mm)")
    say("print at 100 % (no fit-to-page), glue it flat on something rigid, and measure one square: "
        "pass that length as --square")
    return 0


# --------------------------------------------------------------------------- intrinsics


def _intrinsics(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from armada.calibration.intrinsics import CalibrationRefused, IntrinsicsLimits, calibrate_intrinsics

    board = make_board(args)
    limits = IntrinsicsLimits(args.max_rms, args.min_views, args.min_coverage, args.min_tilt)
    if args.live is not None:
        detections, name = _capture_intrinsics_live(args, board, limits, say), args.name or args.camera
        labels = [f"view_{i:03d}" for i in range(len(detections))]  # the --save-frames names
    else:
        detections, labels = _detect_folder(require(args.images, "--images or --live"), board, say)
        name = args.name
    try:
        result = calibrate_intrinsics(detections, model=args.model, limits=limits)
    except CalibrationRefused as exc:
        if exc.result is not None:
            say(_intrinsics_summary(exc.result, labels))
        if not (args.force and exc.result is not None):
            raise
        say("refused, written anyway (--force): " + "; ".join(exc.reasons))
        result, refusals = exc.result, exc.reasons
    else:
        say(_intrinsics_summary(result, labels))
        refusals = []
    write(args.out, _intrinsics_record(result, board, limits, name, args, refusals), args.force, say)
    return 0


def _detect_folder(folder: Path, board, say: Callable[[str], None]) -> tuple[list, list[str]]:
    """Detections in every image of ``folder``, and the file name of each."""
    import cv2

    paths = _images_in(folder)
    detections, labels = [], []
    for i, path in enumerate(paths):
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        det = board.detect(img) if img is not None else None
        if det is not None:
            detections.append(det)
            labels.append(path.name)
        say(f"[{i + 1}/{len(paths)}] {path.name}: " + ("unreadable" if img is None else
                                                         f"{det.count} corners" if det else "no board"))
    return detections, labels


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CalibrateError(f"{folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise CalibrateError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def _capture_intrinsics_live(args, board, limits, say: Callable[[str], None]) -> list:
    from armada.calibration.intrinsics import CaptureTargets, GuidedCapture
    from armada.calibration.live import CellStreams

    targets = CaptureTargets(views=max(args.views, limits.min_views),
                             coverage=max(args.target_coverage, limits.min_coverage),
                             tilt_deg=max(args.target_tilt, limits.min_tilt_deg))
    printer = _ProgressPrinter(say)
    capture = GuidedCapture(board, targets, on_progress=lambda p: printer.show(p.line(), final=p.done),
                            keep_images=args.save_frames is not None)
    say(f"capturing from camera {args.camera or '(the only one)'}: show the board at many positions and tilts, "
        "holding it still for a moment each time (Ctrl-C to stop early)")
    deadline = time.monotonic() + args.timeout
    with CellStreams.open(args.live, args.camera, run_dir=args.run_dir) as streams:
        try:
            for frame in streams.iter_frames():
                capture.offer(frame.pixels)
                if capture.done or time.monotonic() > deadline:
                    break
        except KeyboardInterrupt:
            say("stopped: calibrating with the views so far")
    printer.end()
    _save_frames(args.save_frames, capture.images, say)
    return capture.detections


def _intrinsics_summary(r, labels: list[str]) -> str:
    i = r.intrinsics
    worst = sorted(zip(r.per_view_rms_px, r.used), reverse=True)[:3]
    lines = [f"fx {i.fx:.2f}  fy {i.fy:.2f}  cx {i.cx:.2f}  cy {i.cy:.2f}  (image {i.image_size[0]}x{i.image_size[1]})",
             "distortion " + " ".join(f"{v:+.5f}" for v in i.dist) + f"  ({r.model})",
             f"RMS reprojection {r.rms_px:.3f} px over {len(r.used)} views; worst: "
             + ", ".join(f"#{v} {labels[v]} {e:.3f} px" for e, v in worst)
             + "; dropped as outliers: " + (", ".join(f"#{v} {labels[v]}" for v in r.rejected) or "none"),
             f"coverage {r.coverage.grid_fraction:.0%} of the image, tilt range {r.coverage.tilt_range_x_deg:.0f} / "
             f"{r.coverage.tilt_range_y_deg:.0f} deg (about x / y)"]
    if r.std_dev:
        shown = ("fx", "fy", "cx", "cy", "k1")
        lines.append("1-sigma: " + ", ".join(f"{k} {v:.3g}" for k, v in r.std_dev.items() if k in shown))
    return "\n".join(lines)


def _intrinsics_record(r, board, limits, name, args, refusals: list[str]):
    from armada.calibration.boards import board_to_dict
    from armada.calibration.results import CalibrationRecord, Residual, intrinsics_values

    kind = "ChArUco" if board.spec.kind == "charuco" else "checkerboard"
    method = (f"{kind} board, cv2.calibrateCameraExtended, {r.model} distortion"
              + (f", {len(r.rejected)} outlier view(s) dropped" if r.rejected else ""))
    inputs = {"views": len(r.used), "views_rejected": len(r.rejected), "image_size": list(r.intrinsics.image_size),
              "board": board_to_dict(board.spec), "coverage": r.coverage.grid_fraction,
              "tilt_range_deg": [r.coverage.tilt_range_x_deg, r.coverage.tilt_range_y_deg],
              "per_view_rms_px": r.per_view_rms_px, "std_dev": r.std_dev,
              "source": str(args.live or args.images)}
    residual = {"rms_reprojection": Residual(r.rms_px, "px", limits.max_rms_px)}
    return CalibrationRecord("camera_intrinsics", method, residual, intrinsics_values(r.intrinsics, r.model), inputs,
                             name, refusals=refusals)


# --------------------------------------------------------------------------- hand-eye


def _hand_eye(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from armada.calibration.handeye import ALL_METHODS, HandEyeLimits, HandEyeRefused, calibrate_hand_eye
    from armada.calibration.results import load_intrinsics

    board = make_board(args)
    intr = load_intrinsics(args.intrinsics)
    mode = args.mode.replace("-", "_")
    if args.live is not None:
        robot, cam = _capture_hand_eye_live(args, board, intr, say)
    else:
        robot, cam = _hand_eye_from_files(args, board, intr, say)
    limits = HandEyeLimits(args.max_mm, args.max_deg, args.min_views)
    try:
        result = calibrate_hand_eye(robot, cam, mode, methods=args.method or ALL_METHODS, limits=limits)
    except HandEyeRefused as exc:
        if exc.result is not None:
            say(_hand_eye_summary(exc.result))
        if not (args.force and exc.result is not None):
            raise
        say("refused, written anyway (--force): " + "; ".join(exc.reasons))
        result, refusals = exc.result, exc.reasons
    else:
        say(_hand_eye_summary(result))
        refusals = []
    write(args.out, _hand_eye_record(result, board, limits, intr, args, refusals), args.force, say)
    return 0


def _hand_eye_from_files(args, board, intr, say: Callable[[str], None]) -> tuple[list, list]:
    import cv2

    from armada.calibration.intrinsics import board_pose

    folder = require(args.images, "--images (with --poses) or --live")
    poses = read_poses(require(args.poses, "--poses"))
    robot, cam = [], []
    for name, T in poses.items():
        path = folder / name
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise CalibrateError(f"{path}: listed in {args.poses} but cannot be read")
        if (img.shape[1], img.shape[0]) != intr.image_size:
            raise CalibrateError(f"{path} is {img.shape[1]}x{img.shape[0]}, the intrinsics are for "
                                 f"{intr.image_size[0]}x{intr.image_size[1]}")
        det = board.detect(img)
        if det is None:
            say(f"{name}: no board, skipped")
            continue
        C, err = board_pose(det, intr)
        say(f"{name}: {det.count} corners, board pose reprojects at {err:.2f} px")
        robot.append(T)
        cam.append(C)
    return robot, cam


def read_poses(path: Path) -> dict[str, np.ndarray]:
    """Image name -> base_T_gripper from a CSV (image,x,y,z,rx,ry,rz) or a YAML/JSON list of
    {image, base_T_gripper: 4x4} or {image, tcp_pose: [x,y,z,rx,ry,rz]}."""
    from armada.calibration.handeye import pose_from_ur

    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
        need = ["image", "x", "y", "z", "rx", "ry", "rz"]
        if rows and any(k not in rows[0] for k in need):
            raise CalibrateError(f"{path}: columns must be {need}, got {list(rows[0])}")
        try:
            return {r["image"]: pose_from_ur([float(r[k]) for k in need[1:]]) for r in rows}
        except ValueError as exc:
            raise CalibrateError(f"{path}: {exc}") from None
    import yaml

    items = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise CalibrateError(f"{path}: expected a list of {{image, base_T_gripper | tcp_pose}}")
    out = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item:
            raise CalibrateError(f"{path}: entry {i} has no image")
        if "base_T_gripper" in item:
            T = np.array(item["base_T_gripper"], np.float64)
            if T.shape != (4, 4):
                raise CalibrateError(f"{path}: entry {i}: base_T_gripper must be 4x4")
            out[str(item["image"])] = T
        elif "tcp_pose" in item:
            out[str(item["image"])] = pose_from_ur(item["tcp_pose"])
        else:
            raise CalibrateError(f"{path}: entry {i} needs base_T_gripper or tcp_pose")
    return out


def _capture_hand_eye_live(args, board, intr, say: Callable[[str], None]) -> tuple[list, list]:
    from armada.calibration.live import CellStreams, HandEyeCollector, state_pose

    collector = HandEyeCollector(board, intr, on_progress=say)
    say(f"move the arm to a pose ({args.views} wanted), let it rest half a second: the view is taken when the arm is "
        "still and the board seen; turn the wrist about different axes between views (Ctrl-C to stop)")
    deadline = time.monotonic() + args.timeout
    with CellStreams.open(args.live, args.camera, require(args.driver, "--driver"), args.run_dir) as streams:
        try:
            for frame in streams.iter_frames():
                for msg in streams.drain_state():
                    collector.add_pose(msg["t_ns"] * 1e-9, state_pose(msg, streams.driver_name))
                collector.offer(frame.pixels, frame.header["capture_ns"] * 1e-9)
                if len(collector.views) >= args.views or time.monotonic() > deadline:
                    break
        except KeyboardInterrupt:
            say("stopped: calibrating with the views so far")
    _save_frames(args.save_frames, collector.images, say)
    return [v.base_T_gripper for v in collector.views], [v.camera_T_board for v in collector.views]


def _hand_eye_summary(r) -> str:
    from armada.calibration.handeye import pose_to_ur

    what = "gripper_T_camera" if r.mode == "eye_in_hand" else "base_T_camera"
    p = pose_to_ur(r.transform)
    lines = [f"{what}: translation {np.round(p[:3] * 1000, 2).tolist()} mm, rotation vector "
             f"{np.round(p[3:], 5).tolist()} rad",
             f"best method {r.best.method}: residual {r.residual_mm:.2f} mm, {r.residual_deg:.3f} deg over {r.views} "
             f"views (rotation spread {r.rotation_spread_deg:.0f} deg, axes {r.axis_spread_deg:.0f} deg apart)"]
    lines += [f"  {m.method:10s} {m.residual_mm:7.2f} mm {m.residual_deg:7.3f} deg" for m in r.methods]
    lines += [f"  {name:10s} failed: {why}" for name, why in r.failed.items()]
    return "\n".join(lines)


def _hand_eye_record(r, board, limits, intr, args, refusals: list[str]):
    from armada.calibration.boards import board_to_dict
    from armada.calibration.results import CalibrationRecord, Residual, hand_eye_values

    method = f"cv2 hand-eye, best of {len(r.methods)} methods: {r.best.method}"
    inputs = {"views": r.views, "image_size": list(intr.image_size), "board": board_to_dict(board.spec),
              "intrinsics": str(args.intrinsics), "rotation_spread_deg": r.rotation_spread_deg,
              "axis_spread_deg": r.axis_spread_deg, "source": str(args.live or args.images),
              "methods": {m.method: {"translation_mm": m.residual_mm, "rotation_deg": m.residual_deg}
                          for m in r.methods}}
    residual = {"translation": Residual(r.residual_mm, "mm", limits.max_mm),
                "rotation": Residual(r.residual_deg, "deg", limits.max_deg)}
    return CalibrationRecord("hand_eye", method, residual, hand_eye_values(r.mode, r.transform, r.best.board_pose),
                             inputs, args.name or args.camera, refusals=refusals)


# --------------------------------------------------------------------------- joints


def _joints(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from armada.calibration.joint_kinds import JOINT_CALIBRATIONS

    kinds = {k.command: k for k in JOINT_CALIBRATIONS.all().values()}
    return kinds[args.joints_command].run(args, say)


def record_hold(args, names: list[str], prompt: str, say: Callable[[str], None]) -> np.ndarray:
    """Ask the operator to hold a pose, then record the driver's measured joints for a while."""
    import zmq

    from armada.runtime.config import load_cell
    from armada.runtime.transport import Subscriber

    cell = load_cell(args.live, args.run_dir)
    drv = cell.driver(args.driver)
    all_names = cell.embodiment(drv).joint_names
    idx = [all_names.index(n) for n in names]
    input(f"{prompt}, then press Enter ")
    ctx = zmq.Context()
    sub = Subscriber(ctx, drv.state, curve=cell.curve)
    rows, end = [], time.monotonic() + args.seconds
    try:
        while time.monotonic() < end:
            msg = sub.recv(1.0)
            if msg is None:
                raise CalibrateError(f"no state from driver {drv.name} at {drv.state}: is it running?")
            rows.append(np.asarray(msg["measured"], np.float64)[idx])
    finally:
        sub.close()
        ctx.term()
    say(f"recorded {len(rows)} samples")
    return np.array(rows)


# --------------------------------------------------------------------------- latency


def _latency(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from armada.calibration.latency import estimate_delay_steps, estimate_delay_xcorr
    from armada.calibration.results import CalibrationRecord, Residual

    search = _pair(args.search, "--search")
    if args.steps is not None:
        _, steps = read_columns(args.steps)
        _, frames = read_columns(require(args.frames, "--frames"), 2)
        est = estimate_delay_steps(steps[:, 0], frames[:, 0], frames[:, 1], max_delay_s=search[1])
        residual = {"delay_spread": Residual(est.spread_s, "s", args.max_spread)}
        say(f"delay {est.delay_s * 1000:.1f} ms (trimmed mean of {len(est.per_step_s)} steps, "
            f"std {est.spread_s * 1000:.1f} ms)")
    else:
        ref_t, ref_x, vis_t, vis_x = _latency_series(args, say)
        est = estimate_delay_xcorr(ref_t, ref_x, vis_t, vis_x, search_s=search)
        residual = {"decorrelation": Residual(1 - est.confidence, "1", round(1 - args.min_confidence, 6))}
        say(f"delay {est.delay_s * 1000:.1f} ms (peak correlation {est.confidence:.3f} over {est.samples} frames)")
    record = CalibrationRecord("camera_latency", est.method, residual,
                               {"delay_s": est.delay_s, "confidence": est.confidence, "per_step_s": est.per_step_s},
                               {"frames": est.samples, "search_s": list(search)}, args.name or args.camera)
    write(args.out, record, args.force, say)
    return 0


def _latency_series(args, say) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if args.live is None:
        _, ref = read_columns(require(args.reference, "--reference and --visual, --steps and --frames, or --live"), 2)
        _, vis = read_columns(require(args.visual, "--visual"), 2)
        return ref[:, 0], ref[:, 1], vis[:, 0], vis[:, 1]
    from armada.calibration.latency import LatencyError, estimate_delay_xcorr
    from armada.calibration.live import CellStreams, record_latency

    board = make_board(args)
    say(f"move joint {args.joint} back and forth (varied speed, about 1 Hz) so the board sweeps the image, "
        f"for {args.seconds:g} s")
    with CellStreams.open(args.live, args.camera, require(args.driver, "--driver"), args.run_dir) as streams:
        rec = record_latency(streams, board, require(args.joint, "--joint"), args.seconds, say)
    seen = np.isfinite(rec.board_u)
    say(f"board seen in {int(seen.sum())} of {len(seen)} frames")
    # Use whichever image axis the motion shows best.
    best, best_conf, search = rec.board_u, -1.0, _pair(args.search, "--search")
    for coord in (rec.board_u, rec.board_v):
        try:
            conf = estimate_delay_xcorr(rec.ref_t, rec.ref_x, rec.frame_t, coord, search_s=search).confidence
        except LatencyError:
            continue
        if conf > best_conf:
            best, best_conf = coord, conf
    return rec.ref_t, rec.ref_x, rec.frame_t, best


# --------------------------------------------------------------------------- helpers


def write(path: Path, record, force: bool, say: Callable[[str], None]) -> None:
    from armada.calibration.results import write_result

    written = write_result(path, record, force=force)
    forced = record.refusals or any(r.exceeded for r in record.residual.values())
    say(f"wrote {written}" + (" (forced: it failed its checks)" if forced else ""))


def require(value: Any, what: str) -> Any:
    if value is None:
        raise CalibrateError(f"missing {what}")
    return value


def _pair(text: str, what: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise CalibrateError(f"{what} {text!r}: expected MIN,MAX") from None
    return a, b


def read_columns(path: Path, columns: int | None = None) -> tuple[list[str], np.ndarray]:
    """A CSV with a header row and numbers below: (column names, (rows, columns) array)."""
    rows = _csv_rows(path)
    if not rows:
        raise CalibrateError(f"{path}: no data rows")
    names = list(rows[0])
    if columns is not None and len(names) != columns:
        raise CalibrateError(f"{path}: expected {columns} columns, got {names}")
    try:
        data = np.array([[float(r[n]) for n in names] for r in rows], np.float64)
    except (TypeError, ValueError) as exc:
        raise CalibrateError(f"{path}: not all values are numbers ({exc})") from None
    return names, data


def _csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k.strip(): v.strip() for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    except OSError as exc:
        raise CalibrateError(f"cannot read {path}: {exc.strerror or exc}") from None


def _save_frames(folder: Path | None, images: list[np.ndarray], say: Callable[[str], None]) -> None:
    if folder is None or not images:
        return
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        # Frames from the transport are RGB; image files are written BGR.
        out = img[..., ::-1] if img.ndim == 3 and img.shape[2] == 3 else img
        cv2.imwrite(str(folder / f"view_{i:03d}.png"), np.ascontiguousarray(out))
    say(f"saved {len(images)} views to {folder} (re-run offline with --images {folder})")


class _ProgressPrinter:
    """One line updated in place on a terminal; on a pipe, a line only when it changes meaning."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.tty, self.last = say, sys.stdout.isatty(), ""

    def show(self, line: str, final: bool = False) -> None:
        if self.tty:
            print("\r" + line[:160].ljust(160), end="\n" if final else "", flush=True)
        elif line.split("|")[0] != self.last.split("|")[0] or final:  # counts changed
            self.say(line)
        self.last = line

    def end(self) -> None:
        if self.tty:
            print()


if __name__ == "__main__":
    sys.exit(main())
