"""`armada bench gpu`: the merged VLA's chunk latency on a GPU, eager / ONNX Runtime / compile / TensorRT.

How to run it on a lent GPU, in ONE call of at most 10 minutes on a fresh machine::

    .venv/bin/armada bench gpu --size real --budget-s 480 --json "$OUT/bench_gpu.json"

(or ``.venv/bin/python -m armada.runtime.cli bench gpu ...``; ``--size`` defaults to real on a GPU and
tiny without one). Set ARMADA_BENCH_GPU_DIR to keep the run folder (bundle, ONNX export, TensorRT
engine cache); by default it is a temporary folder, removed at the end. Every phase prints
"[ elapsed s] ..." lines; a phase that cannot run (no CUDA, no provider, budget spent) is recorded as
skipped with its reason, one that raises is recorded as failed with the error, and the run goes on.

Phases, in order of value, with the minutes estimated for the real size (about 1.25 B VLM parameters
plus a 205 M merged head, 8 tasks) on an H100 with 16 cores, extrapolated from CPU runs, not measured:

1. build (~1-2 min): a random 8-task bundle (~11 GiB) written with bundle.write_bundle. Not
   tiny.make_tiny_bundle: at mid size it takes 21 s for 8 tasks on 2 cores, ~23x that at real size,
   and it holds 16 fine-tuned copies of the model (~80 GB). Here the weights are drawn directly (on
   the GPU when there is one): base with std 1/sqrt(fan_in) (well-conditioned, so parity means
   something; the tests' randomize_ uses 0.1 everywhere and makes a chaotic model), a sparse random
   tau_merge, independent random masks per task, orthonormal router subspaces. Then the bundle is
   loaded into a TorchEngine on the device (base, flips and packed masks, as a robot would).
   Measured on a 2-core CPU (no GPU), real size with 2 tasks, weights drawn on the CPU: 115 s, of
   which drawing 86 s (the GPU draws in seconds) and writing + checksums 28 s for 10.2 GiB.
2. torch_eager_fp32 (~0.3 min): TF32 off (the reference). 3. torch_eager_bf16 (~0.3 min): bf16
   autocast over the same float32 weights (not bf16 weights).
4. onnxruntime (~2-3 min, export included): export_onnx of the routed task from the engine's model
   (float32, from a CPU copy of the model; every graph keeps its weights in <graph>.onnx.data, so
   the real LLM, ~2 GB, stays clear of protobuf's 2 GB limit), then OrtEngine with CUDA (use_tf32
   off); the device is read from the created sessions, never assumed. onnxruntime-gpu 1.31 needs
   the CUDA 13 / cuDNN 9 libraries: the venv's torch cu13 wheels ship them and
   onnxruntime.preload_dlls() loads them. Without CUDA it runs on the CPU provider and says so.
   Mid size on 2 CPU cores: export 25-35 s; real size has ~3x the layers and 20x the weights.
5. parity: max |chunk - eager fp32 chunk| in normalized action units over 3 observations for every
   measured row, against the stated tolerance for float32 rows (tests/unit/test_onnx.py: 1e-4 CPU,
   5e-4 GPU with TF32 off), plus how far eager itself moves when one camera is one gray level off.
6. router (~0.5-1 min): route time cold (weights of no known task: M swaps) and warm (the held task
   scored first) at M = 2, 4, 8 from the one 8-task bundle (Router candidates = the first M tasks),
   over M eager fp32 forwards.
7. torch_compile (~1-2 min): torch.compile (mode default) of the model's forward; the first call
   (compile) is timed apart. On a CPU-only machine it runs only without --quick.
8. tensorrt (what is left, at most): ONNX Runtime's TensorRT provider (fp16 enabled, engine cache
   under <run folder>/trt_cache) in a subprocess with a timeout, so a long engine build cannot eat
   the budget; first-call (build) time and latency are reported. It needs TensorRT 10 libraries
   (the tensorrt wheel, absent from the venv as of this writing): without them ONNX Runtime falls
   back to CUDA and the phase is skipped, saying so. The estimates above add up to 6-9 minutes, so
   at real size with the default budget TensorRT may well be skipped for budget; the 480 s budget
   leaves ~2 minutes of the 10-minute call for startup and for a phase that overruns (a phase is only
   started with enough left, not stopped).

Latency is per chunk of the model on prepared inputs (pixels, prompt ids, proprio already
preprocessed; host-to-device copies and the copy of the actions back included); image preprocessing
on the CPU is timed once apart ("preprocess_ms"). Targets: under 25 ms p50 per chunk; VLA-Adapter
reports 36 ms on an H100.

What it does not check: real weights (random weights; routing decisions mean nothing, only their
cost), accuracy on a task, batch > 1, a float16 ONNX export, torch-tensorrt, multi-GPU, power or
clocks, memory beyond torch's peak. The proprio projector takes 7 inputs (mock_arm), not LIBERO's 8.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

PHASES = ("build", "torch_eager_fp32", "torch_eager_bf16", "onnxruntime", "parity", "router",
          "torch_compile", "tensorrt")
GPU_ONLY = ("tensorrt",)  # phases that never run without CUDA
DEFAULT_BUDGET_S = 480.0
NUM_TASKS = 8
ROUTER_M = (2, 4, 8)
PARITY_OBSERVATIONS = 3
# Stated float32 parity of the ONNX export against PyTorch (tests/unit/test_onnx.py).
FP32_TOLERANCE = {"cpu": 1e-4, "cuda": 5e-4}
TARGET_P50_MS = 25.0
# A phase is not started with less than this left: it would be cut short and say nothing.
MIN_PHASE_S = {"tensorrt": 60.0, "torch_compile": 45.0, "onnxruntime": 60.0}


class Skip(Exception):
    """A phase that cannot run here; the message is the reason recorded."""


# --------------------------------------------------------------------------- the run


class Run:
    """Phases, their results and the clock; prints a progress line per step."""

    def __init__(self, budget_s: float, quick: bool):
        self.started = time.perf_counter()
        self.budget_s, self.quick = budget_s, quick
        self.phases: dict[str, dict[str, Any]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {text}", flush=True)

    def phase(self, name: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        left = self.budget_s - self.elapsed()
        need = MIN_PHASE_S.get(name, 1.0) if self.budget_s > 0 else 1.0
        started = time.perf_counter()
        try:
            if left < need:
                raise Skip(f"budget: {max(left, 0):.0f} s left of {self.budget_s:.0f} s, "
                           f"this phase needs >= {need:.0f} s")
            self.say(f"{name}: start")
            result = {"status": "measured", **body()}
        except Skip as exc:
            result = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001  (a GPU minute is precious: record it, go on)
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - started, 2)
        self.phases[name] = result
        self.say(f"{name}: {result['status']} in {result['seconds']:.1f} s"
                 + (f" ({result.get('reason') or result.get('error')})" if result["status"] != "measured" else ""))
        return result


# --------------------------------------------------------------------------- configuration and bundle


def config_for(size: str):
    """The 8-task architecture of a size; 7 actions and 7 proprio inputs, as mock_arm has."""
    from armada.runtime.model.bench_model import mid_config_overrides
    from armada.runtime.model.mergevla import MergeVLAConfig

    common = dict(num_tasks=NUM_TASKS, action_dim=7, proprio_dim=7, chunk=8)
    if size == "real":
        return replace(MergeVLAConfig.real_libero(num_tasks=NUM_TASKS), **common)
    return MergeVLAConfig.tiny(**common, **(mid_config_overrides() if size == "mid" else {}))


def _norm_keys(model: Any) -> set[str]:
    """Parameter names of norm weights (drawn around 1, as randomize_ does)."""
    import torch

    keys = set()
    for prefix, owner in model.named_modules():
        if isinstance(owner, torch.nn.LayerNorm) or type(owner).__name__.endswith("RMSNorm"):
            if getattr(owner, "weight", None) is not None:
                keys.add(f"{prefix}.weight" if prefix else "weight")
    return keys


def _draw(shape: tuple[int, ...], norm: bool, gen: Any, device: Any) -> Any:
    """One random tensor: norms 1 + N(0, 0.02), matrices N(0, 1/fan_in), vectors N(0, 0.02)."""
    import torch

    if norm:
        return 1.0 + 0.02 * torch.randn(shape, generator=gen, device=device)
    std = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
    return std * torch.randn(shape, generator=gen, device=device)


def _orthonormal_rows(shape: tuple[int, ...], gen: Any, device: Any) -> Any:
    import torch

    k, dim = shape
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, device=device))
    return q.T.contiguous()


def random_state(shapes: dict[str, Any], norm_keys: set[str], prefix: str, gen: Any, device: Any,
                 router_layer: int) -> dict[str, np.ndarray]:
    """Host arrays for a state dict given as meta tensors (shapes and dtypes only)."""
    import torch

    from armada.runtime.model.router import _ROUTER_KEY

    out = {}
    for key, meta in shapes.items():
        if not meta.is_floating_point():  # the head's router_layer_idx, the only integer entry
            out[key] = np.array(router_layer, dtype=np.int64)
        elif _ROUTER_KEY.match(key):
            out[key] = _orthonormal_rows(tuple(meta.shape), gen, device).cpu().numpy()
        else:
            out[key] = _draw(tuple(meta.shape), prefix + key in norm_keys, gen, device).to(torch.float32).cpu().numpy()
    return out


def _tau_and_masks(base: dict[str, np.ndarray], tasks: int, gen: Any,
                   device: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A sparse tau_merge (30 % support, 5 % of the key's scale) and independent masks (50 %)."""
    import torch

    from armada.runtime.model.bundle import mask_key

    tau, masks = {}, {}
    for key, value in base.items():
        shape = value.shape
        scale = float(np.abs(value).mean()) or 1.0
        support = torch.rand(shape, generator=gen, device=device) < 0.3
        tau[key] = (0.05 * scale * torch.randn(shape, generator=gen, device=device) * support).cpu().numpy()
        for m in range(tasks):
            masks[mask_key(m, key)] = (torch.rand(shape, generator=gen, device=device) < 0.5).cpu().numpy()
    return tau, masks


def build_random_bundle(out_dir: Path, config: Any, device: str, seed: int = 0,
                        say: Callable[[str], None] = print) -> Any:
    """Write a random merged bundle of ``config`` (make_tiny_bundle's layout and manifest, weights
    drawn directly: see the module docstring). Returns the manifest."""
    import torch

    from armada.runtime.model.bundle import (ActionSpec, Manifest, Normalize, ObservationSpec, PromptSpec,
                                             Resize, RouterSpec, ToFloat, write_bundle)
    from armada.runtime.model.mergevla import MergeVLAModel
    from armada.runtime.model.tiny import (BASE_FILE, DINO_NORM, HEAD_FILE, MASK_FILE, PROPRIO_FILE, SIGLIP_NORM,
                                           TAU_FILE, _task)

    with torch.device("meta"):  # shapes only: nothing allocated, no init cost
        meta = MergeVLAModel(config)
    norms = _norm_keys(meta)
    gen = torch.Generator(device=device).manual_seed(seed)
    layer = config.router_layer_idx
    say("build: base weights")
    base = random_state(meta.vla_state_dict(), norms, "vla.", gen, device, layer)
    say(f"build: tau_merge and {config.num_tasks} masks")
    tau, masks = _tau_and_masks(base, config.num_tasks, gen, device)
    say("build: merged head, proprio projector")
    head = random_state(meta.action_head_state_dict(), norms, "action_head.", gen, device, layer)
    proprio = random_state(dict(meta.proprio_projector.state_dict()), norms, "proprio_projector.", gen, device, layer)
    home = np.array([0.0, -1.57, 1.57, -1.57, -1.57, 0.0, 0.04])  # mock_arm's, as make_tiny_bundle
    span = np.array([0.05] * 6 + [0.005])
    cameras = ["front", "wrist"]
    manifest = Manifest(
        kind="mergevla", architecture=config.to_dict(),
        tasks=[_task(m, home, span) for m in range(config.num_tasks)],
        action=ActionSpec(dim=config.action_dim, chunk=config.chunk, dt=0.02),
        observation=ObservationSpec(cameras=cameras, image_size=config.image_size, proprio_dim=config.proprio_dim),
        preprocessing={c: [Resize(size=config.image_size, interpolation="bilinear"), ToFloat(),
                           Normalize(mean=DINO_NORM[0], std=DINO_NORM[1], target="dino"),
                           Normalize(mean=SIGLIP_NORM[0], std=SIGLIP_NORM[1], target="siglip")] for c in cameras},
        router=RouterSpec(k=config.router_k, layer=layer),
        prompt=PromptSpec(template="In: What action should the robot take to {instruction}?\nOut:"))
    say("build: writing the bundle")
    files = {BASE_FILE: base, TAU_FILE: tau, MASK_FILE: masks, HEAD_FILE: head, PROPRIO_FILE: proprio}
    return write_bundle(out_dir, manifest, files)


# --------------------------------------------------------------------------- measuring


class Setup:
    """The loaded bundle on the device, its task 0 fixed, and prepared inputs per observation."""

    def __init__(self, bundle_dir: Path, device: str):
        from armada.runtime.model.bench_model import _observation, _one_gray_level_off
        from armada.runtime.model.bundle import load_bundle
        from armada.runtime.model.engine import TorchEngine
        from armada.runtime.model.policy import BACKBONES, PromptTokenizer
        from armada.runtime.model.preprocess import preprocess_cameras

        self.device = device
        self.bundle = load_bundle(bundle_dir, verify=False)
        self.engine = TorchEngine(self.bundle, device=device)
        self.tasks = sorted(self.bundle.manifest.tasks, key=lambda t: t.expert_index)
        self.tokenizer = PromptTokenizer(self.bundle.manifest.prompt, self.bundle.directory,
                                         self.engine.config.llm.vocab)
        task = self.tasks[0]
        self.engine.use_task(task.expert_index)
        self.expert, self.prompt_ids = task.expert_index, self.tokenizer.ids(task.instruction)
        manifest = self.bundle.manifest
        self.inputs, preprocess = [], []
        for seed in range(PARITY_OBSERVATIONS):
            obs = _observation(seed)
            started = time.perf_counter()
            pixels = preprocess_cameras(obs.frames, manifest.observation.cameras, manifest.preprocessing, BACKBONES)
            preprocess.append((time.perf_counter() - started) * 1e3)
            proprio = task.proprio_stats.normalize(obs.state).astype(np.float32)
            self.inputs.append((pixels, proprio))
        self.preprocess_ms = float(np.median(preprocess))
        # How far eager fp32 moves when every pixel of one camera is one gray level off: below it,
        # a parity gap is noise of the inputs, not of the runtime.
        nudged = _one_gray_level_off(_observation(0))
        self.nudged_pixels = preprocess_cameras(nudged.frames, manifest.observation.cameras,
                                                manifest.preprocessing, BACKBONES)

    def eager(self, index: int) -> np.ndarray:
        pixels, proprio = self.inputs[index]
        return self.engine.predict_normalized(pixels, self.prompt_ids, proprio, self.expert)

    def tensors(self, index: int) -> tuple[Any, ...]:
        import torch

        pixels, proprio = self.inputs[index]
        dev = self.engine.device
        return (torch.from_numpy(pixels["dino"][None]).to(dev), torch.from_numpy(pixels["siglip"][None]).to(dev),
                torch.from_numpy(self.prompt_ids[None]).to(dev), torch.from_numpy(proprio[None]).to(dev))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_calls(call: Callable[[int], np.ndarray], repeats: int,
               device: str) -> tuple[dict[str, float], list[np.ndarray]]:
    """Latency (ms) of call(0) after 3 warm-up calls, and one output per parity observation."""
    from armada.runtime.bench import _pct

    for _ in range(3):
        call(0)
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call(0)
        _sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    return _pct(times), [np.asarray(call(i), np.float32) for i in range(PARITY_OBSERVATIONS)]


def max_gap(chunks: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Max |a - b| over observations; the chunks are already in normalized action units."""
    return float(max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                     for a, b in zip(chunks, reference)))


def latency_row(latency: dict[str, float], device: str, **extra: Any) -> dict[str, Any]:
    return {"device": device, "p50_ms": latency["p50"], "p99_ms": latency["p99"], "max_ms": latency["max"],
            "n": latency["n"], "under_target": latency["p50"] < TARGET_P50_MS, **extra}


# --------------------------------------------------------------------------- phases


def phase_eager(setup: Setup, repeats: int, bf16: bool, chunks: dict[str, list]) -> dict[str, Any]:
    import torch

    if bf16 and setup.device == "cpu" and not torch.backends.mkldnn.is_available():
        raise Skip("bf16 autocast on this CPU has no oneDNN kernels")
    kind = "cuda" if setup.device.startswith("cuda") else "cpu"

    def call(i: int) -> np.ndarray:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            return setup.eager(i)

    latency, outs = time_calls(call, repeats, setup.device)
    name = "torch_eager_bf16" if bf16 else "torch_eager_fp32"
    chunks[name] = outs
    note = "bf16 autocast over float32 weights" if bf16 else "float32, TF32 off"
    return latency_row(latency, setup.device, notes=note, preprocess_ms=setup.preprocess_ms)


def _ort_providers(cuda: bool) -> list[Any]:
    import onnxruntime as ort

    if not cuda:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    _preload_cuda_libraries()
    # TF32 off: the stated float32 tolerance (5e-4 on a GPU) is for full float32 math.
    return [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0}), "CPUExecutionProvider"]


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN (and TensorRT, when its wheel is there) libraries the pip wheels ship, so
    that onnxruntime-gpu finds them without LD_LIBRARY_PATH. A failure here is not fatal: the
    session then falls back to the CPU, and the device read from it says so."""
    import onnxruntime as ort

    try:
        import tensorrt  # noqa: F401  (loads libnvinfer for the TensorRT provider)
    except Exception:  # noqa: BLE001
        pass
    try:
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001
        print(f"onnxruntime.preload_dlls failed: {exc}", flush=True)


def _ort_call(engine: Any, setup: Setup) -> Callable[[int], np.ndarray]:
    def call(i: int) -> np.ndarray:
        pixels, proprio = setup.inputs[i]
        return engine.predict_normalized(pixels["dino"][None], pixels["siglip"][None], setup.prompt_ids[None],
                                         proprio[None], setup.expert)[0]
    return call


def phase_onnxruntime(setup: Setup, folder: Path, repeats: int, chunks: dict[str, list]) -> dict[str, Any]:
    from armada.runtime.model.engine_ort import OrtEngine
    from armada.runtime.model.onnx_export import export_onnx

    cuda = setup.device.startswith("cuda")
    providers = _ort_providers(cuda)
    started = time.perf_counter()
    # Exported from a CPU copy: the path tests/unit/test_onnx.py covers (the exporter copies every
    # weight to the host anyway), and the trace holds no second model in GPU memory.
    model = copy.deepcopy(setup.engine.model).cpu() if cuda else setup.engine.model
    export_onnx(model, folder, len(setup.prompt_ids))
    del model
    export_s = time.perf_counter() - started
    data_mb = sum(p.stat().st_size for p in folder.glob("*.data")) / 2**20
    started = time.perf_counter()
    engine = OrtEngine(folder, providers=providers)
    session_s = time.perf_counter() - started
    latency, outs = time_calls(_ort_call(engine, setup), repeats, "cpu")  # ORT calls return host arrays
    chunks["onnxruntime"] = outs
    note = "float32 export" + ("" if cuda else "; no CUDA here: CPU provider, to check the path")
    return latency_row(latency, engine.device, notes=note, export_s=round(export_s, 2),
                       session_s=round(session_s, 2), external_data_mb=round(data_mb, 1),
                       session_providers=engine.session_providers, stage_ms=engine.timing)


def phase_parity(setup: Setup, chunks: dict[str, list], phases: dict[str, dict]) -> dict[str, Any]:
    reference = chunks.get("torch_eager_fp32")
    if reference is None:
        raise Skip("no eager float32 reference (torch_eager_fp32 did not run)")
    nudged = setup.engine.predict_normalized(setup.nudged_pixels, setup.prompt_ids, setup.inputs[0][1], setup.expert)
    rows = {}
    for name, outs in chunks.items():
        if name == "torch_eager_fp32":
            continue
        gap = max_gap(outs, reference)
        # Only the ONNX export has a stated float32 tolerance; compile's fusions reorder reductions
        # (observed 2e-3 at tiny on a CPU), bf16 and TensorRT fp16 round: their gaps are reported.
        fp32 = name == "onnxruntime"
        tolerance = FP32_TOLERANCE["cuda" if setup.device.startswith("cuda") else "cpu"] if fp32 else None
        rows[name] = {"max_abs_normalized": gap, "tolerance": tolerance,
                      "within": None if tolerance is None else gap <= tolerance}
        phases.get(name, {})["parity"] = gap
    floor = max_gap([nudged], reference[:1])
    return {"device": setup.device, "rows": rows, "observations": PARITY_OBSERVATIONS,
            "eager_one_gray_level_gap": floor,
            "notes": f"vs torch eager fp32, normalized action units; eager's own one-gray-level gap {floor:.1e}"}


def phase_router(setup: Setup, forward_ms: float, repeats: int, say: Callable[[str], None]) -> dict[str, Any]:
    from armada.runtime.model.router import Router, RouterSubspaces

    engine, tasks = setup.engine, setup.tasks
    pixels = setup.inputs[0][0]
    names = [t.name for t in tasks]
    ids = {i: setup.tokenizer.ids(t.instruction) for i, t in enumerate(tasks)}

    def hidden_for(index: int):
        engine.use_task(index)
        return engine.router_hidden(pixels, ids[index])

    spec = setup.bundle.manifest.router
    router = Router(names, RouterSubspaces.from_head(engine.model.action_head_state_dict()), hidden_for,
                    temperature=spec.temperature, min_margin=spec.min_margin)
    out: dict[str, Any] = {"device": setup.device, "one_forward_ms": forward_ms, "repeats": repeats}
    quiet = logging.getLogger("armada.router")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one INFO line per route would bury the progress lines
    try:
        for m in (m for m in ROUTER_M if m <= len(names)):
            out[f"M={m}"] = _route_cost(router, engine, names[:m], forward_ms, repeats, setup.device)
            say(f"router: M={m} cold {out[f'M={m}']['route_ms']:.0f} ms, warm {out[f'M={m}']['route_warm_ms']:.0f} ms")
    finally:
        quiet.setLevel(level)
    engine.use_task(setup.expert)
    out["notes"] = "cold/warm route ms: " + ", ".join(
        f"{k} {v['route_ms']:.0f}/{v['route_warm_ms']:.0f}" for k, v in out.items() if k.startswith("M="))
    return out


def _route_cost(router: Any, engine: Any, candidates: list[str], forward_ms: float, repeats: int,
                device: str) -> dict[str, float]:
    """Median route time, cold (no known task in place: every candidate swaps) and warm (the held
    task, candidates[0], scored first without a swap), and each over M forwards."""
    m = len(candidates)
    cold, warm = [], []
    for _ in range(repeats):
        for times, held in ((cold, None), (warm, 0)):
            engine.use_task(0)
            engine.task_index = held  # None: every key is written on the first swap
            started = time.perf_counter()
            router.route(candidates=candidates)
            _sync(device)
            times.append((time.perf_counter() - started) * 1e3)
    route, route_warm = float(np.median(cold)), float(np.median(warm))
    return {"route_ms": route, "route_warm_ms": route_warm, "route_over_M_forwards": route / (m * forward_ms),
            "warm_route_over_M_forwards": route_warm / (m * forward_ms)}


def phase_compile(setup: Setup, repeats: int, chunks: dict[str, list], allow_cpu: bool) -> dict[str, Any]:
    import torch

    if not setup.device.startswith("cuda") and not allow_cpu:
        raise Skip("no CUDA; on the CPU torch.compile runs only without --quick")
    model = setup.engine.model
    compiled = torch.compile(model.predict_normalized_actions)
    tensors = [setup.tensors(i) for i in range(PARITY_OBSERVATIONS)]

    def call(i: int) -> np.ndarray:
        with torch.no_grad():
            return compiled(*tensors[i], setup.expert)[0].float().cpu().numpy()

    started = time.perf_counter()
    call(0)
    compile_s = time.perf_counter() - started
    latency, outs = time_calls(call, repeats, setup.device)
    chunks["torch_compile"] = outs
    return latency_row(latency, setup.device, compile_s=round(compile_s, 2),
                       notes="mode default, float32, TF32 off; tensors already on the device")


def phase_tensorrt(setup: Setup, onnx_dir: Path, run_dir: Path, repeats: int, timeout_s: float,
                   chunks: dict[str, list]) -> dict[str, Any]:
    import onnxruntime as ort

    if not setup.device.startswith("cuda"):
        raise Skip("no CUDA: TensorRT needs an NVIDIA GPU")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no TensorrtExecutionProvider")
    if not (onnx_dir / "onnx_manifest.json").exists():
        raise Skip("no ONNX export (the onnxruntime phase did not export)")
    inputs = run_dir / "trt_inputs.npz"
    arrays = {"prompt_ids": setup.prompt_ids, "expert": np.array(setup.expert)}
    for i, (pixels, proprio) in enumerate(setup.inputs):
        arrays |= {f"dino{i}": pixels["dino"], f"siglip{i}": pixels["siglip"], f"proprio{i}": proprio}
    np.savez(inputs, **arrays)
    result_path = run_dir / "trt_result.json"
    command = [sys.executable, "-m", "armada.runtime.model.bench_gpu", "tensorrt-child", str(onnx_dir),
               str(inputs), str(run_dir / "trt_cache"), str(result_path), str(repeats)]
    try:
        proc = subprocess.run(command, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise Skip(f"budget: the TensorRT subprocess ran past {timeout_s:.0f} s (engine build) "
                   "and was killed") from None
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"TensorRT subprocess exited {proc.returncode}: {proc.stderr[-1500:]}")
    result = json.loads(result_path.read_text())
    if result["device"] != "tensorrt":  # ONNX Runtime fell back: not a TensorRT number
        raise Skip(f"the TensorRT provider was not created (sessions: {result['session_providers']}); "
                   f"it needs TensorRT 10 libraries (pip tensorrt-cu13 or libnvinfer): {proc.stderr[-600:]}")
    chunks["tensorrt"] = [np.asarray(c, np.float32) for c in result.pop("chunks")]
    return latency_row(result.pop("latency"), result.pop("device"), **result)


def tensorrt_child(onnx_dir: str, inputs: str, cache: str, result_path: str, repeats: str) -> int:
    """The TensorRT phase's subprocess: build (or load the cached) engines, time, write JSON."""
    from armada.runtime.model.engine_ort import OrtEngine

    Path(cache).mkdir(parents=True, exist_ok=True)
    trt = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache, "trt_fp16_enable": True,
           "trt_max_workspace_size": 8 << 30}
    providers = [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": 0}),
                 "CPUExecutionProvider"]
    _preload_cuda_libraries()  # this process has not imported torch, which would have loaded them
    data = np.load(inputs)
    started = time.perf_counter()
    engine = OrtEngine(onnx_dir, providers=providers)

    def call(i: int) -> np.ndarray:
        return engine.predict_normalized(data[f"dino{i}"][None], data[f"siglip{i}"][None], data["prompt_ids"][None],
                                         data[f"proprio{i}"][None], int(data["expert"]))[0]

    call(0)  # TensorRT builds its engines on the first run of each graph
    build_s = time.perf_counter() - started
    latency, outs = time_calls(call, int(repeats), "cpu")
    Path(result_path).write_text(json.dumps({
        "latency": latency, "device": engine.device, "build_s": round(build_s, 2),
        "session_providers": engine.session_providers, "stage_ms": engine.timing,
        "cache_mb": round(sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file()) / 2**20, 1),
        "notes": "ONNX Runtime TensorRT provider, fp16 enabled, engine cache on disk",
        "chunks": [o.tolist() for o in outs]}))
    return 0


# --------------------------------------------------------------------------- report


def versions() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for module in ("onnxruntime", "tensorrt"):
        try:
            out[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install: say which)
            out[module] = f"not available ({type(exc).__name__})"
    return out


def table(phases: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'phase':<18} {'status':<9} {'device':<9} {'p50 ms':>9} {'p99 ms':>9} {'parity':>10}  notes"]
    for name in PHASES:
        r = phases.get(name, {})
        fmt = lambda k: f"{r[k]:9.2f}" if isinstance(r.get(k), float) else f"{'-':>9}"  # noqa: E731
        parity = f"{r['parity']:10.2e}" if isinstance(r.get("parity"), float) else f"{'-':>10}"
        note = r.get("reason") or r.get("error") or r.get("notes") or ""
        lines.append(f"{name:<18} {r.get('status', '-'):<9} {str(r.get('device', '-')):<9} "
                     f"{fmt('p50_ms')} {fmt('p99_ms')} {parity}  {note}")
    return "\n".join(lines)


def _run_dir() -> tuple[Path, bool]:
    keep = os.environ.get("ARMADA_BENCH_GPU_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep), True
    return Path(tempfile.mkdtemp(prefix="armada-bench-gpu-")), False


def _phases(run: Run, size: str, device: str, folder: Path) -> None:
    import torch

    repeats = 10 if run.quick else (50 if size == "real" else 30)
    chunks: dict[str, list] = {}
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is full float32
    torch.backends.cudnn.allow_tf32 = False
    setup: dict[str, Setup] = {}

    def build() -> dict[str, Any]:
        config = config_for(size)
        started = time.perf_counter()
        build_random_bundle(folder / "bundle", config, device, say=run.say)
        write_s = time.perf_counter() - started
        run.say("build: loading the bundle into the engine")
        started = time.perf_counter()
        setup["s"] = Setup(folder / "bundle", device)
        engine = setup["s"].engine
        params = sum(p.numel() for p in engine.model.parameters())
        return {"device": device, "write_s": round(write_s, 2), "load_s": round(time.perf_counter() - started, 2),
                "parameters": int(params), "tasks": config.num_tasks, "size": size,
                "bundle_mb": round(sum(p.stat().st_size for p in (folder / "bundle").iterdir()) / 2**20, 1),
                "notes": f"{params / 1e6:.1f} M params incl. merged head, random weights"}

    if run.phase("build", build)["status"] != "measured":
        for name in PHASES[1:]:
            run.phases[name] = {"status": "skipped", "reason": "no bundle (the build phase did not complete)"}
        return
    s = setup["s"]
    fp32 = run.phase("torch_eager_fp32", lambda: phase_eager(s, repeats, False, chunks))
    run.phase("torch_eager_bf16", lambda: phase_eager(s, repeats, True, chunks))
    onnx_dir = folder / "onnx" / s.tasks[0].name
    run.phase("onnxruntime", lambda: phase_onnxruntime(s, onnx_dir, repeats, chunks))
    run.phase("parity", lambda: phase_parity(s, chunks, run.phases))

    def router() -> dict[str, Any]:
        if fp32["status"] != "measured":
            raise Skip("no eager forward time (torch_eager_fp32 did not run)")
        return phase_router(s, fp32["p50_ms"], 1 if size == "real" else 3, run.say)

    run.phase("router", router)
    run.phase("torch_compile", lambda: phase_compile(s, repeats, chunks, allow_cpu=not run.quick))
    run.phase("tensorrt", lambda: phase_tensorrt(s, onnx_dir, folder, repeats,
                                                 run.budget_s - run.elapsed(), chunks))
    late = {k: v for k, v in chunks.items() if k in ("torch_eager_fp32", "torch_compile", "tensorrt")}
    if run.phases["parity"]["status"] == "measured" and len(late) > 1:  # parity rows for the late phases
        try:
            run.phases["parity"]["rows"].update(phase_parity(s, late, run.phases)["rows"])
        except Exception as exc:  # noqa: BLE001  (the measured rows above must still reach the JSON)
            run.phases["parity"]["late_error"] = f"{type(exc).__name__}: {exc}"


def run_gpu_bench(args: argparse.Namespace) -> int:
    import torch

    from armada.runtime.bench import machine

    cuda = torch.cuda.is_available()
    size = args.size or ("real" if cuda else "tiny")
    budget = DEFAULT_BUDGET_S if args.budget_s is None else float(args.budget_s)
    device = "cuda" if cuda else "cpu"
    run = Run(budget, bool(args.quick))
    run.say(f"bench gpu: size {size}, device {device}"
            + (f" ({torch.cuda.get_device_name(0)})" if cuda else " (no CUDA: GPU phases are skipped)")
            + f", budget {budget:.0f} s")
    threads = torch.get_num_threads()
    if not cuda:  # a shared CPU machine: do not take every core
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    folder, keep = _run_dir()
    aborted = None
    try:
        _phases(run, size, device, folder)
    except Exception as exc:  # noqa: BLE001  (outside any phase: still write what was measured)
        aborted = f"{type(exc).__name__}: {exc}"
        run.say(f"aborted: {aborted}")
    finally:
        torch.set_num_threads(threads)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    report = {"size": size, "device": device, "gpu": torch.cuda.get_device_name(0) if cuda else None,
              "machine": machine(), "versions": versions(), "budget_s": budget,
              "elapsed_s": round(run.elapsed(), 1), "target_p50_ms": TARGET_P50_MS,
              "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
              "run_dir": str(folder) if keep else None, "aborted": aborted, "phases": run.phases}
    print(table(run.phases), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if aborted else 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "tensorrt-child":
        sys.exit(tensorrt_child(*sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} tensorrt-child ONNX_DIR INPUTS CACHE RESULT REPEATS (internal)")
