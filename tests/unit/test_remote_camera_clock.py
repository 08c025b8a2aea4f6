"""A camera on a host with no driver: its process answers clock pings, the inference side measures
that host's offset (runtime/remote/clock.py CameraClocks) and frame ages use it
(ObservationBuilder.camera_clocks). One camera process, in a thread, shared by the file."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq

from armada.drivers.cameras.plugins import SyntheticCameraConfig
from armada.drivers.cameras.process import CLOCK_SKEW_ENV, CameraProcess, clock_skew_for_tests_ns
from armada.runtime.inference.observation import Arrival, ObservationBuilder
from armada.runtime.remote.clock import CameraClocks, camera_clock_endpoints, ping_clock
from armada.runtime.transport import CommandClient, FrameSubscriber, RemoteError

SKEW_NS = -2_000_000_000  # the camera host's wall clock runs 2 s behind ours


class ClockedCameraConfig(SyntheticCameraConfig):
    """A synthetic camera with a clock endpoint, whatever runtime/config.py's camera model has yet."""

    clock: str | None = None


def _port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def camera(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cam")
    cfg = ClockedCameraConfig(name="ceiling", width=64, height=48, fps=30, frames=f"ipc://{folder}/frames",
                              clock=f"tcp://127.0.0.1:{_port()}")
    process = CameraProcess(cfg)
    process.clock_skew_ns = SKEW_NS
    thread = threading.Thread(target=process.run, daemon=True)
    thread.start()
    yield process
    process.request_stop()
    thread.join(10)
    assert not thread.is_alive()


def test_the_skew_for_tests_is_refused_for_a_real_camera_and_for_nonsense():
    assert clock_skew_for_tests_ns("synthetic", {}) == 0
    assert clock_skew_for_tests_ns("synthetic", {CLOCK_SKEW_ENV: "-2.5"}) == -2_500_000_000
    with pytest.raises(SystemExit, match="synthetic cameras only; this camera is 'realsense'"):
        clock_skew_for_tests_ns("realsense", {CLOCK_SKEW_ENV: "1"})
    for bad in ("abc", "nan", "1e9"):
        with pytest.raises(SystemExit, match=CLOCK_SKEW_ENV):
            clock_skew_for_tests_ns("synthetic", {CLOCK_SKEW_ENV: bad})


def test_a_clock_ping_measures_the_camera_hosts_offset(camera):
    ctx = zmq.Context()
    client = CommandClient(ctx, camera.cfg.clock, default_timeout_s=2.0)
    try:
        sample = ping_clock(client, samples=8, timeout_s=2.0)
        with pytest.raises(RemoteError, match="answers ping only"):
            client.request("hello", version="1.0", role="test")  # nothing else is served there
    finally:
        client.close()
        ctx.destroy(linger=0)
    # The estimate is within half the best round trip of the truth.
    assert abs(sample.offset_ns - SKEW_NS) <= sample.rtt_ns / 2 + 1_000_000, sample
    assert camera.clock_pings >= 8


def test_frames_from_a_camera_host_behind_us_are_fresh_once_its_clock_is_measured(camera):
    clocks = CameraClocks({"ceiling": camera.cfg.clock}, period_s=0.2, timeout_s=2.0)
    ctx = zmq.Context()
    sub = FrameSubscriber(ctx, camera.cfg.frames)
    try:
        assert clocks.measured.wait(10)
        assert clocks.offset_ns("ceiling") == pytest.approx(SKEW_NS, abs=20_000_000), clocks.errors
        frame = sub.recv(5.0)
        assert frame is not None
        now_mono, now_wall = time.monotonic_ns(), time.time_ns()
        arrival = Arrival(frame, now_mono, frame.header["capture_ns"], now_wall)
        builder = ObservationBuilder({}, {}, max_frame_age_s=0.25, max_state_age_s=0.1)
        assert builder.age_s("ceiling", arrival, now_mono) > 1.9  # stamped 2 s in our past: looks stale
        builder.camera_clocks = clocks
        assert builder.age_s("ceiling", arrival, now_mono) < 0.25  # on our clock: fresh
        builder.sender_offset_ns["ceiling"] = 0  # a driver host's offset, where there is one, comes first
        assert builder.age_s("ceiling", arrival, now_mono) > 1.9
    finally:
        sub.close()
        ctx.destroy(linger=0)
        clocks.close()


def test_a_camera_clock_that_does_not_answer_is_an_error_not_an_offset():
    clocks = CameraClocks({"gone": f"tcp://127.0.0.1:{_port()}"}, period_s=10, samples=1, timeout_s=0.2)
    try:
        assert clocks.measured.wait(5)
        assert clocks.offset_ns("gone") is None and "no reply" in clocks.errors["gone"]
    finally:
        t = time.monotonic()
        clocks.close()
        assert time.monotonic() - t < 2  # the thread's wait ends at once


def test_only_cameras_with_a_tcp_clock_endpoint_are_pinged():
    cams = [ClockedCameraConfig(name="a", frames="ipc:///tmp/a", clock="tcp://10.0.0.9:7000"),
            ClockedCameraConfig(name="b", frames="ipc:///tmp/b"),
            SyntheticCameraConfig(name="c", frames="ipc:///tmp/c")]
    assert camera_clock_endpoints(cams) == {"a": "tcp://10.0.0.9:7000"}
