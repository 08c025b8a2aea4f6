"""Build bundles from checkpoints: merge single-task fine-tunes, apply a CapVector, import MergeVLA.

Three ways to a bundle (file names and layout as in ``runtime.model.tiny``):

- ``merge_bundle``: a pretrained VLA plus M single-task checkpoint directories -> a "mergevla"
  bundle (task vectors, task arithmetic or TIES, TALL masks, MoE head with router subspaces,
  averaged proprio projector, per-task statistics).
- ``capvector_bundle``: theta = pretrained + alpha * (aux - std) over the VLA weights -> a
  "capvector" bundle: one model, one single-task head (layout below).
- ``import_mergevla``: a merged directory written by MergeVLA's ``mergy.py`` plus its separate
  pretrained-VLM directory -> a "mergevla" bundle (docs/mergevla-layout.md section 3).

Single-task checkpoint directory (``load_task_checkpoint``), either layout:
  armada:   vla.safetensors (section 1a keys), action_head.safetensors (single-task head, section
            1d first form), proprio_projector.safetensors (section 1c), task.json =
            {"name", "instruction", "action_stats": NormStats, "proprio_stats": NormStats | null}
  MergeVLA: model.safetensors (or HF shards with model.safetensors.index.json),
            action_head--checkpoint.pt, proprio_projector--checkpoint.pt (plain tensor dicts, DDP
            "module." prefix allowed), dataset_statistics.json with exactly one dataset key.

Bundle layouts written here:
  "mergevla":  BASE_FILE = theta_0 over every VLA key, except that ``action_queries.weight`` holds
               the tasks' average (real weights, as MergeVLA stores them, not a delta);
               TAU_FILE = tau_merge over every VLA key, zeros where no task differs from theta_0
               and for ``action_queries.weight`` (as MergeVLA stores them; TorchEngine materializes
               exactly the TAU_FILE keys, so it needs them all);
               MASK_FILE = mask_key(m, key) for every task m and every key with a nonzero
               tau_merge (none for the zero keys: theta_0 + 0 needs no mask; none at all for an
               import without tall_masks.pt: every task then gets the full tau_merge);
               HEAD_FILE = merged MoE head; PROPRIO_FILE = averaged projector.
  "capvector": BASE_FILE = the final VLA weights theta; HEAD_FILE = a single-task head
               (``ActionHead`` keys, no experts, no routers, no router_layer_idx);
               PROPRIO_FILE. No TAU_FILE, no MASK_FILE, no router, exactly one task (expert 0),
               architecture.num_tasks = 1. What an engine must do to run it: build
               ``PrismaticVLA`` + ``ProprioProjector`` + ``ActionHead`` (not ``MergedActionHead``),
               load BASE_FILE once, never materialize, and call the head without an expert index.

Memory: VLA weights are read key by key from safetensors (``SafetensorsWeights``), so merging M
real (2.5 GB) checkpoints holds the outputs (base, tau_merge, M byte masks) plus one key's
temporaries, not M + 1 full models.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from torch import Tensor

from armada.runtime.model import merge
from armada.runtime.model.bundle import (
    ActionSpec, BundleError, CenterCrop, JpegRoundtrip, Manifest, NormStats, Normalize, ObservationSpec,
    PreprocessStep, PromptSpec, Resize, Rotate180, RouterSpec, TaskSpec, ToFloat, mask_key, write_bundle,
)
from armada.runtime.model.mergevla import (
    EMBED_KEY, LM_HEAD_KEY, ActionHead, MergeVLAConfig, MergeVLAModel, StateDictMismatch, check_state_dict,
    strip_ddp_prefix,
)
from armada.runtime.model.tiny import BASE_FILE, DINO_NORM, HEAD_FILE, MASK_FILE, PROPRIO_FILE, SIGLIP_NORM, TAU_FILE

# progress(stage, done, total): called after each unit of a long step (a key, a file, a byte block).
Progress = Callable[[str, int, int], None]
Method = Literal["ta", "ties"]
Normalization = Literal["quantile", "minmax"]

# VLA keys that hold real weights in a merged model, averaged over the tasks, never a task vector
# (MergeVLA: the pretrained VLM's action queries are zeros, mergy.py:309-313, 321-328).
AVERAGED_KEYS = ("action_queries.weight",)

# Armada single-task checkpoint files.
TASK_VLA_FILE, TASK_HEAD_FILE = "vla.safetensors", "action_head.safetensors"
TASK_PROPRIO_FILE, TASK_JSON = "proprio_projector.safetensors", "task.json"
# MergeVLA files (per-task runs and merged directories).
MV_MODEL_FILE, MV_INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
MV_HEAD_FILE, MV_PROPRIO_FILE = "action_head--checkpoint.pt", "proprio_projector--checkpoint.pt"
MV_STATS_FILE, MV_TASK2IDX_FILE, MV_MASKS_FILE = "dataset_statistics.json", "task2idx.pt", "tall_masks.pt"
NO_NOOPS = "_no_noops"

PLAIN_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
# docs/mergevla-layout.md section 5; "<|im_start|>" is carried by PromptSpec.bos_id (see Serving.libero).
QWEN_TEMPLATE = ("system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nWhat action should the robot take to {instruction}?<|im_end|>\n"
                 "<|im_start|>assistant\n")


class BuildError(ValueError):
    """A checkpoint that cannot be turned into a bundle; the message names the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def _say(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _merge_progress(progress: Progress | None, stage: str) -> merge.Progress | None:
    """merge.py reports (done, total, key); ours is (stage, done, total)."""
    if progress is None:
        return None
    return lambda done, total, _key: progress(stage, done, total)


# --------------------------------------------------------------------------- serving settings


@dataclass(frozen=True)
class Serving:
    """What a bundle states besides weights and statistics: cameras, timing, preprocessing, prompt.

    ``preprocessing`` None: for every camera, resize to the model's image size (bicubic, as
    the HF processor), to_float, then the DINO and SigLIP normalizations.
    ``tokenizer_file``: a local tokenizer.json copied into the bundle as ``prompt.tokenizer``
    (required unless the prompt uses the "bytes" test tokenizer).
    """

    cameras: tuple[str, ...] = ("primary", "wrist")  # in the model's image order
    dt: float = 0.05  # seconds between consecutive actions of a chunk
    preprocessing: Mapping[str, Sequence[PreprocessStep]] | None = None
    prompt: PromptSpec = field(default_factory=lambda: PromptSpec(template=PLAIN_TEMPLATE))
    tokenizer_file: Path | None = None
    action_names: tuple[str, ...] | None = None
    # Per action dimension: trained as target minus the state at the chunk's start (the manifest's
    # action.relative; the policy adds the state back). None: every dimension absolute.
    relative: tuple[bool, ...] | None = None
    router_temperature: float = 1.0
    router_min_margin: float = 0.0

    @classmethod
    def libero(cls, tokenizer_file: str | Path) -> "Serving":
        """MergeVLA's LIBERO evaluation (docs/mergevla-layout.md section 5): both cameras rotated
        180 degrees, JPEG round trip (TF's default quality 95), Lanczos to 224, center crop of 0.9
        of the area, the Qwen chat prompt, 20 Hz.

        The reference sends no BOS token; PromptSpec always prepends ``bos_id``, so the template
        starts after "<|im_start|>" and ``bos_id`` is that token's id, read from the tokenizer file.
        The ids are then exactly the reference's."""
        tokenizer_file = Path(tokenizer_file)
        steps: list[PreprocessStep] = [
            Rotate180(), JpegRoundtrip(quality=95), Resize(size=224, interpolation="lanczos"),
            CenterCrop(area_fraction=0.9, interpolation="bilinear"), ToFloat(),
            Normalize(mean=DINO_NORM[0], std=DINO_NORM[1], target="dino"),
            Normalize(mean=SIGLIP_NORM[0], std=SIGLIP_NORM[1], target="siglip"),
        ]
        prompt = PromptSpec(template=QWEN_TEMPLATE, tokenizer="tokenizer.json",
                            bos_id=_special_token_id(tokenizer_file, "<|im_start|>"))
        return cls(cameras=("primary", "wrist"), dt=0.05, preprocessing={"primary": steps, "wrist": steps},
                   prompt=prompt, tokenizer_file=tokenizer_file)


def _special_token_id(tokenizer_file: Path, content: str) -> int:
    data = _read_json(tokenizer_file)
    for token in data.get("added_tokens", []) if isinstance(data, dict) else []:
        if isinstance(token, dict) and token.get("content") == content and isinstance(token.get("id"), int):
            return token["id"]
    raise BuildError(tokenizer_file, f"no added token {content!r} (expected a Qwen2 tokenizer.json)")


def serving_preprocessing(serving: Serving, image_size: int) -> dict[str, list[PreprocessStep]]:
    if serving.preprocessing is not None:
        return {camera: list(steps) for camera, steps in serving.preprocessing.items()}
    steps: list[PreprocessStep] = [
        Resize(size=image_size, interpolation="bicubic"), ToFloat(),
        Normalize(mean=DINO_NORM[0], std=DINO_NORM[1], target="dino"),
        Normalize(mean=SIGLIP_NORM[0], std=SIGLIP_NORM[1], target="siglip"),
    ]
    return {camera: list(steps) for camera in serving.cameras}


def _extra_files(serving: Serving) -> dict[str, bytes]:
    if serving.prompt.tokenizer == "bytes":
        return {}
    if serving.tokenizer_file is None:
        raise BuildError(serving.prompt.tokenizer, "the prompt names a tokenizer file but Serving.tokenizer_file "
                         "is not set: give the local tokenizer.json to copy into the bundle")
    try:
        return {serving.prompt.tokenizer: Path(serving.tokenizer_file).read_bytes()}
    except OSError as exc:
        raise BuildError(serving.tokenizer_file, f"cannot read the tokenizer: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- reading files


class SafetensorsWeights(Mapping[str, Tensor]):
    """A state dict read lazily from one or more safetensors files: each access reads one tensor
    (memory-mapped), so iterating a 2.5 GB checkpoint never holds it whole."""

    def __init__(self, files: Mapping[str, Path], source: Path):
        self._files = dict(files)  # key -> file
        self.source = source  # for error messages: the file or index the keys came from

    @classmethod
    def open(cls, path: Path) -> "SafetensorsWeights":
        return cls({key: path for key in _safetensors_keys(path)}, path)

    def __getitem__(self, key: str) -> Tensor:
        with safe_open(self._files[key], framework="pt") as reader:
            return reader.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self._files[key], framework="pt") as reader:
            return tuple(reader.get_slice(key).get_shape())

    def without(self, key: str) -> "SafetensorsWeights":
        return SafetensorsWeights({k: f for k, f in self._files.items() if k != key}, self.source)


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as reader:
            return list(reader.keys())
    except (SafetensorError, OSError) as exc:
        raise BuildError(path, f"not a readable safetensors file: {exc}") from None


def load_safetensors(path: Path) -> dict[str, Tensor]:
    """A small safetensors file (head, projector) fully in memory."""
    weights = SafetensorsWeights.open(path)
    return {key: weights[key] for key in weights}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BuildError(path, f"cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(path, f"not valid JSON: {exc}") from None


def _sharded(index: Path) -> SafetensorsWeights:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BuildError(index, "no 'weight_map' object: not a safetensors shard index")
    files: dict[str, Path] = {}
    for key, name in weight_map.items():
        shard = index.parent / str(name)
        if Path(str(name)).name != name or not shard.is_file():
            raise BuildError(index, f"{key!r} is in shard {name!r}, which is not a file next to the index")
        files[key] = shard
    for shard in set(files.values()):
        stored = set(_safetensors_keys(shard))
        missing = sorted(k for k, f in files.items() if f == shard and k not in stored)
        if missing:
            raise BuildError(shard, f"lacks keys the index puts there: {missing[:5]}")
    return SafetensorsWeights(files, index)


def load_vla(directory: str | Path) -> SafetensorsWeights:
    """The VLA weights of a directory (section 1a keys), lazily: ``vla.safetensors``,
    ``model.safetensors`` or HF shards (``model.safetensors.index.json``). A tied
    ``language_model.lm_head.weight`` is dropped (it must equal the embedding)."""
    directory = Path(directory)
    for name in (TASK_VLA_FILE, MV_MODEL_FILE):
        if (directory / name).is_file():
            return _untie(SafetensorsWeights.open(directory / name))
    if (directory / MV_INDEX_FILE).is_file():
        return _untie(_sharded(directory / MV_INDEX_FILE))
    raise BuildError(directory, f"no VLA weights: expected {TASK_VLA_FILE}, {MV_MODEL_FILE} or {MV_INDEX_FILE}; "
                     f"found {_listing(directory)}")


def _untie(weights: SafetensorsWeights) -> SafetensorsWeights:
    if LM_HEAD_KEY not in weights:
        return weights
    if EMBED_KEY not in weights or not torch.equal(weights[LM_HEAD_KEY].to(weights[EMBED_KEY].dtype),
                                                   weights[EMBED_KEY]):
        raise BuildError(weights.source, f"{LM_HEAD_KEY} is tied to {EMBED_KEY} in this architecture but differs "
                         "from it")
    return weights.without(LM_HEAD_KEY)


def _listing(directory: Path, limit: int = 12) -> str:
    if not directory.is_dir():
        return "no such directory"
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "") or "nothing"


def _task_suite_member(value: Any) -> str:
    """Stands in for MergeVLA's ``__main__.TaskSuite`` (a str Enum) when unpickling: an enum
    member is pickled as TaskSuite(value), so this turns each member into its string value."""
    if type(value) is not str:
        raise pickle.UnpicklingError(f"__main__.TaskSuite member with a non-string value {value!r}")
    return value


def load_torch_pickle(path: str | Path) -> Any:
    """A ``torch.save`` file holding only tensors, plain containers and ``__main__.TaskSuite`` members
    (returned as their string values), loaded without running anything from the file.

    Why not pickle or ``torch.load(weights_only=False)``: unpickling calls whatever callable the
    file names (one REDUCE of ``os.system`` is enough), and these files come from downloads.
    torch's weights-only unpickler builds only tensors and plain containers and refuses every
    other global before calling it. The one name added here is ``__main__.TaskSuite``, mapped to
    ``_task_suite_member``: MergeVLA ran ``mergy.py`` as a script, so its enum pickled under
    ``__main__``; we neither import that script nor define a class of that name."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([(_task_suite_member, "__main__.TaskSuite")]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BuildError(path, f"refused to unpickle: {_unpickling_reason(exc)}. Only tensors, plain containers "
                         "and __main__.TaskSuite members are accepted; nothing in the file was run") from None
    except FileNotFoundError:
        raise BuildError(path, "missing") from None
    except Exception as exc:  # a damaged file fails anywhere in the unpickler (struct.error, EOFError, ...)
        raise BuildError(path, f"not a readable torch.save file: {type(exc).__name__}: {exc}") from None


# torch wraps the reason in advice (including "allowlist it with add_safe_globals"); keep the reason.
_REFUSAL = re.compile(r"WeightsUnpickler error: [^\n]*|Unsupported global: GLOBAL \S+|"
                      r"unsupported GLOBAL \S+ whose module \S+ is blocked|"
                      r"Trying to call reduce for unrecognized function[^\n]*|Can only create new object[^\n]*")


def _unpickling_reason(exc: Exception) -> str:
    text = str(exc).strip()
    match = _REFUSAL.search(text)
    if match is None:
        return text.splitlines()[-1] if text else type(exc).__name__
    reason = match.group(0).removeprefix("WeightsUnpickler error: ")
    return re.split(r"\.? Please use", reason)[0].rstrip(".")


def load_tensor_dict(path: str | Path) -> dict[str, Tensor]:
    """A torch.save'd ``{name: tensor}`` (a head or projector), DDP ``module.`` prefix stripped."""
    path = Path(path)
    data = load_torch_pickle(path)
    if not isinstance(data, dict):
        raise BuildError(path, f"expected a dict of tensors, got {type(data).__name__}")
    bad = [repr(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise BuildError(path, f"expected a dict of tensors; these entries are not str -> tensor: {bad[:5]}")
    return strip_ddp_prefix(data)


# --------------------------------------------------------------------------- statistics


def stats_from_dataset_entry(entry: Any, where: str, normalization: Normalization = "quantile"
                             ) -> tuple[NormStats, NormStats | None]:
    """Action and proprio NormStats from one ``dataset_statistics.json`` entry (``action``/``proprio``
    with q01/q99 or min/max; ``action.mask`` optional, default all true; proprio has no mask and
    is normalized in every dimension, as openvla's normalize_proprio does)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("action"), dict):
        raise BuildError(where, "expected an object with an 'action' statistics object")
    action = _norm_stats(entry["action"], f"{where}.action", normalization, use_mask=True)
    proprio = entry.get("proprio")
    if proprio is None:
        return action, None
    return action, _norm_stats(proprio, f"{where}.proprio", normalization, use_mask=False)


def _norm_stats(values: Any, where: str, normalization: Normalization, use_mask: bool) -> NormStats:
    lo_name, hi_name = ("q01", "q99") if normalization == "quantile" else ("min", "max")
    if not isinstance(values, dict) or lo_name not in values or hi_name not in values:
        raise BuildError(where, f"needs {lo_name!r} and {hi_name!r} for {normalization} normalization")
    lo, hi = values[lo_name], values[hi_name]
    mask = values.get("mask") if use_mask else None
    mask = [True] * len(lo) if mask is None else mask
    try:
        return NormStats.model_validate({"kind": normalization, lo_name: lo, hi_name: hi, "mask": mask})
    except ValidationError as exc:
        raise BuildError(where, f"invalid statistics: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    inner = err.get("ctx", {}).get("error")
    key = ".".join(str(p) for p in err["loc"]) or getattr(inner, "key", "")
    reason = getattr(inner, "reason", None) or err["msg"].removeprefix("Value error, ")
    return f"{key}: {reason}" if key else reason


# --------------------------------------------------------------------------- task checkpoints


@dataclass
class TaskCheckpoint:
    """One fine-tuned single-task model. ``vla`` is lazy (read key by key); head and projector are
    small and in memory."""

    directory: Path
    layout: Literal["armada", "mergevla"]
    name: str
    instruction: str
    vla: SafetensorsWeights
    action_head: dict[str, Tensor]
    proprio: dict[str, Tensor]
    action_stats: NormStats
    proprio_stats: NormStats | None


def load_task_checkpoint(directory: str | Path, normalization: Normalization = "quantile") -> TaskCheckpoint:
    """Read a single-task checkpoint directory, armada or MergeVLA layout (see the module doc).
    ``normalization`` applies to the MergeVLA layout only (q01/q99 for LIBERO, min/max for SO-101)."""
    directory = Path(directory)
    if (directory / TASK_JSON).is_file():
        return _load_armada_task(directory)
    if (directory / MV_STATS_FILE).is_file():
        return _load_mergevla_task(directory, normalization)
    raise BuildError(directory, f"not a task checkpoint: expected {TASK_JSON} (armada layout) or {MV_STATS_FILE} "
                     f"(MergeVLA layout); found {_listing(directory)}")


def _load_armada_task(directory: Path) -> TaskCheckpoint:
    info = _read_json(directory / TASK_JSON)
    where = directory / TASK_JSON
    if not isinstance(info, dict):
        raise BuildError(where, "expected a JSON object")
    unknown = sorted(set(info) - {"name", "instruction", "action_stats", "proprio_stats"})
    if unknown:
        raise BuildError(where, f"unknown keys {unknown}")
    for key in ("name", "instruction"):
        if not isinstance(info.get(key), str) or (key == "name" and not info[key]):
            raise BuildError(where, f"{key!r} must be a{' non-empty' if key == 'name' else ''} string")
    action_stats = _parse_stats(info.get("action_stats"), where, "action_stats")
    proprio_raw = info.get("proprio_stats")
    proprio_stats = None if proprio_raw is None else _parse_stats(proprio_raw, where, "proprio_stats")
    for name in (TASK_VLA_FILE, TASK_HEAD_FILE, TASK_PROPRIO_FILE):
        if not (directory / name).is_file():
            raise BuildError(directory / name, "missing (an armada task checkpoint needs vla.safetensors, "
                             "action_head.safetensors, proprio_projector.safetensors and task.json)")
    return TaskCheckpoint(directory, "armada", info["name"], info["instruction"], load_vla(directory),
                          load_safetensors(directory / TASK_HEAD_FILE), load_safetensors(directory / TASK_PROPRIO_FILE),
                          action_stats, proprio_stats)


def _parse_stats(data: Any, where: Path, key: str) -> NormStats:
    try:
        return NormStats.model_validate(data)
    except ValidationError as exc:
        raise BuildError(where, f"{key}: {_first_error(exc)}") from None


def _load_mergevla_task(directory: Path, normalization: Normalization) -> TaskCheckpoint:
    statistics = _read_json(directory / MV_STATS_FILE)
    if not isinstance(statistics, dict) or len(statistics) != 1:
        found = sorted(statistics) if isinstance(statistics, dict) else type(statistics).__name__
        raise BuildError(directory / MV_STATS_FILE, f"a single-task checkpoint needs exactly one dataset key, "
                         f"found {found}")
    (key, entry), = statistics.items()
    action_stats, proprio_stats = stats_from_dataset_entry(entry, f"{directory / MV_STATS_FILE}: {key}",
                                                           normalization)
    name = key.removesuffix(NO_NOOPS)
    head = load_tensor_dict(_one_checkpoint(directory, "action_head"))
    proprio = load_tensor_dict(_one_checkpoint(directory, "proprio_projector"))
    return TaskCheckpoint(directory, "mergevla", name, name.replace("_", " "), load_vla(directory), head, proprio,
                          action_stats, proprio_stats)


def _one_checkpoint(directory: Path, prefix: str) -> Path:
    """``<prefix>--checkpoint.pt``, else the single ``<prefix>--*checkpoint.pt`` (e.g. with a step)."""
    exact = directory / f"{prefix}--checkpoint.pt"
    if exact.is_file():
        return exact
    found = sorted(directory.glob(f"{prefix}--*checkpoint.pt"))
    if len(found) != 1:
        raise BuildError(directory, f"expected one {prefix}--checkpoint.pt, found "
                         f"{[p.name for p in found] or 'none'}")
    return found[0]


# --------------------------------------------------------------------------- architecture checks


@dataclass(frozen=True)
class _Reference:
    """Key -> shape of every checkpoint part for one architecture (built on the meta device: no memory)."""

    vla: dict[str, torch.Size]
    merged_head: dict[str, torch.Size]
    single_head: dict[str, torch.Size]
    proprio: dict[str, torch.Size]


def _reference(config: MergeVLAConfig) -> _Reference:
    with torch.device("meta"):
        model = MergeVLAModel(config)
        single = ActionHead(config)

    def shapes(state: Mapping[str, Tensor]) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in state.items()}

    return _Reference(shapes(model.vla_state_dict()), shapes(model.action_head_state_dict()),
                      shapes(single.state_dict()), shapes(model.proprio_state_dict()))


def _check_shapes(expected: Mapping[str, torch.Size], given: Mapping[str, Tensor] | SafetensorsWeights,
                  where: str | Path, what: str) -> None:
    """Every key present with the architecture's shape (``given`` tensors are not read: shapes only)."""
    if isinstance(given, SafetensorsWeights):
        meta = {k: torch.empty(given.shape(k), device="meta") for k in given}
    else:
        meta = {k: torch.empty(v.shape, device="meta") for k, v in given.items()}
    try:
        check_state_dict({k: torch.empty(s, device="meta") for k, s in expected.items()}, meta, what)
    except StateDictMismatch as exc:
        raise BuildError(where, f"{exc} (does the 'architecture' argument fit this checkpoint?)") from None


def _check_router_layer(head: Mapping[str, Tensor], config: MergeVLAConfig, where: str | Path) -> None:
    stored = int(head["model.router_layer_idx"])
    if stored != config.router_layer_idx:
        raise BuildError(where, f"model.router_layer_idx is {stored}, the architecture expects "
                         f"{config.router_layer_idx} (llm.layers - 2)")


def _check_task(task: TaskCheckpoint, reference: _Reference) -> None:
    _check_shapes(reference.vla, task.vla, task.vla.source, "VLA")
    head_file = task.directory / (TASK_HEAD_FILE if task.layout == "armada" else MV_HEAD_FILE)
    _check_shapes(reference.single_head, task.action_head, head_file, "single-task action head")
    proprio_file = task.directory / (TASK_PROPRIO_FILE if task.layout == "armada" else MV_PROPRIO_FILE)
    _check_shapes(reference.proprio, task.proprio, proprio_file, "proprio projector")


# --------------------------------------------------------------------------- manifests and writing


def _task_spec(index: int, name: str, instruction: str, action: NormStats, proprio: NormStats | None,
               config: MergeVLAConfig, where: str | Path) -> TaskSpec:
    if action.dim != config.action_dim:
        raise BuildError(where, f"task {name!r}: action statistics have {action.dim} dimensions, the "
                         f"architecture's action_dim is {config.action_dim}")
    if proprio is None:
        raise BuildError(where, f"task {name!r}: no proprio statistics, but the model has a proprio projector "
                         f"(proprio_dim {config.proprio_dim})")
    if proprio.dim != config.proprio_dim:
        raise BuildError(where, f"task {name!r}: proprio statistics have {proprio.dim} dimensions, the "
                         f"architecture's proprio_dim is {config.proprio_dim}")
    return TaskSpec(name=name, instruction=instruction, expert_index=index, action_stats=action,
                    proprio_stats=proprio)


def _manifest(kind: Literal["mergevla", "capvector"], config: MergeVLAConfig, tasks: list[TaskSpec],
              serving: Serving, out: Path) -> Manifest:
    if len(serving.cameras) != config.num_images:
        raise BuildError(out, f"serving has {len(serving.cameras)} cameras {list(serving.cameras)}, the "
                         f"architecture takes {config.num_images} images")
    router = None
    if kind == "mergevla" and len(tasks) > 1:
        router = RouterSpec(k=config.router_k, layer=config.router_layer_idx,
                            temperature=serving.router_temperature, min_margin=serving.router_min_margin)
    try:
        return Manifest(
            kind=kind,
            architecture=config.to_dict(),
            tasks=tasks,
            action=ActionSpec(dim=config.action_dim, chunk=config.chunk, dt=serving.dt,
                              names=list(serving.action_names) if serving.action_names else None,
                              relative=list(serving.relative) if serving.relative is not None else None),
            observation=ObservationSpec(cameras=list(serving.cameras), image_size=config.image_size,
                                        proprio_dim=config.proprio_dim),
            preprocessing=serving_preprocessing(serving, config.image_size),
            router=router,
            prompt=serving.prompt,
        )
    except ValidationError as exc:
        raise BuildError(out, f"the bundle manifest would be invalid: {_first_error(exc)}") from None


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU numpy copy; bf16 becomes an ml_dtypes bfloat16 array (stored as BF16), 0-d stays 0-d."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def _numpy(state: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in state.items()}


def _write(out: Path, manifest: Manifest, files: dict[str, dict[str, np.ndarray]], serving: Serving,
           overwrite: bool, progress: Progress | None) -> Manifest:
    extra = _extra_files(serving)
    try:
        return write_bundle(out, manifest, files, progress=lambda done, total: _say(progress, "checksums", done, total),
                            overwrite=overwrite, extra_files=extra)
    except BundleError as exc:
        raise BuildError(exc.file, f"{exc.key}: {exc.reason}" if exc.key else exc.reason) from None


# --------------------------------------------------------------------------- merge_bundle


@dataclass
class _MergedVLA:
    base: dict[str, np.ndarray]
    tau: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]  # mask_key(m, key) -> bool


def _merge_key(theta_0: Tensor, thetas: list[Tensor], method: Method, lam: float,
               top_k: float) -> tuple[Tensor, list[Tensor]]:
    """tau_merge and the TALL masks for one key (one-key dicts through the merge module)."""
    taus = merge.task_vectors({"k": theta_0}, [{"k": t} for t in thetas])
    if method == "ta":
        tau_merge = merge.task_arithmetic(taus)
    else:
        tau_merge = merge.ties_merge(taus, top_k_fraction=top_k)
    masks = merge.tall_masks(taus, tau_merge, lam)
    return tau_merge["k"], [mask["k"] for mask in masks]


def _merge_vla(base: SafetensorsWeights, tasks: list[TaskCheckpoint], method: Method, lam: float, top_k: float,
               progress: Progress | None) -> _MergedVLA:
    out = _MergedVLA({}, {}, {})
    total = len(base)
    for done, key in enumerate(base, start=1):
        theta_0 = base[key]
        thetas = [task.vla[key] for task in tasks]
        try:
            if key in AVERAGED_KEYS:
                out.base[key] = to_numpy(merge.average_heads([{key: t} for t in thetas])[key])
                out.tau[key] = to_numpy(torch.zeros_like(theta_0))
            elif all(t.dtype == theta_0.dtype and torch.equal(t, theta_0) for t in thetas):
                out.base[key] = to_numpy(theta_0)  # no task changed it: a zero task vector, no mask
                out.tau[key] = to_numpy(torch.zeros_like(theta_0))
            else:
                tau_merge, masks = _merge_key(theta_0, thetas, method, lam, top_k)
                out.base[key] = to_numpy(theta_0)
                out.tau[key] = to_numpy(tau_merge)
                for m, mask in enumerate(masks):
                    out.masks[mask_key(m, key)] = mask.numpy()
        except merge.MergeError as exc:
            raise BuildError(base.source, f"{key}: cannot merge with the task checkpoints "
                             f"{[str(t.directory) for t in tasks]}: {exc}") from None
        _say(progress, "task vectors, merge, TALL masks", done, total)
    return out


def merge_bundle(base_dir: str | Path, task_dirs: Sequence[str | Path], out: str | Path, method: Method = "ta",
                 lam: float = 0.6, top_k: float = 0.2, *, architecture: MergeVLAConfig,
                 serving: Serving | None = None, overwrite: bool = False,
                 progress: Progress | None = None) -> Manifest:
    """Merge M single-task checkpoints over a pretrained VLA into a "mergevla" bundle.

    - tau_m = theta_m - theta_0; tau_merge = sum_m tau_m (``method="ta"``) or TIES (trim to the
      ``top_k`` fraction per tensor, elect signs, disjoint mean); S_m = |tau_m| > lam |tau_merge - tau_m|;
    - ``action_queries.weight``: the tasks' average, stored in the base (not a task vector);
    - heads: ``merge.build_moe_head`` (shared blocks and stem averaged, the last block, layer_norm2
      and fc2 per expert, router subspaces of block ``architecture.router_layer_idx`` with
      k = ``architecture.router_k``); proprio projectors averaged; each task keeps its statistics.
    Expert m is ``task_dirs[m]``. ``architecture.num_tasks`` is set to M.
    """
    if method not in ("ta", "ties"):
        raise BuildError(out, f"method must be 'ta' or 'ties', got {method!r}")
    if not task_dirs:
        raise BuildError(out, "need at least one task checkpoint directory")
    out, serving = Path(out), serving or Serving()
    config = dataclasses.replace(architecture, num_tasks=len(task_dirs))
    reference = _reference(config)
    base = load_vla(base_dir)
    _check_shapes(reference.vla, base, base.source, "VLA")
    tasks = [load_task_checkpoint(d) for d in task_dirs]
    for task in tasks:
        _check_task(task, reference)
    specs = [_task_spec(m, t.name, t.instruction, t.action_stats, t.proprio_stats, config, t.directory)
             for m, t in enumerate(tasks)]
    manifest = _manifest("mergevla", config, specs, serving, out)  # fail before the long part

    vla = _merge_vla(base, tasks, method, lam, top_k, progress)
    head = _moe_head(tasks, config, progress)
    _check_shapes(reference.merged_head, head, out, "merged action head")
    proprio = merge.average_heads([t.proprio for t in tasks], progress=_merge_progress(progress, "proprio"))
    files = {BASE_FILE: vla.base, TAU_FILE: vla.tau, MASK_FILE: vla.masks, HEAD_FILE: _numpy(head),
             PROPRIO_FILE: _numpy(proprio)}
    return _write(out, manifest, files, serving, overwrite, progress)


def _moe_head(tasks: list[TaskCheckpoint], config: MergeVLAConfig, progress: Progress | None) -> dict[str, Tensor]:
    try:
        return merge.build_moe_head([t.action_head for t in tasks], expert_blocks=1, router_k=config.router_k,
                                    router_layer=config.router_layer_idx,
                                    progress=_merge_progress(progress, "action heads"))
    except merge.MergeError as exc:
        dirs = ", ".join(str(t.directory) for t in tasks)
        raise BuildError(dirs, f"cannot merge the action heads (heads[m] = task m): {exc}") from None


# --------------------------------------------------------------------------- capvector_bundle


def capvector_bundle(pretrained_dir: str | Path, aux_dir: str | Path, std_dir: str | Path, alpha: float,
                     out: str | Path, *, architecture: MergeVLAConfig, head_dir: str | Path | None = None,
                     serving: Serving | None = None, overwrite: bool = False,
                     progress: Progress | None = None) -> Manifest:
    """A "capvector" bundle: theta = pretrained + alpha * (aux - std) over every VLA key.

    ``pretrained_dir``, ``aux_dir`` and ``std_dir`` need VLA weights only (``load_vla``). The head,
    the proprio projector, the task name, instruction and statistics come from the task checkpoint
    ``head_dir`` (default ``aux_dir``): a capability vector changes the VLA only, so the bundle
    needs one fine-tune's head to act. Layout: see the module doc.
    """
    out, serving = Path(out), serving or Serving()
    config = dataclasses.replace(architecture, num_tasks=1)
    reference = _reference(config)
    weights = {name: load_vla(d) for name, d in (("pretrained", pretrained_dir), ("aux", aux_dir), ("std", std_dir))}
    for vla in weights.values():
        _check_shapes(reference.vla, vla, vla.source, "VLA")
    task = load_task_checkpoint(head_dir if head_dir is not None else aux_dir)
    _check_task(task, reference)
    spec = _task_spec(0, task.name, task.instruction, task.action_stats, task.proprio_stats, config, task.directory)
    manifest = _manifest("capvector", config, [spec], serving, out)
    try:
        theta = merge.capvector(weights["pretrained"], weights["aux"], weights["std"], alpha,
                                progress=_merge_progress(progress, "capability vector"))
    except merge.MergeError as exc:
        raise BuildError(weights["pretrained"].source, f"cannot apply the capability vector: {exc}") from None
    files = {BASE_FILE: _numpy(theta), HEAD_FILE: _numpy(task.action_head), PROPRIO_FILE: _numpy(task.proprio)}
    return _write(out, manifest, files, serving, overwrite, progress)


# --------------------------------------------------------------------------- import_mergevla


def read_task_order(path: Path) -> list[str]:
    """Task names by expert index from ``task2idx.pt`` ({TaskSuite member: int})."""
    data = load_torch_pickle(path)
    if not isinstance(data, dict) or not data:
        raise BuildError(path, f"expected a non-empty {{task: index}} dict, got {type(data).__name__}")
    bad = [f"{k!r}: {v!r}" for k, v in data.items() if not isinstance(k, str) or type(v) is not int]
    if bad:
        raise BuildError(path, f"expected task name -> int entries, got {bad[:5]}")
    if sorted(data.values()) != list(range(len(data))):
        raise BuildError(path, f"indices must be 0..{len(data) - 1}, each once; got {sorted(data.values())}")
    return sorted(data, key=data.__getitem__)


def read_tall_masks(path: Path, order: list[str], shapes: Mapping[str, torch.Size]) -> dict[str, dict[str, Tensor]]:
    """``tall_masks.pt`` ({TaskSuite: {param: dense bool tensor}}) -> {task name: {param: mask}}, checked
    against the task order and the VLA's parameter shapes."""
    data = load_torch_pickle(path)
    if not isinstance(data, dict) or set(data) != set(order):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise BuildError(path, f"expected masks for exactly the tasks of {MV_TASK2IDX_FILE} {order}, got {found}")
    for task, masks in data.items():
        if not isinstance(masks, dict):
            raise BuildError(path, f"{task}: expected {{parameter: bool tensor}}, got {type(masks).__name__}")
        for key, mask in masks.items():
            if key not in shapes:
                raise BuildError(path, f"{task}: mask for {key!r}, which is not a VLA parameter")
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != shapes[key]:
                got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise BuildError(path, f"{task}: {key}: expected a bool tensor of shape {list(shapes[key])}, got "
                                 f"{got} (EMR rescalers are not supported)")
    return data


def _dataset_stats(statistics: Any, name: str, path: Path, normalization: Normalization
                   ) -> tuple[NormStats, NormStats | None]:
    """A task's entry: the task name itself, else name + "_no_noops" (run_libero_eval check_unnorm_key)."""
    if not isinstance(statistics, dict):
        raise BuildError(path, f"expected an object keyed by dataset name, got {type(statistics).__name__}")
    for key in (name, name + NO_NOOPS):
        if key in statistics:
            return stats_from_dataset_entry(statistics[key], f"{path}: {key}", normalization)
    raise BuildError(path, f"no statistics for task {name!r} (tried {name!r} and {name + NO_NOOPS!r}); "
                     f"have {sorted(statistics)}")


def _import_vla(merged: SafetensorsWeights, base: SafetensorsWeights, masks: Mapping[str, Mapping[str, Tensor]] | None,
                order: list[str], progress: Progress | None) -> _MergedVLA:
    out = _MergedVLA({}, {}, {})
    total = len(base)
    for done, key in enumerate(base, start=1):
        stored = merged[key]
        if key in AVERAGED_KEYS:
            out.base[key] = to_numpy(stored)  # real weights in the merged file, not a delta
            out.tau[key] = to_numpy(torch.zeros_like(stored))
        else:
            out.base[key] = to_numpy(base[key])
            out.tau[key] = to_numpy(stored)
            if bool(stored.ne(0).any()):  # all zeros: an excluded (identical) key, no mask needed
                for m, task in enumerate(order):
                    if masks is not None and key in masks[task]:
                        out.masks[mask_key(m, key)] = masks[task][key].numpy()
        _say(progress, "VLA: base, tau_merge, masks", done, total)
    return out


def import_mergevla(merged_dir: str | Path, pretrained_dir: str | Path, out: str | Path, *,
                    architecture: MergeVLAConfig, serving: Serving | None = None,
                    instructions: Mapping[str, str] | None = None, normalization: Normalization = "quantile",
                    overwrite: bool = False, progress: Progress | None = None) -> Manifest:
    """A MergeVLA merged directory (``mergy.py`` output) and its pretrained-VLM directory -> a bundle.

    - theta_0 from ``pretrained_dir``; tau_merge = the merged ``model.safetensors`` tensors (keys
      stored as zeros get no masks); ``action_queries.weight`` is real weights: it goes to the
      base, with a zero tau;
    - experts and tasks in ``task2idx.pt`` order; masks from ``tall_masks.pt`` (dense bool, stored
      bit-packed); without that file every task gets the full tau_merge;
    - head (already merged MoE) and proprio projector from the ``.pt`` files; statistics from
      ``dataset_statistics.json`` (task name, else name + "_no_noops").
    ``serving`` default: ``Serving.libero(merged_dir / "tokenizer.json")``. ``instructions``:
    task name -> default instruction (else the name with spaces: MergeVLA tasks are suites).
    """
    merged_dir, out = Path(merged_dir), Path(out)
    if serving is None:
        if not (merged_dir / "tokenizer.json").is_file():
            raise BuildError(merged_dir, "no tokenizer.json for the default LIBERO serving settings; pass "
                             "serving=Serving.libero(<tokenizer.json>) or another Serving")
        serving = Serving.libero(merged_dir / "tokenizer.json")
    order = read_task_order(merged_dir / MV_TASK2IDX_FILE)
    config = dataclasses.replace(architecture, num_tasks=len(order))
    reference = _reference(config)
    base, merged = load_vla(pretrained_dir), load_vla(merged_dir)
    _check_shapes(reference.vla, base, base.source, "pretrained VLA")
    _check_shapes(reference.vla, merged, merged.source, "merged VLA")
    head = load_tensor_dict(merged_dir / MV_HEAD_FILE)
    _check_shapes(reference.merged_head, head, merged_dir / MV_HEAD_FILE, "merged action head")
    _check_router_layer(head, config, merged_dir / MV_HEAD_FILE)
    proprio = load_tensor_dict(merged_dir / MV_PROPRIO_FILE)
    _check_shapes(reference.proprio, proprio, merged_dir / MV_PROPRIO_FILE, "proprio projector")

    unknown = sorted(set(instructions or {}) - set(order))
    if unknown:
        raise BuildError(merged_dir / MV_TASK2IDX_FILE, f"instructions given for unknown tasks {unknown}; "
                         f"the tasks are {order}")
    stats_path = merged_dir / MV_STATS_FILE
    statistics = _read_json(stats_path)
    specs = []
    for m, name in enumerate(order):
        action, proprio_stats = _dataset_stats(statistics, name, stats_path, normalization)
        instruction = (instructions or {}).get(name, name.replace("_", " "))
        specs.append(_task_spec(m, name, instruction, action, proprio_stats, config, stats_path))
    manifest = _manifest("mergevla", config, specs, serving, out)

    masks_path = merged_dir / MV_MASKS_FILE
    masks = read_tall_masks(masks_path, order, reference.vla) if masks_path.is_file() else None
    vla = _import_vla(merged, base, masks, order, progress)
    files = {BASE_FILE: vla.base, TAU_FILE: vla.tau, MASK_FILE: vla.masks, HEAD_FILE: _numpy(head),
             PROPRIO_FILE: _numpy(proprio)}
    return _write(out, manifest, files, serving, overwrite, progress)
