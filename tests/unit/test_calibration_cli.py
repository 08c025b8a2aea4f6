"""`armada calibrate ...` end to end: files in, result files out; live capture over real sockets."""

import argparse
import csv
import threading
import time

import cv2
import numpy as np
import pytest
import yaml
import zmq

from armada.calibration.boards import Board, CharucoBoardSpec
from armada.calibration.cli import add_calibrate_parser, run_calibrate
from armada.calibration.handeye import invert, pose_to_ur
from armada.calibration.live import HandEyeCollector, LiveError, StillnessLimits, state_pose
from armada.calibration.results import intrinsics_values, load_hand_eye, load_intrinsics, load_joint_calibration, \
    load_latency, write_result, CalibrationRecord, Residual
from armada.calibration.synthetic import default_camera, render_view, sample_board_poses
from armada.calibration.types import CameraIntrinsics
from tests.unit.test_calibration_handeye import make_scene

CAM = default_camera()
BOARD_ARGS = ["--squares", "7x5", "--square", "0.04", "--marker", "0.03"]
BOARD = Board(CharucoBoardSpec(7, 5, 0.04, 0.03))


def calibrate(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="armada")
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    return run_calibrate(parser.parse_args(["calibrate", *argv]), out=lambda line: None)


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(11)
    poses = sample_board_poses(BOARD, CAM, 12, rng)
    return poses, [render_view(BOARD, CAM, T, rng=rng) for T in poses]


def _write_images(folder, images) -> None:
    folder.mkdir()
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"view_{i:02d}.png"), img)


def _intrinsics_file(path):
    rec = CalibrationRecord("camera_intrinsics", "truth", {"rms_reprojection": Residual(0.0, "px", 0.5)},
                            intrinsics_values(CameraIntrinsics(CAM.K, CAM.dist, CAM.image_size), "radial3"))
    return write_result(path, rec)


def test_board_png_is_printable_and_detectable(tmp_path):
    out = tmp_path / "board.png"
    assert calibrate("board", *BOARD_ARGS, "--out", str(out), "--dpi", "100") == 0
    img = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
    assert BOARD.detect(img).count == 24


def test_intrinsics_from_a_folder(tmp_path, views):
    _write_images(tmp_path / "imgs", views[1])
    out = tmp_path / "cam.yaml"
    assert calibrate("intrinsics", *BOARD_ARGS, "--images", str(tmp_path / "imgs"), "--out", str(out),
                     "--name", "wrist") == 0
    intr = load_intrinsics(out, expect_size=(640, 480))
    assert abs(intr.fx / CAM.K[0, 0] - 1) < 0.01 and abs(intr.cy / CAM.K[1, 2] - 1) < 0.01
    doc = yaml.safe_load(out.read_text())
    assert doc["name"] == "wrist" and doc["inputs"]["board"]["kind"] == "charuco"
    assert doc["residual"]["rms_reprojection"]["value"] < 0.3


def test_intrinsics_refused_writes_nothing_and_says_why(tmp_path, views, capsys):
    _write_images(tmp_path / "imgs", views[1][:4])
    out = tmp_path / "cam.yaml"
    assert calibrate("intrinsics", *BOARD_ARGS, "--images", str(tmp_path / "imgs"), "--out", str(out)) == 2
    assert not out.exists()
    assert "only 4 views" in capsys.readouterr().err


def test_intrinsics_forced_is_written_and_marked(tmp_path, views):
    _write_images(tmp_path / "imgs", views[1])
    out = tmp_path / "cam.yaml"
    assert calibrate("intrinsics", *BOARD_ARGS, "--images", str(tmp_path / "imgs"), "--out", str(out),
                     "--max-rms", "0.01") == 2
    assert calibrate("intrinsics", *BOARD_ARGS, "--images", str(tmp_path / "imgs"), "--out", str(out),
                     "--max-rms", "0.01", "--force") == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["forced"] is True and any("exceeds 0.01 px" in r for r in doc["forced_past"])


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    assert calibrate("intrinsics", "--out", str(tmp_path / "x.yaml")) == 2
    assert "missing --images or --live" in capsys.readouterr().err
    assert calibrate("intrinsics", "--images", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.yaml")) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_hand_eye_from_images_and_a_ur_poses_csv(tmp_path):
    rng = np.random.default_rng(12)
    cams = sample_board_poses(BOARD, CAM, 12, rng, distance_m=(0.3, 0.5), max_tilt_deg=30)
    X, _, robot, _, rng = make_scene("eye_in_hand", 12, seed=12, camera_views=cams)
    folder = tmp_path / "imgs"
    _write_images(folder, [render_view(BOARD, CAM, T, rng=rng) for T in cams])
    with open(tmp_path / "poses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "z", "rx", "ry", "rz"])
        for i, G in enumerate(robot):
            w.writerow([f"view_{i:02d}.png", *pose_to_ur(G)])
    out = tmp_path / "he.yaml"
    assert calibrate("hand-eye", *BOARD_ARGS, "--mode", "eye-in-hand", "--intrinsics",
                     str(_intrinsics_file(tmp_path / "cam.yaml")), "--images", str(folder), "--poses",
                     str(tmp_path / "poses.csv"), "--out", str(out)) == 0
    he = load_hand_eye(out, expect_mode="eye_in_hand")
    assert np.linalg.norm(he.transform[:3, 3] - X[:3, 3]) < 0.003
    doc = yaml.safe_load(out.read_text())
    assert set(doc["inputs"]["methods"]) == {"TSAI", "PARK", "HORAUD", "ANDREFF", "DANIILIDIS", "SHAH", "LI"}


def _csv(path, header, rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_joints_so101_writes_both_files(tmp_path):
    from tests.unit.test_calibration_joints import NAMES, _recordings

    middle, sweep = _recordings()
    lerobot = tmp_path / "arm.json"
    out = tmp_path / "so101.yaml"
    assert calibrate("joints", "so101", "--middle", _csv(tmp_path / "m.csv", NAMES, middle), "--sweep",
                     _csv(tmp_path / "s.csv", NAMES, sweep), "--out", str(out), "--lerobot-json", str(lerobot)) == 0
    assert load_joint_calibration(lerobot) == load_joint_calibration(out)


def test_joints_aloha_and_piper_from_csv(tmp_path):
    names = ["puppet_left", "puppet_right"]
    opened = np.array([[2900, 3000]] * 20) + np.random.default_rng(0).normal(0, 1, (20, 2))
    closed = np.array([[1400, 1500]] * 20)
    out = tmp_path / "g.yaml"
    assert calibrate("joints", "aloha-gripper", "--open", _csv(tmp_path / "o.csv", names, opened), "--closed",
                     _csv(tmp_path / "c.csv", names, closed), "--open-width", "puppet_left=0.08,puppet_right=0.07",
                     "--out", str(out)) == 0
    g = load_joint_calibration(out)
    assert g["puppet_right"].open_m == 0.07 and g["puppet_left"].raw_closed == 1400
    zero = np.full((50, 6), 0.01)
    out = tmp_path / "z.yaml"
    assert calibrate("joints", "piper-zero", "--zero", _csv(tmp_path / "z.csv", [f"j{i}" for i in range(6)], zero),
                     "--out", str(out)) == 0
    assert np.allclose(load_joint_calibration(out).offsets_rad, 0.01)


def test_latency_from_csv(tmp_path):
    from tests.unit.test_calibration_latency import _xcorr_recording

    ref_t, ref_x, vis_t, vis_x = _xcorr_recording(0.08)
    ok = np.isfinite(vis_x)
    out = tmp_path / "lat.yaml"
    assert calibrate("latency", "--reference", _csv(tmp_path / "r.csv", ["t", "x"], zip(ref_t, ref_x)),
                     "--visual", _csv(tmp_path / "v.csv", ["t", "x"], zip(vis_t[ok], vis_x[ok])),
                     "--out", str(out)) == 0
    assert abs(load_latency(out).delay_s - 0.08) < 0.002


# --------------------------------------------------------------------------- live, over the cell's sockets


def _cell(folder) -> str:
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump({
        "name": "calib",
        "drivers": [{"name": "arm", "embodiment": "mock_arm", "backend": {"kind": "mock"}, "state": "ipc://{run_dir}/arm-state",
                     "cmd": "ipc://{run_dir}/arm-cmd"}],
        "cameras": [{"name": "wrist", "width": 640, "height": 480, "fps": 30, "frames": "ipc://{run_dir}/cam"}],
        "inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/events"},
    }))
    return str(path)


class _FakeCell(threading.Thread):
    """Publishes frames (and optionally driver state with a TCP pose, where the UR3 backend puts
    it: ``device.tcp_pose``) like the real processes do."""

    def __init__(self, run_dir, images, hold_s, poses=None):
        super().__init__(daemon=True)
        self.run_dir, self.images, self.hold_s, self.poses = run_dir, images, hold_s, poses
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        from armada.runtime.transport import FramePublisher, Publisher

        ctx = zmq.Context()
        frames = FramePublisher(ctx, f"ipc://{self.run_dir}/cam")
        state = Publisher(ctx, f"ipc://{self.run_dir}/arm-state") if self.poses is not None else None
        rgb = [np.ascontiguousarray(np.dstack([g] * 3)) for g in self.images]
        self.ready.set()
        seq, i = 0, 0
        try:
            while not self.stop.is_set():
                end = time.monotonic() + self.hold_s
                while time.monotonic() < end and not self.stop.is_set():
                    if state is not None:
                        z = np.zeros(7)
                        state.publish("state", mono_ns=time.monotonic_ns(), mode="idle", measured=z, requested=z,
                                      commanded=z, velocity=z, counters={},
                                      device={"tcp_pose": pose_to_ur(self.poses[i]).tolist()})
                    frames.send(rgb[i], camera="wrist", frame_seq=seq, capture_ns=time.time_ns(), width=640,
                                height=480, channels=3, dtype="uint8", encoding="raw")
                    seq += 1
                    time.sleep(1 / 30)
                i = (i + 1) % len(rgb)
        finally:
            frames.close()
            if state is not None:
                state.close()
            ctx.term()


def test_live_intrinsics_from_a_camera_stream(short_tmp, views):
    cell = _cell(short_tmp)
    fake = _FakeCell(short_tmp, views[1], hold_s=0.3)
    fake.start()
    fake.ready.wait(5)
    out, saved = short_tmp / "cam.yaml", short_tmp / "saved"
    try:
        code = calibrate("intrinsics", *BOARD_ARGS, "--live", cell, "--camera", "wrist", "--run-dir", str(short_tmp),
                         "--out", str(out), "--views", "8", "--target-coverage", "0.4", "--target-tilt", "20",
                         "--min-coverage", "0.4", "--timeout", "30", "--save-frames", str(saved))
    finally:
        fake.stop.set()
        fake.join(5)
    assert code == 0
    intr = load_intrinsics(out)
    assert abs(intr.fx / CAM.K[0, 0] - 1) < 0.01
    assert yaml.safe_load(out.read_text())["name"] == "wrist"
    assert len(list(saved.glob("*.png"))) >= 8


def test_live_hand_eye_waits_for_the_arm_to_rest(short_tmp):
    rng = np.random.default_rng(13)
    cams = sample_board_poses(BOARD, CAM, 8, rng, distance_m=(0.3, 0.5), max_tilt_deg=30)
    X, _, robot, _, rng = make_scene("eye_in_hand", 8, seed=13, camera_views=cams)
    images = [render_view(BOARD, CAM, T, rng=rng) for T in cams]
    cell = _cell(short_tmp)
    fake = _FakeCell(short_tmp, images, hold_s=0.75, poses=robot)
    fake.start()
    fake.ready.wait(5)
    out = short_tmp / "he.yaml"
    try:
        code = calibrate("hand-eye", *BOARD_ARGS, "--mode", "eye-in-hand", "--intrinsics",
                         str(_intrinsics_file(short_tmp / "cam.yaml")), "--live", cell, "--camera", "wrist",
                         "--driver", "arm", "--run-dir", str(short_tmp), "--views", "7", "--timeout", "20",
                         "--out", str(out))
    finally:
        fake.stop.set()
        fake.join(5)
    assert code == 0
    assert np.linalg.norm(load_hand_eye(out).transform[:3, 3] - X[:3, 3]) < 0.003


def test_state_without_a_pose_is_a_clear_error():
    with pytest.raises(LiveError, match="publishes no device.tcp_pose"):
        state_pose({"kind": "state", "measured": np.zeros(6)}, "arm")
    T = state_pose({"device": {"tcp_pose": [0.1, 0.2, 0.3, 0.0, 0.0, 0.0]}})
    assert np.allclose(T[:3, 3], [0.1, 0.2, 0.3])


def test_collector_takes_a_view_only_after_the_arm_rests(views):
    poses, images = views
    intr = CameraIntrinsics(CAM.K, CAM.dist, CAM.image_size)
    said = []
    c = HandEyeCollector(BOARD, intr, StillnessLimits(window_s=0.5), on_progress=said.append)
    G = invert(poses[0])
    moving = G.copy()
    moving[0, 3] += 0.01
    assert not c.offer(images[0], 0.0) and said[-1] == "waiting for robot state"
    for t in np.arange(0.0, 0.9, 0.02):
        c.add_pose(t, moving if 0.3 < t < 0.33 else G)  # one bump at 0.32 s
    assert not c.offer(images[0], 0.6) and said[-1] == "arm moving"  # the last half second holds the bump
    assert c.offer(images[0], 0.88) and len(c.views) == 1
    assert np.allclose(c.views[0].base_T_gripper, G)
    assert not c.offer(images[0], 0.88) and said[-1] == "same pose as a kept view: move the arm"


def _swing(t: float) -> float:
    return 0.3 * np.sin(2 * np.pi * 0.6 * t) + 0.1 * np.sin(2 * np.pi * 1.3 * t + 1.0)


class _FakeSwing(threading.Thread):
    """A joint swinging (state at 200 Hz) and a camera that sees it ``delay_s`` late (30 fps):
    the board image is shifted sideways by the joint angle the camera would have seen."""

    def __init__(self, run_dir, image, delay_s):
        super().__init__(daemon=True)
        self.run_dir, self.image, self.delay_s = run_dir, image, delay_s
        self.stop, self.ready = threading.Event(), threading.Event()

    def run(self) -> None:
        from armada.runtime.transport import FramePublisher, Publisher

        ctx = zmq.Context()
        frames = FramePublisher(ctx, f"ipc://{self.run_dir}/cam")
        state = Publisher(ctx, f"ipc://{self.run_dir}/arm-state")
        self.ready.set()
        t0, next_frame, seq = time.time(), time.time(), 0
        try:
            while not self.stop.is_set():
                now = time.time()
                q = np.zeros(7)
                q[0] = _swing(now - t0)
                state.publish("state", mono_ns=time.monotonic_ns(), mode="idle", measured=q, requested=q,
                              commanded=q, velocity=q, counters={})
                if now >= next_frame:
                    shift = int(round(150 * _swing(now - self.delay_s - t0)))
                    rgb = np.ascontiguousarray(np.dstack([np.roll(self.image, shift, axis=1)] * 3))
                    frames.send(rgb, camera="wrist", frame_seq=seq, capture_ns=time.time_ns(), width=640,
                                height=480, channels=3, dtype="uint8", encoding="raw")
                    seq, next_frame = seq + 1, next_frame + 1 / 30
                time.sleep(0.005)
        finally:
            frames.close()
            state.close()
            ctx.term()


def test_live_latency_from_a_swinging_joint(short_tmp):
    front = np.eye(4)
    front[:3, 3] = [-0.14, -0.1, 0.7]  # the board faces the camera, centred, 0.7 m away
    image = render_view(BOARD, CAM, front)
    cell = _cell(short_tmp)
    fake = _FakeSwing(short_tmp, image, delay_s=0.1)
    fake.start()
    fake.ready.wait(5)
    out = short_tmp / "lat.yaml"
    try:
        code = calibrate("latency", *BOARD_ARGS, "--live", cell, "--camera", "wrist", "--driver", "arm",
                         "--joint", "shoulder_pan", "--run-dir", str(short_tmp), "--seconds", "4", "--out", str(out))
    finally:
        fake.stop.set()
        fake.join(5)
    assert code == 0
    # Frames are stamped when sent, so the loop's 5 ms sleep adds up to that much: 15 ms is generous.
    assert abs(load_latency(out).delay_s - 0.1) < 0.015
