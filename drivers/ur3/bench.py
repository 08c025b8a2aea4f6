"""`armada bench ur3`: the UR3 driver's 500 Hz loop over the real ur-rtde and the loopback controller.

One run per scheduler (normal, then SCHED_FIFO when allowed). Each run starts the fake controller,
the UR3 cell (driver with its ur-rtde worker, a camera, the inference process with the scripted
policy streaming chunks) and, beside it on the same host, the default cell's inference process
running the tiny merged VLA, so the loop shares the CPU with real model inference. Reported: the
loop period (p50, p99, max), its error against 2 ms, overruns, transient read errors (a worker
answer later than 20 ms) and the round trip of one backend read.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from armada.drivers.ur3.fake.launch import FakeUR
from armada.runtime.config import CONFIG_DIR, DEFAULT_CELL
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.supervisor import CellProcesses, default_run_dir
from armada.runtime.transport import CommandClient


def _ur3_cell(run_dir: Path, host: str, realtime: bool, seconds: float) -> Path:
    data = yaml.safe_load((CONFIG_DIR / "cells" / "ur3_fake.yaml").read_text())
    drv = data["drivers"][0]
    drv["backend"]["host"] = host
    drv["embodiment"] = str(CONFIG_DIR / "embodiments" / "ur3.yaml")
    if realtime:
        drv["realtime_priority"] = 80
    else:
        drv.pop("realtime_priority", None)
    data["inference"]["episode_duration_s"] = seconds + 4
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _realtime_allowed() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        return True
    except (PermissionError, OSError):
        return False


def _start_vla_load(stack: ExitStack, seconds: float) -> EpisodeClient:
    """The default cell (tiny merged VLA on a mock arm) running an episode beside the UR3 cell."""
    procs = stack.enter_context(CellProcesses(DEFAULT_CELL, default_run_dir("bench-ur3-load")))
    procs.start_all()
    client = EpisodeClient(procs.ctx, procs.cell)
    stack.callback(client.close)
    client.start("pick up the cube", duration_s=seconds + 6, arm=True)
    return client


def bench_ur3_once(seconds: float, realtime: bool, with_vla: bool = True) -> dict[str, Any]:
    with ExitStack() as stack:
        fake = stack.enter_context(FakeUR.start_anywhere())
        if with_vla:
            print("  starting the tiny-VLA inference cell beside it ...", flush=True)
            _start_vla_load(stack, seconds)
        run_dir = default_run_dir("bench-ur3-rt" if realtime else "bench-ur3")
        procs = stack.enter_context(CellProcesses(_ur3_cell(run_dir, fake.host, realtime, seconds), run_dir))
        procs.start_all()
        cmd = CommandClient(procs.ctx, procs.cell.drivers[0].cmd, default_timeout_s=5.0)
        stack.callback(cmd.close)
        client = EpisodeClient(procs.ctx, procs.cell)
        stack.callback(client.close)
        episode = client.start("wave", arm=True)
        time.sleep(1.5)  # past arming and the first chunks
        cmd.request("stats", reset=True)
        before = cmd.request("stats")["counters"]
        print(f"  measuring {seconds:.0f} s ...", flush=True)
        time.sleep(seconds)
        after = cmd.request("stats")
        report = client.wait_report(episode, timeout_s=seconds + 30)
        received = len(fake.targets())
    loop, counters = after["loop"], after["counters"]
    return {
        "scheduler": "SCHED_FIFO 80" if realtime else "normal", "tiny_vla_beside": with_vla,
        "rate_hz": round(1e3 / loop["period_ms"], 1), "ticks": loop["ticks"],
        "period_ms": {"p50": loop["period_p50_ms"], "p99": loop["period_p99_ms"], "max": loop["period_max_ms"]},
        "period_error_ms": {"p50": loop["error_p50_ms"], "p99": loop["error_p99_ms"], "max": loop["error_max_ms"]},
        "overruns": counters["overruns"] - before["overruns"],
        "read_errors": counters["read_errors"] - before["read_errors"],
        "servoj_received_by_fake": received,
        "episode": {k: report.get(k) for k in ("outcome", "chunks", "starved_ticks", "chunk_latency_p50_ms",
                                               "chunk_latency_p99_ms")},
    }


def bench_ur3(seconds: float = 10.0) -> dict[str, Any]:
    runs = {}
    for realtime in (False, True):
        if realtime and not _realtime_allowed():
            runs["realtime"] = {"skipped": "SCHED_FIFO not permitted (needs CAP_SYS_NICE or root)"}
            continue
        name = "realtime" if realtime else "normal"
        print(f"bench ur3 ({name} scheduler) ...", flush=True)
        runs[name] = bench_ur3_once(seconds, realtime)
    return runs
