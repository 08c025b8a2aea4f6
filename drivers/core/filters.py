"""The driver's filter stack, built from the embodiment: per-group command modes, then the
Cartesian limits (workspace box, separation of two arms) where the embodiment describes them.

Every filter here has SafetyFilter's interface: ``reset``, ``step``, ``decelerate``,
``position``, ``velocity``, ``counters``, ``snapshot``/``restore``, ``limits`` and ``dt``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from armada.drivers.core.modes import build_group_filter
from armada.drivers.core.workspace import cartesian_guard

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig


def build_filter(emb: EmbodimentConfig, dt: float):
    """The filter a driver of ``emb`` runs every tick."""
    inner = build_group_filter(emb, dt)
    guarded = cartesian_guard(emb, inner)
    return inner if guarded is None else guarded
