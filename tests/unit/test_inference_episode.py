"""The episode loop against a scriptable driver: deadlines, one connection, bad streams, silence."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from armada.runtime.config import ChunkingConfig, DriverConfig
from armada.runtime.inference.episode import Deadlines, EpisodeReport, EpisodeRequest, EpisodeRunner
from armada.runtime.inference.link import DriverLink
from armada.runtime.inference.observation import ObservationBuilder
from armada.runtime.inference.policy import ScriptedPolicy
from tests.unit.test_inference_fakes import FakeDriver

CHUNKING = ChunkingConfig(size=10, dt=0.02, mode="async", execute=5)


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


@pytest.fixture
def cell(ctx, short_tmp):
    cmd, state = f"ipc://{short_tmp}/arm-cmd", f"ipc://{short_tmp}/arm-state"
    driver = FakeDriver(ctx, cmd, state)
    link = DriverLink(ctx, DriverConfig(name="arm", embodiment="mock_arm", backend={"kind": "mock"}, cmd=cmd, state=state), None)
    link.handshake()
    builder = ObservationBuilder({}, {"arm": link.state}, max_frame_age_s=0.5, max_state_age_s=0.2,
                                 state_dof={"arm": link.dof})
    time.sleep(0.1)  # let the state subscriber join
    yield driver, link, builder
    link.close()
    driver.close()


def _run(cell, policy, duration_s: float, deadlines: Deadlines, during=None, join_s: float = 10.0):
    """Run one episode in a thread (as the inference process does); returns (report, runner, seconds)."""
    driver, link, builder = cell
    events: list[tuple[str, dict]] = []
    runner = EpisodeRunner({"arm": link}, builder, policy, CHUNKING, heartbeat_s=0.02,
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
