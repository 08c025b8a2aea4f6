"""Merging math for MergeVLA and CapVector checkpoints, on plain state dicts.

Everything here works on ``dict[str, torch.Tensor]`` so the same code serves the tiny models of
the tests and real 2.5 GB checkpoints. Functions walk the keys one at a time: the only extra
memory is a few float32 temporaries for the current key. Arithmetic that rounds is done in
float32 and the result is cast back to the input's dtype (bf16 checkpoints stay bf16).
Long loops take ``progress(done, total, key)``, called after each key.

Notation (docs/mergevla-layout.md, sections 1d, 3 and 4):
  theta_0    base (pretrained) weights
  tau_m      task vector of task m: theta_m - theta_0
  tau_merge  merged task vector (task arithmetic or TIES)
  S_m        TALL mask of task m: |tau_m| > lam * |tau_merge - tau_m|
  theta_m    weights for routed task m: theta_0 + tau_merge * S_m

Per-tensor functions (``trim_top_k``, ``ties_tensor``, ``tall_mask_tensor``,
``top_right_singular_vectors``) are public so that a caller streaming a checkpoint key by key
(e.g. from safetensors) can use them without building whole dicts.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
Progress = Callable[[int, int, str], None]

ROUTER_KEY = "model.gate.gate.{gate}.routers.{m}"  # gate 0: v_adapter, gate 1: v_task
ROUTER_BRANCHES = ("v_adapter", "v_task")  # index = gate number
_BLOCK_KEY = re.compile(r"^model\.mlp_resnet_blocks\.(\d+)\.(.+)$")
_STEM_MODULES = ("model.layer_norm1.", "model.fc1.")
_OUTPUT_MODULES = ("model.layer_norm2.", "model.fc2.")


class MergeError(ValueError):
    """Inputs that cannot be merged: mismatched keys, shapes or dtypes. The message names the key."""


# --------------------------------------------------------------------------- checks


def _describe(keys: set[str], limit: int = 5) -> str:
    shown = sorted(keys)[:limit]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in shown) + more


def _check_same_keys(reference: Mapping[str, Tensor], other: Mapping[str, Tensor],
                     ref_name: str, other_name: str) -> None:
    missing = reference.keys() - other.keys()
    extra = other.keys() - reference.keys()
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_describe(missing)}")
        if extra:
            parts.append(f"extra {_describe(extra)}")
        raise MergeError(f"{other_name} does not have the keys of {ref_name}: " + "; ".join(parts))


def _check_tensors(key: str, tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    """Same shape everywhere, and floating point: integer tensors have no meaningful deltas."""
    for tensor, name in zip(tensors, names):
        if tensor.shape != tensors[0].shape:
            raise MergeError(f"{key}: shape {tuple(tensor.shape)} in {name} != {tuple(tensors[0].shape)} in {names[0]}")
        if not tensor.is_floating_point():
            raise MergeError(f"{key}: {name} has dtype {tensor.dtype}; only floating-point tensors can be merged "
                             "(drop or copy such keys before merging)")


def _check_nonempty(items: Sequence, what: str) -> None:
    if len(items) == 0:
        raise MergeError(f"need at least one {what}")


def _report(progress: Progress | None, done: int, total: int, key: str) -> None:
    if progress is not None:
        progress(done, total, key)


# --------------------------------------------------------------------------- task vectors


def task_vectors(base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]],
                 progress: Progress | None = None, dtype: torch.dtype | None = None) -> list[StateDict]:
    """tau_m = theta_m - theta_0 for every task m.

    Keys must match the base exactly. The difference is taken in float32 and stored in ``dtype``
    (default: the fine-tuned tensor's dtype; pass torch.float32 to keep bf16 differences exact
    at twice the memory).
    """
    _check_nonempty(finetuned, "fine-tuned model")
    for m, model in enumerate(finetuned):
        _check_same_keys(base, model, "base", f"finetuned[{m}]")
    names = ["base"] + [f"finetuned[{m}]" for m in range(len(finetuned))]
    taus: list[StateDict] = [{} for _ in finetuned]
    total = len(base)
    for done, key in enumerate(base, start=1):
        theta_0 = base[key]
        _check_tensors(key, [theta_0] + [model[key] for model in finetuned], names)
        base32 = theta_0.float()
        for m, model in enumerate(finetuned):
            taus[m][key] = (model[key].float() - base32).to(dtype or model[key].dtype)
        _report(progress, done, total, key)
    return taus


def _check_aligned(dicts: Sequence[Mapping[str, Tensor]], what: str, name: str) -> None:
    """Non-empty, and every state dict has exactly the keys of the first."""
    _check_nonempty(dicts, what)
    for m in range(1, len(dicts)):
        _check_same_keys(dicts[0], dicts[m], f"{name}[0]", f"{name}[{m}]")


def _check_taus(taus: Sequence[Mapping[str, Tensor]]) -> None:
    _check_aligned(taus, "task vector", "taus")


def task_arithmetic(taus: Sequence[Mapping[str, Tensor]], scaling: float = 1.0,
                    progress: Progress | None = None) -> StateDict:
    """tau_merge = scaling * sum_m tau_m (MergeVLA's default uses scaling 1)."""

    def summed(tensors: list[Tensor]) -> Tensor:
        acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
        for tensor in tensors:
            acc += tensor.float()
        return (acc * scaling).to(tensors[0].dtype)

    return _merge_key_by_key(taus, summed, progress)


def _merge_key_by_key(taus: Sequence[Mapping[str, Tensor]], combine: Callable[[list[Tensor]], Tensor],
                      progress: Progress | None) -> StateDict:
    """Apply ``combine`` to the M task vectors' tensors of each key in turn (one key in memory)."""
    _check_taus(taus)
    names = [f"taus[{m}]" for m in range(len(taus))]
    merged: StateDict = {}
    total = len(taus[0])
    for done, key in enumerate(taus[0], start=1):
        tensors = [tau[key] for tau in taus]
        _check_tensors(key, tensors, names)
        merged[key] = combine(tensors)
        _report(progress, done, total, key)
    return merged


# --------------------------------------------------------------------------- TIES


def trim_top_k(tensor: Tensor, fraction: float) -> Tensor:
    """Keep the ``fraction`` of entries with the largest magnitude, zero the rest (TIES "trim").

    The number kept is ceil(fraction * numel), so any fraction > 0 keeps at least one entry.
    Entries tied with the smallest kept magnitude are all kept: the result never depends on
    the order in which a sort happens to break ties.
    """
    if not 0.0 <= fraction <= 1.0:
        raise MergeError(f"top_k_fraction must be in [0, 1], got {fraction}")
    count = tensor.numel()
    # round() first: 0.3 * 10 is 3.0000000000000004 in floating point and must keep 3, not 4.
    keep = min(count, math.ceil(round(fraction * count, 6)))
    if keep == count:
        return tensor
    if keep == 0:
        return torch.zeros_like(tensor)
    magnitude = tensor.abs()
    # The keep-th largest magnitude is the (count - keep + 1)-th smallest.
    threshold = magnitude.flatten().kthvalue(count - keep + 1).values
    return torch.where(magnitude >= threshold, tensor, torch.zeros_like(tensor))


def ties_tensor(tensors: Sequence[Tensor], top_k_fraction: float = 0.2, scaling: float = 1.0,
                aggregate: Literal["mean", "sum"] = "mean") -> Tensor:
    """TIES on one tensor: trim each task vector, elect a sign per entry, disjoint aggregate.

    - trim: ``trim_top_k`` per task (per tensor, not over the whole model);
    - elect: the sign of the sum of the trimmed values (the side with more total mass wins,
      not the side with more tasks);
    - disjoint aggregate: over the tasks whose trimmed value is nonzero and has the elected
      sign, the mean (or the sum); zero where no task agrees, which includes entries whose
      trimmed values cancel exactly (elected sign 0).
    Computed in float32, returned in the first tensor's dtype. ``aggregate="sum"`` with
    ``top_k_fraction=1.0`` is the variant MergeVLA stores for its TIES merges.
    """
    _check_nonempty(tensors, "task vector")
    if aggregate not in ("mean", "sum"):
        raise MergeError(f"aggregate must be 'mean' or 'sum', got {aggregate!r}")
    trimmed = [trim_top_k(t.float(), top_k_fraction) for t in tensors]
    mass = torch.zeros_like(trimmed[0])
    for t in trimmed:
        mass += t
    elected = torch.sign(mass)
    total = torch.zeros_like(mass)
    agreeing = torch.zeros(mass.shape, dtype=torch.int16, device=mass.device)  # counts: M < 32768
    for t in trimmed:
        # elected == 0 never agrees: sign(t) == 0 only where t == 0, which is excluded.
        agrees = (torch.sign(t) == elected) & (t != 0)
        total += torch.where(agrees, t, 0.0)
        agreeing += agrees
    if aggregate == "mean":
        merged = total / agreeing.clamp(min=1)  # zero where no task agrees: total is zero there
    else:
        merged = total
    return (merged * scaling).to(tensors[0].dtype)


def ties_merge(taus: Sequence[Mapping[str, Tensor]], top_k_fraction: float = 0.2, scaling: float = 1.0,
               aggregate: Literal["mean", "sum"] = "mean", progress: Progress | None = None) -> StateDict:
    """tau_merge by TIES (trim, elect sign, disjoint mean), key by key; see ``ties_tensor``."""
    return _merge_key_by_key(taus, lambda tensors: ties_tensor(tensors, top_k_fraction, scaling, aggregate),
                             progress)


# --------------------------------------------------------------------------- TALL masks


def tall_mask_tensor(tau_m: Tensor, tau_merge: Tensor, lam: float = 0.6) -> Tensor:
    """S_m = |tau_m| > lam * |tau_merge - tau_m|, elementwise, as a bool tensor.

    Strict ">": an entry where task m's own change exactly equals lam times the other tasks'
    contribution is not kept, and an entry where tau_m is zero is never kept.
    """
    tau32 = tau_m.float()
    return tau32.abs() > lam * (tau_merge.float() - tau32).abs()


def tall_masks(taus: Sequence[Mapping[str, Tensor]], tau_merge: Mapping[str, Tensor], lam: float = 0.6,
               progress: Progress | None = None) -> list[dict[str, Tensor]]:
    """One bool mask dict per task, same keys and shapes as ``tau_merge`` (lambda 0.6 in MergeVLA)."""
    _check_taus(taus)
    _check_same_keys(tau_merge, taus[0], "tau_merge", "taus[0]")
    names = ["tau_merge"] + [f"taus[{m}]" for m in range(len(taus))]
    masks: list[dict[str, Tensor]] = [{} for _ in taus]
    total = len(tau_merge)
    for done, key in enumerate(tau_merge, start=1):
        _check_tensors(key, [tau_merge[key]] + [tau[key] for tau in taus], names)
        for m, tau in enumerate(taus):
            masks[m][key] = tall_mask_tensor(tau[key], tau_merge[key], lam)
        _report(progress, done, total, key)
    return masks


# --------------------------------------------------------------------------- materialize


def _check_materialize_inputs(base: Mapping[str, Tensor], tau_merge: Mapping[str, Tensor],
                              mask: Mapping[str, Tensor] | None, out: Mapping[str, Tensor] | None) -> None:
    unknown = tau_merge.keys() - base.keys()
    if unknown:
        raise MergeError(f"tau_merge has keys the base lacks: {_describe(unknown)}")
    if mask is not None:
        unmerged = mask.keys() - tau_merge.keys()
        if unmerged:
            raise MergeError(f"mask has keys tau_merge lacks: {_describe(unmerged)}")
    if out is not None:
        missing = base.keys() - out.keys()
        if missing:
            raise MergeError(f"out lacks keys of the base: {_describe(missing)}")


def _materialize_key(key: str, theta_0: Tensor, tau: Tensor | None, mask: Tensor | None, target: Tensor) -> None:
    if target.shape != theta_0.shape:
        raise MergeError(f"{key}: out has shape {tuple(target.shape)}, base {tuple(theta_0.shape)}")
    if tau is None:
        target.copy_(theta_0)  # not merged (e.g. action queries): theta = theta_0
        return
    if tau.shape != theta_0.shape:
        raise MergeError(f"{key}: tau_merge has shape {tuple(tau.shape)}, base {tuple(theta_0.shape)}")
    delta = tau
    if mask is not None:
        if mask.shape != tau.shape or mask.dtype != torch.bool:
            raise MergeError(f"{key}: mask must be bool with shape {tuple(tau.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        # where, not multiply: 0 * inf would be nan, and masked-out entries must be exactly theta_0.
        delta = torch.where(mask.to(tau.device), tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
    if target.device == theta_0.device:
        # One rounding into the target dtype (torch computes bf16 sums in float32 internally).
        torch.add(theta_0, delta.to(theta_0.device), out=target)
    else:
        target.copy_(torch.add(theta_0, delta.to(theta_0.device)))


def materialize(base: Mapping[str, Tensor], tau_merge: Mapping[str, Tensor], mask: Mapping[str, Tensor] | None = None,
                out: Mapping[str, Tensor] | None = None, progress: Progress | None = None) -> StateDict:
    """Weights for one task: theta_m = theta_0 + tau_merge * S_m (no mask: theta_0 + tau_merge).

    - Base keys absent from ``tau_merge`` come out as theta_0 (copies, never aliases of ``base``).
    - Keys of ``tau_merge`` absent from ``mask`` are added unmasked: the merged checkpoint only
      has masks for the keys that differ, and stores zeros elsewhere.
    - ``out``: an existing weight set (e.g. a model's state_dict tensors, any float dtype, any
      device) written in place, key by key; the returned dict holds those same tensors. The router
      relies on this to evaluate M candidates with one weight set instead of M. Keys of ``out``
      that the base lacks are left alone.
    Without ``out`` the result has the base's dtypes.
    """
    _check_materialize_inputs(base, tau_merge, mask, out)
    weights: StateDict = {}
    total = len(base)
    for done, key in enumerate(base, start=1):
        theta_0 = base[key]
        target = out[key] if out is not None else torch.empty_like(theta_0)
        key_mask = mask.get(key) if mask is not None else None
        _materialize_key(key, theta_0, tau_merge.get(key), key_mask, target)
        weights[key] = target
        _report(progress, done, total, key)
    return weights


# --------------------------------------------------------------------------- action heads


def _check_heads(heads: Sequence[Mapping[str, Tensor]]) -> None:
    _check_aligned(heads, "action head", "heads")


def _normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MergeError(f"{len(weights)} weights for {count} heads")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    total = float(sum(weights))
    return [w / total for w in weights]


def average_heads(heads: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None,
                  progress: Progress | None = None) -> StateDict:
    """Weighted mean of each key over the heads (plain mean by default; weights are normalized).

    Used for the shared blocks, the stem and the proprio projector. Non-float tensors must be
    equal in every head and are copied.
    """
    _check_heads(heads)
    coefficients = _normalized_weights(weights, len(heads))
    averaged: StateDict = {}
    total = len(heads[0])
    for done, key in enumerate(heads[0], start=1):
        tensors = [head[key] for head in heads]
        first = tensors[0]
        if not first.is_floating_point():
            if any(t.shape != first.shape or not torch.equal(t, first) for t in tensors):
                raise MergeError(f"{key}: non-float tensor ({first.dtype}) differs between heads; cannot average it")
            averaged[key] = first.clone()
        else:
            _check_tensors(key, tensors, [f"heads[{m}]" for m in range(len(heads))])
            acc = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
            for c, tensor in zip(coefficients, tensors):
                acc += c * tensor.float()
            averaged[key] = acc.to(first.dtype)
        _report(progress, done, total, key)
    return averaged


def stack_experts(heads: Sequence[Mapping[str, Tensor]], key_map: Mapping[str, str]) -> StateDict:
    """Copy one tensor per head into expert slots: ``key_map`` maps a single-task key to a
    template with ``{m}``, e.g. ``"model.fc2.weight" -> "model.fc2.experts.{m}.weight"``; head m
    (m = the task's expert index) lands at ``template.format(m=m)``."""
    _check_nonempty(heads, "action head")
    stacked: StateDict = {}
    for source, template in key_map.items():
        if "{m}" not in template:
            raise MergeError(f"expert key template {template!r} has no '{{m}}'")
        for m, head in enumerate(heads):
            if source not in head:
                raise MergeError(f"heads[{m}] has no key {source!r}")
            stacked[template.format(m=m)] = head[source].clone()
    return stacked


def _block_count(keys: Sequence[str]) -> int:
    indices = {int(match.group(1)) for key in keys if (match := _BLOCK_KEY.match(key))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise MergeError(f"action head blocks must be numbered 0..N-1, found {sorted(indices)}")
    return max(indices) + 1


def _moe_plan(keys: Sequence[str], shared_blocks: int) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Sort single-task head keys into (averaged keys, expert key map, gate concat map), section 1d."""
    averaged: list[str] = []
    experts: dict[str, str] = {}
    gates: dict[str, str] = {}
    for key in keys:
        block = _BLOCK_KEY.match(key)
        if key.startswith(_STEM_MODULES) or (block and int(block.group(1)) < shared_blocks):
            averaged.append(key)
        elif block:
            moe_prefix = f"model.mlp_resnet_moe_blocks.{int(block.group(1)) - shared_blocks}"
            rest = block.group(2)
            if rest == "gating_factor":
                gates[key] = f"{moe_prefix}.gating_factor"
            else:
                module, param = rest.rsplit(".", 1)  # "ffn.0.weight" -> ("ffn.0", "weight")
                experts[key] = f"{moe_prefix}.{module}.experts.{{m}}.{param}"
        elif key.startswith(_OUTPUT_MODULES):
            module, param = key.rsplit(".", 1)
            experts[key] = f"{module}.experts.{{m}}.{param}"
        else:
            raise MergeError(f"unexpected key {key!r} in a single-task action head (see docs/mergevla-layout.md 1d)")
    return averaged, experts, gates


def build_moe_head(heads: Sequence[Mapping[str, Tensor]], expert_blocks: int = 1, router_k: int = 8,
                   router_layer: int | None = None, progress: Progress | None = None) -> StateDict:
    """Merged MoE action head from M single-task heads (docs/mergevla-layout.md 1d).

    With N blocks and S = N - expert_blocks shared blocks:
    - stem (``layer_norm1``, ``fc1``) and blocks 0..S-1: plain average, same keys;
    - block S+j -> ``model.mlp_resnet_moe_blocks.{j}.<module>.experts.{m}.<param>``, and
      ``gating_factor`` -> ``model.mlp_resnet_moe_blocks.{j}.gating_factor`` of shape [M]
      (the tasks' [1] gates concatenated in expert order);
    - ``layer_norm2``/``fc2`` -> ``model.<module>.experts.{m}.<param>``;
    - routers from block ``router_layer`` (default S-1), see ``router_subspaces``, and
      ``model.router_layer_idx`` = that block index as an int64 scalar.
    Head m becomes expert m: pass heads in the task-to-index order of the bundle.
    """
    _check_heads(heads)
    keys = list(heads[0])
    blocks = _block_count(keys)
    shared = blocks - expert_blocks
    if not 1 <= expert_blocks < blocks:
        raise MergeError(f"expert_blocks must be in [1, {blocks - 1}] for {blocks} blocks, got {expert_blocks}")
    layer = shared - 1 if router_layer is None else router_layer
    if not 0 <= layer < blocks:
        raise MergeError(f"router_layer {layer} is outside 0..{blocks - 1}")
    averaged_keys, expert_map, gate_map = _moe_plan(keys, shared)

    merged = average_heads([{k: head[k] for k in averaged_keys} for head in heads], progress=progress)
    merged.update(stack_experts(heads, expert_map))
    for source, target in gate_map.items():
        merged[target] = torch.cat([head[source].reshape(-1) for head in heads])
    merged.update(router_subspaces(heads, layer, router_k))
    merged["model.router_layer_idx"] = torch.tensor(layer, dtype=torch.long)
    return merged


# --------------------------------------------------------------------------- router subspaces


def top_right_singular_vectors(weight: Tensor, k: int) -> Tensor:
    """The top-k right singular vectors of a Linear weight, as the rows of a [k, in] tensor.

    ``nn.Linear.weight`` is [out, in] and computes y = W x, so W = U diag(s) V^T has its right
    singular vectors (columns of V, rows of V^T) in the input space R^in: they are the input
    directions the layer amplifies most. The SVD runs in float32 and the rows come back in
    float32, orthonormal, by decreasing singular value.

    A singular vector's sign is arbitrary (v and -v are equally valid, and LAPACK builds may
    disagree), so each row is flipped to make its largest-magnitude entry positive. Router
    scores use norms and do not depend on signs; stored routers then do not either.
    """
    if weight.dim() != 2:
        raise MergeError(f"expected a 2-D Linear weight, got shape {tuple(weight.shape)}")
    if not 1 <= k <= min(weight.shape):
        raise MergeError(f"k must be in [1, {min(weight.shape)}] for a weight of shape {tuple(weight.shape)}, got {k}")
    _, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    top = vh[:k]
    pivot = top.abs().argmax(dim=1)
    signs = torch.sign(top[torch.arange(k), pivot])
    return top * signs[:, None]


def router_subspaces(heads: Sequence[Mapping[str, Tensor]], layer: int, k: int,
                     dtype: torch.dtype | None = None) -> StateDict:
    """Router matrices of the MoE head, from each task's own (not averaged) block ``layer``.

    ``model.gate.gate.0.routers.{m}`` = top-k right singular vectors of task m's
    ``model.mlp_resnet_blocks.{layer}.v_adapter.weight``, ``gate.1`` the same for ``v_task``;
    each [k, D_in]. Biases are ignored. Stored in ``dtype`` (default: the weight's dtype, bf16 in
    real checkpoints, as MergeVLA stores them).
    """
    _check_nonempty(heads, "action head")
    routers: StateDict = {}
    for gate, branch in enumerate(ROUTER_BRANCHES):
        source = f"model.mlp_resnet_blocks.{layer}.{branch}.weight"
        for m, head in enumerate(heads):
            if source not in head:
                raise MergeError(f"heads[{m}] has no key {source!r}")
            weight = head[source]
            routers[ROUTER_KEY.format(gate=gate, m=m)] = top_right_singular_vectors(weight, k).to(dtype or weight.dtype)
    return routers


# --------------------------------------------------------------------------- CapVector


def capvector(pretrained: Mapping[str, Tensor], aux_model: Mapping[str, Tensor], std_model: Mapping[str, Tensor],
              alpha: float, progress: Progress | None = None) -> StateDict:
    """theta = theta_pretrained + alpha * (theta_aux - theta_std), key by key.

    The capability vector is the auxiliary-objective fine-tune minus the standard-SFT fine-tune
    of the same start; it is added once, before downstream fine-tuning. Computed in float32,
    returned in the pretrained dtypes.
    """
    _check_same_keys(pretrained, aux_model, "pretrained", "aux_model")
    _check_same_keys(pretrained, std_model, "pretrained", "std_model")
    names = ["pretrained", "aux_model", "std_model"]
    merged: StateDict = {}
    total = len(pretrained)
    for done, key in enumerate(pretrained, start=1):
        base, aux, std = pretrained[key], aux_model[key], std_model[key]
        _check_tensors(key, [base, aux, std], names)
        merged[key] = (base.float() + alpha * (aux.float() - std.float())).to(base.dtype)
        _report(progress, done, total, key)
    return merged
