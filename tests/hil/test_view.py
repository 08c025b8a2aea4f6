"""The live view through real processes: `armada view --mode save:X.rrd` on the scripted cell,
read back with rerun's own RRD reader; and start_view's child stops when asked."""

from __future__ import annotations

import subprocess
import sys
import time
import pytest

from armada.runtime.config import SCRIPTED_CELL
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.supervisor import CellProcesses
from armada.runtime.view import READY_LINE, read_rrd

pytestmark = pytest.mark.hil

rr = pytest.importorskip("rerun", reason="rerun-sdk is not installed (.venv/bin/pip install rerun-sdk)")


def _view(procs, rrd, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", "view", str(SCRIPTED_CELL),
                             "--run-dir", str(procs.run_dir), "--mode", f"save:{rrd}", "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_view_saves_cameras_joints_and_episode_events_to_an_rrd(short_tmp):
    rrd = short_tmp / "view.rrd"
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.start_all()
        view = _view(procs, rrd, 3.5)
        seen = [view.stdout.readline() for _ in range(2)]  # the sink line, then ready (or EOF if it died)
        assert READY_LINE in seen[-1], seen  # subscribed: the episode's first events will be in it
        client = EpisodeClient(procs.ctx, procs.cell)
        episode = client.start("wave", duration_s=1.5, arm=True)
        report = client.wait_report(episode, timeout_s=20)
        client.close()
        out, _ = view.communicate(timeout=20)
        out = "".join(seen) + out
    assert view.returncode == 0, out
    assert report["outcome"] == "completed", report

    data = read_rrd(rrd)
    for camera in ("front", "wrist"):
        blobs = data[f"/cameras/{camera}"]["EncodedImage:blob"]
        # About 10 Hz for 3.5 s, decimated from 30 fps; a loaded 2-core host may cost a few.
        assert 12 <= len(blobs) <= 40, (camera, len(blobs))
        assert data[f"/cameras/{camera}"]["EncodedImage:media_type"][0] == ["image/jpeg"]
    for series in ("measured", "commanded"):
        values = data[f"/joints/arm/shoulder_pan/{series}"]["Scalars:scalars"]
        # About 50 Hz of the 500 Hz state; the view is niced, so a loaded 2-core host may starve it a little.
        assert 60 <= len(values) <= 200, (series, len(values))
    assert "/joints/arm/gripper/measured" in data
    texts = [t[0] for t in data["/inference/log"]["TextLog:text"]]
    assert any(t.startswith(f"episode {episode} started") for t in texts), texts
    assert any(t.startswith(f"episode {episode} ended: completed") for t in texts), texts
    assert any(t.startswith("routed to 'scripted'") for t in texts), texts
    assert data["/router/scores/scripted"]["Scalars:scalars"] == [[1.0]]
    assert len(data["/inference/chunks/latency_ms"]["Scalars:scalars"]) == report["chunks"]
    driver_log = [t[0] for t in data["/drivers/arm/log"]["TextLog:text"]]
    assert any("lease free -> inference" in t for t in driver_log), driver_log
    assert "images" in out and "joint samples" in out


def test_start_view_child_stops_on_close_and_flushes_its_recording(short_tmp):
    from armada.runtime.view import start_view

    rrd = short_tmp / "child.rrd"
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.start_all()
        handle = start_view(procs.cell_path, procs.run_dir, f"save:{rrd}")
        time.sleep(2.0)
        assert handle.alive, handle.log_path.read_text()
        t = time.monotonic()
        code = handle.close()
        took = time.monotonic() - t
    assert code == 0, handle.log_path.read_text()
    assert took < 3.0  # SIGTERM is honoured within a tick and a flush, not the kill timeout
    assert read_rrd(rrd)["/cameras/front"]["EncodedImage:blob"]  # flushed on the way out


def test_start_view_refuses_a_bad_mode_before_starting_anything(short_tmp):
    from armada.runtime.view import start_view

    with pytest.raises(SystemExit, match="spawn, serve or save:FILE.rrd"):
        start_view(SCRIPTED_CELL, short_tmp, "window")


def test_the_view_dies_with_the_process_that_started_it(short_tmp):
    import os
    import signal

    script = ("import sys, time; from pathlib import Path; from armada.runtime.view import start_view; "
              f"h = start_view(Path({str(SCRIPTED_CELL)!r}), Path({str(short_tmp)!r}), 'save:{short_tmp}/orphan.rrd'); "
              "print(h.proc.pid, flush=True); time.sleep(60)")
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.start_all()
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        lines = [parent.stdout.readline(), parent.stdout.readline()]  # the "started" line, then the pid
        pid = int(lines[-1])
        time.sleep(1.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.05)
        gone = not _running(pid)
        if not gone:
            os.kill(pid, signal.SIGKILL)
    assert gone, f"the view (pid {pid}) outlived its parent"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return False


def test_armada_run_with_view_records_the_whole_episode(short_tmp):
    rrd = short_tmp / "run.rrd"
    out = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "run", str(SCRIPTED_CELL), "--run-dir",
                          str(short_tmp / "run"), "--episodes", "1", "--duration", "2", "--view", f"save:{rrd}"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = read_rrd(rrd)
    texts = [t[0] for t in data["/inference/log"]["TextLog:text"]]
    # start_view waited for the view to subscribe, so the episode is there from its first event.
    assert texts[0].startswith("episode 1 started") and texts[-1].startswith("episode 1 ended: completed"), texts
    assert data["/cameras/front"]["EncodedImage:blob"] and data["/joints/arm/elbow/measured"]["Scalars:scalars"]
