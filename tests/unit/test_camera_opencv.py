"""The OpenCV camera source on a generated MJPG video through the real cv2.VideoCapture."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq
from pydantic import TypeAdapter

from armada.drivers.cameras.fake.video_file import make_video
from armada.drivers.cameras.opencv_camera import OpenCVSource
from armada.drivers.cameras.process import CameraProcess
from armada.drivers.cameras.source import SourceError
from armada.drivers.cameras.synthetic import SyntheticCamera
from armada.runtime.config import CameraConfig
from armada.runtime.transport import FrameSubscriber

W, H, FPS = 320, 240, 30.0


def _cfg(**fields):
    return TypeAdapter(CameraConfig).validate_python(
        {"name": "wrist", "kind": "opencv", "width": W, "height": H, "fps": FPS, "frames": "inproc://unused"} | fields)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "uvc.avi", width=W, height=H, fps=FPS, frames=24)


def _read_all(source: OpenCVSource, limit: int, timeout_s: float = 0.3) -> list:
    frames = []
    while len(frames) < limit:
        frame = source.read(timeout_s)
        if frame is None:
            break
        frames.append(frame)
    return frames


def test_a_video_plays_through_videocapture_paced_at_its_rate_with_stamps_and_numbers(video):
    source = OpenCVSource(_cfg(device=str(video), repeat_playback=False))
    info = source.open()
    assert info["backend"] == "FFMPEG" and info["fps"] == pytest.approx(FPS)
    try:
        frames = _read_all(source, 100)
        assert source.read(0.2) is None  # the end of the file is a stall, not a repeat of the last frame
    finally:
        source.close()
    assert [f.device_frame for f in frames] == list(range(24))
    pattern = SyntheticCamera(W, H)
    for f in frames[::6]:
        assert f.rgb.shape == (H, W, 3) and f.rgb.flags.c_contiguous
        assert np.abs(f.rgb.astype(np.int16) - pattern.grab(f.device_frame)).mean() < 4  # MJPG is lossy
    assert {f.clock for f in frames} == {"arrival-interval"}
    assert {f.device_domain for f in frames} == {"media_position"}
    spacing_ms = np.diff([f.capture_ns for f in frames]) * 1e-6
    assert 30 < np.median(spacing_ms) < 37  # paced at the file's 30 fps, not as fast as it decodes
    assert frames[-1].capture_ns < time.time_ns()


def test_a_video_with_repeat_loops_without_losing_a_slot_and_its_frame_counter_counts_on(video):
    source = OpenCVSource(_cfg(device=str(video), repeat_playback=True))
    source.open()
    try:
        frames = _read_all(source, 30)
    finally:
        source.close()
    numbers = [f.device_frame for f in frames]
    assert numbers == list(range(30))  # so a frame lost at the wrap is still a gap, counted as a drop
    pattern = SyntheticCamera(W, H)
    assert np.abs(frames[24].rgb.astype(np.int16) - pattern.grab(0)).mean() < 4  # the first frame again
    loop_gap_ms = (frames[24].capture_ns - frames[23].capture_ns) * 1e-6
    assert loop_gap_ms < 1.5e3 / FPS  # looping costs no frame slot


@pytest.mark.parametrize("device, words", [
    ("/dev/v4l/by-id/usb-Nobody_Camera-video-index0", "/dev/v4l/by-id"),
    ("no_such_video.avi", "neither an index, a /dev path nor a video file"),
])
def test_a_missing_device_is_reported_with_the_cameras_that_exist(device, words):
    with pytest.raises(SourceError) as err:
        OpenCVSource(_cfg(device=device)).open()
    assert "camera wrist" in str(err.value) and words in str(err.value)


def test_an_index_with_no_camera_behind_it_is_a_clear_error():
    with pytest.raises(SourceError, match="cannot open 9 .*V4L2"):
        OpenCVSource(_cfg(device=9)).open()


def test_a_video_of_another_size_is_refused(video):
    with pytest.raises(SourceError, match="is 320x240, the config asks 640x480"):
        OpenCVSource(_cfg(device=str(video), width=640, height=480)).open()


def test_camera_process_stalls_publishes_nothing_stale_and_recovers_after_replug(tmp_path, short_tmp):
    """The file ends (a stall), is gone while reopening (unplugged), then comes back (replugged)."""
    path = make_video(tmp_path / "cam.avi", width=W, height=H, fps=FPS, frames=15)
    cfg = _cfg(device=str(path), repeat_playback=False, frames=f"ipc://{short_tmp}/cam", reopen_backoff_s=0.1,
               reopen_backoff_max_s=0.2)
    process = CameraProcess(cfg)
    ctx = zmq.Context()
    sub = FrameSubscriber(ctx, cfg.frames, hwm=1000)
    thread = threading.Thread(target=process.run, daemon=True)
    thread.start()
    received = []
    try:
        _receive_until(sub, received, lambda: process.stalls >= 1, 5.0)
        path.rename(tmp_path / "unplugged.avi")
        _receive_for(sub, received, 0.5)  # reopen attempts fail meanwhile
        assert process.recoveries == 0
        (tmp_path / "unplugged.avi").rename(path)
        _receive_until(sub, received, lambda: any(h["recoveries"] == 1 for h, _ in received), 5.0)
    finally:
        process.request_stop()
        thread.join(5)
        sub.close()
        ctx.term()
    assert not thread.is_alive()
    headers = [h for h, _ in received]
    seqs = [h["frame_seq"] for h in headers]  # (the first few may go before the subscriber joins)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing lost in between
    # Every frame was fresh when it arrived: the stall produced silence, not repeats.
    assert max(age for _, age in received) < 0.25
    before = [h for h in headers if h["recoveries"] == 0]
    after = [h for h in headers if h["recoveries"] == 1]
    assert [h["device_frame"] for h in before] == list(range(15 - len(before), 15))
    assert after and after[0]["device_frame"] == 0
    gap_s = (after[0]["capture_ns"] - before[-1]["capture_ns"]) * 1e-9
    assert gap_s > 0.5  # the unplugged half second is a hole in time, not a run of old frames
    assert after[-1]["drops"] == 0  # an outage is a recovery, not drops


def _receive_for(sub: FrameSubscriber, out: list, seconds: float, done=lambda: False) -> None:
    """Collect (header, age at receipt) for ``seconds`` or until ``done()``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done():
        frame = sub.recv(0.05)
        if frame is not None:
            out.append((frame.header, (time.time_ns() - frame.header["capture_ns"]) * 1e-9))


def _receive_until(sub: FrameSubscriber, out: list, done, timeout_s: float) -> None:
    _receive_for(sub, out, timeout_s, done)
    assert done(), f"condition not reached within {timeout_s} s"
