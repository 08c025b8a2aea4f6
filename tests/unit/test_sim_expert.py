"""The scripted sim expert: from reset, its chunks, executed on a stepping SimWorld through the
driver's own safety filter, reach the task's success without a single clamp.

The loop stands in for the driver and the episode: a chunk is asked for every half chunk (async
mode's default), its first action is for the tick after the observation, and every tick the
filter passes the current chunk point to the sim's actuators and physics advances one tick.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco's first import in this process
pytest.importorskip("mujoco")

from armada.drivers.core.safety import SafetyFilter, SafetyLimits  # noqa: E402
from armada.drivers.sim.expert import ExpertLimits, SimExpert  # noqa: E402
from armada.drivers.sim.world import SimWorld, tasks_for  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402
from armada.runtime.inference.observation import Observation  # noqa: E402
from armada.runtime.inference.policy import ActionSpace, PolicyError  # noqa: E402

CHUNK, DT = 50, 0.02
SPEED = 0.3  # the expert's default fraction of the joint velocity limits
EPISODE_S = 12.0


class InProcessSim:
    """The sim control socket's ``state`` answer, straight from a SimWorld."""

    def __init__(self, world: SimWorld):
        self.world = world

    def state(self) -> dict:
        return {"ok": True, **self.world.state(), "objects": self.world.objects(), "tasks": tasks_for(self.world.scene)}


class Setup:
    def __init__(self, scene: str):
        self.emb = load_embodiment(scene)
        self.sim = SimWorld(scene)
        self.limits = ExpertLimits.from_embodiments([self.emb], SPEED, SPEED)
        self.expert = SimExpert(SimWorld(scene), InProcessSim(self.sim), self.limits, CHUNK, DT)
        self.space = ActionSpace(self.emb.joint_names, self.emb.lower, self.emb.upper, self.emb.gripper_mask())


@pytest.fixture(scope="module")
def so101() -> Setup:
    return Setup("so101")


@pytest.fixture(scope="module")
def aloha() -> Setup:
    return Setup("aloha")


def _episode(s: Setup, task: str, seed: int) -> dict:
    """One episode from home; returns what a test checks."""
    s.sim.place_arm(s.emb.home)
    s.sim.reset(task, seed)
    filt = SafetyFilter(SafetyLimits.from_embodiment(s.emb), DT)
    filt.reset(s.sim.arm_position())
    s.expert.reset(s.space)
    first_jumps, speeds, chunk, t0 = [], [], None, 0
    for tick in range(int(EPISODE_S / DT)):
        if tick % (CHUNK // 2) == 0:
            obs = Observation(mono_ns=tick * int(DT * 1e9), t_ns=0, state=s.sim.arm_position())
            got = s.expert.infer(obs)
            assert got.actions.shape == (CHUNK, len(s.emb.joint_names)) and got.dt == DT
            first_jumps.append(np.abs(got.actions[0] - obs.state))
            speeds.append(np.abs(np.diff(got.actions, axis=0)).max(axis=0) / DT)
            chunk, t0 = got.actions, tick + 1
        target = chunk[min(max(tick + 1 - t0, 0), CHUNK - 1)]
        s.sim.set_target(filt.step(target))
        s.sim.step(DT)
        if s.sim.success():
            break
    return {"success": s.sim.success(), "time_s": (tick + 1) * DT, "clamps": filt.counters.as_dict(),
            "first_jump": np.max(first_jumps, axis=0), "speed": np.max(speeds, axis=0),
            "last_chunk_still": np.abs(chunk[-1] - chunk[-2]).max()}


def _check(s: Setup, result: dict, what: str) -> None:
    assert result["success"], f"{what}: no success in {EPISODE_S} s"
    assert sum(result["clamps"].values()) == 0, f"{what}: the driver's filter clamped: {result['clamps']}"
    # Each chunk starts where the arm is (within a servo's tracking lag): never a jump.
    assert np.all(result["first_jump"] < 0.5 * s.emb.max_engage_distance), f"{what}: {result['first_jump']}"
    assert np.all(result["speed"] <= s.limits.max_velocity * 1.001), f"{what}: {result['speed']} > {s.limits.max_velocity}"


@pytest.mark.parametrize("task", ["reach_cube", "press_button"])
def test_so101_expert_succeeds_without_clamps(so101, task):
    _check(so101, _episode(so101, task, seed=0), f"{task} seed 0")


def test_aloha_expert_moves_the_right_arm_and_holds_the_left(aloha):
    left = slice(0, 7)
    start = aloha.emb.home[left].copy()
    result = _episode(aloha, "aloha_reach_cube", seed=0)
    _check(aloha, result, "aloha_reach_cube seed 0")
    assert np.abs(aloha.sim.arm_position()[left] - start).max() < 0.02  # the left arm stayed at home


@pytest.mark.parametrize("scene", ["so101", "aloha"])
def test_expert_succeeds_over_seeds(so101, aloha, scene):
    s = so101 if scene == "so101" else aloha
    for task in tasks_for(scene):
        for seed in (1, 2, 3, 4):
            _check(s, _episode(s, task, seed), f"{task} seed {seed}")


def test_a_chunk_ends_holding_still_at_the_goal(so101):
    so101.sim.place_arm(so101.emb.home)
    so101.sim.reset("press_button", 4)
    so101.expert.reset(so101.space)
    obs = Observation(mono_ns=0, t_ns=0, state=so101.sim.arm_position())
    long = SimExpert(so101.expert.world, so101.expert.sim, so101.limits, 400, DT)  # 8 s: time to arrive
    long.reset(so101.space)
    actions = long.infer(obs).actions
    assert np.abs(actions[0] - obs.state).max() <= so101.limits.max_velocity.max() * DT + 1e-9  # from rest
    np.testing.assert_allclose(actions[-1], long.last_goal, atol=1e-6)
    assert np.abs(actions[-1] - actions[-2]).max() == 0.0


def test_resume_starts_again_from_the_measured_pose(so101):
    so101.sim.place_arm(so101.emb.home)
    so101.sim.reset("reach_cube", 5)
    so101.expert.reset(so101.space)
    so101.expert.infer(Observation(mono_ns=0, t_ns=0, state=so101.sim.arm_position()))
    pushed = so101.sim.arm_position() + np.array([0.3, 0, 0, 0, 0, 0])  # an operator moved the arm
    so101.sim.place_arm(pushed)
    obs = Observation(mono_ns=int(0.5e9), t_ns=0, state=so101.sim.arm_position())
    so101.expert.resume(obs)
    actions = so101.expert.infer(obs).actions
    assert np.abs(actions[0] - pushed).max() <= so101.limits.max_velocity.max() * DT + 1e-9


def test_route_answers_the_sims_task(so101):
    so101.sim.reset("press_button", 0)
    so101.expert.reset(so101.space)
    obs = Observation(mono_ns=0, t_ns=0, state=so101.sim.arm_position())
    assert so101.expert.route(obs, "press the green button").task == "press_button"
    with pytest.raises(PolicyError, match="pinned to task 'reach_cube'"):
        so101.expert.route(obs, "touch the red cube", pinned_task="reach_cube")


def test_a_cell_with_other_joints_is_refused(so101):
    names = list(so101.space.names)
    names[0] = "waist"
    with pytest.raises(PolicyError, match="not the scene's"):
        so101.expert.reset(ActionSpace(names, so101.space.lower, so101.space.upper, so101.space.gripper))


def test_the_expert_reads_the_sim_through_its_control_socket(so101, short_tmp):
    """The real client/server pair: the expert's requests answered by the sim's REP socket."""
    import threading

    from armada.drivers.sim.control import SimControl, SimControlServer

    endpoint = f"ipc://{short_tmp}/sim-robot"
    server = SimControlServer(endpoint, so101.sim)
    stop = threading.Event()

    def serve() -> None:  # the backend polls once per control tick
        while not stop.is_set():
            if not server.poll():
                stop.wait(0.002)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = SimControl(endpoint, timeout_s=2.0)
    try:
        so101.sim.place_arm(so101.emb.home)
        so101.sim.reset("reach_cube", 6)
        expert = SimExpert(so101.expert.world, client, so101.limits, CHUNK, DT)
        expert.reset(so101.space)
        obs = Observation(mono_ns=0, t_ns=0, state=so101.sim.arm_position())
        assert expert.route(obs, "touch the red cube").task == "reach_cube"
        assert expert.infer(obs).actions.shape == (CHUNK, 6)
    finally:
        client.close()
        stop.set()
        thread.join(2)
        server.close()
    quiet = SimExpert(so101.expert.world, SimControl(endpoint, timeout_s=0.1), so101.limits, CHUNK, DT)
    with pytest.raises(PolicyError, match="did not answer"):  # the sim is gone: a clear error, not a hang
        quiet.route(obs, "touch the red cube")
    quiet.sim.close()
