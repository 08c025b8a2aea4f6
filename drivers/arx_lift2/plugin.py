"""The ARX Lift 2 (two ARX arms, lift, omni base) as a backend plugin. The vendor SDKs (arx5_interface,
ARX's lift_controller) are imported only when a real robot's backend connects; ``fake: true`` runs
the kinematic fakes behind the same adapters."""

from __future__ import annotations

from typing import Any

from armada.drivers.arx_lift2.config import ArxLift2BackendConfig
from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext


def check_embodiment(cfg: ArxLift2BackendConfig, emb: Any) -> None:
    from armada.drivers.arx_lift2.backend import check_layout  # numpy only, no vendor SDK

    check_layout(emb)


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.arx_lift2.backend import build_backend

    return build_backend(ctx.driver.backend, ctx.embodiment)


PLUGIN = BackendPlugin(kind="arx_lift2", config_model=ArxLift2BackendConfig, build=build, moves_hardware=True,
                       check_embodiment=check_embodiment)
