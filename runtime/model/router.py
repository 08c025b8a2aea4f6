"""Task router: picks the merged task (mask, expert head, statistics) from the first observation.

Math (docs/mergevla-layout.md, section 4): task m owns two orthonormal [k, D] matrices, the top-k
right singular vectors of its block-22 ``v_adapter`` and ``v_task`` weights. A hidden state h
scores ||V_m h|| (the length of its projection on that subspace); tokens are averaged, then the
two branches; the scores of all candidates go through a softmax and the argmax wins.

Unlike the reference, which rebuilds the model from disk per candidate, ``Router`` only asks a
callable for each candidate's hidden states, logs every score, the margin and the time taken, and
lets the operator pin a task or refuse a low margin.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from armada.runtime.inference.policy import RouteResult

log = logging.getLogger("armada.router")

_ROUTER_KEY = re.compile(r"^model\.gate\.gate\.([01])\.routers\.(\d+)$")

HiddenFor = Callable[[int], tuple[Tensor, Tensor]]


class RouterRefused(Exception):
    """The best task does not lead the second by ``min_margin``; ``decision`` holds the scores."""

    def __init__(self, message: str, decision: "RouteDecision"):
        super().__init__(message)
        self.decision = decision


@dataclass(frozen=True)
class RouteDecision:
    task: str
    scores: dict[str, float]
    probabilities: dict[str, float]
    margin: float  # best minus second-best probability; 1.0 with one candidate
    pinned: bool = False  # True when the operator chose the task; scores are still reported
    timings: dict[str, float] = field(default_factory=dict)  # seconds per candidate (Router only)

    def as_route_result(self) -> "RouteResult":
        """The Policy interface's result type."""
        from armada.runtime.inference.policy import RouteResult

        return RouteResult(task=self.task, scores=dict(self.scores), probabilities=dict(self.probabilities),
                           margin=self.margin)


@dataclass(frozen=True)
class RouterSubspaces:
    """Per expert m: ``adapter[m]`` (gate 0, from v_adapter) and ``task[m]`` (gate 1, from v_task),
    each [k, D] float32 with orthonormal rows."""

    adapter: tuple[Tensor, ...]
    task: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        if len(self.adapter) != len(self.task) or not self.adapter:
            raise ValueError(f"need the same nonzero number of adapter and task subspaces, "
                             f"got {len(self.adapter)} and {len(self.task)}")
        for name, group in (("adapter", self.adapter), ("task", self.task)):
            for m, matrix in enumerate(group):
                if matrix.dim() != 2:
                    raise ValueError(f"{name} subspace {m} must be [k, D], got shape {tuple(matrix.shape)}")

    def __len__(self) -> int:
        return len(self.adapter)

    @classmethod
    def from_head(cls, head: Mapping[str, Tensor]) -> "RouterSubspaces":
        """Read ``model.gate.gate.{0,1}.routers.{m}`` from a merged MoE head state dict."""
        found: dict[int, dict[int, Tensor]] = {0: {}, 1: {}}
        for key, tensor in head.items():
            match = _ROUTER_KEY.match(key)
            if match:
                found[int(match.group(1))][int(match.group(2))] = tensor
        experts = sorted(found[0])
        if not experts:
            raise ValueError("the head has no router keys 'model.gate.gate.0.routers.{m}'")
        if experts != list(range(len(experts))) or sorted(found[1]) != experts:
            raise ValueError(f"router experts must be 0..M-1 in both gates, found gate 0: {experts}, "
                             f"gate 1: {sorted(found[1])}")
        # float32: bf16 routers would round the projections that decide the route.
        return cls(adapter=tuple(found[0][m].float() for m in experts),
                   task=tuple(found[1][m].float() for m in experts))


def _branch_score(hidden: Tensor, subspace: Tensor, name: str) -> float:
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{name} hidden states must be (tokens, D) or (B, tokens, D), got {tuple(hidden.shape)}")
    if hidden.shape[-1] != subspace.shape[-1]:
        raise ValueError(f"{name} hidden size {hidden.shape[-1]} != subspace width {subspace.shape[-1]}")
    h = hidden.float()
    basis = subspace.to(device=h.device, dtype=torch.float32)
    coordinates = h @ basis.T  # (..., tokens, k): the token in the subspace's orthonormal basis
    return coordinates.norm(dim=-1).mean().item()  # mean over tokens (and batch)


def score_task(action_hidden: Tensor, task_hidden: Tensor, subspace_adapter: Tensor, subspace_task: Tensor) -> float:
    """One candidate's score: mean over the two branches of the mean token projection norm.

    ``action_hidden`` (Q, D) or (B, Q, D) goes with the v_adapter subspace, ``task_hidden``
    (T, D) or (B, T, D) with the v_task subspace; both subspaces are [k, D].
    """
    adapter = _branch_score(action_hidden, subspace_adapter, "action")
    task = _branch_score(task_hidden, subspace_task, "task")
    return 0.5 * (adapter + task)


def _softmax(scores: Mapping[str, float], temperature: float) -> dict[str, float]:
    scaled = {task: score / temperature for task, score in scores.items()}
    top = max(scaled.values())  # subtract the max so exp never overflows
    weights = {task: math.exp(value - top) for task, value in scaled.items()}
    total = sum(weights.values())
    return {task: weight / total for task, weight in weights.items()}


def _check_route_inputs(scores: Mapping[str, float], temperature: float, min_margin: float) -> None:
    if not scores:
        raise ValueError("route needs at least one candidate score")
    for task, score in scores.items():
        if not math.isfinite(score):
            raise ValueError(f"score for task {task!r} is {score}; the hidden states or subspaces are broken")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= min_margin <= 1.0:
        raise ValueError(f"min_margin must be in [0, 1], got {min_margin}")


def route(scores: Mapping[str, float], temperature: float = 1.0, pinned: str | None = None,
          min_margin: float = 0.0, timings: Mapping[str, float] | None = None) -> RouteDecision:
    """Softmax(scores / temperature), argmax (the first candidate wins an exact tie).

    - margin = best minus second-best probability (1.0 with a single candidate);
    - margin < ``min_margin`` raises ``RouterRefused`` naming the top two tasks;
    - ``pinned``: the operator's task wins regardless of scores and margin; scores and margin
      are still computed and logged so a wrong pin is visible. A pin that is not a candidate
      is an error.
    """
    _check_route_inputs(scores, temperature, min_margin)
    if pinned is not None and pinned not in scores:
        raise ValueError(f"pinned task {pinned!r} is not a candidate; candidates: {list(scores)}")
    probabilities = _softmax(scores, temperature)
    ranked = sorted(probabilities, key=lambda task: -probabilities[task])  # stable: ties keep order
    best = ranked[0]
    margin = probabilities[best] - probabilities[ranked[1]] if len(ranked) > 1 else 1.0
    decision = RouteDecision(task=pinned or best, scores=dict(scores), probabilities=probabilities,
                             margin=margin, pinned=pinned is not None, timings=dict(timings or {}))
    log.info("route: task=%s pinned=%s best=%s margin=%.4f scores=%s probabilities=%s timings_s=%s",
             decision.task, decision.pinned, best, margin, _fmt(decision.scores), _fmt(probabilities),
             _fmt(decision.timings))
    if pinned is None and margin < min_margin:
        second = ranked[1]
        raise RouterRefused(
            f"router refused: {best!r} (p={probabilities[best]:.3f}) leads {second!r} "
            f"(p={probabilities[second]:.3f}) by margin {margin:.3f} < min_margin {min_margin:.3f}; "
            "pin a task to override", decision)
    return decision


def _fmt(values: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{task}: {value:.4g}" for task, value in values.items()) + "}"


class Router:
    """Scores M candidate tasks through ``hidden_for`` and routes.

    ``hidden_for(m)`` returns the final-layer hidden states for candidate m, computed with task
    m's mask: ``(action_hidden, task_hidden)``, shapes (Q, D) / (T, D) or with a batch axis.
    It is expected to swap masks inside the one weight set the running model already holds,
    ``merge.materialize(base, tau_merge, masks[m], out=model_weights)``, then run the VLM only:
    the shared head blocks do not feed the score. ``Router`` never loads anything from disk, so
    the cost per candidate is one in-memory materialize plus one VLM forward, reported in
    ``RouteDecision.timings`` (seconds, including the GPU work: the score reads back a float).
    """

    def __init__(self, tasks: Sequence[str], subspaces: RouterSubspaces, hidden_for: HiddenFor,
                 temperature: float = 1.0, min_margin: float = 0.0):
        if len(tasks) != len(subspaces):
            raise ValueError(f"{len(tasks)} task names for {len(subspaces)} router subspaces")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.tasks = list(tasks)  # position = expert index
        self.subspaces = subspaces
        self.hidden_for = hidden_for
        self.temperature = temperature
        self.min_margin = min_margin

    def score(self, candidates: Sequence[str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """Scores and seconds per candidate (default: every task, in expert order)."""
        names = self.tasks if candidates is None else list(candidates)
        unknown = [name for name in names if name not in self.tasks]
        if unknown:
            raise ValueError(f"unknown candidate tasks {unknown}; known: {self.tasks}")
        scores: dict[str, float] = {}
        timings: dict[str, float] = {}
        for name in names:
            m = self.tasks.index(name)
            started = time.perf_counter()
            action_hidden, task_hidden = self.hidden_for(m)
            scores[name] = score_task(action_hidden, task_hidden, self.subspaces.adapter[m], self.subspaces.task[m])
            timings[name] = time.perf_counter() - started
            log.debug("router candidate %s (expert %d): score %.4f in %.3f s", name, m, scores[name], timings[name])
        return scores, timings

    def route(self, pinned: str | None = None, candidates: Sequence[str] | None = None) -> RouteDecision:
        """Score the candidates and decide; see ``route`` for pinning and refusal."""
        if pinned is not None and pinned not in (self.tasks if candidates is None else candidates):
            raise ValueError(f"pinned task {pinned!r} is not a candidate; candidates: "
                             f"{self.tasks if candidates is None else list(candidates)}")
        scores, timings = self.score(candidates)
        # Decide in expert order whatever order they were scored in: an exact tie then goes the
        # same way every time, not to whichever task the model happened to hold.
        ordered = {name: scores[name] for name in self.tasks if name in scores}
        return route(ordered, self.temperature, pinned, self.min_margin, timings)
