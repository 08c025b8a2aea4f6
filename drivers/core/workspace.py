"""Workspace box and two-arm separation limits: a guard around the driver's joint-space filter.

Every tick ``CartesianGuard.step`` lets the inner filter (per-group modes and joint limits) take its
step, then looks at the way the arms would go if they braked from the new state: the BRAKING PATH,
each chain joint braking at the inner filter's acceleration limit to its STOP POSE (its commanded
position plus ``v|v|/(2a)`` plus one tick of travel ``v*dt``, clamped to its range). The path is
checked at the commanded pose and at samples up to the stop pose (just the stop pose when slow; see
``braking_path``); forward kinematics (drivers/core/kinematics.py) gives each arm's check points
(wrist, tool) there. The step is refused - the inner filter is restored to its state before the step
and decelerates instead - when

- a check point of an arm is outside that arm's box somewhere on the new path AND further outside
  than anywhere on the path of the state before the step (counted as ``workspace``), or
- two arms' closest check points come nearer than ``min_separation`` on the new path AND nearer than
  on the path before the step (counted as ``separation``).

So an arm that is inside stays inside, and one that starts outside (armed there, or pushed) may move
back in but not further out. Braking keeps every joint between its position and its stop pose; the
Cartesian path between two checked samples is curved, so a check point may pass the box by a little
(2 mm at most for a UR3 at full speed in docs/kinematics.md; tests/unit/test_workspace.py allows 5).
The guard checks points, not link volumes.

A refused step decelerates every dof of the inner filter (the whole robot brakes, grippers and base
included): the inner filter has one state, and braking is always safe. The clamps the inner filter
counted during the refused step stay counted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from armada.drivers.core.kinematics import ArmKinematics

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig

# A step counts as "further out" (or "closer") only beyond this (m^2: the guard compares squared
# distances), so rounding in the forward kinematics of an arm held at the box face never refuses a step.
_EPS = 1e-15
# The braking path is checked at one sample per this much joint travel (rad, or m for a prismatic
# joint), at most MAX_SAMPLES: its Cartesian curvature between samples is the guard's tolerance.
PATH_STEP = 0.15
MAX_SAMPLES = 8


class CartesianGuard:
    """The inner filter's interface, with the workspace box and separation limits enforced."""

    def __init__(self, emb: EmbodimentConfig, inner: Any):
        assert emb.kinematics is not None
        self.inner = inner
        self.kin = ArmKinematics(emb)
        limits = inner.limits
        # Per tick the guard works on the model's configuration (the chain joints in model order; a
        # joint shared by two chains appears once per chain) and on Python floats: for a dozen
        # joints and a few points that costs less than numpy's per-call overhead.
        qi = self.kin.q_index
        self._qi = qi.tolist()
        self._lo = (limits.lower + limits.margin)[qi].tolist()
        self._hi = (limits.upper - limits.margin)[qi].tolist()
        self._acc = limits.max_acceleration[qi].tolist()
        # Per check point (wrist, tool of each arm, as ArmKinematics.points_q): its arm's box, or
        # None for an arm without one.
        self._boxes: list[tuple[tuple[float, ...], tuple[float, ...]] | None] = []
        for arm in emb.kinematics.arms:
            box = None if arm.workspace is None else (tuple(arm.workspace.min), tuple(arm.workspace.max))
            self._boxes += [box, box]
        self.min_separation = emb.kinematics.min_separation
        n = self.kin.n_arms
        self._pairs = [(a, b) for a in range(n) for b in range(a + 1, n)] if self.min_separation else []
        self._min_sep_sq = (self.min_separation or 0.0) ** 2
        # (squared distance outside its box of each check point, squared separation of each pair
        # of arms) at the current state's stop pose; None: not known yet.
        self._current: tuple[list[float], list[float]] | None = None

    # ------------------------------------------------------------------ delegated state

    @property
    def limits(self) -> Any:
        return self.inner.limits

    @property
    def dt(self) -> float:
        return self.inner.dt

    @property
    def counters(self) -> Any:
        return self.inner.counters

    @property
    def position(self) -> np.ndarray:
        return self.inner.position

    @property
    def velocity(self) -> np.ndarray:
        return self.inner.velocity

    def reset(self, position: np.ndarray) -> None:
        # The Driver resets every idle tick: keep this cheap, measure lazily at the next step.
        self.inner.reset(position)
        self._current = None

    def snapshot(self) -> tuple:
        return (self.inner.snapshot(), self._current)

    def restore(self, snap: tuple) -> None:
        inner_snap, self._current = snap
        self.inner.restore(inner_snap)

    # ------------------------------------------------------------------ per tick

    def decelerate(self) -> np.ndarray:
        return self.step(None)

    def step(self, target: np.ndarray | None, fresh: bool = True) -> np.ndarray:
        """As the inner filter's ``step``; ``fresh`` (is a base-velocity target still covered by
        its command) is passed on to filters that take it, i.e. only when it is False."""
        if target is None:
            # Braking shrinks every joint's stop distance: always allowed, nothing to check.
            self._current = None
            return self._inner_step(None, fresh)
        current = self._current
        if current is None:
            current = self.measure(self.inner.position, self.inner.velocity)
        snap = self.inner.snapshot()
        out = self._inner_step(target, fresh)
        new = self.measure(out, self.inner.velocity)
        refused = self._refusal(new, current)
        if refused is None:
            self._current = new
            return out
        self.inner.restore(snap)
        if refused == "workspace":
            self.inner.counters.workspace += 1
        else:
            self.inner.counters.separation += 1
        self._current = None
        return self.inner.decelerate()

    def _inner_step(self, target: np.ndarray | None, fresh: bool) -> np.ndarray:
        # A filter without base-velocity groups has no use for ``fresh`` (and may not take it).
        return self.inner.step(target) if fresh else self.inner.step(target, fresh)

    def braking_path(self, position: np.ndarray, velocity: np.ndarray) -> list[np.ndarray]:
        """Model configurations along the way to the stop pose: the commanded one first, the stop
        pose last.

        Each chain joint brakes at its acceleration limit from ``velocity`` (a joint that stops
        sooner waits there); the stop pose adds one tick of travel at the current velocity. The
        path is sampled at equal times after now, as many samples as the longest joint travel needs for
        one per ``PATH_STEP`` (at most ``MAX_SAMPLES``; one when slow, the common case): the
        Cartesian path between samples bulges by about r (1 - cos(step / 2)), under 2 mm for a
        0.5 m arm and 0.15 rad (docs/kinematics.md)."""
        p, v, dt = position.tolist(), velocity.tolist(), self.dt
        n = len(self._qi)
        p0, v0, t_stop = [0.0] * n, [0.0] * n, [0.0] * n
        longest = t_max = 0.0
        for k, i in enumerate(self._qi):
            vi = v[i]
            p0[k], v0[k] = p[i], vi
            t_stop[k] = abs(vi) / self._acc[k]
            t_max = t_stop[k] if t_stop[k] > t_max else t_max
            travel = abs(vi) * (0.5 * t_stop[k] + dt)
            longest = travel if travel > longest else longest
        samples = min(MAX_SAMPLES, max(1, math.ceil(longest / PATH_STEP)))
        out = [np.array(p0)]  # where the arm is commanded now: always visited
        for s in range(1, samples + 1):
            t = t_max * s / samples
            q = []
            for k in range(n):
                vi, tk = v0[k], t_stop[k]
                tt = t if t < tk else tk
                x = p0[k] + vi * tt - (0.5 * self._acc[k] * tt * tt if vi > 0 else -0.5 * self._acc[k] * tt * tt)
                if s == samples:
                    x += vi * dt
                lo, hi = self._lo[k], self._hi[k]
                q.append(lo if x < lo else hi if x > hi else x)
            out.append(np.array(q))
        return out

    def stop_pose(self, position: np.ndarray, velocity: np.ndarray) -> np.ndarray:
        """The model configuration where each chain joint comes to rest braking at its acceleration
        limit, plus one tick of travel, inside its range."""
        return self.braking_path(position, velocity)[-1]

    def measure(self, position: np.ndarray, velocity: np.ndarray) -> tuple[list[float], list[float]]:
        """(squared distance outside its arm's box of each check point, squared separation of each
        pair of arms): the worst along the braking path from the action-layout ``position`` and
        ``velocity`` (the stop pose when slow)."""
        outside = [0.0] * len(self._boxes)
        seps = [math.inf] * len(self._pairs)
        for q in self.braking_path(position, velocity):
            pts = self.kin.points_q(q)
            for c, (point, box) in enumerate(zip(pts, self._boxes)):
                if box is not None:
                    s = 0.0
                    for x, lo, hi in zip(point, box[0], box[1]):
                        d = lo - x if x < lo else x - hi if x > hi else 0.0
                        s += d * d
                    outside[c] = s if s > outside[c] else outside[c]
            for k, (a, b) in enumerate(self._pairs):
                best = seps[k]
                for pa in pts[2 * a:2 * a + 2]:
                    for pb in pts[2 * b:2 * b + 2]:
                        d = (pa[0] - pb[0]) ** 2 + (pa[1] - pb[1]) ** 2 + (pa[2] - pb[2]) ** 2
                        best = d if d < best else best
                seps[k] = best
        return outside, seps

    def _refusal(self, new: tuple[list[float], list[float]], current: tuple[list[float], list[float]]) -> str | None:
        for o_new, o_cur in zip(*(new[0], current[0])):
            if o_new > 0.0 and o_new > o_cur + _EPS:
                return "workspace"
        for s_new, s_cur in zip(new[1], current[1]):
            if s_new < self._min_sep_sq and s_new < s_cur - _EPS:
                return "separation"
        return None


def cartesian_guard(emb: EmbodimentConfig, inner: Any) -> CartesianGuard | None:
    """A filter wrapping ``inner`` that enforces the embodiment's Cartesian limits; None when it has none."""
    if emb.kinematics is None:
        return None
    return CartesianGuard(emb, inner)
