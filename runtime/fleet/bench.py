"""`armada bench fleet`: N mock cells against one model service, then each with its own model.

Phases (the tiny bundle, a mock arm at 500 Hz, 8-action chunks at 50 Hz, two cameras per cell at
320x240: eight cells of two 640x480 cameras at 30 fps are more pixels than a 2-core machine moves;
the one-client phase sends 640x480 frames):

1. overhead: one client, no cells: a request's round trip beside the replica's own model time
   (the rest is HTTP, Serve's proxy and router, the batch wait and msgpack).
2. for each N in ``--cells``: N cells whose policy is ``remote`` run one episode each at the same
   time (tasks alternate, so batches mix tasks), then the same N cells each with its own local
   inference process (``mergevla``). Per phase: chunks/s, obs-to-chunk p50/p99 (the episode's own
   chunk latency: observation taken to chunk sent), starved ticks, the service's CPU and memory,
   the batching factor (requests per forward pass) and the task weight switches.
3. kill: the largest N against the service, one replica SIGKILLed mid-run: for each cell whose
   arm held, the time from the kill until its target stopped moving, and until it moved again.

Numbers, not assertions; the machine (and, by its load average, how busy it was) is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

REPLICAS = 2
CELL_CAMERAS = (320, 240)
TASKS = ("pick_cube", "open_drawer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"n": 0, "p50": float("nan"), "p99": float("nan")}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def _replica_stats(url: str, replicas: int) -> dict[str, dict[str, Any]]:
    """/stats of every replica (Serve spreads the calls; asked until each has answered)."""
    from armada.runtime.fleet.service import get_json

    out: dict[str, dict[str, Any]] = {}
    for _ in range(60):
        try:
            s = get_json(url, "/stats", timeout_s=5.0)
        except OSError:
            continue
        out[s["replica"]] = s
        if len(out) >= replicas:
            break
    return out


def _service_delta(before: dict[str, dict], after: dict[str, dict], seconds: float) -> dict[str, Any]:
    cpu = sum(a["cpu_s"] - before.get(r, {}).get("cpu_s", 0.0) for r, a in after.items())
    requests = sum(a["requests"] - before.get(r, {}).get("requests", 0) for r, a in after.items())
    groups = sum(a["groups"] - before.get(r, {}).get("groups", 0) for r, a in after.items())
    swaps = sum(a["swaps"] - before.get(r, {}).get("swaps", 0) for r, a in after.items())
    expired = sum(a["expired"] - before.get(r, {}).get("expired", 0) for r, a in after.items())
    return {"cpu_pct": 100.0 * cpu / seconds if seconds else 0.0, "rss_mb": sum(a["rss_mb"] for a in after.values()),
            "batching_factor": requests / groups if groups else 0.0, "swaps": swaps, "requests": requests,
            "expired": expired,
            "forward_ms_p50": float(np.median([a["forward_ms"].get("p50", np.nan) for a in after.values()]))}


def measure_overhead(url: str, n: int) -> dict[str, Any]:
    """One client: round trip of an infer with two 640x480 frames, and the replica's model time."""
    import http.client

    from armada.runtime.fleet.wire import ModelRequest, decode_chunk_reply

    rng = np.random.default_rng(0)
    frames = {c: rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for c in ("front", "wrist")}
    state = np.array([0.0, -1.57, 1.57, -1.57, -1.57, 0.0, 0.04])
    body = ModelRequest("infer", "auto", state, frames, TASKS[0], 5000.0, "bench").encode()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    rtt, model, queue = [], [], []
    for i in range(n + 5):
        started = time.perf_counter()
        conn.request("POST", "/infer", body, {"Content-Type": "application/msgpack"})
        reply = conn.getresponse()
        raw = reply.read()
        elapsed = (time.perf_counter() - started) * 1e3
        if reply.status != 200:
            raise RuntimeError(f"the service answered HTTP {reply.status}: {raw[:200]!r}")
        info = decode_chunk_reply(raw).info
        if i >= 5:  # past warm-up
            rtt.append(elapsed)
            model.append(float(info.get("forward_ms", 0.0)) + float(info.get("swap_ms", 0.0)))
            queue.append(float(info.get("queue_ms", 0.0)))
    conn.close()
    over = [r - m for r, m in zip(rtt, model)]
    return {"requests": n, "body_kb": len(body) / 1024, "rtt_ms": _pct(rtt), "model_ms": _pct(model),
            "overhead_ms": _pct(over), "in_replica_queue_ms": _pct(queue)}


def measure_residency(bundle: Path, switches: int) -> dict[str, Any]:
    """What keeping the tasks' weight sets materialized buys: a batch that alternates between two
    tasks, with every switch materialized from the masks (resident 0) or copied from a kept set."""
    from armada.runtime.fleet.model import FleetModel
    from armada.runtime.fleet.wire import ModelRequest

    frames = {c: np.zeros((480, 640, 3), np.uint8) for c in ("front", "wrist")}
    state = np.array([0.0, -1.57, 1.57, -1.57, -1.57, 0.0, 0.04])
    out: dict[str, Any] = {}
    for resident in (0, len(TASKS)):
        model = FleetModel(bundle, resident_tasks=resident, threads=1)
        for i in range(switches + 2):
            model.infer_batch([ModelRequest("infer", "auto", state, frames, TASKS[i % 2], 5000.0)])
        stats = model.stats.as_dict()
        out[f"resident_{resident}"] = {"swap_ms": stats["swap_ms"], "forward_ms": stats["forward_ms"],
                                       "extra_mb": resident * model.weight_set_bytes / 2**20}
        out["weight_set_mb"] = model.weight_set_bytes / 2**20
    return out


def _health_with_retry(url: str, tries: int = 10) -> dict[str, Any]:
    from armada.runtime.fleet.service import get_json

    for attempt in range(tries):
        try:
            return get_json(url, "/health", timeout_s=10.0)
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


class _Watch:
    """The driver's requested targets over time (to see when an arm held and moved again)."""

    def __init__(self, ctx: Any, endpoint: str):
        from armada.runtime.transport import Subscriber

        self.sub = Subscriber(ctx, endpoint)
        self.samples: list[tuple[float, np.ndarray]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            msg = self.sub.recv(0.05)
            if msg is not None:
                self.samples.append((time.monotonic(), msg["requested"]))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(2)
        self.sub.close()

    def hold_and_resume(self, t_kill: float, still_s: float = 0.1) -> tuple[float | None, float | None]:
        """(seconds from the kill until the target stood still for ``still_s``, until it moved again)."""
        after = [(t, r) for t, r in self.samples if t >= t_kill]
        for i, (t, r) in enumerate(after):
            j = i
            while j + 1 < len(after) and np.array_equal(after[j + 1][1], r):
                j += 1
            if after[j][0] - t >= still_s:
                moved = after[j + 1][0] - t_kill if j + 1 < len(after) else None
                return t - t_kill, moved
        return None, None


def _run_cells(n: int, url: str | None, seconds: float, root: Path, inprocess: bool,
               kill: Any = None) -> dict[str, Any]:
    """N cells, one episode each, started together. ``kill(t)``: called mid-run (the kill phase)."""
    from armada.runtime.fleet.cells import CellSpec, FleetCell
    from armada.runtime.inference.client import EpisodeClient

    reports: dict[int, dict] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    watches: list[_Watch] = []
    with ExitStack() as stack:
        spec = [CellSpec(f"cell{i}", url, camera_size=CELL_CAMERAS, policy_timeout_s=30.0, failover_s=25.0)
                for i in range(n)]
        cells = [stack.enter_context(FleetCell(root / f"c{i}", spec[i], inprocess=inprocess)) for i in range(n)]
        if kill is not None:
            watches = [_Watch(c.ctx, c.cell.drivers[0].state) for c in cells]

        def one(i: int, cell: Any) -> None:
            client = EpisodeClient(cell.ctx, cell.cell)
            try:
                task = TASKS[i % len(TASKS)]

                def on_event(event: str, data: dict) -> None:
                    if event == "chunk":
                        with lock:
                            latencies.append(float(data["latency_ms"]))

                episode = client.start(task.replace("_", " "), duration_s=seconds, arm=True, task=task)
                reports[i] = client.wait_report(episode, timeout_s=seconds + 120, on_event=on_event)
            finally:
                client.close()

        threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(cells)]
        started = time.monotonic()
        for t in threads:
            t.start()
        killed_at = None
        if kill is not None:
            time.sleep(seconds / 3)
            killed_at = kill()
        for t in threads:
            t.join(seconds + 180)
        wall = time.monotonic() - started
        for w in watches:
            w.stop()
    chunks = sum(r.get("chunks", 0) for r in reports.values())
    out: dict[str, Any] = {
        "cells": n, "wall_s": wall, "chunks_per_s": chunks / seconds,
        "outcomes": sorted({r["outcome"][:80] for r in reports.values()}),
        "latency_ms": _pct(latencies), "starved_ticks": sum(r.get("starved_ticks", 0) for r in reports.values()),
        "late_chunks": sum(r.get("late_chunks", 0) for r in reports.values()),
        # What the remote policies reported (EpisodeReport.policy_notes): failed requests, failovers, time held.
        "failures": sum(r.get("policy_notes", {}).get("failures", 0) for r in reports.values()),
        "failovers": sum(r.get("policy_notes", {}).get("failovers", 0) for r in reports.values()),
        "held_s": [round(r.get("policy_notes", {}).get("held_s", 0.0), 2) for r in reports.values()],
        "control_hz": float(np.mean([np.mean(list(r["control_rate_hz"].values()) or [0]) for r in reports.values()]))
        if reports else 0.0}
    if killed_at is not None:
        holds = [w.hold_and_resume(killed_at) for w in watches]
        held = [(h, m) for h, m in holds if h is not None and h < seconds]
        out["kill"] = {"cells_held": len(held), "hold_s": [round(h, 3) for h, _ in held],
                       "resume_s": [round(m, 3) if m is not None else None for _, m in held]}
    return out


def run_fleet_bench(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("ray") is None:
        print("armada bench fleet needs Ray Serve: pip install 'armada[fleet]' (ray[serve]==2.60.0)", file=sys.stderr)
        return 2
    from armada.runtime.bench import machine
    from armada.runtime.fleet.cells import remote_registered
    from armada.runtime.fleet.serve import resolve_bundle_arg
    from armada.runtime.fleet.service import ServiceOptions, start_service

    try:
        counts = [int(c) for c in (args.cells or ("1,2" if args.quick else "1,2,4,8")).split(",")]
        if not counts or min(counts) < 1 or max(counts) > 16:
            raise ValueError
    except ValueError:
        print(f"armada bench fleet: --cells must be counts 1..16, comma-separated, got {args.cells!r}", file=sys.stderr)
        return 2
    seconds = 3.0 if args.quick else float(args.seconds)
    inprocess = False  # every cell's inference in a process of its own (as `armada run` starts it)
    result: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg(), "replicas": REPLICAS,
                              "seconds": seconds, "remote_inference": "in-process threads" if inprocess else "processes",
                              "cell_cameras": f"2x {CELL_CAMERAS[0]}x{CELL_CAMERAS[1]}",
                              "phases": []}
    print(f"armada bench fleet: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    if not remote_registered():
        print("  note: the `remote` policy kind is not installed yet (pip install -e .); the remote cells' inference "
              "processes register it themselves", flush=True)
    bundle = resolve_bundle_arg(Path("tiny"))
    # Ctrl-C or SIGTERM must reach the finally below: it shuts Serve and the local Ray down (else
    # Ray's agents outlive us).
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    for attempt in (1, 2):  # on a loaded machine Serve's proxy may miss its own start-up timeout once
        try:
            service = start_service(ServiceOptions(bundle=str(bundle), replicas=REPLICAS, port=_free_port(),
                                                   replica_cpus=0.5, resident_tasks=2, batch_wait_s=0.002))
            break
        except Exception as exc:  # Ray raises its own types (ActorDiedError, RayActorError, ...)
            if attempt == 2:
                raise
            print(f"  the service did not start ({type(exc).__name__}); once more", flush=True)
    signal.signal(signal.SIGINT, _interrupt)  # whatever Ray installed
    result["service_start_s"] = time.monotonic() - started
    print(f"  service: {REPLICAS} replicas up in {result['service_start_s']:.1f} s at {service.url}", flush=True)
    try:
        result["overhead"] = measure_overhead(service.url, 30 if args.quick else 200)
        o = result["overhead"]
        print(f"  one client, {o['body_kb']:.0f} KB request: round trip p50 {o['rtt_ms']['p50']:.1f} ms "
              f"p99 {o['rtt_ms']['p99']:.1f}; model {o['model_ms']['p50']:.1f} / {o['model_ms']['p99']:.1f}; "
              f"service overhead {o['overhead_ms']['p50']:.1f} / {o['overhead_ms']['p99']:.1f} ms", flush=True)
        result["residency"] = measure_residency(bundle, 20 if args.quick else 100)
        with tempfile.TemporaryDirectory(prefix="flb", dir="/tmp") as tmp:
            root = Path(tmp)
            for n in counts:
                before = _replica_stats(service.url, REPLICAS)
                remote = _run_cells(n, service.url, seconds, root / f"r{n}", inprocess)
                remote["service"] = _service_delta(before, _replica_stats(service.url, REPLICAS), remote["wall_s"])
                local = _run_cells(n, None, seconds, root / f"l{n}", False)
                result["phases"].append({"cells": n, "remote": remote, "local": local})
                print(f"  {n} cell(s): done (load {os.getloadavg()[0]:.1f})", flush=True)

                if args.json:  # what is measured so far survives a later failure
                    Path(args.json).write_text(json.dumps(result, indent=2, default=float))

            # The victim is picked before the cells load the machine (a /health then may take seconds).
            victim = _health_with_retry(service.url)

            def kill() -> float:
                t = time.monotonic()
                os.kill(victim["pid"], signal.SIGKILL)
                return t

            n = max(counts)
            try:
                result["kill"] = _run_cells(n, service.url, max(seconds, 6.0), root / "k", inprocess, kill=kill)
                result["kill"]["replica"] = victim["replica"]
            except (OSError, RuntimeError, TimeoutError) as exc:
                result["kill_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        service.shutdown()
    result["load_after"] = os.getloadavg()
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def format_table(r: dict[str, Any]) -> str:
    lines = [f"machine: {r['machine']}; load average {r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after",
             f"service: {r['replicas']} replicas of the tiny bundle, started in {r['service_start_s']:.1f} s; "
             f"remote cells' inference: {r['remote_inference']}; {r['seconds']:.0f} s episodes; cameras "
             f"{r.get('cell_cameras', '?')} per cell",
             ""]
    o = r["overhead"]
    lines += ["| one client, 2x 640x480 | p50 ms | p99 ms |", "|---|---|---|"]
    for key, name in (("rtt_ms", "round trip"), ("model_ms", "replica model time"),
                      ("overhead_ms", "service overhead (round trip - model)"),
                      ("in_replica_queue_ms", "of which in the replica before the model (body, decode, batch wait)")):
        lines.append(f"| {name} | {o[key]['p50']:.1f} | {o[key]['p99']:.1f} |")
    res = r.get("residency")
    if res:
        lines += ["", f"task weight switches, one replica, tasks alternating (a weight set is {res['weight_set_mb']:.1f} MB):",
                  "| kept materialized | switch p50 ms | p99 ms | forward p50 ms | extra memory MB |", "|---|---|---|---|---|"]
        for key in sorted(k for k in res if k.startswith("resident_")):
            x = res[key]
            lines.append(f"| {key.split('_')[1]} task(s) | {x['swap_ms']['p50']:.2f} | {x['swap_ms']['p99']:.2f} | "
                         f"{x['forward_ms']['p50']:.1f} | {x['extra_mb']:.1f} |")
    lines += ["", "| cells | where | chunks/s | obs-to-chunk p50 ms | p99 ms | starved ticks | late chunks | "
                  "service CPU % | service RSS MB | batching factor | task switches | expired in queue |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["phases"]:
        for where in ("remote", "local"):
            x = p[where]
            s = x.get("service")
            svc = (f"{s['cpu_pct']:.0f} | {s['rss_mb']:.0f} | {s['batching_factor']:.2f} | {s['swaps']} | "
                   f"{s.get('expired', 0)}" if s else "- | - | - | - | -")
            lines.append(f"| {p['cells']} | {'service' if where == 'remote' else 'own model'} | "
                         f"{x['chunks_per_s']:.1f} | {x['latency_ms']['p50']:.1f} | {x['latency_ms']['p99']:.1f} | "
                         f"{x['starved_ticks']} | {x['late_chunks']} | {svc} |")
            if any(not o.startswith("completed") for o in x["outcomes"]):
                lines.append(f"|  | outcomes: {'; '.join(x['outcomes'])} |")
    if r.get("kill_error"):
        lines += ["", f"kill phase failed: {r['kill_error']}"]
    k = r.get("kill")
    if k:
        kk = k["kill"]
        lines += ["", f"kill one of {r['replicas']} replicas (SIGKILL) a third into {k['cells']} cell(s)' episodes: "
                      f"{kk['cells_held']} arm(s) "
                      f"held; hold after the kill (s): {kk['hold_s']}; moving again after (s): {kk['resume_s']}; "
                      f"outcomes: {'; '.join(k['outcomes'])}; starved ticks {k['starved_ticks']}, "
                      f"late chunks {k['late_chunks']}; the episode reports: {k['failures']} failed request(s), "
                      f"{k['failovers']} failover(s), held (s) {k['held_s']}"]
    return "\n".join(lines)
