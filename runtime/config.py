"""Embodiment and cell configuration: YAML in, validated models out.

Every error names the file, the key path and the reason, so an operator can fix a typo in a
cell file without reading a traceback.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError,
                      field_validator, model_validator)

from armada.runtime.endpoints import check_endpoint
from armada.runtime.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CELL = CONFIG_DIR / "cells" / "default.yaml"  # the tiny merged VLA on a simulated arm
SCRIPTED_CELL = CONFIG_DIR / "cells" / "scripted.yaml"  # deterministic motion, for timing and HIL


class _Strict(BaseModel):
    # No NaN or infinity anywhere: an infinite velocity limit would silently disable the filter.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The base of every config model, the device plugins' ``backend:`` models included.
StrictModel = _Strict


# --------------------------------------------------------------------------- embodiment

GroupMode = Literal["joint_position", "gripper_position", "lift_height", "base_velocity"]


class JointLimits(_Strict):
    name: str
    min: float
    max: float
    max_velocity: float = Field(gt=0)
    max_acceleration: float = Field(gt=0)
    # Base-velocity groups only (required there): the most the acceleration may change per second.
    max_jerk: float | None = Field(default=None, gt=0)
    home: float = 0.0

    @model_validator(mode="after")
    def _ordered(self) -> "JointLimits":
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise ValueError(f"joint {self.name}: min ({self.min}) must be finite and below max ({self.max})")
        if not self.min <= self.home <= self.max:
            raise ValueError(f"joint {self.name}: home {self.home} is outside [{self.min}, {self.max}]")
        return self


class GroupConfig(_Strict):
    name: str
    mode: GroupMode = "joint_position"
    joints: list[JointLimits] = Field(min_length=1)
    # Following-error bound for this group's joints (their units), overriding the embodiment's.
    # None: the embodiment's bound for arm joints; unchecked for grippers, which stall on an object.
    max_following_error: float | None = Field(default=None, gt=0)
    # Base-velocity groups: a velocity target is followed for at most this long after the command
    # that carried it stopped covering now (a chunk ran out, a gamepad went quiet); then it ramps to 0.
    command_timeout_s: float = Field(default=0.25, gt=0, le=2)

    @model_validator(mode="after")
    def _mode_needs(self) -> "GroupConfig":
        if self.mode == "base_velocity":
            for j in self.joints:
                if j.max_jerk is None:
                    raise ValueError(f"group {self.name}: base_velocity joint {j.name} needs max_jerk")
                if not j.min < 0.0 < j.max or j.home != 0.0:
                    raise ValueError(f"group {self.name}: base_velocity joint {j.name} bounds a velocity: "
                                     f"min < 0 < max and home 0 (at rest) are required")
        return self


class WorkspaceBoxConfig(_Strict):
    """An axis-aligned box in the robot frame (m) that an arm's check points must stay inside."""

    min: tuple[float, float, float]
    max: tuple[float, float, float]

    @model_validator(mode="after")
    def _ordered(self) -> "WorkspaceBoxConfig":
        if not all(lo < hi for lo, hi in zip(self.min, self.max)):
            raise ValueError(f"workspace box: min {self.min} must be below max {self.max} on every axis")
        return self


class KinematicJointConfig(_Strict):
    """One joint of a chain, as in a URDF: the joint frame's placement in its parent's frame
    (``xyz`` in m, ``rpy`` in rad, fixed-axis roll-pitch-yaw), then the axis it turns or slides on."""

    joint: str  # a joint of the embodiment (its position is read from the action layout)
    type: Literal["revolute", "prismatic"] = "revolute"
    xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rpy: tuple[float, float, float] = (0.0, 0.0, 0.0)
    axis: tuple[float, float, float] = (0.0, 0.0, 1.0)


class ArmKinematicsConfig(_Strict):
    name: str
    source: str  # where the numbers come from (URDF file and version, DH table, datasheet)
    base_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the chain's base in the robot frame
    base_rpy: tuple[float, float, float] = (0.0, 0.0, 0.0)
    chain: list[KinematicJointConfig] = Field(min_length=1)
    tool_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the tool point in the last joint's frame
    workspace: WorkspaceBoxConfig | None = None


class KinematicsConfig(_Strict):
    """Forward kinematics of each arm, for the workspace and separation limits of the filter."""

    arms: list[ArmKinematicsConfig] = Field(min_length=1)
    # Two arms' check points never closer than this (m); None: not checked. Needs two arms or more.
    min_separation: float | None = Field(default=None, gt=0)


class FollowingErrorConfig(_Strict):
    """A device that stops obeying is a fault: |measured - commanded| above the bound for too long."""

    max_error: float = Field(default=0.15, gt=0)  # joint units (rad for revolute joints)
    max_time_s: float = Field(default=0.25, gt=0, le=5)
    # How far behind its commands the device normally runs (s): the bound grows by this times the
    # commanded speed, so a fast move on an arm that interpolates (servoJ's lookahead, a servo's
    # profile) is not a fault, while an arm that stops obeying still is.
    lag_s: float = Field(default=0.05, ge=0, le=2)


class EmbodimentConfig(_Strict):
    name: str
    # At least 1 Hz: a loop ticking slower cannot react to anything (a lapsed lease, an e-stop) in time.
    control_rate_hz: float = Field(ge=1, le=2000)
    groups: list[GroupConfig] = Field(min_length=1)
    # The filter keeps targets this far inside each joint's range.
    position_margin: float = Field(default=0.01, ge=0)
    # A trajectory or servo target further than this from where the arm is now is refused:
    # the operator must use move_to, which ramps. (GELLO refuses above 1 rad.)
    max_engage_distance: float = Field(default=0.2, gt=0)
    # move_to uses this fraction of each joint's velocity limit unless told otherwise.
    move_to_velocity_fraction: float = Field(default=0.25, gt=0, le=1)
    state_decimation: int = Field(default=1, ge=1)
    following_error: FollowingErrorConfig = FollowingErrorConfig()
    # Forward kinematics for the workspace box and the separation of two arms; None: not checked.
    kinematics: KinematicsConfig | None = None

    @field_validator("groups")
    @classmethod
    def _unique_names(cls, groups: list[GroupConfig]) -> list[GroupConfig]:
        # Joints and groups are separate namespaces: a "gripper" group holding a "gripper" joint is fine.
        for what, names in (("joint", [j.name for g in groups for j in g.joints]), ("group", [g.name for g in groups])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {what} names: {dupes}")
        return groups

    @model_validator(mode="after")
    def _kinematics_match(self) -> "EmbodimentConfig":
        if self.kinematics is None:
            return self
        known = set(self.joint_names)
        for arm in self.kinematics.arms:
            unknown = [j.joint for j in arm.chain if j.joint not in known]
            if unknown:
                raise ValueError(f"kinematics arm {arm.name}: joints {unknown} are not joints of the embodiment")
        if self.kinematics.min_separation is not None and len(self.kinematics.arms) < 2:
            raise ValueError("kinematics: min_separation needs two arms or more")
        return self

    # Flat views in action-layout order: the action vector is the groups' joints concatenated.
    @property
    def joint_names(self) -> list[str]:
        return [j.name for g in self.groups for j in g.joints]

    @property
    def dof(self) -> int:
        return sum(len(g.joints) for g in self.groups)

    def _column(self, attr: str) -> np.ndarray:
        return np.array([getattr(j, attr) for g in self.groups for j in g.joints], dtype=np.float64)

    @property
    def lower(self) -> np.ndarray:
        return self._column("min")

    @property
    def upper(self) -> np.ndarray:
        return self._column("max")

    @property
    def max_velocity(self) -> np.ndarray:
        return self._column("max_velocity")

    @property
    def max_acceleration(self) -> np.ndarray:
        return self._column("max_acceleration")

    @property
    def home(self) -> np.ndarray:
        return self._column("home")

    def group_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for g in self.groups:
            out[g.name] = slice(start, start + len(g.joints))
            start += len(g.joints)
        return out

    def gripper_mask(self) -> np.ndarray:
        return np.array([g.mode == "gripper_position" for g in self.groups for _ in g.joints])

    def describe(self) -> dict[str, Any]:
        """What the driver announces in its hello reply."""
        return {
            "embodiment": self.name,
            "control_rate_hz": self.control_rate_hz,
            "joint_names": self.joint_names,
            "groups": [{"name": g.name, "mode": g.mode, "joints": [j.name for j in g.joints]}
                       for g in self.groups],
            "action_dim": self.dof,
            "lower": self.lower, "upper": self.upper,
            "max_velocity": self.max_velocity, "max_acceleration": self.max_acceleration,
            "max_engage_distance": self.max_engage_distance,
        }


# --------------------------------------------------------------------------- cell


class CurveConfig(_Strict):
    """CURVE keys for TCP between hosts; files as written by zmq.auth.create_certificates."""

    server_public_key: Path
    # The server public key per endpoint host (the host as written in tcp:// endpoints), for a cell
    # whose hosts each have their own key pair (`armada keys`); a host not listed uses server_public_key.
    server_keys: dict[str, Path] = {}
    server_secret_key: Path | None = None  # only on the binding side
    client_secret_key: Path | None = None  # only on connecting sides
    # A folder of the public keys allowed to connect (``*.key`` files). Encryption alone would let
    # any host that knows the server's public key (it is public) take a driver's lease.
    authorized_clients: Path


class DriverConfig(_Strict):
    name: str
    embodiment: str  # a name under configs/embodiments/ or a path to a YAML file
    # The device: ``kind`` names a registered backend plugin (drivers/core/registry.py), whose
    # ``config_model`` validates the rest of the map. Required: a cell names the device it moves.
    backend: SerializeAsAny[BaseModel]
    state: str  # PUB endpoint the driver binds
    cmd: str  # ROUTER endpoint the driver binds
    lease_ttl_s: float = Field(default=0.3, ge=0.01, le=10)
    control_rate_hz: float | None = Field(default=None, ge=1, le=2000)  # overrides the embodiment
    # SCHED_FIFO priority for the control loop thread (1-99); None keeps the normal scheduler.
    realtime_priority: int | None = Field(default=None, ge=1, le=99)
    # Microseconds before each tick that the loop stops sleeping and yields the CPU in a loop until
    # the deadline: a sleeping thread wakes 0.1-0.3 ms late on a VM even under SCHED_FIFO. Costs
    # that much of a core per tick (300 us at 500 Hz: 15 %); 0 sleeps all the way (the default).
    loop_spin_us: float = Field(default=0.0, ge=0, le=2000)
    # CPUs this driver's process runs on; the cell's other processes are kept off them (runtime/cpus.py).
    cpus: list[int] | None = Field(default=None, min_length=1, max_length=64)
    # A joint calibration from `armada calibrate joints` (relative to the cell file), checked when
    # the cell loads; a backend that applies joint calibrations takes only its own kind.
    joint_calibration: str | None = None

    @field_validator("cpus")
    @classmethod
    def _cpus_are_cpu_numbers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (any(c < 0 for c in value) or len(set(value)) != len(value)):
            raise ValueError(f"cpus must be distinct CPU numbers (0, 1, ...), got {value}")
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_of_kind(cls, value: Any) -> Any:
        # load_cell validates the map first, naming file and key; this covers models built in code.
        if isinstance(value, BaseModel):
            plugin = _backend_plugin(getattr(value, "kind", None))
            if not isinstance(value, plugin.config_model):
                raise ValueError(f"a {type(value).__name__} is not a {plugin.kind} backend config "
                                 f"({plugin.config_model.__name__})")
            return value
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping with a kind, got {type(value).__name__}")
        plugin = _backend_plugin(value.get("kind"))
        try:
            return plugin.config_model.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def _backend_plugin(kind: Any) -> Any:
    from armada.drivers.core.registry import BACKENDS, RegistryError  # late: plugins import this module

    if not isinstance(kind, str):
        raise ValueError(f"needs a kind, one of {BACKENDS.kinds()}")
    try:
        return BACKENDS.get(kind)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None


class CameraBaseConfig(_Strict):
    """The fields every camera process needs; a camera plugin's ``config_model`` extends it with
    its ``kind`` and device settings (drivers/cameras/registry.py)."""


    name: str
    width: int = Field(default=640, gt=0, le=4096)
    height: int = Field(default=480, gt=0, le=4096)
    fps: float = Field(default=30.0, ge=1, le=240)
    frames: str  # PUB endpoint
    # Where the camera process answers clock pings (a ROUTER endpoint on its host, tcp): a camera on a
    # host with no driver gets its host's clock offset measured from it (runtime/remote/clock.py).
    # None: no clock pings (ipc cameras, or a camera beside a driver, whose host offset is measured anyway).
    clock: str | None = None
    # JPEG on the wire (remote inference over TCP), quality 1-100; None sends raw pixels zero-copy.
    jpeg_quality: int | None = Field(default=None, ge=1, le=100)
    # No frame for this long is a stall: publish nothing, log, reopen. None: 3 frame intervals, at
    # least 0.5 s (reopening costs far more than a scheduling hiccup; inference pauses on its own
    # as soon as a frame is older than max_frame_age_s).
    frame_timeout_s: float | None = Field(default=None, gt=0, le=60)
    # After (re)opening, the first frame may take longer (USB enumeration, auto-exposure settling).
    first_frame_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # Waits before reopening a stalled camera: the first, doubled on each failure up to the max.
    reopen_backoff_s: float = Field(default=0.5, gt=0, le=60)
    reopen_backoff_max_s: float = Field(default=5.0, gt=0, le=300)
    # Results of `armada calibrate` (files relative to the cell file), checked when the cell loads:
    # intrinsics must match width x height; hand_eye places the camera on the arm or in the cell.
    intrinsics: str | None = None
    hand_eye: str | None = None
    latency: str | None = None

    def frame_timeout(self) -> float:
        return self.frame_timeout_s if self.frame_timeout_s is not None else max(3.0 / self.fps, 0.5)


def _camera_kind(value: Any) -> Any:
    """Cameras without ``kind`` are synthetic, as before kinds existed."""
    from armada.drivers.cameras.registry import DEFAULT_KIND  # late: a light module, but keep config first

    return value.get("kind", DEFAULT_KIND) if isinstance(value, dict) else getattr(value, "kind", None)


def _camera_of_kind(value: Any) -> Any:
    """A camera map (or model built in code) validated by its kind's plugin; load_cell validates
    the maps first so that errors name file and key, this covers configs built in code."""
    from armada.drivers.cameras.registry import CAMERAS  # late: plugins import this module

    return _plugin_config(CAMERAS, _camera_kind(value), value, "camera")


def _policy_of_kind(value: Any) -> Any:
    from armada.runtime.inference.registry import POLICIES  # late: plugins import this module

    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return _plugin_config(POLICIES, kind, value, "policy")


def _plugin_config(registry: Any, kind: Any, value: Any, what: str) -> BaseModel:
    from armada.drivers.core.registry import RegistryError

    if not isinstance(kind, str):
        raise ValueError(f"needs a kind, one of {registry.kinds()}")
    try:
        plugin = registry.get(kind)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    if isinstance(value, BaseModel):
        if not isinstance(value, plugin.config_model):
            raise ValueError(f"a {type(value).__name__} is not a {kind} {what} config ({plugin.config_model.__name__})")
        return value
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping with a kind, got {type(value).__name__}")
    try:
        return plugin.config_model.model_validate({**value, "kind": kind})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


# A camera: ``kind`` names a registered camera plugin (drivers/cameras/registry.py) whose
# ``config_model`` (a CameraBaseConfig) validates the map; no ``kind`` is the default kind.
CameraConfig = Annotated[SerializeAsAny[CameraBaseConfig], BeforeValidator(_camera_of_kind)]
# A policy: ``kind`` names a registered policy plugin (runtime/inference/registry.py).
PolicyConfig = Annotated[SerializeAsAny[BaseModel], BeforeValidator(_policy_of_kind)]
DEFAULT_POLICY_KIND = "scripted"  # a cell without ``inference.policy``: deterministic motion, no model


def _default_policy() -> BaseModel:
    return _policy_of_kind({"kind": DEFAULT_POLICY_KIND})


class ChunkingConfig(_Strict):
    size: int = Field(default=50, gt=0, le=1000)
    dt: float = Field(default=0.02, ge=0.0005, le=1)  # at most one point per tick of a 2 kHz loop
    mode: Literal["sync", "async"] = "async"
    execute: int | None = Field(default=None, gt=0)  # sync: steps executed before inferring again
    merge: Literal["replace", "crossfade", "average"] = "replace"
    # Chunks are stamped this far ahead of "now" so the first points are not already late.
    lead_s: float = Field(default=0.01, ge=0)


class InferenceConfig(_Strict):
    ctl: str
    events: str
    policy: PolicyConfig = Field(default_factory=_default_policy)
    chunking: ChunkingConfig = ChunkingConfig()
    max_frame_age_s: float = Field(default=0.25, gt=0)
    max_state_age_s: float = Field(default=0.1, gt=0)
    episode_duration_s: float = Field(default=10.0, gt=0)
    # At most half of every driver's lease_ttl_s (checked when the cell loads), so one late
    # heartbeat does not lapse the lease.
    heartbeat_s: float = Field(default=0.05, ge=0.001, le=5)
    # Deadlines of policy calls (None: derived from the chunking; the first call of a model may
    # warm it up, so it gets longer). Past one, the episode fails and the lease is released.
    policy_timeout_s: float | None = Field(default=None, gt=0, le=600)
    first_policy_timeout_s: float | None = Field(default=None, gt=0, le=600)
    # No state from a driver for this long mid-episode: it died or hung; the episode fails.
    driver_silence_s: float = Field(default=1.0, gt=0, le=60)


class CellConfig(_Strict):
    name: str
    drivers: list[DriverConfig] = Field(min_length=1)
    cameras: list[CameraConfig] = []
    inference: InferenceConfig
    curve: CurveConfig | None = None
    # Allow tcp:// on loopback without CURVE. Every local user can reach such a socket (take the
    # lease, arm, move): only for tests and benchmarks on a single-user machine.
    plain_tcp_loopback: bool = False
    # The cell file this was loaded from (set by load_cell; None for a cell built in code): files a
    # cell names (embodiments, calibrations, recordings) resolve against its folder.
    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def folder(self) -> Path:
        return self._path.parent if self._path is not None else DEFAULT_CELL.parent

    def driver(self, name: str | None) -> DriverConfig:
        return _pick(self.drivers, name, "driver", self._path)

    def camera(self, name: str | None) -> CameraConfig:
        return _pick(self.cameras, name, "camera", self._path)

    def embodiment(self, drv: DriverConfig) -> EmbodimentConfig:
        """A driver's embodiment (relative to the cell's folder), with the cell's rate override."""
        return driver_embodiment(self._path, drv)

    def resolve(self, name: str) -> Path:
        """A file the cell names (a calibration, a recording), relative to its folder unless absolute."""
        return resolve_cell_file(self._path, name)


def named(pick: "Callable[[str | None], Any]", name: str | None, cell_path: str | Path | None) -> Any:
    """``cell.driver(name)`` or ``cell.camera(name)``, with the cell's file in the error."""
    try:
        return pick(name)
    except ConfigError as exc:
        raise ConfigError(cell_path or DEFAULT_CELL, exc.key, exc.reason) from None


def _pick(items: list[Any], name: str | None, what: str, path: Path | None) -> Any:
    where = path if path is not None else "<cell>"
    if name is None:
        if len(items) != 1:
            raise ConfigError(where, f"{what}s", f"the cell has {len(items)} {what}s; name one of "
                              f"{[i.name for i in items]}")
        return items[0]
    for item in items:
        if item.name == name:
            return item
    raise ConfigError(where, f"{what}s", f"no {what} named {name!r}; have {[i.name for i in items]}")


# --------------------------------------------------------------------------- loading


# Config files are small and shallow; these bounds refuse a hostile or broken file quickly
# instead of exhausting memory or the stack.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one, so a
    repeated ``max_velocity`` would quietly replace a limit), anchors and aliases (expanded, a few
    lines make gigabytes: "billion laughs"), and nesting deeper than MAX_CONFIG_DEPTH (the
    composer recurses per level). Both are refused while composing, before anything is expanded."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name, <<: *name) are not allowed in armada "
                "config files; write the values out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(path, "", f"larger than {MAX_CONFIG_BYTES} bytes; not a config file")
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(path, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _validate(model: type[BaseModel], data: Any, path: Path, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = (prefix + ".".join(str(p) for p in err["loc"])).rstrip(".")  # a model-wide check: the map's key
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise ConfigError(path, key, f"{err['msg']}{more}") from None


def load_embodiment(name_or_path: str | Path, relative_to: Path | None = None) -> EmbodimentConfig:
    path = resolve_embodiment_path(name_or_path, relative_to)
    return _validate(EmbodimentConfig, _read_yaml(path), path)


def resolve_embodiment_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_absolute() and relative_to is not None:
            candidate = relative_to / candidate
        return candidate
    return CONFIG_DIR / "embodiments" / f"{name_or_path}.yaml"


def load_cell(path: str | Path | None = None, run_dir: str | Path | None = None) -> CellConfig:
    """Load a cell. ``{run_dir}`` in endpoints is replaced by ``run_dir`` (ipc socket folder)."""
    path = Path(path) if path is not None else DEFAULT_CELL
    data = _read_yaml(path)
    if run_dir is not None:
        data = _substitute(data, "{run_dir}", str(run_dir))
    from armada.runtime.remote.hostkeys import HostKeysError, apply_host_keys  # late: a small module

    try:
        data = apply_host_keys(data, path, os.environ)  # this host's key set, for a cell split over hosts
    except HostKeysError as exc:
        raise ConfigError(path, "curve", str(exc)) from None
    data = _validate_backends(data, path)
    data = _validate_cameras_and_policy(data, path)
    cell = _validate(CellConfig, data, path)
    cell._path = path
    for i, drv in enumerate(cell.drivers):
        emb_path = resolve_embodiment_path(drv.embodiment, path.parent)
        if not emb_path.exists():
            raise ConfigError(path, f"drivers.{i}.embodiment", f"no embodiment file {emb_path}")
        _check_backend_embodiment(cell, i, path)

    for key, endpoint in _endpoints(cell):
        try:
            check_endpoint(endpoint, curve=cell.curve is not None, plain_tcp_loopback=cell.plain_tcp_loopback)
        except ValueError as exc:
            raise ConfigError(path, key, str(exc)) from None
    names = [d.name for d in cell.drivers] + [c.name for c in cell.cameras]
    if len(set(names)) != len(names):
        raise ConfigError(path, "drivers/cameras", f"names must be unique, got {names}")
    _check_heartbeat(cell, path)
    _check_calibrations(cell, path)
    return cell


def _validate_backends(data: Any, path: Path) -> Any:
    """Each driver's ``backend:`` map validated by its kind's plugin, so an error names the key
    (``drivers.0.backend.can: Field required``); the validated models replace the maps."""
    from armada.drivers.core.registry import BACKENDS, RegistryError  # late: plugins import this module

    if not isinstance(data, dict) or not isinstance(data.get("drivers"), list):
        return data  # the cell model reports what is wrong with the shape
    drivers = []
    for i, drv in enumerate(data["drivers"]):
        if isinstance(drv, dict):
            key = f"drivers.{i}.backend"
            raw = drv.get("backend")
            if raw is None:
                raise ConfigError(path, key, f"missing: name the device (kind: one of {BACKENDS.kinds()}); "
                                  "a driver has no default backend")
            if not isinstance(raw, dict):
                raise ConfigError(path, key, f"must be a mapping with a kind, got {type(raw).__name__}")
            kind = raw.get("kind")
            if not isinstance(kind, str):
                raise ConfigError(path, f"{key}.kind", f"missing: one of {BACKENDS.kinds()}")
            try:
                plugin = BACKENDS.get(kind)
            except RegistryError as exc:
                raise ConfigError(path, f"{key}.kind", str(exc)) from None
            drv = {**drv, "backend": _validate(plugin.config_model, raw, path, prefix=f"{key}.")}
        drivers.append(drv)
    return {**data, "drivers": drivers}


def _validate_cameras_and_policy(data: Any, path: Path) -> Any:
    """Each camera map and the policy map validated by its kind's plugin, like the backends, so an
    error names the key (``cameras.0.serial: ...``); an unknown kind lists the known ones."""
    from armada.drivers.cameras.registry import CAMERAS, DEFAULT_KIND
    from armada.runtime.inference.registry import POLICIES

    if not isinstance(data, dict):
        return data
    if isinstance(data.get("cameras"), list):
        cameras = []
        for i, raw in enumerate(data["cameras"]):
            if isinstance(raw, dict):
                raw = _validate_plugin_map(CAMERAS, {"kind": DEFAULT_KIND, **raw}, path, f"cameras.{i}")
            cameras.append(raw)
        data = {**data, "cameras": cameras}
    inference = data.get("inference")
    if isinstance(inference, dict) and "policy" in inference:
        raw = inference["policy"]
        if not isinstance(raw, dict):
            raise ConfigError(path, "inference.policy", f"must be a mapping with a kind, got {type(raw).__name__}")
        policy = _validate_plugin_map(POLICIES, raw, path, "inference.policy")
        data = {**data, "inference": {**inference, "policy": policy}}
    return data


def _validate_plugin_map(registry: Any, raw: dict, path: Path, key: str) -> BaseModel:
    from armada.drivers.core.registry import RegistryError

    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise ConfigError(path, f"{key}.kind", f"missing: one of {registry.kinds()}")
    try:
        plugin = registry.get(kind)
    except RegistryError as exc:
        raise ConfigError(path, f"{key}.kind", str(exc)) from None
    return _validate(plugin.config_model, raw, path, prefix=f"{key}.")


def _check_backend_embodiment(cell: CellConfig, i: int, path: Path) -> None:
    """The plugin's embodiment check, at load: a 7-dof device on a 6-dof embodiment fails here."""
    from armada.drivers.core.registry import BACKENDS

    drv = cell.drivers[i]
    plugin = BACKENDS.get(drv.backend.kind)
    if plugin.check_embodiment is None:
        return
    emb = driver_embodiment(path, drv)
    try:
        plugin.check_embodiment(drv.backend, emb)
    except ValueError as exc:
        raise ConfigError(path, f"drivers.{i}.backend", f"driver {drv.name!r}: {exc}") from None


def _check_heartbeat(cell: CellConfig, path: Path) -> None:
    """A lease lapses when no heartbeat comes for lease_ttl_s: heartbeats at half of it or faster let
    one come late (a busy host, a retransmit) without the arm stopping mid-episode for nothing."""
    heartbeat = cell.inference.heartbeat_s
    for i, drv in enumerate(cell.drivers):
        if heartbeat > drv.lease_ttl_s / 2:
            raise ConfigError(path, "inference.heartbeat_s",
                              f"{heartbeat} s must be at most half of drivers.{i}.lease_ttl_s ({drv.lease_ttl_s} s), "
                              f"so that one late heartbeat does not lapse driver {drv.name!r}'s lease")


def resolve_cell_file(cell_path: Path | None, name: str) -> Path:
    """A file named in a cell, relative to the cell file's folder unless absolute."""
    p = Path(name).expanduser()
    base = Path(cell_path).parent if cell_path is not None else DEFAULT_CELL.parent
    return p if p.is_absolute() else base / p


def _check_calibrations(cell: CellConfig, path: Path) -> None:
    """Load every calibration file a cell names, so a missing or wrong one fails here, not mid-run."""
    from armada.calibration import results  # late: only cells that name calibration files need it

    for i, cam in enumerate(cell.cameras):
        for key, load in (("intrinsics", lambda f: results.load_intrinsics(f, expect_size=(cam.width, cam.height))),
                          ("hand_eye", results.load_hand_eye), ("latency", results.load_latency)):
            name = getattr(cam, key)
            if name is not None:
                _load_calibration(load, resolve_cell_file(path, name), path, f"cameras.{i}.{key}")
    for i, drv in enumerate(cell.drivers):
        if drv.joint_calibration is not None:
            from armada.drivers.core.registry import BACKENDS

            # A backend that applies joint calibrations takes files of its own kind only.
            expect = BACKENDS.get(drv.backend.kind).joint_calibration_kind
            _load_calibration(lambda f: results.load_joint_calibration(f, expect_kind=expect),
                              resolve_cell_file(path, drv.joint_calibration), path, f"drivers.{i}.joint_calibration")


def _load_calibration(load: Callable[[Path], Any], file: Path, cell_path: Path, key: str) -> None:
    if not file.exists():
        raise ConfigError(cell_path, key, f"no calibration file {file}")
    try:
        load(file)
    except ConfigError as exc:
        raise ConfigError(cell_path, key, f"{file}: {exc}") from None


def _endpoints(cell: CellConfig) -> list[tuple[str, str]]:
    out = [(f"drivers.{i}.{k}", getattr(d, k)) for i, d in enumerate(cell.drivers) for k in ("state", "cmd")]
    out += [(f"cameras.{i}.frames", c.frames) for i, c in enumerate(cell.cameras)]
    out += [(f"cameras.{i}.clock", c.clock) for i, c in enumerate(cell.cameras) if c.clock is not None]
    out += [("inference.ctl", cell.inference.ctl), ("inference.events", cell.inference.events)]
    return out


def _substitute(data: Any, placeholder: str, value: str) -> Any:
    if isinstance(data, str):
        return data.replace(placeholder, value)
    if isinstance(data, list):
        return [_substitute(x, placeholder, value) for x in data]
    if isinstance(data, dict):
        return {k: _substitute(v, placeholder, value) for k, v in data.items()}
    return data


def driver_embodiment(cell_path: Path | None, drv: DriverConfig) -> EmbodimentConfig:
    """The embodiment of one driver, with the cell's rate override applied."""
    base = Path(cell_path).parent if cell_path else DEFAULT_CELL.parent
    emb = load_embodiment(drv.embodiment, base)
    if drv.control_rate_hz is not None:
        emb = emb.model_copy(update={"control_rate_hz": drv.control_rate_hz})
    return emb
