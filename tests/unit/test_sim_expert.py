"""The scripted sim expert: from reset, its chunks, played on a stepping SimWorld through the
driver's own trajectory buffer and safety filter, reach the task's success without a single clamp.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco's first import in this process
pytest.importorskip("mujoco")

from armada.drivers.core.safety import SafetyFilter, SafetyLimits  # noqa: E402
from armada.drivers.core.trajectory import TrajectoryBuffer  # noqa: E402
from armada.drivers.sim.expert import ExpertLimits, SimExpert  # noqa: E402
from armada.drivers.sim.world import SimWorld, tasks_for  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402
from armada.runtime.inference.observation import Observation  # noqa: E402
from armada.runtime.inference.policy import ActionSpace, PolicyError  # noqa: E402

CHUNK, DT = 50, 0.02
SPEED = 0.3  # the expert's default fraction of the joint velocity limits
EPISODE_S = 12.0
SHIPPED = (10, 0.1)  # configs/cells/sim_so101.yaml's chunking: 10 points 0.1 s apart


class InProcessSim:
    """The sim control socket's ``state`` answer, straight from a SimWorld."""

    def __init__(self, world: SimWorld):
        self.world = world

    def state(self) -> dict:
        return {"ok": True, **self.world.state(), "objects": self.world.objects(), "tasks": tasks_for(self.world.scene)}


class Setup:
    def __init__(self, scene: str, chunking: tuple[int, float] = (CHUNK, DT)):
        self.emb = load_embodiment(scene)
        self.sim = SimWorld(scene)
        self.limits = ExpertLimits.from_embodiments([self.emb], SPEED, SPEED)
        self.size, self.dt = chunking
        self.expert = SimExpert(SimWorld(scene), InProcessSim(self.sim), self.limits, self.size, self.dt)
        self.space = ActionSpace(self.emb.joint_names, self.emb.lower, self.emb.upper, self.emb.gripper_mask())


CHUNKINGS = {"50x0.02": (CHUNK, DT), "shipped-10x0.1": SHIPPED}


@pytest.fixture(scope="module", params=list(CHUNKINGS))
def chunking(request) -> tuple[int, float]:
    return CHUNKINGS[request.param]


@pytest.fixture(scope="module")
def so101() -> Setup:
    return Setup("so101")


@pytest.fixture(scope="module")
def aloha() -> Setup:
    return Setup("aloha")


def _setup(base: Setup, chunking: tuple[int, float]) -> Setup:
    """``base``'s scene with another chunking (the worlds are shared: building one costs ~0.3 s)."""
    s = object.__new__(Setup)
    s.__dict__.update(base.__dict__)
    s.size, s.dt = chunking
    s.expert = SimExpert(base.expert.world, base.expert.sim, base.limits, s.size, s.dt)
    return s


def _episode(s: Setup, task: str, seed: int, latency_s: float = 0.01) -> dict:
    """One episode from home, as the episode loop (async) and the driver run it; returns what a test checks.

    The driver's side: every tick (the embodiment's rate) its trajectory buffer is sampled (chunks
    merged with ``replace``, as the cells do), the safety filter passes the target, the sim's
    actuators get it and physics advances one tick. The episode's side: a chunk is asked for so
    that it lands before half the previous one has played (async's default), stamped to start one
    dt after its observation, and arrives ``latency_s`` after it.
    """
    tick = 1.0 / s.emb.control_rate_hz
    tick_ns, dt_ns = round(tick * 1e9), round(s.dt * 1e9)
    s.sim.place_arm(s.emb.home)
    s.sim.reset(task, seed)
    filt = SafetyFilter(SafetyLimits.from_embodiment(s.emb), tick)
    commanded = s.sim.arm_position()
    filt.reset(commanded)
    buffer = TrajectoryBuffer(len(s.emb.joint_names))
    s.expert.reset(s.space)
    first_jumps, speeds, pending, next_obs_ns = [], [], None, 0
    for n in range(int(EPISODE_S / tick)):
        now = n * tick_ns
        if now >= next_obs_ns and pending is None:
            obs = Observation(mono_ns=now, t_ns=0, state=s.sim.arm_position())
            got = s.expert.infer(obs)
            assert got.actions.shape == (s.size, len(s.emb.joint_names)) and got.dt == s.dt
            first_jumps.append(np.abs(got.actions[0] - obs.state))
            speeds.append(np.abs(np.diff(got.actions, axis=0)).max(axis=0) / s.dt)
            pending = (now + round(latency_s * 1e9), now + dt_ns, got.actions)
            next_obs_ns = now + dt_ns + (s.size // 2) * dt_ns - round(latency_s * 1e9) - 2 * dt_ns
        if pending is not None and now >= pending[0]:
            buffer.add_chunk(pending[1], s.dt, pending[2], "replace", now, anchor=commanded)
            pending = None
        sample = buffer.sample(now)
        commanded = filt.step(sample.target if sample.target is not None else commanded)
        s.sim.set_target(commanded)
        s.sim.step(tick)
        if s.sim.success():
            break
    return {"success": s.sim.success(), "time_s": (n + 1) * tick, "clamps": filt.counters.as_dict(),
            "first_jump": np.max(first_jumps, axis=0), "speed": np.max(speeds, axis=0)}


def _check(s: Setup, result: dict, what: str) -> None:
    assert result["success"], f"{what}: no success in {EPISODE_S} s"
    assert sum(result["clamps"].values()) == 0, f"{what}: the driver's filter clamped: {result['clamps']}"
    # Each chunk starts where the arm is: one step of motion plus a servo's tracking lag ahead of it,
    # never as far as the driver's refusal (max_engage_distance).
    bound = s.limits.max_velocity * s.dt + 0.08
    assert np.all(result["first_jump"] <= bound), f"{what}: first actions {result['first_jump']} > {bound}"
    assert np.all(result["first_jump"] < s.emb.max_engage_distance)
    assert np.all(result["speed"] <= s.limits.max_velocity * 1.001), f"{what}: {result['speed']} > {s.limits.max_velocity}"


@pytest.mark.parametrize("task", ["reach_cube", "press_button"])
def test_so101_expert_succeeds_without_clamps(so101, chunking, task):
    s = _setup(so101, chunking)
    _check(s, _episode(s, task, seed=0), f"{task} seed 0, chunks {chunking}")


def test_aloha_expert_moves_the_right_arm_and_holds_the_left(aloha, chunking):
    s = _setup(aloha, chunking)
    left = slice(0, 7)
    start = s.emb.home[left].copy()
    result = _episode(s, "aloha_reach_cube", seed=0)
    _check(s, result, f"aloha_reach_cube seed 0, chunks {chunking}")
    assert np.abs(s.sim.arm_position()[left] - start).max() < 0.02  # the left arm stayed at home


@pytest.mark.parametrize("scene", ["so101", "aloha"])
def test_expert_succeeds_over_seeds(so101, aloha, chunking, scene):
    s = _setup(so101 if scene == "so101" else aloha, chunking)
    for task in tasks_for(scene):
        for seed in (1, 2, 3, 4):
            _check(s, _episode(s, task, seed), f"{task} seed {seed}, chunks {chunking}")


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


def test_a_short_pause_goes_on_and_a_long_one_starts_the_plan_again(so101):
    s = so101
    s.sim.place_arm(s.emb.home)
    s.sim.reset("press_button", 7)
    result = _episode(s, "press_button", 7)  # ends at success, on the last waypoint
    assert result["success"] and s.expert._waypoint == 1
    last_t0 = s.expert._last[0]
    during = Observation(mono_ns=last_t0 + int(0.2e9), t_ns=0, state=s.sim.arm_position())
    s.expert.resume(during)  # inputs were stale for a moment; the last chunk still plays
    s.expert.infer(during)
    assert s.expert._waypoint == 1
    after = Observation(mono_ns=s.expert._last[0] + int(5e9), t_ns=0, state=s.sim.arm_position())
    s.expert.resume(after)  # held (or moved by an operator) long after the last chunk ended
    actions = s.expert.infer(after).actions
    assert s.expert._waypoint == 0  # above the button again first
    assert np.abs(actions[0] - after.state).max() <= s.limits.max_velocity.max() * DT + 1e-9  # from rest, where it is


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


@pytest.mark.parametrize("cell_name", ["sim_so101", "sim_aloha"])
def test_the_plugin_builds_the_expert_from_a_shipped_cell(cell_name, short_tmp):
    from armada.runtime.config import CONFIG_DIR, load_cell
    from armada.runtime.inference.registry import POLICIES

    cell = load_cell(CONFIG_DIR / "cells" / f"{cell_name}.yaml", short_tmp)
    expert = POLICIES.get("sim_expert").build(cell)
    try:
        assert isinstance(expert, SimExpert)
        assert (expert.chunk_size, expert.dt) == (cell.inference.chunking.size, cell.inference.chunking.dt)
        emb = cell.embodiment(cell.drivers[0])
        assert expert.world.joint_names == emb.joint_names
        np.testing.assert_allclose(expert.limits.max_velocity, emb.max_velocity * cell.inference.policy.max_joint_speed)
        assert expert.limits.tick_s == pytest.approx(1 / emb.control_rate_hz)
    finally:
        expert.sim.close()
