"""`armada bench cameras`: end-to-end frame latency, CPU and wire cost per camera; loss for a recorder.

- latency: one camera process at 640x480 and 1280x720, 30 fps, raw and JPEG; a subscriber in
  this (another) process receives every frame. Latency is capture stamp to receipt, JPEG decode
  included. CPU is the camera process's user+system time over the window (/proc/PID/stat), in
  percent of one core; the consumer's CPU is this process's.
- all_frames: three cameras at 640x480, 30 fps, raw, for ``seconds``; one all-frames consumer
  per camera (as the recorder will be) counts frames lost in transport from ``frame_seq`` gaps,
  and reports the drops the cameras themselves counted.

No camera is attached to the machines this runs on in CI: the sources are the synthetic pattern
(whose drawing cost is reported separately as ``source_grab_ms``, and included in the camera's
CPU) and, in the all-frames run, an MJPG video played through the real cv2.VideoCapture path.
Sensor exposure and USB transfer are therefore not in these latencies.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zmq

from armada.drivers.cameras.fake.video_file import make_video
from armada.drivers.cameras.synthetic import SyntheticCamera
from armada.runtime.bench import _pct, machine
from armada.runtime.config import SCRIPTED_CELL
from armada.runtime.supervisor import CellProcesses, default_run_dir
from armada.runtime.transport import FrameSubscriber

SIZES = ((640, 480), (1280, 720))
JPEG_QUALITY = 90
FPS = 30
SOURCE_NOTE = ("synthetic pattern (no camera attached; its drawing cost is source_grab_ms, inside camera_cpu_pct) "
               "and, for all_frames, one MJPG video through cv2.VideoCapture, stamped arrival minus one frame "
               "interval (so its latency reads about 33 ms more); exposure and USB are not included; the smooth "
               "pattern compresses far better than a real scene, so JPEG bytes and encode/decode times are lower "
               "bounds")


def run_camera_bench(seconds: float = 60.0, quick: bool = False) -> dict[str, Any]:
    """Run both parts and return the numbers (also printed as they come)."""
    window = 2.0 if quick else 10.0
    results: dict[str, Any] = {"machine": machine(), "sources": SOURCE_NOTE, "fps": FPS, "latency": []}
    print(f"machine: {results['machine']}\nsources: {SOURCE_NOTE}", flush=True)
    for width, height in SIZES:
        for quality in (None, JPEG_QUALITY):
            label = f"{width}x{height} {'jpeg q%d' % quality if quality else 'raw'}"
            print(f"cameras: {label}, {window:g} s ...", flush=True)
            row = bench_one_camera(width, height, quality, window)
            results["latency"].append(row)
            print(f"  latency p50 {row['latency_ms']['p50']:.2f} ms p99 {row['latency_ms']['p99']:.2f} ms, "
                  f"camera CPU {row['camera_cpu_pct']:.1f}%, {row['wire_bytes_per_frame']:.0f} B/frame, "
                  f"encode {row['encode_ms']['p50']:.2f} ms, decode {row['decode_ms']['p50']:.2f} ms", flush=True)
    print(f"cameras: all-frames consumer, three cameras, {seconds:g} s ...", flush=True)
    results["all_frames"] = bench_all_frames(seconds)
    for name, row in results["all_frames"]["cameras"].items():
        print(f"  {name}: received {row['received']}, lost {row['lost']}, camera drops {row['camera_drops']}, "
              f"recoveries {row['camera_recoveries']}, "
              f"latency p99 {row['latency_ms'].get('p99', float('nan')):.2f} ms", flush=True)
    return results


# --------------------------------------------------------------------------- helpers


def _cell(run_dir: Path, cameras: list[dict[str, Any]]) -> Path:
    """The scripted cell with these cameras (its driver is never started here)."""
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["name"] = "bench-cameras"
    data["drivers"][0]["embodiment"] = str(SCRIPTED_CELL.parent.parent / "embodiments" / "mock_arm.yaml")
    data["cameras"] = cameras
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _grab_ms(width: int, height: int, n: int = 30) -> float:
    cam = SyntheticCamera(width, height)
    times = []
    for i in range(n):
        t = time.perf_counter_ns()
        cam.grab(i)
        times.append((time.perf_counter_ns() - t) * 1e-6)
    return float(np.median(times))


def _flush(sub: FrameSubscriber) -> None:
    while sub.recv(0) is not None:
        pass


def _lost(seqs: list[int]) -> int:
    return int(seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else 0


# --------------------------------------------------------------------------- one camera


def bench_one_camera(width: int, height: int, jpeg_quality: int | None, window_s: float) -> dict[str, Any]:
    enc = f"q{jpeg_quality}" if jpeg_quality else "raw"
    run_dir = default_run_dir(f"bench-cam-{width}-{enc}")
    cam = {"name": "cam", "kind": "synthetic", "width": width, "height": height, "fps": FPS,
           "frames": f"ipc://{run_dir}/cam", "jpeg_quality": jpeg_quality}
    with CellProcesses(_cell(run_dir, [cam]), run_dir) as procs:
        child = procs.spawn("camera", "cam")
        procs.wait_ready()
        sub = FrameSubscriber(procs.ctx, procs.cell.cameras[0].frames, hwm=1000)
        time.sleep(0.5)
        _flush(sub)
        cpu0, consumer0, t0 = cpu_seconds(child.proc.pid), time.process_time(), time.monotonic()
        frames = _collect(sub, window_s)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(child.proc.pid) - cpu0
        consumer = time.process_time() - consumer0
        sub.close()
    latency, seqs, encode, decode, wire, recoveries = zip(*frames) if frames else ((),) * 6
    return {"size": f"{width}x{height}", "encoding": "jpeg" if jpeg_quality else "raw", "jpeg_quality": jpeg_quality,
            "frames": len(frames), "lost": _lost(list(seqs)), "latency_ms": _pct(latency),
            "camera_recoveries": int(recoveries[-1] - recoveries[0]) if recoveries else 0,
            "camera_cpu_pct": 100 * cpu / wall, "consumer_cpu_pct": 100 * consumer / wall,
            "source_grab_ms": _grab_ms(width, height), "encode_ms": _pct(encode), "decode_ms": _pct(decode),
            "wire_bytes_per_frame": float(np.mean(wire)) if wire else 0.0,
            "raw_bytes_per_frame": width * height * 3,
            "wire_mbit_s": float(np.mean(wire)) * 8 * FPS / 1e6 if wire else 0.0}


def _collect(sub: FrameSubscriber, window_s: float) -> list[tuple[float, int, float, float, int, int]]:
    """(latency ms, frame_seq, encode ms, decode ms, wire bytes, recoveries) for every frame in the window."""
    out = []
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        frame = sub.recv(0.1)
        if frame is None:
            continue
        received = time.time_ns()
        h = frame.header
        out.append(((received - h["capture_ns"]) * 1e-6, h["frame_seq"], h.get("encode_us", 0) * 1e-3,
                    frame.decode_us * 1e-3, frame.wire_bytes, h.get("recoveries", 0)))
    return out


# --------------------------------------------------------------------------- all frames


def bench_all_frames(seconds: float) -> dict[str, Any]:
    run_dir = default_run_dir("bench-cam-all")
    video = make_video(run_dir / "fake_uvc.avi", width=640, height=480, fps=FPS, frames=2 * FPS)
    base = {"width": 640, "height": 480, "fps": FPS}
    cams = [{"name": "cam0", "kind": "synthetic", "frames": f"ipc://{run_dir}/cam0", **base},
            {"name": "cam1", "kind": "synthetic", "frames": f"ipc://{run_dir}/cam1", **base},
            {"name": "cam2", "kind": "opencv", "device": str(video), "frames": f"ipc://{run_dir}/cam2", **base}]
    with CellProcesses(_cell(run_dir, cams), run_dir) as procs:
        children = {c.name: procs.spawn("camera", c.name) for c in procs.cell.cameras}
        procs.wait_ready()
        subs = {c.name: FrameSubscriber(procs.ctx, c.frames, hwm=100_000) for c in procs.cell.cameras}
        time.sleep(0.3)
        for sub in subs.values():
            _flush(sub)
        cpu0 = {n: cpu_seconds(c.proc.pid) for n, c in children.items()}
        t0 = time.monotonic()
        seen = _receive_all(subs, seconds)
        wall = time.monotonic() - t0
        cpu = {n: 100 * (cpu_seconds(c.proc.pid) - cpu0[n]) / wall for n, c in children.items()}
        for sub in subs.values():
            sub.close()
    kinds = {c["name"]: c["kind"] for c in cams}
    return {"seconds": seconds, "size": "640x480", "encoding": "raw",
            "cameras": {n: _all_frames_row(kinds[n], seen[n], cpu[n]) for n in subs}}


def _receive_all(subs: dict[str, FrameSubscriber], seconds: float) -> dict[str, list[dict[str, Any]]]:
    poller = zmq.Poller()
    names = {}
    for name, sub in subs.items():
        poller.register(sub.socket, zmq.POLLIN)
        names[sub.socket] = name
    seen: dict[str, list[dict[str, Any]]] = {n: [] for n in subs}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for sock, _ in poller.poll(100):
            sub = subs[names[sock]]
            frame = sub.recv(0)
            while frame is not None:
                h = frame.header
                seen[names[sock]].append({"seq": h["frame_seq"], "drops": h.get("drops", 0),
                                          "recoveries": h.get("recoveries", 0),
                                          "latency_ms": (time.time_ns() - h["capture_ns"]) * 1e-6})
                frame = sub.recv(0)
    return seen


def _all_frames_row(kind: str, frames: list[dict[str, Any]], cpu_pct: float) -> dict[str, Any]:
    seqs = [f["seq"] for f in frames]
    drops = frames[-1]["drops"] - frames[0]["drops"] if frames else 0
    recoveries = frames[-1]["recoveries"] - frames[0]["recoveries"] if frames else 0
    return {"source": kind, "received": len(frames), "expected": seqs[-1] - seqs[0] + 1 if seqs else 0,
            "lost": _lost(seqs), "camera_drops": int(drops), "camera_recoveries": int(recoveries),
            "camera_cpu_pct": cpu_pct,
            "latency_ms": _pct([f["latency_ms"] for f in frames])}
