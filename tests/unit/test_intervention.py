"""Intervention in the episode loop against a scriptable driver: no chunk while intervened,
a resume that cannot take control changes nothing, and a chunk that starts far away after the
resume is reached with a ramped move_to instead of being refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from armada.runtime.config import ChunkingConfig, DriverConfig
from armada.runtime.inference.episode import (Deadlines, EpisodeReport, EpisodeRequest, EpisodeRunner,
                                              InterventionError)
from armada.runtime.inference.link import DriverLink
from armada.runtime.inference.observation import ObservationBuilder
from armada.runtime.inference.policy import ScriptedPolicy
from tests.unit.test_inference_fakes import FakeDriver

CHUNKING = ChunkingConfig(size=10, dt=0.02, mode="async", execute=5)
MOVE_S = 0.2


class MovingFakeDriver(FakeDriver):
    """The fake driver, plus a move_to that 'runs' for MOVE_S and then holds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.move_targets: list[np.ndarray] = []

    def _serve(self, req) -> None:
        msg = req.msg if req.error is None else None
        if msg is not None and msg["kind"] == "move_to" and msg["lease"] == self.lease:
            self.requests.append((time.monotonic(), "move_to", req.identity))
            self.move_targets.append(np.asarray(msg["target"]))
            self.mode = "running"
            threading.Timer(MOVE_S, lambda: setattr(self, "mode", "armed")).start()
            self.server.reply_ok(req, duration_s=MOVE_S)
            return
        super()._serve(req)


class JumpAfterResume(ScriptedPolicy):
    """The scripted motion, except that the first chunk after the first resume starts 0.5 rad away."""

    def __init__(self):
        super().__init__(0.05, 0.25, CHUNKING.size, CHUNKING.dt)
        self.resumes = 0
        self.jump = False

    def resume(self, obs):
        super().resume(obs)
        self.resumes += 1
        self.jump = self.resumes == 1

    def infer(self, obs):
        chunk = super().infer(obs)
        if self.jump:
            self.jump = False
            chunk.actions[:, 0] += 0.5
        return chunk


@pytest.fixture
def cell(ctx, short_tmp):
    cmd, state = f"ipc://{short_tmp}/arm-cmd", f"ipc://{short_tmp}/arm-state"
    driver = MovingFakeDriver(ctx, cmd, state)
    link = DriverLink(ctx, DriverConfig(name="arm", embodiment="mock_arm", backend={"kind": "mock"}, cmd=cmd, state=state), None)
    link.handshake()
    builder = ObservationBuilder({}, {"arm": link.state}, max_frame_age_s=0.5, max_state_age_s=0.2,
                                 state_dof={"arm": link.dof})
    time.sleep(0.1)
    yield driver, link, builder
    link.close()
    driver.close()


def _run(cell, policy, duration_s: float, during) -> tuple[EpisodeReport, list[tuple[float, str, dict]]]:
    driver, link, builder = cell
    events: list[tuple[float, str, dict]] = []
    runner = EpisodeRunner({"arm": link}, builder, policy, CHUNKING, heartbeat_s=0.02,
                           emit=lambda e, d: events.append((time.monotonic(), e, d)),
                           deadlines=Deadlines(policy_s=2.0, first_policy_s=2.0))
    out: list[EpisodeReport] = []
    thread = threading.Thread(target=lambda: out.append(runner.run(EpisodeRequest(7, "wave", duration_s, arm=True))),
                              daemon=True)
    thread.start()
    during(runner, driver)
    thread.join(10)
    assert not thread.is_alive(), "the episode did not end"
    return out[0], events


def test_no_chunk_goes_out_while_intervened_and_the_leases_come_back_on_resume(cell):
    window: list[float] = []

    def operator(runner, driver):
        time.sleep(0.5)
        assert runner.intervene() == 7
        window.append(time.monotonic())
        assert driver.lease is None  # released on the driver before intervene returned
        time.sleep(0.6)
        window.append(time.monotonic())
        data = runner.resume()
        assert data["episode"] == 7 and 0.55 < data["intervened_s"] < 1.0
        assert driver.lease is not None

    report, events = _run(cell, JumpAfterResume(), 2.0, operator)
    driver = cell[0]
    assert report.outcome == "completed", report.outcome
    assert report.interventions == 1 and 0.55 < report.intervened_s < 1.0
    sent = driver.times("trajectory")
    assert not [t for t in sent if window[0] <= t <= window[1]]
    assert [t for t in sent if t > window[1]]
    names = [e for _, e, _ in events]
    assert names.count("intervention_started") == 1 and names.count("intervention_ended") == 1
    route = next(d for _, e, d in events if e == "route")
    assert route["episode"] == 7 and route["task"] and "scores" in route


def test_a_resume_onto_a_disarmed_driver_is_refused_and_leaves_the_episode_intervened(cell):
    def operator(runner, driver):
        time.sleep(0.4)
        runner.intervene()
        driver.mode = "idle"  # someone disarmed it while they had it
        with pytest.raises(InterventionError, match="arm it, then resume"):
            runner.resume()
        assert runner.intervened
        assert driver.lease is None  # the lease taken for the attempt was given back
        driver.mode = "armed"
        runner.resume()

    report, _ = _run(cell, JumpAfterResume(), 1.5, operator)
    assert report.outcome == "completed", report.outcome
    assert report.interventions == 1


def test_a_chunk_that_starts_far_away_after_a_resume_is_reached_with_move_to_first(cell):
    def operator(runner, driver):
        time.sleep(0.4)
        runner.intervene()
        time.sleep(0.2)
        runner.resume()

    report, _ = _run(cell, JumpAfterResume(), 2.0, operator)
    driver = cell[0]
    assert report.outcome == "completed", report.outcome
    assert report.realign_moves == 1
    kinds = driver.kinds()
    moved = kinds.index("move_to")
    assert kinds.index("acquire", kinds.index("release")) < moved  # after the resume took the lease
    assert "trajectory" in kinds[moved:]  # the episode went on from there
    # The move went to the far chunk's first point: 0.5 rad off on the first joint, the rest near.
    center = (driver.emb.lower + driver.emb.upper) / 2
    offset = driver.move_targets[0] - center
    assert 0.45 < offset[0] < 0.56 and np.all(np.abs(offset[1:]) < 0.1), offset
    # No chunk went out between the move_to and its end.
    t_move = driver.times("move_to")[0]
    assert not [t for t in driver.times("trajectory") if t_move < t < t_move + MOVE_S - 0.02]
