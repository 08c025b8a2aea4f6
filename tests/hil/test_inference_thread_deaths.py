"""A thread that dies takes its process down (exit 1, naming the thread and why): the inference
process and the camera process, each run as in production with one of its threads made to die."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from armada.runtime.config import CONFIG_DIR, SCRIPTED_CELL, load_cell
from armada.runtime.inference.client import EpisodeClient
from tests.unit.test_inference_fakes import FakeDriver

pytestmark = pytest.mark.hil


def _start(code: str, log_path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def test_a_dead_heartbeat_thread_takes_the_inference_process_down(ctx, short_tmp):
    cell = load_cell(SCRIPTED_CELL, short_tmp)
    d = cell.drivers[0]
    driver = FakeDriver(ctx, d.cmd, d.state)
    log_path = short_tmp / "infer.log"
    proc = _start(f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        from armada.runtime.inference.link import DriverLink
        def beat(self, period_s, alive):
            raise RuntimeError("heartbeat exploded")
        DriverLink._beat = beat
        from armada.runtime.inference.process import run_inference
        run_inference({str(SCRIPTED_CELL)!r}, {str(short_tmp)!r})
    """, log_path)
    try:
        time.sleep(1.0)
        client = EpisodeClient(ctx, cell)
        client.ctl.default_timeout_s = 10.0  # the first request waits for the process to come up
        client.start("wave", duration_s=30.0, arm=True)
        client.close()
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        driver.close()
    log = log_path.read_text()
    assert code == 1, log
    assert "thread heartbeat-arm died: RuntimeError: heartbeat exploded" in log, log


def test_a_dead_grab_thread_takes_the_camera_process_down(short_tmp):
    from armada.drivers.cameras.fake.video_file import make_video

    make_video(short_tmp / "fake_uvc.avi", frames=30)
    data = yaml.safe_load((CONFIG_DIR / "cells" / "cameras_fake.yaml").read_text())
    data["cameras"] = [c for c in data["cameras"] if c["name"] == "wrist"]
    cell_path = short_tmp / "cell.yaml"
    cell_path.write_text(yaml.safe_dump(data))
    log_path = short_tmp / "camera.log"
    proc = _start(f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        from armada.drivers.cameras import opencv_camera
        def run(self):
            raise RuntimeError("the capture SDK blew up")
        opencv_camera._Grabber._run = run
        from armada.drivers.cameras.process import run_camera
        run_camera({str(cell_path)!r}, "wrist", {str(short_tmp)!r})
    """, log_path)
    try:
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert code == 1, log
    assert "thread grab-wrist died: RuntimeError: the capture SDK blew up" in log, log
