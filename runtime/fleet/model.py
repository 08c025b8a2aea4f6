"""The model behind one service replica: a merged bundle answering route and batched infer requests.

The replica keeps no episode state: each infer request names its routed task and instruction,
so any replica can answer any robot, and a robot whose replica died goes on with another one.

A batch holds requests from several robots. It is grouped by (task, instruction): a task's
weights differ from another's by its mask, so each group needs its weights materialized once,
then runs as one forward pass of the group's size. Materializing a task costs an unpack and an
add per weight (``TorchEngine.use_task``); with ``resident_tasks`` > 0 the materialized weight
sets of that many tasks are kept (least recently used out) and switching is a copy instead.
What each costs is counted in ``stats()`` (``armada bench fleet`` prints it).

Imports torch through the bundle's engine, in ``__init__`` only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from armada.runtime.fleet.wire import ChunkReply, ModelRequest, RouteReply, WireError
from armada.runtime.inference.observation import Observation
from armada.runtime.inference.policy import PolicyError


@dataclass
class ModelStats:
    route_calls: int = 0
    batches: int = 0
    requests: int = 0
    groups: int = 0  # forward passes: one per (task, instruction) in a batch
    swaps: int = 0  # task weight switches
    swap_ms: list[float] = field(default_factory=list)
    resident_hits: int = 0
    forward_ms: list[float] = field(default_factory=list)  # per group

    def as_dict(self) -> dict[str, Any]:
        def pct(values: list[float]) -> dict[str, float]:
            a = np.asarray(values[-2000:], np.float64)
            return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))} \
                if a.size else {"n": 0}
        return {"route_calls": self.route_calls, "batches": self.batches, "requests": self.requests,
                "groups": self.groups, "batching_factor": self.requests / self.groups if self.groups else 0.0,
                "swaps": self.swaps, "swap_ms": pct(self.swap_ms), "resident_hits": self.resident_hits,
                "forward_ms": pct(self.forward_ms)}


class FleetModel:
    """One replica's model. Every method is safe to call from several threads: one model call at a time."""

    def __init__(self, bundle_dir: str | Path, resident_tasks: int = 0, verify: bool = True, threads: int | None = None,
                 resident_budget_mb: float = 2048.0):
        """``resident_tasks`` < 0: as many as fit in ``resident_budget_mb`` (all of the tiny bundle's;
        at real size a weight set is gigabytes, and the budget decides)."""
        import torch

        from armada.runtime.model.policy import MergedVLAPolicy

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.policy = MergedVLAPolicy(bundle_dir, verify=verify)
        self.engine = self.policy.engine
        self.manifest = self.policy.manifest
        self.tasks = {t.name: t for t in self.manifest.tasks}
        self.weight_set_bytes = sum(w.numel() * w.element_size() for w in self.engine.weights.values())
        fit = int(resident_budget_mb * 2**20 // max(1, self.weight_set_bytes))
        self.resident_tasks = min(len(self.tasks), fit) if resident_tasks < 0 else int(resident_tasks)
        self._resident: OrderedDict[int, dict[str, Any]] = OrderedDict()  # expert index -> weights
        self._prompts: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self.stats = ModelStats()

    # ------------------------------------------------------------------ route

    def route(self, req: ModelRequest) -> RouteReply:
        obs = _observation(req)
        with self._lock:
            self.stats.route_calls += 1
            started = time.perf_counter()
            try:
                result = self.policy.route(obs, req.instruction, req.task)
            except KeyError as exc:  # a pinned task the bundle does not have
                raise WireError(422, str(exc).strip("'\"")) from None
            except PolicyError as exc:
                raise WireError(422, str(exc)) from None
            ms = (time.perf_counter() - started) * 1e3
        return RouteReply(result.task, dict(result.scores), dict(result.probabilities), float(result.margin),
                          {"model_ms": ms})

    # ------------------------------------------------------------------ infer

    def infer_batch(self, requests: list[ModelRequest]) -> list[ChunkReply | WireError]:
        """One chunk per request, in order; a request that cannot run gets its WireError and
        leaves the others untouched."""
        out: list[ChunkReply | WireError | None] = [None] * len(requests)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, req in enumerate(requests):
            if req.task not in self.tasks:
                out[i] = WireError(422, f"no task named {req.task!r} in this bundle; it has {sorted(self.tasks)}")
                continue
            groups.setdefault((req.task, req.instruction), []).append(i)
        with self._lock:
            self.stats.batches += 1
            self.stats.requests += len(requests)
            for (task_name, instruction), indices in groups.items():
                for i, reply in zip(indices, self._infer_group(task_name, instruction,
                                                               [requests[i] for i in indices])):
                    out[i] = reply
        return [r if r is not None else WireError(500, "request not answered") for r in out]

    def _infer_group(self, task_name: str, instruction: str, reqs: list[ModelRequest]) -> list[ChunkReply | WireError]:
        torch = self._torch
        task = self.tasks[task_name]
        ready: list[tuple[int, dict[str, np.ndarray], np.ndarray, Any]] = []
        out: list[ChunkReply | WireError | None] = [None] * len(reqs)
        for k, req in enumerate(reqs):
            try:
                relative = self.policy._relative_state(req.state)
                stats = task.proprio_stats
                proprio = stats.normalize(req.state).astype(np.float32) if stats else np.zeros(0, np.float32)
                if stats is None and req.state.size != self.manifest.action.dim:
                    raise PolicyError(f"the bundle takes {self.manifest.action.dim} state values, got {req.state.size}")
                pixels = self.policy._pixels(_observation(req))
            except (PolicyError, ValueError) as exc:
                out[k] = WireError(422, str(exc))
                continue
            ready.append((k, pixels, proprio, relative))
        if ready:
            swap_ms = self._use_task(task.expert_index)
            prompt = self._prompt(task_name, instruction)
            started = time.perf_counter()
            dev = self.engine.device
            dino = torch.from_numpy(np.stack([p["dino"] for _, p, _, _ in ready])).to(dev)
            siglip = torch.from_numpy(np.stack([p["siglip"] for _, p, _, _ in ready])).to(dev)
            ids = torch.from_numpy(np.repeat(prompt[None], len(ready), axis=0)).to(dev)
            proprio = torch.from_numpy(np.stack([q for _, _, q, _ in ready])).to(dev)
            with torch.no_grad():
                normalized = self.engine.model.predict_normalized_actions(dino, siglip, ids, proprio,
                                                                          task.expert_index).float().cpu().numpy()
            forward_ms = (time.perf_counter() - started) * 1e3
            self.stats.groups += 1
            self.stats.forward_ms.append(forward_ms)
            for row, (k, _, _, relative) in enumerate(ready):
                actions = task.action_stats.unnormalize(normalized[row])
                if relative is not None:  # trained as target minus the state at the chunk's start
                    mask, state = relative
                    actions = actions.copy()
                    actions[:, mask] += state[mask]
                out[k] = ChunkReply(actions, self.manifest.action.dt, task_name,
                                    {"batch": len(reqs), "group": len(ready), "forward_ms": forward_ms,
                                     "swap_ms": swap_ms})
        return [r if r is not None else WireError(500, "request not answered") for r in out]

    def _prompt(self, task_name: str, instruction: str) -> np.ndarray:
        key = (task_name, instruction)
        ids = self._prompts.get(key)
        if ids is None:
            ids = self.policy.tokenizer.ids(self.policy._instruction(self.tasks[task_name], instruction))
            if len(self._prompts) < 256:  # instructions come from clients: bounded
                self._prompts[key] = ids
        return ids

    def _use_task(self, index: int) -> float:
        """Make task ``index``'s weights the model's; returns the milliseconds it took (0: already)."""
        engine = self.engine
        if engine.single or engine.task_index == index:
            return 0.0
        started = time.perf_counter()
        resident = self._resident.get(index)
        if resident is not None:
            with self._torch.no_grad():
                for key, weight in engine.weights.items():
                    weight.data.copy_(resident[key])
            engine.task_index = index
            self._resident.move_to_end(index)
            self.stats.resident_hits += 1
        else:
            engine.use_task(index)
            if self.resident_tasks:
                self._resident[index] = {k: w.detach().clone() for k, w in engine.weights.items()}
                while len(self._resident) > self.resident_tasks:
                    self._resident.popitem(last=False)
        ms = (time.perf_counter() - started) * 1e3
        self.stats.swaps += 1
        self.stats.swap_ms.append(ms)
        return ms

    def describe(self) -> dict[str, Any]:
        return {"tasks": sorted(self.tasks), "action_dim": self.manifest.action.dim, "dt": self.manifest.action.dt,
                "cameras": list(self.manifest.observation.cameras), "resident_tasks": self.resident_tasks,
                "resident_now": len(self._resident), "weight_set_mb": self.weight_set_bytes / 2**20}


def _observation(req: ModelRequest) -> Observation:
    now_mono, now_wall = time.monotonic_ns(), time.time_ns()
    return Observation(mono_ns=now_mono, t_ns=now_wall, state=req.state, frames=req.frames)
