"""Per-group command modes (placeholder until the modes land: every group as a joint position)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from armada.drivers.core.safety import SafetyFilter, SafetyLimits

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig


def build_group_filter(emb: EmbodimentConfig, dt: float) -> SafetyFilter:
    return SafetyFilter(SafetyLimits.from_embodiment(emb), dt)
