"""What the three stacks of `armada bench anchors` share: the cell, the arm, the policy, the metrics.

Every stack drives the same armada driver process (mock backend, at the run's control rate) and
reads the same two armada camera processes (640x480 RGB at 30 fps). openpi's and LeRobot's clients
command the arm the way an integrator would: one ``servo`` target per control tick of their own
loop, under a lease kept by a heartbeat thread. The policy behind every stack is armada's
``ScriptedPolicy`` with a fixed compute time (latency = load x chunk duration): its actions are a
function of the observation's time, so any jump in the target stream is the stack's scheduling.

Measured per stack, over the same window:
- obs-to-action: from the observation's timestamp to the moment its chunk is in the hands of
  whatever feeds the arm (openpi: the broker's ``infer`` returned; LeRobot: the chunk reached the
  client's action queue; armada: the chunk was accepted by the driver).
- starved ticks: nominal control ticks (rate x seconds) in which the arm got no fresh policy target.
- effective control rate: fresh policy targets handed to the arm per second.
- largest velocity jump: the target stream sampled at every control tick, v = dx/dt per tick,
  the largest |v_k - v_(k-1)| over all joints (rad/s); the scripted motion's own change per tick is
  below 0.01 rad/s, so this is the worst seam.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from armada.runtime.config import SCRIPTED_CELL, load_cell
from armada.runtime.inference.link import DriverLink
from armada.runtime.inference.observation import Observation
from armada.runtime.inference.policy import ActionSpace, ScriptedPolicy
from armada.runtime.transport import FrameSubscriber, RemoteError

CHUNK_SIZE = 50  # actions per chunk, one per control tick (openpi ALOHA, SmolVLA, pi0.5 use 50)
SCRIPTED_AMPLITUDE = 0.3
SCRIPTED_FREQUENCY_HZ = 0.25
CLIENT_NAME = "anchors-bench"


@dataclass(frozen=True)
class RunSpec:
    """One measurement: a stack at a control rate and an inference load."""

    rate_hz: float
    load: float  # inference time as a share of a chunk's duration
    seconds: float

    @property
    def dt(self) -> float:
        return 1.0 / self.rate_hz

    @property
    def latency_s(self) -> float:
        return self.load * CHUNK_SIZE * self.dt


def write_cell(run_dir: Path, spec: RunSpec) -> Path:
    """The scripted cell at this rate and load: the mock arm's rate changed, chunks of 50 at 1/rate."""
    run_dir.mkdir(parents=True, exist_ok=True)
    emb_src = SCRIPTED_CELL.parent.parent / "embodiments" / "mock_arm.yaml"
    emb = yaml.safe_load(emb_src.read_text())
    emb["control_rate_hz"] = spec.rate_hz
    emb_path = run_dir / "mock_arm.yaml"
    emb_path.write_text(yaml.safe_dump(emb))
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["name"] = "anchors"
    data["drivers"][0]["embodiment"] = str(emb_path)
    data["inference"]["policy"] = {"kind": "scripted", "amplitude": SCRIPTED_AMPLITUDE,
                                   "frequency_hz": SCRIPTED_FREQUENCY_HZ, "latency_s": spec.latency_s}
    # async, the whole chunk executed: the next inference starts so it lands before this chunk ends
    data["inference"]["chunking"] = {"size": CHUNK_SIZE, "dt": spec.dt, "mode": "async", "execute": CHUNK_SIZE,
                                     "merge": "replace"}
    data["inference"]["episode_duration_s"] = spec.seconds + 10
    # A chunk at load 0.9 and 50 Hz takes 0.9 s: the default deadline (2 x chunk span) holds.
    path = run_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def action_space(description: dict[str, Any]) -> ActionSpace:
    """The action space from a driver's hello description (as the episode runner builds it)."""
    gripper = [g["mode"] == "gripper_position" for g in description["groups"] for _ in g["joints"]]
    return ActionSpace(list(description["joint_names"]), np.asarray(description["lower"], dtype=np.float64),
                       np.asarray(description["upper"], dtype=np.float64), np.array(gripper))


def scripted_policy(spec: RunSpec) -> ScriptedPolicy:
    return ScriptedPolicy(SCRIPTED_AMPLITUDE, SCRIPTED_FREQUENCY_HZ, CHUNK_SIZE, spec.dt, spec.latency_s)


def observation(state: np.ndarray, mono_ns: int) -> Observation:
    """What the scripted policy reads: the state and the observation's time (same host, same clock)."""
    return Observation(mono_ns=mono_ns, t_ns=time.time_ns(), state=np.asarray(state, dtype=np.float64))


# --------------------------------------------------------------------------- the arm, for foreign clients


class Arm:
    """The mock arm and the two cameras as a foreign client sees them: newest state and frames,
    one servo target per call. Holds the lease with a heartbeat thread (the arm holds if we die)."""

    def __init__(self, cell_path: Path, run_dir: Path):
        import zmq

        self.cell = load_cell(cell_path, run_dir)
        self.ctx = zmq.Context()
        self.link = DriverLink(self.ctx, self.cell.drivers[0], self.cell.curve)
        self.cameras = {c.name: FrameSubscriber(self.ctx, c.frames, curve=self.cell.curve) for c in self.cell.cameras}
        self.description: dict[str, Any] = {}
        self.applied_t: list[float] = []  # monotonic seconds of each servo target
        self.applied_x: list[np.ndarray] = []
        self.frames: dict[str, np.ndarray] = {}
        self.state: np.ndarray | None = None
        self.refused: dict[str, int] = {}  # servo targets the driver refused, by error code
        self._lock = threading.Lock()

    def connect(self) -> None:
        self.description = self.link.handshake()["description"] if not self.link.description else self.link.description
        self.link.acquire(CLIENT_NAME)
        self.link.start_heartbeat(self.cell.inference.heartbeat_s, lambda: True)
        self.link.command("arm")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # a first state and a frame from each camera
            self.poll()
            if self.state is not None and len(self.frames) == len(self.cameras):
                return
            time.sleep(0.01)
        raise TimeoutError(f"no state or no frames within 10 s (cameras seen: {sorted(self.frames)})")

    def poll(self) -> None:
        msg = self.link.state.recv_latest()
        if msg is not None:
            self.state = np.asarray(msg["measured"], dtype=np.float64)
        for name, sub in self.cameras.items():
            frame = sub.recv_latest()
            if frame is not None:
                self.frames[name] = frame.pixels

    def servo(self, target: np.ndarray) -> None:
        """One target, as the stack asked for it. A target the driver refuses (one that jumps past
        max_engage_distance from the pose: the arm holds instead) is counted, not raised: how often a
        stack's stream jumps that far is one of the numbers."""
        target = np.ascontiguousarray(target, dtype=np.float64)
        try:
            self.link.command("servo", target=target)
        except RemoteError as exc:
            self.refused[exc.code] = self.refused.get(exc.code, 0) + 1
        with self._lock:
            self.applied_t.append(time.monotonic())
            self.applied_x.append(target)

    def close(self) -> None:
        try:
            if self.link.lease:
                self.link.command("release")
        except Exception:  # the lease lapses within its TTL and the arm holds anyway
            pass
        self.link.stop_heartbeat()
        self.link.close()
        for sub in self.cameras.values():
            sub.close()
        self.ctx.destroy(linger=0)


# --------------------------------------------------------------------------- metrics


def velocity_jump(t: np.ndarray, x: np.ndarray, rate_hz: float, start: float, end: float) -> float:
    """Largest change of velocity between consecutive control ticks (rad/s) of the target stream
    sampled at ``rate_hz`` over [start, end): the target at a tick is the last one handed over."""
    if len(t) < 3:
        return float("nan")
    ticks = np.arange(start, end, 1.0 / rate_hz)
    idx = np.searchsorted(t, ticks, side="right") - 1
    ticks, idx = ticks[idx >= 0], idx[idx >= 0]
    if len(idx) < 3:
        return float("nan")
    v = np.diff(x[idx], axis=0) * rate_hz
    return float(np.max(np.abs(np.diff(v, axis=0))))


def fresh_targets(t: np.ndarray, start: float, end: float) -> int:
    return int(np.count_nonzero((t >= start) & (t < end)))


def percentiles_ms(latencies_s: list[float]) -> tuple[float, float]:
    if not latencies_s:
        return float("nan"), float("nan")
    a = np.asarray(latencies_s) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def client_result(arm: Arm, spec: RunSpec, start: float, end: float, latencies_s: list[float],
                  dump: Path | None = None) -> dict[str, Any]:
    """A foreign client's numbers over [start, end) (monotonic s), from the servo targets it sent."""
    with arm._lock:
        t = np.asarray(arm.applied_t)
        x = np.asarray(arm.applied_x)
    if dump is not None:
        np.savez(dump, t=t, x=x)  # the target stream, for a closer look at the seams
    seconds = end - start
    expected = int(math.floor(seconds * spec.rate_hz))
    fresh = fresh_targets(t, start, end)
    p50, p99 = percentiles_ms(latencies_s)
    return {"obs_to_action_p50_ms": p50, "obs_to_action_p99_ms": p99, "chunks": len(latencies_s),
            "starved_ticks": max(0, expected - fresh), "nominal_ticks": expected,
            "effective_rate_hz": fresh / seconds if seconds > 0 else 0.0,
            "max_velocity_jump": velocity_jump(t, x, spec.rate_hz, start, end) if len(t) else float("nan"),
            "refused_targets": dict(arm.refused)}


def write_result(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def spec_args(parser: Any) -> None:
    """The options every stack's client and server take (python -m armada.runtime.anchors.X ...)."""
    parser.add_argument("--cell", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--load", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, default=None)


def spec_of(args: Any) -> RunSpec:
    return RunSpec(rate_hz=args.rate, load=args.load, seconds=args.seconds)


def announce_window(out: Path | None, start: float, end: float) -> None:
    """Tell the bench (which samples every process's CPU over it) when the measured window is."""
    if out is not None:
        write_result(out.with_suffix(".window"), {"start": start, "end": end})


def lerobot_socket(run_dir: Path | str) -> Path:
    """Where LeRobot's policy server listens (gRPC on a unix socket): inside the private run dir, since
    its protocol unpickles what arrives and a 127.0.0.1 port is open to every local user."""
    return Path(run_dir) / "lerobot-grpc.sock"
