"""The driver's safety filter: the last step between a requested target and the device.

Per tick and per joint, in the order ros2_control's joint limiter uses:

1. reject a non-finite or mis-shaped target (decelerate instead, never pass it through);
2. clamp the target into ``[lower + margin, upper - margin]``;
3. choose a velocity: the reference's own velocity (``(goal - previous goal) / dt``) plus a
   correction that closes the remaining lag along a braking curve (at half the acceleration
   limit), so a lagging joint catches up without overshooting and ringing; then saturate it.
   On a feasible stream that the filter already follows, the correction is zero and the target
   passes through unchanged. (Aiming straight at the goal, ``(goal - p) / dt``, turns any small
   lag into a demand the acceleration limit cuts, which then overshoots and rings.)
4. saturate the change of velocity (acceleration);
5. saturate the velocity so that the joint can still stop inside the range (braking);
6. integrate: ``position += velocity * dt``.

Braking bound. Stopping from velocity ``v`` by shedding ``a*dt`` per tick covers at most
``v * (v + a*dt) / (2a)``. We require the slightly stronger ``v * (v + 2*a*dt) <= 2*a*d`` (``d``:
distance left to the limit), i.e. ``v <= -a*dt + sqrt((a*dt)^2 + 2*a*d)``. If a state satisfies
it, braking by ``a*dt`` for one tick satisfies it again (the extra ``(a*dt)^2`` is slack), so
from any reset with zero velocity the braking, acceleration and velocity bounds always have a
common solution and the position never leaves the range. The bound is 0 at or beyond a limit, so a
joint that starts outside the margin can only move back inward, with limited velocity and
acceleration.

The filter is pure: no clocks, no I/O. ``step`` runs every control tick (500 Hz on a UR3), so it
does no more than a few small allocations per call.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig


@dataclass(frozen=True, eq=False)  # eq=False: a generated == on arrays would raise, not compare
class SafetyLimits:
    lower: np.ndarray
    upper: np.ndarray
    max_velocity: np.ndarray
    max_acceleration: np.ndarray
    margin: float  # targets are kept this far inside [lower, upper]
    gripper_mask: np.ndarray  # which dofs are grippers: their clamps are also counted separately

    def __post_init__(self) -> None:
        # Own read-only float64 copies, so that "frozen" also covers the array contents.
        for name in ("lower", "upper", "max_velocity", "max_acceleration"):
            object.__setattr__(self, name, _frozen_array(getattr(self, name), np.float64, name))
        object.__setattr__(self, "gripper_mask", _frozen_array(self.gripper_mask, np.bool_, "gripper_mask"))
        try:
            object.__setattr__(self, "margin", float(self.margin))
        except (TypeError, ValueError):
            raise ValueError(f"safety limits: margin must be a number, got {self.margin!r}") from None
        self._validate()

    def _validate(self) -> None:
        dof = self.lower.shape[0]
        if dof == 0:
            raise ValueError("safety limits: at least one dof is needed")
        for name in ("upper", "max_velocity", "max_acceleration", "gripper_mask"):
            if getattr(self, name).shape != (dof,):
                raise ValueError(f"safety limits: {name} has shape {getattr(self, name).shape}, "
                                 f"lower has {(dof,)}")
        if not (np.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"safety limits: margin must be finite and >= 0, got {self.margin}")
        for name in ("lower", "upper", "max_velocity", "max_acceleration"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"safety limits: {name} must be finite, got {getattr(self, name)}")
        for name in ("max_velocity", "max_acceleration"):
            bad = np.flatnonzero(getattr(self, name) <= 0)
            if bad.size:
                raise ValueError(f"safety limits: {name} must be > 0, dofs {bad.tolist()} are not")
        bad = np.flatnonzero(self.lower + self.margin >= self.upper - self.margin)
        if bad.size:
            raise ValueError(f"safety limits: dofs {bad.tolist()} have no room inside the margin "
                             f"(need lower + {self.margin} < upper - {self.margin})")

    @property
    def dof(self) -> int:
        return self.lower.shape[0]

    @classmethod
    def from_embodiment(cls, emb: EmbodimentConfig) -> SafetyLimits:
        return cls(lower=emb.lower, upper=emb.upper, max_velocity=emb.max_velocity,
                   max_acceleration=emb.max_acceleration, margin=emb.position_margin,
                   gripper_mask=emb.gripper_mask())


def _frozen_array(value: object, dtype: type, name: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=dtype, copy=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"safety limits: {name} is not a numeric array: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"safety limits: {name} must be one-dimensional, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@dataclass
class ClampCounters:
    """Cumulative number of ticks on which a clamp changed something, per kind."""

    nonfinite: int = 0
    position: int = 0
    velocity: int = 0
    acceleration: int = 0
    braking: int = 0
    gripper: int = 0
    jerk: int = 0  # base velocity: the change of acceleration was limited
    stale: int = 0  # base velocity: a target outlived its command and was ramped to zero
    workspace: int = 0  # a step toward leaving the workspace box was replaced by braking
    separation: int = 0  # a step bringing two arms closer than allowed was replaced by braking

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class SafetyFilter:
    """Pure per-tick filter. ``reset`` at the measured pose before the first ``step``."""

    def __init__(self, limits: SafetyLimits, dt: float):
        if not (np.isfinite(dt) and dt > 0):
            raise ValueError(f"safety filter: dt must be finite and > 0, got {dt}")
        self.limits = limits
        self.dt = float(dt)
        self.counters = ClampCounters()
        self._dof = limits.dof
        # The tick works on Python floats: for a handful of joints a scalar loop costs a fraction
        # of the fixed per-call overhead of the ~30 small numpy operations the vector form needs.
        self._lo = (limits.lower + limits.margin).tolist()
        self._hi = (limits.upper - limits.margin).tolist()
        self._vmax = limits.max_velocity.tolist()
        self._dv = (limits.max_acceleration * self.dt).tolist()  # most the velocity may change per tick
        self._two_a = (2.0 * limits.max_acceleration).tolist()
        self._gripper = limits.gripper_mask.tolist()
        self._p = [0.0] * self._dof
        self._v = [0.0] * self._dof
        self._ref: list[float] | None = None  # the previous (clamped) goal; None after a hold
        self._engaged = False

    # ------------------------------------------------------------------ state

    @property
    def position(self) -> np.ndarray:
        """The last commanded position (a copy)."""
        return np.array(self._p)

    @property
    def velocity(self) -> np.ndarray:
        """The velocity of the last commanded step (a copy)."""
        return np.array(self._v)

    def reset(self, position: np.ndarray) -> None:
        """Engage at the measured pose: the next step starts from here, at rest."""
        pos = np.asarray(position, dtype=np.float64)
        if pos.shape != (self._dof,):
            raise ValueError(f"safety filter: reset pose has shape {pos.shape}, expected {(self._dof,)}")
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"safety filter: reset pose is not finite: {pos}")
        self._p = pos.tolist()
        self._v = [0.0] * self._dof
        self._ref = None
        self._engaged = True

    def snapshot(self) -> tuple:
        """The motion state, for a guard that may take a step back (``restore``)."""
        return (self._p[:], self._v[:], None if self._ref is None else self._ref[:])

    def restore(self, snap: tuple) -> None:
        p, v, ref = snap
        self._p, self._v, self._ref = p[:], v[:], None if ref is None else ref[:]

    # ------------------------------------------------------------------ per tick

    def step(self, target: np.ndarray | None, fresh: bool = True) -> np.ndarray:
        """The next commanded position (a copy) on the way to ``target``; None decelerates.

        ``fresh`` is for base-velocity filters (a position target does not go stale) and is ignored.
        """
        if not self._engaged:
            raise RuntimeError("safety filter: reset() it at the measured pose before stepping")
        goals = self._checked(target) if target is not None else None
        self._advance(goals)
        return np.array(self._p)

    def decelerate(self) -> np.ndarray:
        return self.step(None)

    def advance_checked(self, goals: list[float] | None) -> list[float]:
        """One tick on goals a composing filter has already checked (finite floats, one per dof;
        None decelerates). Returns the commanded positions as the filter's own list: read only."""
        if not self._engaged:
            raise RuntimeError("safety filter: reset() it at the measured pose before stepping")
        self._advance(goals)
        return self._p

    def _checked(self, target: np.ndarray) -> list[float] | None:
        return checked_goals(target, self._dof, self.counters)

    def _advance(self, goals: list[float] | None) -> None:
        """One tick for every dof; ``goals`` None asks for zero velocity (decelerate)."""
        pos_clamped = grip_clamped = vel_clamped = acc_clamped = brake_clamped = False
        p_all, v_all, dt = self._p, self._v, self.dt
        ref = self._ref if self._ref is not None else p_all[:]
        for i in range(self._dof):
            p, v_prev, lo, hi = p_all[i], v_all[i], self._lo[i], self._hi[i]
            if goals is None:
                v = 0.0
            else:
                goal = goals[i]
                if goal > hi or goal < lo:
                    goal = hi if goal > hi else lo
                    pos_clamped = True
                    grip_clamped = grip_clamped or self._gripper[i]
                lag = ref[i] - p
                ref[i] = goal
                v = (goal - p - lag) / dt + _catch_up(lag, dt, self._dv[i] * 0.5, self._two_a[i] * 0.5)
                vmax = self._vmax[i]
                if v > vmax or v < -vmax:
                    v = vmax if v > 0 else -vmax
                    vel_clamped = True
            dv = self._dv[i]
            if v > v_prev + dv or v < v_prev - dv:
                # Decelerating sheds at most dv and, since 0 lies in this window, never flips sign.
                v = v_prev + dv if v > v_prev else v_prev - dv
                acc_clamped = True
            # Braking last, so it wins: its interval always contains 0, and a conflict with the
            # acceleration window (only through rounding, or from a state that was already
            # outside the invariant) is resolved by braking harder rather than running past a
            # joint limit. The bound is 0 at or beyond the limit, so the joint can only stay or
            # move inward there.
            if v > 0.0:
                bound = _braking_speed(hi - p, dv, self._two_a[i])
                if v > bound:
                    v, brake_clamped = bound, True
            elif v < 0.0:
                bound = _braking_speed(p - lo, dv, self._two_a[i])
                if v < -bound:
                    v, brake_clamped = -bound, True
            v_all[i] = v
            p_all[i] = p + v * dt
        self._ref = ref if goals is not None else None
        if goals is not None:
            self._count(pos_clamped, grip_clamped, vel_clamped, acc_clamped, brake_clamped)

    def _count(self, pos: bool, grip: bool, vel: bool, acc: bool, brake: bool) -> None:
        c = self.counters
        c.position += pos
        c.gripper += grip
        c.velocity += vel
        c.acceleration += acc
        c.braking += brake


def checked_goals(target: object, dof: int, counters: ClampCounters) -> list[float] | None:
    """The target as floats, or None (counted as ``nonfinite``) when it must not be followed:
    not numeric, the wrong shape, or not finite."""
    try:
        arr = np.asarray(target, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (dof,):
        counters.nonfinite += 1
        return None
    goals = arr.tolist()
    if not all(map(math.isfinite, goals)):
        counters.nonfinite += 1
        return None
    return goals


def _braking_speed(room: float, dv: float, two_a: float) -> float:
    """Fastest speed (>= 0) toward a limit ``room`` away from which the joint can still stop."""
    if room <= 0.0:
        return 0.0
    # max(..., 0): rounding in sqrt must not turn "at rest" into "not allowed".
    return max(math.sqrt(dv * dv + two_a * room) - dv, 0.0)


def _catch_up(lag: float, dt: float, dv: float, two_a: float) -> float:
    """Velocity that closes ``lag`` without overshoot: the braking curve, and never past it in one tick."""
    if lag == 0.0:
        return 0.0
    speed = min(abs(lag) / dt, _braking_speed(abs(lag), dv, two_a))
    return speed if lag > 0 else -speed
