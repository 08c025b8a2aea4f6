"""Camera configs: three kinds behind one `kind` key; cells written before kinds still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from armada.drivers.cameras.plugins import OpenCVCameraConfig, RealSenseCameraConfig, SyntheticCameraConfig
from armada.runtime.config import CONFIG_DIR, ConfigError, load_cell

BASE = {
    "name": "cams",
    "drivers": [{"name": "arm", "embodiment": "mock_arm", "backend": {"kind": "mock"}, "state": "ipc://{run_dir}/s", "cmd": "ipc://{run_dir}/c"}],
    "inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev"},
}


def _load(tmp_path: Path, *cameras: dict):
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(BASE | {"cameras": list(cameras)}))
    return load_cell(path, run_dir=tmp_path)


def _cam(**fields) -> dict:
    return {"name": "c", "frames": "ipc://{run_dir}/cam"} | fields


def test_a_camera_without_kind_is_synthetic_as_before(tmp_path):
    cam = _load(tmp_path, _cam(width=320, height=240)).cameras[0]
    assert isinstance(cam, SyntheticCameraConfig) and cam.kind == "synthetic"
    assert (cam.width, cam.height, cam.jpeg_quality) == (320, 240, None)
    assert cam.frame_timeout() == pytest.approx(0.5)  # 3 intervals at 30 fps would be 0.1 s: at least 0.5 s
    slow = _load(tmp_path, _cam(fps=2)).cameras[0]
    assert slow.frame_timeout() == pytest.approx(1.5)  # 3 intervals


@pytest.mark.parametrize("cell", ["default", "scripted", "cameras_fake"])
def test_shipped_cells_load_with_their_camera_kinds(tmp_path, cell):
    loaded = load_cell(CONFIG_DIR / "cells" / f"{cell}.yaml", run_dir=tmp_path)
    kinds = [c.kind for c in loaded.cameras]
    assert kinds == (["realsense", "opencv", "synthetic"] if cell == "cameras_fake" else ["synthetic", "synthetic"])
    if cell == "cameras_fake":
        head = loaded.camera("head")
        assert head.playback == f"{tmp_path}/fake_realsense.db3" and head.depth
        assert loaded.camera("side").jpeg_quality == 85


def test_realsense_and_opencv_options(tmp_path):
    rs, cv = _load(tmp_path,
                   _cam(name="rs", kind="realsense", serial="123", depth=True, auto_exposure=False, exposure_us=8000,
                        frames="ipc://{run_dir}/a"),
                   _cam(name="cv", kind="opencv", device=0, frames="ipc://{run_dir}/b")).cameras
    assert isinstance(rs, RealSenseCameraConfig) and rs.serial == "123" and rs.exposure_us == 8000
    assert rs.depth_width is None and rs.global_time
    assert isinstance(cv, OpenCVCameraConfig) and cv.device == 0
    assert (cv.fourcc, cv.buffer_size) == ("MJPG", 1)


@pytest.mark.parametrize("camera, key, words", [
    (_cam(kind="webcam"), "cameras.0.kind", "known: mujoco, opencv, realsense, synthetic"),
    (_cam(kind="realsense", exposure_us=5000), "cameras.0", "auto_exposure: false"),
    (_cam(kind="realsense", depth_width=320), "cameras.0", "depth_height"),
    (_cam(kind="realsense", serial=123), "cameras.0.serial", "valid string"),
    (_cam(kind="opencv"), "cameras.0.device", "required"),
    (_cam(kind="opencv", device=0, fourcc="MJPEG"), "cameras.0.fourcc", "at most 4"),
    (_cam(jpeg_quality=0), "cameras.0.jpeg_quality", "greater than or equal to 1"),
    (_cam(serial="123"), "cameras.0.serial", "Extra inputs"),  # a realsense key without the kind
    (_cam(kind=None), "cameras.0.kind", "missing: one of ['mujoco', 'opencv', 'realsense', 'synthetic']"),
])
def test_bad_camera_configs_name_the_key_and_the_reason(tmp_path, camera, key, words):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, camera)
    assert err.value.key == key, err.value
    assert words in err.value.reason, err.value
