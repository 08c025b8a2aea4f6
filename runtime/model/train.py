"""Train the MergeVLA-structured model on a LeRobotDataset: the shared base, or one task's fine-tune.

``train(dataset, out)`` without ``task`` trains the shared base on every task of the dataset;
with ``task`` (the dataset's task string, i.e. the instruction the episodes were recorded with)
it trains on that task's episodes only, usually from the base (``init``). Either way the output
is an armada task checkpoint (``build.load_task_checkpoint``): ``vla.safetensors``,
``action_head.safetensors`` (single-task head), ``proprio_projector.safetensors``, ``task.json``
(name, instruction, q01/q99 statistics of the episodes trained on), plus ``architecture.json``
(``MergeVLAConfig.to_dict()``), ``serving.json`` (cameras in the model's order, dt = 1/fps, action
names, prompt: what ``read_serving`` turns into a ``build.Serving`` for ``merge_bundle``) and
``train_log.json`` (loss curve, timing, per-task episode counts and statistics).

Actions (``actions``): "relative" (default) trains the arm joints as offsets from the state at the
chunk's start, ``action[t + k] - state[t]`` (as UMI and many VLA recipes do), grippers as
absolute values; "absolute" trains every dimension as the absolute target. Relative offsets keep
an under-trained model's first action near where the arm is (an absolute one can land far away
and the driver refuses the chunk: max_engage_distance). The choice is written into
``serving.json`` (``relative``: one flag per action dimension, or null) and from there into the
bundle manifest's ``action.relative``; the policy adds the observed state back. The q01/q99
statistics of a relative dimension are those of the offsets. Which dimensions are grippers: the
embodiment(s) named by the dataset's robot_type (group mode ``gripper_position`` and the other
non-joint modes stay absolute), else any dimension whose name contains "gripper".

The model's inputs are built by the inference code itself, so a bundle merged from these
checkpoints sees exactly what training saw: images go through the bundle's own preprocessing
steps (``build.Serving`` default: resize to the model size, to_float, DINO and SigLIP
normalization) with ``preprocess.run_steps``; prompts through ``policy.PromptTokenizer``; state
and actions through ``NormStats.normalize``. Videos are decoded once, at load, into uint8 frames
already resized by the steps before ``to_float`` (the rest of the steps run per batch), because
decoding per step would cost far more than the model on a small CPU.

A batch holds samples of one instruction only: the LLM runs without padding (the reference
does), so every row of a batch needs the same prompt length.

What a fine-tune trains (``parts``):
- ``"all"`` (default, the MergeVLA recipe): every weight. A merge then averages the shared head
  blocks and the proprio projectors and masks the VLA task vectors, so a merged bundle pinned to
  a task approximates that fine-tune (the router needs each task's own block L-2, which only a
  full fine-tune gives it); a single-task bundle (a merge of one checkpoint) equals it.
- ``"expert"``: only the parts a merge keeps per task (the head's last block, layer_norm2, fc2);
  the VLA, the stem, the shared head blocks and the proprio projector stay as ``init``. A merge
  of such fine-tunes is then exactly each of them when pinned, but its router cannot tell the
  tasks apart (every task's block L-2 is the base's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported inside the functions that need it (the CLI must load without it)
    import torch

    from armada.runtime.model.build import Serving
    from armada.runtime.model.bundle import NormStats
    from armada.runtime.model.mergevla import MergeVLAConfig

Parts = Literal["all", "expert"]
ActionMode = Literal["relative", "absolute"]
Say = Callable[[str], None]

ARCHITECTURE_FILE, SERVING_FILE, LOG_FILE = "architecture.json", "serving.json", "train_log.json"
BASE_NAME = "base"  # task.json name of a checkpoint trained on several tasks
# The shortest prompt that carries the instruction: every prompt byte is an LLM position, and the
# LLM is most of a step's cost at this size.
SIM_PROMPT = "{instruction}"
BACKBONES = ["dino", "siglip"]
PROGRESS_EVERY_S = 5.0
LOSS_BUCKET = 10  # the loss curve keeps the mean of every this many steps
WARMUP_STEPS = 50
FINAL_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
# One thread: measured on the 2-core dev box at sim-tiny, batch 32, 2 threads ran ~5 steps/s when
# the machine was otherwise idle but 0.2-0.4 steps/s whenever any other process used a core
# (OpenMP threads spin at every barrier and wait for a descheduled partner); one thread ran
# ~3 steps/s under the same load. Pass threads=2 on a machine kept free for training.
DEFAULT_THREADS = 1


class TrainError(ValueError):
    """Training cannot start or go on: names the file or setting and the reason."""


# --------------------------------------------------------------------------- architecture sizes


def size_config(size: str, action_dim: int, proprio_dim: int, num_images: int, chunk: int | None) -> "MergeVLAConfig":
    """The architecture for a size name ("sim-tiny", "tiny") or a JSON file (MergeVLAConfig.to_dict());
    action/proprio dimensions, images and (unless the file sets it and ``chunk`` is None) the
    chunk follow the dataset."""
    from armada.runtime.model.mergevla import MergeVLAConfig

    dims = {"action_dim": action_dim, "proprio_dim": proprio_dim, "num_images": num_images, "num_tasks": 1}
    if size == "sim-tiny":
        # 64 px in 8 px patches: an 8 x 8 grid per camera, fine enough to place a 3 cm object in a
        # 96 px view. Measured at batch 32 on the 2-core dev box: ~3 steps/s on one thread, ~5 on
        # two when nothing else runs (so ~1000 steps for a 6 min base, ~500 for a 3 min fine-tune).
        return MergeVLAConfig.tiny(image_size=64, patch_size=8, num_action_queries=8,
                                   chunk=chunk or 8, **dims)
    if size == "tiny":  # the unit-test size: 28 px, 2 x 2 patches
        return MergeVLAConfig.tiny(chunk=chunk or 4, **dims)
    path = Path(size)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            config = MergeVLAConfig.from_dict(data)
        except (OSError, ValueError) as exc:
            raise TrainError(f"--size {path}: not a readable architecture JSON: {exc}") from None
        return dataclasses.replace(config, chunk=chunk or config.chunk, **dims)
    raise TrainError(f"--size {size!r}: expected sim-tiny, tiny or an architecture .json file")


# --------------------------------------------------------------------------- the dataset in memory


@dataclass
class Demos:
    """Every frame of the episodes trained on, in memory.

    images: (N, cameras, S, S, 3) uint8, already through the preprocessing steps before to_float;
    state/action: (N, dims) float32; episode_end[i]: one past the last frame of frame i's episode;
    instruction[i]: index into ``instructions`` (the frame's task string)."""

    root: Path
    fps: int
    cameras: list[str]
    action_names: list[str]
    state_names: list[str]
    instructions: list[str]
    images: np.ndarray
    state: np.ndarray
    action: np.ndarray
    episode_end: np.ndarray
    instruction: np.ndarray
    episodes: dict[str, int]  # instruction -> episode count
    decode_s: float = 0.0
    robot_type: str = ""

    def __len__(self) -> int:
        return len(self.state)

    def chunk_indices(self, frames: np.ndarray, chunk: int) -> np.ndarray:
        """(B, chunk) frame indices of actions[t : t + chunk], the episode's last action repeated past its end."""
        steps = frames[:, None] + np.arange(chunk)[None]
        return np.minimum(steps, self.episode_end[frames, None] - 1)


def _names(feature: dict[str, Any], key: str, root: Path) -> list[str]:
    shape = feature.get("shape") or [0]
    names = feature.get("names")
    if isinstance(names, dict):  # some lerobot datasets nest the names ({"motors": [...]})
        names = next(iter(names.values()), None)
    if isinstance(names, list) and len(names) == int(shape[0]):
        return [str(n) for n in names]
    return [f"{key}.{i}" for i in range(int(shape[0]))]


def open_dataset(root: Path, repo_id: str | None) -> Any:
    """A LeRobotDataset read from ``root`` only (no hub access)."""
    root = Path(root)
    if not (root / "meta" / "info.json").is_file():
        found = "no such directory" if not root.exists() else f"no meta/info.json in {root}"
        raise TrainError(f"{root}: not a LeRobotDataset ({found}); give the folder `armada run --record` "
                         "or `armada eval` wrote")
    # Offline: a dataset with missing files must fail here, not try to download itself.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    try:
        return LeRobotDataset(repo_id or f"local/{root.name}", root=root)
    except Exception as exc:  # noqa: BLE001 - lerobot, datasets and pyarrow raise their own types
        raise TrainError(f"{root}: cannot open the LeRobotDataset: {type(exc).__name__}: {exc}") from None


def load_demos(root: Path, repo_id: str | None, task: str | None, cameras: Sequence[str] | None,
               uint8_steps: Callable[[str], Sequence[object]], say: Say) -> Demos:
    """Read the tabular data and decode every used video once. ``uint8_steps(camera)``: the
    preprocessing steps applied at load (those before to_float)."""
    ds = open_dataset(root, repo_id)
    meta = ds.meta
    all_tasks = {int(row.task_index): str(name) for name, row in meta.tasks.iterrows()} if meta.tasks is not None else {}
    if not all_tasks or meta.total_episodes == 0:
        raise TrainError(f"{root}: the dataset holds no episodes")
    if task is not None and task not in all_tasks.values():
        raise TrainError(f"{root}: no episodes of task {task!r}; the dataset's tasks are "
                         f"{sorted(all_tasks.values())}")
    video_cameras = [k.removeprefix("observation.images.") for k in meta.video_keys]
    if cameras is None:
        cameras = video_cameras
    missing = [c for c in cameras if c not in video_cameras]
    if missing or not cameras:
        raise TrainError(f"{root}: cameras {missing or list(cameras)} are not in the dataset; it has "
                         f"{video_cameras} (video features observation.images.<camera>)")
    for key in ("observation.state", "action"):
        if key not in meta.features:
            raise TrainError(f"{root}: no {key!r} feature; the dataset has {sorted(meta.features)}")

    table = ds.hf_dataset.with_format("numpy")[:]
    task_index = np.asarray(table["task_index"], np.int64)
    episode_index = np.asarray(table["episode_index"], np.int64)
    keep = np.ones(len(task_index), bool) if task is None else task_index == _index_of(all_tasks, task)
    frames = np.flatnonzero(keep)
    # frames sorted by (episode, frame index); lerobot stores them so, but the chunks depend on it
    order = np.lexsort((np.asarray(table["frame_index"])[frames], episode_index[frames]))
    frames = frames[order]
    episodes = episode_index[frames]
    used_tasks = sorted(set(task_index[frames].tolist()))
    instructions = [all_tasks[i] for i in used_tasks]
    remap = {t: i for i, t in enumerate(used_tasks)}

    started = time.perf_counter()
    images = _decode_images(ds, frames, episodes, np.asarray(table["timestamp"], np.float64)[frames],
                            list(cameras), uint8_steps, say)
    decode_s = time.perf_counter() - started

    ends = np.empty(len(frames), np.int64)
    boundaries = np.flatnonzero(np.diff(episodes)) + 1
    for start, end in zip(np.r_[0, boundaries], np.r_[boundaries, len(frames)]):
        ends[start:end] = end
    counts: dict[str, int] = {}
    for start in np.r_[0, boundaries]:
        name = all_tasks[int(task_index[frames[start]])]
        counts[name] = counts.get(name, 0) + 1
    return Demos(
        root=Path(root), fps=int(meta.fps), cameras=list(cameras),
        action_names=_names(meta.features["action"], "action", root),
        state_names=_names(meta.features["observation.state"], "observation.state", root),
        instructions=instructions, images=images,
        state=np.asarray(table["observation.state"], np.float32)[frames],
        action=np.asarray(table["action"], np.float32)[frames],
        episode_end=ends, instruction=np.array([remap[int(t)] for t in task_index[frames]], np.int64),
        episodes=counts, decode_s=decode_s, robot_type=str(getattr(meta, "robot_type", None) or ""))


def _index_of(tasks: dict[int, str], name: str) -> int:
    return next(i for i, t in tasks.items() if t == name)


def _decode_images(ds: Any, frames: np.ndarray, episodes: np.ndarray, timestamps: np.ndarray, cameras: list[str],
                   uint8_steps: Callable[[str], Sequence[object]], say: Say) -> np.ndarray:
    """(N, cameras, S, S, 3) uint8: each video file decoded once, frames matched by timestamp."""
    from armada.runtime.model.preprocess import apply_step  # the bundle's own step code, steps before to_float

    meta = ds.meta
    out: np.ndarray | None = None
    tolerance = 0.5 / meta.fps
    files_done = 0
    for c, camera in enumerate(cameras):
        key = f"observation.images.{camera}"
        cache: dict[Path, tuple[np.ndarray, list[np.ndarray]]] = {}
        steps = list(uint8_steps(camera))
        for ep in np.unique(episodes):
            rows = np.flatnonzero(episodes == ep)
            path = Path(ds.root) / meta.get_video_file_path(int(ep), key)
            if path not in cache:
                cache.clear()  # episodes are in file order: a file, once left, is not needed again
                cache[path] = _decode_file(path, lambda img: _run_uint8(img, steps, apply_step))
                files_done += 1
            times, decoded = cache[path]
            start = float(meta.episodes[int(ep)][f"videos/{key}/from_timestamp"])
            wanted = start + timestamps[rows]
            nearest = _nearest(times, wanted)
            late = np.abs(times[nearest] - wanted) > tolerance
            if late.any():
                raise TrainError(f"{path}: no frame within {tolerance * 1e3:.0f} ms of t={wanted[late][0]:.3f} s "
                                 f"(episode {int(ep)}); the video does not match the episode's timestamps")
            for row, index in zip(rows, nearest):
                image = decoded[int(index)]
                if out is None:
                    out = np.empty((len(frames), len(cameras), *image.shape), np.uint8)
                out[row, c] = image
        say(f"decoded {camera}: {files_done} video file(s) so far")
    assert out is not None
    return out


def _nearest(times: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of the time in sorted ``times`` closest to each ``wanted``."""
    if len(times) == 1:
        return np.zeros(len(wanted), np.int64)
    right = np.clip(np.searchsorted(times, wanted), 1, len(times) - 1)
    return right - ((wanted - times[right - 1]) < (times[right] - wanted))


def _run_uint8(image: np.ndarray, steps: list[object], apply: Callable[[np.ndarray, object], np.ndarray]) -> np.ndarray:
    for step in steps:
        image = apply(image, step)
    return np.ascontiguousarray(image)


def _decode_file(path: Path, transform: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            times, images = [], []
            for frame in container.decode(stream):
                times.append(float(frame.pts * stream.time_base) if frame.pts is not None else float(frame.time))
                images.append(transform(frame.to_ndarray(format="rgb24")))
    except (OSError, av.FFmpegError) as exc:
        raise TrainError(f"{path}: cannot decode the video: {exc}") from None
    if not images:
        raise TrainError(f"{path}: the video holds no frames")
    order = np.argsort(times)
    return np.asarray(times)[order], [images[i] for i in order]


# --------------------------------------------------------------------------- statistics


def quantile_stats(values: np.ndarray) -> "NormStats":
    """q01/q99 per dimension (OpenVLA's bounds), every dimension normalized."""
    from armada.runtime.model.bundle import NormStats

    values = np.asarray(values, np.float64)
    return NormStats(kind="quantile", q01=np.quantile(values, 0.01, axis=0).tolist(),
                     q99=np.quantile(values, 0.99, axis=0).tolist(), mask=[True] * values.shape[1])


def relative_flags(demos: Demos, actions: ActionMode) -> tuple[bool, ...] | None:
    """Per action dimension, whether it is trained relative to the state (see the module doc);
    None for "absolute" (the manifest then says nothing: every dimension absolute)."""
    if actions == "absolute":
        return None
    if actions != "relative":
        raise TrainError(f"actions must be 'relative' or 'absolute', got {actions!r}")
    modes = _embodiment_modes(demos.robot_type)
    flags = []
    for name in demos.action_names:
        mode = modes.get(".".join(name.split(".")[-2:])) if modes else None
        flags.append(mode == "joint_position" if mode is not None else "gripper" not in name.lower())
    relative = [n for n, f in zip(demos.action_names, flags) if f]
    if relative and demos.state_names != demos.action_names:
        raise TrainError(f"{demos.root}: relative actions need the state and the action to name the same "
                         f"dimensions in the same order; state {demos.state_names}, action {demos.action_names} "
                         "(train with --actions absolute)")
    return tuple(flags)


def _embodiment_modes(robot_type: str) -> dict[str, str]:
    """"group.joint" -> group mode over the embodiments of a robot_type ("so101", "so101+aloha");
    empty when one of them is not a known embodiment (the names then decide)."""
    from armada.runtime.config import ConfigError, load_embodiment

    modes: dict[str, str] = {}
    for name in filter(None, robot_type.split("+")):
        try:
            embodiment = load_embodiment(name)
        except (ConfigError, OSError, ValueError):
            return {}
        modes.update({f"{g.name}.{j.name}": g.mode for g in embodiment.groups for j in g.joints})
    return modes


def action_targets(demos: Demos, frames: np.ndarray, chunk: int, relative: Sequence[bool] | None) -> np.ndarray:
    """(B, chunk, dim) training targets in physical units: actions[t : t + chunk] (the last one repeated
    past the episode end), minus state[t] on the relative dimensions."""
    chunks = demos.action[demos.chunk_indices(frames, chunk)]
    if relative is not None and any(relative):
        mask = np.asarray(relative, bool)
        chunks = chunks.copy()
        chunks[..., mask] -= demos.state[frames][:, None, mask]
    return chunks


def action_stats(demos: Demos, rows: np.ndarray, chunk: int, relative: Sequence[bool] | None) -> "NormStats":
    """q01/q99 of what the model is trained on for these frames: the actions themselves when every
    dimension is absolute (as before relative actions existed), else every chunk target."""
    if relative is None or not any(relative):
        return quantile_stats(demos.action[rows])
    targets = action_targets(demos, rows, chunk, relative)
    return quantile_stats(targets.reshape(-1, targets.shape[-1]))


# --------------------------------------------------------------------------- the model


def _build_model(config: "MergeVLAConfig"):
    """PrismaticVLA + ProprioProjector + single-task ActionHead, run as TorchEngine runs a single head."""
    import torch
    from torch import nn

    from armada.runtime.model.mergevla import ActionHead, PrismaticVLA, ProprioProjector

    class SingleTaskVLA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.vla = PrismaticVLA(config)
            self.proprio_projector = ProprioProjector(config.proprio_dim, config.llm.hidden)
            self.action_head = ActionHead(config)

        def head_inputs(self, dino: torch.Tensor, siglip: torch.Tensor, ids: torch.Tensor):
            image = self.vla.vision(dino, siglip)
            hidden = self.vla.llm_hidden_states(self.vla.build_inputs_embeds(image, ids))
            return self.vla.slice_for_head(hidden, ids.shape[1])

        def forward(self, dino: torch.Tensor, siglip: torch.Tensor, ids: torch.Tensor,
                    proprio: torch.Tensor, frozen_vla: bool = False) -> torch.Tensor:
            if frozen_vla:
                with torch.no_grad():
                    task, action = self.head_inputs(dino, siglip, ids)
            else:
                task, action = self.head_inputs(dino, siglip, ids)
            return self.action_head(task, action, self.proprio_projector(proprio.to(action.dtype)))

    return SingleTaskVLA()


def _expert_key(key: str, config: "MergeVLAConfig") -> bool:
    """Head keys a merge keeps per task: the last block, layer_norm2 and fc2 (build_moe_head, 1 expert block)."""
    last = config.llm.layers - 1
    return key.startswith((f"model.mlp_resnet_blocks.{last}.", "model.layer_norm2.", "model.fc2."))


def load_init(model: Any, init: Path) -> None:
    """Load a task checkpoint's weights (armada layout) into the model; clear errors on a mismatch."""
    from armada.runtime.model.build import (
        TASK_HEAD_FILE, TASK_PROPRIO_FILE, BuildError, load_safetensors, load_vla,
    )
    from armada.runtime.model.mergevla import LM_HEAD_KEY, StateDictMismatch, check_state_dict

    try:
        vla = load_vla(init)
        given = {k: vla[k] for k in vla}
        head = load_safetensors(init / TASK_HEAD_FILE)
        proprio = load_safetensors(init / TASK_PROPRIO_FILE)
    except BuildError as exc:
        raise TrainError(f"--init {init}: {exc}") from None
    try:
        expected = {k: v for k, v in model.vla.state_dict().items() if k != LM_HEAD_KEY}
        check_state_dict(expected, given, "VLA")
        check_state_dict(model.action_head.state_dict(), head, "action head")
        check_state_dict(model.proprio_projector.state_dict(), proprio, "proprio projector")
    except StateDictMismatch as exc:
        raise TrainError(f"--init {init}: its weights do not fit the architecture being trained "
                         f"({exc})") from None
    given[LM_HEAD_KEY] = given["language_model.model.embed_tokens.weight"]
    model.vla.load_state_dict(given, strict=True)
    model.action_head.load_state_dict(head, strict=True)
    model.proprio_projector.load_state_dict(proprio, strict=True)


# --------------------------------------------------------------------------- batches


@dataclass
class Inputs:
    """What the model is trained on, built by the inference code paths."""

    config: "MergeVLAConfig"
    demos: Demos
    steps: dict[str, list[object]]  # camera -> the bundle's preprocessing steps
    split: dict[str, int]  # camera -> index of the first step run per batch (to_float)
    prompt_ids: list[np.ndarray]  # per instruction index
    action_stats: "NormStats"
    proprio_stats: "NormStats"
    relative: tuple[bool, ...] | None = None  # per action dimension: trained relative to the state

    def batch(self, frames: np.ndarray) -> tuple["torch.Tensor", ...]:
        import torch

        from armada.runtime.model.preprocess import run_steps

        d = self.demos
        per_frame = []
        for f in frames:
            outputs = [run_steps(d.images[f, c], self.steps[cam][self.split[cam]:]) for c, cam in enumerate(d.cameras)]
            per_frame.append({t: np.stack([o[t] for o in outputs]) for t in BACKBONES})
        dino = torch.from_numpy(np.stack([p["dino"] for p in per_frame]))
        siglip = torch.from_numpy(np.stack([p["siglip"] for p in per_frame]))
        ids = torch.from_numpy(np.stack([self.prompt_ids[int(d.instruction[f])] for f in frames]))
        proprio = torch.from_numpy(self.proprio_stats.normalize(d.state[frames]).astype(np.float32))
        chunks = action_targets(d, frames, self.config.chunk, self.relative)
        target = torch.from_numpy(self.action_stats.normalize(chunks).astype(np.float32))
        return dino, siglip, ids, proprio, target


def _split_index(steps: Sequence[object]) -> int:
    from armada.runtime.model.bundle import Normalize, ToFloat

    for i, step in enumerate(steps):
        if isinstance(step, (ToFloat, Normalize)):
            return i
    return len(steps)


def load_steps(image_size: int) -> Callable[[str], list[object]]:
    """Per camera, the preprocessing steps run once at load: the default bundle steps (build.Serving
    without preprocessing) up to to_float, i.e. the resize to the model size."""
    from armada.runtime.model.build import Serving, serving_preprocessing

    steps = serving_preprocessing(Serving(cameras=("camera",)), image_size)["camera"]
    head = steps[:_split_index(steps)]
    return lambda _camera: list(head)


def build_inputs(demos: Demos, config: "MergeVLAConfig", serving: "Serving", action_stats: "NormStats",
                 proprio_stats: "NormStats") -> Inputs:
    """The batch builder for a checkpoint: the bundle's steps (build's default preprocessing for
    ``serving``), its prompt tokenizer, these statistics."""
    from armada.runtime.model.build import serving_preprocessing
    from armada.runtime.model.policy import PromptTokenizer

    steps = serving_preprocessing(serving, config.image_size)
    tokenizer = PromptTokenizer(serving.prompt, demos.root, config.llm.vocab)
    return Inputs(config, demos, steps, {c: _split_index(s) for c, s in steps.items()},
                  [tokenizer.ids(i) for i in demos.instructions], action_stats, proprio_stats, serving.relative)


def load_model(directory: str | Path) -> Any:
    """A checkpoint written here as the module it was trained as (eval mode): ``model(dino, siglip,
    ids, proprio)`` gives normalized action chunks."""
    directory = Path(directory)
    model = _build_model(_init_architecture(directory))
    load_init(model, directory)
    return model.eval()


class Sampler:
    """Batches of one instruction each (equal prompt lengths), instructions drawn by frame count."""

    def __init__(self, demos: Demos, batch: int, rng: np.random.Generator):
        self.groups = [np.flatnonzero(demos.instruction == i) for i in range(len(demos.instructions))]
        sizes = np.array([len(g) for g in self.groups], np.float64)
        self.weights = sizes / sizes.sum()
        self.batch, self.rng = batch, rng
        self.queues: list[list[int]] = [[] for _ in self.groups]

    def next(self) -> np.ndarray:
        g = int(self.rng.choice(len(self.groups), p=self.weights))
        queue = self.queues[g]
        while len(queue) < self.batch:  # epochs of shuffled frames, so every frame is seen
            queue.extend(self.rng.permutation(self.groups[g]).tolist())
        out, self.queues[g] = queue[:self.batch], queue[self.batch:]
        return np.array(out, np.int64)


# --------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    steps_per_s: float
    final_loss: float
    log: dict[str, Any] = field(default_factory=dict)


def train(dataset_root: str | Path, out: str | Path, repo_id: str | None = None, task: str | None = None,
          init: str | Path | None = None, size: str = "sim-tiny", steps: int = 2000, batch: int = 32,
          lr: float = 3e-4, seed: int = 0, chunk: int | None = None, progress: Say | None = print,
          overwrite: bool = False, name: str | None = None, parts: Parts = "all",
          max_seconds: float | None = None, cameras: Sequence[str] | None = None,
          threads: int = DEFAULT_THREADS, actions: ActionMode = "relative") -> TrainResult:
    """Train and write a task checkpoint to ``out`` (see the module doc).

    task: the dataset's task string to train on (default: every task: the shared base);
    name: the checkpoint's task name (default: the task string with '_' for spaces; "base" for
    the base); init: a checkpoint to start from (its architecture.json wins over ``size``);
    max_seconds: stop early when the time is up (the learning-rate schedule follows whichever of
    steps and time runs out first); threads: torch CPU threads (see DEFAULT_THREADS); actions:
    "relative" (arm joints as offsets from the state, grippers absolute) or "absolute" (see the
    module doc); a fine-tune must use the kind its ``init`` was trained with."""
    import torch

    from armada.runtime.model.build import Serving
    from armada.runtime.model.bundle import PromptSpec

    say = progress or (lambda _line: None)
    dataset_root, out = Path(dataset_root), Path(out)
    init = Path(init) if init is not None else None
    _check_args(out, init, steps, batch, lr, parts, overwrite, max_seconds, task)
    if threads < 1:
        raise TrainError(f"threads must be at least 1, got {threads}")
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()

    init_config = _init_architecture(init) if init is not None else None
    image_size = init_config.image_size if init_config else size_config(size, 1, 1, 1, chunk).image_size
    say(f"loading {dataset_root}" + (f" (task {task!r})" if task else " (every task)"))
    demos = load_demos(dataset_root, repo_id, task, cameras, load_steps(image_size), say)
    say(f"{len(demos)} frames, {sum(demos.episodes.values())} episodes, {len(demos.instructions)} task(s), "
        f"cameras {demos.cameras}, videos decoded in {demos.decode_s:.1f} s")

    dims = (len(demos.action_names), len(demos.state_names), len(demos.cameras))
    if init_config is not None:
        config = _fit_init(init_config, init, dims, chunk)
    else:
        config = size_config(size, *dims, chunk)
    relative = relative_flags(demos, actions)
    if init is not None:
        _check_init_actions(init, relative)
    serving = Serving(cameras=tuple(demos.cameras), dt=1.0 / demos.fps, prompt=PromptSpec(template=SIM_PROMPT),
                      action_names=tuple(demos.action_names), relative=relative)
    inputs = build_inputs(demos, config, serving, action_stats(demos, np.arange(len(demos)), config.chunk, relative),
                          quantile_stats(demos.state))
    if relative is not None:
        say(f"actions relative to the state on {[n for n, f in zip(demos.action_names, relative) if f]}, "
            f"absolute on {[n for n, f in zip(demos.action_names, relative) if not f]}")

    torch.manual_seed(seed)
    model = _build_model(config)
    if init is not None:
        load_init(model, init)
    model.train()
    trainable = _trainable(model, config, parts)
    # fused: one kernel for all parameters (the per-tensor loop costs more than the math here)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=WEIGHT_DECAY, fused=True)
    sampler = Sampler(demos, batch, np.random.default_rng(seed))
    say(f"training {sum(p.numel() for p in trainable) / 1e6:.2f} M of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters ({parts}), {steps} steps of {batch}"
        + (f", at most {max_seconds:.0f} s" if max_seconds else ""))

    # Denormal floats (tiny Adam moments, LayerScale-sized gradients) make CPU math far slower.
    # numpy's float limits are computed first: with flushing on it warns that they are zero.
    np.finfo(np.float32).smallest_subnormal, np.finfo(np.float64).smallest_subnormal
    torch.set_flush_denormal(True)
    try:
        curve, loop = _loop(model, optimizer, trainable, inputs, sampler, steps, lr, parts, max_seconds, say)
    finally:
        torch.set_flush_denormal(False)  # the caller's process is left as it was
        torch.set_num_threads(caller_threads)
    checkpoint_name = name or (BASE_NAME if task is None else task.strip().replace(" ", "_"))
    instruction = task if task is not None else ""
    log = {
        "dataset": str(dataset_root), "repo_id": repo_id, "task": task, "name": checkpoint_name,
        "init": str(init) if init else None, "size": size if init is None else f"from {init}", "parts": parts,
        "steps": loop["steps"], "steps_requested": steps, "batch": batch, "lr": lr, "seed": seed,
        "frames": len(demos), "episodes": demos.episodes, "fps": demos.fps, "cameras": demos.cameras,
        "decode_s": round(demos.decode_s, 2), "train_s": round(loop["seconds"], 2),
        "total_s": round(time.perf_counter() - started, 2), "steps_per_s": round(loop["steps_per_s"], 3),
        "final_loss": loop["final_loss"], "loss_curve": curve, "loss_bucket_steps": LOSS_BUCKET,
        "actions": actions, "relative": list(relative) if relative is not None else None,
        "tasks": _per_task_stats(demos, config.chunk, relative),
    }
    _write_checkpoint(out, model, config, serving, checkpoint_name, instruction, inputs, log, overwrite)
    say(f"wrote {out} (final loss {loop['final_loss']:.4f}, {loop['steps']} steps in {loop['seconds']:.0f} s, "
        f"{loop['steps_per_s']:.2f} steps/s)")
    return TrainResult(out, loop["steps"], loop["seconds"], loop["steps_per_s"], loop["final_loss"], log)


def _check_init_actions(init: Path, relative: tuple[bool, ...] | None) -> None:
    """A fine-tune keeps its base's kind of actions: the base's weights learned to output one kind."""
    theirs = read_serving(init).relative
    if theirs != relative:
        def kind(flags: tuple[bool, ...] | None) -> str:
            return "absolute" if flags is None else f"relative {list(flags)}"

        raise TrainError(f"--init {init}: it was trained with {kind(theirs)} actions, this run would train "
                         f"{kind(relative)} actions; pass the same --actions as for {init}")


def _check_args(out: Path, init: Path | None, steps: int, batch: int, lr: float, parts: str, overwrite: bool,
                max_seconds: float | None, task: str | None) -> None:
    if steps < 1 or batch < 1 or not lr > 0:
        raise TrainError(f"steps, batch and lr must be positive (got {steps}, {batch}, {lr})")
    if max_seconds is not None and not max_seconds > 0:
        raise TrainError(f"max_seconds must be positive, got {max_seconds}")
    if parts not in ("all", "expert"):
        raise TrainError(f"parts must be 'all' or 'expert', got {parts!r}")
    if parts == "expert" and init is None:
        raise TrainError("training only the expert parts needs --init (the base to keep the rest from)")
    if task is not None and not task.strip():
        raise TrainError("--task must be a non-empty task string")
    if out.exists() and not overwrite:
        raise TrainError(f"{out} exists; pass --overwrite to replace it")
    if init is not None and not init.is_dir():
        raise TrainError(f"--init {init}: no such checkpoint directory")


def _init_architecture(init: Path) -> "MergeVLAConfig":
    from armada.runtime.model.mergevla import MergeVLAConfig

    path = init / ARCHITECTURE_FILE
    try:
        return MergeVLAConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise TrainError(f"--init {init}: no {ARCHITECTURE_FILE} (a checkpoint `armada model train` wrote has "
                         "one)") from None
    except (OSError, ValueError) as exc:
        raise TrainError(f"--init {path}: {exc}") from None


def _fit_init(config: "MergeVLAConfig", init: Path | None, dims: tuple[int, int, int],
              chunk: int | None) -> "MergeVLAConfig":
    action_dim, proprio_dim, num_images = dims
    wanted = {"action_dim": action_dim, "proprio_dim": proprio_dim, "num_images": num_images}
    if chunk is not None:
        wanted["chunk"] = chunk
    bad = [f"{k} {getattr(config, k)} there, {v} here" for k, v in wanted.items() if getattr(config, k) != v]
    if bad:
        raise TrainError(f"--init {init}: its architecture does not fit this dataset/setting: {'; '.join(bad)} "
                         "(num_images = cameras, action_dim/proprio_dim = the dataset's action/state sizes)")
    return dataclasses.replace(config, num_tasks=1)


def _trainable(model: Any, config: "MergeVLAConfig", parts: Parts) -> list["torch.nn.Parameter"]:
    if parts == "all":
        return [p for p in model.parameters() if p.requires_grad]
    keep = []
    for name, param in model.named_parameters():
        on = name.startswith("action_head.") and _expert_key(name.removeprefix("action_head."), config)
        param.requires_grad_(on)
        if on:
            keep.append(param)
    return keep


def _lr_at(fraction: float, step: int, lr: float) -> float:
    """Linear warmup, then cosine down to FINAL_LR_FRACTION of lr at fraction 1."""
    if step < WARMUP_STEPS:
        return lr * (step + 1) / WARMUP_STEPS
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))
    return lr * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)


def _loop(model: Any, optimizer: Any, trainable: list[Any], inputs: Inputs, sampler: Sampler, steps: int,
          lr: float, parts: Parts, max_seconds: float | None, say: Say) -> tuple[list[float], dict[str, Any]]:
    import torch

    started = time.perf_counter()
    last_report = started
    curve: list[float] = []
    bucket: list[float] = []
    recent: list[float] = []
    done = 0
    for step in range(steps):
        elapsed = time.perf_counter() - started
        fraction = max(step / steps, elapsed / max_seconds if max_seconds else 0.0)
        if max_seconds and elapsed >= max_seconds:
            say(f"time budget of {max_seconds:.0f} s reached after {step} steps")
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(fraction, step, lr)
        dino, siglip, ids, proprio, target = inputs.batch(sampler.next())
        predicted = model(dino, siglip, ids, proprio, frozen_vla=parts == "expert")
        loss = torch.nn.functional.l1_loss(predicted, target)
        if not torch.isfinite(loss):
            raise TrainError(f"the loss became {loss.item()} at step {step}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        value = float(loss.item())
        done = step + 1
        bucket.append(value)
        recent = (recent + [value])[-LOSS_BUCKET:]
        if len(bucket) == LOSS_BUCKET:
            curve.append(round(sum(bucket) / len(bucket), 5))
            bucket = []
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S or done == steps or done == 1:
            last_report = now
            say(_progress_line(done, steps, sum(recent) / len(recent), now - started, max_seconds))
    if bucket:
        curve.append(round(sum(bucket) / len(bucket), 5))
    seconds = time.perf_counter() - started
    final = sum(recent) / len(recent) if recent else float("nan")
    return curve, {"steps": done, "seconds": seconds, "steps_per_s": done / seconds if seconds > 0 else 0.0,
                   "final_loss": round(final, 5)}


def _progress_line(done: int, steps: int, loss: float, elapsed: float, max_seconds: float | None) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (steps - done) / rate if rate > 0 else float("inf")
    if max_seconds:
        eta = min(eta, max(0.0, max_seconds - elapsed))
    return (f"step {done}/{steps}  loss {loss:.4f}  {rate:.2f} steps/s  elapsed {elapsed:.0f} s  "
            f"ETA {eta:.0f} s")


def _per_task_stats(demos: Demos, chunk: int, relative: tuple[bool, ...] | None) -> dict[str, Any]:
    out = {}
    for i, instruction in enumerate(demos.instructions):
        rows = demos.instruction == i
        stats = action_stats(demos, np.flatnonzero(rows), chunk, relative)
        out[instruction] = {"episodes": demos.episodes.get(instruction, 0), "frames": int(rows.sum()),
                            "action_stats": stats.model_dump(exclude_none=True),
                            "proprio_stats": quantile_stats(demos.state[rows]).model_dump(exclude_none=True)}
    return out


# --------------------------------------------------------------------------- output


def _write_checkpoint(out: Path, model: Any, config: "MergeVLAConfig", serving: "Serving", name: str,
                      instruction: str, inputs: Inputs, log: dict[str, Any], overwrite: bool) -> None:
    """Everything into a sibling temporary folder, then one rename: a stopped run leaves no half checkpoint."""
    from safetensors.torch import save_file

    from armada.runtime.model.build import TASK_HEAD_FILE, TASK_JSON, TASK_PROPRIO_FILE, TASK_VLA_FILE
    from armada.runtime.model.mergevla import LM_HEAD_KEY

    def tensors(state: dict[str, Any]) -> dict[str, Any]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors({k: v for k, v in model.vla.state_dict().items() if k != LM_HEAD_KEY}), tmp / TASK_VLA_FILE)
        save_file(tensors(model.action_head.state_dict()), tmp / TASK_HEAD_FILE)
        save_file(tensors(model.proprio_projector.state_dict()), tmp / TASK_PROPRIO_FILE)
        task = {"name": name, "instruction": instruction,
                "action_stats": inputs.action_stats.model_dump(exclude_none=True),
                "proprio_stats": inputs.proprio_stats.model_dump(exclude_none=True)}
        _write_json(tmp / TASK_JSON, task)
        _write_json(tmp / ARCHITECTURE_FILE, config.to_dict())
        _write_json(tmp / SERVING_FILE, serving_to_dict(serving, inputs.demos))
        _write_json(tmp / LOG_FILE, log)
        if out.exists():
            if not overwrite:
                raise TrainError(f"{out} appeared while training; pass --overwrite to replace it")
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def serving_to_dict(serving: "Serving", demos: Demos | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "cameras": list(serving.cameras), "dt": serving.dt,
        "action_names": list(serving.action_names) if serving.action_names else None,
        # per action dimension: trained relative to the state (null: every dimension absolute)
        "relative": list(serving.relative) if serving.relative is not None else None,
        "prompt": serving.prompt.model_dump(),
    }
    if demos is not None:  # for people: what the numbers came from
        data["fps"] = demos.fps
        data["state_names"] = demos.state_names
    return data


def read_serving(directory: str | Path) -> "Serving":
    """The serving settings a training run wrote beside its checkpoint (``serving.json``) as a
    ``build.Serving``: cameras in the model's order, dt, action names, relative flags, prompt; preprocessing is the
    Serving default (resize to the model size, to_float, DINO and SigLIP normalization), which is
    what training ran."""
    from pydantic import ValidationError

    from armada.runtime.model.build import Serving
    from armada.runtime.model.bundle import PromptSpec

    path = Path(directory) / SERVING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(f"{path}: missing (a checkpoint `armada model train` wrote has one)") from None
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a JSON object")
    cameras, dt, names = data.get("cameras"), data.get("dt"), data.get("action_names")
    relative = data.get("relative")  # absent in checkpoints written before relative actions: absolute
    if not isinstance(cameras, list) or not cameras or not all(isinstance(c, str) and c for c in cameras):
        raise TrainError(f"{path}: 'cameras' must be a non-empty list of camera names")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise TrainError(f"{path}: 'dt' must be a positive number of seconds, got {dt!r}")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise TrainError(f"{path}: 'action_names' must be a list of strings or null")
    if relative is not None and not (isinstance(relative, list) and all(isinstance(f, bool) for f in relative)
                                     and (names is None or len(relative) == len(names))):
        raise TrainError(f"{path}: 'relative' must be null or one true/false per action dimension, got {relative!r}")
    try:
        prompt = PromptSpec.model_validate(data.get("prompt"))
    except ValidationError as exc:
        raise TrainError(f"{path}: 'prompt': {exc.errors()[0]['msg']}") from None
    return Serving(cameras=tuple(cameras), dt=float(dt), prompt=prompt,
                   action_names=tuple(names) if names is not None else None,
                   relative=tuple(relative) if relative is not None else None)
