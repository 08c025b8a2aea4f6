"""The driver's trajectory buffer (timestamped waypoints, sampled every tick) and a move planner.

Times are integer nanoseconds on the driver's monotonic clock. A chunk is ``n`` points ``dt``
apart from ``t0``; point ``i`` is at ``t0 + round(i * dt * 1e9)``. The buffer keeps only what is
still useful at ``now``: the points at or after ``now``, plus the last two points before ``now``
while a later point exists (one to interpolate from, one for its tangent). Sampling is cubic
Hermite with Catmull-Rom tangents, so velocity is continuous across knots and seams.

Merging a new chunk into what is buffered:

- ``replace``: everything from the new chunk's first kept point on is the new chunk.
- ``crossfade``: like replace, but over ``crossfade_s`` from that point the value moves linearly
  from the old trajectory to the new one. Where the old trajectory has ended, its last point
  stands in for it (that is where the arm would hold), so the blend stays continuous.
- ``average``: ACT temporal ensembling. Each instant keeps a weighted running average of every
  chunk that predicted it, the k-th prediction (k = 0 the oldest) weighted ``exp(-decay * k)``.
  The old buffer is resampled onto the new chunk's time grid.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

MERGE_MODES: tuple[str, ...] = ("replace", "crossfade", "average")
_NO_ID = np.iinfo(np.int64).min  # episode / chunk id "None" in the int64 id columns
_MIN_DT_S, _MAX_DT_S = 1e-6, 3600.0  # below 1 us, rounding to ns could make two points coincide


@dataclass(frozen=True)
class Sample:
    # tracking: target valid; waiting: the first point is still in the future (hold);
    # dry: nothing at or after now (hold, and the driver counts starvation)
    status: Literal["tracking", "waiting", "dry"]
    target: np.ndarray | None
    episode: int | None = None  # ids of the chunk the target came from (None unless tracking)
    chunk: int | None = None


_WAITING = Sample("waiting", None)
_DRY = Sample("dry", None)


@dataclass(frozen=True, eq=False)
class _Points:
    """Timestamped points (times strictly increasing) with their ensembling bookkeeping."""

    t: np.ndarray  # int64 ns, shape (n,)
    x: np.ndarray  # float64, shape (n, dof)
    weight: np.ndarray  # sum of the ensembling weights averaged into each point
    count: np.ndarray  # number of predictions averaged into each point
    episode: np.ndarray  # int64 ids, _NO_ID for None
    chunk: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def take(self, sel: slice | np.ndarray) -> _Points:
        return _Points(self.t[sel], self.x[sel], self.weight[sel], self.count[sel], self.episode[sel],
                       self.chunk[sel])

    @staticmethod
    def empty(dof: int) -> _Points:
        return _Points(np.zeros(0, np.int64), np.zeros((0, dof)), np.zeros(0), np.zeros(0, np.int64),
                       np.zeros(0, np.int64), np.zeros(0, np.int64))

    @staticmethod
    def concat(parts: list[_Points]) -> _Points:
        return _Points(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("t", "x", "weight", "count", "episode", "chunk")))


class TrajectoryBuffer:
    def __init__(self, dof: int, max_points: int = 20000, crossfade_s: float = 0.1, average_decay: float = 0.01,
                 linear: np.ndarray | None = None):
        """``linear``: a mask of the dofs that are velocities (a base's vx, vy, wz): they are
        interpolated linearly between points (a velocity profile needs no smooth tangent, and a
        cubic through velocity samples would overshoot them); the others are positions (cubic)."""
        if dof < 1:
            raise ValueError(f"trajectory buffer: dof must be >= 1, got {dof}")
        mask = np.zeros(dof, dtype=bool) if linear is None else np.array(linear, dtype=bool)
        if mask.shape != (dof,):
            raise ValueError(f"trajectory buffer: linear mask must have shape ({dof},), got {mask.shape}")
        self._linear = mask if mask.any() else None
        if max_points < 1:
            raise ValueError(f"trajectory buffer: max_points must be >= 1, got {max_points}")
        if not (math.isfinite(crossfade_s) and crossfade_s >= 0):
            raise ValueError(f"trajectory buffer: crossfade_s must be finite and >= 0, got {crossfade_s}")
        if not (math.isfinite(average_decay) and average_decay >= 0):
            raise ValueError(f"trajectory buffer: average_decay must be finite and >= 0, got {average_decay}")
        self.dof = dof
        self.max_points = max_points
        self.crossfade_ns = round(crossfade_s * 1e9)
        self.average_decay = average_decay
        self._set(_Points.empty(dof))

    # ------------------------------------------------------------------ storage

    def _set(self, pts: _Points, now_ns: int | None = None) -> None:
        self._pts = pts
        # Whether the first point is where the motion starts (at rest), rather than a played point
        # kept only for the next one's tangent: then its segment is already in the past.
        self._rest_start = len(pts) < 2 or now_ns is None or int(pts.t[1]) > now_ns
        # sample() runs every tick: it only moves _start past spent points; add_chunk compacts.
        # It reads times and ids from Python lists: bisect and int compares on them are several
        # times cheaper than numpy scalar access.
        self._times: list[int] = pts.t.tolist()
        self._episodes = [None if v == _NO_ID else v for v in pts.episode.tolist()]
        self._chunks = [None if v == _NO_ID else v for v in pts.chunk.tolist()]
        self._x = pts.x
        self._start, self._end = 0, len(pts)

    def _live_points(self) -> _Points:
        # One point before _start: the point being played from still needs its tangent.
        return self._pts.take(slice(max(self._start - 1, 0), self._end))

    def clear(self) -> None:
        self._set(_Points.empty(self.dof))

    def __len__(self) -> int:
        return self._end - self._start

    def end_ns(self) -> int | None:
        """Time of the last point, None if empty."""
        return self._times[self._end - 1] if self._end > self._start else None

    # ------------------------------------------------------------------ adding

    def add_chunk(self, t0_ns: int, dt_s: float, points: np.ndarray, merge: str, now_ns: int,
                  episode: int | None = None, chunk: int | None = None, anchor: np.ndarray | None = None) -> int:
        """Merge a chunk; returns how many of its points are at or after ``now_ns``.

        ``anchor`` is the pose the arm holds now. When the buffer has nothing to play at ``now``
        (empty, or still waiting for its first point), the chunk starts from the anchor at ``now``
        and moves linearly to its next future point, instead of stepping onto a point that the
        chunk placed in the past: that step would be a jump.

        Raises ValueError, leaving the buffer unchanged, if anything about the chunk is wrong.
        A chunk entirely in the past changes nothing and returns 0.
        """
        if merge not in MERGE_MODES:
            raise ValueError(f"unknown merge mode {merge!r}; use one of {list(MERGE_MODES)}")
        _check_int(now_ns, "now_ns")
        new = _live(self._chunk_points(t0_ns, dt_s, points, episode, chunk), now_ns)
        kept = int(np.count_nonzero(new.t >= now_ns))
        if kept == 0:
            return 0
        old = _live(self._live_points(), now_ns)
        if anchor is not None and (len(old) == 0 or old.t[0] > now_ns):
            new = _anchored(new, np.asarray(anchor, dtype=np.float64), now_ns, int(dt_s * 1e9))
        elif len(old) and old.t[0] <= now_ns:
            # The past belongs to what was played: a chunk that reaches further back than the
            # buffer's own past points would lose their tangents (a jump, e.g. a 50 Hz chunk
            # arriving during a 500 Hz move).
            new = new.take(new.t > old.t[old.t <= now_ns][-1])
            if len(new) == 0:
                return kept  # all the chunk had left is the point already being played
        if merge == "replace" or len(old) == 0:
            merged = _replace(old, new)
        elif merge == "crossfade":
            merged = _crossfade(old, new, self.crossfade_ns)
        else:
            merged = _average(old, new, self.average_decay)
        merged = _live(merged, now_ns)
        if len(merged) > self.max_points:
            raise ValueError(f"the chunk would make the trajectory buffer hold {len(merged)} points, "
                             f"more than its limit of {self.max_points}")
        self._set(merged, now_ns)
        return kept

    def _chunk_points(self, t0_ns: int, dt_s: float, points: np.ndarray, episode: int | None,
                      chunk: int | None) -> _Points:
        """Validate a chunk and lay it out on its time grid (a copy: the caller keeps its array)."""
        _check_int(t0_ns, "t0_ns")
        if not (isinstance(dt_s, (int, float, np.floating, np.integer)) and _MIN_DT_S <= dt_s <= _MAX_DT_S):
            raise ValueError(f"chunk dt must be a number in [{_MIN_DT_S}, {_MAX_DT_S}] s, got {dt_s!r}")
        try:
            x = np.array(points, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"chunk points are not a numeric array: {exc}") from None
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.dof:
            raise ValueError(f"chunk points must have shape (n > 0, {self.dof}), got {x.shape}")
        if len(x) > self.max_points:
            raise ValueError(f"the chunk has {len(x)} points, more than the buffer's limit of {self.max_points}")
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise ValueError(f"chunk points must be finite; rows {bad[:10].tolist()} are not")
        ids = [_id_column(v, name, len(x)) for v, name in ((episode, "episode"), (chunk, "chunk"))]
        offsets = np.rint(np.arange(len(x)) * (float(dt_s) * 1e9))
        if not np.iinfo(np.int64).min <= int(t0_ns) <= np.iinfo(np.int64).max - int(offsets[-1]):
            raise ValueError(f"chunk times do not fit in int64 nanoseconds: t0_ns={t0_ns}")
        t = offsets.astype(np.int64) + np.int64(t0_ns)
        return _Points(t, x, np.ones(len(x)), np.ones(len(x), np.int64), ids[0], ids[1])

    # ------------------------------------------------------------------ per tick

    def sample(self, now_ns: int) -> Sample:
        """The target at ``now_ns`` (cubic Hermite between knots); drops points that are fully spent."""
        s, e, times = self._start, self._end, self._times
        if s >= e:
            return _DRY
        if now_ns < times[s]:
            return _WAITING
        i = bisect.bisect_right(times, now_ns, s + 1, e)  # the first point after now
        j = i - 1
        if i == e and times[j] != now_ns:
            self._start = e  # the trajectory is over: an old point must not anchor the next chunk
            return _DRY
        self._start = j  # points before j are spent (kept in the arrays for the tangent)
        if times[j] == now_ns:
            return self._tracking(self._x[j].copy(), j)
        return self._tracking(self._hermite(j, i, now_ns), i)

    def _hermite(self, j: int, i: int, now_ns: int) -> np.ndarray:
        """Cubic Hermite between points j and i with Catmull-Rom tangents.

        Linear interpolation of 50 Hz waypoints sampled at 500 Hz steps the velocity at every
        knot: about ten times the true acceleration in a single tick, which the safety filter
        then clamps (the "sawtooth" users see at chunk seams). Hermite keeps velocity
        continuous. The tangent is zero at the trajectory's first and last points, so motion
        starts and ends at rest.
        """
        t, x = self._times, self._x
        h = (t[i] - t[j]) * 1e-9
        u = (now_ns - t[j]) / (t[i] - t[j])
        m_j = self._knot_tangent(j) if j >= 1 else 0.0
        m_i = self._knot_tangent(i) if i + 1 < self._end else 0.0
        u2, u3 = u * u, u * u * u
        out = ((2 * u3 - 3 * u2 + 1) * x[j] + (u3 - 2 * u2 + u) * h * m_j
               + (-2 * u3 + 3 * u2) * x[i] + (u3 - u2) * h * m_i)
        if self._linear is not None:
            lin = self._linear
            out[lin] = x[j][lin] + u * (x[i][lin] - x[j][lin])
        return out

    def _knot_tangent(self, k: int) -> np.ndarray:
        """The tangent at an inner knot k. Right after a start at rest it is limited so that the
        first segment stays monotone (Fritsch-Carlson): a chunk anchored at the held pose, with a
        first point equal to it, bent that segment about 1 mrad backwards before moving on."""
        t, x = self._times, self._x
        m = _tangent(t, x, k - 1, k, k + 1)
        if k == 1 and self._rest_start:
            m = _monotone(m, (x[1] - x[0]) / ((t[1] - t[0]) * 1e-9))
        return m

    def _tracking(self, target: np.ndarray, source: int) -> Sample:
        return Sample("tracking", target, self._episodes[source], self._chunks[source])

    def first_point_at_or_after(self, now_ns: int) -> np.ndarray | None:
        """The first buffered point the arm would be sent to (a copy), for the driver's jump check."""
        i = bisect.bisect_left(self._times, now_ns, self._start, self._end)
        return self._x[i].copy() if i < self._end else None


# --------------------------------------------------------------------------- merging


def _tangent(t: list[int], x: np.ndarray, a: int, k: int, b: int) -> np.ndarray:
    """Velocity at knot k from its neighbours a < k < b, each secant weighted by the other side's
    spacing: exact for a parabola, so uneven knots at a seam do not bend the curve."""
    h_left, h_right = (t[k] - t[a]) * 1e-9, (t[b] - t[k]) * 1e-9
    slope_left, slope_right = (x[k] - x[a]) / h_left, (x[b] - x[k]) / h_right
    return (h_right * slope_left + h_left * slope_right) / (h_left + h_right)


def _monotone(m: np.ndarray, secant: np.ndarray) -> np.ndarray:
    """A tangent that keeps a cubic segment starting at rest between its endpoints: the secant's
    sign, at most three times its size."""
    cap = 3.0 * np.abs(secant)
    return np.where(m * secant > 0, np.clip(m, -cap, cap), 0.0)


def _live(pts: _Points, now_ns: int) -> _Points:
    """What is still useful at ``now_ns``: points at or after it, plus the last point before it
    while a later point exists (to interpolate at now). A trajectory that ended before now is dead."""
    last_past = int(np.searchsorted(pts.t, now_ns, side="right")) - 1
    if last_past < 0:
        return pts
    if last_past == len(pts) - 1 and pts.t[last_past] < now_ns:
        return pts.take(slice(0, 0))
    # Two points before now: one to interpolate from, one for its tangent.
    return pts.take(slice(max(last_past - 1, 0), None))


def _anchored(new: _Points, anchor: np.ndarray, now_ns: int, gap_ns: int) -> _Points:
    """The anchor pose at ``now``, then the chunk's points at least ``gap_ns`` after it.

    The gap (one chunk step) keeps the first segment from being arbitrarily short: reaching a
    point a few microseconds away would be a jump however smooth the interpolation.
    """
    if anchor.shape != new.x.shape[1:] or not np.all(np.isfinite(anchor)):
        raise ValueError(f"anchor must be a finite pose of shape {new.x.shape[1:]}, got {anchor.shape}")
    future = new.take(new.t >= now_ns + gap_ns)
    if len(future) == 0:
        # A short chunk: head for its last point after now; with none, just hold the anchor.
        future = new.take(new.t > now_ns).take(slice(-1, None))
    first = new.take(slice(0, 1))
    start = _Points(np.array([now_ns], np.int64), anchor[None, :].copy(), first.weight, first.count,
                    first.episode, first.chunk)
    return _Points.concat([start, future])


def _replace(old: _Points, new: _Points) -> _Points:
    return _Points.concat([old.take(old.t < new.t[0]), new])


def _crossfade(old: _Points, new: _Points, window_ns: int) -> _Points:
    t_first = new.t[0]
    fading = new.t < t_first + window_ns
    # Before the old trajectory starts there is nothing to fade from: the new one stands alone.
    fading &= new.t >= old.t[0]
    if not fading.any():
        return _replace(old, new)
    tq = new.t[fading]
    alpha = ((tq - t_first) / window_ns)[:, None]
    x = new.x.copy()
    # _interp holds the old trajectory's last point beyond its end: where the arm would stop.
    x[fading] = (1.0 - alpha) * _interp(tq, old.t, old.x) + alpha * new.x[fading]
    return _replace(old, _Points(new.t, x, new.weight, new.count, new.episode, new.chunk))


def _average(old: _Points, new: _Points, decay: float) -> _Points:
    overlap = (new.t >= old.t[0]) & (new.t <= old.t[-1])
    x, weight, count = new.x.copy(), new.weight.copy(), new.count.copy()
    if overlap.any():
        tq = new.t[overlap]
        old_x = _interp(tq, old.t, old.x)
        near = _nearest(tq, old.t)  # old bookkeeping at the nearest old point (exact on a shared grid)
        old_w, old_k = old.weight[near], old.count[near]
        w_new = np.exp(-decay * old_k)  # this chunk is prediction number k for these instants
        x[overlap] = (old_x * old_w[:, None] + new.x[overlap] * w_new[:, None]) / (old_w + w_new)[:, None]
        weight[overlap] = old_w + w_new
        count[overlap] = old_k + 1
    merged = _Points(new.t, x, weight, count, new.episode, new.chunk)
    # Instants only the old buffer predicted (after the new chunk ends) keep the old prediction.
    return _Points.concat([old.take(old.t < new.t[0]), merged, old.take(old.t > new.t[-1])])


def _interp(tq: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` linearly interpolated at ``tq``, held constant beyond either end."""
    if len(t) == 1:
        return np.repeat(x, len(tq), axis=0)
    i = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, len(t) - 2)
    alpha = np.clip((tq - t[i]) / (t[i + 1] - t[i]), 0.0, 1.0)[:, None]
    return x[i] + alpha * (x[i + 1] - x[i])


def _nearest(tq: np.ndarray, t: np.ndarray) -> np.ndarray:
    if len(t) == 1:
        return np.zeros(len(tq), np.int64)
    i = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, len(t) - 2)
    return np.where(tq - t[i] <= t[i + 1] - tq, i, i + 1)


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer number of nanoseconds, got {value!r}")


def _id_column(value: int | None, name: str, n: int) -> np.ndarray:
    if value is None:
        return np.full(n, _NO_ID, np.int64)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**63:
        raise ValueError(f"{name} id must be None or a non-negative integer, got {value!r}")
    return np.full(n, value, np.int64)


# --------------------------------------------------------------------------- move planning


def move_duration(start: np.ndarray, goal: np.ndarray, max_velocity: np.ndarray,
                  max_acceleration: np.ndarray) -> float:
    """How long ``plan_move`` takes from ``start`` to ``goal`` (before rounding to whole ticks):
    cheap, so a move can be refused before any point of it is allocated."""
    start, goal, vmax, amax = (np.asarray(a, dtype=np.float64) for a in (start, goal, max_velocity, max_acceleration))
    _check_move(start, goal, vmax, amax, 1.0)
    dist = np.abs(goal - start)
    if not dist.any():
        return 0.0
    return _min_duration(float(np.max(dist / vmax)), float(np.max(dist / amax)))


def plan_move(start: np.ndarray, goal: np.ndarray, max_velocity: np.ndarray, max_acceleration: np.ndarray,
              dt: float, max_points: int | None = None) -> np.ndarray:
    """Waypoints ``dt`` apart from ``start`` (excluded) to ``goal`` (included, exactly).

    All joints move along the straight line in joint space with one shared trapezoidal (or
    triangular) time profile, so they start and finish together; the joint that needs longest
    sets the pace. The move starts and ends at rest, so the finite differences of
    ``[start, *waypoints, goal]`` obey every joint's velocity and acceleration limit.
    A move of more than ``max_points`` waypoints raises ValueError before allocating any.
    """
    start, goal, vmax, amax = (np.asarray(a, dtype=np.float64) for a in (start, goal, max_velocity, max_acceleration))
    _check_move(start, goal, vmax, amax, dt)
    delta = goal - start
    dist = np.abs(delta)
    if not dist.any():
        return goal[None, :].copy()
    # Every joint follows s(t) * delta with one shared s from 0 to 1. The binding joints set the
    # limits on s, written as times so that tiny distances cannot overflow a division:
    # s' <= 1 / t_speed, s'' <= 1 / t_accel_sq.
    t_speed = float(np.max(dist / vmax))  # the move at full speed throughout
    t_accel_sq = float(np.max(dist / amax))
    duration = _min_duration(t_speed, t_accel_sq)
    if max_points is not None and not duration / dt <= max_points:
        raise ValueError(f"the move would take {duration:.4g} s, {duration / dt:.4g} points of {dt:.4g} s, "
                         f"more than the limit of {max_points}")
    ticks = max(math.ceil(duration / dt * (1 - 1e-12)), 1)
    if ticks == 1:  # a move this short is within limits in a single tick, from rest to rest
        return goal[None, :].copy()
    s = _trapezoid(np.arange(1, ticks + 1) * dt, ticks * dt, t_accel_sq)
    path = start + s[:, None] * delta
    path[-1] = goal
    return path


def _check_move(start: np.ndarray, goal: np.ndarray, vmax: np.ndarray, amax: np.ndarray, dt: float) -> None:
    if start.ndim != 1 or any(a.shape != start.shape for a in (goal, vmax, amax)):
        raise ValueError(f"plan_move: start, goal and limits must be vectors of one length, got shapes "
                         f"{[a.shape for a in (start, goal, vmax, amax)]}")
    if not (np.all(np.isfinite(start)) and np.all(np.isfinite(goal))):
        raise ValueError("plan_move: start and goal must be finite")
    if not (np.all(np.isfinite(vmax) & (vmax > 0)) and np.all(np.isfinite(amax) & (amax > 0))):
        raise ValueError("plan_move: velocity and acceleration limits must be finite and > 0")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"plan_move: dt must be finite and > 0, got {dt}")


def _min_duration(t_speed: float, t_accel_sq: float) -> float:
    """Shortest rest-to-rest time of s over [0, 1] with s' <= 1 / t_speed, s'' <= 1 / t_accel_sq."""
    if t_accel_sq >= t_speed * t_speed:  # never reaches full speed: triangular
        return 2.0 * math.sqrt(t_accel_sq)
    return t_speed + t_accel_sq / t_speed


def _trapezoid(t: np.ndarray, duration: float, t_accel_sq: float) -> np.ndarray:
    """s at times ``t`` of the rest-to-rest profile over [0, 1] with s'' = +-1 / t_accel_sq that
    lasts exactly ``duration`` (at least the shortest): when the duration was rounded up to whole
    ticks, it cruises below the speed limit."""
    # The cruise speed v solves v * (duration - v * t_accel_sq) = 1; this form avoids cancellation.
    cruise = 2.0 / (duration + math.sqrt(max(duration * duration - 4.0 * t_accel_sq, 0.0)))
    t_acc = cruise * t_accel_sq
    # Each branch is evaluated everywhere; clipping keeps the unused ones finite.
    rising = 0.5 * np.minimum(t, t_acc) ** 2 / t_accel_sq
    cruising = 0.5 * t_acc * cruise + cruise * (t - t_acc)
    falling = 1.0 - 0.5 * np.minimum(duration - t, t_acc) ** 2 / t_accel_sq
    return np.where(t < t_acc, rising, np.where(t <= duration - t_acc, cruising, falling))
