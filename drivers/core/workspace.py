"""Workspace box and two-arm separation limits (placeholder until they land: none)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig


def cartesian_guard(emb: EmbodimentConfig, inner: Any) -> Any | None:
    """A filter wrapping ``inner`` that enforces the embodiment's Cartesian limits; None when it has none."""
    if emb.kinematics is None:
        return None
    raise NotImplementedError("workspace and separation limits are not built yet")
