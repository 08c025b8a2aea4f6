"""One episode: route at t=0, then produce and schedule chunks until time, stop or fault.

Scheduling, per ``ChunkingConfig.mode``:
- sync: infer, send the first ``execute`` steps stamped from now, wait until they have run,
  infer again. The arm holds while the next chunk is computed (openpi's broker does this).
- async: the chunk is stamped at its observation's time, so the driver drops whatever became
  the past while the model ran (latency compensation); the next inference starts early enough,
  from a rolling latency estimate, that the arm does not run dry.

Nothing here may wait without a bound. Policy calls run in a thread of their own with a
deadline (``deadline.py``); while one runs, the loop keeps watching its inputs, the drivers and
the stop flag. The loop stamps its progress; the heartbeat threads send only while that stamp is
recent, so a loop stuck anywhere loses the lease within the driver's TTL and the arm holds. A
driver whose state goes silent, or that stops answering, ends the episode as failed by name.
Anything unexpected that the loop raises ends the episode as failed with the exception in the
report: the episode thread never vanishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from armada.runtime.config import ChunkingConfig
from armada.runtime.inference.deadline import PolicyCaller, PolicyTimeout, Stopped
from armada.runtime.inference.link import DriverLink
from armada.runtime.inference.observation import ObservationBuilder, StaleObservation
from armada.runtime.inference.policy import ActionSpace, Policy, PolicyError
from armada.runtime.transport import RemoteError

log = logging.getLogger("armada.inference")

Emit = Callable[[str, dict[str, Any]], None]

LATENCY_WINDOW = 20  # chunks in the rolling latency estimate
STATE_POLL_S = 0.005
FIRST_OBSERVATION_S = 3.0


@dataclass(frozen=True)
class Deadlines:
    """How long the episode waits for things before it fails (seconds)."""

    policy_s: float = 2.0  # one infer or resume call
    first_policy_s: float = 2.0  # reset, route and the first infer (a model may warm up)
    driver_silence_s: float = 1.0  # no state from a driver for this long: it is dead or hung
    # Heartbeats are withheld once the loop has not stamped progress for this long.
    # Half a second: a hung loop loses the lease within that plus the TTL, and a loop descheduled
    # for a few hundred ms on a loaded host (or by a GIL-heavy model call) does not end a good episode.
    progress_s: float = 0.5


class EpisodeError(Exception):
    """The episode could not start or had to end early; the message tells the operator why."""


@dataclass
class EpisodeRequest:
    episode: int
    instruction: str
    duration_s: float
    arm: bool = False
    task: str | None = None
    min_margin: float = 0.0


@dataclass
class EpisodeReport:
    episode: int
    outcome: str  # completed, stopped, or "failed: ..."
    task: str = ""
    duration_s: float = 0.0
    chunks: int = 0
    control_rate_hz: dict[str, float] = field(default_factory=dict)
    overruns: int = 0
    starved_ticks: int = 0
    clamps: int = 0
    clamps_by_kind: dict[str, int] = field(default_factory=dict)
    lease_lost: int = 0
    dropped_points: int = 0
    paused_s: float = 0.0
    chunk_latency_p50_ms: float = 0.0
    chunk_latency_p99_ms: float = 0.0
    chunk_latency_max_ms: float = 0.0
    tracking_error_max: float = 0.0
    tracking_error_mean: float = 0.0
    rejected_inputs: dict[str, int] = field(default_factory=dict)  # wrong kind or shape, per stream
    future_stamps: dict[str, int] = field(default_factory=dict)  # sender clock ahead of ours, per stream

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EpisodeRunner:
    def __init__(self, links: dict[str, DriverLink], builder: ObservationBuilder, policy: Policy,
                 chunking: ChunkingConfig, heartbeat_s: float, emit: Emit, client_name: str = "inference",
                 deadlines: Deadlines | None = None, caller: PolicyCaller | None = None):
        self.links, self.builder, self.policy = links, builder, policy
        self.chunking, self.heartbeat_s, self.emit = chunking, heartbeat_s, emit
        self.client_name = client_name
        self.deadlines = deadlines or Deadlines(progress_s=max(3 * heartbeat_s, 0.5))
        self.caller = caller or PolicyCaller()
        self.stop_event = threading.Event()
        self._progress_ns = time.monotonic_ns()
        self._first_call = True
        self._dead: set[str] = set()  # drivers found silent or not answering: no more requests to them
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._tracking: list[float] = []
        self._all_latencies: list[float] = []

    # ------------------------------------------------------------------ the episode

    def run(self, req: EpisodeRequest) -> EpisodeReport:
        report = EpisodeReport(req.episode, outcome="completed")
        armed_by_us: list[DriverLink] = []
        stats_before: dict[str, dict] = {}
        started = time.monotonic()
        try:
            self._take_control(req, armed_by_us)
            space = self._action_space()
            self._call("reset", self.policy.reset, space)
            obs = self._first_observation()
            route = self._call("route", self.policy.route, obs, req.instruction, req.task)
            self.emit("route", {"task": route.task, "scores": route.scores, "probabilities": route.probabilities,
                                "margin": route.margin})
            if route.margin < req.min_margin:
                raise EpisodeError(f"router margin {route.margin:.3f} is below the required {req.min_margin:.3f}; "
                                   "pin a task or lower min_margin")
            report.task = route.task
            stats_before = {n: link.stats() for n, link in self.links.items()}
            started = time.monotonic()
            self._chunk_loop(req, report, started)
            if self.stop_event.is_set():
                report.outcome = "stopped"
        except Stopped:
            report.outcome = "stopped"
        except (EpisodeError, PolicyTimeout, TimeoutError, RemoteError, PolicyError) as exc:
            report.outcome = f"failed: {exc}"
        except Exception as exc:  # a bug or a surprise: the episode ends, reported, the process stays
            log.exception("episode %d: unexpected error", req.episode)
            report.outcome = f"failed: unexpected {type(exc).__name__} in the episode: {exc}"
        finally:
            report.duration_s = time.monotonic() - started
            self._hand_back(armed_by_us)
            self._fill_report(report, stats_before)
        return report

    # ------------------------------------------------------------------ progress and waiting

    def _stamp(self) -> None:
        self._progress_ns = time.monotonic_ns()

    def _alive(self) -> bool:
        """Whether the loop stamped progress recently (read by the heartbeat threads)."""
        return (time.monotonic_ns() - self._progress_ns) * 1e-9 < self.deadlines.progress_s

    def _tick(self) -> None:
        """Work done whenever the loop waits: stamp progress, take inputs, watch the drivers."""
        self._stamp()
        self.builder.poll()
        for msg in self.builder.latest_states.values():
            if msg["mode"] == "running":
                self._tracking.append(float(np.max(np.abs(msg["commanded"] - msg["measured"]))))
        self._check_drivers()

    def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A policy call with its deadline; the loop keeps ticking while it runs."""
        first = self._first_call or name in ("reset", "route")
        deadline = self.deadlines.first_policy_s if first else self.deadlines.policy_s
        result = self.caller.call(name, fn, args, deadline, self.stop_event, self._tick)
        if name == "infer":
            self._first_call = False
        self._stamp()
        return result

    def _take_control(self, req: EpisodeRequest, armed_by_us: list[DriverLink]) -> None:
        busy = self.caller.busy()
        if busy is not None:
            raise EpisodeError(f"the policy's {busy} call from an earlier episode has not returned; "
                               "restart the inference process")
        for name, link in self.links.items():
            self._stamp()
            try:
                link.sync_clock()
                link.acquire(self.client_name)
                link.start_heartbeat(self.heartbeat_s, self._alive)
                status = link.ping()
            except TimeoutError as exc:
                self._dead.add(name)
                raise EpisodeError(f"driver {name} did not answer: {exc}") from None
            if req.arm:
                # Always ask: arm is idempotent, and it cancels a disarm that is still decelerating.
                link.command("arm")
                if status["mode"] == "idle" or status.get("disarming"):
                    armed_by_us.append(link)
            elif status["mode"] not in ("armed", "running") or status.get("disarming"):
                state = "disarming" if status.get("disarming") else status["mode"]
                raise EpisodeError(f"driver {name} is {state}; arm it first (`armada run --arm`, or `arm: true` in episode_start)")

    def _hand_back(self, armed_by_us: list[DriverLink]) -> None:
        for link in self.links.values():
            if link.name in self._dead:
                link.stop_heartbeat()
                link.lease = None
                continue  # each request would only time out; its lease watchdog holds the arm
            try:
                if link in armed_by_us:
                    link.command("disarm")  # decelerates to a hold, then idle; torque stays on
                if link.lease:
                    link.command("release")  # the driver stops following chunks and decelerates to a hold
            except Exception as exc:  # the driver's lease watchdog holds the arm anyway
                log.warning("driver %s: handing back control failed (%s); its lease lapses instead", link.name, exc)
            finally:
                link.stop_heartbeat()
                link.lease = None

    def _action_space(self) -> ActionSpace:
        names, lower, upper, gripper = [], [], [], []
        for link in self.links.values():
            d = link.description
            names += d["joint_names"]
            lower.append(np.asarray(d["lower"]))
            upper.append(np.asarray(d["upper"]))
            gripper += [g["mode"] == "gripper_position" for g in d["groups"] for _ in g["joints"]]
        return ActionSpace(names, np.concatenate(lower), np.concatenate(upper), np.array(gripper))

    def _first_observation(self, timeout_s: float = FIRST_OBSERVATION_S):
        deadline = time.monotonic() + timeout_s
        while True:
            self._stamp()
            if self.stop_event.is_set():
                raise Stopped("stopped before the first observation")
            try:
                return self.builder.build()
            except StaleObservation as exc:
                if time.monotonic() > deadline:
                    raise EpisodeError(f"no fresh observation within {timeout_s:.0f} s: {exc}") from None
                time.sleep(0.01)

    # ------------------------------------------------------------------ chunks

    def _chunk_loop(self, req: EpisodeRequest, report: EpisodeReport, started: float) -> None:
        c = self.chunking
        execute = c.execute or (c.size if c.mode == "sync" else max(1, c.size // 2))
        end = started + req.duration_s
        paused_since: float | None = None
        chunk_id = 0
        while not self.stop_event.is_set() and time.monotonic() < end:
            self._stamp()
            self._check_heartbeats()
            self._check_drivers()
            try:
                obs = self.builder.build()
            except StaleObservation as exc:
                if paused_since is None:
                    paused_since = time.monotonic()
                    self.emit("paused", {"reason": str(exc)})
                self._wait(min(0.02, end - time.monotonic()))
                continue
            if paused_since is not None:
                report.paused_s += time.monotonic() - paused_since
                self.emit("resumed", {"paused_s": time.monotonic() - paused_since})
                paused_since = None
                self._call("resume", self.policy.resume, obs)
            chunk = self._call("infer", self.policy.infer, obs)
            sent_local = time.monotonic_ns()
            latency_s = (sent_local - obs.mono_ns) * 1e-9
            if c.mode == "sync":
                actions, t0_local = chunk.actions[:execute], sent_local + int(c.lead_s * 1e9)
            else:
                actions, t0_local = chunk.actions, obs.mono_ns + int(chunk.dt * 1e9)
            dropped = self._send(actions, t0_local, chunk.dt, req.episode, chunk_id)
            self._latencies.append(latency_s)
            self._all_latencies.append(latency_s)
            report.chunks += 1
            report.dropped_points += dropped
            self.emit("chunk", {"chunk": chunk_id, "latency_ms": latency_s * 1e3, "dropped": dropped,
                                "elapsed_s": time.monotonic() - started})
            chunk_id += 1
            if c.mode == "sync":
                wake = t0_local * 1e-9 + len(actions) * chunk.dt
            else:
                # Start the next inference so it lands before this chunk's executed part ends,
                # using a rolling high percentile of recent latencies (never a stuck warm-up max).
                estimate = float(np.percentile(self._latencies, 90))
                wake = t0_local * 1e-9 + execute * chunk.dt - estimate - 2 * chunk.dt
            self._wait(min(wake, end) - time.monotonic_ns() * 1e-9)
        if paused_since is not None:
            report.paused_s += time.monotonic() - paused_since

    def _send(self, actions: np.ndarray, t0_local_ns: int, dt: float, episode: int, chunk_id: int) -> int:
        dropped, offset = 0, 0
        for link in self.links.values():
            part = np.ascontiguousarray(actions[:, offset:offset + link.dof], dtype=np.float64)
            offset += link.dof
            try:
                reply = link.send_chunk(link.to_driver_ns(t0_local_ns), dt, part, self.chunking.merge, episode,
                                        chunk_id, final=False)
            except TimeoutError as exc:
                self._dead.add(link.name)
                raise EpisodeError(f"driver {link.name} did not answer a chunk: {exc}") from None
            except RemoteError as exc:
                raise EpisodeError(f"driver {link.name} refused a chunk: {exc}") from None
            self._stamp()
            dropped += int(reply.get("dropped", 0))
        return dropped

    def _wait(self, seconds: float) -> None:
        """Sleep while watching the drivers' state (tracking error) and the stop flag."""
        deadline = time.monotonic() + max(0.0, seconds)
        while not self.stop_event.is_set():
            self._tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(STATE_POLL_S, remaining))

    def _check_heartbeats(self) -> None:
        for link in self.links.values():
            if link.heartbeat_error and "no_lease" in link.heartbeat_error:
                raise EpisodeError(f"lost the lease on driver {link.name}: {link.heartbeat_error}")

    def _check_drivers(self) -> None:
        """A driver whose state stream went silent is dead or hung: the episode fails naming it."""
        bound = self.deadlines.driver_silence_s
        for name in self.links:
            silent = self.builder.state_silence_s(name)
            if silent is not None and silent > bound:
                self._dead.add(name)
                raise EpisodeError(f"driver {name} went silent: no state for {silent:.2f} s (bound {bound:.2f} s); "
                                   "it may have died or hung")

    # ------------------------------------------------------------------ report

    def _fill_report(self, report: EpisodeReport, before: dict[str, dict]) -> None:
        try:
            self._fill_counts(report, before)
        except Exception as exc:  # a report with fewer numbers beats an episode thread that vanishes
            log.exception("episode report: could not collect the counters")
            report.outcome += f" (report incomplete: {type(exc).__name__}: {exc})"

    def _fill_counts(self, report: EpisodeReport, before: dict[str, dict]) -> None:
        for name, counters in self.builder.counters.items():
            if counters.rejected:
                report.rejected_inputs[name] = counters.rejected
            if counters.future_stamps:
                report.future_stamps[name] = counters.future_stamps
        lat = np.array(self._all_latencies) * 1e3
        if lat.size:
            report.chunk_latency_p50_ms = float(np.percentile(lat, 50))
            report.chunk_latency_p99_ms = float(np.percentile(lat, 99))
            report.chunk_latency_max_ms = float(lat.max())
        if self._tracking:
            report.tracking_error_max = float(np.max(self._tracking))
            report.tracking_error_mean = float(np.mean(self._tracking))
        for name, link in self.links.items():
            if name not in before or name in self._dead:
                continue
            try:
                after = link.stats()
            except (TimeoutError, RemoteError):
                continue
            b, a = before[name]["counters"], after["counters"]
            ticks = a["ticks"] - b["ticks"]
            report.control_rate_hz[name] = ticks / report.duration_s if report.duration_s > 0 else 0.0
            report.overruns += a["overruns"] - b["overruns"]
            report.starved_ticks += a["starved_ticks"] - b["starved_ticks"]
            report.lease_lost += a["lease_lost"] - b["lease_lost"]
            for kind, count in after["clamps"].items():
                delta = count - before[name]["clamps"].get(kind, 0)
                report.clamps_by_kind[kind] = report.clamps_by_kind.get(kind, 0) + delta
        report.clamps = sum(report.clamps_by_kind.values())
