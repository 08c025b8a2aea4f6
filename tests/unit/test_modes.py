"""Property tests of the per-group command modes: the base-velocity filter's bounds and staleness,
the lift's limits, and the grouped filter leaving position behaviour exactly as it was."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armada.drivers.core.filters import build_filter
from armada.drivers.core.modes import BaseVelocityFilter, GroupedFilter, build_group_filter
from armada.drivers.core.safety import SafetyFilter, SafetyLimits
from armada.drivers.core.trajectory import TrajectoryBuffer
from armada.runtime.config import EmbodimentConfig, load_embodiment

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-9  # rounding allowance, relative to the bound


# --------------------------------------------------------------------------- base velocity filter


@dataclass
class BaseCase:
    lo: np.ndarray
    hi: np.ndarray
    amax: np.ndarray
    jmax: np.ndarray
    timeout_s: float
    dt: float

    def make(self) -> BaseVelocityFilter:
        return BaseVelocityFilter(self.lo, self.hi, self.amax, self.jmax, self.timeout_s, self.dt)


@st.composite
def base_cases(draw: st.DrawFn) -> BaseCase:
    n = draw(st.integers(1, 3))

    def column(lo: float, hi: float) -> np.ndarray:
        return np.array(draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n)))

    return BaseCase(lo=-column(0.05, 2.0), hi=column(0.05, 2.0), amax=column(0.1, 5.0), jmax=column(0.5, 50.0),
                    timeout_s=draw(st.floats(0.01, 0.5)), dt=draw(st.sampled_from([0.002, 0.005, 0.01, 0.02])))


# One segment of an input stream: (kind, ticks, fresh). Targets are drawn per tick where it matters.
KINDS = ["none", "inside", "huge", "nan", "inf", "badshape", "flip", "hold_const"]


@st.composite
def streams(draw: st.DrawFn, n: int) -> list[tuple[np.ndarray | None, bool]]:
    out: list[tuple[np.ndarray | None, bool]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(KINDS))
        ticks = draw(st.integers(1, 120))
        fresh = draw(st.sampled_from([True, False, None]))  # None: a random freshness every tick
        const = np.array(draw(st.lists(st.floats(-3.0, 3.0), min_size=n, max_size=n)))
        for k in range(ticks):
            f = draw(st.booleans()) if fresh is None else fresh
            if kind == "none":
                t = None
            elif kind == "inside":
                t = np.array(draw(st.lists(st.floats(-3.0, 3.0), min_size=n, max_size=n)))
            elif kind == "huge":
                t = np.full(n, draw(st.sampled_from([1e300, -1e300, 1e9, -1e9])))
            elif kind == "nan":
                t = np.full(n, math.nan)
            elif kind == "inf":
                t = np.full(n, math.inf)
            elif kind == "badshape":
                t = np.zeros(n + 1)
            elif kind == "flip":  # bang-bang between the extremes every tick
                t = np.full(n, 1e3 if k % 2 else -1e3)
            else:
                t = const
            out.append((t, f))
    return out


def _run(filt: BaseVelocityFilter, stream: list[tuple[np.ndarray | None, bool]]) -> np.ndarray:
    out = [filt.velocity]
    for target, fresh in stream:
        out.append(filt.step(target, fresh))
    return np.array(out)


@given(data=st.data(), case=base_cases())
@PROPERTY
def test_base_velocity_acceleration_and_jerk_hold_for_any_stream(data: st.DataObject, case: BaseCase) -> None:
    filt = case.make()
    start = np.array(data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(case.lo), max_size=len(case.lo))))
    v0 = case.lo + start * (case.hi - case.lo)  # engaged at any measured velocity inside the range
    filt.reset(v0)
    v = _run(filt, data.draw(streams(len(case.lo))))
    assert np.all(np.isfinite(v))
    assert np.all(v <= case.hi * (1 + REL)) and np.all(v >= case.lo * (1 + REL))
    acc = np.diff(v, axis=0) / case.dt
    assert np.all(np.abs(acc) <= case.amax * (1 + REL) + 1e-12)
    # The first tick starts at acceleration 0 (reset), so the jerk includes it.
    jerk = np.diff(np.vstack([np.zeros(len(case.lo)), acc]), axis=0) / case.dt
    assert np.all(np.abs(jerk) <= case.jmax * (1 + 1e-6) + 1e-9)


def _stop_ticks(case: BaseCase, v0: np.ndarray) -> int:
    """A generous bound on the ticks from any state within limits to rest: shed the acceleration
    (amax / jmax), shed the velocity (|v| / amax + amax / jmax), twice over, plus a few ticks."""
    span = np.maximum(case.hi - case.lo, np.abs(v0))
    t = 2.0 * (span / case.amax + 2.0 * case.amax / case.jmax)
    return int(np.max(t) / case.dt) + 10


@given(data=st.data(), case=base_cases())
@PROPERTY
def test_a_stale_base_command_decays_to_exactly_zero(data: st.DataObject, case: BaseCase) -> None:
    """A target that keeps coming but is no longer fresh is followed for timeout_ticks, then the
    base ramps to zero and stays there, counting the stale ticks."""
    n = len(case.lo)
    filt = case.make()
    filt.reset(np.zeros(n))
    target = np.array(data.draw(st.lists(st.floats(-3.0, 3.0), min_size=n, max_size=n)))
    for _ in range(data.draw(st.integers(1, 200))):
        filt.step(target, True)
    assert filt.counters.stale == 0
    for _ in range(filt.timeout_ticks):  # still followed: no stale ticks yet
        filt.step(target, False)
    assert filt.counters.stale == 0
    ticks = _stop_ticks(case, filt.velocity)
    for _ in range(ticks):
        filt.step(target, False)
    assert np.all(filt.velocity == 0.0), filt.velocity
    assert filt.counters.stale == (ticks if np.any(target != 0.0) else 0)
    for _ in range(20):
        assert np.all(filt.step(target, False) == 0.0)
    # A fresh command is followed again.
    if np.any(np.abs(target) > 1e-3):
        for _ in range(5):
            filt.step(target, True)
        assert np.any(filt.velocity != 0.0)


@given(data=st.data(), case=base_cases())
@PROPERTY
def test_a_hold_ramps_to_exactly_zero_in_bounded_time(data: st.DataObject, case: BaseCase) -> None:
    n = len(case.lo)
    filt = case.make()
    filt.reset(np.zeros(n))
    for target, fresh in data.draw(streams(n)):
        filt.step(target, fresh)
    for _ in range(_stop_ticks(case, filt.velocity)):
        filt.step(None)
    assert np.all(filt.velocity == 0.0) and np.all(filt.acceleration == 0.0)


@given(case=base_cases(), data=st.data())
@FEWER
def test_a_constant_target_is_reached_exactly_without_overshoot(case: BaseCase, data: st.DataObject) -> None:
    n = len(case.lo)
    goal = np.array(data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)))
    # Clipped: lo + 1.0 * (hi - lo) can round one ulp past hi, and the filter rightly stops at hi.
    goal = np.clip(case.lo + goal * (case.hi - case.lo), case.lo, case.hi)
    filt = case.make()
    filt.reset(np.zeros(n))
    v = np.array([filt.step(goal) for _ in range(_stop_ticks(case, goal))])
    assert np.all(v[-1] == goal)
    # Monotone approach: never beyond the goal (rounding allowance).
    over = np.where(goal >= 0, v - goal, goal - v)
    assert np.all(over <= 1e-12 + 1e-9 * np.abs(goal))


def test_base_filter_counts_its_clamps_and_refuses_bad_input() -> None:
    f = BaseVelocityFilter([-0.2], [0.2], [0.5], [2.0], 0.1, 0.01)
    f.reset(np.zeros(1))
    f.step(np.array([1.0]))
    c = f.counters
    assert (c.velocity, c.acceleration, c.jerk) == (1, 0, 1)  # clamped to 0.2; jerk-limited from rest
    for _ in range(100):
        f.step(np.array([0.2]))
    assert c.acceleration > 0
    f.step(np.array([math.nan]))
    f.step(np.zeros(3))
    assert c.nonfinite == 2
    with pytest.raises(ValueError):
        f.reset(np.array([math.nan]))
    with pytest.raises(ValueError):
        BaseVelocityFilter([0.0], [0.2], [0.5], [2.0], 0.1, 0.01)  # zero must be inside: it is the hold
    with pytest.raises(ValueError):
        BaseVelocityFilter([-0.2], [0.2], [0.5], [0.0], 0.1, 0.01)


def test_base_snapshot_restore_replays_exactly() -> None:
    f = BaseVelocityFilter([-1, -1], [1, 1], [1, 2], [5, 5], 0.05, 0.01)
    f.reset(np.array([0.1, -0.2]))
    for k in range(7):
        f.step(np.array([0.5, 0.5]), k < 3)
    snap = f.snapshot()
    a = [f.step(np.array([-0.3, 0.9]), False) for _ in range(10)]
    f.restore(snap)
    b = [f.step(np.array([-0.3, 0.9]), False) for _ in range(10)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- grouped filter


def mobile_emb(rate_hz: float = 200.0) -> EmbodimentConfig:
    """Two arm joints, a gripper, a lift and a base: every mode."""
    return EmbodimentConfig.model_validate({
        "name": "mobile_test", "control_rate_hz": rate_hz, "position_margin": 0.01,
        "groups": [
            {"name": "arm", "joints": [
                {"name": "j1", "min": -2.0, "max": 2.0, "max_velocity": 1.0, "max_acceleration": 4.0},
                {"name": "j2", "min": -1.0, "max": 1.5, "max_velocity": 1.5, "max_acceleration": 6.0}]},
            {"name": "gripper", "mode": "gripper_position", "joints": [
                {"name": "g", "min": 0.0, "max": 0.08, "max_velocity": 0.1, "max_acceleration": 1.0, "home": 0.02}]},
            {"name": "lift", "mode": "lift_height", "joints": [
                {"name": "lift_height", "min": -0.02, "max": 0.38, "max_velocity": 0.05, "max_acceleration": 0.2}]},
            {"name": "base", "mode": "base_velocity", "command_timeout_s": 0.25, "joints": [
                {"name": "vx", "min": -0.2, "max": 0.2, "max_velocity": 0.2, "max_acceleration": 0.5, "max_jerk": 2.0},
                {"name": "vy", "min": -0.2, "max": 0.2, "max_velocity": 0.2, "max_acceleration": 0.5, "max_jerk": 2.0},
                {"name": "wz", "min": -0.45, "max": 0.45, "max_velocity": 0.45, "max_acceleration": 1.0,
                 "max_jerk": 4.0}]},
        ]})


EMB = mobile_emb()
POS = np.array([0, 1, 2, 3])  # arm, gripper, lift
BASE = np.array([4, 5, 6])


def test_arm_only_embodiments_keep_the_plain_safety_filter() -> None:
    for name in ("mock_arm", "mock_bimanual", "ur3", "so101", "aloha"):
        emb = load_embodiment(name)
        assert type(build_group_filter(emb, 1.0 / emb.control_rate_hz)) is SafetyFilter, name
    assert isinstance(build_filter(EMB, 0.005), GroupedFilter)


@st.composite
def full_streams(draw: st.DrawFn) -> list[tuple[np.ndarray | None, bool]]:
    out: list[tuple[np.ndarray | None, bool]] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["none", "random", "huge", "nan", "badshape", "const"]))
        ticks = draw(st.integers(1, 150))
        const = np.array(draw(st.lists(st.floats(-3.0, 3.0), min_size=7, max_size=7)))
        for _ in range(ticks):
            fresh = draw(st.booleans())
            if kind == "none":
                t = None
            elif kind == "random":
                t = np.array(draw(st.lists(st.floats(-3.0, 3.0), min_size=7, max_size=7)))
            elif kind == "huge":
                t = np.full(7, 1e200)
            elif kind == "nan":
                t = np.full(7, math.nan)
            elif kind == "badshape":
                t = np.zeros(6)
            else:
                t = const
            out.append((t, fresh))
    return out


@given(stream=full_streams())
@FEWER
def test_position_groups_behave_exactly_as_the_plain_filter(stream: list[tuple[np.ndarray | None, bool]]) -> None:
    """The grouped filter's position dofs (arm, gripper, lift) get exactly what a SafetyFilter on
    those dofs alone would give, whatever the base does: the modes change nothing for positions."""
    grouped = GroupedFilter(EMB, 0.005)
    lim = grouped.limits
    plain = SafetyFilter(SafetyLimits(lower=lim.lower[POS], upper=lim.upper[POS], max_velocity=lim.max_velocity[POS],
                                      max_acceleration=lim.max_acceleration[POS], margin=lim.margin,
                                      gripper_mask=lim.gripper_mask[POS]), 0.005)
    start = np.array([0.1, -0.2, 0.03, 0.1, 0.0, 0.0, 0.0])
    grouped.reset(start)
    plain.reset(start[POS])
    for target, fresh in stream:
        out = grouped.step(target, fresh)
        ok = target is not None and target.shape == (7,) and np.all(np.isfinite(target))
        ref = plain.step(target[POS] if ok else None)
        assert np.array_equal(out[POS], ref)
        assert np.array_equal(grouped.velocity[POS], plain.velocity)


@given(stream=full_streams())
@FEWER
def test_lift_and_base_limits_hold_in_the_grouped_filter(stream: list[tuple[np.ndarray | None, bool]]) -> None:
    grouped = GroupedFilter(EMB, 0.005)
    grouped.reset(np.array([0.0, 0.0, 0.02, 0.0, 0.0, 0.0, 0.0]))
    out = np.array([grouped.position] + [grouped.step(t, f) for t, f in stream])
    lift = out[:, 3]
    assert np.all(lift >= -0.02 + 0.01 - 1e-12) and np.all(lift <= 0.38 - 0.01 + 1e-12)
    vel = np.diff(lift) / 0.005
    assert np.all(np.abs(vel) <= 0.05 * (1 + 1e-9))
    assert np.all(np.abs(np.diff(vel)) / 0.005 <= 0.2 * (1 + 1e-6))
    base = out[:, BASE]
    assert np.all(np.abs(base) <= np.array([0.2, 0.2, 0.45]) * (1 + 1e-9))
    acc = np.diff(base, axis=0) / 0.005
    assert np.all(np.abs(acc) <= np.array([0.5, 0.5, 1.0]) * (1 + 1e-9))
    jerk = np.diff(np.vstack([np.zeros(3), acc]), axis=0) / 0.005
    assert np.all(np.abs(jerk) <= np.array([2.0, 2.0, 4.0]) * (1 + 1e-6))


def test_grouped_filter_state_counters_and_snapshot() -> None:
    f = GroupedFilter(EMB, 0.005)
    f.reset(np.array([0.0, 0.0, 0.02, 0.0, 0.05, 0.0, 0.0]))  # the base engages at its measured velocity
    assert f.velocity[4] == 0.05 and f.position[4] == 0.05
    target = np.array([0.5, 0.0, 0.02, 0.0, 0.2, -0.1, 0.3])
    for _ in range(10):
        f.step(target)
    assert np.array_equal(f.velocity[BASE], f.position[BASE])  # a base's command is its velocity
    assert f.counters.acceleration > 0 and f.counters.jerk > 0  # one shared counter set
    f.step(np.full(7, math.nan))
    assert f.counters.nonfinite == 1  # counted once, not once per part
    snap = f.snapshot()
    a = [f.step(target, False) for _ in range(80)]
    f.restore(snap)
    b = [f.step(target, False) for _ in range(80)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert f.counters.stale > 0  # 0.25 s = 50 ticks of stale target, then ramped to zero
    for _ in range(400):
        f.decelerate()
    assert not np.any(f.velocity)  # everything at rest: the driver's disarm test
    with pytest.raises(ValueError):
        f.reset(np.zeros(6))


# --------------------------------------------------------------------------- trajectory buffer


def test_buffer_interpolates_velocity_dofs_linearly_and_positions_as_before() -> None:
    mask = np.array([False, True])
    pts = np.array([[0.0, 0.0], [1.0, 0.2], [1.5, 0.2], [1.0, -0.1]])
    t0, dt = 1_000_000_000, 0.02
    mixed, plain = TrajectoryBuffer(2, linear=mask), TrajectoryBuffer(2)
    for b in (mixed, plain):
        b.add_chunk(t0, dt, pts, "replace", t0)
    for k in range(0, 61):
        now = t0 + k * 1_000_000
        a, p = mixed.sample(now), plain.sample(now)
        assert a.status == p.status == "tracking"
        assert a.target[0] == p.target[0]  # the position dof: the same cubic as before
        i, u = divmod(k * 1_000_000, 20_000_000)
        expect = pts[i, 1] + (u / 20_000_000) * (pts[min(i + 1, 3), 1] - pts[i, 1])
        assert a.target[1] == pytest.approx(expect, abs=1e-12)  # the velocity dof: linear
    with pytest.raises(ValueError):
        TrajectoryBuffer(2, linear=np.array([True]))
