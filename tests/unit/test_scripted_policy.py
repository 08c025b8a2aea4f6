"""The scripted policy (the timing tests' and benchmarks' stand-in for a model) starts at rest."""

import numpy as np

from armada.runtime.inference.observation import Observation
from armada.runtime.inference.policy import ActionSpace, ScriptedPolicy

DT = 0.02


def _space(dof: int = 3) -> ActionSpace:
    return ActionSpace([f"j{i}" for i in range(dof)], -np.ones(dof) * 2, np.ones(dof) * 2, np.zeros(dof, bool))


def _obs(at_s: float, state: np.ndarray) -> Observation:
    return Observation(mono_ns=int(at_s * 1e9), t_ns=int(at_s * 1e9), state=state)


def test_the_first_chunk_starts_at_rest_however_long_routing_took():
    # A slow route (a loaded host, a warming model): the arm rested meanwhile, so the first chunk
    # must begin where it is, not 0.9 s into the motion (the driver would refuse that as too far).
    policy = ScriptedPolicy(amplitude=0.3, frequency_hz=0.25, chunk_size=50, dt=DT)
    policy.reset(_space())
    rest = np.zeros(3)
    policy.route(_obs(10.0, rest), "move")
    chunk = policy.infer(_obs(10.9, rest))
    one_step = 0.3 * (1 - np.cos(2 * np.pi * 0.25 * DT))
    assert np.max(np.abs(chunk.actions[0] - rest)) <= one_step + 1e-12


def test_later_chunks_follow_one_clock_so_async_seams_are_seamless():
    policy = ScriptedPolicy(amplitude=0.3, frequency_hz=0.25, chunk_size=50, dt=DT)
    policy.reset(_space())
    rest = np.zeros(3)
    policy.route(_obs(0.0, rest), "move")
    first = policy.infer(_obs(0.5, rest))
    later = policy.infer(_obs(0.5 + 10 * DT, first.actions[9]))  # observed ten steps into the first chunk
    np.testing.assert_allclose(later.actions[:40], first.actions[10:], atol=1e-12)


def test_resume_restarts_the_clock_from_where_the_arm_stopped():
    policy = ScriptedPolicy(amplitude=0.3, frequency_hz=0.25, chunk_size=50, dt=DT)
    policy.reset(_space())
    policy.route(_obs(0.0, np.zeros(3)), "move")
    policy.infer(_obs(0.0, np.zeros(3)))
    held = np.full(3, 0.1)
    policy.resume(_obs(5.0, held))
    chunk = policy.infer(_obs(5.7, held))
    assert np.max(np.abs(chunk.actions[0] - held)) < 1e-3
