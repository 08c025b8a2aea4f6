"""Workspace box and two-arm separation limits: a guard around the driver's joint-space filter.

Every tick ``CartesianGuard.step`` lets the inner filter (per-group modes and joint limits) take its
step, then looks at the way the arms would go if they braked from the new state: the BRAKING PATH,
each chain joint braking at the inner filter's acceleration limit to its STOP POSE (its commanded
position plus ``v|v|/(2a)`` plus one tick of travel ``v*dt``, clamped to its range). The path is
sampled from the commanded pose to the stop pose (see ``braking_path``); forward kinematics
(drivers/core/kinematics.py) gives each arm's check points (wrist, tool) at each sample.

Between two samples the check points move along curves the samples do not see. The guard bounds
them instead of sampling finer: a check point moves at most ``sum |dq_k| * lever_k`` over the
segment (``lever_k``: a bound on the distance from joint k to the point, from the chain's offsets),
so anywhere on a segment its signed distance outside the box is at most the larger of the two
samples' plus half that, and two arms' separation at least the smaller of the two samples' minus
half their sum. One tick of travel per joint is added for the filter's discrete braking, which
runs slightly off the continuous path. These bounds, not the samples, are what is compared:

- a check point of an arm may be outside that arm's box on the new path only if it is no further
  outside than on the path of the state before the step (else the step is refused: ``workspace``);
- two arms' check points may come nearer than ``min_separation`` on the new path only if no nearer
  than on the path before the step (else ``separation``).

A refused step is undone (the inner filter is restored to its state before the step) and the inner
filter decelerates instead, along the path that was accepted last. So an arm that is inside stays
inside, and one that starts outside (armed there, or pushed) may move back in but not further out.
The bounds are conservative: at speed the arms keep a margin from the box faces and from each other
that shrinks as they slow (docs/kinematics.md). The guard checks points, not link volumes.

A refused step decelerates every dof of the inner filter (the whole robot brakes, grippers and base
included): the inner filter has one state, and braking is always safe. The clamps the inner filter
counted during the refused step stay counted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from armada.drivers.core.kinematics import POINTS_PER_ARM as P  # check points per arm, arm by arm
from armada.drivers.core.kinematics import ArmKinematics

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig

# A step counts as "further out" (or "closer") only beyond this (m), so rounding in the forward
# kinematics of an arm held at the box face never refuses a step.
_EPS = 1e-12
# The braking path is sampled at one sample per this much joint travel (rad, or m for a prismatic
# joint), at most MAX_SAMPLES: fewer samples cost less and widen the margin kept at speed.
PATH_STEP = 0.15
MAX_SAMPLES = 8
# ... and at one sample per this much travel of a check point (m, by the levers' bound), so the margin
# the bound keeps at moderate speed is a few cm rather than the whole braking travel.
REACH_STEP = 0.04


# (bound outside the box per check point, bound on the separation per pair of arms, the same two at
# the braking path's samples only), in m.
Measure = tuple[list[float], list[float], list[float], list[float]]


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
        self._min_sep = self.min_separation or 0.0
        # Per model dof: how far a check point of its arm can move per unit of its travel, and which
        # arm it belongs to (the model holds the arms' chains one after the other).
        self._lever: list[float] = []
        self._arm_of: list[int] = []
        for a, arm in enumerate(emb.kinematics.arms):
            self._lever += chain_levers(arm, limits.lower[[emb.joint_names.index(j.joint) for j in arm.chain]],
                                        limits.upper[[emb.joint_names.index(j.joint) for j in arm.chain]])
            self._arm_of += [a] * len(arm.chain)
        # (bound on the signed distance outside its box of each check point, bound on the separation
        # of each pair of arms) along the current state's braking path; None: not known yet.
        self._current: Measure | None = None

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
            # Braking follows the braking path measured last (what remains of it): always allowed,
            # and that measure still bounds it. Measured afresh, its samples would fall elsewhere
            # and the bound could come out looser, letting the next step go further.
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
        self._current = current  # the path it now brakes along (module docstring)
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
        reach = [0.0] * self.kin.n_arms  # how far each arm's check points can travel while braking
        for k, i in enumerate(self._qi):
            vi = v[i]
            p0[k], v0[k] = p[i], vi
            t_stop[k] = abs(vi) / self._acc[k]
            t_max = t_stop[k] if t_stop[k] > t_max else t_max
            travel = abs(vi) * (0.5 * t_stop[k] + dt)
            longest = travel if travel > longest else longest
            reach[self._arm_of[k]] += travel * self._lever[k]
        # Enough samples that each segment's bound adds at most REACH_STEP / 2 (module docstring).
        needed = max(math.ceil(longest / PATH_STEP), math.ceil(max(reach) / REACH_STEP))
        samples = min(MAX_SAMPLES, max(1, needed))
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

    def measure(self, position: np.ndarray, velocity: np.ndarray) -> Measure:
        """(bound on the signed distance outside its arm's box of each check point, negative inside;
        bound on the separation of each pair of arms; the same two at the samples only): the worst
        anywhere along the braking path from the action-layout ``position`` and ``velocity``, in m
        (module docstring)."""
        path = self.braking_path(position, velocity)
        n_arms = self.kin.n_arms
        # One tick of travel per joint: the filter's discrete braking runs a little off the path.
        slack = [0.0] * n_arms
        v, dt = velocity.tolist(), self.dt
        for k, i in enumerate(self._qi):
            slack[self._arm_of[k]] += abs(v[i]) * dt * self._lever[k]
        outside = [-math.inf] * len(self._boxes)
        seps = [math.inf] * len(self._pairs)
        sampled_out = [-math.inf] * len(self._boxes)
        sampled_sep = [math.inf] * len(self._pairs)
        prev_q, prev_sd, prev_sep = None, None, None
        for q in path:
            pts = self.kin.points_q(q)
            sd = [_signed_outside(point, box) if box is not None else -math.inf for point, box in zip(pts, self._boxes)]
            sep = [_closest(pts[P * a:P * a + P], pts[P * b:P * b + P]) for a, b in self._pairs]
            if prev_q is None:
                reach = slack  # the commanded pose itself: only the discrete-braking slack
                seg_sd, seg_sep = sd, sep
            else:
                reach = slack[:]
                for k, (x0, x1) in enumerate(zip(prev_q, q)):
                    reach[self._arm_of[k]] += abs(x1 - x0) * self._lever[k]
                seg_sd = [x if x > y else y for x, y in zip(sd, prev_sd)]
                seg_sep = [x if x < y else y for x, y in zip(sep, prev_sep)]
            sampled_out = [x if x > y else y for x, y in zip(sd, sampled_out)]
            sampled_sep = [x if x < y else y for x, y in zip(sep, sampled_sep)]
            for c, d in enumerate(seg_sd):
                d += 0.5 * reach[c // P]
                outside[c] = d if d > outside[c] else outside[c]
            for k, (a, b) in enumerate(self._pairs):
                d = seg_sep[k] - 0.5 * (reach[a] + reach[b])
                seps[k] = d if d < seps[k] else seps[k]
            prev_q, prev_sd, prev_sep = q, sd, sep
        return outside, seps, sampled_out, sampled_sep

    def _refusal(self, new: Measure, current: Measure) -> str | None:
        # A bound that grows past the limit is refused, except while the arm is not yet provably
        # inside (its current bound is past the limit: armed outside, or pushed) and gets no further
        # out (or closer) at the braking path's samples: it may move back in, though any motion widens
        # the bound. Once its bound is inside, it stays inside.
        for o_new, o_cur, s_new, s_cur in zip(new[0], current[0], new[2], current[2]):
            if o_new > 0.0 and o_new > o_cur + _EPS and not (o_cur > 0.0 and s_new <= s_cur + _EPS):
                return "workspace"
        for d_new, d_cur, s_new, s_cur in zip(new[1], current[1], new[3], current[3]):
            if d_new < self._min_sep and d_new < d_cur - _EPS and not (d_cur < self._min_sep and s_new >= s_cur - _EPS):
                return "separation"
        return None


def chain_levers(arm: Any, lower: np.ndarray, upper: np.ndarray) -> list[float]:
    """Per joint of an arm's chain: a bound on how far its check points (wrist and tool) move per
    unit of that joint's travel. A prismatic joint moves them as far as itself; a revolute joint
    by its distance to them, at most the offsets of the joints after it (prismatic ones at full
    extension) plus the tool offset."""
    def norm(xyz: tuple[float, float, float]) -> float:
        return math.sqrt(xyz[0] ** 2 + xyz[1] ** 2 + xyz[2] ** 2)

    chain = arm.chain
    out = []
    for k, jc in enumerate(chain):
        if jc.type == "prismatic":
            out.append(1.0)
            continue
        reach = norm(arm.tool_xyz)
        for j in range(k + 1, len(chain)):
            reach += norm(chain[j].xyz)
            if chain[j].type == "prismatic":
                reach += max(abs(float(lower[j])), abs(float(upper[j])))
        out.append(reach)
    return out


def _signed_outside(point: list[float], box: tuple[tuple[float, ...], tuple[float, ...]]) -> float:
    """Distance of a point outside a box; inside, minus its distance to the nearest face."""
    out_sq, depth = 0.0, math.inf
    for x, lo, hi in zip(point, box[0], box[1]):
        if x < lo:
            out_sq += (lo - x) ** 2
        elif x > hi:
            out_sq += (x - hi) ** 2
        else:
            d = x - lo if x - lo < hi - x else hi - x
            depth = d if d < depth else depth
    return math.sqrt(out_sq) if out_sq > 0.0 else -depth


def _closest(pa: list[list[float]], pb: list[list[float]]) -> float:
    best = math.inf
    for a in pa:
        for b in pb:
            d = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 + (a[2] - b[2]) ** 2
            best = d if d < best else best
    return math.sqrt(best)


def cartesian_guard(emb: EmbodimentConfig, inner: Any) -> CartesianGuard | None:
    """A filter wrapping ``inner`` that enforces the embodiment's Cartesian limits; None when it has none."""
    if emb.kinematics is None:
        return None
    return CartesianGuard(emb, inner)
