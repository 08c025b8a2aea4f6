"""`armada bench anchors`: armada beside openpi's client and LeRobot's async inference, in one run.

For each control rate (50, 500 Hz) and inference load (0.3, 0.6, 0.9 of a chunk's duration) each
stack runs on a fresh cell (one mock-arm driver process and two 640x480 camera processes, see
common.py) for the same number of seconds, after a warm-up:

- armada:  its inference process, async chunks stamped at the observation's time.
- openpi:  openpi-client's Runtime + ActionChunkBroker + WebsocketClientPolicy against our
           openpi-style websocket server (openpi_stack.py).
- lerobot: lerobot's RobotClient and PolicyServer over gRPC (lerobot_stack.py).

The same scripted policy with a fixed compute time sits behind all three. `--quick`: 500 Hz,
load 0.6, at most 3 s per stack. Numbers, not assertions; the machine and every package's version are
printed with them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from armada.runtime.anchors.common import RunSpec, lerobot_socket, percentiles_ms, velocity_jump, write_cell
from armada.runtime.bench import _free_port, machine
from armada.runtime.supervisor import CellProcesses, default_run_dir
from armada.runtime.transport import CommandClient, Subscriber

STACKS = ("armada", "openpi", "lerobot")
DEFAULT_RATES = (50.0, 500.0)
DEFAULT_LOADS = (0.3, 0.6, 0.9)
WARMUP_S = 1.5
QUICK_SECONDS = 3.0  # --quick: per stack, at most
# Longer than `armada run` waits: beside other test runs (load average 20 on 2 cores) a 500 Hz driver
# took over 15 s to answer its first hello.
CELL_READY_S = 60.0
SERVER_READY_S = 120.0  # lerobot's server imports torch: ten seconds, and a minute on an overloaded machine
PACKAGES = ("armada", "openpi-client", "lerobot", "grpcio", "protobuf", "websockets", "msgpack", "torch", "numpy",
            "pyzmq")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def unavailable(stack: str) -> str | None:
    """Why a stack cannot run here, or None. Checked without importing it (lerobot imports torch)."""
    if stack == "openpi":
        if importlib.util.find_spec("openpi_client") is None:
            return "openpi-client is not installed (pip install openpi-client==0.1.2 --no-deps; it pins numpy<2)"
        if importlib.util.find_spec("tree") is None:
            return "openpi-client needs dm-tree (pip install dm-tree)"
    if stack == "lerobot":
        for module, hint in (("lerobot", "pip install lerobot==0.6.1 --no-deps"), ("grpc", "pip install grpcio"),
                             ("torch", "pip install torch"), ("draccus", "pip install draccus")):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not importable ({hint})"
    return None


# --------------------------------------------------------------------------- CPU


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each process so far, from /proc (Linux); NaN for one that is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError, ValueError):
            out[name] = float("nan")
    return out


def _cpu_percent(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {n: 100.0 * (after[n] - before[n]) / seconds for n in before}


# --------------------------------------------------------------------------- armada


def _run_armada(procs: CellProcesses, spec: RunSpec) -> dict[str, Any]:
    from armada.runtime.inference.client import EpisodeClient

    procs.spawn("infer")
    procs.wait_ready(CELL_READY_S)
    drv = procs.cell.drivers[0]
    pids = {c.title: c.proc.pid for c in procs.children}
    cmd = CommandClient(procs.ctx, drv.cmd)
    states = Subscriber(procs.ctx, drv.state, hwm=100_000)
    client = EpisodeClient(procs.ctx, procs.cell)
    try:
        episode = client.start("bench", duration_s=WARMUP_S + spec.seconds + 1.0, arm=True)
        start = time.monotonic() + WARMUP_S
        while time.monotonic() < start:
            states.drain()
            client.events.drain()
            time.sleep(0.01)
        stats_before = cmd.request("stats")
        before = stats_before["counters"]
        cpu_before = _cpu_seconds(pids)
        t: list[int] = []
        x: list[np.ndarray] = []
        running = 0  # driver ticks following a chunk or a move_to (state messages in mode running)
        moved_s = 0.0  # the runner's realign move_to's: the arm moves, but not to policy targets
        starved_seen: int | None = None
        latencies: list[float] = []
        end = start + spec.seconds
        while time.monotonic() < end:
            for msg in states.drain():
                if msg.get("mode") == "running":
                    running += 1
                    t.append(msg["mono_ns"])
                    # A starved tick requests nothing: the driver then brakes to a hold from where its
                    # filter is, and keeps `requested` at the last chunk point, which the arm never
                    # reaches. The stream at such a tick is the pose it holds toward, not that point.
                    n = msg["counters"]["starved_ticks"]
                    dry = starved_seen is not None and n > starved_seen
                    starved_seen = n
                    x.append(msg["commanded"] if dry else msg["requested"])
            for msg in client.events.drain():
                if msg.get("event") == "chunk":
                    latencies.append(msg["data"]["latency_ms"] * 1e-3)
                elif msg.get("event") == "realign":
                    moved_s += max(((msg.get("data") or {}).get("moves") or {}).values(), default=0.0)
            time.sleep(0.005)
        cpu = _cpu_percent(cpu_before, _cpu_seconds(pids), spec.seconds)
        stats_after = cmd.request("stats")
        after = stats_after["counters"]
        report = client.wait_report(episode, timeout_s=spec.seconds + 30)
    finally:
        client.close()
        cmd.close()
        states.close()
    ticks = after["ticks"] - before["ticks"]
    starved = after["starved_ticks"] - before["starved_ticks"]
    p50, p99 = percentiles_ms(latencies)
    moved = min(running - starved, int(round(moved_s * spec.rate_hz))) if running > starved else 0
    fresh = max(0, running - starved - moved)  # ticks that played a chunk's point
    ts = np.asarray(t, dtype=np.float64) * 1e-9
    np.savez(procs.run_dir / "armada-result.npz", t=ts, x=np.asarray(x))  # the target stream, for the seams
    nominal = int(math.floor(spec.seconds * spec.rate_hz))
    return {"obs_to_action_p50_ms": p50, "obs_to_action_p99_ms": p99, "chunks": len(latencies),
            "starved_ticks": max(0, nominal - fresh), "nominal_ticks": nominal, "driver_ticks": ticks,
            "driver_starved_ticks": starved, "effective_rate_hz": fresh / spec.seconds,
            "max_velocity_jump": velocity_jump(ts, np.asarray(x), spec.rate_hz, start, end) if t else float("nan"),
            "cpu_percent": cpu, "clamps": _clamps(stats_before, stats_after), "outcome": report["outcome"],
            "late_chunks": report["late_chunks"], "realign_moves": report.get("realign_moves", 0),
            "realign_move_ticks": moved}


def _clamps(before: dict[str, Any], after: dict[str, Any]) -> int:
    """The driver's limit filter clamps between two stats replies: what it had to smooth."""
    return int(sum(n - before["clamps"].get(kind, 0) for kind, n in after["clamps"].items()))


# --------------------------------------------------------------------------- openpi and lerobot


def _wait_port(port: int, server: subprocess.Popen, log_path: Path, timeout_s: float, unix_path: Path | None = None) -> None:
    """Until the server accepts a connection: on 127.0.0.1:``port``, or on the unix socket ``unix_path``."""
    import socket

    where = str(unix_path) if unix_path is not None else f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}: {_tail(log_path)}")
        family = socket.AF_UNIX if unix_path is not None else socket.AF_INET
        with socket.socket(family) as s:
            s.settimeout(0.2)
            if s.connect_ex(str(unix_path) if unix_path is not None else ("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the server did not listen on {where} within {timeout_s:.0f} s: {_tail(log_path)}")


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _run_foreign(stack: str, procs: CellProcesses, spec: RunSpec) -> dict[str, Any]:
    module = f"armada.runtime.anchors.{stack}_stack"
    port = _free_port()
    out = procs.run_dir / f"{stack}-result.json"
    window_file = out.with_suffix(".window")
    for stale in (out, window_file):
        stale.unlink(missing_ok=True)
    common = ["--cell", str(procs.cell_path), "--run-dir", str(procs.run_dir), "--rate", str(spec.rate_hz),
              "--load", str(spec.load), "--seconds", str(spec.seconds), "--warmup", str(WARMUP_S),
              "--port", str(port), "--out", str(out)]
    logs = procs.run_dir / "logs"
    pids = {c.title: c.proc.pid for c in procs.children}
    cmd = CommandClient(procs.ctx, procs.cell.drivers[0].cmd)  # stats only: no lease
    with open(logs / f"{stack}-server.log", "w") as slog:
        server = subprocess.Popen([sys.executable, "-m", module, "server", *common], cwd=procs.run_dir, stdout=slog,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = None
    try:
        # LeRobot's server unpickles what arrives: it listens on a socket file in the private run dir only.
        unix_path = lerobot_socket(procs.run_dir) if stack == "lerobot" else None
        _wait_port(port, server, logs / f"{stack}-server.log", SERVER_READY_S, unix_path)
        with open(logs / f"{stack}-client.log", "w") as clog:
            client = subprocess.Popen([sys.executable, "-m", module, "client", *common], cwd=procs.run_dir,
                                      stdout=clog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pids |= {f"{stack} server": server.pid, f"{stack} client": client.pid}
        deadline = time.monotonic() + SERVER_READY_S + WARMUP_S + spec.seconds
        while not window_file.exists():
            if client.poll() is not None:
                raise RuntimeError(f"the {stack} client exited with code {client.returncode}: "
                                   f"{_tail(logs / f'{stack}-client.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {stack} client did not start its run: {_tail(logs / f'{stack}-client.log')}")
            time.sleep(0.05)
        window = json.loads(window_file.read_text())
        time.sleep(max(0.0, window["start"] - time.monotonic()))
        cpu_before = _cpu_seconds(pids)
        stats_before = cmd.request("stats")
        time.sleep(max(0.0, window["end"] - time.monotonic()))
        cpu = _cpu_percent(cpu_before, _cpu_seconds(pids), window["end"] - window["start"])
        clamps = _clamps(stats_before, cmd.request("stats"))
        client.wait(timeout=30)
        # The result counts once written: LeRobot's gRPC may abort the client on its way out after that.
        if not out.exists():
            raise RuntimeError(f"the {stack} client exited with code {client.returncode}: "
                               f"{_tail(logs / f'{stack}-client.log')}")
        result = json.loads(out.read_text())
    finally:
        cmd.close()
        if client is not None:
            _stop(client)
        _stop(server)
    result["cpu_percent"] = cpu
    result["clamps"] = clamps
    result["client_exit_code"] = client.returncode
    result["outcome"] = "completed"
    return result


# --------------------------------------------------------------------------- one run, the table


def run_one(stack: str, spec: RunSpec) -> dict[str, Any]:
    reason = unavailable(stack)
    if reason is not None:
        return {"stack": stack, "skipped": reason}
    run_dir = default_run_dir("anchors")
    cell_path = write_cell(run_dir, spec)
    result: dict[str, Any] | None = None
    try:
        with CellProcesses(cell_path, run_dir) as procs:
            procs.spawn("driver", procs.cell.drivers[0].name)
            for cam in procs.cell.cameras:
                procs.spawn("camera", cam.name)
            procs.wait_ready(CELL_READY_S)
            result = _run_armada(procs, spec) if stack == "armada" else _run_foreign(stack, procs, spec)
    except Exception as exc:  # one stack failing must not hide the others' numbers
        why = f"{type(exc).__name__}: {exc}"[:1500]
        if result is None:
            return {"stack": stack, "failed": why}
        result["teardown"] = why  # measured, then the cell was slow to stop: the numbers stand
    return {"stack": stack, **(result or {})}


def _cpu_cell(cpu: dict[str, float]) -> str:
    """CPU % of the stack's own processes, then the driver and the cameras."""
    own = {k: v for k, v in cpu.items() if not k.startswith(("driver", "camera"))}
    driver = sum(v for k, v in cpu.items() if k.startswith("driver"))
    cams = sum(v for k, v in cpu.items() if k.startswith("camera"))
    parts = [f"{k.split()[-1]} {v:.0f}" for k, v in own.items()]
    return ", ".join(parts + [f"driver {driver:.0f}", f"cameras {cams:.0f}"])


def _notes(row: dict[str, Any]) -> str:
    """What went wrong in a measured run: an episode that failed, targets the driver refused."""
    notes = []
    if row.get("outcome", "completed") != "completed":
        notes.append(str(row["outcome"])[:120])
    if row.get("realign_moves"):
        notes.append(f"{row['chunks']} chunks played, {row['realign_moves']} realign moves "
                     f"({row['realign_move_ticks']} ticks, not counted fresh)")
    refused = sum(row.get("refused_targets", {}).values())
    if refused:
        notes.append(f"{refused} targets refused by the driver ({', '.join(row['refused_targets'])})")
    return f"  [{'; '.join(notes)}]" if notes else ""


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'stack':<8} {'rate':>5} {'load':>4} {'obs->act p50':>12} {'p99':>7} {'starved':>13} {'eff. Hz':>7} "
          f"{'max dv':>7}  CPU % (per process)")
    for r in rows:
        head = f"{r['stack']:<8} {r['rate_hz']:>5.0f} {r['load']:>4.1f}"
        if "skipped" in r or "failed" in r:
            why = (r.get("skipped") or r.get("failed") or "").splitlines()[0]  # the whole of it is in the JSON
            print(f"{head}  {'skipped' if 'skipped' in r else 'FAILED'}: {why}")
            continue
        starved = f"{r['starved_ticks']}/{r['nominal_ticks']}"
        print(f"{head} {r['obs_to_action_p50_ms']:>12.1f} {r['obs_to_action_p99_ms']:>7.1f} {starved:>13} "
              f"{r['effective_rate_hz']:>7.1f} {r['max_velocity_jump']:>7.3f}  {_cpu_cell(r['cpu_percent'])}"
              f"{_notes(r)}")
    print("obs->act: ms from the observation to its chunk in the hands of what feeds the arm; starved: control ticks "
          "with no fresh policy target / nominal ticks; eff. Hz: fresh targets per second; max dv: largest change "
          "of target velocity between two control ticks (rad/s)")


def _floats(text: str | None, default: tuple[float, ...], what: str) -> tuple[float, ...]:
    if text is None:
        return default
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"--{what}: every value must be a positive number, got {text!r}")
    return values


def run_anchors(rates: tuple[float, ...], loads: tuple[float, ...], seconds: float,
                stacks: tuple[str, ...] = STACKS) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "versions": versions(),
                               "seconds": seconds, "rows": []}
    print(f"machine: {results['machine']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), flush=True)
    for rate in rates:
        for load in loads:
            for stack in stacks:
                spec = RunSpec(rate_hz=rate, load=load, seconds=seconds)
                # The machine's own load beside the numbers: other work on the box shows in every column.
                load_average = os.getloadavg()[0]
                print(f"bench anchors: {stack} at {rate:.0f} Hz, load {load:.1f} "
                      f"(inference {spec.latency_s * 1e3:.0f} ms per chunk of 50; machine load average "
                      f"{load_average:.1f}) ...", flush=True)
                row = {"rate_hz": rate, "load": load, "load_average_1m": load_average, **run_one(stack, spec)}
                results["rows"].append(row)
    print_table(results["rows"])
    return results


def run_anchors_bench(args: argparse.Namespace) -> int:
    try:
        rates = _floats(args.rates, (500.0,) if args.quick else DEFAULT_RATES, "rates")
        loads = _floats(args.loads, (0.6,) if args.quick else DEFAULT_LOADS, "loads")
    except ValueError as exc:
        print(f"armada bench anchors: {exc}", file=sys.stderr)
        return 2
    if any(v > 0.99 for v in loads):
        print("armada bench anchors: --loads are shares of a chunk's duration, below 1", file=sys.stderr)
        return 2
    seconds = args.seconds if args.seconds is not None else 10.0
    if args.quick:
        seconds = min(seconds, QUICK_SECONDS)  # the CLI fills in its 10 s default before we see it
    results = run_anchors(rates, loads, seconds)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0 if not any("failed" in r for r in results["rows"]) else 1
