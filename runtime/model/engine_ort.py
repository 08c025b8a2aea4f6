"""Run a MergeVLA model exported by `runtime.model.onnx_export.export_onnx` with ONNX Runtime.

The engine needs numpy and onnxruntime only (no torch), so an inference process can run it alone.

One call, `predict_normalized`, runs vision.onnx, assembles the LLM input on the host exactly as
`PrismaticVLA.build_inputs_embeds` does (embed.onnx for the token rows, the action queries from
host_tensors.npz), then llm.onnx and head.onnx. Unnormalizing the actions is the caller's.

Devices: onnxruntime-gpu lists CUDA and TensorRT as available even on a machine without a GPU or
without the libraries, and silently falls back to the CPU when a session cannot use them. So
`device` is read from the created sessions' `get_providers()`, never from the request.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

log = logging.getLogger("armada.engine_ort")

# The export directory's layout. Defined here, not in onnx_export, so that this module needs no
# torch; onnx_export imports these names.
MANIFEST_NAME = "onnx_manifest.json"
HOST_TENSORS_NAME = "host_tensors.npz"
MANIFEST_FORMAT = "armada-onnx"
MANIFEST_VERSION = 1
GRAPH_NAMES = ("vision", "embed", "llm", "head")

# What "auto" asks for, best first; ONNX Runtime drops the ones it cannot create.
AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_DEVICE_OF_PROVIDER = {
    "TensorrtExecutionProvider": "tensorrt",
    "CUDAExecutionProvider": "cuda",
    "CPUExecutionProvider": "cpu",
}
_DEVICE_RANK = {"cpu": 0, "cuda": 1, "tensorrt": 2}
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

ProviderSpec = str | tuple[str, dict[str, Any]]


class OrtEngineError(ValueError):
    """Bad inputs for the exported graphs, or an export directory the engine cannot use."""


def resolve_providers(providers: str | Sequence[ProviderSpec]) -> list[ProviderSpec]:
    """"auto" -> TensorRT, CUDA, CPU (those this onnxruntime build has); a list is passed through."""
    if isinstance(providers, str):
        if providers != "auto":
            raise OrtEngineError(f"providers must be 'auto' or a list of provider names, got {providers!r}")
        available = set(ort.get_available_providers())
        if not nvidia_driver_present():
            # onnxruntime-gpu lists CUDA and TensorRT even without a GPU, then logs a page of load
            # errors per session; without a driver there is nothing to try.
            available &= {"CPUExecutionProvider"}
        return [p for p in AUTO_PROVIDERS if p in available]
    return list(providers)


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded (the device node, or libcuda on the loader path).
    Only decides what to ask for: the device in use is still read from the created session."""
    import ctypes.util

    return Path("/dev/nvidiactl").exists() or ctypes.util.find_library("cuda") is not None


def device_of_session_providers(used: Sequence[str]) -> str:
    """The device a session really runs on: its first (highest-priority) provider that we know.
    The CPU provider is always last in the list, as the fallback for unsupported nodes."""
    for name in used:
        if name in _DEVICE_OF_PROVIDER:
            return _DEVICE_OF_PROVIDER[name]
    return "cpu"


def _provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


class OrtEngine:
    """Sessions for vision, embed, llm and head; `predict_normalized` runs them in order.

    After construction: `device` ("tensorrt", "cuda" or "cpu", the least capable among the
    sessions, from get_providers()), `session_providers` (per graph, as ONNX Runtime reports them),
    `requested_providers`, `manifest`, `prompt_len`, `quantization` (None for float graphs, else the
    manifest's description, e.g. type "int8": opt-in, actions differ from the float model). After each
    call: `timing` in milliseconds."""

    def __init__(self, onnx_dir: str | Path, providers: str | Sequence[ProviderSpec] = "auto",
                 session_options: ort.SessionOptions | None = None):
        self.onnx_dir = Path(onnx_dir)
        manifest_path = self.onnx_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            raise OrtEngineError(f"{manifest_path} not found: export with runtime.model.onnx_export.export_onnx")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT or self.manifest.get("version") != MANIFEST_VERSION:
            raise OrtEngineError(f"{manifest_path} is not an {MANIFEST_FORMAT} version {MANIFEST_VERSION} manifest")
        m = self.manifest
        self.prompt_len: int = m["prompt_len"]
        self.num_experts: int = m["num_experts"]
        self.stop_token_id: int = m["stop_token_id"]
        self.vocab_size: int = m["vocab_size"]
        self.quantization: dict[str, Any] | None = m.get("quantization")  # absent in older exports: float
        arch = m["architecture"]
        self._num_images, self._image_size = arch["num_images"], arch["image_size"]
        self._proprio_dim: int = m["proprio_dim"]
        with np.load(self.onnx_dir / HOST_TENSORS_NAME) as host:
            self.action_queries: np.ndarray = host["action_queries"]

        self.requested_providers = resolve_providers(providers)
        session_options = session_options or default_session_options()
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.session_providers: dict[str, list[str]] = {}
        for name in GRAPH_NAMES:
            path = self.onnx_dir / m["graphs"][name]["file"]
            session = ort.InferenceSession(str(path), sess_options=session_options,
                                           providers=self.requested_providers)
            self.sessions[name] = session
            self.session_providers[name] = list(session.get_providers())

        devices = {name: device_of_session_providers(used) for name, used in self.session_providers.items()}
        # the least capable session bounds the whole pipeline's speed, so report that one
        self.device: str = min(devices.values(), key=_DEVICE_RANK.__getitem__)
        requested = [_provider_name(p) for p in self.requested_providers]
        log.info("ONNX Runtime engine on %s (%s weights): requested %s, sessions use %s", self.device,
                 self.quantization["type"] if self.quantization else "float", requested,
                 {name: used[0] for name, used in self.session_providers.items()})
        wanted = device_of_session_providers(requested)
        if _DEVICE_RANK[self.device] < _DEVICE_RANK[wanted]:
            log.warning("asked for %s but ONNX Runtime created %s sessions (see its log above for why: "
                        "missing CUDA/cuDNN/TensorRT libraries or no GPU)", wanted, self.device)

        self._input_dtypes = {
            name: {i.name: _NP_DTYPES.get(i.type) for i in session.get_inputs()}
            for name, session in self.sessions.items()
        }
        self.timing: dict[str, float] = {}

    # ---- checks

    def _check_inputs(self, pixels_dino: np.ndarray, pixels_siglip: np.ndarray, prompt_ids: np.ndarray,
                      proprio_normalized: np.ndarray, expert: int) -> int:
        """Raise OrtEngineError naming the bad input; returns the batch size."""
        prompt_ids = np.asarray(prompt_ids)
        if prompt_ids.ndim != 2 or not np.issubdtype(prompt_ids.dtype, np.integer):
            raise OrtEngineError(f"prompt_ids: expected (B, n) integers, got {prompt_ids.shape} {prompt_ids.dtype}")
        batch, length = prompt_ids.shape
        if length != self.prompt_len:
            raise OrtEngineError(
                f"prompt length {length} differs from the exported prompt length {self.prompt_len}: "
                f"the LLM graph is fixed to prompt_len={self.prompt_len} (padding or truncating would "
                f"change the actions); re-export with export_onnx(..., prompt_len={length})")
        if prompt_ids.size and (prompt_ids.min() < 0 or prompt_ids.max() >= self.vocab_size):
            raise OrtEngineError(f"prompt_ids: token ids must be in [0, {self.vocab_size})")
        image = (batch, self._num_images, 3, self._image_size, self._image_size)
        for name, pixels in (("pixels_dino", pixels_dino), ("pixels_siglip", pixels_siglip)):
            if tuple(np.shape(pixels)) != image:
                raise OrtEngineError(f"{name}: expected {image}, got {tuple(np.shape(pixels))}")
        if tuple(np.shape(proprio_normalized)) != (batch, self._proprio_dim):
            raise OrtEngineError(f"proprio_normalized: expected {(batch, self._proprio_dim)}, "
                                 f"got {tuple(np.shape(proprio_normalized))}")
        # the graph's Gather would fail (CPU) or read garbage (GPU) on a bad index: check here
        if isinstance(expert, (bool, np.bool_)) or not isinstance(expert, (int, np.integer)) \
                or not 0 <= int(expert) < self.num_experts:
            raise OrtEngineError(f"expert must be an int in [0, {self.num_experts}), got {expert!r}")
        return batch

    def _feed(self, graph: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Cast float inputs to the graph's declared dtype (float32 or float16 exports)."""
        dtypes = self._input_dtypes[graph]
        return {name: (np.ascontiguousarray(a, dtype=dtypes[name]) if dtypes.get(name) is not None
                       else np.ascontiguousarray(a)) for name, a in arrays.items()}

    # ---- inference

    def assemble_inputs_embeds(self, image_embeds: np.ndarray, prompt_ids: np.ndarray) -> np.ndarray:
        """[first prompt token, image patches, remaining prompt tokens, action queries, stop token],
        as PrismaticVLA.build_inputs_embeds. The stop id rides along in the same embed.onnx call."""
        batch, length = prompt_ids.shape
        ids = np.concatenate([prompt_ids.astype(np.int64),
                              np.full((batch, 1), self.stop_token_id, dtype=np.int64)], axis=1)
        (tokens,) = self.sessions["embed"].run(None, {"ids": ids})
        queries = np.broadcast_to(self.action_queries, (batch, *self.action_queries.shape))
        parts = [tokens[:, :1], image_embeds, tokens[:, 1:length], queries, tokens[:, length:]]
        dtype = self._input_dtypes["llm"]["inputs_embeds"]
        return np.concatenate([p.astype(dtype, copy=False) for p in parts], axis=1)

    def predict_normalized(self, pixels_dino: np.ndarray, pixels_siglip: np.ndarray, prompt_ids: np.ndarray,
                           proprio_normalized: np.ndarray, expert: int) -> np.ndarray:
        """(B, I, 3, S, S) x2 normalized pixels, (B, n) int64 prompt ids without BOS (n = the exported
        prompt_len), (B, P) normalized proprio, expert index -> normalized actions (B, C, A) float32."""
        prompt_ids = np.asarray(prompt_ids)
        self._check_inputs(pixels_dino, pixels_siglip, prompt_ids, proprio_normalized, expert)
        timing: dict[str, float] = {}

        started = time.perf_counter()
        (image_embeds,) = self.sessions["vision"].run(
            None, self._feed("vision", pixels_dino=pixels_dino, pixels_siglip=pixels_siglip))
        after_vision = time.perf_counter()
        inputs_embeds = self.assemble_inputs_embeds(image_embeds, prompt_ids)
        after_embed = time.perf_counter()
        # The LLM's hidden states go to the head as ONNX Runtime values, never through numpy: no
        # copy out and back in on the CPU, and on a GPU they stay on the device.
        hidden = self.sessions["llm"].run_with_ort_values(
            ["task_hidden", "action_hidden"], {"inputs_embeds": ort.OrtValue.ortvalue_from_numpy(inputs_embeds)})
        after_llm = time.perf_counter()
        head_feed = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self._feed(
            "head", proprio_normalized=proprio_normalized, expert=np.array([int(expert)], dtype=np.int64)).items()}
        head_feed["task_hidden"], head_feed["action_hidden"] = hidden
        (actions,) = self.sessions["head"].run_with_ort_values(["actions"], head_feed)
        actions = actions.numpy()
        finished = time.perf_counter()

        timing["vision"] = (after_vision - started) * 1e3
        timing["embed"] = (after_embed - after_vision) * 1e3  # host assembly including embed.onnx
        timing["llm"] = (after_llm - after_embed) * 1e3
        timing["head"] = (finished - after_llm) * 1e3
        timing["total"] = (finished - started) * 1e3
        self.timing = timing
        return actions.astype(np.float32, copy=False)


def default_session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for sessions that share a robot PC with cameras, drivers and torch.

    Four sessions run one after another per chunk; by default each keeps its own intra-op pool
    spinning between calls, and on a small machine those spinners (and torch's pool in the same
    process) steal the cores the next session needs.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or max(1, (os.cpu_count() or 1))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
