"""The scripted expert of the simulated tasks (policy kind ``sim_expert``): demonstrations for training.

Each call asks the sim (its control socket, drivers/sim/control.py) for the scene state, loads it
into the expert's own copy of the scene (SimWorld), takes the task's plan (a list of gripper-site
waypoints, SimWorld.plan) and turns the current waypoint into joint targets by damped least squares
IK (mujoco.mj_jacSite), then into a chunk of joint targets at ``chunking.dt``.

The chunk is a trajectory the driver never has to correct: each joint follows a braking curve
toward its goal with its speed and acceleration capped at a fraction of the embodiment's limits
(the driver's filter clamps what exceeds the limits, but a demonstration that needs clamping
teaches the model motions the arm cannot make: a good demo counts zero clamps), the joints of one
move time-scaled to arrive together (a straight line in joint space), the gripper ramped, and the
chunk ends holding still at the goal. Chunks join without a seam: a chunk starts where (and at the
speed) the previous chunk commanded for the observation's instant, as long as the arm is near it;
otherwise (the first chunk, after a resume, the arm pushed away) from the measured pose at rest.
Why not always from the measured pose: a simulated (or real) position servo lags its command, so
restarting from the measured pose would step the command back by that lag at every chunk.

Only the arm that carries the waypoint's gripper site moves (ALOHA: the right arm); every other
joint holds where the episode found it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from armada.runtime.inference.policy import ActionSpace, Chunk, Policy, PolicyError, RouteResult

if TYPE_CHECKING:
    from armada.drivers.sim.world import SimWorld, Waypoint
    from armada.runtime.inference.observation import Observation

from armada.drivers.sim.gl import choose_gl  # noqa: E402

choose_gl()  # this module imports mujoco, and the scene may be rendered in this process
import mujoco  # noqa: E402  (heavy: imported only by whoever builds the expert)

log = logging.getLogger("armada.inference")

# A chunk continues the previous one when the arm is at most this far (rad, or m for slide joints)
# from where the previous chunk put it: past that, something moved the arm (an operator, a reset).
CONTINUE_TOLERANCE = 0.15
# The gripper's commanded value has reached a waypoint's within this fraction of its range.
GRIPPER_DONE = 0.02
APPROACH_WEIGHT = 0.3  # metres of position error one radian of approach tilt is worth, in the first IK stage
MAX_CORRECTION_M = 0.03
# A joint is at its goal within this (rad or m); then the chunk holds it exactly there.
SNAP = 1e-5


class SimState(Protocol):
    """What the expert needs from the sim: drivers/sim/control.py SimControl (or a test's stand-in)."""

    def state(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ExpertLimits:
    """What the expert may command, per joint in action layout."""

    lower: np.ndarray  # inside the driver's position margin
    upper: np.ndarray
    max_velocity: np.ndarray  # a fraction of the embodiment's
    max_acceleration: np.ndarray
    gripper: np.ndarray  # bool mask
    # The driver's side: its acceleration limits (the embodiment's) and its control period.
    driver_acceleration: np.ndarray
    tick_s: float

    def chunk_acceleration(self, dt: float) -> np.ndarray:
        """The acceleration a chunk with points ``dt`` apart may use.

        The driver plays chunks through a cubic Hermite with Catmull-Rom tangents: where a held
        (or empty) stretch meets a chunk that starts from rest, the velocity at that knot jumps to
        about half the chunk's first velocity step, a*dt/2 (from an empty buffer it ramps linearly
        to the first point: about a*dt), within one control tick. Keeping that jump to half of
        what the filter allows per tick (its acceleration times the tick) means a <= 0.5 *
        a_driver * tick / dt: no limit for 50 Hz points, a fifth of it for 10 Hz ones.
        """
        return np.minimum(self.max_acceleration, 0.5 * self.driver_acceleration * self.tick_s / dt)

    @classmethod
    def from_embodiments(cls, embodiments: list[Any], speed: float, acceleration: float,
                         extra_margin: float = 0.01) -> "ExpertLimits":
        """Concatenated in the cell's driver order (the action layout); ``speed`` and ``acceleration``
        are fractions of each joint's limits; targets stay ``extra_margin`` inside the driver's margin."""
        lower, upper, vel, acc, grip, driver_acc = [], [], [], [], [], []
        for emb in embodiments:
            driver_acc.append(emb.max_acceleration)
            span = emb.upper - emb.lower
            margin = emb.position_margin + np.minimum(extra_margin, 0.05 * span)
            lower.append(emb.lower + margin)
            upper.append(emb.upper - margin)
            vel.append(emb.max_velocity * speed)
            acc.append(emb.max_acceleration * acceleration)
            grip.append(emb.gripper_mask())
        return cls(np.concatenate(lower), np.concatenate(upper), np.concatenate(vel), np.concatenate(acc),
                   np.concatenate(grip).astype(bool), np.concatenate(driver_acc),
                   1.0 / max(emb.control_rate_hz for emb in embodiments))


# --------------------------------------------------------------------------- inverse kinematics


class ArmIK:
    """Damped least squares IK of one gripper site over the joints of its kinematic chain.

    Two stages: first the position with a soft wish that the site's x axis (its approach axis, out
    of the jaws) points along the waypoint's ``approach`` (down: the jaws come over the object),
    then the position alone from there, so the position is met exactly whenever it is reachable
    and the approach is only as close as the joint limits allow (SO-101 has five joints).
    """

    def __init__(self, world: "SimWorld", site: str, limits: ExpertLimits, fixed: frozenset[int] = frozenset()):
        model = world.model
        self.world, self.model = world, model
        self.site = site
        try:
            self.site_id = model.site(site).id
        except KeyError:
            raise PolicyError(f"sim_expert: the scene has no site {site!r}") from None
        chain = self._chain(model, int(model.site_bodyid[self.site_id]))
        if not chain:
            raise PolicyError(f"sim_expert: site {site!r} is not on a moving body")
        self.joints = chain
        self.qadr = np.array([model.jnt_qposadr[j] for j in chain])
        self.action_index, self.scale, self.offset = self._map_to_actions(world)
        # Joints the IK leaves where they are (``fixed``: action indices) are not part of the chain.
        keep = np.array([int(a) not in fixed for a in self.action_index], dtype=bool)
        chain = [j for j, k in zip(chain, keep) if k]
        self.joints, self.qadr = chain, self.qadr[keep]
        self.action_index, self.scale, self.offset = self.action_index[keep], self.scale[keep], self.offset[keep]
        if not chain:
            raise PolicyError(f"sim_expert: every joint of site {site!r}'s arm is fixed")
        self.dadr = np.array([model.jnt_dofadr[j] for j in chain])
        lo = np.where(model.jnt_limited[chain] > 0, model.jnt_range[chain, 0], -np.inf)
        hi = np.where(model.jnt_limited[chain] > 0, model.jnt_range[chain, 1], np.inf)
        # The action limits (inside the driver's margin) in qpos units: a goal the driver would clamp is never asked for.
        a_lo = (limits.lower[self.action_index] - self.offset) / self.scale
        a_hi = (limits.upper[self.action_index] - self.offset) / self.scale
        self.lo = np.maximum(lo, np.minimum(a_lo, a_hi))
        self.hi = np.minimum(hi, np.maximum(a_lo, a_hi))
        self.gripper_index = self._grippers(world, limits)

    @staticmethod
    def _chain(model: "mujoco.MjModel", body: int) -> list[int]:
        """Hinge and slide joints from the world down to ``body`` (root first)."""
        joints: list[int] = []
        while body > 0:
            for j in range(model.body_jntadr[body], model.body_jntadr[body] + model.body_jntnum[body]):
                if model.jnt_type[j] in (mujoco.mjtJoint.mjJNT_HINGE, mujoco.mjtJoint.mjJNT_SLIDE):
                    joints.append(j)
            body = model.body_parentid[body]
        return joints[::-1]

    def _map_to_actions(self, world: "SimWorld") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which action each chain joint is, and how its units map (action = scale * qpos + offset),
        found by moving each joint a little: the world's mapping, whatever it is, without copying it."""
        q0 = np.array(world.data.qpos)
        world.load_state(q0)
        a0 = np.asarray(world.arm_position(), dtype=float)
        index, scale, offset = [], [], []
        for j, adr in zip(self.joints, self.qadr):
            q = q0.copy()
            q[adr] += 1e-3
            world.load_state(q)
            diff = (np.asarray(world.arm_position(), dtype=float) - a0) / 1e-3
            moved = np.flatnonzero(np.abs(diff) > 1e-6)
            if moved.size != 1:
                raise PolicyError(f"sim_expert: joint {self.model.joint(j).name} of site {self.site}'s chain maps "
                                  f"to {moved.size} actions; expected one")
            k = int(moved[0])
            index.append(k)
            scale.append(diff[k])
            offset.append(a0[k] - diff[k] * q0[adr])
        world.load_state(q0)
        return np.array(index), np.array(scale), np.array(offset)

    def _grippers(self, world: "SimWorld", limits: ExpertLimits) -> np.ndarray:
        """The gripper actions of this arm: those that move with a joint below the site's body."""
        model = self.model
        body = int(model.site_bodyid[self.site_id])
        below = [b for b in range(model.nbody) if self._descends(model, b, body)]
        q0 = np.array(world.data.qpos)
        a0 = np.asarray(world.arm_position(), dtype=float)
        found: set[int] = set()
        for b in below:
            for j in range(model.body_jntadr[b], model.body_jntadr[b] + model.body_jntnum[b]):
                q = q0.copy()
                q[model.jnt_qposadr[j]] += 1e-3
                world.load_state(q)
                diff = np.asarray(world.arm_position(), dtype=float) - a0
                found.update(int(k) for k in np.flatnonzero((np.abs(diff) > 1e-9) & limits.gripper))
        world.load_state(q0)
        if not found and int(limits.gripper.sum()) == 1:
            found = {int(np.flatnonzero(limits.gripper)[0])}
        return np.array(sorted(found), dtype=int)

    @staticmethod
    def _descends(model: "mujoco.MjModel", body: int, ancestor: int) -> bool:
        while body > 0:
            if body == ancestor:
                return True
            body = model.body_parentid[body]
        return False

    def solve(self, seed_qpos: np.ndarray, target: np.ndarray,
              approach: tuple[float, float, float] | None) -> tuple[np.ndarray, float]:
        """Chain joint values (qpos units) that bring the site to ``target``, and the error left (m)."""
        data = self.world.data
        data.qpos[:] = seed_qpos
        if approach is not None:
            self._iterate(target, np.asarray(approach, dtype=float), iterations=60, damping=0.05)
        error = self._iterate(target, None, iterations=80, damping=0.02)
        return np.array(data.qpos[self.qadr]), error

    def _iterate(self, target: np.ndarray, approach: np.ndarray | None, iterations: int, damping: float) -> float:
        model, data = self.model, self.world.data
        jp, jr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
        for _ in range(iterations):
            mujoco.mj_kinematics(model, data)
            mujoco.mj_comPos(model, data)
            e = target - data.site_xpos[self.site_id]
            mujoco.mj_jacSite(model, data, jp, jr, self.site_id)
            jac, err = jp[:, self.dadr], e
            if approach is not None:
                axis = data.site_xmat[self.site_id].reshape(3, 3)[:, 0]
                # The rotation turning the approach axis onto the wanted direction, weighted low:
                # the position matters more than the tilt.
                jac = np.vstack([jac, APPROACH_WEIGHT * jr[:, self.dadr]])
                err = np.concatenate([e, APPROACH_WEIGHT * np.cross(axis, approach)])
            elif np.linalg.norm(e) < 2e-4:
                break
            step = jac.T @ np.linalg.solve(jac @ jac.T + damping**2 * np.eye(jac.shape[0]), err)
            step = np.clip(step, -0.2, 0.2)  # small steps: the linearization holds
            q = np.clip(data.qpos[self.qadr] + step, self.lo, self.hi)
            if np.max(np.abs(q - data.qpos[self.qadr])) < 1e-7:
                break
            data.qpos[self.qadr] = q
        mujoco.mj_kinematics(model, data)
        return float(np.linalg.norm(target - data.site_xpos[self.site_id]))

    def to_actions(self, chain_qpos: np.ndarray) -> np.ndarray:
        return self.scale * chain_qpos + self.offset

    def to_qpos(self, actions: np.ndarray) -> np.ndarray:
        """The chain's qpos values for a full action vector."""
        return (actions[self.action_index] - self.offset) / self.scale


# --------------------------------------------------------------------------- trajectories


def profile(p0: np.ndarray, v0: np.ndarray, goal: np.ndarray, steps: int, dt: float, vmax: np.ndarray,
            amax: np.ndarray, sync: np.ndarray) -> np.ndarray:
    """``steps`` positions at dt from (p0, v0) toward ``goal``, then holding there.

    Each joint follows a braking curve (speed <= sqrt(2 a d), in the discrete form the driver's
    filter uses, so it stops at the goal without overshoot) capped at ``vmax``, changing its speed by
    at most ``amax * dt`` per step. The joints in ``sync`` have their caps scaled to their share of
    the move, so they arrive together: a straight line in joint space.
    """
    p, v = p0.astype(float).copy(), v0.astype(float).copy()
    out = np.empty((steps, p.shape[0]))
    dv = amax * dt
    for i in range(steps):
        e = goal - p
        cap = vmax.copy()
        if sync.any():
            times = np.abs(e[sync]) / vmax[sync]
            longest = float(times.max())
            if longest > 1e-9:
                cap[sync] = np.maximum(np.abs(e[sync]) / longest, 0.05 * vmax[sync])
        brake = -dv + np.sqrt(dv * dv + 2.0 * amax * np.abs(e))
        wanted = np.sign(e) * np.minimum(cap, brake)
        v = v + np.clip(wanted - v, -dv, dv)
        step = v * dt
        # Never step past the goal: arriving there, stop (the braking curve has already slowed it to ~a*dt).
        past = (np.abs(step) >= np.abs(e)) & (np.sign(step) == np.sign(e)) & (np.abs(v) <= 2 * dv + 1e-12)
        p = np.where(past, goal, p + step)
        v = np.where(past, 0.0, v)
        done = (np.abs(goal - p) < SNAP) & (np.abs(v) <= dv)
        p, v = np.where(done, goal, p), np.where(done, 0.0, v)
        out[i] = p
    return out


# --------------------------------------------------------------------------- the policy


class SimExpert(Policy):
    """Scripted expert: the current waypoint of the task's plan, by IK, in capped joint-space chunks."""

    def __init__(self, world: "SimWorld", sim: SimState, limits: ExpertLimits, chunk_size: int, dt: float,
                 fixed_joints: tuple[str, ...] = ("wrist_roll",)):
        self.world, self.sim, self.limits = world, sim, limits
        self.chunk_size, self.dt = chunk_size, dt
        # Joints IK never moves (they hold where the episode found them), by name; names the
        # scene does not have are ignored. SO-101's wrist roll: each object is turned to face the
        # arm's base, so the jaws meet two faces with the roll at home; rolling (the IK has one
        # joint more than a position and a pointing direction need) turns them onto its edges.
        self.fixed = frozenset(i for i, n in enumerate(world.joint_names) if n in fixed_joints)
        self._ik: dict[str, ArmIK] = {}
        self._waypoint = 0  # the first waypoint not yet reached
        # The last chunk: (mono_ns of its first action, [its start, *its actions]).
        self._last: tuple[int, np.ndarray] | None = None
        self._hold: np.ndarray | None = None  # where the joints that do not move stay
        self.last_goal: np.ndarray | None = None  # the last chunk's goal
        # Aiming correction for the current waypoint (see _correct).
        self._corrected_waypoint, self._correction, self._settled = 0, np.zeros(3), 0
        self._resumed = False  # resume() was called since the last chunk

    # ------------------------------------------------------------------ Policy

    def reset(self, space: ActionSpace) -> None:
        if list(space.names) != list(self.world.joint_names):
            raise PolicyError(f"sim_expert: the cell's joints {list(space.names)} are not the scene's "
                              f"{list(self.world.joint_names)}")
        self._clear()

    def resume(self, obs: "Observation") -> None:
        """After a pause: when the last chunk is still playing (inputs were stale for a moment, the
        arm never stopped), go on from it as if nothing happened; when it has ended (the arm held,
        or an operator moved it), start the plan again from the measured pose (in ``_start``)."""
        self._resumed = True

    def _clear(self) -> None:
        self._waypoint, self._last, self._hold, self.last_goal = 0, None, None, None
        self._corrected_waypoint, self._correction, self._settled = 0, np.zeros(3), 0
        self._resumed = False

    def route(self, obs: "Observation", instruction: str, pinned_task: str | None = None) -> RouteResult:
        task = str(self._sim_state()["task"])
        if pinned_task is not None and pinned_task != task:
            raise PolicyError(f"sim_expert: pinned to task {pinned_task!r} but the sim runs {task!r}")
        return RouteResult(task=task, scores={task: 1.0}, probabilities={task: 1.0})

    def infer(self, obs: "Observation") -> Chunk:
        state = self._sim_state()
        self._load(state)
        plan = self.world.plan()
        if not plan:
            raise PolicyError(f"sim_expert: task {self.world.task} has an empty plan")
        p0, v0 = self._start(obs)
        if self._hold is None:
            self._hold = p0.copy()
        waypoint = self._current(plan, p0, v0)
        self._correct(waypoint, p0, v0)
        goal = self._goal(waypoint, p0, np.asarray(state["qpos"], dtype=float))
        self.last_goal = goal
        ik = self._ik[waypoint.site]
        sync = np.zeros(goal.shape[0], dtype=bool)
        sync[ik.action_index] = True
        actions = profile(p0, v0, goal, self.chunk_size, self.dt, self.limits.max_velocity,
                          self.limits.chunk_acceleration(self.dt), sync)
        self._last = (obs.mono_ns + int(round(self.dt * 1e9)), np.vstack([p0[None], actions]))
        return Chunk(actions, self.dt)

    # ------------------------------------------------------------------ steps

    def _sim_state(self) -> dict[str, Any]:
        try:
            state = self.sim.state()
        except (TimeoutError, OSError, RuntimeError) as exc:
            raise PolicyError(f"sim_expert: the sim's control socket did not answer: {exc}") from None
        if not state.get("ok", True):
            raise PolicyError(f"sim_expert: the sim refused the state request: {state.get('error')}")
        return state

    def _load(self, state: dict[str, Any]) -> None:
        """The sim's scene in our copy: its task (objects placed by reset, then overwritten) and its qpos."""
        task, seed = str(state["task"]), int(state.get("seed", 0))
        if self.world.task != task:
            self.world.reset(task, seed)
        qpos = np.asarray(state["qpos"], dtype=float)
        if qpos.shape != (self.world.model.nq,):
            raise PolicyError(f"sim_expert: the sim's qpos has {qpos.shape} values, the scene {self.world.model.nq}: "
                              "does the sim run another scene than the expert's `scene`?")
        self.world.load_state(qpos)

    def _start(self, obs: "Observation") -> tuple[np.ndarray, np.ndarray]:
        """Where (and how fast) the new chunk starts: the last chunk at the observation's instant
        when the arm follows it, else the measured pose at rest."""
        measured = np.asarray(obs.state, dtype=float)
        rest = np.zeros_like(measured)
        resumed, self._resumed = self._resumed, False
        if self._last is None:
            return measured, rest
        t0_ns, points = self._last  # points[i] is commanded for t0_ns + (i - 1) * dt: [start, *actions]
        k = (obs.mono_ns - t0_ns) / (self.dt * 1e9) + 1.0  # fractional index of "now" in points
        if resumed and not 0 <= k < len(points) - 1:  # the last chunk is over: the plan starts again
            self._clear()
            return measured, rest
        if k < 0:
            return measured, rest  # an observation from before the last chunk: start afresh
        if k >= len(points) - 1:
            p, v = points[-1].copy(), rest  # the last chunk has ended, holding still
        else:
            i = int(np.floor(k))
            p = points[i] + (k - i) * (points[i + 1] - points[i])
            v = (points[i + 1] - points[i]) / self.dt
        arm = ~self.limits.gripper
        away = float(np.max(np.abs(p[arm] - measured[arm]), initial=0.0))
        if away > CONTINUE_TOLERANCE:
            log.info("sim_expert: the arm is %.3f from where the last chunk put it; starting from the measured pose",
                     away)
            return measured, rest
        return p, v

    def _current(self, plan: list["Waypoint"], p0: np.ndarray, v0: np.ndarray) -> "Waypoint":
        """The first waypoint not reached yet: reached when the commanded arm has come to rest on
        its goal, the site is within tolerance (an arm passing through the tolerance on its way
        may settle back out of it) and the gripper command is done."""
        while self._waypoint < len(plan) - 1:
            wp = plan[self._waypoint]
            ik = self._arm(wp.site)
            if not self._at_rest_on_goal(ik, p0, v0):
                break
            reached = np.linalg.norm(self.world.site_position(wp.site) - wp.position) <= wp.tolerance_m
            lo, hi = self.limits.lower, self.limits.upper  # a gripper value is commanded clipped to these
            gripper_done = all(abs(p0[g] - np.clip(wp.gripper, lo[g], hi[g])) <= GRIPPER_DONE * (hi[g] - lo[g]) + 1e-9
                               for g in ik.gripper_index)
            if not (reached and gripper_done):
                break
            self._waypoint += 1
        return plan[min(self._waypoint, len(plan) - 1)]

    def _at_rest_on_goal(self, ik: ArmIK, p0: np.ndarray, v0: np.ndarray) -> bool:
        goal = self.last_goal
        if goal is None or goal.shape != p0.shape:
            return False
        arm = ik.action_index
        return bool(np.max(np.abs(p0[arm] - goal[arm])) <= 1e-4 and np.max(np.abs(v0[arm])) <= 1e-4)

    def _correct(self, wp: "Waypoint", p0: np.ndarray, v0: np.ndarray) -> None:
        """Aim past the waypoint by what the arm still misses once it has settled on the goal:
        a position servo under gravity sags a little below its command, and a waypoint's tolerance
        can be tighter than the sag (integral action, at most MAX_CORRECTION_M)."""
        if self._waypoint != self._corrected_waypoint:
            self._corrected_waypoint, self._correction, self._settled = self._waypoint, np.zeros(3), 0
        if not self._at_rest_on_goal(self._arm(wp.site), p0, v0):
            self._settled = 0
            return
        self._settled += 1
        miss = np.asarray(wp.position, dtype=float) - self.world.site_position(wp.site)
        if self._settled >= 2 and np.linalg.norm(miss) > 0.5 * wp.tolerance_m:  # commanded still since the last call
            self._correction = self._correction + miss
            norm = float(np.linalg.norm(self._correction))
            if norm > MAX_CORRECTION_M:
                self._correction *= MAX_CORRECTION_M / norm
            self._settled = 0

    def _arm(self, site: str) -> ArmIK:
        if site not in self._ik:
            self._ik[site] = ArmIK(self.world, site, self.limits, self.fixed)
        return self._ik[site]

    def _goal(self, wp: "Waypoint", p0: np.ndarray, qpos: np.ndarray) -> np.ndarray:
        """Joint targets (action layout): the arm's IK solution, its gripper at the waypoint's value,
        every other joint holding."""
        ik = self._arm(wp.site)
        target = np.asarray(wp.position, dtype=float) + self._correction
        seed = qpos.copy()
        if self.last_goal is not None:  # from the last goal, not the lagging measured pose: goals stay consistent
            seed[ik.qadr] = ik.to_qpos(self.last_goal)
        chain, error = ik.solve(seed, target, getattr(wp, "approach", None))
        self.world.load_state(qpos)  # our copy shows the sim's state again
        if error > wp.tolerance_m:
            log.debug("sim_expert: waypoint %s is %.3f m out of reach", wp.position, error)
        assert self._hold is not None
        goal = self._hold.copy()
        goal[ik.action_index] = ik.to_actions(chain)
        goal[ik.gripper_index] = wp.gripper
        return np.clip(goal, self.limits.lower, self.limits.upper)
