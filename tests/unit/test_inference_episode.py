"""The episode loop against a scriptable driver: deadlines, one connection, bad streams, silence,
late chunks, and the realign (a ramped move_to the chunk's start while the arm holds)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from armada.runtime.config import ChunkingConfig, DriverConfig, load_embodiment
from armada.runtime.inference.episode import (REALIGN_ATTEMPTS, Deadlines, EpisodeReport, EpisodeRequest,
                                              EpisodeRunner)
from armada.runtime.inference.link import DriverLink
from armada.runtime.inference.observation import ObservationBuilder
from armada.runtime.inference.policy import ScriptedPolicy
from armada.runtime.protocol import ErrorCode
from tests.unit.test_inference_fakes import FakeDriver

CHUNKING = ChunkingConfig(size=10, dt=0.02, mode="async", execute=5)
MOVE_S = 0.3  # how long the fake's move_to takes


class PlayingFakeDriver(FakeDriver):
    """The fake driver with a pose, as the real driver keeps one: it follows the chunk it was sent
    (the point due now; the last one once the chunk is over: the arm holds there), refuses a chunk
    whose first still-due point is further than max_engage_distance from it (TOO_FAR, as the real
    driver does), ramps a move_to linearly over MOVE_S, and holds where it is on release."""

    def __init__(self, ctx, cmd: str, state: str, embodiment: str = "mock_arm"):
        emb = load_embodiment(embodiment)
        self.pose = (emb.lower + emb.upper) / 2  # set before the fake's thread starts publishing it
        self.base = np.array([g.mode == "base_velocity" for g in emb.groups for _ in g.joints])
        self.chunk: tuple[int, float, np.ndarray] | None = None
        self.move: tuple[int, np.ndarray, np.ndarray] | None = None
        self.move_targets: list[np.ndarray] = []
        self.refused: list[float] = []  # gaps of the chunks refused as too far
        super().__init__(ctx, cmd, state, embodiment)

    def pose_now(self, now_ns: int) -> np.ndarray:
        if self.move is not None:
            start_ns, start, target = self.move
            done = (now_ns - start_ns) / (MOVE_S * 1e9)
            if done < 1.0:
                return start + done * (target - start)
            self.pose, self.move = target, None
            if self.mode == "running":
                self.mode = "armed"  # the move is over: the real driver leaves running too
        elif self.chunk is not None and now_ns >= self.chunk[0]:
            t0, dt, points = self.chunk
            self.pose = points[min(int((now_ns - t0) / (dt * 1e9)), len(points) - 1)]
        return self.pose.copy()

    def _publish(self) -> None:
        q = self.pose_now(time.monotonic_ns())
        self.pub.publish("state", mono_ns=time.monotonic_ns(), mode=self.mode, measured=q, requested=q, commanded=q,
                         velocity=np.zeros_like(q), counters={})
        if self.garbage.is_set():
            self.pub.publish("event", event="not a state", data={})
            self.pub.publish("state", mono_ns=time.monotonic_ns(), mode=self.mode, measured=np.zeros(len(q) + 3),
                             requested=q, commanded=np.zeros(1), velocity=np.zeros_like(q), counters={})

    def _serve(self, req) -> None:
        msg = req.msg if req.error is None else None
        if msg is None or msg.get("lease", self.lease) != self.lease:
            super()._serve(req)
            return
        now = time.monotonic_ns()
        if msg["kind"] == "move_to":
            self.requests.append((time.monotonic(), "move_to", req.identity))
            target = np.asarray(msg["target"], dtype=np.float64)
            self.move_targets.append(target)
            if np.any(target[self.base] != 0.0):  # as the driver: move_to moves the position groups only
                self.server.reply_error(req, ErrorCode.BAD_VALUE, "move_to: the base entries of the target must be 0")
                return
            self.move, self.chunk, self.mode = (now, self.pose_now(now), target), None, "running"
            self.server.reply_ok(req, duration_s=MOVE_S)
            return
        if msg["kind"] == "release":
            self.pose, self.move, self.chunk = self.pose_now(now), None, None  # hold where it is
        if msg["kind"] == "trajectory" and self.late_replies == 0:
            points, t0, dt = np.asarray(msg["points"], dtype=np.float64), msg["t0_ns"], float(msg["dt"])
            first = max(0, int(np.ceil((now - t0) / (dt * 1e9))))
            if first < len(points):
                gap = float(np.max(np.where(self.base, 0.0, np.abs(points[first] - self.pose_now(now)))))
                if gap > self.emb.max_engage_distance:
                    self.requests.append((time.monotonic(), "trajectory", req.identity))
                    self.refused.append(gap)
                    self.server.reply_error(req, ErrorCode.TOO_FAR, f"first target is {gap:.4g} from "
                                                                    "the current pose; use move_to, which ramps")
                    return
                self.pose, self.move, self.chunk = self.pose_now(now), None, (t0, dt, points)
        super()._serve(req)


class HangingPolicy(ScriptedPolicy):
    """The scripted motion, except that call number ``hang_at`` of ``hang_in`` never returns
    (until the test lets it go), or raises ``raise_exc``."""

    def __init__(self, hang_in: str = "infer", hang_at: int = 2, raise_exc: Exception | None = None):
        super().__init__(0.1, 0.25, CHUNKING.size, CHUNKING.dt)
        self.hang_in, self.hang_at, self.raise_exc = hang_in, hang_at, raise_exc
        self.calls = 0
        self.release = threading.Event()

    def infer(self, obs):
        if self.hang_in == "infer":
            self._maybe_hang()
        return super().infer(obs)

    def _maybe_hang(self) -> None:
        self.calls += 1
        if self.calls == self.hang_at:
            if self.raise_exc is not None:
                raise self.raise_exc
            self.release.wait(60)


def _cell(ctx, short_tmp, embodiment: str):
    cmd, state = f"ipc://{short_tmp}/arm-cmd", f"ipc://{short_tmp}/arm-state"
    driver = PlayingFakeDriver(ctx, cmd, state, embodiment)
    link = DriverLink(ctx, DriverConfig(name="arm", embodiment=embodiment, backend={"kind": "mock"}, cmd=cmd, state=state),
                      None)
    link.handshake()
    builder = ObservationBuilder({}, {"arm": link.state}, max_frame_age_s=0.5, max_state_age_s=0.2,
                                 state_dof={"arm": link.dof})
    time.sleep(0.1)  # let the state subscriber join
    return driver, link, builder


@pytest.fixture
def cell(ctx, short_tmp):
    driver, link, builder = _cell(ctx, short_tmp, "mock_arm")
    yield driver, link, builder
    link.close()
    driver.close()


@pytest.fixture
def base_cell(ctx, short_tmp):
    """A mobile manipulator (two arms, a lift and an omni base whose actions are velocities)."""
    driver, link, builder = _cell(ctx, short_tmp, "arx_lift2")
    yield driver, link, builder
    link.close()
    driver.close()


def _run(cell, policy, duration_s: float, deadlines: Deadlines, during=None, join_s: float = 10.0,
         events: list[tuple[str, dict]] | None = None, chunking: ChunkingConfig = CHUNKING):
    """Run one episode in a thread (as the inference process does); returns (report, runner, seconds).
    The runner's events go to ``events`` when given."""
    driver, link, builder = cell
    events = [] if events is None else events
    runner = EpisodeRunner({"arm": link}, builder, policy, chunking, heartbeat_s=0.02,
                           emit=lambda e, d: events.append((e, d)), deadlines=deadlines)
    out: list[EpisodeReport] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: out.append(runner.run(EpisodeRequest(1, "wave", duration_s, arm=True))),
                              daemon=True)
    thread.start()
    if during is not None:
        during(runner)
    thread.join(join_s)
    policy.release.set()
    assert not thread.is_alive(), "the episode did not end"
    return out[0], runner, time.monotonic() - started


def test_a_hung_policy_fails_the_episode_naming_the_call_and_the_lease_is_released(cell):
    driver = cell[0]
    policy = HangingPolicy("infer", hang_at=3)
    report, _, took = _run(cell, policy, 30.0, Deadlines(policy_s=0.5, first_policy_s=5.0))
    assert report.outcome.startswith("failed"), report.outcome
    assert "infer" in report.outcome and "0.5 s" in report.outcome, report.outcome
    assert report.chunks == 2
    assert took < 5.0, took  # the deadline, not the episode's 30 s
    kinds = driver.kinds()
    assert "release" in kinds and "disarm" in kinds  # motion stops, control is handed back
    assert driver.lease is None


def test_episode_stop_ends_an_episode_whose_policy_hangs(cell):
    driver = cell[0]
    policy = HangingPolicy("infer", hang_at=2)
    stopped_at: list[float] = []

    def stop_soon(runner):
        time.sleep(1.0)
        stopped_at.append(time.monotonic())
        runner.stop_event.set()

    report, _, _ = _run(cell, policy, 30.0, Deadlines(policy_s=30.0, first_policy_s=30.0), during=stop_soon)
    assert report.outcome == "stopped", report.outcome
    assert time.monotonic() - stopped_at[0] < 3.0
    assert "release" in driver.kinds()


def test_heartbeats_stop_when_the_episode_loop_stops_making_progress(cell):
    driver, _, builder = cell
    stuck = threading.Event()
    real_poll = builder.poll

    def poll_that_sticks():
        if stuck.is_set():
            time.sleep(3.0)  # the loop is stuck somewhere that has no deadline of its own
        real_poll()

    builder.poll = poll_that_sticks
    policy = HangingPolicy("none")

    def stick(runner):
        time.sleep(0.8)
        stuck.set()
        time.sleep(1.5)
        runner.stop_event.set()

    _run(cell, policy, 30.0, Deadlines(progress_s=0.15), during=stick)
    beats = driver.times("heartbeat")
    stuck_at = driver.times("acquire")[0] + 0.8
    assert [t for t in beats if t < stuck_at], "no heartbeats while the loop made progress"
    # A little after the loop stopped (progress bound plus a beat), the heartbeats stop too.
    late = [t for t in beats if stuck_at + 0.6 < t < stuck_at + 1.5]
    assert not late, f"{len(late)} heartbeats while the loop was stuck"


def test_acquire_heartbeats_and_chunks_share_one_connection(cell):
    driver = cell[0]
    report, _, _ = _run(cell, HangingPolicy("none"), 1.0, Deadlines())
    assert report.outcome == "completed", report.outcome
    assert driver.times("heartbeat") and driver.times("trajectory")
    # The driver binds the lease to the connection that acquired it.
    assert len(driver.identities("acquire", "heartbeat", "trajectory", "arm", "release")) == 1


def test_messages_of_another_kind_or_shape_on_the_state_stream_are_counted_and_ignored(cell):
    driver = cell[0]
    driver.garbage.set()
    report, _, _ = _run(cell, HangingPolicy("none"), 1.0, Deadlines())
    assert report.outcome == "completed", report.outcome
    assert report.chunks >= 3
    assert report.rejected_inputs["arm"] > 50, report.rejected_inputs


def test_an_unexpected_exception_ends_the_episode_as_failed_with_the_exception(cell):
    driver = cell[0]
    policy = HangingPolicy("infer", hang_at=2, raise_exc=ZeroDivisionError("the model divided by zero"))
    report, _, _ = _run(cell, policy, 10.0, Deadlines())
    assert report.outcome.startswith("failed"), report.outcome
    assert "ZeroDivisionError" in report.outcome and "divided by zero" in report.outcome
    assert "release" in driver.kinds()


def test_a_driver_that_goes_silent_fails_the_episode_by_name(cell):
    driver = cell[0]

    def go_silent(runner):
        time.sleep(0.8)
        driver.silent.set()

    report, _, took = _run(cell, HangingPolicy("none"), 20.0, Deadlines(driver_silence_s=0.5), during=go_silent)
    assert report.outcome.startswith("failed"), report.outcome
    assert "driver arm" in report.outcome, report.outcome
    assert took < 6.0, took


def test_a_new_episode_is_refused_while_a_hung_call_from_the_last_one_still_runs(cell):
    policy = HangingPolicy("infer", hang_at=2)
    driver, link, builder = cell
    runner = EpisodeRunner({"arm": link}, builder, policy, CHUNKING, heartbeat_s=0.02, emit=lambda e, d: None,
                           deadlines=Deadlines(policy_s=0.3))
    first = runner.run(EpisodeRequest(1, "wave", 10.0, arm=True))
    second = EpisodeRunner({"arm": link}, builder, policy, CHUNKING, heartbeat_s=0.02, emit=lambda e, d: None,
                           deadlines=Deadlines(policy_s=0.3), caller=runner.caller).run(
        EpisodeRequest(2, "wave", 1.0, arm=True))
    policy.release.set()
    assert "infer" in first.outcome and first.outcome.startswith("failed")
    assert second.outcome.startswith("failed") and "has not returned" in second.outcome, second.outcome
    assert np.isfinite(second.duration_s)


class SlowPolicy(HangingPolicy):
    """The scripted motion; the infer calls numbered in ``slow_calls`` (all when None) take ``seconds``."""

    def __init__(self, seconds: float, slow_calls: set[int] | None = None):
        super().__init__("none")
        self.seconds, self.slow_calls, self.infers = seconds, slow_calls, 0

    def infer(self, obs):
        self.infers += 1
        if self.slow_calls is None or self.infers in self.slow_calls:
            time.sleep(self.seconds)
        return super().infer(obs)


def test_a_chunk_that_is_over_before_it_is_ready_is_skipped_and_the_episode_goes_on(cell):
    driver = cell[0]
    span_s = CHUNKING.size * CHUNKING.dt
    policy = SlowPolicy(span_s + 0.15, slow_calls={3})
    report, _, _ = _run(cell, policy, 1.5, Deadlines(policy_s=2.0))
    assert report.outcome == "completed", report.outcome
    assert report.late_chunks == 1, report
    assert report.chunks >= 4
    # The late chunk never reached the driver: one trajectory per sent chunk.
    assert driver.kinds().count("trajectory") == report.chunks


class CountingResumes(SlowPolicy):
    def __init__(self, seconds: float, slow_calls: set[int]):
        super().__init__(seconds, slow_calls)
        self.calls: list[str] = []

    def resume(self, obs):
        self.calls.append("resume")
        super().resume(obs)

    def infer(self, obs):
        self.calls.append("infer")
        return super().infer(obs)


def test_after_a_late_chunk_the_policy_resumes_from_where_the_arm_held(cell):
    # The arm held while the late chunk was computed: the next chunk must start from there (a scripted
    # motion that ran on by its own clock would start far ahead, and the driver refuse it as too far).
    span_s = CHUNKING.size * CHUNKING.dt
    policy = CountingResumes(span_s + 0.15, slow_calls={3})
    report, _, _ = _run(cell, policy, 1.5, Deadlines(policy_s=2.0))
    assert report.outcome == "completed", report.outcome
    assert report.late_chunks == 1, report
    assert policy.calls[:4] == ["infer", "infer", "infer", "resume"], policy.calls
    assert policy.calls.count("resume") == 1, policy.calls


def test_a_driver_that_finds_the_chunk_late_skips_it_without_failing_the_episode(cell):
    driver = cell[0]
    driver.late_replies = 2
    report, _, _ = _run(cell, HangingPolicy("none"), 1.5, Deadlines())
    assert report.outcome == "completed", report.outcome
    assert report.late_chunks == 2, report
    assert report.chunks >= 3


def test_inference_that_is_always_slower_than_the_chunk_fails_saying_so_and_the_arm_holds(cell):
    driver = cell[0]
    span_s = CHUNKING.size * CHUNKING.dt
    report, _, took = _run(cell, SlowPolicy(span_s + 0.1), 30.0, Deadlines(policy_s=2.0, late_s=1.0))
    assert report.outcome.startswith("failed: inference is too slow for the chunk"), report.outcome
    assert "the chunk spans 200 ms" in report.outcome, report.outcome
    assert report.chunks == 0 and report.late_chunks >= 3
    assert "trajectory" not in driver.kinds()  # nothing late was ever sent
    assert "release" in driver.kinds()
    assert took < 10.0, took


# ---------------------------------------------------------------------- realign while the arm holds


class ShiftedChunks(HangingPolicy):
    """The scripted motion; the chunks of the infer calls numbered in ``shifted`` (all when None) are
    moved ``shift`` rad on the first joint, every point (they start far from the arm already at their
    first point: the policy's own jump), and the calls in ``slow`` take ``slow_s`` first."""

    def __init__(self, shifted: set[int] | None, shift: float = 0.3, slow: frozenset[int] = frozenset(),
                 slow_s: float = 0.0):
        super().__init__("none")
        self.shifted, self.shift, self.slow, self.slow_s = shifted, shift, slow, slow_s
        self.infers = 0

    def infer(self, obs):
        self.infers += 1
        if self.infers in self.slow:
            time.sleep(self.slow_s)
        chunk = super().infer(obs)
        if self.shifted is None or self.infers in self.shifted:
            chunk.actions[:, 0] += self.shift
        return chunk


class FastSlowFirstChunk(HangingPolicy):
    """The first chunk takes 0.1 s and runs the first joint away from the observed pose at 3 rad/s:
    it starts at the arm, but by the time it is ready its first still-due point is 0.3 rad or more on
    (latency, not a jump: the bench's slow scripted policy at 50 Hz). Then the scripted motion."""

    def __init__(self):
        super().__init__("none")
        self.infers = 0

    def infer(self, obs):
        self.infers += 1
        chunk = super().infer(obs)
        if self.infers == 1:
            time.sleep(0.1)  # well inside the chunk's 0.2 s: under load it is still not late
            chunk.actions[:, 0] = obs.state[0] + 3.0 * CHUNKING.dt * np.arange(1, CHUNKING.size + 1)
        return chunk


def _realigns(events: list[tuple[str, dict]]) -> list[dict]:
    return [d for e, d in events if e == "realign"]


def _center_of(embodiment: str) -> np.ndarray:
    emb = load_embodiment(embodiment)
    return (emb.lower + emb.upper) / 2


def _center() -> np.ndarray:
    return _center_of("mock_arm")


def test_after_a_late_chunk_a_chunk_that_starts_far_is_reached_with_move_to_and_the_episode_goes_on(cell):
    driver = cell[0]
    span_s = CHUNKING.size * CHUNKING.dt
    # Call 3 is late (skipped, the arm holds); call 4, made after it, starts 0.3 rad away: the driver
    # would refuse it (0.2), so the runner moves the arm there with move_to first, then goes on.
    policy = ShiftedChunks({4}, slow=frozenset({3}), slow_s=span_s + 0.15)
    events: list[tuple[str, dict]] = []
    report, _, _ = _run(cell, policy, 2.0, Deadlines(policy_s=2.0), events=events)
    assert report.outcome == "completed", report.outcome
    assert report.late_chunks == 1 and report.realign_moves == 1, report
    assert driver.refused == [], driver.refused  # nothing far reached the driver
    [realign] = _realigns(events)
    assert realign["cause"] == "late chunk" and realign["policy_jump"] and realign["joint"] == "arm/shoulder_pan"
    assert realign["attempts_left"] == REALIGN_ATTEMPTS - 1 and 0.25 < realign["gap"] < 0.35, realign
    assert realign["moves"] == {"arm": MOVE_S}
    # The move went to the shifted chunk: 0.3 rad on from where the arm held, on the first joint.
    offset = driver.move_targets[0] - _center()
    assert 0.28 < offset[0] < 0.45 and np.all(np.abs(offset[1:]) < 0.1), offset
    t_move = driver.times("move_to")[0]
    sent = driver.times("trajectory")
    assert not [t for t in sent if t_move < t < t_move + MOVE_S - 0.02]  # nothing while it moved
    assert len([t for t in sent if t > t_move]) >= 3  # the episode went on from there
    assert report.chunks == len(sent)


def test_after_a_late_chunk_a_start_within_the_drivers_reach_goes_as_it_always_did(cell):
    # A slow policy holds before every chunk: only starts the driver would refuse are moved to, or
    # its chunks would all be replaced by moves (0.12 rad: the driver takes it, its filter ramps it).
    driver = cell[0]
    span_s = CHUNKING.size * CHUNKING.dt
    policy = ShiftedChunks({4}, shift=0.12, slow=frozenset({3}), slow_s=span_s + 0.15)
    events: list[tuple[str, dict]] = []
    report, _, _ = _run(cell, policy, 1.5, Deadlines(policy_s=2.0), events=events)
    assert report.outcome == "completed", report.outcome
    assert report.late_chunks == 1 and report.realign_moves == 0 and not _realigns(events), report
    assert "move_to" not in driver.kinds() and driver.refused == []
    assert report.chunks >= 4


def test_a_first_chunk_that_is_far_by_the_time_it_is_ready_is_reached_with_move_to(cell):
    driver = cell[0]
    events: list[tuple[str, dict]] = []
    report, _, _ = _run(cell, FastSlowFirstChunk(), 1.5, Deadlines(), events=events)
    assert report.outcome == "completed", report.outcome
    assert report.realign_moves == 1 and driver.refused == [], (report, driver.refused)
    [realign] = _realigns(events)
    assert realign["cause"] == "first chunk", realign
    # It started at the arm: latency, not a jump, so it spends none of the attempts.
    assert not realign["policy_jump"] and realign["attempts_left"] == REALIGN_ATTEMPTS, realign
    offset = driver.move_targets[0] - _center()
    assert 0.25 < offset[0] < 0.65 and np.all(np.abs(offset[1:]) < 0.05), offset
    assert driver.kinds().index("move_to") < driver.kinds().index("trajectory")  # the first chunk went nowhere
    assert report.chunks >= 3


def test_a_policy_that_keeps_starting_far_ends_the_episode_naming_it_after_the_attempts(cell):
    driver = cell[0]
    events: list[tuple[str, dict]] = []
    report, _, took = _run(cell, ShiftedChunks(None), 10.0, Deadlines(), events=events)
    assert report.outcome.startswith("failed: the policy keeps starting its chunks far from the arm"), report.outcome
    assert f"after {REALIGN_ATTEMPTS} ramped move_to's" in report.outcome, report.outcome
    assert "shoulder_pan of driver arm" in report.outcome, report.outcome
    assert report.realign_moves == REALIGN_ATTEMPTS, report
    assert [d["attempts_left"] for d in _realigns(events)] == list(range(REALIGN_ATTEMPTS - 1, -1, -1))
    assert "trajectory" not in driver.kinds() and report.chunks == 0  # no far chunk was ever sent
    assert "release" in driver.kinds()
    assert took < 6.0, took


def test_an_intervention_during_a_realign_wins(cell):
    driver = cell[0]
    marks: dict[str, float] = {}

    def operator(runner):
        deadline = time.monotonic() + 5.0
        while not driver.times("move_to") and time.monotonic() < deadline:
            time.sleep(0.005)
        runner.intervene()
        marks["intervened"] = time.monotonic()
        assert driver.lease is None and driver.move is None  # released: the driver holds where it is
        time.sleep(0.4)
        marks["resumed"] = time.monotonic()
        runner.resume()

    report, _, _ = _run(cell, ShiftedChunks({1}), 2.0, Deadlines(), during=operator)
    assert report.outcome == "completed", report.outcome
    t_move = driver.times("move_to")[0]
    assert marks["intervened"] < t_move + MOVE_S, "the intervention came after the move ended"
    assert report.interventions == 1 and report.realign_moves == 1, report
    while_intervened = [t for t, k, _ in driver.requests if k in ("trajectory", "move_to")
                        and marks["intervened"] <= t <= marks["resumed"]]
    assert not while_intervened
    assert [t for t in driver.times("trajectory") if t > marks["resumed"]]  # the episode went on after the resume
    assert driver.refused == []


def test_a_chunk_that_jumps_while_the_arm_follows_the_last_one_is_refused_not_realigned(cell):
    # The arm did not hold: a far start is the policy's jump at a seam, and the driver refuses it.
    driver = cell[0]
    long_chunks = ChunkingConfig(size=50, dt=0.02, mode="async", execute=5)  # every chunk lands a second early
    policy = ShiftedChunks({5})
    policy.chunk_size = long_chunks.size
    report, _, _ = _run(cell, policy, 5.0, Deadlines(), chunking=long_chunks)
    assert report.outcome.startswith("failed: driver arm refused a chunk"), report.outcome
    assert "too_far" in report.outcome, report.outcome
    assert report.realign_moves == 0 and driver.move_targets == []
    assert report.chunks == 4 and len(driver.refused) == 1 and 0.25 < driver.refused[0] < 0.35, driver.refused


class BaseAndArm(ShiftedChunks):
    """ShiftedChunks on a mobile manipulator: every chunk also drives the base forward at 0.19 m/s
    (0 when the episode starts: a gap beyond the held arm's realign bound, which must not count it,
    nor try to move to it)."""

    def __init__(self, shifted: set[int], vx: int):
        super().__init__(shifted, slow=frozenset({3}), slow_s=CHUNKING.size * CHUNKING.dt + 0.15)
        self.vx = vx

    def infer(self, obs):
        chunk = super().infer(obs)
        chunk.actions[:, self.vx] = 0.19
        return chunk


def test_a_base_velocity_is_no_reason_to_realign_and_a_realign_stops_the_base(base_cell):
    driver, link, _ = base_cell
    vx = link.description["joint_names"].index("base_vx")
    events: list[tuple[str, dict]] = []
    report, _, _ = _run(base_cell, BaseAndArm({4}, vx), 2.0, Deadlines(policy_s=2.0), events=events)
    assert report.outcome == "completed", report.outcome
    # The first chunk's base velocity (0 -> 0.19) moved nothing; only the far arm joint after the late chunk did.
    [realign] = _realigns(events)
    assert realign["cause"] == "late chunk" and realign["joint"].endswith(link.description["joint_names"][0]), realign
    assert report.realign_moves == 1 and driver.refused == []
    target = driver.move_targets[0]
    assert target[vx] == 0.0 and not np.any(target[driver.base])  # the driver refuses a move_to with base velocities
    assert 0.28 < target[0] - _center_of("arx_lift2")[0] < 0.45, target
