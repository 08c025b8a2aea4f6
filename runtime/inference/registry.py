"""Policies are plugins, like backends and cameras: the inference process and the cell loader look
a policy up by its ``kind`` and never name one.

Each kind exposes one ``PolicyPlugin`` under the ``armada.policies`` entry-point group in
pyproject.toml; a lab's own model package registers its policy the same way. A plugin imports its
model stack (torch, onnxruntime) in ``build`` only, so validating a cell stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from armada.drivers.core.registry import PluginRegistry, RegistryError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from armada.runtime.config import CellConfig
    from armada.runtime.inference.policy import Policy

ENTRY_POINT_GROUP = "armada.policies"


@dataclass(frozen=True)
class PolicyPlugin:
    kind: str  # the ``inference.policy.kind`` a cell names
    # Pydantic model of the cell's ``inference.policy`` map (extra keys forbidden, ``kind`` included).
    config_model: "type[BaseModel]"
    # Builds the policy from the loaded cell (``cell.inference.policy`` is a ``config_model``;
    # relative files resolve against ``cell.folder``).
    build: "Callable[[CellConfig], Policy]"
    # True for a learned model: its first call may load weights and warm up, so it gets a longer
    # first deadline (runtime/inference/process.py ``deadlines``).
    needs_model: bool = False


POLICIES: PluginRegistry[PolicyPlugin] = PluginRegistry(ENTRY_POINT_GROUP, PolicyPlugin, "policy kind")

__all__ = ["ENTRY_POINT_GROUP", "POLICIES", "PolicyPlugin", "RegistryError"]
