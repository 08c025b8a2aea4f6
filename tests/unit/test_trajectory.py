"""Tests for the driver's trajectory buffer and move planner."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from armada.drivers.core.trajectory import MERGE_MODES, Sample, TrajectoryBuffer, move_duration, plan_move

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MS = 1_000_000
T0 = 5_000_000_000_000  # a monotonic clock that has been up for a while


def ramp(n: int, dof: int = 2, start: float = 0.0, step: float = 1.0) -> np.ndarray:
    """Points whose every joint goes start, start + step, ...: easy to interpolate by hand."""
    return np.repeat((start + step * np.arange(n, dtype=float))[:, None], dof, axis=1)


def snapshot(buf: TrajectoryBuffer, probes: list[int]) -> tuple:
    samples = []
    for now in probes:  # sample() drops spent points, so probe a copy of the state via first_point
        fp = buf.first_point_at_or_after(now)
        samples.append(None if fp is None else fp.tolist())
    return len(buf), buf.end_ns(), samples


def hermite_reference(t_ns: np.ndarray, x: np.ndarray, tq_ns: np.ndarray) -> np.ndarray:
    """Reference for the buffer's sampling, written independently of it: knots ``(t_ns, x)`` (the
    whole buffer, first point first), a cubic per segment in the power basis. The tangent at an
    inner knot is the derivative there of the parabola through it and its two neighbours,
    (h_right * slope_left + h_left * slope_right) / (h_left + h_right); zero at the first and last
    knot."""
    t = (np.asarray(t_ns, dtype=np.int64) - int(t_ns[0])) * 1e-9
    tq = (np.asarray(tq_ns, dtype=np.int64) - int(t_ns[0])) * 1e-9
    x = np.asarray(x, dtype=float).reshape(len(t), -1)
    gaps = np.diff(t)[:, None]
    secants = np.diff(x, axis=0) / gaps
    m = np.zeros_like(x)
    m[1:-1] = (gaps[1:] * secants[:-1] + gaps[:-1] * secants[1:]) / (gaps[:-1] + gaps[1:])
    k = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, len(t) - 2)
    h = (t[k + 1] - t[k])[:, None]
    s = (tq - t[k])[:, None]
    d = (x[k + 1] - x[k]) / h
    c2 = (3 * d - 2 * m[k] - m[k + 1]) / h  # p(s) = x + m s + c2 s^2 + c3 s^3 with p(h), p'(h) matching
    c3 = (m[k] + m[k + 1] - 2 * d) / h**2
    return x[k] + s * (m[k] + s * (c2 + s * c3))


def test_hermite_reference_is_exact_for_a_parabola_on_uneven_knots() -> None:
    # Checks the reference itself: inner tangents are the parabola's own slope, so every segment
    # between inner knots is the parabola (the plain Catmull-Rom (x[k+1] - x[k-1]) / (t[k+1] - t[k-1])
    # would be off by f'' (h_right - h_left) / 2 here).
    t_ns = T0 + np.array([0, 7, 27, 30, 50, 51, 90]) * MS
    t = (t_ns - T0) * 1e-9
    x = (3.0 - 20.0 * t + 400.0 * t**2)[:, None]
    tq = np.arange(int(t_ns[1]), int(t_ns[-2]) + 1, MS // 4)
    s = (tq - T0) * 1e-9
    np.testing.assert_allclose(hermite_reference(t_ns, x, tq)[:, 0], 3.0 - 20.0 * s + 400.0 * s**2,
                               rtol=0, atol=1e-12)


def play(buf: TrajectoryBuffer, ticks: range) -> tuple[np.ndarray, np.ndarray]:
    """Sample every tick in order; the ticks that were tracking and their targets."""
    times, targets = [], []
    for now in ticks:
        s = buf.sample(now)
        if s.status == "tracking":
            times.append(now)
            targets.append(s.target)
    return np.array(times, dtype=np.int64), np.array(targets)


# --------------------------------------------------------------------------- sampling


def test_hermite_interpolation_between_points() -> None:
    buf = TrajectoryBuffer(2)
    assert buf.add_chunk(T0, 0.01, ramp(5), "replace", T0, episode=3, chunk=7) == 5
    # Knots 0, 1, 2, 3, 4 at 0, 10, ..., 40 ms; tangents 0 at the ends, 100 /s inside (h * m = 1).
    # With u the fraction of the segment, p = h00 x_j + h10 h m_j + h01 x_i + h11 h m_i where
    # h00 = 2u^3 - 3u^2 + 1, h10 = u^3 - 2u^2 + u, h01 = -2u^3 + 3u^2, h11 = u^3 - u^2.
    s = buf.sample(T0 + 25 * MS // 10)  # u = 1/4 into the first segment, from rest:
    assert s.status == "tracking" and (s.episode, s.chunk) == (3, 7)
    # h01 * 1 + h11 * 1 = 0.15625 - 0.046875 (linear would say 0.25)
    np.testing.assert_allclose(s.target, [0.109375, 0.109375], rtol=1e-12)
    # Inside, both tangents equal the secant: Hermite reproduces the straight line.
    np.testing.assert_allclose(buf.sample(T0 + 15 * MS).target, [1.5, 1.5], rtol=1e-12)
    np.testing.assert_array_equal(buf.sample(T0 + 30 * MS).target, [3.0, 3.0])  # exactly on a point
    # u = 1/2 into the last segment, coming to rest: .5 * 3 + .125 * 1 + .5 * 4 - .125 * 0 (linear: 3.5)
    np.testing.assert_allclose(buf.sample(T0 + 35 * MS).target, [3.625, 3.625], rtol=1e-12)


def test_waiting_then_tracking_then_dry() -> None:
    buf = TrajectoryBuffer(2)
    assert buf.sample(T0) == Sample("dry", None)  # empty
    buf.add_chunk(T0 + 10 * MS, 0.01, ramp(3), "replace", T0)
    assert buf.sample(T0) == Sample("waiting", None)
    assert buf.sample(T0 + 10 * MS - 1).status == "waiting"
    assert buf.sample(T0 + 10 * MS).status == "tracking"
    last = buf.sample(T0 + 30 * MS)  # exactly at the last point: still tracking it
    assert last.status == "tracking"
    np.testing.assert_array_equal(last.target, [2.0, 2.0])
    assert buf.sample(T0 + 30 * MS + 1) == Sample("dry", None)
    assert len(buf) == 0 and buf.end_ns() is None


def test_a_chunk_after_running_dry_waits_instead_of_bridging_from_the_old_end() -> None:
    buf = TrajectoryBuffer(2)
    buf.add_chunk(T0, 0.01, ramp(2), "replace", T0)
    # No sample() in between: add_chunk must reach the same conclusion on its own.
    buf.add_chunk(T0 + 100 * MS, 0.01, ramp(2, start=5.0), "replace", T0 + 50 * MS)
    assert buf.sample(T0 + 60 * MS).status == "waiting"
    np.testing.assert_array_equal(buf.first_point_at_or_after(T0 + 60 * MS), [5.0, 5.0])


def test_past_points_are_dropped_on_add_and_on_sample() -> None:
    buf = TrajectoryBuffer(2)
    now = T0 + 35 * MS
    # Points at 0, 10, ..., 90 ms: 0 and 10 are spent; 20 is kept for the tangent at 30, 30 to
    # interpolate from at 35, and 40.. are ahead.
    assert buf.add_chunk(T0, 0.01, ramp(10), "replace", now) == 6
    assert len(buf) == 8
    # The tangent at 30 is (4 - 2) / 20 ms, the same as at 40, so the ramp is reproduced. Had 20
    # been dropped, the tangent at 30 would be zero: .5 * 3 + .5 * 4 - .125 * 1 = 3.375.
    np.testing.assert_allclose(buf.sample(now).target, [3.5, 3.5], rtol=1e-12)
    np.testing.assert_allclose(buf.sample(T0 + 72 * MS).target, [7.2, 7.2], rtol=1e-12)
    assert len(buf) == 3  # 70 (to interpolate from), 80, 90; 60 stays only in the arrays, for the tangent
    np.testing.assert_array_equal(buf.first_point_at_or_after(T0 + 72 * MS), [8.0, 8.0])
    assert buf.end_ns() == T0 + 90 * MS


def test_chunk_entirely_in_the_past_changes_nothing() -> None:
    buf = TrajectoryBuffer(2)
    buf.add_chunk(T0, 0.01, ramp(10), "replace", T0)
    before = snapshot(buf, [T0, T0 + 50 * MS])
    assert buf.add_chunk(T0 - 100 * MS, 0.01, ramp(5, start=9.0), "replace", T0) == 0
    assert snapshot(buf, [T0, T0 + 50 * MS]) == before


def test_chunk_starting_slightly_in_the_past_interpolates_at_now() -> None:
    buf = TrajectoryBuffer(2)
    now = T0 + 5 * MS
    assert buf.add_chunk(T0, 0.02, ramp(3), "replace", now) == 2  # point 0 is kept to interpolate from
    assert len(buf) == 3
    # Point 0 has no predecessor: tangent 0. Tangent at point 1: (2 - 0) / 40 ms, h * m = 1.
    # u = 1/4: h01 * 1 + h11 * 1 = 0.15625 - 0.046875.
    np.testing.assert_allclose(buf.sample(now).target, [0.109375, 0.109375], rtol=1e-12)
    # With two points before now, the older one gives the tangent and the ramp is reproduced.
    buf = TrajectoryBuffer(2)
    now = T0 + 25 * MS
    assert buf.add_chunk(T0, 0.02, ramp(4), "replace", now) == 2
    assert len(buf) == 4
    np.testing.assert_allclose(buf.sample(now).target, [1.25, 1.25], rtol=1e-12)


def test_first_point_at_or_after() -> None:
    buf = TrajectoryBuffer(2)
    assert buf.first_point_at_or_after(T0) is None
    buf.add_chunk(T0 + 10 * MS, 0.01, ramp(3), "replace", T0)
    np.testing.assert_array_equal(buf.first_point_at_or_after(T0), [0.0, 0.0])
    np.testing.assert_array_equal(buf.first_point_at_or_after(T0 + 10 * MS), [0.0, 0.0])
    np.testing.assert_array_equal(buf.first_point_at_or_after(T0 + 10 * MS + 1), [1.0, 1.0])
    assert buf.first_point_at_or_after(T0 + 31 * MS) is None


def test_clear() -> None:
    buf = TrajectoryBuffer(2)
    buf.add_chunk(T0, 0.01, ramp(3), "replace", T0)
    buf.clear()
    assert len(buf) == 0 and buf.end_ns() is None and buf.sample(T0).status == "dry"


def test_returned_target_is_a_copy_and_the_chunk_is_copied() -> None:
    buf = TrajectoryBuffer(2)
    points = ramp(3)
    buf.add_chunk(T0, 0.01, points, "replace", T0)
    points[:] = 99.0
    s = buf.sample(T0)
    s.target[:] = 42.0
    np.testing.assert_array_equal(buf.sample(T0).target, [0.0, 0.0])


# --------------------------------------------------------------------------- Hermite smoothness


W = 2 * np.pi * 0.25  # 0.25 Hz
AMP = 0.3
A_MAX = AMP * W**2  # the largest acceleration of rest_to_rest, ~0.74 /s^2


def rest_to_rest(t: np.ndarray) -> np.ndarray:
    """0.3 (1 - cos(2 pi 0.25 t)): at rest at t = 0 s and t = 2 s, as the buffer's ends are."""
    return AMP * (1 - np.cos(W * np.asarray(t, dtype=float)))


def accel(x: np.ndarray, tick_s: float) -> np.ndarray:
    return np.diff(x, 2, axis=0) / tick_s**2


def _knots_after_replace(grid_old: np.ndarray, grid_new: np.ndarray,
                         now: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Which knots at or after ``now`` a replace leaves in the buffer, as masks on the old and the
    new grid, when the buffer held the whole old chunk (a restatement of the merge rules, kept
    apart from the module). Only what is still useful at now counts (a chunk that ended before it
    is dead; of its points before now, the last two). While the old chunk is playing at now (a
    point at or before now, and one at or after it), its last point at or before now was played:
    the new chunk takes over strictly after it. From the first new point kept on, everything is
    the new chunk's. The flag is False when no new point is left (the chunk's only point ahead is
    on the played one, at now): then only that played knot is certain to stay."""
    def live(grid: np.ndarray) -> np.ndarray:
        if grid[-1] < now:
            return np.zeros(len(grid), bool)
        last_past = int(np.searchsorted(grid, now, side="right")) - 1
        return np.arange(len(grid)) >= max(last_past - 1, 0)

    old_live, new_live = live(grid_old), live(grid_new)
    if old_live.any() and grid_old[0] <= now:
        new_live &= grid_new > grid_old[grid_old <= now][-1]
    if not new_live.any():
        return old_live & (grid_old == now), new_live, False
    first_new = grid_new[new_live][0]
    return old_live & (grid_old >= now) & (grid_old < first_new), new_live & (grid_new >= now), True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), dt=st.floats(0.001, 0.05), n=st.integers(2, 40), dof=st.integers(1, 4),
       lead=st.floats(-1, 1), lead2=st.floats(-1, 1), cut=st.floats(0, 1))
# Both chunks start exactly at now: the new one's knot at now is the buffer's own (played) knot.
@example(seed=0, dt=0.03125, n=2, dof=1, lead=0.0, lead2=0.0, cut=0.0)
@example(seed=1, dt=0.02, n=10, dof=2, lead=0.0, lead2=-0.5, cut=0.0)
@example(seed=0, dt=0.03125, n=2, dof=1, lead=0.0, lead2=-0.5, cut=0.0)  # the new chunk ends at now
# A replace that starts after the old knots still ahead: those stay, and are hit too.
@example(seed=2, dt=0.01, n=10, dof=2, lead=0.0, lead2=0.5, cut=0.3)
def test_knots_are_hit_exactly(seed: int, dt: float, n: int, dof: int, lead: float, lead2: float,
                               cut: float) -> None:
    rng = np.random.default_rng(seed)
    span = int(n * dt * 1e9)
    now = T0 + 123_457  # not on any round grid
    x1 = rng.normal(0, 3, (n, dof))
    t1 = now + int(lead * span)
    buf = TrajectoryBuffer(dof)
    buf.add_chunk(t1, dt, x1, "replace", now)
    grid1 = _grid(t1, dt, n)
    ahead = [k for k in range(n) if grid1[k] >= now]
    # Play the first chunk's knots up to a cut, then replace from around there and play the new ones.
    played = ahead[: int(cut * len(ahead))]
    for k in played:
        s = buf.sample(int(grid1[k]))
        assert s.status == "tracking"
        np.testing.assert_array_equal(s.target, x1[k])
    now2 = int(grid1[played[-1]]) + 1 if played else now
    x2 = rng.normal(0, 3, (n, dof))
    t2 = now2 + int(lead2 * span)
    grid2 = _grid(t2, dt, n)
    kept = buf.add_chunk(t2, dt, x2, "replace", now2)
    assert kept == np.count_nonzero(grid2 >= now2)
    if kept == 0:
        return  # entirely in the past
    # Every knot the buffer holds from now2 on is hit exactly, in time order: the old chunk's that
    # the new one left (before it starts, or the old knot at now2 itself, which was played), then
    # the new chunk's.
    old_kept, new_kept, complete = _knots_after_replace(grid1, grid2, now2)
    knots = sorted([(int(grid1[k]), x1[k]) for k in np.flatnonzero(old_kept)]
                   + [(int(grid2[k]), x2[k]) for k in np.flatnonzero(new_kept)], key=lambda tx: tx[0])
    # Only a new knot exactly at now2 can give way (to the old knot there).
    assert np.count_nonzero(new_kept) in (kept, kept - 1)
    assert [t for t, _ in knots] == sorted({t for t, _ in knots})
    for t, x in knots:
        s = buf.sample(t)
        assert s.status == "tracking"
        np.testing.assert_array_equal(s.target, x)
    if complete:
        assert buf.end_ns() == knots[-1][0]


def test_velocity_is_continuous_across_knots() -> None:
    tick = 2 * MS
    knots = np.arange(101) * 0.02  # 50 Hz over 2 s, rest to rest
    buf = TrajectoryBuffer(1)
    buf.add_chunk(T0, 0.02, rest_to_rest(knots)[:, None], "replace", T0)
    times, targets = play(buf, range(T0, T0 + 2000 * MS + 1, tick))
    assert len(times) == 1001
    a = accel(targets[:, 0], tick * 1e-9)
    assert np.max(np.abs(a)) <= 1.5 * A_MAX + 1e-6
    # The bound has teeth: linear interpolation of the same knots changes velocity by about
    # f'' * dt_chunk at each knot, within a single tick, so its finite-difference acceleration
    # there is about f'' * dt_chunk / dt_tick = 10 times the true one.
    linear = np.interp((times - T0) * 1e-9, knots, rest_to_rest(knots))
    assert np.max(np.abs(accel(linear, tick * 1e-9))) > 5 * A_MAX


@pytest.mark.parametrize("t0_ms", [
    # The buffer's last point at or before now (1500 ms) was played: the new chunk takes over from
    # its first point after it, so every seam but 1500's joins uneven knots, down to 1 ms apart.
    1447,  # stamped in the past (latency): three of its points are already past; from 1507 on
    1487,  # only one of its points is past; from 1507 on
    1500,  # a point on the played one: from 1520 on
    1501,  # 1 ms after the played point
    1507,  # starts just after now
    1527,
])
def test_velocity_is_continuous_across_a_replace_seam(t0_ms: int) -> None:
    # Two chunks of the one smooth function, the second on a grid 0, 1 or 7 ms off the first,
    # swapped in at t = 1.506 s, where both velocity and acceleration are large (3/4 of the way to pi).
    tick = 2 * MS
    buf = TrajectoryBuffer(1)
    knots1 = np.arange(101) * 0.02
    buf.add_chunk(T0, 0.02, rest_to_rest(knots1)[:, None], "replace", T0)
    switch = T0 + 1506 * MS
    n2 = (2000 - t0_ms) // 20 + 1
    knots2 = t0_ms * 1e-3 + np.arange(n2) * 0.02
    end2 = T0 + (t0_ms + 20 * (n2 - 1)) * MS
    times, targets = play(buf, range(T0, switch, tick))
    assert buf.add_chunk(T0 + t0_ms * MS, 0.02, rest_to_rest(knots2)[:, None], "replace", switch) > 0
    times2, targets2 = play(buf, range(switch, end2 + 1, tick))
    times, targets = np.concatenate([times, times2]), np.concatenate([targets, targets2])
    assert np.all(np.diff(times) == tick) and times[-1] > end2 - tick
    # The second chunk's last knot (not a rest point of the function) is stopped at: leave its
    # last segment out.
    # The tangent (h_right * slope_left + h_left * slope_right) / (h_left + h_right) is exact for a
    # parabola on any knots, so the seam does not bend the curve: the acceleration stays at the
    # function's own (the plain Catmull-Rom (x[k+1] - x[k-1]) / (t[k+1] - t[k-1]) reached 2-4 times
    # it on the 1507 and 1527 ms seams).
    a = accel(targets[:, 0], tick * 1e-9)[times[1:-1] < end2 - 20 * MS]
    assert np.max(np.abs(a)) <= 1.1 * A_MAX


def test_motion_starts_from_an_anchor_and_ends_at_rest() -> None:
    slope = 5.0  # the chunk is a straight line at 5 /s
    now = T0
    t0 = now - 30 * MS
    knots = _grid(t0, 0.02, 6)  # -30, -10, 10, 30, 50, 70 ms
    points = (slope * (knots - now) * 1e-9)[:, None]
    buf = TrajectoryBuffer(1)
    assert buf.add_chunk(t0, 0.02, points, "replace", now, anchor=np.array([0.0])) == 4
    d = 10_000  # 10 us

    def velocity(t: int) -> float:
        before = buf.sample(t).target[0]  # in time order: sample() drops what is spent
        return float((buf.sample(t + d).target[0] - before) / (d * 1e-9))

    # From rest: a linear start, or a tangent taken from the chunk, would be at 5 /s here.
    assert abs(velocity(now)) <= 0.01 * slope
    # Inside, the tangents are the line's own slope.
    assert velocity(now + 40 * MS) == pytest.approx(slope, rel=1e-6)
    # To rest at the last point.
    assert abs(velocity(now + 70 * MS - d)) <= 0.01 * slope
    assert buf.sample(now + 70 * MS).target[0] == points[-1, 0]
    assert buf.sample(now + 70 * MS + 1).status == "dry"
    # A trajectory that starts after waiting (no anchor) also starts from rest.
    buf = TrajectoryBuffer(1)
    buf.add_chunk(now + 10 * MS, 0.02, points, "replace", now)
    assert buf.sample(now).status == "waiting"
    assert abs(velocity(now + 10 * MS)) <= 0.01 * slope


def _line(t_ns: np.ndarray) -> np.ndarray:
    t = (np.asarray(t_ns) - T0) * 1e-9
    return np.stack([0.5 + 2.0 * t, -1.0 - 3.0 * t], axis=-1)


@pytest.mark.parametrize("dt1, dt2, offset_ms", [
    (0.02, 0.02, -53),  # three of the new chunk's points are past
    (0.02, 0.02, -13),  # one is
    (0.02, 0.02, 7),  # none
    (0.02, 0.01, -3),
    (0.02, 0.002, 1),
    (0.002, 0.02, -15),  # a coarser chunk (50 Hz policy after a 500 Hz move) with one point past
])
def test_replace_seam_on_a_straight_line_stays_on_it(dt1: float, dt2: float, offset_ms: int) -> None:
    """The tangents (weighted averages of the neighbouring secants) of points on a line are the
    line's slope, on any grid: except at the trajectory's first and last segments (which start and
    stop at rest), the buffer must follow the line exactly, across the seam too. A zero tangent
    anywhere else breaks this, and so does a coarse chunk that reaches back past the buffer's
    played point (its points would replace the fine ones that give that point its tangent)."""
    tick = 2 * MS
    buf = TrajectoryBuffer(2)
    t1 = _grid(T0, dt1, round(0.3 / dt1) + 1)
    buf.add_chunk(T0, dt1, _line(t1), "replace", T0)
    switch = T0 + 106 * MS  # mid-segment on the 20 ms grid
    times, targets = play(buf, range(T0, switch, tick))
    t2 = _grid(switch + offset_ms * MS, dt2, round(0.3 / dt2) + 1)
    assert buf.add_chunk(int(t2[0]), dt2, _line(t2), "replace", switch) > 0
    times2, targets2 = play(buf, range(switch, int(t2[-1]) + 1, tick))
    times, targets = np.concatenate([times, times2]), np.concatenate([targets, targets2])
    assert np.all(np.diff(times) == tick)
    inside = (times >= t1[1]) & (times <= t2[-2])
    np.testing.assert_allclose(targets[inside], _line(times[inside]), rtol=0, atol=1e-9)


def _parabola(t_ns: np.ndarray) -> np.ndarray:
    t = (np.asarray(t_ns) - T0) * 1e-9
    return np.stack([0.5 + 2.0 * t - 7.0 * t**2, -1.0 - 3.0 * t + 11.0 * t**2], axis=-1)


@pytest.mark.parametrize("dt1, dt2, offset_ms", [
    (0.02, 0.02, -53),
    (0.02, 0.02, -5),  # takes over 1 ms after the played point at 100 ms
    (0.02, 0.02, 7),
    (0.02, 0.013, -3),
    (0.02, 0.002, 1),
    (0.002, 0.02, -15),
    (0.002, 0.03, -1),
])
def test_replace_seam_on_a_parabola_stays_on_it(dt1: float, dt2: float, offset_ms: int) -> None:
    """The tangent (h_right * slope_left + h_left * slope_right) / (h_left + h_right) is the slope
    of the parabola through a knot and its neighbours, on any spacing: between its first and last
    segments the buffer follows a parabola exactly, across a seam of uneven knots too."""
    tick = 2 * MS
    buf = TrajectoryBuffer(2)
    t1 = _grid(T0, dt1, round(0.3 / dt1) + 1)
    buf.add_chunk(T0, dt1, _parabola(t1), "replace", T0)
    switch = T0 + 106 * MS
    times, targets = play(buf, range(T0, switch, tick))
    t2 = _grid(switch + offset_ms * MS, dt2, round(0.3 / dt2) + 1)
    assert buf.add_chunk(int(t2[0]), dt2, _parabola(t2), "replace", switch) > 0
    times2, targets2 = play(buf, range(switch, int(t2[-1]) + 1, tick))
    times, targets = np.concatenate([times, times2]), np.concatenate([targets, targets2])
    assert np.all(np.diff(times) == tick)
    inside = (times >= t1[1]) & (times <= t2[-2])
    np.testing.assert_allclose(targets[inside], _parabola(times[inside]), rtol=0, atol=1e-9)


def test_add_chunk_after_sample_keeps_the_tangent_point() -> None:
    """sample() advances past spent points; an add_chunk after it must still keep the point before
    the current segment, which gives that segment its tangent. Replacing the future with the very
    same points must not change the target."""
    tick = 2 * MS
    knots = np.arange(101) * 0.02
    bufs = [TrajectoryBuffer(1), TrajectoryBuffer(1)]
    for buf in bufs:
        buf.add_chunk(T0, 0.02, rest_to_rest(knots)[:, None], "replace", T0)
        play(buf, range(T0, T0 + 1506 * MS + 1, tick))  # now inside the 1500 -> 1520 ms segment
    same = np.arange(80, 101)  # the points from 1600 ms on, again
    bufs[1].add_chunk(T0 + 1600 * MS, 0.02, rest_to_rest(knots[same])[:, None], "replace", T0 + 1506 * MS)
    ticks = range(T0 + 1508 * MS, T0 + 2000 * MS + 1, tick)
    (ta, xa), (tb, xb) = (play(buf, ticks) for buf in bufs)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(xb, xa, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- anchor


@pytest.mark.parametrize("offset_ms, n", [
    (-30, 5),  # stamped partly in the past: -30, -10, 10, 30, 50 ms
    (0, 5),  # a point exactly at now: the anchor takes its place
    (30, 5),  # entirely ahead: no waiting, it starts from the pose now
    (-10, 2),  # short: no point a whole step ahead, so head for its last point
    (5, 1),
])
def test_anchor_starts_an_empty_buffer_at_the_pose_now(offset_ms: int, n: int) -> None:
    now = T0 + 1000 * MS
    t0 = now + offset_ms * MS
    points = np.array([[1.0, 2.0], [1.5, 2.5], [2.0, 3.0], [3.0, 4.0], [4.0, 5.0]])[:n]
    grid = _grid(t0, 0.02, n)
    # After the pose at now come the chunk's points at least one chunk step (20 ms) after now, so
    # that the first segment is not arbitrarily short (or, if there are none, its last point).
    ahead = grid >= now + 20 * MS
    if not ahead.any():
        ahead[-1] = True
    pose = np.array([0.2, -0.4])
    buf = TrajectoryBuffer(2)
    kept = buf.add_chunk(t0, 0.02, points, "replace", now, episode=2, chunk=9, anchor=pose)
    assert kept == np.count_nonzero(grid >= now)
    assert len(buf) == 1 + np.count_nonzero(ahead)
    s = buf.sample(now)
    assert s.status == "tracking" and (s.episode, s.chunk) == (2, 9)
    np.testing.assert_array_equal(s.target, pose)
    # From the pose (at rest) to the chunk's first point ahead, and on through the chunk.
    knots_t = np.concatenate([[now], grid[ahead]])
    knots_x = np.vstack([pose, points[ahead]])
    ticks = range(now + 1 * MS, int(grid[-1]) + 1, 1 * MS)
    times, targets = play(buf, ticks)
    np.testing.assert_array_equal(times, list(ticks))
    np.testing.assert_allclose(targets, hermite_reference(knots_t, knots_x, times), rtol=0, atol=1e-12)
    for k in np.flatnonzero(ahead):  # its points are reached exactly
        np.testing.assert_array_equal(targets[list(times).index(int(grid[k]))], points[k])


def test_anchor_starts_a_waiting_buffer_now() -> None:
    now = T0
    buf = TrajectoryBuffer(2)
    buf.add_chunk(now + 50 * MS, 0.02, ramp(3, start=7.0), "replace", now)
    assert buf.sample(now).status == "waiting"
    pose = np.array([1.0, -1.0])
    # Points at -10, 10, 30, 50, 70 ms: from the pose now to the first one a step (20 ms) ahead.
    buf.add_chunk(now - 10 * MS, 0.02, ramp(5, start=3.0), "replace", now, anchor=pose)
    assert len(buf) == 4
    np.testing.assert_array_equal(buf.sample(now).target, pose)
    np.testing.assert_array_equal(buf.sample(now + 30 * MS).target, [5.0, 5.0])
    assert buf.end_ns() == now + 70 * MS


@pytest.mark.parametrize("merge", MERGE_MODES)
def test_anchor_with_a_chunk_that_ends_exactly_at_now(merge: str) -> None:
    """The chunk's only point not in the past is at now itself: the buffer must still start at the
    pose (no jump) and keep strictly increasing times, so that a further merge at the same now
    (which interpolates the buffer) stays finite."""
    now = T0
    pose = np.array([0.0, 0.0])
    chunk = np.array([[1.0, 1.0], [2.0, 2.0]])  # at -10 ms and exactly at now
    alone, merged = TrajectoryBuffer(2), TrajectoryBuffer(2)
    for buf in (alone, merged):
        assert buf.add_chunk(now - 10 * MS, 0.01, chunk, "replace", now, anchor=pose) == 1
    merged.add_chunk(now, 0.01, np.array([[3.0, 3.0], [4.0, 4.0]]), merge, now)
    times, targets = play(merged, range(now, now + 10 * MS + 1, 1 * MS))
    assert len(times) == 11
    assert np.all(np.isfinite(targets))
    np.testing.assert_array_equal(alone.sample(now).target, pose)


@pytest.mark.parametrize("first_ms", [0, -15])  # the buffer's first point at now, or before it
@pytest.mark.parametrize("merge", MERGE_MODES)
def test_no_anchor_while_tracking(first_ms: int, merge: str) -> None:
    now = T0 + 100 * MS
    bufs = [TrajectoryBuffer(2), TrajectoryBuffer(2)]
    for buf, anchor in zip(bufs, [None, np.array([50.0, -50.0])]):
        buf.add_chunk(now + first_ms * MS, 0.01, ramp(10), "replace", now)
        buf.add_chunk(now - 25 * MS, 0.01, ramp(10, start=0.5), merge, now, anchor=anchor)
    ticks = range(now, now + 100 * MS, 2 * MS)
    (ta, xa), (tb, xb) = (play(buf, ticks) for buf in bufs)
    assert len(ta) > 0
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(xa, xb)
    assert not np.any(np.all(xb == [50.0, -50.0], axis=1))


@pytest.mark.parametrize("anchor", [np.zeros(3), np.zeros((1, 2)), np.zeros(0), np.array([math.nan, 0.0]),
                                    np.array([0.0, math.inf]), [[0.0], [1.0]]])
@pytest.mark.parametrize("waiting", [False, True])
def test_bad_anchor_is_refused_and_changes_nothing(anchor: object, waiting: bool) -> None:
    now = T0
    buf = TrajectoryBuffer(2)
    if waiting:
        buf.add_chunk(now + 40 * MS, 0.01, ramp(5), "replace", now)
    probes = [now, now + 45 * MS, now + 90 * MS]
    before = snapshot(buf, probes)
    with pytest.raises(ValueError, match="anchor"):
        buf.add_chunk(now - 10 * MS, 0.01, ramp(5, start=50.0), "replace", now, anchor=anchor)
    assert snapshot(buf, probes) == before
    assert buf.sample(now).status == ("waiting" if waiting else "dry")


# --------------------------------------------------------------------------- merging


def test_replace_from_the_middle() -> None:
    buf = TrajectoryBuffer(2)
    buf.add_chunk(T0, 0.01, ramp(10), "replace", T0, episode=1, chunk=0)
    now = T0 + 22 * MS
    assert buf.add_chunk(T0 + 50 * MS, 0.01, ramp(3, start=100.0), "replace", now, episode=1, chunk=1) == 3
    # Old 10 (tangent), 20 (to interpolate from), 30, 40; then the new chunk at 50, 60, 70. Old
    # 50..90 are gone.
    assert len(buf) == 7 and buf.end_ns() == T0 + 70 * MS
    assert buf.sample(T0 + 40 * MS).chunk == 0
    # Bridging from the old 40 (value 4) to the new 50 (value 100): the tangents there are
    # (100 - 3) / 20 ms and (101 - 4) / 20 ms, h * m = 48.5 at both. A quarter of the way:
    # .84375 * 4 + .140625 * 48.5 + .15625 * 100 - .046875 * 48.5 (linear would say 28).
    quarter = buf.sample(T0 + 425 * MS // 10)
    np.testing.assert_allclose(quarter.target, [23.546875, 23.546875], rtol=1e-12)
    assert quarter.chunk == 1
    # Half way the two tangent terms cancel: .5 * 4 + .5 * 100.
    mid = buf.sample(T0 + 45 * MS)
    np.testing.assert_allclose(mid.target, [52.0, 52.0], rtol=1e-12)
    assert mid.chunk == 1
    np.testing.assert_array_equal(buf.sample(T0 + 60 * MS).target, [101.0, 101.0])


def test_replace_starting_before_the_buffer_replaces_it_all() -> None:
    buf = TrajectoryBuffer(1)
    buf.add_chunk(T0 + 50 * MS, 0.01, ramp(5, dof=1), "replace", T0)
    buf.add_chunk(T0 + 10 * MS, 0.01, ramp(2, dof=1, start=7.0), "replace", T0)
    assert buf.end_ns() == T0 + 20 * MS and len(buf) == 2


@pytest.mark.parametrize("merge", MERGE_MODES)
@pytest.mark.parametrize("n", [1, 3])  # a one-point chunk at now (a short move_to), or one ending there
def test_a_chunk_whose_only_point_ahead_is_on_the_played_point_now(merge: str, n: int) -> None:
    """The buffer has a point exactly at now, so that point was played, and the new chunk's only
    point at or after now is at now too: nothing of the chunk is left to merge. The buffer must
    neither fail nor jump: it is still at its own point now, and every target is finite."""
    now = T0 + 20 * MS
    buf = TrajectoryBuffer(2)
    buf.add_chunk(T0, 0.01, ramp(6), "replace", T0)  # 0, 10, 20 (now), 30, 40, 50 ms
    play(buf, range(T0, now, 2 * MS))
    buf.add_chunk(now - (n - 1) * 10 * MS, 0.01, ramp(n, start=50.0), merge, now)
    s = buf.sample(now)
    assert s.status == "tracking"
    np.testing.assert_array_equal(s.target, [2.0, 2.0])
    _, targets = play(buf, range(now + 1 * MS, now + 60 * MS, 1 * MS))
    assert np.all(np.isfinite(targets))


def test_crossfade_blends_linearly_over_the_window() -> None:
    buf = TrajectoryBuffer(1, crossfade_s=0.04)
    buf.add_chunk(T0, 0.01, np.zeros((20, 1)), "replace", T0)
    buf.add_chunk(T0 + 50 * MS, 0.01, np.ones((10, 1)), "crossfade", T0)
    # alpha at 50, 60, 70, 80, 90 ms: 0, .25, .5, .75, 1
    for k, want in enumerate([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]):
        assert buf.sample(T0 + (50 + 10 * k) * MS).target[0] == pytest.approx(want)


def test_crossfade_holds_an_old_trajectory_that_ends_inside_the_window() -> None:
    buf = TrajectoryBuffer(1, crossfade_s=0.1)
    buf.add_chunk(T0, 0.01, np.full((7, 1), 2.0), "replace", T0)  # ends at 60 ms
    buf.add_chunk(T0 + 40 * MS, 0.01, np.zeros((20, 1)), "crossfade", T0)
    # The old trajectory holds 2 past its end, so the points from 40 ms go 2 (1 - (t - 40) / 100)
    # down to 0.2 at 130 ms, then 0: 2 units over 100 ms, with no step where the old one ends.
    ticks = range(T0, T0 + 200 * MS, 2 * MS)
    knots = _grid(T0, 0.01, 24)
    knot_x = np.concatenate([np.full(4, 2.0), 2.0 * (1 - np.arange(10) / 10), np.zeros(10)])
    times, values = play(buf, ticks)
    np.testing.assert_array_equal(times, list(ticks))
    np.testing.assert_allclose(values[:, 0], hermite_reference(knots, knot_x, times)[:, 0], rtol=0, atol=1e-12)
    assert values[list(times).index(T0 + 100 * MS), 0] == pytest.approx(0.8)  # held 2 blended at 60 %
    # On monotone points the Hermite cubic's slope is at most 1.5 times the steepest secant
    # (6u(1 - u) <= 1.5 when both tangents vanish): 1.5 * 2 units / 100 ms, over a 2 ms tick.
    assert max(abs(np.diff(values[:, 0]))) <= 1.5 * 2.0 * 2 / 100 + 1e-12


def _smooth(rng: np.random.Generator, dof: int) -> tuple:
    """A random smooth function of time (seconds), and bounds on its first, second and fourth
    derivatives."""
    amp = rng.uniform(0.1, 1.0, (3, dof))
    freq = rng.uniform(0.1, 1.5, (3, dof))
    phase = rng.uniform(0, 2 * np.pi, (3, dof))
    offset = rng.uniform(-1, 1, dof)

    def f(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=float)[..., None, None]
        return offset + np.sum(amp * np.sin(2 * np.pi * freq * t + phase), axis=-2)

    return f, *(np.sum(amp * (2 * np.pi * freq) ** k, axis=0) for k in (1, 2, 4))


def _grid(t0_ns: int, dt: float, n: int) -> np.ndarray:
    return t0_ns + np.rint(np.arange(n) * dt * 1e9).astype(np.int64)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), dt1=st.floats(0.005, 0.04), dt2=st.floats(0.005, 0.04),
       n1=st.integers(2, 30), n2=st.integers(1, 30), switch=st.floats(0, 1), lead_ms=st.floats(-10, 30))
def test_seam_between_replaced_chunks_of_one_smooth_function_has_no_jump(
        seed: int, dt1: float, dt2: float, n1: int, n2: int, switch: float, lead_ms: float) -> None:
    rng = np.random.default_rng(seed)
    dof = 3
    f, slope, curvature, fourth = _smooth(rng, dof)
    buf = TrajectoryBuffer(dof)
    ns_to_s = 1e-9
    buf.add_chunk(T0, dt1, f((_grid(T0, dt1, n1) - T0) * ns_to_s), "replace", T0)
    end1 = buf.end_ns()
    tick = 2 * MS
    switch_ns = T0 + int(switch * ((end1 - T0) // tick)) * tick  # a tick while the first chunk plays
    t2 = switch_ns + int(lead_ms * MS)
    values = []
    for now in range(T0, max(end1, t2 + int(n2 * dt2 * 1e9)) + tick, tick):
        if now == switch_ns:
            # A chunk that ends before now is stale and ignored, which is also fine for this test.
            buf.add_chunk(t2, dt2, f((_grid(t2, dt2, n2) - T0) * ns_to_s), "replace", now)
        s = buf.sample(now)
        if s.status == "tracking":
            values.append((now, s.target))
        elif values:
            break  # ran dry at the end
    times = np.array([t for t, _ in values])
    targets = np.array([v for _, v in values])
    assert np.all(np.diff(times) == tick), "no gap while the chunks cover the time"
    # Every segment of the buffer, the seam's included, joins two points of the one function at
    # most h apart (the bridge from chunk 1 to a chunk 2 that starts after it ends may be the
    # longest). On a segment, the cubic is f's own Hermite cubic (within fourth * h^4 / 384 of f)
    # plus h (h10(u) e0 + h11(u) e1), where e are the tangents' errors and |h10| + |h11| <= 1/4.
    # A tangent, a weighted average of the two secants at a knot, each off f' by at most
    # curvature * h / 2 (Taylor on each side), is off by at most that too, so inside
    # the trajectory the error is that of linear interpolation, curvature * h^2 / 8, plus a
    # fourth-order term. The first and last segments start and stop at rest: there a zero
    # tangent is off by up to the slope.
    h = max(dt1, dt2, (t2 - end1) * ns_to_s)
    inside = fourth * h**4 / 384 + curvature * h**2 / 8
    ends = fourth * h**4 / 384 + h * (slope + curvature * h / 2) / 4
    # (Before the switch the trajectory's end is the first chunk's.)
    end = np.where(times < switch_ns, end1, times[-1])
    near_end = ((times - times[0]) * ns_to_s < h) | ((end - times) * ns_to_s < h)
    error = np.where(near_end[:, None], ends, inside) * (1 + 1e-9) + 1e-12
    assert np.all(np.abs(targets - f((times - T0) * ns_to_s)) <= error)
    # ...and no step is larger than the function's own over a tick, plus that error on each side.
    # (Switching from one cubic to another at the seam is the only jump there can be.)
    steps = np.abs(np.diff(targets, axis=0))
    assert np.all(steps <= slope * tick * ns_to_s * (1 + 1e-9) + error[1:] + error[:-1])


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), dt=st.floats(0.005, 0.05), start_ms=st.floats(0, 200),
       jump=st.floats(-2, 2), window=st.floats(0.001, 0.2))
def test_crossfade_seam_step_is_bounded_by_the_slopes(seed: int, dt: float, start_ms: float, jump: float,
                                                      window: float) -> None:
    rng = np.random.default_rng(seed)
    f, slope_f, curvature_f, _ = _smooth(rng, 2)
    g_base, slope_g, _, _ = _smooth(rng, 2)

    def g(t: np.ndarray) -> np.ndarray:
        return g_base(t) + jump

    buf = TrajectoryBuffer(2, crossfade_s=window)
    buf.add_chunk(T0, dt, f((_grid(T0, dt, 40) - T0) * 1e-9), "replace", T0)
    t_new = T0 + int(start_ms * MS)
    buf.add_chunk(t_new, dt, g((_grid(t_new, dt, 40) - T0) * 1e-9), "crossfade", T0)
    tick = 2 * MS
    values = [buf.sample(now).target for now in range(T0, t_new + int(0.5 * 1e9 * dt * 40), tick)]
    values = np.array([v for v in values if v is not None])
    steps = np.abs(np.diff(values, axis=0))
    # d/dt [(1 - a) f + a g] = (1 - a) f' + a g' + a' (g - f), with |a'| = 1 / window. The secant
    # between two neighbouring points of the buffer is bounded by that, and a's ramp is itself
    # sampled at the chunk's grid (so over a window shorter than dt it rises by at most 1 per dt).
    # The old side is f's linear interpolation, off f by at most curvature * dt^2 / 8.
    t = np.linspace(0, 2.5, 2501)
    gap = np.max(np.abs(f(t) - g(t)), axis=0) + (slope_f + slope_g) * 0.0005 + curvature_f * dt**2 / 8
    secant = np.maximum(slope_f, slope_g) + gap / max(window, dt)
    # A Hermite cubic's slope, 6u(1 - u) s + (1 - u)(1 - 3u) m0 + u(3u - 2) m1 with the secant
    # s and both tangents (weighted averages of secants, or zero at the ends) within the steepest secant,
    # is at most 2 times it (at u = 1/2).
    bound = 2 * secant * tick * 1e-9 * (1 + 1e-9) + 1e-12
    assert np.all(steps <= bound)


def test_crossfade_with_no_window_is_replace() -> None:
    bufs = [TrajectoryBuffer(1, crossfade_s=0.0), TrajectoryBuffer(1)]
    for buf, merge in zip(bufs, ["crossfade", "replace"]):
        buf.add_chunk(T0, 0.01, ramp(10, dof=1), "replace", T0)
        buf.add_chunk(T0 + 33 * MS, 0.01, ramp(10, dof=1, start=50.0), merge, T0)
    for t in range(0, 130, 3):
        a, b = (buf.sample(T0 + t * MS) for buf in bufs)
        assert a.status == b.status and np.array_equal(a.target, b.target)


def test_average_two_chunks_matches_act_weights() -> None:
    m = 0.5
    buf = TrajectoryBuffer(1, average_decay=m)
    a = np.array([[1.0], [2.0], [3.0], [4.0]])  # at 0, 10, 20, 30 ms
    b = np.array([[10.0], [20.0], [30.0], [40.0]])  # at 20, 30, 40, 50 ms
    buf.add_chunk(T0, 0.01, a, "replace", T0)
    buf.add_chunk(T0 + 20 * MS, 0.01, b, "average", T0, chunk=1)
    w0, w1 = 1.0, math.exp(-m)
    expected = {0: 1.0, 10: 2.0, 20: (3 * w0 + 10 * w1) / (w0 + w1), 30: (4 * w0 + 20 * w1) / (w0 + w1),
                40: 30.0, 50: 40.0}
    for t, want in expected.items():
        assert buf.sample(T0 + t * MS).target[0] == pytest.approx(want, rel=1e-12)


def test_average_three_chunks_matches_act_weights() -> None:
    m = 0.3
    buf = TrajectoryBuffer(2, average_decay=m)
    chunks = [np.full((5, 2), 1.0), np.full((5, 2), 5.0), np.full((5, 2), 11.0)]
    chunks = [c + np.arange(5)[:, None] * [0.1, -0.2] for c in chunks]  # not constant in time either
    for k, c in enumerate(chunks):  # chunk k starts at 10k ms: instant 20 ms is covered by all three
        buf.add_chunk(T0 + 10 * k * MS, 0.01, c, "average", T0)
    w = np.exp(-m * np.arange(3))
    for t_ms in range(0, 70, 10):
        preds = [(k, chunks[k][t_ms // 10 - k]) for k in range(3) if 0 <= t_ms // 10 - k < 5]
        weights = w[: len(preds)]  # the k-th prediction *for this instant*, oldest first
        want = sum(wk * p for wk, (_, p) in zip(weights, preds)) / weights.sum()
        np.testing.assert_allclose(buf.sample(T0 + t_ms * MS).target, want, rtol=1e-12)


def test_average_with_shifted_grid_and_longer_old_buffer() -> None:
    buf = TrajectoryBuffer(1, average_decay=0.0)  # plain mean
    buf.add_chunk(T0, 0.01, np.full((10, 1), 2.0), "replace", T0)  # 0 .. 90 ms
    buf.add_chunk(T0 + 15 * MS, 0.01, np.full((3, 1), 4.0), "average", T0)  # 15, 25, 35 ms: off-grid
    for t in (15, 25, 35):
        assert buf.sample(T0 + t * MS).target[0] == pytest.approx(3.0)
    # The old chunk alone predicted 40 .. 90 ms: kept.
    assert buf.end_ns() == T0 + 90 * MS
    assert buf.sample(T0 + 60 * MS).target[0] == pytest.approx(2.0)


def test_average_appends_points_beyond_the_old_end_as_is() -> None:
    buf = TrajectoryBuffer(1, average_decay=0.01)
    buf.add_chunk(T0, 0.01, np.zeros((3, 1)), "replace", T0)
    buf.add_chunk(T0 + 10 * MS, 0.01, np.full((5, 1), 6.0), "average", T0)
    assert buf.sample(T0 + 30 * MS).target[0] == 6.0
    assert buf.sample(T0 + 50 * MS).target[0] == 6.0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("args, message", [
    (dict(points=np.zeros((3, 3))), "shape"),
    (dict(points=np.zeros((0, 2))), "shape"),
    (dict(points=np.zeros(2)), "shape"),
    (dict(points=np.array([[0.0, 1.0], [math.nan, 0.0]])), "finite"),
    (dict(points=np.array([[0.0, math.inf]])), "finite"),
    (dict(points=[["a", "b"]]), "numeric"),
    (dict(dt_s=0.0), "dt"),
    (dict(dt_s=-0.01), "dt"),
    (dict(dt_s=math.nan), "dt"),
    (dict(merge="blend"), "merge mode"),
    (dict(t0_ns=1.5), "t0_ns"),
    (dict(now_ns=None), "now_ns"),
    (dict(episode=-1), "episode"),
    (dict(chunk="x"), "chunk"),
    (dict(points=np.zeros((200, 2))), "limit"),
])
def test_bad_chunks_are_refused_and_change_nothing(args: dict, message: str) -> None:
    buf = TrajectoryBuffer(2, max_points=100)
    buf.add_chunk(T0, 0.01, ramp(10), "replace", T0)
    probes = [T0, T0 + 45 * MS, T0 + 90 * MS]
    before = snapshot(buf, probes)
    call = dict(t0_ns=T0 + 20 * MS, dt_s=0.01, points=ramp(5, start=50.0), merge="replace", now_ns=T0)
    with pytest.raises(ValueError, match=message):
        buf.add_chunk(**{**call, **args})
    assert snapshot(buf, probes) == before


@pytest.mark.parametrize("merge", ["replace", "crossfade", "average"])
def test_max_points_bounds_the_merged_buffer(merge: str) -> None:
    buf = TrajectoryBuffer(1, max_points=30)
    assert buf.add_chunk(T0, 0.01, ramp(20, dof=1), "replace", T0) == 20
    before = snapshot(buf, [T0, T0 + 100 * MS])
    # Starts after the old end: 20 + 15 points would be too many.
    with pytest.raises(ValueError, match="limit of 30"):
        buf.add_chunk(T0 + 300 * MS, 0.01, ramp(15, dof=1), merge, T0)
    assert snapshot(buf, [T0, T0 + 100 * MS]) == before
    # Replacing from the middle fits.
    assert buf.add_chunk(T0 + 100 * MS, 0.01, ramp(15, dof=1), merge, T0) == 15
    assert len(buf) <= 30


def test_constructor_validation() -> None:
    for kwargs in (dict(dof=0), dict(dof=2, max_points=0), dict(dof=2, crossfade_s=-1.0),
                   dict(dof=2, average_decay=math.nan)):
        with pytest.raises(ValueError):
            TrajectoryBuffer(**kwargs)


# --------------------------------------------------------------------------- plan_move


def _line_duration(d: np.ndarray, vmax: np.ndarray, amax: np.ndarray) -> float:
    """Shortest rest-to-rest time of a straight joint-space line (shared path parameter s, with
    s' <= min(vmax / d) and s'' <= min(amax / d), written here as times to avoid overflow)."""
    t_v, t_a2 = np.max(d / vmax), np.max(d / amax)
    return 2 * math.sqrt(t_a2) if t_a2 >= t_v**2 else t_v + t_a2 / t_v


@st.composite
def moves(draw: st.DrawFn) -> tuple:
    dof = draw(st.integers(1, 7))

    def vec(lo: float, hi: float) -> np.ndarray:
        return np.array(draw(st.lists(st.floats(lo, hi), min_size=dof, max_size=dof)))

    start = vec(-3, 3)
    goal = np.where(vec(0, 1) < 0.2, start, vec(-3, 3))  # some joints do not move
    return start, goal, vec(0.05, 5), vec(0.1, 30), draw(st.floats(0.001, 0.05))


@PROPERTY
@given(moves())
def test_plan_move_obeys_limits_and_ends_exactly(move: tuple) -> None:
    start, goal, vmax, amax, dt = move
    path = plan_move(start, goal, vmax, amax, dt)
    assert path.ndim == 2 and path.shape[1] == len(start)
    np.testing.assert_array_equal(path[-1], goal)
    if np.array_equal(start, goal):
        assert len(path) == 1
        return
    # From rest at start, through the waypoints, to rest at the goal.
    full = np.vstack([start, path, goal])
    rounding = 8 * np.finfo(float).eps * (np.max(np.abs(full)) + 1)
    velocity = np.vstack([np.zeros(len(start)), np.diff(full, axis=0) / dt])
    assert np.all(np.abs(velocity) <= vmax * (1 + 1e-9) + rounding / dt)
    accel = np.diff(velocity, axis=0) / dt
    assert np.all(np.abs(accel) <= amax * (1 + 1e-9) + 2 * rounding / dt**2)
    # Synchronized: every moving joint is at the same fraction of its way at every waypoint, and
    # the duration is the shortest such a move can have, rounded up to whole ticks.
    d = goal - start
    moving = np.abs(d) > 0
    fraction = (path[:, moving] - start[moving]) / d[moving]
    reference = fraction[:, np.argmax(np.abs(d[moving]))]  # the joint that moves furthest: least rounding
    slack = 1e-9 + rounding / np.abs(d[moving])  # positions are rounded, tiny moves magnify it
    assert np.all(np.abs(fraction - reference[:, None]) <= slack)
    assert np.all(np.diff(reference) >= -1e-12)
    assert len(path) in (max(math.ceil(_line_duration(np.abs(d), vmax, amax) / dt) + k, 1) for k in (-1, 0))


def test_plan_move_slowest_joint_sets_the_duration() -> None:
    # Same acceleration/velocity ratio on every joint: the furthest-relative joint alone sets the
    # time, and it is its own trapezoid (accelerate 0.5 s, cruise 1.5 s, decelerate 0.5 s).
    start, goal = np.zeros(3), np.array([2.0, -0.5, 0.0])
    vmax, amax = np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0])
    path = plan_move(start, goal, vmax, amax, 0.01)
    assert len(path) == 250  # 2 / 1 + 1 / 2 = 2.5 s
    speed = np.diff(np.vstack([start, path]), axis=0) / 0.01
    assert np.max(np.abs(speed[:, 0])) == pytest.approx(1.0)
    assert np.max(np.abs(speed[:, 1])) == pytest.approx(0.25)
    assert np.all(path[:, 2] == 0.0)


def test_plan_move_zero_distance_is_the_goal_alone() -> None:
    goal = np.array([0.3, -0.2])
    path = plan_move(goal.copy(), goal, np.ones(2), np.ones(2), 0.002)
    np.testing.assert_array_equal(path, goal[None, :])


def test_plan_move_validation() -> None:
    ok = dict(start=np.zeros(2), goal=np.ones(2), max_velocity=np.ones(2), max_acceleration=np.ones(2), dt=0.01)
    for bad in (dict(goal=np.ones(3)), dict(goal=np.array([0.0, math.nan])), dict(max_velocity=np.zeros(2)),
                dict(max_acceleration=np.array([1.0, -1.0])), dict(dt=0.0)):
        with pytest.raises(ValueError, match="plan_move"):
            plan_move(**{**ok, **bad})


def test_a_planned_move_through_the_buffer_reaches_the_goal() -> None:
    start, goal = np.array([0.0, 1.0]), np.array([0.4, 0.7])
    path = plan_move(start, goal, np.ones(2), np.full(2, 4.0), 0.002)
    buf = TrajectoryBuffer(2)
    buf.add_chunk(T0, 0.002, path, "replace", T0)
    end = buf.end_ns()
    np.testing.assert_array_equal(buf.sample(end).target, goal)


def test_a_chunk_anchored_at_the_held_pose_never_moves_backwards_first() -> None:
    """A chunk whose first point is the held pose, moving on at 1.5 rad/s: from rest, the target
    must only ever move forwards (an unlimited tangent at the first point bent it back ~1 mrad)."""
    buf = TrajectoryBuffer(1)
    held = 0.3
    pts = held + np.maximum(0.0, np.arange(41) * 0.005 * 1.5)[:, None]  # starts at the held pose
    now = T0
    buf.add_chunk(now + 50 * MS, 0.005, pts, "replace", now, anchor=np.array([held]))
    _, targets = play(buf, range(now, now + 300 * MS, MS))
    assert np.all(np.diff(targets[:, 0]) >= -1e-12), np.diff(targets[:, 0]).min()
    assert targets[-1, 0] > held + 0.1


def test_move_duration_matches_the_plan_and_a_long_plan_is_refused_before_allocating():
    start, goal = np.zeros(3), np.array([1.0, -0.5, 0.2])
    vmax, amax = np.full(3, 0.5), np.full(3, 2.0)
    duration = move_duration(start, goal, vmax, amax)
    points = plan_move(start, goal, vmax, amax, 0.002)
    assert abs(len(points) * 0.002 - duration) <= 0.002
    assert move_duration(start, start, vmax, amax) == 0.0
    # A tiny velocity once planned 951 MB of points; with a cap it fails at once, naming the duration.
    with pytest.raises(ValueError, match="would take 1e\\+09 s"):
        plan_move(start, goal, np.full(3, 1e-9), amax, 0.002, max_points=60_000)
