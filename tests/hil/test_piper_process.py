"""A real PiPer driver process against the fake firmware in another process, over udp_multicast.

Each test gets its own multicast group and its own UDP port (a PiPer driver hears every group on
its port, see drivers/piper/fake/bus.py), passed to the driver child as CAN_CONFIG.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("piper_sdk")
pytest.importorskip("can")

from armada.drivers.piper.fake.client import FakePiperProcess, free_udp_port, random_group  # noqa: E402
from armada.runtime.config import CONFIG_DIR, load_embodiment  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.transport import CommandClient  # noqa: E402
from tests.hil.helpers import StateRecorder  # noqa: E402

pytestmark = pytest.mark.hil

CELL = CONFIG_DIR / "cells" / "piper_fake.yaml"
EMB = load_embodiment("piper")
DT = 1.0 / EMB.control_rate_hz
MDEG_PER_RAD = math.degrees(1.0) * 1000.0
# Fake killed -> feedback stale after 50 ms (PiperBackend.stale_s) -> read errors for more than
# 0.1 s (READ_FAILURE_FAULT_S) -> fault: about 0.15 s after the last frame. Measured on a 2-core
# box: 0.136-0.149 s after the kill (6 runs). The bound leaves room for a loaded machine.
KILL_TO_FAULT_BOUND_S = 0.3
# A driver with no arm on its bus: no feedback frame within 1.5 s ends the connect (not the whole
# CONNECT_TIMEOUT_S); with the interpreter's start-up the process is gone well inside 5 s.
NO_ARM_EXIT_BOUND_S = 5.0


@pytest.fixture
def bus(monkeypatch):
    """A private (group, port); the driver children inherit the port through CAN_CONFIG."""
    port = free_udp_port()
    monkeypatch.setenv("CAN_CONFIG", json.dumps({"port": port}))
    return random_group(), port


def fake_cell(folder: Path, group: str) -> Path:
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["backend"]["can"] = group
    data["drivers"][0].pop("realtime_priority", None)  # the normal scheduler, as on CI
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_fake_process_starts_answers_and_stops_cleanly(bus):
    group, port = bus
    fake = FakePiperProcess([group], port, "--home")
    try:
        assert fake.ready["channels"] == [group] and fake.ready["bustype"] == "udp_multicast"
        assert fake.ready["port"] == port
        state = fake.state(group)
        assert state["frames_sent"] > 0 and not state["estopped"]
        assert np.allclose(state["q"], EMB.home[:6], atol=1e-5)
        assert fake.cmd("ping") == "ok"
        with pytest.raises(RuntimeError, match="unknown command"):
            fake.cmd("warp 9")
        with pytest.raises(RuntimeError, match="no channel"):
            fake.cmd("estop 239.0.0.1")
        fake.cmd(f"error {group} 0x4")
        assert fake.state(group)["err_code"] == 4
        fake.proc.send_signal(signal.SIGTERM)
        assert fake.proc.wait(timeout=5) == 0
    finally:
        fake.close()


def test_driver_process_runs_a_trajectory_within_limits_and_faults_when_the_fake_dies(bus, short_tmp):
    group, port = bus
    with FakePiperProcess([group], port, "--home") as fake, CellProcesses(fake_cell(short_tmp, group), short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready(15.0)
        drv = procs.cell.drivers[0]
        client = CommandClient(procs.ctx, drv.cmd, default_timeout_s=1.0)
        rec = StateRecorder(procs.ctx, drv.state)
        try:
            lease = client.request("acquire", client="test")["lease"]
            client.request("arm", lease=lease)
            start = rec.wait_mode("armed", 2.0)["commanded"]
            since = time.monotonic()
            _run_chunk(client, rec, lease, start)
            _check_received_targets(fake.targets(group, since))
            fake.kill()
            killed_ns = time.monotonic_ns()
            faulted = rec.wait_mode("fault", 2.0)
        finally:
            rec.stop()
            client.close()
    kill_to_fault_s = (faulted["mono_ns"] - killed_ns) * 1e-9
    assert kill_to_fault_s < KILL_TO_FAULT_BOUND_S, kill_to_fault_s
    assert "stale" in faulted["reason"], faulted["reason"]


def test_an_episode_of_chunks_from_the_inference_process_stays_within_limits(bus, short_tmp):
    """The whole cell: camera, inference (scripted chunks of 50 at 50 Hz) and the driver, over the fake."""
    from armada.runtime.inference.client import EpisodeClient

    group, port = bus
    with FakePiperProcess([group], port, "--home") as fake, CellProcesses(fake_cell(short_tmp, group), short_tmp) as procs:
        procs.start_all()
        since = time.monotonic()
        client = EpisodeClient(procs.ctx, procs.cell)
        try:
            report = client.wait_report(client.start("wave", duration_s=3.0, arm=True), timeout_s=30.0)
        finally:
            client.close()
        targets = fake.targets(group, since)
    assert report["outcome"] == "completed", report
    assert report["chunks"] >= 3
    sent = np.array([q for _, q in targets])
    step = np.abs(np.diff(sent, axis=0)).max(axis=0)
    assert np.all(step <= EMB.max_velocity[:6] * DT + 1.0 / MDEG_PER_RAD), step / DT
    assert np.ptp(sent, axis=0).max() > 0.05  # the arm followed the chunks


def _run_chunk(client: CommandClient, rec: StateRecorder, lease: str, start: np.ndarray) -> None:
    """A chunk asking 1.5 rad/s on joint 1 (limit 1.0) for 0.4 s: the driver must cap what it sends."""
    goal = start + np.array([0.6, 0.4, -0.4, 0.2, -0.2, 0.4, 0.01])
    pts = start + np.linspace(0.0, 1.0, 81)[:, None] * (goal - start)
    now = client.request("ping")["mono_ns"]
    client.request("trajectory", lease=lease, t0_ns=now + int(0.05e9), dt=0.005, points=pts, final=True)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        client.request("heartbeat", lease=lease)
        state = rec.latest()
        # The chunk is over when the driver holds (armed) exactly at its last point.
        if state["mode"] == "armed" and np.allclose(state["commanded"], goal, atol=1e-9):
            return
        time.sleep(0.02)
    raise AssertionError(f"the chunk did not finish within 5 s (mode {rec.latest()['mode']}, "
                         f"commanded {rec.latest()['commanded']}, goal {goal})")


def _check_received_targets(targets: list) -> None:
    sent = np.array([q for _, q in targets])
    assert len(sent) > 40, len(sent)
    step = np.abs(np.diff(sent, axis=0)).max(axis=0)
    rounding = 1.0 / MDEG_PER_RAD
    # One target per control tick, each within one tick of the velocity limit (the driver skips
    # overrun ticks rather than bursting, so a late tick never doubles a step).
    assert np.all(step <= EMB.max_velocity[:6] * DT + rounding), step / DT
    assert step[0] / DT > 0.7  # joint 1 moved near its limit (acceleration-limited ramp)
    assert np.ptp(sent[:, 0]) > 0.55  # and it got most of the way


def test_a_driver_with_no_arm_on_its_bus_exits_with_a_clear_error(bus, short_tmp):
    group, _ = bus  # nobody serves this group
    procs = CellProcesses(fake_cell(short_tmp, group), short_tmp)
    try:
        t0 = time.monotonic()
        child = procs.spawn("driver", "arm")
        try:
            code = child.proc.wait(timeout=NO_ARM_EXIT_BOUND_S + 5.0)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - t0
        log = child.log_tail(40)
    finally:
        procs.close()
    assert code not in (None, 0), f"driver did not exit with an error (code {code}):\n{log}"
    assert elapsed < NO_ARM_EXIT_BOUND_S, elapsed
    assert "cannot connect to the device" in log and "no joint feedback" in log and group in log, log


def test_latency_bench_sees_every_step_within_a_few_cycles():
    from armada.drivers.piper.bench import bench_piper

    result = bench_piper(1.0)
    period_ms = 1e3 / result["fake_rate_hz"]
    for transport in ("udp_multicast", "virtual"):
        r = result[transport]
        assert r["count"] >= 30 and r["lost"] <= 0.05 * r["count"], r
        # A target waits for the fake's next cycle (half a period on average), so a median far
        # below that would mean the bench saw a frame sent before the command.
        assert 0.2 * period_ms < r["median_ms"] <= r["p99_ms"] <= r["max_ms"] < 20 * period_ms, r
        assert r["median_ms"] <= r["visible_median_ms"], r


def test_a_driver_on_a_virtual_bus_is_refused_with_the_reason(short_tmp):
    data = yaml.safe_load(CELL.read_text())
    data["drivers"][0]["backend"]["bustype"] = "virtual"
    path = short_tmp / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "driver", str(path), "--name", "arm", "--run-dir",
                          str(short_tmp)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "bustype virtual only connects buses inside one process" in out.stderr
