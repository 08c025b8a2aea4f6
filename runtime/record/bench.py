"""`armada bench record`: the recorder under the issue's load, measured.

Three 640x480 synthetic cameras at 30 fps (raw frames) and the mock arm's state at its control
rate (500 Hz), each its own process as in production; the recorder process records one episode
of ``--seconds`` (``--quick``: 5 s) into a fresh dataset in a temporary folder, then saves it.

Reported:
- frames lost: transport (frame_seq / seq gaps) + the cameras' own drops, and grid gaps (an instant
  with no frame within half a period); the target is 0;
- recorder CPU (percent of one core; the process and the encoders it waited for) while recording
  and while saving (encoding), and its peak resident memory;
- encode time per frame: staging a grid row (add_frame: 3 images handed to lerobot's PNG writer
  threads) median/p99/max, and video encoding per camera frame (the save's time divided by the
  frames it encoded: lerobot encodes a whole episode in one call);
- disk rate: bytes the recorder wrote (PNG staging, then videos and parquet), per second of the
  run, and the dataset's final size.

LeRobot's own ``lerobot-record`` is not run beside it: it drives a lerobot ``Robot`` class
(``--robot.type=so101_follower``...) in its own loop, and our cells' arms and cameras are armada
processes behind ZeroMQ with no lerobot ``Robot`` wrapper, so it cannot run on this cell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

CAMERAS = ("front", "wrist", "top")
WIDTH, HEIGHT, FPS = 640, 480, 30
QUICK_SECONDS = 5.0


def _cpu_s(pid: int) -> float:
    """User + system time of a process and of its waited-for children (encoder pools), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def _io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k.strip()] = int(v)
    return out


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cell(folder: Path) -> Path:
    from armada.runtime.config import SCRIPTED_CELL

    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["drivers"][0]["embodiment"] = str(SCRIPTED_CELL.parent.parent / "embodiments" / "mock_arm.yaml")
    data["cameras"] = [{"name": c, "width": WIDTH, "height": HEIGHT, "fps": FPS,
                        "frames": f"ipc://{{run_dir}}/cam-{c}"} for c in CAMERAS]
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def bench_record(seconds: float) -> dict[str, Any]:
    from armada.runtime.record.client import RecorderClient
    from armada.runtime.supervisor import CellProcesses

    folder = Path(tempfile.mkdtemp(prefix="armada-brec-"))
    try:
        cell = _cell(folder)
        with CellProcesses(cell, folder / "run") as procs:
            procs.spawn("driver", "arm")
            for c in CAMERAS:
                procs.spawn("camera", c)
            procs.wait_ready()
            rec = RecorderClient(cell, procs.run_dir, folder / "dataset", "local/bench")
            try:
                rec.wait_ready()
                time.sleep(0.5)
                pid = rec.pid
                ready_mb = _peak_rss_mb(pid)
                cpu0, io0, t0 = _cpu_s(pid), _io(pid), time.monotonic()
                rec.send("start", task="bench", t0_ns=time.time_ns())
                rec.wait_for(("started",), 60)
                time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
                rec.send("save", t_end_ns=time.time_ns())
                cpu1, t1 = _cpu_s(pid), time.monotonic()
                peak_recording_mb = _peak_rss_mb(pid)
                saved = rec.wait_for(("saved",), 600)
                cpu2, io2, t2 = _cpu_s(pid), _io(pid), time.monotonic()
                peak_mb = _peak_rss_mb(pid)
                rec.close()
                closed = [e for e in rec.poll_events() if e["event"] == "closed"]
            finally:
                rec.kill()
        report = saved["report"]
        frames = int(saved["frames"])
        written_mb = (io2["write_bytes"] - io0["write_bytes"]) / 1e6
        return {
            "seconds": seconds,
            "cameras": f"{len(CAMERAS)} x {WIDTH}x{HEIGHT} @ {FPS} fps, raw",
            "state_rate_hz": 500,
            "grid_frames": frames,
            "frames_expected": int(round(seconds * FPS)),
            "frames_lost": sum(report["frames_lost"].values()),
            "camera_drops": sum(report["camera_drops"].values()),
            "states_lost": sum(report["states_lost"].values()),
            "frame_gaps": sum(report["frame_gaps"].values()),
            "state_gaps": sum(report["state_gaps"].values()),
            "spilled_rows": saved.get("spilled", 0),
            "recorder_cpu_recording_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "recorder_cpu_saving_pct": 100 * (cpu2 - cpu1) / max(1e-9, t2 - t1),
            "recorder_rss_ready_mb": ready_mb,
            "recorder_peak_rss_recording_mb": peak_recording_mb,
            "recorder_peak_rss_mb": peak_mb,
            "stage_row_ms": saved["add_ms"],
            "save_s": saved["save_s"],
            "video_encode_ms_per_frame": 1e3 * saved["save_s"] / max(1, frames * len(CAMERAS)),
            "disk_written_mb": written_mb,
            "disk_rate_mb_s": written_mb / (t2 - t0),
            "dataset_mb": _dir_mb(folder / "dataset"),
            "counters": closed[0]["counters"] if closed else None,
            "lerobot_record": "not run: lerobot-record needs a lerobot Robot class for the cell; armada's arms and "
                              "cameras are processes behind ZeroMQ with no lerobot Robot wrapper",
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_table(r: dict[str, Any]) -> None:
    from armada.runtime.bench import machine

    rows = [
        ("load", f"{r['cameras']} + state at {r['state_rate_hz']} Hz, {r['seconds']:.0f} s"),
        ("grid frames", f"{r['grid_frames']} (expected {r['frames_expected']})"),
        ("frames lost", f"{r['frames_lost']} in transport, {r['camera_drops']} by the cameras, "
                        f"{r['states_lost']} state messages"),
        ("grid gaps", f"{r['frame_gaps']} frame, {r['state_gaps']} state (no sample within half a period)"),
        ("recorder CPU", f"{r['recorder_cpu_recording_pct']:.0f}% recording, {r['recorder_cpu_saving_pct']:.0f}% "
                         f"saving (of one core)"),
        ("recorder memory", f"peak RSS {r['recorder_rss_ready_mb']:.0f} MB ready (imports), "
                            f"{r['recorder_peak_rss_recording_mb']:.0f} MB recording, {r['recorder_peak_rss_mb']:.0f} MB "
                            f"saving; {r['spilled_rows']} rows spilled to disk"),
        ("stage a row", f"median {r['stage_row_ms']['median']:.2f} ms, p99 {r['stage_row_ms']['p99']:.2f} ms, "
                        f"max {r['stage_row_ms']['max']:.2f} ms (3 images to the PNG writer)"),
        ("video encode", f"{r['video_encode_ms_per_frame']:.2f} ms per camera frame ({r['save_s']:.1f} s to save "
                         "the episode)"),
        ("disk", f"{r['disk_written_mb']:.0f} MB written, {r['disk_rate_mb_s']:.1f} MB/s over the run; dataset "
                 f"{r['dataset_mb']:.1f} MB"),
        ("lerobot-record", r["lerobot_record"]),
    ]
    print(f"armada bench record   ({machine()})")
    for k, v in rows:
        print(f"  {k:<16} {v}")


def run_record_bench(args: argparse.Namespace) -> int:
    """Uses args.seconds, args.quick, args.json; prints a table; returns the exit code."""
    try:
        import lerobot.datasets.lerobot_dataset  # noqa: F401
    except ImportError as exc:
        print(f"armada bench record: lerobot's dataset writer is not installed ({exc})")
        return 2
    seconds = QUICK_SECONDS if args.quick else float(args.seconds)
    result = bench_record(seconds)
    print_table(result)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        Path(args.json).write_text(text + "\n")
    lost = result["frames_lost"] + result["camera_drops"] + result["states_lost"]
    return 0 if lost == 0 else 1
