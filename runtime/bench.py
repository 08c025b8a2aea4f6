"""`armada bench`: numbers, not assertions. Every run prints medians and tails and the machine.

- loop:   the driver's period at 500 Hz with the mock backend while an episode runs
- rtt:    command round trip (ping) over ipc and over tcp loopback
- state:  a 500 Hz state stream: loss for an all-messages consumer, age for a newest-value one
- frames: latency and loss for two 640x480 RGB cameras at 30 fps
- estop:  e-stop latency while 0, 1, 3 and 8 connections flood the driver's command socket with
          the worst messages we can build (drivers/core/stop_bench.py); not part of 'all'
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from armada.runtime.config import SCRIPTED_CELL
from armada.runtime.protocol import PROTOCOL_VERSION
from armada.runtime.supervisor import CellProcesses, default_run_dir
from armada.runtime.transport import CommandClient, FrameSubscriber, Subscriber


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def _pct(values: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bench_cell(run_dir: Path, tcp: bool = False, cameras: int = 2, realtime: bool = False,
                spin_us: float = 0.0, cpus: list[int] | None = None) -> Path:
    """The default cell, written out with fresh endpoints (tcp loopback when asked)."""
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["name"] = "bench"
    if realtime:
        data["drivers"][0]["realtime_priority"] = 80
    if spin_us:
        data["drivers"][0]["loop_spin_us"] = spin_us
    if cpus:
        data["drivers"][0]["cpus"] = cpus
    data["drivers"][0]["embodiment"] = str(SCRIPTED_CELL.parent.parent / "embodiments" / "mock_arm.yaml")
    if tcp:
        data["plain_tcp_loopback"] = True  # measures plain loopback TCP: open to every local user, benchmarks only
        data["drivers"][0]["state"] = f"tcp://127.0.0.1:{_free_port()}"
        data["drivers"][0]["cmd"] = f"tcp://127.0.0.1:{_free_port()}"
    data["cameras"] = data["cameras"][:cameras]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ("cell-tcp.yaml" if tcp else "cell.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- loop


# Start-up on a loaded 2-core machine (several benches and test runs beside it) can take longer
# than the supervisor's default: importing a cold module tree at normal priority.
LOOP_START_TIMEOUT_S = 60.0


# The spin the bench tries beside plain sleeping: above this VM's p99 wake-up lateness under
# SCHED_FIFO (0.15-0.25 ms), 15 % of a core at 500 Hz.
BENCH_SPIN_US = 300.0


def _last_cpu() -> list[int] | None:
    """The driver's own CPU for the pinned variant: the last one this process may use, if it has two."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1:] if len(cpus) >= 2 else None


def bench_loop(seconds: float, realtime: bool = False, spin_us: float = 0.0, pinned: bool = False) -> dict[str, Any]:
    cpus = _last_cpu() if pinned else None
    if pinned and cpus is None:
        return {"skipped": "one CPU: nothing to keep the driver's core apart from"}
    run_dir = default_run_dir(f"bench-loop{'-rt' if realtime else ''}{'-spin' if spin_us else ''}{'-pin' if pinned else ''}")
    with CellProcesses(_bench_cell(run_dir, realtime=realtime, spin_us=spin_us, cpus=cpus), run_dir) as procs:
        procs.start_all(LOOP_START_TIMEOUT_S)
        from armada.runtime.inference.client import EpisodeClient

        cmd = CommandClient(procs.ctx, procs.cell.drivers[0].cmd)
        client = EpisodeClient(procs.ctx, procs.cell)
        episode = client.start("bench", duration_s=seconds + 2, arm=True)
        time.sleep(1.0)  # past start-up, into steady chunk streaming
        cmd.request("stats", reset=True)
        before = cmd.request("stats")["counters"]
        time.sleep(seconds)
        after = cmd.request("stats")
        report = client.wait_report(episode, timeout_s=seconds + 20)
        client.close()
        cmd.close()
    loop = after["loop"]
    return {"rate_hz": 1e3 / loop["period_ms"], "realtime": realtime, "loop_spin_us": spin_us, "driver_cpus": cpus,
            "seconds": seconds, "ticks": loop["ticks"],
            "period_ms": {"p50": loop["period_p50_ms"], "p99": loop["period_p99_ms"], "max": loop["period_max_ms"]},
            "period_error_ms": {"p50": loop["error_p50_ms"], "p99": loop["error_p99_ms"], "max": loop["error_max_ms"]},
            "start_lateness_p99_ms": loop["lateness_p99_ms"],
            "load_average_1min": os.getloadavg()[0],
            "overruns": after["counters"]["overruns"] - before["overruns"],
            "episode": {k: report[k] for k in ("outcome", "chunks", "starved_ticks", "clamps",
                                               "chunk_latency_p50_ms", "chunk_latency_p99_ms")}}


# --------------------------------------------------------------------------- rtt


def _ping_rtts(ctx, endpoint: str, n: int) -> list[float]:
    client = CommandClient(ctx, endpoint)
    client.request("hello", version=PROTOCOL_VERSION, role="bench")
    for _ in range(50):  # warm the connection
        client.request("ping")
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        client.request("ping")
        out.append((time.perf_counter_ns() - t) * 1e-3)
    client.close()
    return out


def bench_rtt(n: int = 3000) -> dict[str, Any]:
    results = {}
    for transport in ("ipc", "tcp"):
        run_dir = default_run_dir(f"bench-rtt-{transport}")
        with CellProcesses(_bench_cell(run_dir, tcp=transport == "tcp", cameras=0), run_dir) as procs:
            procs.spawn("driver", procs.cell.drivers[0].name)
            procs.wait_ready()
            results[transport] = {"unit": "us", **_pct(_ping_rtts(procs.ctx, procs.cell.drivers[0].cmd, n))}
    return results


# --------------------------------------------------------------------------- state


def bench_state(seconds: float) -> dict[str, Any]:
    run_dir = default_run_dir("bench-state")
    with CellProcesses(_bench_cell(run_dir, cameras=0), run_dir) as procs:
        drv = procs.cell.drivers[0]
        procs.spawn("driver", drv.name)
        procs.wait_ready()
        every = Subscriber(procs.ctx, drv.state, hwm=10_000)
        newest = Subscriber(procs.ctx, drv.state, hwm=10_000)
        time.sleep(0.3)
        every.drain()
        newest.drain()
        seqs: list[int] = []
        ages_ms: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            seqs += [m["seq"] for m in every.drain()]
            msg = newest.recv_latest()
            if msg is not None:
                ages_ms.append((time.time_ns() - msg["t_ns"]) * 1e-6)
            time.sleep(0.01)  # a 100 Hz consumer, like an inference loop polling state
        seqs += [m["seq"] for m in every.drain()]
        every.close()
        newest.close()
    s = np.array(seqs)
    expected = int(s[-1] - s[0] + 1) if s.size else 0
    return {"rate_hz": 500, "seconds": seconds, "received": int(s.size), "expected": expected,
            "lost": expected - int(s.size), "newest_age_ms": _pct(ages_ms)}


# --------------------------------------------------------------------------- frames


def bench_frames(seconds: float) -> dict[str, Any]:
    run_dir = default_run_dir("bench-frames")
    with CellProcesses(_bench_cell(run_dir, cameras=2), run_dir) as procs:
        for cam in procs.cell.cameras:
            procs.spawn("camera", cam.name)
        procs.wait_ready()
        subs = {c.name: FrameSubscriber(procs.ctx, c.frames, hwm=1000) for c in procs.cell.cameras}
        time.sleep(0.3)
        for sub in subs.values():  # frames queued before measuring would count as late
            while sub.recv(0) is not None:
                pass
        latency: dict[str, list[float]] = {n: [] for n in subs}
        seqs: dict[str, list[int]] = {n: [] for n in subs}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name, sub in subs.items():
                frame = sub.recv(0.002)
                while frame is not None:
                    latency[name].append((time.time_ns() - frame.header["capture_ns"]) * 1e-6)
                    seqs[name].append(frame.header["frame_seq"])
                    frame = sub.recv(0)
        for sub in subs.values():
            sub.close()
    out = {}
    for name in subs:
        s = seqs[name]
        expected = s[-1] - s[0] + 1 if s else 0
        out[name] = {"size": "640x480x3", "fps": 30, "received": len(s), "lost": expected - len(s),
                     "latency_ms": _pct(latency[name])}
    return out


# --------------------------------------------------------------------------- estop


def _bench_estop(seconds: float) -> dict[str, Any]:
    """E-stop latency under a flood, with and without real-time priority (which needs the right to it)."""
    from armada.drivers.core.stop_bench import bench_estop

    seconds = min(max(seconds, 2.0), 30.0)  # per N and mode: four Ns, two modes
    out: dict[str, Any] = {}
    for realtime in (False, True):
        label = "realtime" if realtime else "normal"
        print(f"bench estop ({label} priority) ...", flush=True)
        out[label] = bench_estop(seconds, realtime=realtime)
        print(f"{'N':>3} {'device p50':>10} {'p99':>7} {'max':>7}   {'reply p50':>9} {'p99':>7} {'max':>7}"
              f"   {'overruns':>8} {'dropped':>7}  (ms; tick {out[label]['N=0']['tick_ms']:.1f} ms)")
        for key, r in out[label].items():
            if not key.startswith("N="):
                continue
            d, q = r["device_ms"], r["reply_ms"]
            print(f"{key[2:]:>3} {d.get('p50', float('nan')):>10.3f} {d.get('p99', float('nan')):>7.3f} "
                  f"{d.get('max', float('nan')):>7.3f}   {q.get('p50', float('nan')):>9.3f} "
                  f"{q.get('p99', float('nan')):>7.3f} {q.get('max', float('nan')):>7.3f}   {r['overruns']:>8} "
                  f"{r['dropped']:>7}{'' if r['driver_alive'] else '  DRIVER DIED'}")
    return out


# --------------------------------------------------------------------------- entry


def run_bench(what: str, seconds: float, json_path: Path | None) -> int:
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"machine: {results['machine']}")
    if what == "estop":
        results["estop"] = _bench_estop(seconds)
        if json_path is not None:
            json_path.write_text(json.dumps(results, indent=2))
        return 0 if all(r.get("driver_alive", True) for r in results["estop"].values() if isinstance(r, dict)) else 1
    steps = {"loop": lambda: bench_loop(max(seconds, 10.0)),
             "loop_realtime": lambda: bench_loop(max(seconds, 10.0), realtime=True),
             "loop_spin": lambda: bench_loop(max(seconds, 10.0), spin_us=BENCH_SPIN_US),
             "loop_realtime_spin": lambda: bench_loop(max(seconds, 10.0), realtime=True, spin_us=BENCH_SPIN_US),
             "loop_realtime_spin_pinned": lambda: bench_loop(max(seconds, 10.0), realtime=True, spin_us=BENCH_SPIN_US,
                                                             pinned=True),
             "rtt": bench_rtt,
             "state": lambda: bench_state(seconds), "frames": lambda: bench_frames(seconds)}
    for name, fn in steps.items():
        if what not in (name.split("_")[0], "all"):
            continue
        print(f"bench {name} ...", flush=True)
        results[name] = fn()
        print(json.dumps(results[name], indent=2))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    return 0
