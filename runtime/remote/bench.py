"""`armada bench remote`: what running inference on another host costs.

- capture-to-chunk-at-driver latency, local against remote: the scripted cell's processes run once
  on this host over ipc, once split over loopback addresses as two hosts (driver and camera on
  127.0.0.2, inference on 127.0.0.3, each with its own `armada keys` set, TCP + CURVE, JPEG frames)
  through the delaying proxy (runtime/remote/proxy.py; ``--delay-ms`` one way). Per setup: the
  frames' age when the GPU host takes them (capture to arrival) and the episode's chunk latency
  (observation to chunk accepted by the driver); their sum is capture to chunk at the driver;
- bandwidth per camera, raw against JPEG, at the camera's size and rate (bytes on the wire);
- CPU of CURVE (the same bytes over TCP with and without it) and of JPEG encode and decode.

Nothing here arms a real device: the cell is the scripted mock cell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zmq

ROBOT, GPU = "127.0.0.2", "127.0.0.3"
WIDTH, HEIGHT, FPS = 640, 480, 30
JPEG_QUALITY = 80


# ---------------------------------------------------------------- CPU of CURVE and JPEG


def curve_cpu(megabytes: int = 64, msg_bytes: int = 1 << 20) -> dict[str, float]:
    """Process CPU (all threads, both ends) per MiB sent over loopback TCP, plain and with CURVE."""
    out = {}
    for label, curve in (("plain", False), ("curve", True)):
        ctx = zmq.Context()
        pub, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        for s in (pub, sub):
            s.setsockopt(zmq.LINGER, 0)
        if curve:
            spub, ssec = zmq.curve_keypair()
            cpub, csec = zmq.curve_keypair()
            pub.curve_secretkey, pub.curve_publickey, pub.curve_server = ssec, spub, True
            sub.curve_secretkey, sub.curve_publickey, sub.curve_serverkey = csec, cpub, spub
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.connect(f"tcp://127.0.0.1:{port}")
        payload = np.random.default_rng(0).bytes(msg_bytes)
        pub.send(payload)
        if not sub.poll(5000):
            raise TimeoutError("no message over loopback TCP in 5 s")
        sub.recv()
        n = max(1, megabytes * (1 << 20) // msg_bytes)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            pub.send(payload, copy=False)
            if not sub.poll(5000):
                raise TimeoutError("a message did not arrive in 5 s")
            sub.recv(copy=False)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        mib = n * msg_bytes / (1 << 20)
        out[f"{label}_cpu_ms_per_mib"] = 1000 * cpu / mib
        out[f"{label}_mib_per_s"] = mib / wall
        pub.close()
        sub.close()
        ctx.term()
    out["curve_extra_cpu_ms_per_mib"] = out["curve_cpu_ms_per_mib"] - out["plain_cpu_ms_per_mib"]
    return out


def _scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A stand-in for a camera image: smooth shading plus sensor noise (compresses like a plain
    indoor scene, not like the synthetic pattern, which compresses far better)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 64], axis=-1)
    blocks = np.kron(rng.integers(0, 80, (height // 40 + 1, width // 40 + 1, 3)), np.ones((40, 40, 1)))[:height, :width]
    return np.clip(base * 0.6 + blocks + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg_cost(width: int = WIDTH, height: int = HEIGHT, quality: int = JPEG_QUALITY, reps: int = 30) -> dict[str, float]:
    import cv2

    rgb = _scene(width, height)
    encode, decode, size = [], [], 0
    for _ in range(reps):
        t = time.perf_counter()
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        encode.append(time.perf_counter() - t)
        size = int(jpeg.size)
        t = time.perf_counter()
        cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        decode.append(time.perf_counter() - t)
    raw = width * height * 3
    return {"size": f"{width}x{height}", "fps": FPS, "jpeg_quality": quality,
            "raw_bytes_per_frame": raw, "jpeg_bytes_per_frame": size,
            "raw_mbit_s": raw * FPS * 8 / 1e6, "jpeg_mbit_s": size * FPS * 8 / 1e6,
            "encode_ms": 1000 * float(np.median(encode)), "decode_ms": 1000 * float(np.median(decode))}


# ---------------------------------------------------------------- local against remote episodes


def _free_port(host: str) -> int:
    with socket.create_server((host, 0)) as s:
        return s.getsockname()[1]


def _cell(folder: Path, eps: dict[str, str], curve: dict | None, jpeg: int | None, seconds: float) -> Path:
    from armada.runtime.config import SCRIPTED_CELL

    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    drv = data["drivers"][0]
    drv["state"], drv["cmd"], drv["lease_ttl_s"] = eps["state"], eps["cmd"], 1.0
    data["cameras"] = [{"name": "front", "width": WIDTH, "height": HEIGHT, "fps": FPS, "frames": eps["frames"],
                        **({"jpeg_quality": jpeg} if jpeg else {})}]
    data["inference"]["episode_duration_s"] = seconds
    if curve is not None:
        data["curve"] = curve
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cell.yaml").write_text(yaml.safe_dump(data))
    return folder / "cell.yaml"


def run_setup(root: Path, remote: bool, seconds: float, delay_s: float) -> dict[str, Any]:
    """One episode of the scripted cell; returns frame ages at the inference side and the report."""
    from armada.runtime.config import load_cell
    from armada.runtime.inference.client import EpisodeClient
    from armada.runtime.remote.hostkeys import host_curve
    from armada.runtime.remote.keys import make_keys, parse_hosts
    from armada.runtime.remote.proxy import DelayProxy
    from armada.runtime.supervisor import answers_hello
    from armada.runtime.transport import FrameSubscriber

    root.mkdir(parents=True)
    proxies: list[DelayProxy] = []
    if remote:
        keys = make_keys(root / "keys", parse_hosts("robot,gpu"))
        curve = {h: {k: v for k, v in host_curve(keys[h]).items() if k != "server_keys"} for h in keys}
        ports = {k: _free_port(ROBOT) for k in ("state", "cmd", "frames")}
        proxies = [DelayProxy(GPU, (ROBOT, p), delay_s=delay_s) for p in ports.values()]
        robot_cell = _cell(root / "robot", {k: f"tcp://{ROBOT}:{p}" for k, p in ports.items()}, curve["robot"],
                           JPEG_QUALITY, seconds)
        gpu_cell = _cell(root / "gpu", {k: px.address for k, px in zip(ports, proxies)}, curve["gpu"],
                         JPEG_QUALITY, seconds)
    else:
        eps = {k: f"ipc://{root}/run/{k}" for k in ("state", "cmd", "frames")}
        robot_cell = gpu_cell = _cell(root / "local", eps, None, None, seconds)
    runs = {"robot": root / "run", "gpu": root / "run" if not remote else root / "run-g"}
    for d in set(runs.values()):
        d.mkdir(mode=0o700, exist_ok=True)
    ctx = zmq.Context()
    procs: list[subprocess.Popen] = []

    def spawn(role: str, cell: Path, run: Path, name: str | None = None) -> None:
        args = [sys.executable, "-m", "armada.runtime.cli", role, str(cell), "--run-dir", str(run)]
        log = open(root / f"{name or role}.log", "wb")
        procs.append(subprocess.Popen(args + (["--name", name] if name else []), stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def wait(ready, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{what} did not start; logs in {root}")
            time.sleep(0.1)

    try:
        gpu = load_cell(gpu_cell, runs["gpu"])
        spawn("driver", robot_cell, runs["robot"], "arm")
        spawn("camera", robot_cell, runs["robot"], "front")
        wait(lambda: answers_hello(ctx, gpu.drivers[0].cmd, gpu.curve, "bench", 0.5), "the driver")
        spawn("infer", gpu_cell, runs["gpu"])
        wait(lambda: answers_hello(ctx, gpu.inference.ctl, None, "bench", 0.5), "inference", 120)
        sub = FrameSubscriber(ctx, gpu.cameras[0].frames, curve=gpu.curve)
        ages, wire = [], []
        end = time.monotonic() + min(3.0, seconds)
        while time.monotonic() < end:
            f = sub.recv(1.0)
            if f is not None:
                ages.append((time.time_ns() - f.header["capture_ns"]) * 1e-6)  # one machine: one wall clock
                wire.append(f.wire_bytes)
        sub.close()
        rtts = _ping_rtts_ms(ctx, gpu.drivers[0].cmd, gpu.curve)
        client = EpisodeClient(ctx, gpu)
        try:
            report = client.wait_report(client.start("bench", arm=True), seconds + 60)
        finally:
            client.close()
        return {"setup": "remote" if remote else "local", "outcome": report["outcome"],
                "frame_age_p50_ms": float(np.median(ages)) if ages else float("nan"),
                "frame_age_p99_ms": float(np.percentile(ages, 99)) if ages else float("nan"),
                "frame_wire_bytes": int(np.median(wire)) if wire else 0,
                "chunk_latency_p50_ms": report.get("chunk_latency_p50_ms", float("nan")),
                "chunk_latency_p99_ms": report.get("chunk_latency_p99_ms", float("nan")),
                "driver_rtt_p50_ms": float(np.median(rtts)),
                "chunks": report.get("chunks", 0),
                "link_bytes": sum(p.stats.bytes_up + p.stats.bytes_down for p in proxies)}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for px in proxies:
            px.close()
        ctx.destroy(linger=0)


def _ping_rtts_ms(ctx: zmq.Context, endpoint: str, curve: Any, n: int = 30) -> list[float]:
    from armada.runtime.transport import CommandClient

    client = CommandClient(ctx, endpoint, curve, default_timeout_s=2.0)
    try:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            client.request("ping")
            out.append((time.perf_counter() - t) * 1000)
        return out
    finally:
        client.close()


def _capture_to_chunk_ms(e: dict[str, Any]) -> float:
    """Frame age at the inference side + observation to chunk sent + the chunk's way to the driver
    (half the driver's ping round trip)."""
    return e["frame_age_p50_ms"] + e["chunk_latency_p50_ms"] + e["driver_rtt_p50_ms"] / 2


def loopback_aliases() -> bool:
    """Whether this machine can bind the robot and GPU hosts' loopback addresses (127.0.0.2/3)."""
    try:
        for host in (ROBOT, GPU):
            with socket.create_server((host, 0)):
                pass
        return True
    except OSError:
        return False


DEFAULT_DELAY_MS = 5.0
MAX_DELAY_MS = 2000.0  # beyond a lease TTL the episode cannot run at all: nothing to measure


def link_delay_ms(value: float | None) -> float:
    """`--delay-ms`: the proxy's one-way delay; None is the default, 0 a link with no added delay."""
    if value is None:
        return DEFAULT_DELAY_MS
    delay = float(value)
    if not 0.0 <= delay <= MAX_DELAY_MS:  # also refuses nan
        raise ValueError(f"--delay-ms {value}: the one-way delay must be between 0 and {MAX_DELAY_MS:.0f} ms")
    return delay


def run_remote_bench(args: argparse.Namespace) -> int:
    from armada.runtime.bench import machine

    seconds = float(getattr(args, "seconds", 10) or 10)
    try:
        delay_ms = link_delay_ms(getattr(args, "delay_ms", None))
    except ValueError as exc:
        print(f"armada bench remote: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"host": socket.gethostname(), "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0],
                              "machine": machine(), "link_delay_ms_one_way": delay_ms}
    result["curve"] = curve_cpu()
    result["jpeg"] = jpeg_cost()
    root = Path(tempfile.mkdtemp(prefix="armada-bench-remote-"))
    try:
        result["episodes"] = [run_setup(root / "local", False, seconds, 0.0)]
        if loopback_aliases():
            result["episodes"].append(run_setup(root / "remote", True, seconds, delay_ms / 1000))
        else:
            result["remote_skipped"] = "this machine cannot bind 127.0.0.2/127.0.0.3"
    except (RuntimeError, TimeoutError) as exc:
        print(f"armada bench remote: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(format_table(result))
    if getattr(args, "json", None):  # `armada bench --json PATH`: also write the results there
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return 0


def format_table(r: dict[str, Any]) -> str:
    c, j = r["curve"], r["jpeg"]
    lines = [f"armada bench remote on {r['host']} ({r['cpus']} CPUs, load {r['load_1m']:.1f}); "
             f"remote link: +{r['link_delay_ms_one_way']:.1f} ms each way (proxy)",
             *([f"machine: {r['machine']}"] if r.get("machine") else []),
             "",
             f"{'setup':8} {'frame age p50/p99 (ms)':>24} {'obs->chunk p50/p99 (ms)':>26} "
             f"{'driver rtt (ms)':>16} {'capture->chunk at driver (ms)':>30} {'chunks':>7}  outcome"]
    for e in r.get("episodes", []):
        lines.append(f"{e['setup']:8} {e['frame_age_p50_ms']:>11.1f} / {e['frame_age_p99_ms']:<10.1f}"
                     f" {e['chunk_latency_p50_ms']:>12.1f} / {e['chunk_latency_p99_ms']:<11.1f}"
                     f" {e['driver_rtt_p50_ms']:>16.2f} {_capture_to_chunk_ms(e):>30.1f} {e['chunks']:>7}  {e['outcome']}")
    if "remote_skipped" in r:
        lines.append(f"remote   skipped: {r['remote_skipped']}")
    lines += ["",
              f"camera {j['size']} @ {j['fps']} fps: raw {j['raw_mbit_s']:.0f} Mbit/s "
              f"({j['raw_bytes_per_frame']} B/frame), JPEG q{j['jpeg_quality']} {j['jpeg_mbit_s']:.1f} Mbit/s "
              f"({j['jpeg_bytes_per_frame']} B/frame)",
              f"JPEG CPU: encode {j['encode_ms']:.2f} ms, decode {j['decode_ms']:.2f} ms per frame",
              f"CURVE CPU: {c['curve_cpu_ms_per_mib']:.2f} ms/MiB with, {c['plain_cpu_ms_per_mib']:.2f} ms/MiB "
              f"without (encryption +{c['curve_extra_cpu_ms_per_mib']:.2f} ms/MiB, both ends); "
              f"throughput {c['curve_mib_per_s']:.0f} vs {c['plain_mib_per_s']:.0f} MiB/s",
              "frame age: capture to arrival at the inference side (p50 of a 3 s sample); obs->chunk: observation "
              "to chunk sent (the policy's time); capture->chunk at driver: frame age + obs->chunk + rtt/2",
              "the JPEG image is a shaded, noisy stand-in (a real scene's JPEG may be larger)"]
    return "\n".join(lines)
