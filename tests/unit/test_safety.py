"""Property tests for the driver's safety filter: for any input stream, the output obeys every limit."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from armada.drivers.core.safety import ClampCounters, SafetyFilter, SafetyLimits

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------- strategies


@dataclass
class Case:
    limits: SafetyLimits
    dt: float

    @property
    def lo(self) -> np.ndarray:
        return self.limits.lower + self.limits.margin

    @property
    def hi(self) -> np.ndarray:
        return self.limits.upper - self.limits.margin

    @property
    def dof(self) -> int:
        return self.limits.dof


@st.composite
def cases(draw: st.DrawFn) -> Case:
    dof = draw(st.integers(1, 8))
    margin = draw(st.sampled_from([0.0, 0.001, 0.01, 0.02]))

    def column(lo: float, hi: float) -> np.ndarray:
        return np.array(draw(st.lists(st.floats(lo, hi), min_size=dof, max_size=dof)))

    lower = column(-5.0, 5.0)
    span = column(0.01, 6.0) + 2 * margin
    return Case(SafetyLimits(lower=lower, upper=lower + span, max_velocity=column(0.05, 10.0),
                             max_acceleration=column(0.1, 50.0), margin=margin,
                             gripper_mask=np.array(draw(st.lists(st.booleans(), min_size=dof, max_size=dof)))),
                dt=draw(st.floats(0.001, 0.05)))


KINDS = ["none", "inside", "around", "huge", "nan", "inf", "badshape", "list"]
INVALID = {"nan", "inf", "badshape"}
# (kind, held: the same target for the whole run of ticks, else a fresh one every tick, ticks)
ops = st.lists(st.tuples(st.sampled_from(KINDS), st.booleans(), st.integers(1, 30)), min_size=1, max_size=40)


def make_target(kind: str, rng: np.random.Generator, case: Case) -> object:
    lo, hi, dof = case.lo, case.hi, case.dof
    span = hi - lo
    if kind == "none":
        return None
    if kind == "inside":
        return rng.uniform(lo, hi)
    if kind == "around":
        return rng.uniform(lo - span, hi + span)
    if kind == "huge":
        return rng.choice([-1.0, 1.0], dof) * 10.0 ** rng.uniform(10, 300, dof)
    if kind in ("nan", "inf"):
        target = rng.uniform(lo, hi)
        target[rng.integers(dof)] = math.nan if kind == "nan" else rng.choice([-math.inf, math.inf])
        return target
    if kind == "badshape":
        return np.zeros(dof + 1)
    if kind == "list":
        return rng.uniform(lo, hi).tolist()
    raise AssertionError(kind)


def inside_pose(rng: np.random.Generator, case: Case) -> np.ndarray:
    return rng.uniform(case.lo, case.hi)


# --------------------------------------------------------------------------- checking helpers


def tolerances(case: Case, positions: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Position, velocity and acceleration tolerances: 1e-9 relative plus float rounding of the
    positions themselves, which finite differences divide by dt and dt^2."""
    scale = float(np.max(np.abs(positions))) + 1.0
    rounding = 4 * EPS * scale
    return (1e-9,
            case.limits.max_velocity * 1e-9 + 2 * rounding / case.dt,
            case.limits.max_acceleration * 1e-9 + 4 * rounding / case.dt**2)


def assert_limits(case: Case, start: np.ndarray, outputs: list[np.ndarray], check_range: bool = True) -> None:
    positions = np.vstack([start, *outputs])
    assert np.all(np.isfinite(positions))
    tol_p, tol_v, tol_a = tolerances(case, positions)
    if check_range:
        assert np.all(positions[1:] >= case.lo - tol_p), "below the lower bound"
        assert np.all(positions[1:] <= case.hi + tol_p), "above the upper bound"
    velocity = np.vstack([np.zeros(case.dof), np.diff(positions, axis=0) / case.dt])  # reset at rest
    assert np.all(np.abs(velocity) <= case.limits.max_velocity + tol_v), "velocity limit"
    accel = np.diff(velocity, axis=0) / case.dt
    assert np.all(np.abs(accel) <= case.limits.max_acceleration + tol_a), "acceleration limit"


def run(filt: SafetyFilter, targets: list[object]) -> list[np.ndarray]:
    return [filt.step(t) for t in targets]


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(case=cases(), plan=ops, seed=st.integers(0, 2**32 - 1))
def test_any_input_stream_obeys_every_limit(case: Case, plan: list[tuple[str, bool, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    filt = SafetyFilter(case.limits, case.dt)
    start = inside_pose(rng, case)
    filt.reset(start)
    outputs: list[np.ndarray] = []
    before = ClampCounters()
    for kind, held, ticks in plan:
        target = make_target(kind, rng, case)
        for _ in range(ticks):
            if not held:
                target = make_target(kind, rng, case)
            previous, v_prev = filt.position, filt.velocity
            out = filt.step(target)
            outputs.append(out)
            after = copy.copy(filt.counters)
            _check_counters(case, kind, target, before, after)
            if kind in INVALID:
                # Never followed: at most one decelerating step along the previous velocity.
                moved = out - previous
                assert np.all(np.abs(moved) <= np.abs(v_prev) * case.dt * (1 + 1e-9) + 1e-12)
                assert np.all(moved * v_prev >= 0)
            before = after
    assert_limits(case, start, outputs)


def _check_counters(case: Case, kind: str, target: object, before: ClampCounters, after: ClampCounters) -> None:
    grew = {k: after.as_dict()[k] - v for k, v in before.as_dict().items()}
    assert all(0 <= n <= 1 for n in grew.values()), grew  # at most once per tick, never down
    assert grew["nonfinite"] == (kind in INVALID)
    if kind in INVALID or kind == "none":
        assert grew == {**grew, "position": 0, "gripper": 0, "velocity": 0, "acceleration": 0, "braking": 0}
        return
    t = np.asarray(target)
    outside = (t < case.lo) | (t > case.hi)
    assert grew["position"] == bool(outside.any())
    assert grew["gripper"] == bool((outside & case.limits.gripper_mask).any())


@PROPERTY
@given(case=cases(), seed=st.integers(0, 2**32 - 1), ticks=st.integers(1, 300))
def test_feasible_smooth_stream_passes_through_unchanged(case: Case, seed: int, ticks: int) -> None:
    rng = np.random.default_rng(seed)
    lim = case.limits
    half = (case.hi - case.lo) / 2
    centre = (case.hi + case.lo) / 2
    amp = half / 4 * rng.uniform(0.1, 1.0, case.dof)
    # Peak velocity and acceleration at half the limits, and slow enough to brake before the
    # range ends: v (v + 2 a dt) <= 2 a d holds at half the braking speed for d = half - amp.
    room = half - amp
    a, adt = lim.max_acceleration, lim.max_acceleration * case.dt
    braking_speed = -adt + np.sqrt(adt**2 + 2 * a * room)
    omega = np.minimum.reduce([0.5 * lim.max_velocity / amp, np.sqrt(0.5 * a / amp), 0.5 * braking_speed / amp])
    sign = rng.choice([-1.0, 1.0], case.dof)

    def f(t: float) -> np.ndarray:
        return centre + sign * amp * np.cos(omega * t)  # at rest at t = 0, as after reset()

    filt = SafetyFilter(lim, case.dt)
    filt.reset(f(0.0))
    targets = [f(k * case.dt) for k in range(1, ticks + 1)]
    outputs = run(filt, targets)
    np.testing.assert_allclose(np.array(outputs), np.array(targets), rtol=0, atol=1e-9)
    assert filt.counters == ClampCounters(), "nothing was clamped, so nothing may be counted"


@PROPERTY
@given(case=cases(), seed=st.integers(0, 2**32 - 1), ticks=st.integers(0, 200))
def test_decelerate_stops_in_bounded_ticks_and_stays(case: Case, seed: int, ticks: int) -> None:
    rng = np.random.default_rng(seed)
    filt = SafetyFilter(case.limits, case.dt)
    filt.reset(inside_pose(rng, case))
    for _ in range(ticks):  # get moving, typically at full speed somewhere
        filt.step(rng.uniform(case.lo - 1, case.hi + 1))
    lim = case.limits
    # The promise is ceil(vmax / (amax dt)) + 1 ticks from any speed; check the sharper bound for
    # the speed actually reached (it is at most that, and keeps slow-braking draws cheap).
    bound = int(np.max(np.ceil(np.abs(filt.velocity) / (lim.max_acceleration * case.dt)))) + 1
    assert bound <= int(np.max(np.ceil(lim.max_velocity / (lim.max_acceleration * case.dt)))) + 1
    for _ in range(bound):
        filt.decelerate()
    assert np.all(filt.velocity == 0.0)
    held = filt.position
    for _ in range(5):
        np.testing.assert_array_equal(filt.decelerate(), held)


@PROPERTY
@given(case=cases(), seed=st.integers(0, 2**32 - 1), ticks=st.integers(0, 100),
       bad=st.sampled_from(["nan", "inf", "badshape"]))
def test_nonfinite_target_is_exactly_a_decelerating_step(case: Case, seed: int, ticks: int, bad: str) -> None:
    rng = np.random.default_rng(seed)
    filt = SafetyFilter(case.limits, case.dt)
    filt.reset(inside_pose(rng, case))
    for _ in range(ticks):
        filt.step(rng.uniform(case.lo - 1, case.hi + 1))
    reference = copy.deepcopy(filt)
    counted = filt.counters.nonfinite
    np.testing.assert_array_equal(filt.step(make_target(bad, rng, case)), reference.decelerate())
    assert filt.counters.nonfinite == counted + 1


@FEWER
@given(case=cases(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_start_outside_margin_moves_back_without_jumping(case: Case, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    lim = case.limits
    span = lim.upper - lim.lower
    # Some joints start up to half a range beyond the margin on either side (even beyond the
    # physical limits: a miscalibrated or backdriven arm), the others inside.
    beyond = rng.uniform(0, 1, case.dof) * np.minimum(span / 2, 0.5) + 1e-6
    side = rng.choice([-1, 0, 1], case.dof)
    start = np.where(side > 0, case.hi + beyond, np.where(side < 0, case.lo - beyond, inside_pose(rng, case)))
    assume(np.any(side != 0))
    # Generous tick budget: a trapezoid from rest over the distance, at the lowest speed the
    # braking bound on the far side could impose, then twice that.
    adt = lim.max_acceleration * case.dt
    slowest = np.minimum(lim.max_velocity, -adt + np.sqrt(adt**2 + 2 * lim.max_acceleration * (case.hi - case.lo)))
    budget = int(2 * np.max(np.ceil((beyond / slowest + slowest / lim.max_acceleration) / case.dt))) + 10
    assume(budget <= 4000)
    held = data.draw(st.booleans())
    filt = SafetyFilter(lim, case.dt)
    filt.reset(start)
    target = make_target("around", rng, case)
    outputs = []
    for _ in range(budget):
        if not held:
            target = make_target(data.draw(st.sampled_from(["inside", "around", "huge"])) if len(outputs) < 5
                                 else "around", rng, case)
        outputs.append(filt.step(target))
    assert_limits(case, start, outputs, check_range=False)
    positions = np.array(outputs)
    inside = (positions >= case.lo - 1e-9) & (positions <= case.hi + 1e-9)
    assert inside[-1].all(), "every joint is back inside the margin"
    for j in range(case.dof):  # and once inside, it stays inside
        first = int(np.argmax(inside[:, j]))
        assert inside[first:, j].all()
    # Outside, a joint only ever moves inward.
    dist_out = np.maximum(positions - case.hi, 0) + np.maximum(case.lo - positions, 0)
    dist_out = np.vstack([np.maximum(start - case.hi, 0) + np.maximum(case.lo - start, 0), dist_out])
    assert np.all(np.diff(dist_out, axis=0) <= 1e-12)


# --------------------------------------------------------------------------- examples


def _limits(**over: object) -> SafetyLimits:
    base = dict(lower=np.array([-1.0, 0.0]), upper=np.array([1.0, 0.1]), max_velocity=np.array([1.0, 0.2]),
                max_acceleration=np.array([10.0, 2.0]), margin=0.01, gripper_mask=np.array([False, True]))
    return SafetyLimits(**{**base, **over})


def test_each_clamp_is_counted() -> None:
    filt = SafetyFilter(_limits(), dt=0.01)
    filt.reset(np.array([0.0, 0.05]))
    filt.step(np.array([0.0, 0.05]))
    assert filt.counters == ClampCounters()
    filt.step(np.array([0.001, 0.05]))  # 0.1 rad/s from rest: within dv = 0.1 rad/s
    assert filt.counters == ClampCounters()
    filt.step(np.array([0.5, 0.05]))  # 50 rad/s wanted: velocity, then acceleration
    assert (filt.counters.velocity, filt.counters.acceleration, filt.counters.position) == (1, 1, 0)
    filt.step(np.array([0.5, 0.5]))  # gripper beyond its range
    assert (filt.counters.position, filt.counters.gripper) == (1, 1)
    filt.step(np.array([0.0, math.nan]))
    assert filt.counters.nonfinite == 1
    filt = SafetyFilter(_limits(), dt=0.01)
    filt.reset(np.array([0.0, 0.05]))
    for k in range(300):  # a reference running into the upper limit at speed: braking must engage
        filt.step(np.array([0.005 * k, 0.05]))  # 0.5 rad/s, trackable, then clamped at the limit
    assert filt.counters.braking > 0
    assert filt.position[0] <= 1.0 - 0.01 + 1e-12
    assert set(filt.counters.as_dict()) == {"nonfinite", "position", "velocity", "acceleration", "braking",
                                            "gripper", "jerk", "stale", "workspace", "separation"}


def test_step_before_reset_is_refused() -> None:
    with pytest.raises(RuntimeError, match="reset"):
        SafetyFilter(_limits(), dt=0.01).step(np.zeros(2))


def test_reset_validates_the_pose() -> None:
    filt = SafetyFilter(_limits(), dt=0.01)
    with pytest.raises(ValueError, match="shape"):
        filt.reset(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        filt.reset(np.array([0.0, math.inf]))


def test_properties_are_copies() -> None:
    filt = SafetyFilter(_limits(), dt=0.01)
    filt.reset(np.array([0.0, 0.05]))
    filt.position[0] = 99.0
    filt.velocity[0] = 99.0
    out = filt.step(np.array([0.0, 0.05]))
    out[0] = 99.0
    assert filt.position[0] == 0.0 and filt.velocity[0] == 0.0


@pytest.mark.parametrize("over, message", [
    (dict(upper=np.array([1.0, 0.1, 2.0])), "shape"),
    (dict(lower=np.array([-1.0, 0.05]), upper=np.array([1.0, 0.06])), "no room"),
    (dict(max_velocity=np.array([1.0, 0.0])), "max_velocity must be > 0"),
    (dict(max_acceleration=np.array([1.0, -2.0])), "max_acceleration must be > 0"),
    (dict(lower=np.array([-math.inf, 0.0])), "lower must be finite"),
    (dict(max_velocity=np.array([math.nan, 1.0])), "max_velocity must be finite"),
    (dict(margin=-0.1), "margin"),
    (dict(gripper_mask=np.array([True])), "gripper_mask"),
    (dict(lower=np.zeros((2, 2))), "one-dimensional"),
    (dict(lower=np.array([]), upper=np.array([]), max_velocity=np.array([]), max_acceleration=np.array([]),
          gripper_mask=np.array([], dtype=bool)), "at least one dof"),
])
def test_limits_validation(over: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _limits(**over)


def test_limits_are_read_only_copies() -> None:
    lower = np.array([-1.0, 0.0])
    lim = _limits(lower=lower)
    lower[0] = 5.0
    assert lim.lower[0] == -1.0
    with pytest.raises(ValueError):
        lim.lower[0] = 3.0


def test_from_embodiment() -> None:
    from armada.runtime.config import load_embodiment

    emb = load_embodiment("mock_arm")
    lim = SafetyLimits.from_embodiment(emb)
    np.testing.assert_array_equal(lim.lower, emb.lower)
    np.testing.assert_array_equal(lim.max_acceleration, emb.max_acceleration)
    assert lim.margin == emb.position_margin
    np.testing.assert_array_equal(lim.gripper_mask, emb.gripper_mask())
    filt = SafetyFilter(lim, 1 / emb.control_rate_hz)
    filt.reset(emb.home)
    np.testing.assert_allclose(filt.step(emb.home), emb.home)


def test_bad_dt_is_refused() -> None:
    for dt in (0.0, -0.01, math.nan, math.inf):
        with pytest.raises(ValueError, match="dt"):
            SafetyFilter(_limits(), dt)


@settings(max_examples=150, deadline=None)
@given(start=st.floats(-0.9, 0.9), goal=st.floats(-0.9, 0.9), dt=st.sampled_from([0.002, 0.005, 0.02]))
def test_a_step_target_is_reached_without_overshoot_or_ringing(start: float, goal: float, dt: float) -> None:
    # Aiming straight at the goal with an acceleration clamp overshoots and rings; the filter's
    # catch-up law must approach monotonically and settle exactly.
    filt = SafetyFilter(_limits(), dt=dt)
    filt.reset(np.array([start, 0.05]))
    direction = np.sign(goal - start)
    positions = [filt.step(np.array([goal, 0.05]))[0] for _ in range(int(3.0 / dt))]
    steps = np.diff([start] + positions)
    assert np.all(steps * direction >= -1e-12)  # never moves backward: no ringing
    assert np.all((np.array(positions) - goal) * direction <= 1e-12)  # never past the goal
    assert abs(positions[-1] - goal) < 1e-9


def test_after_an_overrun_the_filter_rejoins_the_stream_without_ringing() -> None:
    # An overrun makes the sampled reference skip ahead one tick. That costs a couple of
    # acceleration clamps; the filter must then catch up and follow exactly, not ring.
    filt = SafetyFilter(_limits(), dt=0.002)
    filt.reset(np.array([0.0, 0.05]))
    t = np.arange(1, 1500) * 0.002
    t[300:] += 0.002  # one skipped tick
    ref = 0.3 * (1 - np.cos(2 * np.pi * 0.25 * t))
    errors = []
    for r in ref:
        errors.append(filt.step(np.array([r, 0.05]))[0] - r)
    assert filt.counters.velocity == 0 and filt.counters.acceleration <= 3
    assert np.all(np.abs(errors[:300]) < 1e-12)
    assert np.all(np.abs(errors[400:]) < 1e-9)  # rejoined within 0.2 s
    lag = np.abs(errors[300:400])
    assert np.all(np.diff(lag[np.argmax(lag):]) <= 1e-12)  # the lag only shrinks once it peaked
