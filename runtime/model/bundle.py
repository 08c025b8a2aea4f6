"""The model bundle: a directory holding ``manifest.json`` and safetensors files.

The manifest states everything the runtime needs besides the weights: the tasks with their
instructions and normalization statistics, the action and observation specs, every image
preprocessing step, the router settings, whether action dimensions are offsets from the state
(``action.relative``), and the files with their checksums and tensors. Nothing that changes
actions is left implicit in code (the MergeVLA reference hid image flips, JPEG
round trips and normalization constants in its evaluation scripts).

Loading checks the schema version, the manifest, the files' sizes and sha256, and every tensor's
dtype and shape; it writes nothing and fetches nothing, so it works from a read-only mount on a
robot with no network.

Masks are bit-packed (one bit per weight instead of numpy's one byte). Any bool array given to
``write_bundle`` is stored packed and comes back unpacked from ``Bundle.tensor``. A task's mask
for parameter ``key`` lives under ``mask/<expert_index>/<key>`` (see ``mask_key``).

Imports numpy, safetensors and pydantic only (no torch), so the CLI can inspect bundles cheaply.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SCHEMA_VERSION = "armada-bundle/1"
MANIFEST_NAME = "manifest.json"
HASH_BLOCK = 8 * 1024 * 1024
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
# The 1e-8 is in the reference code (openvla unnormalize); leaving it out shifts actions slightly.
NORM_EPS = 1e-8

Progress = Callable[[int, int], None]

# Safetensors dtype names by numpy dtype name. "bfloat16" has no numpy type of its own; it appears
# when a caller passes ml_dtypes arrays (safetensors writes those as BF16).
_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "int32": "I32", "float32": "F32",
    "uint64": "U64", "int64": "I64", "float64": "F64",
}
DType = Literal["BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64"]


class BundleError(Exception):
    """A bundle problem, naming the file, the key path inside it, and the reason."""

    def __init__(self, file: str | Path, key: str, reason: str):
        super().__init__(f"{file}: {key or '<top>'}: {reason}")
        self.file, self.key, self.reason = str(file), key, reason


class _KeyedError(ValueError):
    """Raised by cross-field validators so the loader can report the exact key path."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


class _Strict(BaseModel):
    # No NaN or infinity: a NaN quantile would turn every action into NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- masks


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A bool array as flat uint8, 8 elements per byte (little bit order), padded with zeros."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"pack_mask needs a bool array, got {mask.dtype}")
    return np.packbits(mask.reshape(-1), bitorder="little")


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """The inverse of ``pack_mask``: a bool array of ``shape``."""
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != packed_size(shape):
        raise ValueError(f"a packed mask of shape {shape} is {packed_size(shape)} uint8 bytes, "
                         f"got {packed.dtype} {packed.shape}")
    bits = np.unpackbits(packed, count=count, bitorder="little")
    return bits.view(np.bool_).reshape(shape)


def packed_size(shape: tuple[int, ...] | list[int]) -> int:
    return (math.prod(shape) + 7) // 8


def mask_key(expert_index: int, key: str) -> str:
    """Where task ``expert_index``'s mask for parameter ``key`` is stored."""
    return f"mask/{expert_index}/{key}"


# --------------------------------------------------------------------------- manifest models


class NormStats(_Strict):
    """Per-dimension normalization bounds: q01/q99 ("quantile") or min/max ("minmax").

    Dimensions where ``mask`` is false pass through unchanged (LIBERO's gripper is already in
    [-1, 1] and is not rescaled)."""

    kind: Literal["quantile", "minmax"]
    q01: list[float] | None = None
    q99: list[float] | None = None
    min: list[float] | None = None
    max: list[float] | None = None
    mask: list[bool]

    @model_validator(mode="after")
    def _consistent(self) -> "NormStats":
        need, forbid = (("q01", "q99"), ("min", "max")) if self.kind == "quantile" else (("min", "max"), ("q01", "q99"))
        for name in need:
            if getattr(self, name) is None:
                raise _KeyedError(name, f"required for kind {self.kind!r}")
        for name in forbid:
            if getattr(self, name) is not None:
                raise _KeyedError(name, f"not allowed for kind {self.kind!r} (use {need[0]}/{need[1]})")
        lo, hi = getattr(self, need[0]), getattr(self, need[1])
        for name, values in ((need[1], hi), ("mask", self.mask)):
            if len(values) != len(lo):
                raise _KeyedError(name, f"has {len(values)} values, {need[0]} has {len(lo)}")
        bad = [i for i, (a, b) in enumerate(zip(lo, hi)) if a > b]
        if bad:
            raise _KeyedError(need[1], f"below {need[0]} at dimensions {bad}")
        return self

    @property
    def dim(self) -> int:
        return len(self.mask)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = (self.q01, self.q99) if self.kind == "quantile" else (self.min, self.max)
        return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    def unnormalize(self, a: np.ndarray) -> np.ndarray:
        """Model output in [-1, 1] to physical units (last axis = dimensions), float64."""
        a = self._check(a)
        lo, hi = self.bounds()
        return np.where(self.mask, 0.5 * (a + 1.0) * (hi - lo + NORM_EPS) + lo, a)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Physical units to [-1, 1], clipped as in training (masked dimensions only), float64."""
        x = self._check(x)
        lo, hi = self.bounds()
        scaled = np.clip(2.0 * (x - lo) / (hi - lo + NORM_EPS) - 1.0, -1.0, 1.0)
        return np.where(self.mask, scaled, x)

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"expected a last axis of {self.dim} dimensions, got shape {x.shape}")
        return x


class TaskSpec(_Strict):
    name: str = Field(min_length=1)
    instruction: str
    expert_index: int = Field(ge=0)  # the MergeVLA expert (and mask) index m
    action_stats: NormStats
    proprio_stats: NormStats | None = None


class ActionSpec(_Strict):
    """The model's action chunks: ``dim`` values per action, ``chunk`` actions ``dt`` seconds apart.

    ``relative``: None (every bundle before this field, and the default) means every dimension is an
    absolute target. Otherwise one flag per dimension: where True, the model predicts the target
    minus the observed state at the chunk's start (``action[t + k] - state[t]``, UMI-style), and the
    policy adds ``obs.state`` back after unnormalizing; where False the value is absolute (e.g.
    grippers). The statistics of such a dimension are those of the differences."""

    dim: int = Field(gt=0)
    chunk: int = Field(gt=0)
    dt: float = Field(gt=0)  # seconds between consecutive actions of a chunk
    names: list[str] | None = None
    relative: list[bool] | None = None

    @model_validator(mode="after")
    def _names(self) -> "ActionSpec":
        if self.names is not None and len(self.names) != self.dim:
            raise _KeyedError("names", f"has {len(self.names)} names for {self.dim} dimensions")
        if self.relative is not None and len(self.relative) != self.dim:
            raise _KeyedError("relative", f"has {len(self.relative)} flags for {self.dim} dimensions (one per "
                              "action dimension, or null for all absolute)")
        return self

    def relative_mask(self) -> np.ndarray | None:
        """Bool (dim,) of the relative dimensions, or None when every dimension is absolute."""
        if self.relative is None or not any(self.relative):
            return None
        return np.asarray(self.relative, bool)


class ObservationSpec(_Strict):
    cameras: list[str] = Field(min_length=1)  # in the order the model stacks them
    image_size: int = Field(gt=0)  # square side in pixels of the model's input images
    proprio_dim: int = Field(ge=0)  # 0: the model takes no proprioception

    @field_validator("cameras")
    @classmethod
    def _unique(cls, cameras: list[str]) -> list[str]:
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"camera names must be unique, got {cameras}")
        return cameras


Interpolation = Literal["bilinear", "bicubic", "lanczos"]


class Resize(_Strict):
    op: Literal["resize"] = "resize"
    size: int = Field(gt=0)  # square output side; the aspect ratio is not kept
    interpolation: Interpolation
    antialias: bool = True


class CenterCrop(_Strict):
    """Crop a centered square covering ``area_fraction`` of the image (side sqrt(area_fraction)),
    then resize it back to the input size with ``interpolation``."""

    op: Literal["center_crop"] = "center_crop"
    area_fraction: float = Field(gt=0, le=1)
    interpolation: Interpolation = "bilinear"


class Rotate180(_Strict):
    """Both axes flipped (``img[::-1, ::-1]``), not a mirror."""

    op: Literal["rotate180"] = "rotate180"


class JpegRoundtrip(_Strict):
    op: Literal["jpeg_roundtrip"] = "jpeg_roundtrip"
    quality: int = Field(ge=1, le=100)


class ToFloat(_Strict):
    """uint8 [0, 255] to float [0, 1]."""

    op: Literal["to_float"] = "to_float"


class Normalize(_Strict):
    """Emit ``(img - mean) / std`` as the input of backbone ``target``. Does not change the running
    image, so a stream can list one normalize per backbone; outputs are stacked in list order."""

    op: Literal["normalize"] = "normalize"
    mean: tuple[float, float, float]
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    target: str = Field(min_length=1)  # e.g. "dino", "siglip"


PreprocessStep = Annotated[Resize | CenterCrop | Rotate180 | JpegRoundtrip | ToFloat | Normalize,
                           Field(discriminator="op")]


class PromptSpec(_Strict):
    """How an instruction becomes token ids: a template and a tokenizer.

    ``tokenizer`` is ``"bytes"`` (UTF-8 bytes shifted past the special ids, for tiny test
    bundles) or the path of a Hugging Face ``tokenizer.json`` inside the bundle (real models;
    loaded offline with the ``tokenizers`` library).
    """

    template: str = Field(min_length=1)  # must contain "{instruction}"
    tokenizer: str = "bytes"
    bos_id: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _has_slot(self) -> "PromptSpec":
        if "{instruction}" not in self.template:
            raise ValueError("template must contain {instruction}")
        return self


class RouterSpec(_Strict):
    k: int = Field(gt=0)  # singular vectors per subspace
    layer: int = Field(ge=0)  # head block whose value projections define the subspaces
    temperature: float = Field(default=1.0, gt=0)
    min_margin: float = Field(default=0.0, ge=0)  # refuse a routing decision below this margin
    enabled: bool = True


class FileEntry(_Strict):
    path: str  # relative to the bundle directory, "/" separated
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        check_relative_path(path)
        return path


class TensorEntry(_Strict):
    """One tensor. ``dtype`` and ``shape`` are what ``Bundle.tensor`` returns. For bit-packed
    masks (dtype "BOOL", and only those) the file holds uint8 of ``packed_shape`` =
    [ceil(prod(shape) / 8)] instead."""

    dtype: DType
    shape: list[Annotated[int, Field(ge=0)]]
    packed_shape: list[int] | None = None

    @model_validator(mode="after")
    def _packing(self) -> "TensorEntry":
        if self.dtype == "BOOL" and self.packed_shape != [packed_size(self.shape)]:
            raise _KeyedError("packed_shape", f"a BOOL tensor of shape {self.shape} is stored packed as "
                              f"[{packed_size(self.shape)}], manifest says {self.packed_shape}")
        if self.dtype != "BOOL" and self.packed_shape is not None:
            raise _KeyedError("packed_shape", "only BOOL tensors are stored packed")
        return self

    @property
    def stored(self) -> tuple[str, list[int]]:
        """The dtype and shape the safetensors file holds."""
        return ("U8", self.packed_shape) if self.packed_shape is not None else (self.dtype, self.shape)


class Manifest(_Strict):
    schema_version: Literal["armada-bundle/1"] = SCHEMA_VERSION
    kind: Literal["mergevla", "capvector", "single"]
    architecture: dict[str, Any]  # opaque to the bundle: the model builder's configuration
    tasks: list[TaskSpec] = Field(min_length=1)
    action: ActionSpec
    observation: ObservationSpec
    preprocessing: dict[str, list[PreprocessStep]]  # per camera stream, applied in order
    router: RouterSpec | None = None
    prompt: PromptSpec | None = None
    files: list[FileEntry] = []
    tensors: dict[str, dict[str, TensorEntry]] = {}  # file path -> tensor key -> entry

    @field_validator("architecture")
    @classmethod
    def _json_only(cls, architecture: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(architecture, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be plain JSON without NaN or infinity: {exc}") from None
        return architecture

    @model_validator(mode="after")
    def _cross_fields(self) -> "Manifest":
        _check_tasks(self)
        _check_router(self)
        _check_preprocessing(self)
        _check_files(self)
        return self

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task named {name!r}; have {[t.name for t in self.tasks]}")


def check_relative_path(path: str) -> None:
    # A manifest is data from disk: it must not name files outside its directory.
    pure = PurePosixPath(path)
    if not path or "\\" in path or pure.is_absolute() or any(p in ("..", ".", "") for p in path.split("/")):
        raise ValueError(f"{path!r} must be a plain relative path inside the bundle (no '..', '.', '\\\\' "
                         f"or leading '/')")
    if path == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME!r} is reserved for the manifest")


def _check_tasks(m: Manifest) -> None:
    names = [t.name for t in m.tasks]
    for i, task in enumerate(m.tasks):
        if names.index(task.name) != i:
            raise _KeyedError(f"tasks.{i}.name", f"duplicate task name {task.name!r}")
        if task.expert_index >= len(m.tasks):
            raise _KeyedError(f"tasks.{i}.expert_index", f"{task.expert_index} is out of range for "
                              f"{len(m.tasks)} tasks (expert indices are 0..{len(m.tasks) - 1})")
        if [t.expert_index for t in m.tasks].index(task.expert_index) != i:
            raise _KeyedError(f"tasks.{i}.expert_index", f"duplicate expert index {task.expert_index}")
        if task.action_stats.dim != m.action.dim:
            raise _KeyedError(f"tasks.{i}.action_stats", f"has {task.action_stats.dim} dimensions, "
                              f"action.dim is {m.action.dim}")
        proprio = task.proprio_stats
        if (proprio is None) != (m.observation.proprio_dim == 0):
            raise _KeyedError(f"tasks.{i}.proprio_stats", f"required if and only if observation.proprio_dim "
                              f"> 0 (it is {m.observation.proprio_dim})")
        if proprio is not None and proprio.dim != m.observation.proprio_dim:
            raise _KeyedError(f"tasks.{i}.proprio_stats", f"has {proprio.dim} dimensions, "
                              f"observation.proprio_dim is {m.observation.proprio_dim}")
    if m.kind != "mergevla" and len(m.tasks) != 1:
        raise _KeyedError("tasks", f"a {m.kind!r} bundle is one model with one head: exactly one task, "
                          f"got {len(m.tasks)}")


def _check_router(m: Manifest) -> None:
    # Routing picks among experts; with one expert there is nothing to pick.
    needed = m.kind == "mergevla" and len(m.tasks) > 1
    if needed and m.router is None:
        raise _KeyedError("router", f"required for a mergevla bundle with {len(m.tasks)} tasks")
    if not needed and m.router is not None:
        raise _KeyedError("router", f"must be absent for a {m.kind!r} bundle with {len(m.tasks)} task(s)")


def _check_preprocessing(m: Manifest) -> None:
    if set(m.preprocessing) != set(m.observation.cameras):
        raise _KeyedError("preprocessing", f"needs one entry per camera {m.observation.cameras}, "
                          f"got {sorted(m.preprocessing)}")
    for stream, steps in m.preprocessing.items():
        _check_steps(steps, f"preprocessing.{stream}")


def _check_steps(steps: list[Any], where: str) -> None:
    # The order is part of the contract: JPEG works on uint8, normalize on float, and only
    # normalize steps may follow a normalize (they all read the same image).
    is_float, targets = False, []
    for i, step in enumerate(steps):
        if step.op == "to_float":
            if is_float:
                raise _KeyedError(f"{where}.{i}", "the image is already float")
            is_float = True
        elif step.op == "jpeg_roundtrip" and is_float:
            raise _KeyedError(f"{where}.{i}", "jpeg_roundtrip needs a uint8 image: put it before to_float")
        elif step.op == "normalize":
            if not is_float:
                raise _KeyedError(f"{where}.{i}", "normalize needs a float image: put to_float before it")
            if step.target in targets:
                raise _KeyedError(f"{where}.{i}.target", f"duplicate target {step.target!r}")
            targets.append(step.target)
        if targets and step.op != "normalize":
            raise _KeyedError(f"{where}.{i}", f"{step.op} after normalize: only normalize steps may follow")


def _check_files(m: Manifest) -> None:
    paths = [f.path for f in m.files]
    for i, path in enumerate(paths):
        if paths.index(path) != i:
            raise _KeyedError(f"files.{i}.path", f"duplicate file {path!r}")
        if path.endswith(".safetensors") and path not in m.tensors:
            raise _KeyedError("tensors", f"no tensor list for {path!r}")
    experts = {t.expert_index for t in m.tasks}
    for path, entries in m.tensors.items():
        if path not in paths:
            raise _KeyedError(f"tensors.{path}", "not listed in files")
        for key, entry in entries.items():
            if key.startswith("mask/"):
                _check_mask_entry(key, entry, experts, f"tensors.{path}.{key}")


def _check_mask_entry(key: str, entry: TensorEntry, experts: set[int], where: str) -> None:
    parts = key.split("/", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
        raise _KeyedError(where, "mask keys are mask/<expert_index>/<parameter key>")
    if int(parts[1]) not in experts:
        raise _KeyedError(where, f"no task has expert index {parts[1]}")
    if entry.dtype != "BOOL":
        raise _KeyedError(f"{where}.dtype", f"a mask is BOOL, got {entry.dtype}")


# --------------------------------------------------------------------------- writing


def write_bundle(directory: str | Path, manifest: Manifest, files: dict[str, dict[str, np.ndarray]],
                 progress: Progress | None = None, overwrite: bool = False,
                 extra_files: dict[str, bytes] | None = None) -> Manifest:
    """Write ``files`` (path -> tensor key -> array) as safetensors, plus ``extra_files`` (e.g.
    tokenizer files) verbatim, then ``manifest.json`` with files and tensors filled in.

    ``manifest`` must have empty ``files`` and ``tensors``. Bool arrays are stored bit-packed.
    ``progress(done, total)`` follows the checksum pass. Returns the written manifest."""
    directory = Path(directory)
    if manifest.files or manifest.tensors:
        raise BundleError(directory / MANIFEST_NAME, "files", "write_bundle fills files and tensors: "
                          "pass a manifest without them")
    extra_files = extra_files or {}
    paths = list(files) + list(extra_files)
    if len(set(paths)) != len(paths):
        raise BundleError(directory, "files", f"a path is both a tensor file and an extra file: {paths}")
    _prepare_directory(directory, overwrite)
    tensors = {path: _write_safetensors(directory, path, arrays) for path, arrays in files.items()}
    for path, data in extra_files.items():
        _target(directory, path).write_bytes(data)
    entries = _file_entries(directory, paths, progress)
    data = manifest.model_dump(mode="json") | {"files": [e.model_dump() for e in entries], "tensors": tensors}
    final = _validate(data, directory / MANIFEST_NAME)
    _write_atomic(directory / MANIFEST_NAME, json.dumps(final.model_dump(mode="json"), indent=2) + "\n")
    return final


def _prepare_directory(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise BundleError(directory, "", "exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise BundleError(directory, "", "directory is not empty; pass overwrite=True to replace the bundle")
    directory.mkdir(parents=True, exist_ok=True)
    # Remove the old manifest first: an interrupted rewrite then reads as "no manifest", never as
    # an old manifest describing half-new files.
    (directory / MANIFEST_NAME).unlink(missing_ok=True)


def _target(directory: Path, path: str) -> Path:
    try:
        check_relative_path(path)
    except ValueError as exc:
        raise BundleError(directory, path, str(exc)) from None
    target = directory / path
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _write_safetensors(directory: Path, path: str, arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    stored, entries = {}, {}
    for key, array in arrays.items():
        array = np.asarray(array)
        dtype = _DTYPES.get(array.dtype.name)
        if dtype is None:
            raise BundleError(directory / path, key, f"dtype {array.dtype} cannot be stored; "
                              f"use one of {sorted(_DTYPES)}")
        entry: dict[str, Any] = {"dtype": dtype, "shape": list(array.shape)}
        if dtype == "BOOL":
            entry["packed_shape"] = [packed_size(array.shape)]
            array = pack_mask(array)
        # Not np.ascontiguousarray: it turns a 0-d scalar (router_layer_idx) into shape [1].
        stored[key] = np.require(array, requirements="C")
        entries[key] = entry
    save_file(stored, _target(directory, path))
    return entries


def _file_entries(directory: Path, paths: list[str], progress: Progress | None) -> list[FileEntry]:
    sizes = [(directory / p).stat().st_size for p in paths]
    done, total, entries = 0, sum(sizes), []
    for path, size in zip(paths, sizes):
        digest = _sha256(directory / path, done, total, progress, sync=True)
        entries.append(FileEntry(path=path, sha256=digest, bytes=size))
        done += size
    return entries


def _write_atomic(path: Path, text: str) -> None:
    # Rename is atomic: a reader sees the old manifest, no manifest, or the whole new one.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- loading


class Bundle:
    """A loaded bundle. Tensors are read on demand, so holding a Bundle costs no weight memory."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory, self.manifest = directory, manifest
        self.manifest_path = directory / MANIFEST_NAME

    def file_path(self, file: str) -> Path:
        """The path of a listed file (a torch loader can open it with safetensors.torch)."""
        if file not in {f.path for f in self.manifest.files}:
            raise BundleError(self.manifest_path, "files", f"no file {file!r}; have "
                              f"{[f.path for f in self.manifest.files]}")
        return self.directory / file

    def tensor(self, file: str, key: str) -> np.ndarray:
        """One tensor as the manifest describes it: masks unpacked, BF16 widened to float32
        (exactly; numpy has no bfloat16)."""
        entry = self._entry(file, key)
        with safe_open(self.file_path(file), framework="numpy") as reader:
            return _decode(reader, self.file_path(file), key, entry)

    def tensors(self, file: str) -> dict[str, np.ndarray]:
        entries = self._entries(file)
        with safe_open(self.file_path(file), framework="numpy") as reader:
            return {key: _decode(reader, self.file_path(file), key, e) for key, e in entries.items()}

    def mask(self, expert_index: int, key: str) -> np.ndarray:
        """Task ``expert_index``'s bool mask for parameter ``key``, in the parameter's shape."""
        stored = mask_key(expert_index, key)
        for file, entries in self.manifest.tensors.items():
            if stored in entries:
                return self.tensor(file, stored)
        raise BundleError(self.manifest_path, "tensors", f"no mask {stored!r} in any file")

    def packed_masks(self, expert_index: int) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
        """Task ``expert_index``'s masks still bit-packed, ``{param key: (uint8 bits, shape)}``, read
        in one pass per file: an engine keeps these (1/8 byte per weight) and unpacks per key."""
        prefix = mask_key(expert_index, "")
        out: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
        for file, entries in self.manifest.tensors.items():
            keys = [k for k in entries if k.startswith(prefix)]
            if not keys:
                continue
            with safe_open(self.file_path(file), framework="numpy") as reader:
                for k in keys:
                    out[k[len(prefix):]] = (reader.get_tensor(k), tuple(entries[k].shape))
        return out

    def mask_keys(self, expert_index: int) -> list[str]:
        """The parameter keys that task ``expert_index`` has a mask for."""
        prefix = mask_key(expert_index, "")
        return [k[len(prefix):] for entries in self.manifest.tensors.values() for k in entries
                if k.startswith(prefix)]

    def task(self, name: str) -> TaskSpec:
        try:
            return self.manifest.task(name)
        except KeyError as exc:
            raise BundleError(self.manifest_path, "tasks", exc.args[0]) from None

    def _entries(self, file: str) -> dict[str, TensorEntry]:
        if file not in self.manifest.tensors:
            raise BundleError(self.manifest_path, "tensors", f"no tensor file {file!r}; have "
                              f"{sorted(self.manifest.tensors)}")
        return self.manifest.tensors[file]

    def _entry(self, file: str, key: str) -> TensorEntry:
        entries = self._entries(file)
        if key not in entries:
            raise BundleError(self.manifest_path, f"tensors.{file}", f"no tensor {key!r}")
        return entries[key]


def load_bundle(directory: str | Path, verify: bool = True, progress: Progress | None = None) -> Bundle:
    """Read and check a bundle. Sizes, safetensors headers (dtype, shape, key set) are always
    checked; ``verify`` adds the sha256 of every file (the slow part: it reads every byte).
    Writes nothing and uses no network."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(directory, "", "no such bundle directory")
    if not manifest_path.is_file():
        raise BundleError(manifest_path, "", "missing: not a bundle directory, or an interrupted write")
    manifest = _validate(_read_manifest_json(manifest_path), manifest_path)
    _check_sizes(directory, manifest)
    for file, entries in manifest.tensors.items():
        _check_header(directory / file, entries)
    if verify:
        _check_checksums(directory, manifest, progress)
    return Bundle(directory, manifest)


def _read_manifest_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BundleError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BundleError(path, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise BundleError(path, f"line {exc.lineno}", f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:
        raise BundleError(path, "", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(path, "", f"the manifest must be a JSON object, got {type(data).__name__}")
    _check_schema_version(data, path)
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; a repeated "q99" would silently replace statistics.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (statistics must be finite)")


def _check_schema_version(data: dict[str, Any], path: Path) -> None:
    # Checked before anything else: a newer layout must fail on its version, not on a field error.
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        found = "missing" if version is None else f"{version!r}"
        raise BundleError(path, "schema_version", f"unsupported bundle schema version {found}; this runtime "
                          f"reads only {SCHEMA_VERSION!r} (rewrite the bundle, or use a matching armada)")


def _validate(data: dict[str, Any], path: Path) -> Manifest:
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, _KeyedError):
            key, reason = ".".join(filter(None, (key, inner.key))), inner.reason
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise BundleError(path, key, f"{reason}{more}") from None


def _check_sizes(directory: Path, manifest: Manifest) -> None:
    where = directory / MANIFEST_NAME
    for i, entry in enumerate(manifest.files):
        path = directory / entry.path
        if not path.is_file():
            raise BundleError(where, f"files.{i}.path", f"missing file {path}")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(path, f"files.{i}.bytes", f"file has {size} bytes, manifest says {entry.bytes} "
                              f"(truncated or replaced)")


def _check_header(path: Path, entries: dict[str, TensorEntry]) -> None:
    # Reads only the safetensors header: no tensor data.
    try:
        with safe_open(path, framework="numpy") as reader:
            keys = set(reader.keys())
            slices = {k: reader.get_slice(k) for k in keys & set(entries)}
            stored = {k: (s.get_dtype(), s.get_shape()) for k, s in slices.items()}
    except (SafetensorError, OSError) as exc:
        raise BundleError(path, "", f"not a readable safetensors file: {exc}") from None
    if keys != set(entries):
        missing, extra = sorted(set(entries) - keys), sorted(keys - set(entries))
        raise BundleError(path, "", f"tensor keys differ from the manifest: missing {missing[:5]}, "
                          f"unlisted {extra[:5]}")
    for key, entry in entries.items():
        dtype, shape = entry.stored
        if stored[key] != (dtype, shape):
            raise BundleError(path, key, f"file holds {stored[key][0]} {stored[key][1]}, manifest says "
                              f"{dtype} {shape}")


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header (tensor key -> dtype, shape, data_offsets) and where data starts."""
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if length > min(MAX_HEADER, path.stat().st_size - 8):
            raise ValueError(f"header length {length} is impossible")
        return json.loads(fh.read(length)), 8 + length


def _check_checksums(directory: Path, manifest: Manifest, progress: Progress | None) -> None:
    done, total = 0, sum(f.bytes for f in manifest.files)
    for i, entry in enumerate(manifest.files):
        path = directory / entry.path
        digest = _sha256(path, done, total, progress)
        if digest != entry.sha256:
            raise BundleError(path, f"files.{i}.sha256", f"checksum mismatch: manifest says {entry.sha256}, "
                              f"file has {digest}; the file is corrupt or was changed after writing")
        done += entry.bytes


def _sha256(path: Path, done: int, total: int, progress: Progress | None, sync: bool = False) -> str:
    digest, buffer = hashlib.sha256(), bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb") as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
            done += n
            if progress is not None:
                progress(done, total)
        if sync:  # the writer makes data durable before the manifest that vouches for it
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _decode(reader: Any, path: Path, key: str, entry: TensorEntry) -> np.ndarray:
    if entry.dtype == "BF16":
        return _read_bf16(path, key, entry.shape)
    array = reader.get_tensor(key)
    return unpack_mask(array, entry.shape) if entry.packed_shape is not None else array


def _read_bf16(path: Path, key: str, shape: list[int]) -> np.ndarray:
    # safetensors' numpy reader refuses BF16; bf16 is the top half of a float32, so widen exactly.
    header, data_start = _read_header(path)
    start, end = header[key]["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(data_start + start)
        raw = np.frombuffer(fh.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


# --------------------------------------------------------------------------- inspection


def inspect_bundle(directory: str | Path, verify: bool = False) -> str:
    """A human summary for ``armada model inspect``. Checksums only with ``verify`` (slow)."""
    bundle = load_bundle(directory, verify=verify)
    m = bundle.manifest
    lines = [f"bundle {bundle.directory} ({m.schema_version}, kind {m.kind})",
             f"architecture: {_short(m.architecture)}",
             f"action: dim {m.action.dim}, chunk {m.action.chunk}, dt {m.action.dt} s"
             + (f", names {m.action.names}" if m.action.names else ""),
             f"observation: cameras {m.observation.cameras}, {m.observation.image_size} px, "
             f"proprio {m.observation.proprio_dim}",
             f"router: {_router_line(m.router)}",
             f"tasks ({len(m.tasks)}):"]
    for t in sorted(m.tasks, key=lambda t: t.expert_index):
        masks = len(bundle.mask_keys(t.expert_index))
        lines.append(f"  [{t.expert_index}] {t.name}: {t.instruction!r}, action stats {t.action_stats.kind}"
                     + (f", proprio stats {t.proprio_stats.kind}" if t.proprio_stats else "")
                     + (f", {masks} masks" if masks else ""))
    lines.append("preprocessing:")
    for stream, steps in m.preprocessing.items():
        lines.append(f"  {stream}: " + " > ".join(_step_text(s) for s in steps))
    lines.append(f"files ({len(m.files)}, {_size(sum(f.bytes for f in m.files))}):")
    total_params = 0
    for f in m.files:
        entries = m.tensors.get(f.path, {})
        params = sum(math.prod(e.shape) for e in entries.values() if e.dtype != "BOOL")
        masks = sum(1 for e in entries.values() if e.dtype == "BOOL")
        total_params += params
        detail = f", {len(entries)} tensors, {params:,} parameters" if f.path in m.tensors else ""
        detail += f", {masks} packed masks" if masks else ""
        lines.append(f"  {f.path}: {_size(f.bytes)}{detail}, sha256 {f.sha256[:12]}")
    lines.append(f"parameters: {total_params:,} (masks not counted)")
    lines.append("checksums: verified" if verify else "checksums: not verified (sizes and headers checked)")
    return "\n".join(lines)


def _router_line(router: RouterSpec | None) -> str:
    if router is None:
        return "none"
    return (f"k {router.k}, layer {router.layer}, temperature {router.temperature}, min margin "
            f"{router.min_margin}, {'enabled' if router.enabled else 'disabled'}")


def _step_text(step: Any) -> str:
    args = step.model_dump(exclude={"op"})
    return step.op + (f"({', '.join(f'{k}={v}' for k, v in args.items())})" if args else "")


def _short(config: dict[str, Any]) -> str:
    items = [f"{k}={v}" if not isinstance(v, (dict, list)) else f"{k}=..." for k, v in config.items()]
    return ", ".join(items) or "{}"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"
