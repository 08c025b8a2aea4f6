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

Intervention (``intervene`` / ``resume`` on ctl, called from the ctl thread): the runner stops
sending chunks and releases its lease on every driver, which decelerates to a hold; a teleop
client may then take the lease. The episode stays open and its clock runs on: intervened time
counts toward ``duration_s`` (the episode is a window of wall-clock time, as the operator sees
it; the report says how much of it was intervened, so an evaluation can subtract it). On resume
the leases are taken back (refused, naming the holder, while anyone else holds one), the policy
is told to ``resume``, and the next chunk comes from an observation made after the resume.

Realign: whenever the arm holds with no chunk to follow (after an operator's resume, before the
first chunk, after a chunk that came late and was skipped, or when the last chunk ran out before
this one arrived: a policy slower than its chunk), a chunk whose first still-due point is too far
from the commanded pose is not sent: a ramped ``move_to`` brings the arm there first (the driver
plans it within its velocity and acceleration limits and still refuses any far first point of a
chunk), the policy is told to ``resume``, and the next chunk comes from an observation made after
the move. Too far: after a resume, further than the filter should catch up with; otherwise near
what the driver would refuse (nearer starts go as they always did, the filter ramps them: a slow
policy holds before every chunk, and moving to each would replace its chunks by moves). A slow
policy so moves the arm late, in ramped steps, instead of ending the episode. A chunk that starts
far already at its first point (not only because the arm held while it was computed) is the
policy's own jump: at most ``REALIGN_ATTEMPTS`` of those in a row are reached this way, then the
episode fails naming it. A chunk that starts far while the arm was following the last one is never
realigned: the driver refuses it (a jump at a seam is the policy's, not the schedule's).
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
from armada.runtime.protocol import ErrorCode
from armada.runtime.remote.clock import stream_offsets
from armada.runtime.transport import RemoteError

log = logging.getLogger("armada.inference")

Emit = Callable[[str, dict[str, Any]], None]

LATENCY_WINDOW = 20  # chunks in the rolling latency estimate
STATE_POLL_S = 0.005
FIRST_OBSERVATION_S = 3.0
# After an operator's resume, a chunk whose first still-due point is further from the commanded pose
# than a joint covers in this long at its velocity limit is reached with a ramped move_to first: the
# driver refuses a far first point anyway (max_engage_distance), and a nearer one is still a lurch.
REALIGN_AT_FULL_SPEED_S = 0.05
# While the arm holds because the policy was slow, only a chunk starting further than this share of
# max_engage_distance is: what the driver would refuse, with a margin for the pose and the first
# still-due point moving between this check and the driver's.
REALIGN_HELD_FRACTION = 0.75
# Chunks in a row that start far already at their first point (the policy's jump, not the hold's)
# reached with a move_to before the episode fails naming the policy; a chunk the drivers accept
# in between starts the count again.
REALIGN_ATTEMPTS = 3
# And never more than half the driver's max_engage_distance (beyond it the driver refuses the
# chunk). Drivers announce it in their description where they do; else the embodiment default.
DEFAULT_ENGAGE_DISTANCE = 0.2


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
    # Chunks that keep reaching the drivers after their last point's time: the arm holds meanwhile
    # (safe), but an episode that only holds is inference too slow for the chunk, and says so.
    late_s: float = 2.0


class EpisodeError(Exception):
    """The episode could not start or had to end early; the message tells the operator why."""


class InterventionError(Exception):
    """An intervene or resume that cannot happen now; the message says why (ctl: BAD_STATE)."""


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
    late_chunks: int = 0  # chunks not executed: every point was past when they were ready (a slow inference)
    paused_s: float = 0.0
    interventions: int = 0  # times the operator took over (intervene)
    intervened_s: float = 0.0  # seconds under the operator's control, part of duration_s
    realign_moves: int = 0  # ramped move_to's (one per driver) to reach a chunk that started too far while the arm held
    chunk_latency_p50_ms: float = 0.0
    chunk_latency_p99_ms: float = 0.0
    chunk_latency_max_ms: float = 0.0
    tracking_error_max: float = 0.0
    tracking_error_mean: float = 0.0
    rejected_inputs: dict[str, int] = field(default_factory=dict)  # wrong kind or shape, per stream
    future_stamps: dict[str, int] = field(default_factory=dict)  # sender clock ahead of ours, per stream
    # What a policy has to say about the episode (a remote policy: failed requests, failovers, time held).
    policy_notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Realign:
    """One driver's part of a realign: where its chunk's first still-due point is and how far."""

    link: DriverLink
    target: np.ndarray
    gap: np.ndarray  # per joint, from the commanded pose
    bound: np.ndarray  # per joint, beyond which the arm is moved there first
    engage: float  # the driver's max_engage_distance: beyond it, it refuses the chunk
    own: bool  # far already at the chunk's first point: the policy's jump, not the hold's


@dataclass
class _Placed:
    """What became of a chunk: moved to (a realign, with its event), sent (points dropped), or late."""

    moves: dict[str, float] = field(default_factory=dict)  # driver -> move_to seconds
    realign: dict[str, Any] | None = None
    dropped: int = 0
    late: bool = False


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
        self._late_since: float | None = None  # monotonic time of the first of the late chunks in a row
        # Why the arm holds with no chunk to follow (None: it follows one), and when the last chunk
        # sent ends (local monotonic ns; None: none sent this episode). Read under the control lock.
        self._hold_cause: str | None = None
        self._plan_end_ns: int | None = None
        self._hold_realigns = 0  # realigns since the arm last followed a chunk
        # Intervention state, shared with the ctl thread. The lock is held only around lease
        # changes and chunk sends (each bounded by its request timeout), so a chunk never goes
        # out after the lease was given away.
        self._control = threading.Lock()
        self._in_loop = False  # intervene/resume only while the chunk loop runs
        self._intervened_since: float | None = None
        self._resumed_ns: int | None = None  # the next chunk needs an observation newer than this
        self._realign_left = 0
        self._episode = 0
        self._arm_allowed = False
        self.interventions = 0
        self.intervened_s = 0.0
        self.realign_moves = 0

    # ------------------------------------------------------------------ the episode

    def run(self, req: EpisodeRequest) -> EpisodeReport:
        report = EpisodeReport(req.episode, outcome="completed")
        armed_by_us: list[DriverLink] = []
        stats_before: dict[str, dict] = {}
        started = time.monotonic()
        self._episode, self._arm_allowed = req.episode, req.arm
        try:
            self._take_control(req, armed_by_us)
            space = self._action_space()
            self._call("reset", self.policy.reset, space)
            obs = self._first_observation()
            route = self._call("route", self.policy.route, obs, req.instruction, req.task)
            self.emit("route", {"episode": req.episode, "task": route.task, "scores": route.scores,
                                "probabilities": route.probabilities, "margin": route.margin})
            if route.margin < req.min_margin:
                raise EpisodeError(f"router margin {route.margin:.3f} is below the required {req.min_margin:.3f}; "
                                   "pin a task or lower min_margin")
            report.task = route.task
            stats_before = {n: link.stats() for n, link in self.links.items()}
            started = time.monotonic()
            with self._control:
                self._in_loop = True
            try:
                self._chunk_loop(req, report, started)
            finally:
                self._leave_loop()
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
            report.interventions, report.intervened_s = self.interventions, self.intervened_s
            report.realign_moves = self.realign_moves
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
        if self._intervened_since is not None:
            self._check_drivers()
            return  # the operator is moving the arm: not the policy's tracking error
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
            if link.lease is None:
                # Given to the operator by an intervention that the episode's end overtook: whoever
                # holds it now keeps the arm as it is (armed, holding or moving under their control).
                link.stop_heartbeat()
                continue
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
            # Streams from other hosts: their clocks against ours, from the links' synced pings.
            self.builder.poll()
            self.builder.sender_offset_ns = stream_offsets(self.links, self.builder.latest_states, self.builder.cameras)
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
        self._late_since = None
        with self._control:
            self._hold_cause, self._plan_end_ns, self._realign_left = "first chunk", None, REALIGN_ATTEMPTS
            self._hold_realigns = 0
        while not self.stop_event.is_set() and time.monotonic() < end:
            self._stamp()
            if self._intervened_since is not None:
                self._wait(min(0.02, end - time.monotonic()))  # the clock runs on; drivers still watched
                continue
            self._check_heartbeats()
            self._check_drivers()
            resumed_ns = self._resumed_ns
            try:
                obs = self.builder.build()
            except StaleObservation as exc:
                if paused_since is None:
                    paused_since = time.monotonic()
                    self.emit("paused", {"reason": str(exc)})
                self._wait(min(0.02, end - time.monotonic()))
                continue
            if resumed_ns is not None and not self._fresh_since(resumed_ns):
                self._wait(min(STATE_POLL_S, end - time.monotonic()))  # the next chunk needs inputs from after the resume
                continue
            if paused_since is not None:
                report.paused_s += time.monotonic() - paused_since
                self.emit("resumed", {"paused_s": time.monotonic() - paused_since})
                paused_since = None
                self._call("resume", self.policy.resume, obs)
            elif resumed_ns is not None:
                # The operator or a realign's move_to moved the arm: any history is stale.
                self._call("resume", self.policy.resume, obs)
            elif self._late_since is not None:
                # The last chunk came late and was skipped: the arm held where the one before it ended,
                # so a time base or history that assumed it ran on is stale (a scripted motion would
                # otherwise jump ahead by the time it held, and the driver refuse the chunk as too far).
                self._call("resume", self.policy.resume, obs)
            chunk = self._call("infer", self.policy.infer, obs)
            sent_local = time.monotonic_ns()
            latency_s = (sent_local - obs.mono_ns) * 1e-9
            if c.mode == "sync":
                actions, t0_local = chunk.actions[:execute], sent_local + int(c.lead_s * 1e9)
            else:
                actions, t0_local = chunk.actions, obs.mono_ns + int(chunk.dt * 1e9)
            with self._control:
                if self._intervened_since is not None or self._resumed_ns != resumed_ns:
                    continue  # the operator took over while this chunk was computed: it is not sent
                placed = self._place(actions, t0_local, chunk.dt, req.episode, chunk_id)
            self._latencies.append(latency_s)
            self._all_latencies.append(latency_s)
            if placed.moves:
                self.emit("realign", placed.realign or {})
                self._late_since = None  # this chunk was in time: the arm is being moved to it
                chunk_id += 1
                self._wait_for_moves(placed.moves, end)
                continue
            late, dropped = placed.late, placed.dropped
            if late:
                self._on_late_chunk(report, chunk_id, latency_s, len(actions) * chunk.dt)
                chunk_id += 1
                continue  # the drivers hold where the last chunk ended; infer again at once
            self._late_since = None
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

    # ------------------------------------------------------------------ intervention

    def intervene(self) -> int:
        """The operator takes over (ctl thread): no more chunks, every lease released, the
        drivers decelerate to a hold. Returns the episode; raises InterventionError if it cannot."""
        with self._control:
            if not self._in_loop:
                raise InterventionError(f"episode {self._episode} is not running chunks now (starting or ending); "
                                        "intervene once it runs")
            if self._intervened_since is not None:
                raise InterventionError(f"episode {self._episode} is already intervened; resume it first")
            self._intervened_since = time.monotonic()
            self.interventions += 1
            for link in self.links.values():
                if link.name in self._dead or link.lease is None:
                    continue
                token, link.lease = link.lease, None  # heartbeats stop with it
                try:
                    link.request("release", lease=token)  # the driver stops following chunks and holds
                except (TimeoutError, RemoteError) as exc:
                    # Without heartbeats the lease lapses within its TTL and the driver holds anyway.
                    log.warning("driver %s: release for the intervention failed (%s); its lease lapses instead",
                                link.name, exc)
        self.emit("intervention_started", {"episode": self._episode})
        return self._episode

    def resume(self) -> dict[str, Any]:
        """The operator hands back (ctl thread): take every lease again and go on. If any driver's
        lease is still held (the teleop has not released it), or a driver is not armed, nothing is
        taken and InterventionError says which and by whom; the episode stays intervened."""
        with self._control:
            if not self._in_loop:
                raise InterventionError(f"episode {self._episode} is not running chunks now; nothing to resume")
            if self._intervened_since is None:
                raise InterventionError(f"episode {self._episode} is not intervened")
            taken: list[DriverLink] = []
            try:
                for link in self.links.values():
                    if link.name not in self._dead:
                        self._take_back(link)
                        taken.append(link)
            except InterventionError:
                for link in taken:
                    self._give_up(link)
                raise
            for link in taken:
                link.heartbeat_error = None  # refusals of the old token while intervened are not news
            intervened_s = time.monotonic() - self._intervened_since
            self.intervened_s += intervened_s
            self._intervened_since = None
            self._resumed_ns = time.monotonic_ns()
            self._realign_left = REALIGN_ATTEMPTS
            self._hold_cause = "resume"
            self._stamp()
        data = {"episode": self._episode, "intervened_s": intervened_s}
        self.emit("intervention_ended", data | {"resumed": True})
        return data

    def _take_back(self, link: DriverLink) -> None:
        try:
            link.acquire(self.client_name)
        except RemoteError as exc:  # LEASE_HELD names the holder
            raise InterventionError(f"driver {link.name}: {exc.reason}") from None
        except TimeoutError as exc:
            raise InterventionError(f"driver {link.name} did not answer acquire: {exc}") from None
        try:
            status = link.ping()
        except TimeoutError as exc:
            self._give_up(link)
            raise InterventionError(f"driver {link.name} did not answer ping: {exc}") from None
        if status["mode"] not in ("armed", "running") or status.get("disarming"):
            self._give_up(link)
            state = "disarming" if status.get("disarming") else status["mode"]
            # Never armed here: whoever disarmed it during the intervention decides when it arms again.
            raise InterventionError(f"driver {link.name} is {state} after the intervention; arm it, then resume")

    def _give_up(self, link: DriverLink) -> None:
        token, link.lease = link.lease, None
        if token is None:
            return
        try:
            link.request("release", lease=token)
        except (TimeoutError, RemoteError) as exc:
            log.warning("driver %s: release after a refused resume failed (%s); its lease lapses", link.name, exc)

    def _leave_loop(self) -> None:
        """The chunk loop is over: no intervene/resume from now on; an open intervention ends here
        (the operator keeps whatever leases they hold)."""
        with self._control:
            self._in_loop = False
            since, self._intervened_since = self._intervened_since, None
            if since is not None:
                self.intervened_s += time.monotonic() - since
        if since is not None:
            self.emit("intervention_ended", {"episode": self._episode, "intervened_s": time.monotonic() - since,
                                             "resumed": False})

    @property
    def intervened(self) -> bool:
        return self._intervened_since is not None

    def _fresh_since(self, since_ns: int) -> bool:
        """Whether every camera frame and driver state the observation uses arrived after ``since_ns``."""
        arrivals = [self.builder.frame_arrivals.get(n) for n in self.builder.cameras]
        arrivals += [self.builder.state_arrivals.get(n) for n in self.builder.states]
        return all(a is not None and a.mono_ns > since_ns for a in arrivals)

    def _place(self, actions: np.ndarray, t0_local_ns: int, dt: float, episode: int, chunk_id: int) -> _Placed:
        """Under the control lock: a chunk that is over is skipped (late); while the arm holds, one
        that starts too far is reached with a ramped move_to instead (``_realign``); else it goes to
        the drivers."""
        if _ends_before(t0_local_ns, dt, len(actions), time.monotonic_ns() + int(dt * 1e9)):
            self._resumed_ns = None  # equal to what this chunk was made after (checked under this lock)
            self._hold_cause = self._hold_cause or "late chunk"
            return _Placed(late=True)
        cause = self._hold_cause or self._starved(t0_local_ns, dt)
        if cause is not None:
            placed = self._realign(actions, t0_local_ns, dt, cause, chunk_id)
            if placed.moves:
                self._hold_cause = cause  # the arm holds at the move's end until a chunk is sent
                return placed
        self._resumed_ns = None
        dropped, late = self._send(actions, t0_local_ns, dt, episode, chunk_id)
        if late:
            self._hold_cause = self._hold_cause or "late chunk"
        else:
            self._hold_cause, self._hold_realigns = None, 0
            self._plan_end_ns = t0_local_ns + int((len(actions) - 1) * dt * 1e9)
            self._realign_left = REALIGN_ATTEMPTS  # the drivers took a chunk of the policy's: count afresh
        return _Placed(dropped=dropped, late=late)

    def _starved(self, t0_local_ns: int, dt: float) -> str | None:
        """The hold's cause when the last chunk sent ends more than a step before this one's first
        still-due point (the drivers ran dry and hold meanwhile: a policy slower than its chunk), else None."""
        if self._plan_end_ns is None:
            return None
        now = time.monotonic_ns()
        step_ns = int(dt * 1e9)
        first_due = t0_local_ns + max(0, -(-(now - t0_local_ns) // step_ns)) * step_ns
        return "starved" if first_due > self._plan_end_ns + step_ns else None

    def _realign_plans(self, actions: np.ndarray, t0_local_ns: int, dt: float, cause: str) -> list[_Realign]:
        """Each driver whose part of the chunk's first still-due point is further than its bound
        from where the driver is commanded now, with that point and how far it is."""
        first = max(0, int(np.ceil((time.monotonic_ns() - t0_local_ns) / (dt * 1e9))))
        first = min(first, len(actions) - 1)
        plans: list[_Realign] = []
        offset = 0
        for link in self.links.values():
            columns = slice(offset, offset + link.dof)
            offset += link.dof
            state = self.builder.latest_states.get(link.name)
            if state is None or link.name in self._dead:
                continue
            bound, engage = _realign_bound(link.description, cause)
            commanded = np.asarray(state["commanded"])
            target = np.array(actions[first, columns], dtype=np.float64)
            gap = np.abs(target - commanded)
            # A base velocity is not a place: the driver ramps it whatever the gap, and a move_to
            # stops the base (its entries must be 0).
            base = np.array([g["mode"] == "base_velocity" for g in link.description["groups"] for _ in g["joints"]],
                            dtype=bool)
            gap[base], target[base] = 0.0, 0.0
            if np.all(gap <= bound):
                continue
            # Far already at the chunk's first point, on a joint that needs the move: the policy jumped.
            own = bool(np.any((gap > bound) & (np.abs(actions[0, columns] - commanded) > bound)))
            plans.append(_Realign(link, target, gap, bound, engage, own))
        return plans

    def _realign(self, actions: np.ndarray, t0_local_ns: int, dt: float, cause: str, chunk_id: int) -> _Placed:
        """While the arm holds (``cause``: why): a ramped move_to the first still-due point of the
        chunk for each driver whose part starts too far. Returns the moves {driver: seconds} and the
        event's data; no moves when the chunk can go as it is. Called under the control lock."""
        plans = self._realign_plans(actions, t0_local_ns, dt, cause)
        if not plans:
            return _Placed()
        own = any(p.own for p in plans)
        if own and self._realign_left <= 0:
            self._refuse_far_policy(plans)
            return _Placed()  # within the drivers' engage distance: sent as it is, their filters ramp it
        moves: dict[str, float] = {}
        for p in plans:
            worst = int(np.argmax(p.gap / p.bound))
            log.info("driver %s: the arm held (%s) and the chunk starts %.3g from the commanded pose at %s; "
                     "moving there with move_to first", p.link.name, cause, p.gap[worst],
                     p.link.description["joint_names"][worst])
            moves[p.link.name] = self._move_to(p.link, p.target, cause)
        if own:
            self._realign_left -= 1
        self.realign_moves += len(moves)
        self._hold_realigns += 1
        worst_plan = max(plans, key=lambda p: float(np.max(p.gap / p.bound)))
        joint = worst_plan.link.description["joint_names"][int(np.argmax(worst_plan.gap / worst_plan.bound))]
        event = {"episode": self._episode, "chunk": chunk_id, "cause": cause, "moves": moves,
                 "gap": float(np.max(worst_plan.gap)), "joint": f"{worst_plan.link.name}/{joint}",
                 "policy_jump": own, "attempts_left": self._realign_left, "in_a_row": self._hold_realigns}
        return _Placed(moves=moves, realign=event)

    def _refuse_far_policy(self, plans: list[_Realign]) -> None:
        """The attempts are spent and the chunk again starts far at its first point: the episode
        ends naming the policy if a driver would refuse it; else it goes as it is (as before)."""
        for p in plans:
            over = p.gap > p.engage
            if np.any(over):
                j = int(np.argmax(np.where(over, p.gap, -1.0)))
                raise EpisodeError(
                    f"the policy keeps starting its chunks far from the arm: after {REALIGN_ATTEMPTS} ramped "
                    f"move_to's to the start of its chunks, the next one again starts {p.gap[j]:.3g} from the "
                    f"commanded pose at joint {p.link.description['joint_names'][j]} of driver {p.link.name} "
                    f"(the driver refuses more than {p.engage:.3g}); the arm held. Check that the policy "
                    "conditions on the state and that its action layout matches the drivers'")

    def _move_to(self, link: DriverLink, target: np.ndarray, cause: str) -> float:
        """A ramped move_to on one driver (planned by the driver within its limits); its seconds."""
        try:
            reply = link.command("move_to", target=target)
        except TimeoutError as exc:
            self._dead.add(link.name)
            raise EpisodeError(f"driver {link.name} did not answer move_to: {exc}") from None
        except RemoteError as exc:
            raise EpisodeError(f"driver {link.name} refused the move_to a chunk's start ({cause}): {exc}") from None
        return float(reply.get("duration_s", 0.0))

    def _wait_for_moves(self, moves: dict[str, float], end: float) -> None:
        """Until the move_to's have ended (the drivers leave running), an intervention, or the end;
        then the next chunk must come from an observation after the move, the policy resumed."""
        deadline = time.monotonic() + max(moves.values()) + 1.0
        self._wait(min(max(moves.values()), end - time.monotonic()))
        while time.monotonic() < min(deadline, end) and not self.intervened and not self.stop_event.is_set():
            states = self.builder.latest_states
            if all(states.get(n, {}).get("mode") != "running" for n in moves):
                break
            self._wait(STATE_POLL_S)
        with self._control:
            if not self.intervened:
                self._resumed_ns = time.monotonic_ns()  # the next chunk from an observation after the move

    def _on_late_chunk(self, report: EpisodeReport, chunk_id: int, latency_s: float, span_s: float) -> None:
        """A chunk that was over before it could run: counted and skipped; the episode fails only
        when chunks have kept coming late for ``deadlines.late_s``."""
        report.late_chunks += 1
        now = time.monotonic()
        if self._late_since is None:
            self._late_since = now
        self.emit("late", {"chunk": chunk_id, "latency_ms": latency_s * 1e3, "span_ms": span_s * 1e3})
        log.warning("chunk %d came late (inference took %.0f ms, the chunk spans %.0f ms): skipped, the arm holds",
                    chunk_id, latency_s * 1e3, span_s * 1e3)
        if now - self._late_since > self.deadlines.late_s:
            recent = np.array(self._latencies) * 1e3
            raise EpisodeError(
                f"inference is too slow for the chunk: every chunk for {now - self._late_since:.1f} s was over "
                f"before it reached the drivers (latency median {np.median(recent):.0f} ms, the chunk spans "
                f"{span_s * 1e3:.0f} ms); the arm held. Use a longer chunk, a smaller model or a faster device")

    def _send(self, actions: np.ndarray, t0_local_ns: int, dt: float, episode: int,
              chunk_id: int) -> tuple[int, bool]:
        """Sends each driver its part. Returns (points dropped as past, whether a driver found the
        whole chunk past: a late chunk, not a fault)."""
        dropped, offset, late = 0, 0, False
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
                if exc.code == ErrorCode.LATE:
                    late = True  # it reached this driver after its time (a descheduled host): skipped
                    continue
                raise EpisodeError(f"driver {link.name} refused a chunk: {exc}") from None
            self._stamp()
            dropped += int(reply.get("dropped", 0))
        return dropped, late

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
        notes = getattr(self.policy, "episode_notes", None)
        if callable(notes):
            report.policy_notes = notes()


def _realign_bound(description: dict[str, Any], cause: str) -> tuple[np.ndarray, float]:
    """Per joint, how far a chunk may start from the commanded pose before the arm is moved there
    first, and the driver's max_engage_distance: after an operator's resume, what the filter should
    catch up with; while a slow policy holds the arm, near what the driver would refuse."""
    engage = float(description.get("max_engage_distance", DEFAULT_ENGAGE_DISTANCE))
    if cause == "resume":
        return np.minimum(np.asarray(description["max_velocity"]) * REALIGN_AT_FULL_SPEED_S, engage / 2), engage
    return np.full(len(description["max_velocity"]), engage * REALIGN_HELD_FRACTION), engage


def _ends_before(t0_ns: int, dt: float, n_points: int, when_ns: int) -> bool:
    """Whether a chunk's last point is due before ``when_ns``: nothing of it could still run."""
    return t0_ns + int((n_points - 1) * dt * 1e9) < when_ns
