"""MergedVLAPolicy: a merged bundle behind the inference process's Policy interface.

At t=0 the router scores every candidate task on the first observation (each candidate's
weights swapped in place), picks one, and that choice fixes the weights, the expert head and
the normalization statistics for the whole episode.

A bundle whose manifest marks action dimensions ``relative`` predicts them as offsets from the
state at the chunk's start; ``infer`` adds ``obs.state`` back on those dimensions only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from armada.runtime.inference.observation import Observation
from armada.runtime.inference.policy import ActionSpace, Chunk, Policy, PolicyError, RouteResult
from armada.runtime.model.bundle import Bundle, PromptSpec, TaskSpec, load_bundle
from armada.runtime.model.preprocess import PreprocessError, preprocess_cameras
from armada.runtime.model.router import Router, RouterRefused, RouterSubspaces

log = logging.getLogger("armada.policy")
BACKBONES = ["dino", "siglip"]


class MergedVLAPolicy(Policy):
    def __init__(self, bundle_dir: str | Path, verify: bool = True, onnx_dir: str | Path | None = None):
        """``onnx_dir``: graphs from ``armada model export-onnx``; chunks then run on ONNX Runtime
        (GPU when the created session really has one), routing stays in PyTorch."""
        from armada.runtime.model.engine import TorchEngine  # torch only where a model is really used

        started = time.perf_counter()
        self.bundle: Bundle = load_bundle(bundle_dir, verify=verify)
        self.manifest = self.bundle.manifest
        self.engine = TorchEngine(self.bundle)
        self.onnx_dir = Path(onnx_dir) if onnx_dir else None
        self.ort = None  # the routed task's OrtEngine
        self.tokenizer = PromptTokenizer(self.manifest.prompt, self.bundle.directory,
                                         self.engine.config.llm.vocab)
        self.task: TaskSpec | None = None
        self.prompt_ids: np.ndarray | None = None
        log.info("bundle %s loaded in %.1f s: %d task(s)", bundle_dir, time.perf_counter() - started,
                 len(self.manifest.tasks))

    # ------------------------------------------------------------------ Policy

    def reset(self, space: ActionSpace) -> None:
        if len(space.names) != self.manifest.action.dim:
            raise PolicyError(f"the bundle produces {self.manifest.action.dim} action values, the cell's drivers "
                              f"take {len(space.names)} ({', '.join(space.names)})")
        self.task, self.prompt_ids = None, None

    def route(self, obs: Observation, instruction: str, pinned_task: str | None = None) -> RouteResult:
        tasks = self.manifest.tasks
        pixels = self._pixels(obs)
        if len(tasks) == 1 or (self.manifest.router and not self.manifest.router.enabled and pinned_task):
            chosen = self.bundle.task(pinned_task) if pinned_task else tasks[0]
            return self._fix(chosen, instruction, RouteResult(chosen.name, {chosen.name: 1.0}, {chosen.name: 1.0}))
        if self.manifest.router is None or not self.manifest.router.enabled:
            raise PolicyError("this bundle has several tasks and no router: pin a task")

        def hidden_for(index: int):
            self.engine.use_task(index)
            return self.engine.router_hidden(pixels, self.tokenizer.ids(self._instruction(tasks[index], instruction)))

        spec = self.manifest.router
        subspaces = RouterSubspaces.from_head(self.engine.model.action_head_state_dict())
        names = [t.name for t in sorted(tasks, key=lambda t: t.expert_index)]
        router = Router(names, subspaces, hidden_for, temperature=spec.temperature, min_margin=spec.min_margin)
        # The task whose weights the model already holds (the last episode's) is scored first: one
        # swap fewer per route. The scores do not depend on the order.
        held = self.engine.task_index
        order = names if held is None else [names[held]] + [n for i, n in enumerate(names) if i != held]
        try:
            decision = router.route(pinned=pinned_task, candidates=order)
        except RouterRefused as exc:
            raise PolicyError(str(exc)) from None
        except ValueError as exc:  # e.g. a pinned task that is not in the bundle
            raise PolicyError(str(exc)) from None
        return self._fix(self.bundle.task(decision.task), instruction, decision.as_route_result())

    def infer(self, obs: Observation) -> Chunk:
        if self.task is None or self.prompt_ids is None:
            raise PolicyError("infer before route: the episode must route at t=0 first")
        relative = self._relative_state(obs.state)  # checked before the model runs
        stats = self.task.proprio_stats
        proprio = stats.normalize(obs.state).astype(np.float32) if stats else np.zeros(0, np.float32)
        pixels = self._pixels(obs)
        if self.ort is not None:
            normalized = self.ort.predict_normalized(pixels["dino"][None], pixels["siglip"][None],
                                                     self.prompt_ids[None], proprio[None], self.task.expert_index)[0]
        else:
            normalized = self.engine.predict_normalized(pixels, self.prompt_ids, proprio, self.task.expert_index)
        actions = self.task.action_stats.unnormalize(normalized)
        if relative is not None:  # trained as target minus the state at the chunk's start: add it back
            mask, state = relative
            actions = actions.copy()
            actions[:, mask] += state[mask]
        return Chunk(actions, self.manifest.action.dt)

    def _relative_state(self, state: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
        """(mask, state) when the bundle's manifest marks action dimensions relative, else None."""
        mask = self.manifest.action.relative_mask()
        if mask is None:
            return None
        state = np.asarray(state, np.float64)
        if state.shape != (self.manifest.action.dim,):
            raise PolicyError(f"the bundle's actions are relative to the state on dimensions "
                              f"{np.flatnonzero(mask).tolist()}, but the observation's state has "
                              f"{state.size} values for {self.manifest.action.dim} action dimensions")
        return mask, state

    # ------------------------------------------------------------------ helpers

    def _fix(self, task: TaskSpec, instruction: str, result: RouteResult) -> RouteResult:
        self.engine.use_task(task.expert_index)
        self.task = task
        self.prompt_ids = self.tokenizer.ids(self._instruction(task, instruction))
        if self.onnx_dir is not None:
            self.ort = self._ort_engine(task)
        log.info("episode task %s (expert %d)", task.name, task.expert_index)
        return result

    def _ort_engine(self, task: TaskSpec):
        from armada.runtime.model.engine_ort import OrtEngine

        folder = self.onnx_dir / task.name
        if not (folder / "onnx_manifest.json").exists():
            raise PolicyError(f"no ONNX export for task {task.name} in {self.onnx_dir}; run "
                              f"`armada model export-onnx {self.bundle.directory} {self.onnx_dir}`")
        engine = OrtEngine(folder)
        if engine.prompt_len != len(self.prompt_ids):
            raise PolicyError(f"the ONNX export of {task.name} has prompt length {engine.prompt_len}, this "
                              f"instruction needs {len(self.prompt_ids)}: re-export with --instruction")
        log.info("chunks run on ONNX Runtime (%s) for task %s", engine.device, task.name)
        return engine

    @staticmethod
    def _instruction(task: TaskSpec, instruction: str) -> str:
        # "auto": the operator did not say; each candidate is scored with its own instruction.
        return task.instruction if instruction in ("", "auto") else instruction

    def _pixels(self, obs: Observation) -> dict[str, np.ndarray]:
        try:
            return preprocess_cameras(obs.frames, self.manifest.observation.cameras, self.manifest.preprocessing,
                                      BACKBONES)
        except PreprocessError as exc:
            raise PolicyError(str(exc)) from None


class PromptTokenizer:
    """Instruction -> prompt token ids, offline: the bundle carries its tokenizer."""

    def __init__(self, spec: PromptSpec | None, directory: Path, vocab: int):
        if spec is None:
            raise PolicyError("the bundle has no prompt section: it cannot turn an instruction into tokens")
        self.spec, self.vocab = spec, vocab
        self._hf = None
        if spec.tokenizer != "bytes":
            from tokenizers import Tokenizer  # ships with transformers; reads a local file only

            self._hf = Tokenizer.from_file(str(directory / spec.tokenizer))

    def ids(self, instruction: str) -> np.ndarray:
        text = self.spec.template.format(instruction=instruction.strip().lower())
        if self._hf is not None:
            body = self._hf.encode(text, add_special_tokens=False).ids
        else:
            body = [3 + b % (self.vocab - 3) for b in text.encode("utf-8")]  # past bos/eos/stop ids
        return np.array([self.spec.bos_id, *body], dtype=np.int64)
