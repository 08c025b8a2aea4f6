"""A tiny merged bundle with the real layout, built locally (nothing is downloaded).

It runs the real offline path end to end: a random base model, M "fine-tuned" variants that
each change a different part of the weights, task vectors, task arithmetic, TALL masks, M
single-task action heads merged into the MoE head with router subspaces, and a bundle on disk.
Tests, the demo cell and `armada model make-tiny` use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from armada.runtime.model import merge
from armada.runtime.model.bundle import (
    ActionSpec, Manifest, NormStats, Normalize, ObservationSpec, PromptSpec, Resize, RouterSpec, TaskSpec,
    ToFloat, mask_key, write_bundle,
)
from armada.runtime.model.mergevla import ActionHead, MergeVLAConfig, MergeVLAModel, ProprioProjector, randomize_

# The files of a merged bundle (the engine reads these names).
BASE_FILE, TAU_FILE, MASK_FILE = "vla_base.safetensors", "vla_tau.safetensors", "masks.safetensors"
HEAD_FILE, PROPRIO_FILE = "action_head.safetensors", "proprio_projector.safetensors"

DINO_NORM = ((0.484375, 0.455078125, 0.40625), (0.228515625, 0.2236328125, 0.224609375))
SIGLIP_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TINY_TASKS = ["pick_cube", "open_drawer", "stack_blocks", "wipe_table", "pour_cup", "push_button",
              "fold_cloth", "insert_peg"]


def make_tiny_bundle(out_dir: str | Path, num_tasks: int = 2, seed: int = 0,
                     home: np.ndarray | None = None, span: np.ndarray | None = None,
                     cameras: tuple[str, str] = ("front", "wrist"), chunk: int = 8, dt: float = 0.02,
                     overwrite: bool = False, progress: Callable[[str], None] | None = None,
                     config_overrides: dict | None = None) -> Manifest:
    """Write a tiny M-task MergeVLA bundle. ``home``/``span`` set each task's action range (the
    default suits configs/embodiments/mock_arm.yaml: 6 joints and a gripper)."""
    say = progress or (lambda _: None)
    if not 1 <= num_tasks <= len(TINY_TASKS):
        raise ValueError(f"num_tasks must be 1..{len(TINY_TASKS)}")
    home = np.array([0.0, -1.57, 1.57, -1.57, -1.57, 0.0, 0.04]) if home is None else np.asarray(home, float)
    # A random model's chunks jump from one to the next; a narrow range keeps the demo's motion
    # small and inside the driver's engage distance (the filter smooths the rest, counted).
    span = np.array([0.05] * 6 + [0.005]) if span is None else np.asarray(span, float)
    config = MergeVLAConfig.tiny(num_tasks=num_tasks, action_dim=len(home), proprio_dim=len(home), chunk=chunk,
                                 **(config_overrides or {}))
    torch.manual_seed(seed)

    say("base model")
    model = MergeVLAModel(config)
    randomize_(model, seed)
    base = {k: v.detach().clone() for k, v in model.vla_state_dict().items()}

    say(f"{num_tasks} fine-tuned variants, task vectors, task arithmetic, TALL masks")
    finetuned = [_finetune(base, seed + 1 + m, m, num_tasks) for m in range(num_tasks)]
    taus = merge.task_vectors(base, finetuned)
    tau_merge = merge.task_arithmetic(taus)
    masks = merge.tall_masks(taus, tau_merge, lam=0.6)

    say("expert heads, router subspaces")
    heads = []
    for m in range(num_tasks):
        head = ActionHead(config)
        randomize_(head, seed + 100 + m)
        heads.append({k: v.detach().clone() for k, v in head.state_dict().items()})
    merged_head = merge.build_moe_head(heads, expert_blocks=1, router_k=config.router_k,
                                       router_layer=config.router_layer_idx)
    model.load_action_head_state_dict(merged_head)  # checks the layout matches the architecture
    projectors = []
    for m in range(num_tasks):
        proj = ProprioProjector(config.proprio_dim, config.llm.hidden)
        randomize_(proj, seed + 200 + m)
        projectors.append(dict(proj.state_dict()))
    proprio = merge.average_heads(projectors)

    files = {
        BASE_FILE: _numpy(base),
        TAU_FILE: _numpy(tau_merge),
        MASK_FILE: {mask_key(m, k): v.numpy() for m, mask in enumerate(masks) for k, v in mask.items()},
        HEAD_FILE: _numpy(merged_head),
        PROPRIO_FILE: _numpy(proprio),
    }
    manifest = Manifest(
        kind="mergevla",
        architecture=config.to_dict(),
        tasks=[_task(m, home, span) for m in range(num_tasks)],
        action=ActionSpec(dim=len(home), chunk=chunk, dt=dt),
        observation=ObservationSpec(cameras=list(cameras), image_size=config.image_size, proprio_dim=len(home)),
        preprocessing={c: [Resize(size=config.image_size, interpolation="bilinear"), ToFloat(),
                           Normalize(mean=DINO_NORM[0], std=DINO_NORM[1], target="dino"),
                           Normalize(mean=SIGLIP_NORM[0], std=SIGLIP_NORM[1], target="siglip")]
                       for c in cameras},
        router=RouterSpec(k=config.router_k, layer=config.router_layer_idx) if num_tasks > 1 else None,
        prompt=PromptSpec(template="In: What action should the robot take to {instruction}?\nOut:"),
    )
    say("writing")
    return write_bundle(out_dir, manifest, files, overwrite=overwrite)


def _finetune(base: dict[str, torch.Tensor], seed: int, task: int, num_tasks: int) -> dict[str, torch.Tensor]:
    """A stand-in for fine-tuning: a sparse change whose support differs per task, so the TALL
    masks really separate the tasks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        support = torch.rand(value.shape, generator=gen) < 0.3
        delta = torch.randn(value.shape, generator=gen) * 0.05 * (value.std() if value.numel() > 1 else 1.0)
        out[key] = value + delta * support
    return out


def _task(m: int, home: np.ndarray, span: np.ndarray) -> TaskSpec:
    # Each task moves in its own range, offset a little, so unnormalization visibly follows the route.
    offset = 0.1 * span * (m - 0.5)
    stats = NormStats(kind="quantile", q01=list(home - span + offset), q99=list(home + span + offset),
                      mask=[True] * len(home))
    proprio = NormStats(kind="quantile", q01=list(home - 2 * span), q99=list(home + 2 * span),
                        mask=[True] * len(home))
    name = TINY_TASKS[m]
    return TaskSpec(name=name, instruction=name.replace("_", " "), expert_index=m,
                    action_stats=stats, proprio_stats=proprio)


def _numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}  # copy() keeps 0-d arrays 0-d
