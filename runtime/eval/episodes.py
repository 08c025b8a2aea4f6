"""Episodes on a running simulated cell: reset the scene, bring the arm home, run, judge.

One episode (``SimEpisodes.run``):
1. the arm is brought home through its driver: our own lease, ``arm`` if idle, a ramped
   ``move_to`` (the driver's velocity and acceleration fractions; the arm never jumps), then we
   wait until the driver reports it there, and give the lease back;
2. the scene is reset through the sim's control socket (``reset(task, seed)``: objects only);
   the next state carrying that reset's count marks the scene as fresh;
3. the episode starts with the task's instruction (and ``task=`` when the condition pins it) on
   the inference process, which routes, then streams chunks;
4. we follow the inference events (route, chunks, the report) and the sim driver's state stream
   (``device["sim"]``): ``STOP_AFTER_SUCCESS_S`` after the sim first reports success, the episode
   is stopped; otherwise it ends at its duration. Success = the sim said so within the episode.

Every wait is bounded; a child process that dies fails the episode by name (as in `armada run`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from armada.runtime.eval.plan import STOP_AFTER_SUCCESS_S, SimTask

ARRIVE_TOLERANCE = 0.03  # joint units (rad, gripper fraction): home is reached within this
ARRIVE_SLACK_S = 5.0  # on top of the planned move time (a loaded host runs the sim late)
ACQUIRE_WAIT_S = 3.0  # the inference process releases its lease as an episode ends
FRESH_STATE_S = 3.0  # a state showing the new reset must come within this
REPORT_SLACK_S = 90.0  # past the episode's duration, how long its report may take (a first model call may take 60 s)
HOME_ATTEMPTS = 3
CLIENT = "armada-eval"


class EvalError(RuntimeError):
    """The evaluation cannot go on (a process died, the sim does not answer, the arm cannot go home)."""


class _NotHome(EvalError):
    """One attempt to bring the arm home did not get it there (retried)."""


@dataclass
class EpisodeResult:
    task: str
    condition: str
    seed: int
    episode: int = 0  # the inference process's episode number
    success: bool = False
    time_to_success_s: float | None = None  # sim seconds from the episode's start
    routed_task: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # the router's, per task
    probabilities: dict[str, float] = field(default_factory=dict)
    margin: float | None = None
    outcome: str = ""
    duration_s: float = 0.0
    chunks: int = 0
    chunk_latencies_ms: list[float] = field(default_factory=list)
    chunk_latency_p50_ms: float = 0.0
    chunk_latency_p99_ms: float = 0.0
    clamps: int = 0
    clamps_by_kind: dict[str, int] = field(default_factory=dict)
    home_s: float = 0.0  # wall seconds spent bringing the arm home first

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


OnSuccess = Callable[[int], None]  # called with the inference episode number, once, when the sim reports success


class SimEpisodes:
    """Runs judged episodes on a started cell (CellProcesses with every process answering)."""

    def __init__(self, procs: Any, sim_driver: str, control: Any):
        from armada.runtime.inference.client import EpisodeClient
        from armada.runtime.inference.link import DriverLink

        self.procs, self.cell, self.control = procs, procs.cell, control
        self.sim_driver = sim_driver
        self.client = EpisodeClient(procs.ctx, self.cell)
        self.links = {d.name: DriverLink(procs.ctx, d, self.cell.curve, timeout_s=1.0) for d in self.cell.drivers}
        self.homes = {d.name: np.asarray(self.cell.embodiment(d).home, dtype=np.float64) for d in self.cell.drivers}
        for name, link in self.links.items():
            try:
                link.handshake()
            except Exception as exc:
                raise EvalError(f"driver {name} does not answer the handshake: {exc}") from None

    def close(self) -> None:
        self.client.close()
        for link in self.links.values():
            link.close()

    # ------------------------------------------------------------------ one episode

    def run(self, task: SimTask, seed: int, condition: str, duration_s: float, pin: str | None = None,
            on_success: OnSuccess | None = None) -> EpisodeResult:
        result = EpisodeResult(task.name, condition, seed)
        t = time.monotonic()
        self.home()
        result.home_s = time.monotonic() - t
        resets = self._reset(task.name, seed)
        episode = self._start(task.instruction, duration_s, pin)
        result.episode = episode
        report = self._follow(episode, resets, duration_s, result, on_success)
        self._fill(result, report)
        return result

    def _reset(self, task: str, seed: int) -> int:
        try:
            self.control.reset(task, seed)
            resets = int(self.control.state()["resets"])
        except Exception as exc:
            raise EvalError(f"the sim did not reset to task {task!r}, seed {seed}: {exc}") from None
        deadline = time.monotonic() + FRESH_STATE_S
        link = self.links[self.sim_driver]
        while time.monotonic() < deadline:
            self._check_children()
            msg = link.state.recv(0.1)
            sim = _sim(msg)
            if sim is not None and int(sim.get("resets", -1)) >= resets:
                return resets
        raise EvalError(f"driver {self.sim_driver}'s state showed no reset #{resets} within {FRESH_STATE_S:.0f} s "
                        "(is its state stream carrying device['sim']?)")

    def _start(self, instruction: str, duration_s: float, pin: str | None) -> int:
        from armada.runtime.transport import RemoteError

        try:
            return self.client.start(instruction, duration_s=duration_s, arm=True, task=pin)
        except (TimeoutError, RemoteError) as exc:
            why = "; ".join(w for _, w in self.procs.dead()) or str(exc)
            raise EvalError(f"the episode did not start: {why}") from None

    def _follow(self, episode: int, resets: int, duration_s: float, result: EpisodeResult,
                on_success: OnSuccess | None) -> dict[str, Any]:
        link = self.links[self.sim_driver]
        deadline = time.monotonic() + duration_s + REPORT_SLACK_S
        sim_t0: float | None = None
        success_at: float | None = None
        stop_sent = False
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            self._check_children()
            for msg in _drain(link.state):
                sim = _sim(msg)
                if sim is None or int(sim.get("resets", -1)) < resets:
                    continue
                if sim_t0 is None:
                    sim_t0 = float(sim["time_s"])
                if sim.get("success") and success_at is None:
                    success_at = time.monotonic()
                    result.success = True
                    result.time_to_success_s = float(sim["time_s"]) - sim_t0
                    if on_success is not None:
                        on_success(episode)
            if success_at is not None and not stop_sent and time.monotonic() - success_at >= STOP_AFTER_SUCCESS_S:
                self._stop("the sim reports success")
                stop_sent = True
            msg = self.client.events.recv(0.02)
            if msg is None:
                if time.monotonic() - quiet_since > 1.0:
                    quiet_since = time.monotonic()
                    report = self._status_report(episode)  # the ended event may have been missed
                    if report is not None:
                        return report
                continue
            quiet_since = time.monotonic()
            data = msg.get("data") or {}
            event = msg.get("event")
            if event == "route" and data.get("episode") == episode:
                result.routed_task = str(data.get("task"))
                result.scores = {str(k): float(v) for k, v in (data.get("scores") or {}).items()}
                result.probabilities = {str(k): float(v) for k, v in (data.get("probabilities") or {}).items()}
                result.margin = float(data["margin"]) if data.get("margin") is not None else None
            elif event == "chunk" and "latency_ms" in data:
                result.chunk_latencies_ms.append(float(data["latency_ms"]))
            elif event == "episode_ended" and data.get("episode") == episode:
                return data
        self._stop("armada eval: the episode did not end in time")
        raise EvalError(f"episode {episode} sent no report within {duration_s + REPORT_SLACK_S:.0f} s")

    def _fill(self, result: EpisodeResult, report: dict[str, Any]) -> None:
        result.outcome = str(report.get("outcome", ""))
        result.duration_s = float(report.get("duration_s", 0.0))
        result.chunks = int(report.get("chunks", 0))
        result.chunk_latency_p50_ms = float(report.get("chunk_latency_p50_ms", 0.0))
        result.chunk_latency_p99_ms = float(report.get("chunk_latency_p99_ms", 0.0))
        result.clamps = int(report.get("clamps", 0))
        result.clamps_by_kind = {k: int(v) for k, v in (report.get("clamps_by_kind") or {}).items()}
        if result.routed_task is None and report.get("task"):
            result.routed_task = str(report["task"])  # the route event was missed; the report has the task

    def _stop(self, reason: str) -> None:
        from armada.runtime.transport import RemoteError

        try:
            self.client.stop(reason)
        except (TimeoutError, RemoteError):
            pass  # it ended by itself meanwhile, or it died: the follow loop sees either

    def _status_report(self, episode: int) -> dict[str, Any] | None:
        from armada.runtime.transport import RemoteError

        try:
            status = self.client.ctl.request("status", timeout_s=1.0)
        except (TimeoutError, RemoteError):
            return None
        report = status.get("last_report")
        if not status.get("running") and report and report.get("episode") == episode:
            return report
        return None

    def broken(self) -> bool:
        """Whether a child process died (the cell must be restarted to go on)."""
        return bool(self.procs.dead())

    def _check_children(self) -> None:
        dead = self.procs.dead()
        if dead:
            raise EvalError("; ".join(why for _, why in dead) + f" (logs in {self.procs.run_dir / 'logs'})")

    # ------------------------------------------------------------------ home

    def home(self) -> None:
        """Every driver to its embodiment's home, one at a time, through the driver's own move_to."""
        for name, link in self.links.items():
            for attempt in range(1, HOME_ATTEMPTS + 1):
                try:
                    self._home_one(name, link)
                    break
                except _NotHome as exc:
                    # On a loaded host a heartbeat can come late and the lease lapse mid-move: the
                    # driver then holds where it is. Take the lease again and move on from there.
                    if attempt == HOME_ATTEMPTS:
                        raise EvalError(f"{exc} ({HOME_ATTEMPTS} attempts)") from None
                    print(f"eval: {exc}; moving home again", flush=True)

    def _home_one(self, name: str, link: Any) -> None:
        from armada.runtime.transport import RemoteError

        home = self.homes[name]
        self._acquire(name, link)
        link.start_heartbeat(self.cell.inference.heartbeat_s, lambda: True)
        try:
            mode = link.mode()
            if mode == "idle":
                link.command("arm")
            elif mode not in ("armed", "running"):
                raise EvalError(f"driver {name} is {mode}: `armada status` says why; the evaluation stops")
            since_ns = int(link.ping()["mono_ns"])
            measured = self._measured(name, link, since_ns, 2.0)
            if np.max(np.abs(measured - home)) <= ARRIVE_TOLERANCE:
                return
            reply = link.request("move_to", timeout_s=5.0, lease=link.lease, target=np.ascontiguousarray(home))
            self._wait_arrival(name, link, home, since_ns, float(reply.get("duration_s", 0.0)) + ARRIVE_SLACK_S)
        except (TimeoutError, RemoteError) as exc:
            raise _NotHome(f"driver {name}: bringing the arm home failed: {exc}") from None
        finally:
            lost = link.heartbeat_error
            try:
                link.command("release")
            except Exception:
                pass  # the lease lapses within its TTL anyway; the arm holds
            link.stop_heartbeat()
            link.lease = None
            if lost:
                print(f"eval: driver {name}: a heartbeat was refused while moving home ({lost})", flush=True)

    def _acquire(self, name: str, link: Any) -> None:
        from armada.runtime.transport import RemoteError

        deadline = time.monotonic() + ACQUIRE_WAIT_S
        while True:
            try:
                link.acquire(CLIENT)
                return
            except RemoteError as exc:
                if exc.code != "lease_held" or time.monotonic() > deadline:
                    raise EvalError(f"driver {name}: cannot take the lease to bring the arm home: {exc}") from None
            except TimeoutError as exc:
                raise EvalError(f"driver {name}: {exc}") from None
            time.sleep(0.05)

    def _measured(self, name: str, link: Any, since_ns: int, timeout_s: float) -> np.ndarray:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = link.state.recv(0.1)
            if msg is not None and int(msg["mono_ns"]) >= since_ns:
                return np.asarray(msg["measured"], dtype=np.float64)
        raise EvalError(f"driver {name} published no state within {timeout_s:.0f} s")

    def _wait_arrival(self, name: str, link: Any, home: np.ndarray, since_ns: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        err = np.full(len(home), np.inf)
        while time.monotonic() < deadline:
            self._check_children()
            msg = link.state.recv(0.1)
            if msg is None or int(msg["mono_ns"]) < since_ns:
                continue
            if msg["mode"] not in ("armed", "running"):
                raise EvalError(f"driver {name} went {msg['mode']} while moving home")
            err = np.abs(np.asarray(msg["measured"], dtype=np.float64) - home)
            if msg["mode"] == "armed" and np.all(err <= ARRIVE_TOLERANCE):
                return
        j = int(np.argmax(err))
        raise _NotHome(f"driver {name} did not reach home within {timeout_s:.1f} s (joint {j} is {err[j]:.3f} away; "
                        f"last state {msg and {k: msg.get(k) for k in ('mode', 'measured', 'commanded')}})")


def _sim(msg: dict[str, Any] | None) -> dict[str, Any] | None:
    if msg is None:
        return None
    sim = (msg.get("device") or {}).get("sim")
    return sim if isinstance(sim, dict) else None


def _drain(sub: Any, limit: int = 500) -> list[dict[str, Any]]:
    """Every state message queued now (bounded), without waiting."""
    out = []
    for _ in range(limit):
        msg = sub.recv(0.0)
        if msg is None:
            break
        out.append(msg)
    return out
