"""Camera processes under HIL with the playback fakes: RealSense recording, MJPG video, synthetic JPEG.

The recording and the video are made at test time and played through the real pyrealsense2
pipeline and the real cv2.VideoCapture, in camera processes started as in production.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from armada.runtime.config import CONFIG_DIR
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.supervisor import CellProcesses
from armada.runtime.transport import FrameSubscriber

pytestmark = pytest.mark.hil

try:
    import pyrealsense2  # noqa: F401
except ImportError as exc:  # the wheel needs the system's libusb-1.0 (Debian: libusb-1.0-0)
    pytest.skip(f"pyrealsense2 does not import: {exc}", allow_module_level=True)

from armada.drivers.cameras.fake.__main__ import RECORDING, VIDEO, make_all

FAKE_CELL = CONFIG_DIR / "cells" / "cameras_fake.yaml"
RECORDING_S = 2.0
COLLECT_S = 3.0  # long enough that a scheduling hiccup of a loaded machine averages out of the rate


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fakes")
    make_all(folder, seconds=RECORDING_S)
    return folder


def _run_dir(fakes: Path, run_dir: Path) -> Path:
    for name in (RECORDING, VIDEO):
        shutil.copy(fakes / name, run_dir / name)
    return run_dir


def _collect(procs: CellProcesses, seconds: float) -> dict[str, list]:
    """Every frame of every camera for ``seconds``: (header, age at receipt in s, frame).

    One poller over all cameras, so a frame is taken as soon as it arrives: the age measures the
    camera process, not this loop waiting on another camera's socket.
    """
    subs = {c.name: FrameSubscriber(procs.ctx, c.frames, hwm=1000) for c in procs.cell.cameras}
    time.sleep(0.2)
    for sub in subs.values():  # frames queued while joining would look late
        while sub.socket.poll(0):
            sub.recv(0)
    poller = zmq.Poller()
    by_socket = {}
    for name, sub in subs.items():
        poller.register(sub.socket, zmq.POLLIN)
        by_socket[sub.socket] = name
    out: dict[str, list] = {n: [] for n in subs}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for socket, _ in poller.poll(10):
            name = by_socket[socket]
            frame = subs[name].recv(0)
            if frame is not None:
                out[name].append((frame.header, (time.time_ns() - frame.header["capture_ns"]) * 1e-9, frame))
    for sub in subs.values():
        sub.close()
    return out


def _ages_ok(name: str, ages: list[float]) -> None:
    """Fresh: stamped at or before arrival (never ahead of our clock), most frames within a few
    frame intervals, and none late by more than a scheduling hiccup of a loaded machine. A wrong
    clock mapping (an offset) fails the first two; a camera process that stalls fails the last."""
    ages_ms = np.sort(np.array(ages)) * 1e3
    p90, worst = float(np.percentile(ages_ms, 90)), float(ages_ms[-1])
    summary = f"{name}: ages min {ages_ms[0]:.1f} p50 {np.median(ages_ms):.1f} p90 {p90:.1f} max {worst:.1f} ms"
    assert ages_ms[0] > -5.0, f"{summary}: a frame stamped in the future"
    assert p90 < 100.0, f"{summary}: frames arrive stale"
    assert worst < 400.0, f"{summary}: a frame arrived very late"


def test_three_kinds_of_camera_process_publish_fresh_stamped_frames(fakes, short_tmp):
    with CellProcesses(FAKE_CELL, _run_dir(fakes, short_tmp)) as procs:
        for cam in procs.cell.cameras:
            procs.spawn("camera", cam.name)
        procs.wait_ready()
        frames = _collect(procs, COLLECT_S)

    for name, got in frames.items():
        # 30 fps nominal; a loaded 2-core machine slows a playback down a little, not by half.
        assert len(got) >= 0.6 * 30 * COLLECT_S, f"{name}: {len(got)} frames in {COLLECT_S} s at 30 fps"
        seqs = np.array([h["frame_seq"] for h, _, _ in got])
        assert np.all(np.diff(seqs) >= 1), f"{name}: frames repeated or out of order: {seqs}"
        # A publisher drops frames for a subscriber that falls behind (a few frames of queue, on
        # purpose): on a loaded machine this test process can be descheduled long enough to lose a
        # frame or two, over which the camera has no say. More than that is a fault of the chain.
        lost = int(seqs[-1] - seqs[0] + 1 - len(seqs))
        assert lost <= max(2, len(seqs) // 10), f"{name}: {lost} of {seqs[-1] - seqs[0] + 1} frames lost in transport"
        stamps = [h["capture_ns"] for h, _, _ in got]
        assert all(b > a for a, b in zip(stamps, stamps[1:])), f"{name}: capture stamps not increasing"
        _ages_ok(name, [age for _, age, _ in got])
        assert all(f.pixels.shape == (240, 320, 3) for _, _, f in got)
    head = [(h, f) for h, _, f in frames["head"]]
    assert {h["clock"] for h, _ in head} == {"rs:hardware_clock+min-offset"}
    assert {h["device_domain"] for h, _ in head} == {"hardware_clock"}
    assert all(f.depth is not None and f.depth.shape == (240, 320) for _, f in head)  # aligned to colour
    assert head[-1][1].depth[230, 160] * head[-1][0]["depth_scale_m"] == pytest.approx(0.8, abs=0.002)
    wrist = [h for h, _, _ in frames["wrist"]]
    assert {h["clock"] for h in wrist} == {"arrival-interval"} and {h["encoding"] for h in wrist} == {"raw"}
    side = [h for h, _, _ in frames["side"]]
    assert {h["encoding"] for h in side} == {"jpeg"} and all(h["jpeg_quality"] == 85 for h in side)
    for name in ("wrist", "side"):
        # The camera counts frames lost before they reached it; a playback or synthetic camera
        # descheduled on a loaded machine really does skip a frame now and then, never many.
        drops = np.array([h["drops"] for h, _, _ in frames[name]])
        assert np.all(np.diff(drops) >= 0), f"{name}: the drop count went down: {drops}"
        assert drops[-1] - drops[0] <= max(2, len(drops) // 10), f"{name}: {drops[-1] - drops[0]} frames dropped"


def _stall_cell(run_dir: Path) -> Path:
    """The fake cell with the RealSense recording played once: its end is a stall."""
    data = yaml.safe_load(FAKE_CELL.read_text())
    head = next(c for c in data["cameras"] if c["name"] == "head")
    head.update(repeat_playback=False, frame_timeout_s=0.2, reopen_backoff_s=0.2, reopen_backoff_max_s=0.4)
    data["drivers"][0]["embodiment"] = str(CONFIG_DIR / "embodiments" / "mock_arm.yaml")
    path = run_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_stalled_then_unplugged_camera_pauses_the_episode_and_it_resumes_after_replug(fakes, short_tmp):
    run_dir = _run_dir(fakes, short_tmp)
    recording = run_dir / RECORDING
    events: list[tuple[float, str, dict]] = []
    with CellProcesses(_stall_cell(run_dir), run_dir) as procs:
        procs.start_all()
        client = EpisodeClient(procs.ctx, procs.cell)

        def unplug_and_replug() -> None:
            time.sleep(0.5)
            recording.rename(run_dir / "unplugged.db3")  # the playing pass ends, then reopening fails
            time.sleep(RECORDING_S + 1.2)
            (run_dir / "unplugged.db3").rename(recording)

        episode = client.start("wave", duration_s=7.0, arm=True)
        side = threading.Thread(target=unplug_and_replug)
        side.start()
        report = client.wait_report(episode, timeout_s=40,
                                    on_event=lambda e, d: events.append((time.monotonic(), e, d)))
        side.join()
        client.close()
        head_log = procs.child("head").log_path.read_text()

    assert report["outcome"] == "completed", report
    pauses = _pauses(events)
    assert pauses, [e for _, e, _ in events]
    assert all("head" in reason and "old" in reason for _, _, reason in pauses), pauses
    # The unplugged stretch is one long pause; each end of the recording is a short one.
    unplugged = max(pauses, key=lambda p: p[1] - p[0])
    assert unplugged[1] - unplugged[0] > 0.6, pauses
    chunks = [t for t, e, _ in events if e == "chunk"]
    assert not [t for t in chunks for start, end, _ in pauses if start < t < end], "a chunk from a stale observation"
    assert [t for t in chunks if t > unplugged[1]], "the episode did not go on after the camera came back"
    assert "no frame for" in head_log and "reopening failed" in head_log and "reopened after" in head_log


def _pauses(events: list[tuple[float, str, dict]]) -> list[tuple[float, float, str]]:
    """(paused at, resumed at, reason) for every pause that ended."""
    out, start, reason = [], None, ""
    for t, e, d in events:
        if e == "paused":
            start, reason = t, d["reason"]
        elif e == "resumed" and start is not None:
            out.append((start, t, reason))
            start = None
    return out
