"""The RealSense source on a synthetic recording played through the real pyrealsense2 pipeline."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import TypeAdapter

from armada.drivers.cameras.source import SourceError
from armada.drivers.cameras.synthetic import SyntheticCamera
from armada.drivers.cameras.timing import DropCounter
from armada.runtime.config import CameraConfig

try:
    import pyrealsense2  # noqa: F401
except ImportError as exc:  # the wheel needs the system's libusb-1.0 (Debian: libusb-1.0-0)
    pytest.skip(f"pyrealsense2 does not import: {exc}", allow_module_level=True)

from armada.drivers.cameras.fake.realsense_recording import BASELINE_M, DEPTH_UNITS_M, make_recording
from armada.drivers.cameras.realsense import RealSenseSource

W, H = 320, 240
SKIPPED = (110, 111)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("rs") / "d435.db3"
    return make_recording(path, width=W, height=H, depth_size=(W // 2, H // 2), seconds=1.0, first_frame=100,
                          skipped=SKIPPED)


def _cfg(recording, **fields):
    base = {"name": "head", "kind": "realsense", "width": W, "height": H, "fps": 30, "frames": "inproc://unused",
            "playback": str(recording.path), "depth": True, "depth_width": W // 2, "depth_height": H // 2,
            "repeat_playback": False}
    return TypeAdapter(CameraConfig).validate_python(base | fields)


def _play(source: RealSenseSource, limit: int = 200) -> list:
    frames = []
    while len(frames) < limit:
        frame = source.read(0.5)
        if frame is None:
            break
        frames.append((frame, time.time_ns()))
    return frames


@pytest.fixture(scope="module")
def played(recording):
    source = RealSenseSource(_cfg(recording))
    info = source.open()
    try:
        frames = _play(source)
    finally:
        source.close()
    assert len(frames) > 20, f"only {len(frames)} frames played"
    return info, frames


def test_playback_gives_the_recorded_colour_frames_with_their_numbers(recording, played):
    info, frames = played
    assert info["serial"] == recording.serial and info["playback"]
    numbers = [f.device_frame for f, _ in frames]
    assert numbers == sorted(set(numbers)), "each colour frame once, in order"
    pattern = SyntheticCamera(W, H)
    for f, _ in frames[::5]:
        assert f.rgb.shape == (H, W, 3) and f.rgb.flags.c_contiguous
        assert np.array_equal(f.rgb, pattern.grab(f.device_frame))  # RGB8 is recorded losslessly


def test_frame_number_gaps_are_counted_as_drops(played):
    _, frames = played
    numbers = [f.device_frame for f, _ in frames]
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    assert missing == list(SKIPPED)
    counter = DropCounter(33_333_333)
    for f, _ in frames:
        counter.update(f.device_frame, f.capture_ns)
    assert counter.drops == len(SKIPPED)


def test_hardware_timestamps_are_mapped_to_the_host_clock_and_kept(recording, played):
    _, frames = played
    for f, received in frames:
        i = f.device_frame - recording.first_frame
        expected_device_ns = (recording.first_ts_ms + i * 1e3 / recording.fps) * 1e6
        assert f.device_domain == "hardware_clock" and abs(f.device_ts_ns - expected_device_ns) < 1e3
        assert f.clock == "rs:hardware_clock+min-offset"
        assert 0 <= received - f.capture_ns < 100e6  # on the host wall clock, never after its arrival
    # Mapped stamps keep the device's spacing once the min-filter has seen a few frames.
    tail = frames[len(frames) // 2:]
    host = np.diff([f.capture_ns for f, _ in tail])
    device = np.diff([f.device_ts_ns for f, _ in tail])
    assert np.median(np.abs(host - device)) < 2e6


def test_depth_is_aligned_to_colour_through_rs_align(recording, played):
    _, frames = played
    fx_colour = 0.9 * W  # the fake's intrinsics
    shift_px = fx_colour * BASELINE_M / recording.box_m  # the box is nearer: it shifts most
    for f, _ in frames[::7]:
        assert f.depth.shape == (H, W) and f.depth.dtype == np.uint16  # colour's size, not depth's 160x120
        assert f.depth_scale_m == pytest.approx(DEPTH_UNITS_M)
        assert f.depth[H - 20, W // 2] * f.depth_scale_m == pytest.approx(recording.wall_m, abs=0.002)
        i = f.depth_frame - recording.first_frame  # the depth frame paired with this colour frame
        side = recording.depth_height // 4
        box_x = (i * 4) % (recording.depth_width - side)  # in depth pixels
        row = f.depth[H // 8 + side, :]  # a colour row through the box
        box_cols = np.flatnonzero(row == round(recording.box_m / DEPTH_UNITS_M))
        assert box_cols.size > 0
        # Reprojected through the 15 mm baseline, not just scaled up 2x.
        assert box_cols[0] == pytest.approx(2 * box_x + shift_px, abs=2.0)


def test_repeat_playback_loops_and_the_frame_counter_restarts(recording):
    source = RealSenseSource(_cfg(recording, repeat_playback=True, depth=False, depth_width=None, depth_height=None))
    source.open()
    try:
        numbers = [f.device_frame for f, _ in _play(source, limit=40)]
    finally:
        source.close()
    assert len(numbers) == 40
    assert any(b < a for a, b in zip(numbers, numbers[1:])), numbers


def test_selection_by_serial_says_which_serials_exist(recording):
    with pytest.raises(SourceError) as err:
        RealSenseSource(_cfg(recording, serial="999")).open()
    assert repr(recording.serial) in str(err.value) and "'999'" in str(err.value)
    live = _cfg(recording, playback=None, serial="123456789")
    with pytest.raises(SourceError, match=r"no RealSense with serial '123456789' is connected; connected: "):
        RealSenseSource(live).open()


def test_a_recording_without_the_asked_stream_lists_what_it_holds(recording):
    with pytest.raises(SourceError) as err:
        RealSenseSource(_cfg(recording, width=640, height=480)).open()
    message = str(err.value)
    assert "colour 640x480 RGB8" in message and "the recording holds" in message and "320x240" in message


def test_a_missing_recording_is_a_clear_error(tmp_path, recording):
    with pytest.raises(SourceError, match="does not exist"):
        RealSenseSource(_cfg(recording, playback=str(tmp_path / "none.db3"))).open()
