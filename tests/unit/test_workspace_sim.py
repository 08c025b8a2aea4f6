"""The simulated tasks' scripted motions stay inside the SO-101 and ALOHA boxes: the guard never clamps them.

The scripted expert (drivers/sim/expert.py) reaches each waypoint of a task's plan by IK and moves
there along its joint-space profile; a workspace clamp on the way would silently change the demos and
the evaluation's numbers. Here each plan, for many seeds, is played through the driver's filter stack
(``build_filter``) at the control rate, as the expert's default speed and acceleration fractions plan it.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pinocchio")
pytest.importorskip("mujoco")

from armada.drivers.core.filters import build_filter  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402

SEEDS = range(12)
HOLD_TICKS = 25  # ticks at each waypoint (the expert waits there for the site to settle)


@pytest.mark.parametrize("scene", ["so101", "aloha"])
def test_the_scripted_experts_motions_are_never_clamped_by_the_workspace(scene: str) -> None:
    try:
        from armada.drivers.sim.expert import ArmIK, ExpertLimits, profile
        from armada.drivers.sim.world import SimWorld, tasks_for

        world = SimWorld(scene)
    except (ImportError, FileNotFoundError) as exc:  # the sim extra or a model package is missing
        pytest.skip(f"no {scene} simulation here: {exc}")
    emb = load_embodiment(scene)
    assert emb.kinematics is not None
    limits = ExpertLimits.from_embodiments([emb], speed=0.3, acceleration=0.3)  # the expert's defaults
    dt = 1.0 / emb.control_rate_hz
    arm_mask = ~emb.gripper_mask()
    moves = 0
    for task in tasks_for(scene):
        for seed in SEEDS:
            world.reset(task, seed)
            filt = build_filter(emb, dt)
            filt.reset(emb.home)
            actions = emb.home.copy()
            for wp in world.plan():
                ik = ArmIK(world, wp.site, limits)
                start = world.data.qpos.copy()
                start[ik.qadr] = ik.to_qpos(actions)
                q, _ = ik.solve(start, wp.position, wp.approach)
                goal = actions.copy()
                goal[ik.action_index] = ik.to_actions(q)
                goal[limits.gripper] = np.clip(wp.gripper, limits.lower[limits.gripper], limits.upper[limits.gripper])
                longest = float(np.max(np.abs(goal - actions)[arm_mask] / limits.max_velocity[arm_mask]))
                steps = int(3 * longest / dt) + HOLD_TICKS
                for point in profile(actions, np.zeros(emb.dof), goal, steps, dt, limits.max_velocity,
                                     limits.max_acceleration, arm_mask):
                    filt.step(point)
                actions = goal
                moves += 1
            assert filt.counters.workspace == 0, (task, seed)
            assert filt.counters.separation == 0, (task, seed)
    assert moves > 0
