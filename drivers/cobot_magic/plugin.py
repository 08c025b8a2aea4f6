"""The AgileX Cobot Magic (two puppet PiPers as one robot) as a backend plugin.

Its fake is the PiPer fake with two channels (`armada fake piper --channel A --channel B --home`).
"""

from __future__ import annotations

from typing import Any

from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext
from armada.drivers.cobot_magic.config import CobotMagicBackendConfig
from armada.drivers.piper.config import refuse_virtual_bus


def check_embodiment(cfg: CobotMagicBackendConfig, emb: Any) -> None:
    from armada.drivers.cobot_magic.backend import check_layout  # numpy and the PiPer backend, no vendor SDK

    check_layout(emb)
    refuse_virtual_bus(cfg.bustype)
    if cfg.left_can == cfg.right_can:
        raise ValueError(f"left_can and right_can are both {cfg.left_can!r}: each puppet needs its own bus")


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.core.isolated import IsolatedBackend

    b = ctx.driver.backend
    check_embodiment(b, ctx.embodiment)
    kwargs = {"cfg": b.model_dump(), "emb": ctx.embodiment.model_dump(), "follow_masters": b.follow_masters}
    return IsolatedBackend("armada.drivers.cobot_magic.backend:build_in_worker", kwargs, "Cobot Magic",
                           realtime_priority=ctx.driver.realtime_priority)


PLUGIN = BackendPlugin(kind="cobot_magic", config_model=CobotMagicBackendConfig, build=build, moves_hardware=True,
                       check_embodiment=check_embodiment)
