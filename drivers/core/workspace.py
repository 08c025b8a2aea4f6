"""Workspace box and two-arm separation limits: a guard around the driver's joint-space filter.

Every tick ``CartesianGuard.step`` lets the inner filter (per-group modes and joint limits) take its
step, then looks at where the arms would come to rest if they braked from the new state: the STOP
POSE, each joint's commanded position plus its braking distance ``v|v|/(2a)`` plus one tick of
travel ``v*dt`` (``a`` the inner filter's acceleration limit), clamped to the joint's range. Forward
kinematics (drivers/core/kinematics.py) gives each arm's check points (wrist, tool) at that pose.
The step is refused - the inner filter is restored to its state before the step and decelerates
instead - when

- a check point of an arm is outside that arm's box AND further outside than at the stop pose of
  the state before the step (counted as ``workspace``), or
- two arms' closest check points are nearer than ``min_separation`` AND nearer than at the stop pose
  before the step (counted as ``separation``).

So an arm that is inside stays inside, and one that starts outside (armed there, or pushed) may move
back in but not further out. Braking keeps every joint between its position and its stop pose, so
the arm comes to rest without crossing the box in joint space; in Cartesian space the braking path
is curved, so a check point may pass the box by a little (a few millimetres at these speeds, bounded
in tests/unit/test_workspace.py and docs/kinematics.md). The guard checks points, not link volumes.

A refused step decelerates every dof of the inner filter (the whole robot brakes, grippers and base
included): the inner filter has one state, and braking is always safe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from armada.drivers.core.kinematics import ArmKinematics

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig

# A step counts as "further out" (or "closer") only beyond this (m), so rounding in the forward
# kinematics of an arm held still at the box face never refuses a step.
_EPS = 1e-9


class CartesianGuard:
    """The inner filter's interface, with the workspace box and separation limits enforced."""

    def __init__(self, emb: EmbodimentConfig, inner: Any):
        assert emb.kinematics is not None
        self.inner = inner
        self.kin = ArmKinematics(emb)
        limits = inner.limits
        self._lo = limits.lower + limits.margin
        self._hi = limits.upper - limits.margin
        self._inv_2a = 1.0 / (2.0 * limits.max_acceleration)
        n = self.kin.n_arms
        # Per check point: the box corners (an arm without a box: unbounded).
        self._box_lo = np.full((n, 1, 3), -np.inf)
        self._box_hi = np.full((n, 1, 3), np.inf)
        for a, arm in enumerate(emb.kinematics.arms):
            if arm.workspace is not None:
                self._box_lo[a, 0] = arm.workspace.min
                self._box_hi[a, 0] = arm.workspace.max
        self._boxed = bool(np.isfinite(self._box_lo).any())
        self.min_separation = emb.kinematics.min_separation
        self._pairs = [(a, b) for a in range(n) for b in range(a + 1, n)] if self.min_separation else []
        # (outside distances, separations) at the current state's stop pose; None: not known yet.
        self._current: tuple[np.ndarray, np.ndarray] | None = None

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

    def step(self, target: np.ndarray | None) -> np.ndarray:
        if target is None:
            # Braking shrinks every joint's stop distance: always allowed, nothing to check.
            self._current = None
            return self.inner.step(None)
        current = self._current
        if current is None:
            current = self.measure(self.inner.position, self.inner.velocity)
        snap = self.inner.snapshot()
        out = self.inner.step(target)
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
        return self.inner.step(None)

    def stop_pose(self, position: np.ndarray, velocity: np.ndarray) -> np.ndarray:
        """Where each joint comes to rest braking at its acceleration limit, plus one tick of travel."""
        stop = position + velocity * (np.abs(velocity) * self._inv_2a + self.dt)
        return np.minimum(np.maximum(stop, self._lo), self._hi)

    def measure(self, position: np.ndarray, velocity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance of each check point outside its arm's box (n_arms, 2), each pair's separation)."""
        pts = self.kin.points(self.stop_pose(position, velocity))
        if self._boxed:
            gap = np.maximum(np.maximum(self._box_lo - pts, pts - self._box_hi), 0.0)
            outside = np.sqrt((gap * gap).sum(axis=-1))
        else:
            outside = np.zeros(pts.shape[:2])
        seps = np.empty(len(self._pairs))
        for k, (a, b) in enumerate(self._pairs):
            d = pts[a][:, None, :] - pts[b][None, :, :]
            seps[k] = np.sqrt((d * d).sum(axis=-1).min())
        return outside, seps

    def _refusal(self, new: tuple[np.ndarray, np.ndarray], current: tuple[np.ndarray, np.ndarray]) -> str | None:
        out_new, sep_new = new
        out_cur, sep_cur = current
        if np.any((out_new > 0.0) & (out_new > out_cur + _EPS)):
            return "workspace"
        if self._pairs and np.any((sep_new < self.min_separation) & (sep_new < sep_cur - _EPS)):
            return "separation"
        return None


def cartesian_guard(emb: EmbodimentConfig, inner: Any) -> CartesianGuard | None:
    """A filter wrapping ``inner`` that enforces the embodiment's Cartesian limits; None when it has none."""
    if emb.kinematics is None:
        return None
    return CartesianGuard(emb, inner)
