"""The merged VLA as a policy plugin (kind ``mergevla``, registered under ``armada.policies``).

Kept apart from runtime/model/policy.py, which imports torch at the top: validating a cell loads
every policy plugin, and that must not cost torch's import. ``build`` imports the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from armada.runtime.config import StrictModel
from armada.runtime.inference.registry import PolicyPlugin

if TYPE_CHECKING:
    from armada.runtime.config import CellConfig
    from armada.runtime.inference.policy import Policy

log = logging.getLogger("armada.inference")


class MergedVLAPolicyConfig(StrictModel):
    kind: Literal["mergevla"] = "mergevla"
    # A bundle directory (relative to the cell file), or "tiny": a tiny merged bundle built
    # locally on first use under `tiny_dir` (nothing is downloaded).
    bundle: str
    tiny_tasks: int = Field(default=2, ge=1, le=8)
    tiny_dir: str = "~/.cache/armada/tiny-bundle"
    verify: bool = True  # check the bundle's checksums at start-up
    # Graphs from `armada model export-onnx` (relative to the cell file): chunks then run on
    # ONNX Runtime, on the GPU when the created session really has one. None: PyTorch.
    onnx_dir: str | None = None


def resolve_bundle(p: MergedVLAPolicyConfig, cell_folder: Path) -> Path:
    """The bundle directory of a mergevla policy; "tiny" builds the tiny bundle once, locally."""
    if p.bundle != "tiny":
        path = Path(p.bundle).expanduser()
        return path if path.is_absolute() else cell_folder / path
    path = Path(p.tiny_dir).expanduser() / f"tasks-{p.tiny_tasks}"
    if not (path / "manifest.json").exists():
        from armada.runtime.model.tiny import make_tiny_bundle

        log.info("building the tiny merged bundle in %s (first use)", path)
        make_tiny_bundle(path, num_tasks=p.tiny_tasks, overwrite=True,
                         progress=lambda step: log.info("tiny bundle: %s", step))
    return path


def _build(cell: "CellConfig") -> "Policy":
    from armada.runtime.model.policy import MergedVLAPolicy  # torch is imported only for a real model

    p = cell.inference.policy
    onnx_dir = None
    if p.onnx_dir:
        onnx_dir = Path(p.onnx_dir).expanduser()
        if not onnx_dir.is_absolute():
            onnx_dir = cell.folder / onnx_dir
    return MergedVLAPolicy(resolve_bundle(p, cell.folder), verify=p.verify, onnx_dir=onnx_dir)


PLUGIN = PolicyPlugin(kind="mergevla", config_model=MergedVLAPolicyConfig, build=_build, needs_model=True)
