"""A camera on a host with no driver, whose wall clock runs 2 s behind ours: its process answers
clock pings on its `clock` endpoint, the inference process measures that host's offset and the
frames are aged on our clock, so the episode runs. Without the measured offset every frame would
look 2 s old (max_frame_age_s 0.25 s) and the episode could not start.

The camera host is 127.0.0.4 (plain TCP on loopback); the driver and inference talk over ipc. The
skew is ARMADA_TEST_CLOCK_SKEW_S, which only a synthetic camera accepts.
"""

from __future__ import annotations

import socket

import pytest
import yaml

from armada.runtime.config import SCRIPTED_CELL, CameraBaseConfig
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.remote.bench import loopback_aliases
from armada.runtime.supervisor import CellProcesses

pytestmark = pytest.mark.hil

CAMERA_HOST = "127.0.0.4"
SKEW_S = -2.0

if "clock" not in CameraBaseConfig.model_fields:
    pytest.skip("runtime/config.py's camera model has no `clock` endpoint yet (requested of the lead)",
                allow_module_level=True)
if not loopback_aliases():
    pytest.skip("this machine cannot bind 127.0.0.2+ (no 127/8 loopback)", allow_module_level=True)


def _port() -> int:
    with socket.create_server((CAMERA_HOST, 0)) as s:
        return s.getsockname()[1]


def test_frames_of_a_camera_host_with_a_wrong_clock_are_aged_by_its_measured_offset(short_tmp, monkeypatch):
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["name"] = "camera-clock"
    data["cameras"] = [{"name": "ceiling", "width": 160, "height": 120, "fps": 30,
                        "frames": f"tcp://{CAMERA_HOST}:{_port()}", "clock": f"tcp://{CAMERA_HOST}:{_port()}"}]
    data["inference"]["episode_duration_s"] = 2
    data["drivers"][0]["lease_ttl_s"] = 1.0  # a loaded 2-core CI host misses 0.3 s heartbeats
    data["plain_tcp_loopback"] = True
    cell = short_tmp / "cell.yaml"
    cell.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("ARMADA_TEST_CLOCK_SKEW_S", str(SKEW_S))  # the children inherit it; cameras read it
    with CellProcesses(cell, short_tmp / "run") as procs:
        procs.start_all(timeout_s=40)  # a loaded 2-core CI host can take 15 s to start a driver
        client = EpisodeClient(procs.ctx, procs.cell)
        try:
            report = client.wait_report(client.start("clock", arm=True), 30)
        finally:
            client.close()
        infer_log = procs.child("infer").log_tail(400)
        camera_log = procs.child("ceiling").log_tail(400)
    assert "every wall-clock stamp is -2.000 s off" in camera_log, camera_log
    assert report["outcome"] == "completed", (report, infer_log)
    line = next((ln for ln in infer_log.splitlines() if "camera ceiling: its host's clock is" in ln), None)
    assert line is not None, infer_log
    offset_ms = float(line.split("clock is ")[1].split(" ms")[0])
    print(f"measured: {line.split('camera ceiling: ')[1]}")
    assert offset_ms == pytest.approx(SKEW_S * 1000, abs=20), line
