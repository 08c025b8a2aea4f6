"""`armada doctor` measures the other hosts' clocks itself (runtime/doctor/checks.py
check_measured_clocks): which process it asks on each host, the verdicts, and a real measurement
against a camera process whose clock runs 2 s behind."""

from __future__ import annotations

import re
import socket
import threading
from types import SimpleNamespace

import pytest

from armada.drivers.cameras.plugins import SyntheticCameraConfig
from armada.drivers.cameras.process import CameraProcess
from armada.runtime.doctor.checks import ClockProbe, check_measured_clocks, clock_probes
from armada.runtime.doctor.host import Host, measure_clock
from armada.runtime.remote.clock import ClockSample

MS = 1_000_000


def _cell():
    drv = SimpleNamespace(name="arm", cmd="tcp://robot:6001", state="tcp://robot:6002")
    local = SimpleNamespace(name="local", cmd="ipc:///tmp/c", state="ipc:///tmp/s")
    cams = [SimpleNamespace(name="wrist", frames="tcp://robot:6010", clock=None),  # the driver's host
            SimpleNamespace(name="ceiling", frames="tcp://cam1:6010", clock="tcp://cam1:6011"),
            SimpleNamespace(name="door", frames="tcp://cam2:6010", clock=None)]
    return SimpleNamespace(drivers=[local, drv], cameras=cams, curve=None)


PEERS = {"robot": "10.0.0.2", "cam1": "10.0.0.4", "cam2": "10.0.0.5"}


def test_one_probe_per_other_host_a_driver_first_then_a_camera_clock():
    probes, silent = clock_probes(_cell(), PEERS)
    assert probes == [ClockProbe("robot", "driver arm", ("tcp://robot:6001", "tcp://robot:6002")),
                      ClockProbe("cam1", "camera ceiling", ("tcp://cam1:6011",))]
    assert silent == {"cam2": ["door"]}
    assert clock_probes(_cell(), {}) == ([], {})  # a cell all on this host: nothing to measure


def test_a_host_that_runs_only_inference_is_measured_through_it():
    cell = _cell()
    cell.inference = SimpleNamespace(ctl="tcp://gpu:6100", events="tcp://gpu:6101")
    probes, _ = clock_probes(cell, PEERS | {"gpu": "10.0.0.9"})
    assert probes[-1] == ClockProbe("gpu", "inference", ("tcp://gpu:6100",))
    cell.inference = SimpleNamespace(ctl="tcp://robot:6100", events="tcp://robot:6101")
    probes, _ = clock_probes(cell, PEERS)  # inference beside a driver: the driver is asked, once
    assert [p.owner for p in probes] == ["driver arm", "camera ceiling"]


def _host(samples: dict[str, ClockSample | Exception]) -> tuple[Host, list]:
    calls = []

    def fake(probe, curve, timeout_s):
        calls.append((probe.host, timeout_s))
        assert timeout_s > 0, "every clock ping needs a timeout"
        got = samples[probe.host]
        if isinstance(got, Exception):
            raise got
        return got

    return Host(measure_clock=fake), calls


def test_verdicts_ok_within_tolerance_warn_beyond_it_warn_when_silent_skip_when_unmeasurable():
    host, calls = _host({"robot": ClockSample(1 * MS, 2 * MS),  # 1 ms off: fine
                         "cam1": ClockSample(-40 * MS, 1 * MS)})  # 40 ms behind: broken sync
    rows = {r.name: r for r in check_measured_clocks(host, _cell(), PEERS)}
    assert [h for h, _ in calls] == ["robot", "cam1"]
    assert rows["clock of robot"].status == "ok" and "+1.0 ms +- 1.0 ms (via driver arm" in rows["clock of robot"].found
    cam = rows["clock of cam1"]
    assert cam.status == "warn" and "-40.0 ms" in cam.found and "chronyc makestep" in cam.fix
    assert rows["clock of cam2"].status == "skip" and "clock: tcp://cam2:PORT" in rows["clock of cam2"].fix

    host, _ = _host({"robot": ClockSample(8 * MS, 20 * MS),  # within rtt/2: cannot tell it from 0
                     "cam1": TimeoutError("ping to tcp://cam1:6011: no reply within 1.000 s")})
    rows = {r.name: r for r in check_measured_clocks(host, _cell(), PEERS)}
    assert rows["clock of robot"].status == "ok"
    assert rows["clock of cam1"].status == "warn" and "did not answer a clock ping" in rows["clock of cam1"].found
    assert "start the cell's processes on cam1" in rows["clock of cam1"].fix


def _port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class _Clocked(SyntheticCameraConfig):
    clock: str | None = None


def test_the_real_measurement_finds_a_camera_host_2_s_behind(tmp_path):
    cfg = _Clocked(name="ceiling", width=32, height=24, fps=30, frames=f"ipc://{tmp_path}/f",
                   clock=f"tcp://127.0.0.1:{_port()}")
    camera = CameraProcess(cfg)
    camera.clock_skew_ns = -2000 * MS
    thread = threading.Thread(target=camera.run, daemon=True)
    thread.start()
    try:
        sample = measure_clock(ClockProbe("127.0.0.1", "camera ceiling", (cfg.clock,)), None, 2.0)
    finally:
        camera.request_stop()
        thread.join(10)
    assert sample.offset_ns == pytest.approx(-2000 * MS, abs=sample.rtt_ns / 2 + MS)
    rows = check_measured_clocks(Host(measure_clock=lambda *a: sample), SimpleNamespace(
        drivers=[], cameras=[SimpleNamespace(name="ceiling", frames="tcp://127.0.0.1:1", clock=cfg.clock)],
        curve=None), {"127.0.0.1": "127.0.0.1"})
    assert rows[0].status == "warn", rows[0]
    shown_ms = float(re.match(r"(-?\d+\.\d) ms", rows[0].found).group(1))  # one decimal: -1999.9 is fine
    assert shown_ms == pytest.approx(-2000.0, abs=sample.rtt_ns / 2e6 + 1.1), rows[0].found


def test_a_host_where_nothing_listens_is_a_bounded_warning():
    import time

    probe = ClockProbe("127.0.0.1", "driver arm", (f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"))
    t = time.monotonic()
    rows = check_measured_clocks(Host(), SimpleNamespace(
        drivers=[SimpleNamespace(name="arm", cmd=probe.endpoints[0], state=probe.endpoints[1])], cameras=[],
        curve=None), {"127.0.0.1": "127.0.0.1"}, timeout_s=0.3)
    assert time.monotonic() - t < 3
    assert rows[0].status == "warn" and "driver arm did not answer a clock ping" in rows[0].found
