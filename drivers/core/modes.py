"""Per-group command modes: each group of the action vector gets the filter its mode needs.

- ``joint_position``, ``gripper_position``, ``lift_height``: positions, through the SafetyFilter
  (every joint has its own range, velocity and acceleration limits, so a lift column is a
  position joint with the lift's own limits). All position dofs share one SafetyFilter: it is
  per joint anyway, and this keeps its clamp counts exactly as for a robot without a base.
- ``base_velocity``: velocities (vx m/s, vy m/s, wz rad/s) through ``BaseVelocityFilter``: the
  target is clamped to ``[min, max]``, its acceleration and jerk are limited, a hold (None) ramps
  to zero under the same limits, and a target that is no longer fresh is followed for at most the
  group's ``command_timeout_s`` before it ramps to zero on its own.

``build_group_filter`` returns the plain SafetyFilter when every group is a position group: an
arm-only robot runs exactly the code it ran before the modes existed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from armada.drivers.core.safety import ClampCounters, SafetyFilter, SafetyLimits, checked_goals

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig

POSITION_MODES = ("joint_position", "gripper_position", "lift_height")


class BaseVelocityFilter:
    """Velocity commands for a wheeled base, limited in value, acceleration and jerk.

    Per tick and per dof, with ``u`` the velocity change of one tick (acceleration * dt) and
    ``du = max_jerk * dt**2`` the most ``u`` may change per tick:

    1. the goal: the target clamped to ``[min, max]``; zero on a hold (None), on a non-finite
       target, or once the target has not been fresh for ``timeout_s``;
    2. the wanted ``u``: the largest step toward the goal from which ramping ``u`` back to zero at
       the jerk limit still ends at or before the goal (no overshoot), capped by the acceleration;
    3. the jerk window ``[u - du, u + du]``, then integrate: ``v += u``.

    Ramping ``u`` down from ``u`` at the jerk limit moves the velocity by at most
    ``u (u - du) / (2 du) + du / 8`` more; step 2 keeps that inside the goal, so (by the same
    argument as the SafetyFilter's braking bound) a velocity that starts inside ``[min, max]``
    never leaves it, for any target stream, while the acceleration and jerk bounds hold exactly.

    ``position`` and ``velocity`` are both the commanded velocity (so "velocity all zero" still
    means "at rest"). Pure: no clocks; staleness is counted in ticks.
    """

    def __init__(self, lower: np.ndarray, upper: np.ndarray, max_acceleration: np.ndarray,
                 max_jerk: np.ndarray, timeout_s: float, dt: float):
        arrays = {}
        for name, value in (("lower", lower), ("upper", upper), ("max_acceleration", max_acceleration),
                            ("max_jerk", max_jerk)):
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim != 1 or arr.shape[0] == 0 or not np.all(np.isfinite(arr)):
                raise ValueError(f"base velocity filter: {name} must be a non-empty finite vector, got {value!r}")
            arrays[name] = arr
        n = arrays["lower"].shape[0]
        if any(a.shape != (n,) for a in arrays.values()):
            raise ValueError(f"base velocity filter: limits have shapes {[a.shape for a in arrays.values()]}")
        if not (np.all(arrays["lower"] < 0.0) and np.all(arrays["upper"] > 0.0)):
            raise ValueError("base velocity filter: need min < 0 < max for every dof (zero is the hold)")
        if not (np.all(arrays["max_acceleration"] > 0) and np.all(arrays["max_jerk"] > 0)):
            raise ValueError("base velocity filter: max_acceleration and max_jerk must be > 0")
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"base velocity filter: dt must be finite and > 0, got {dt}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"base velocity filter: timeout_s must be finite and > 0, got {timeout_s}")
        self.dt = float(dt)
        self.dof = n
        self.counters = ClampCounters()
        self._lo = arrays["lower"].tolist()
        self._hi = arrays["upper"].tolist()
        self._umax = (arrays["max_acceleration"] * self.dt).tolist()
        self._du = (arrays["max_jerk"] * self.dt * self.dt).tolist()
        # A stale target is still followed on this many ticks (ceil: never less than the timeout).
        self.timeout_ticks = max(math.ceil(timeout_s / self.dt - 1e-9), 1)
        self._v = [0.0] * n
        self._u = [0.0] * n
        self._stale = self.timeout_ticks  # ticks since the last fresh target; reset: nothing to follow

    # ------------------------------------------------------------------ state

    @property
    def position(self) -> np.ndarray:
        return np.array(self._v)

    @property
    def velocity(self) -> np.ndarray:
        return np.array(self._v)

    @property
    def acceleration(self) -> np.ndarray:
        return np.array(self._u) / self.dt

    def reset(self, position: np.ndarray) -> None:
        """Engage at the measured velocity, with no acceleration: the next steps start from there."""
        vel = np.asarray(position, dtype=np.float64)
        if vel.shape != (self.dof,) or not np.all(np.isfinite(vel)):
            raise ValueError(f"base velocity filter: reset velocity must be finite with shape {(self.dof,)}, got {vel}")
        self._v = vel.tolist()
        self._u = [0.0] * self.dof
        self._stale = self.timeout_ticks

    def snapshot(self) -> tuple:
        return (self._v[:], self._u[:], self._stale)

    def restore(self, snap: tuple) -> None:
        v, u, stale = snap
        self._v, self._u, self._stale = v[:], u[:], stale

    # ------------------------------------------------------------------ per tick

    def step(self, target: np.ndarray | list[float] | None, fresh: bool = True) -> np.ndarray:
        """The next commanded velocity toward ``target``; None (a hold) ramps to zero.

        ``fresh``: the target comes from a command that covers now. A target that is not fresh is
        followed for ``timeout_ticks`` ticks after the last fresh one, then the base ramps to zero.
        """
        goals = None if target is None else self._checked(target)
        # A target refused as non-finite is not fresh either: that tick counts toward staleness.
        return np.array(self.advance_checked(goals, fresh and goals is not None))

    def decelerate(self) -> np.ndarray:
        return self.step(None)

    def advance_checked(self, goals: list[float] | None, fresh: bool) -> list[float]:
        """``step`` on goals a composing filter has already checked (finite floats, one per dof).
        Returns the commanded velocities as the filter's own list: read only."""
        self._stale = 0 if fresh and goals is not None else min(self._stale + 1, self.timeout_ticks + 1)
        if goals is not None and self._stale > self.timeout_ticks:
            if any(goals):
                self.counters.stale += 1
            goals = None
        self._advance(goals)
        return self._v

    def _checked(self, target: np.ndarray | list[float]) -> list[float] | None:
        return checked_goals(target, self.dof, self.counters)

    def _advance(self, goals: list[float] | None) -> None:
        vel_clamped = acc_clamped = jerk_clamped = False
        for i in range(self.dof):
            v, u, du, umax = self._v[i], self._u[i], self._du[i], self._umax[i]
            goal = 0.0
            if goals is not None:
                goal, lo, hi = goals[i], self._lo[i], self._hi[i]
                if goal > hi or goal < lo:
                    goal = hi if goal > hi else lo
                    vel_clamped = True
            err = goal - v
            want = _approach(abs(err), du)
            capped = want > umax
            if capped:
                want = umax
            if err < 0.0:
                want = -want
            # The jerk window. |u| <= umax and |want| <= umax, so the result obeys both. The
            # acceleration limit counts only where it, not the jerk window, set the step.
            if want > u + du:
                want, jerk_clamped = u + du, True
            elif want < u - du:
                want, jerk_clamped = u - du, True
            else:
                acc_clamped = acc_clamped or capped
            self._u[i] = want
            self._v[i] = v + want
        if goals is not None:
            c = self.counters
            c.velocity += vel_clamped
            c.acceleration += acc_clamped
            c.jerk += jerk_clamped


def _approach(err: float, du: float) -> float:
    """The largest velocity step (>= 0) toward a goal ``err`` away after which ramping the step
    back to zero at ``du`` per tick still stops at or before the goal.

    Ramping down from ``u`` adds at most ``u (u - du) / (2 du) + du / 8``; ``u`` plus that is at
    most ``err`` for ``u = (sqrt(8 du err) - du) / 2``. Within ``du`` of the goal one step lands
    on it exactly (the next one may return to zero), so a hold ends at exactly zero.
    """
    if err <= du:
        return err
    return max(0.5 * (math.sqrt(8.0 * du * err) - du), du)


class GroupedFilter:
    """Several mode filters over one action vector, with the SafetyFilter's interface.

    Position dofs (arms, grippers, lift) go through one SafetyFilter, base-velocity dofs through
    one BaseVelocityFilter per base group. All parts share one ClampCounters, so the counts (and
    a wrapping guard's own counts) are in one place; a tick on which two parts clamp the same kind
    counts once per part.
    """

    def __init__(self, emb: EmbodimentConfig, dt: float):
        self.limits = SafetyLimits.from_embodiment(emb)
        self.dt = float(dt)
        self.dof = emb.dof
        self.counters = ClampCounters()
        slices = emb.group_slices()
        pos_idx = [i for g in emb.groups if g.mode in POSITION_MODES for i in range(emb.dof)[slices[g.name]]]
        self._pos_idx = np.array(pos_idx, dtype=np.intp)
        self._pos: SafetyFilter | None = None
        if pos_idx:
            lim = self.limits
            self._pos = SafetyFilter(SafetyLimits(lower=lim.lower[pos_idx], upper=lim.upper[pos_idx],
                                                  max_velocity=lim.max_velocity[pos_idx],
                                                  max_acceleration=lim.max_acceleration[pos_idx],
                                                  margin=lim.margin, gripper_mask=lim.gripper_mask[pos_idx]), dt)
            self._pos.counters = self.counters
        self._bases: list[tuple[slice, BaseVelocityFilter]] = []
        for g in emb.groups:
            if g.mode != "base_velocity":
                continue
            base = BaseVelocityFilter(lower=[j.min for j in g.joints], upper=[j.max for j in g.joints],
                                      max_acceleration=[j.max_acceleration for j in g.joints],
                                      max_jerk=[j.max_jerk for j in g.joints],
                                      timeout_s=g.command_timeout_s, dt=dt)
            base.counters = self.counters
            self._bases.append((slices[g.name], base))
        self._pos_list: list[int] = pos_idx
        self._out = [0.0] * self.dof
        self._p = np.zeros(self.dof)

    # ------------------------------------------------------------------ state

    @property
    def position(self) -> np.ndarray:
        return self._p.copy()

    @property
    def velocity(self) -> np.ndarray:
        out = np.zeros(self.dof)
        if self._pos is not None:
            out[self._pos_idx] = self._pos.velocity
        for sl, base in self._bases:
            out[sl] = base.velocity
        return out

    def reset(self, position: np.ndarray) -> None:
        pos = np.asarray(position, dtype=np.float64)
        if pos.shape != (self.dof,):
            raise ValueError(f"grouped filter: reset pose has shape {pos.shape}, expected {(self.dof,)}")
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"grouped filter: reset pose is not finite: {pos}")
        if self._pos is not None:
            self._pos.reset(pos[self._pos_idx])
        for sl, base in self._bases:
            base.reset(pos[sl])
        self._p = pos.copy()

    def snapshot(self) -> tuple:
        return (None if self._pos is None else self._pos.snapshot(),
                tuple(base.snapshot() for _, base in self._bases), self._p.copy())

    def restore(self, snap: tuple) -> None:
        pos_snap, base_snaps, p = snap
        if self._pos is not None:
            self._pos.restore(pos_snap)
        for (_, base), s in zip(self._bases, base_snaps):
            base.restore(s)
        self._p = p.copy()

    # ------------------------------------------------------------------ per tick

    def step(self, target: np.ndarray | None, fresh: bool = True) -> np.ndarray:
        """The next command (positions, and velocities for the base) toward ``target``; None holds:
        the position dofs decelerate to a stop, the base ramps to zero."""
        # Counted once here (nonfinite); the parts only see a hold.
        goals = None if target is None else checked_goals(target, self.dof, self.counters)
        # Checked once here; the parts step on plain floats (a tick is a few microseconds).
        out = self._out
        if self._pos is not None:
            pos = self._pos.advance_checked(None if goals is None else [goals[i] for i in self._pos_list])
            for k, i in enumerate(self._pos_list):
                out[i] = pos[k]
        for sl, base in self._bases:
            out[sl] = base.advance_checked(None if goals is None else goals[sl], fresh)
        self._p = np.array(out)
        return self._p.copy()

    def decelerate(self) -> np.ndarray:
        return self.step(None)


def build_group_filter(emb: EmbodimentConfig, dt: float) -> SafetyFilter | GroupedFilter:
    """The mode filters of ``emb``: the plain SafetyFilter when every group is a position group."""
    if all(g.mode in POSITION_MODES for g in emb.groups):
        return SafetyFilter(SafetyLimits.from_embodiment(emb), dt)
    return GroupedFilter(emb, dt)


def base_mask(emb: EmbodimentConfig) -> np.ndarray:
    """Which dofs of the action vector are base velocities."""
    return np.array([g.mode == "base_velocity" for g in emb.groups for _ in g.joints], dtype=bool)
