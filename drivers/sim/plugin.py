"""The simulated arm as a backend plugin (kind `mujoco`): MuJoCo physics stepped by the driver's own
control loop, imported only when a driver is built (validating a cell never imports mujoco)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext
from armada.runtime.config import StrictModel


class MujocoBackendConfig(StrictModel):
    kind: Literal["mujoco"] = "mujoco"
    scene: Literal["so101", "aloha"]
    task: str  # the task placed at start; `reset` on the control socket changes it
    seed: int = Field(default=0, ge=0, lt=2**63)
    # The sim control socket (reset a task with a seed, read the whole scene state): ipc://{run_dir}/...
    control: str | None = None

    @field_validator("control")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            from armada.runtime.endpoints import check_endpoint

            check_endpoint(value)
        return value

    @model_validator(mode="after")
    def _task_in_scene(self) -> "MujocoBackendConfig":
        from armada.drivers.sim.world import tasks_for

        if self.task not in tasks_for(self.scene):
            raise ValueError(f"task {self.task!r} is not in scene {self.scene!r}; its tasks: "
                             f"{', '.join(tasks_for(self.scene))}")
        return self


def check_embodiment(cfg: MujocoBackendConfig, emb: Any) -> None:
    """The embodiment's joints, in order, must be the scene's (the action layout the world maps)."""
    from armada.drivers.sim.world import scene_joint_names

    expected = scene_joint_names(cfg.scene)
    if list(emb.joint_names) != expected:
        raise ValueError(f"sim scene {cfg.scene!r} needs the joints {expected} in this order; embodiment "
                         f"{emb.name!r} has {list(emb.joint_names)}")


def build(ctx: BuildContext) -> Backend:
    import numpy as np

    from armada.drivers.sim.backend import MujocoBackend

    b: MujocoBackendConfig = ctx.driver.backend
    check_embodiment(b, ctx.embodiment)
    emb = ctx.embodiment
    return MujocoBackend(b.scene, b.task, b.seed, b.control, home=np.array(emb.home, dtype=np.float64),
                         period_s=1.0 / emb.control_rate_hz, lower=np.array(emb.lower), upper=np.array(emb.upper))


PLUGIN = BackendPlugin(kind="mujoco", config_model=MujocoBackendConfig, build=build, moves_hardware=False,
                       check_embodiment=check_embodiment)
