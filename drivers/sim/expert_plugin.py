"""The scripted sim expert as a policy plugin (kind ``sim_expert``, registered under ``armada.policies``).

Kept apart from drivers/sim/expert.py, which imports mujoco at the top: validating a cell loads
every policy plugin, and that must not import mujoco. ``build`` imports the expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from armada.runtime.config import StrictModel
from armada.runtime.inference.registry import PolicyPlugin

if TYPE_CHECKING:
    from armada.runtime.config import CellConfig
    from armada.runtime.inference.policy import Policy


class SimExpertConfig(StrictModel):
    kind: Literal["sim_expert"] = "sim_expert"
    # The sim driver's control socket (its backend's ``control``), e.g. ipc://{run_dir}/sim-robot.
    control: str
    scene: str = Field(min_length=1)  # the sim driver's scene (drivers/sim/world.py SCENES)
    # Fractions of each joint's max_velocity / max_acceleration (the embodiment's) the expert uses:
    # well under the limits, so the driver's filter never has to clamp a demonstration.
    max_joint_speed: float = Field(default=0.3, gt=0, le=0.9)
    max_joint_acceleration: float = Field(default=0.3, gt=0, le=0.9)
    timeout_s: float = Field(default=1.0, gt=0, le=30)  # per request to the sim's control socket

    @model_validator(mode="after")
    def _local_control(self) -> "SimExpertConfig":
        from armada.drivers.sim.world import SCENES  # imports no mujoco

        if self.scene not in SCENES:
            raise ValueError(f"scene {self.scene!r} is not a sim scene; known scenes: {', '.join(SCENES)}")
        if not self.control.startswith("ipc://"):
            raise ValueError(f"control {self.control!r}: the sim's control socket is local; use its ipc:// endpoint")
        return self


def _build(cell: "CellConfig") -> "Policy":
    from armada.drivers.sim.control import SimControl
    from armada.drivers.sim.expert import ExpertLimits, SimExpert  # imports mujoco
    from armada.drivers.sim.world import SimWorld

    p, c = cell.inference.policy, cell.inference.chunking
    limits = ExpertLimits.from_embodiments([cell.embodiment(d) for d in cell.drivers], p.max_joint_speed,
                                           p.max_joint_acceleration)
    world = SimWorld(p.scene)
    if len(world.joint_names) != limits.lower.shape[0]:
        raise ValueError(f"sim_expert: scene {p.scene} has {len(world.joint_names)} joints, the cell's drivers "
                         f"{limits.lower.shape[0]}")
    return SimExpert(world, SimControl(p.control, p.timeout_s), limits, c.size, c.dt)


# Registered under ``armada.policies`` in pyproject.toml.
PLUGIN = PolicyPlugin(kind="sim_expert", config_model=SimExpertConfig, build=_build)
