"""The Policy interface every policy implements, and the scripted policy used by demos and tests.

A policy sees observations and returns action chunks; it knows nothing about sockets, clocks
of other hosts or drivers. ``route`` runs once at t=0 and fixes the task for the episode.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from armada.runtime.config import StrictModel
from armada.runtime.inference.observation import Observation
from armada.runtime.inference.registry import PolicyPlugin

if TYPE_CHECKING:
    from armada.runtime.config import CellConfig


class PolicyError(Exception):
    """The policy cannot act on this episode (router refused, a camera missing, wrong action
    size); the message tells the operator what to change. The episode ends, the process stays."""


@dataclass(frozen=True)
class RouteResult:
    task: str
    scores: dict[str, float]
    probabilities: dict[str, float] = field(default_factory=dict)
    margin: float = 1.0  # best minus second-best probability; 1.0 when there is one candidate


@dataclass(frozen=True)
class Chunk:
    actions: np.ndarray  # (n, action_dim), absolute joint targets in the action layout
    dt: float  # seconds between consecutive actions


@dataclass(frozen=True)
class ActionSpace:
    """What the policy may command: the cell's drivers' joints, concatenated."""

    names: list[str]
    lower: np.ndarray
    upper: np.ndarray
    gripper: np.ndarray  # bool mask


class Policy(ABC):
    @abstractmethod
    def reset(self, space: ActionSpace) -> None:
        """Prepare for a new episode."""

    @abstractmethod
    def route(self, obs: Observation, instruction: str, pinned_task: str | None = None) -> RouteResult:
        """Pick the task from the first observation (t=0)."""

    @abstractmethod
    def infer(self, obs: Observation) -> Chunk:
        """One action chunk for this observation."""

    def resume(self, obs: Observation) -> None:
        """The episode goes on after a pause during which the arm held still.

        Anything that assumed continuity (a time base, an ensembling history) is stale now.
        """


class ScriptedPolicy(Policy):
    """A smooth periodic motion away from the pose the episode started at, as a function of time.

    Because each action is a function of its own absolute time, an asynchronous schedule that
    stamps chunks correctly produces seamless motion: a seam that jumps means the scheduling is
    wrong. The motion is 1 - cos, so it starts at rest and the first chunk needs no jump.
    """

    def __init__(self, amplitude: float, frequency_hz: float, chunk_size: int, dt: float, latency_s: float = 0.0):
        self.amplitude, self.frequency = amplitude, frequency_hz
        self.chunk_size, self.dt, self.latency_s = chunk_size, dt, latency_s
        self._space: ActionSpace | None = None
        self._center: np.ndarray | None = None
        self._swing = np.zeros(0)  # signed per-joint amplitude
        self._start_ns: int | None = None

    def reset(self, space: ActionSpace) -> None:
        self._space = space
        self._center = None

    def route(self, obs: Observation, instruction: str, pinned_task: str | None = None) -> RouteResult:
        self._start(obs)
        return RouteResult(task=pinned_task or "scripted", scores={"scripted": 1.0}, probabilities={"scripted": 1.0})

    def _start(self, obs: Observation) -> None:
        if self._space is None:
            raise RuntimeError("ScriptedPolicy.reset must be called before the episode starts")
        space = self._space
        self._center = obs.state.copy()
        span = space.upper - space.lower
        # Move toward the side with more room; the motion spans 2 * amplitude and must stay
        # inside the range with room to spare for the driver's margin.
        room_up, room_down = space.upper - self._center, self._center - space.lower
        direction = np.where(room_up >= room_down, 1.0, -1.0)
        room = np.maximum(room_up, room_down) - 0.05 * span
        wanted = np.where(space.gripper, 0.2 * span, self.amplitude)
        self._swing = direction * np.clip(np.minimum(wanted, room / 2), 0.0, None)
        # The motion's clock starts at the first chunk's observation, not here: routing and the first
        # inference may take a while (a loaded host, a warming model), and the arm rests meanwhile.
        self._start_ns = None

    def resume(self, obs: Observation) -> None:
        self._start(obs)  # carry on from where the arm stopped, at rest

    def infer(self, obs: Observation) -> Chunk:
        if self._center is None:
            self._start(obs)
        if self._start_ns is None:
            self._start_ns = obs.mono_ns
        if self.latency_s:
            time.sleep(self.latency_s)  # stands in for a model's compute time
        t = (obs.mono_ns - self._start_ns) * 1e-9 + self.dt * np.arange(1, self.chunk_size + 1)
        profile = (1.0 - np.cos(2 * math.pi * self.frequency * t))[:, None]
        return Chunk(self._center + self._swing * profile, self.dt)


class ScriptedPolicyConfig(StrictModel):
    kind: Literal["scripted"] = "scripted"
    amplitude: float = Field(default=0.2, ge=0)
    frequency_hz: float = Field(default=0.25, gt=0)
    latency_s: float = Field(default=0.0, ge=0)  # simulated inference time


def _build_scripted(cell: "CellConfig") -> ScriptedPolicy:
    p, c = cell.inference.policy, cell.inference.chunking
    return ScriptedPolicy(p.amplitude, p.frequency_hz, c.size, c.dt, p.latency_s)


# Registered under ``armada.policies`` in pyproject.toml.
PLUGIN = PolicyPlugin(kind="scripted", config_model=ScriptedPolicyConfig, build=_build_scripted)
