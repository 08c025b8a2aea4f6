"""`armada bench model`: chunk latency, router cost and routing memory, printed as numbers.

Sizes: "tiny" (the test model, ~2 MB) and "mid" (a scaled-down MergeVLA, ~100 MB of weights,
still the real structure). Real size needs a GPU and a real checkpoint; see docs/benchmarks.md.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from armada.runtime.bench import _pct
from armada.runtime.inference.observation import Observation
from armada.runtime.inference.policy import ActionSpace


def mid_config_overrides() -> dict[str, Any]:
    from armada.runtime.model.mergevla import DinoConfig, LLMConfig, SiglipConfig

    return dict(image_size=112, dino=DinoConfig(width=256, depth=6, heads=4),
                siglip=SiglipConfig(width=256, depth=6, heads=4, mlp=1024),
                llm=LLMConfig(hidden=448, layers=8, heads=7, kv_heads=1, intermediate=1792, vocab=4096),
                num_action_queries=64)


def _policy(size: str, tasks: int, folder: Path):
    from armada.runtime.model.policy import MergedVLAPolicy
    from armada.runtime.model.tiny import make_tiny_bundle

    path = folder / f"{size}-{tasks}"
    if not (path / "manifest.json").exists():
        overrides = mid_config_overrides() if size == "mid" else {}
        make_tiny_bundle(path, num_tasks=tasks, config_overrides=overrides)
    return MergedVLAPolicy(path, verify=False)


def _observation(seed: int = 0) -> Observation:
    from armada.runtime.config import load_embodiment

    state = load_embodiment("mock_arm").home
    rng = np.random.default_rng(seed)
    frames = {c: (rng.random((480, 640, 3)) * 255).astype(np.uint8) for c in ("front", "wrist")}
    return Observation(time.monotonic_ns(), time.time_ns(), state.copy(), frames)


def _space() -> ActionSpace:
    from armada.runtime.config import load_embodiment

    emb = load_embodiment("mock_arm")
    return ActionSpace(emb.joint_names, emb.lower, emb.upper, emb.gripper_mask())


def _rss_hwm_mb() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _normalized_gap(stats: Any, a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| of two unnormalized chunks, in normalized action units (the model's [-1, 1]
    scale): unnormalize is affine per dimension, so the gap just divides by its slope."""
    from armada.runtime.model.bundle import NORM_EPS

    lo, hi = stats.bounds()
    slope = np.where(stats.mask, 0.5 * (hi - lo + NORM_EPS), 1.0)
    return float(np.abs((np.asarray(a) - np.asarray(b)) / slope).max())


def _time_chunks(policy: Any, task: str, repeats: int, observations: list[Observation]) -> tuple[dict, list]:
    """Latency percentiles of policy.infer on observations[0], and one chunk per observation."""
    policy.reset(_space())
    policy.route(observations[0], "auto", pinned_task=task)
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        policy.infer(observations[0])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        policy.infer(observations[0])
        times.append((time.perf_counter() - started) * 1e3)
    return _pct(times), [policy.infer(obs).actions for obs in observations]


def _one_gray_level_off(obs: Observation) -> Observation:
    """The observation with every pixel of one camera one gray level off (the lowest bit flipped):
    an invisible change, below a camera's own noise."""
    import dataclasses

    camera = sorted(obs.frames)[0]
    return dataclasses.replace(obs, frames={**obs.frames, camera: obs.frames[camera] ^ np.uint8(1)})


def bench_chunk_latency(size: str, repeats: int, folder: Path) -> dict[str, Any]:
    """Per-chunk latency (preprocessing included) of PyTorch eager and of ONNX Runtime, same bundle.

    Rows: torch_eager; onnxruntime (the default float32 export); onnxruntime_int8 (the opt-in
    export_onnx(quantize="int8"), not the default). parity_max_abs_normalized: each ORT row's max
    |chunk - eager chunk| over 3 observations, in normalized action units. eager_one_gray_level_gap:
    how far eager itself moves when one camera's pixels are one gray level off, the floor below which a
    parity gap means nothing. The bench bundles have random weights; the mid one is chaotic (that
    floor is several units), so only the tiny rows (and tests/unit/test_onnx*.py) measure parity."""
    from armada.runtime.model.onnx_export import export_bundle
    from armada.runtime.model.policy import MergedVLAPolicy

    torch_policy = _policy(size, 2, folder)
    task = torch_policy.manifest.tasks[0].name
    out: dict[str, Any] = {"size": size,
                           "parameters": int(sum(p.numel() for p in torch_policy.engine.model.parameters()))}
    policies = {"torch_eager": torch_policy}
    for name, quantize in (("onnxruntime", None), ("onnxruntime_int8", "int8")):
        onnx_dir = folder / f"onnx-{size}" if quantize is None else folder / f"onnx-{size}-{quantize}"
        started = time.perf_counter()
        export_bundle(torch_policy.bundle.directory, onnx_dir, tasks=[task], quantize=quantize)
        out["export_s" if quantize is None else f"export_{quantize}_s"] = time.perf_counter() - started
        policies[name] = MergedVLAPolicy(torch_policy.bundle.directory, verify=False, onnx_dir=onnx_dir)
    observations = [_observation(seed) for seed in range(3)]
    chunks = {}
    for name, policy in policies.items():
        out[name], chunks[name] = _time_chunks(policy, task, repeats, observations)
    stats = torch_policy.bundle.task(task).action_stats
    out["parity_max_abs_normalized"] = {
        name: max(_normalized_gap(stats, a, b) for a, b in zip(chunks[name], chunks["torch_eager"]))
        for name in ("onnxruntime", "onnxruntime_int8")}
    nudged = [torch_policy.infer(_one_gray_level_off(obs)).actions for obs in observations]
    out["eager_one_gray_level_gap"] = max(_normalized_gap(stats, a, b) for a, b in zip(nudged, chunks["torch_eager"]))
    out["onnxruntime_device"] = policies["onnxruntime"].ort.device
    out["speedup_p50"] = out["torch_eager"]["p50"] / out["onnxruntime"]["p50"]
    out["speedup_p50_int8"] = out["torch_eager"]["p50"] / out["onnxruntime_int8"]["p50"]
    return out


def bench_router(size: str, task_counts: list[int], folder: Path) -> dict[str, Any]:
    out = {}
    for m in task_counts:
        policy = _policy(size, m, folder)
        policy.reset(_space())
        obs = _observation()
        policy.route(obs, "auto")  # warm-up
        forward = []
        for _ in range(5):
            started = time.perf_counter()
            policy.infer(obs)
            forward.append(time.perf_counter() - started)
        cold, warm = [], []
        for _ in range(3):
            # Cold: the weights in place are of no known task (the first route of a process): M
            # swaps. Warm: they are the last episode's task, scored first without a swap.
            for times, held in ((cold, None), (warm, policy.engine.task_index)):
                policy.engine.task_index = held
                started = time.perf_counter()
                policy.route(obs, "auto")
                times.append(time.perf_counter() - started)
        one = float(np.median(forward))
        route, route_warm = float(np.median(cold)), float(np.median(warm))
        out[f"M={m}"] = {"route_ms": route * 1e3, "route_warm_ms": route_warm * 1e3, "one_forward_ms": one * 1e3,
                         "route_over_M_forwards": route / (m * one),
                         "warm_route_over_M_forwards": route_warm / (m * one)}
    return out


def bench_routing_memory(size: str, tasks: int, folder: Path) -> dict[str, Any]:
    import torch

    policy = _policy(size, tasks, folder)
    policy.reset(_space())
    obs = _observation()
    engine = policy.engine
    weights = sum(t.numel() * t.element_size() for t in engine.weights.values())
    base = sum(t.numel() * t.element_size() for t in engine.base.values())
    flips = sum(t.numel() * t.element_size() for t in engine.flips.values())
    masks_packed = sum(np.prod(e.packed_shape or [0]) for f in engine.bundle.manifest.tensors.values()
                       for k, e in f.items() if k.startswith("mask/"))
    policy.route(obs, "auto")  # warm-up: every code path has allocated once
    policy.infer(obs)
    engine.task_index = None
    rss_before, _ = _rss_hwm_mb()
    clear = Path("/proc/self/clear_refs")
    if clear.exists():
        clear.write_text("5")  # reset the peak (VmHWM) to the current RSS
    with torch.no_grad():
        policy.route(obs, "auto")
    rss_after, hwm = _rss_hwm_mb()
    return {"size": size, "tasks": tasks, "base_mb": base / 2**20, "flips_mb": flips / 2**20,
            "masks_packed_mb": float(masks_packed) / 2**20, "one_weight_set_mb": weights / 2**20,
            "rss_before_route_mb": rss_before, "rss_after_route_mb": rss_after, "rss_peak_mb": hwm,
            "peak_growth_during_route_mb": hwm - rss_before,
            "growth_in_weight_sets": (hwm - rss_before) / (weights / 2**20)}


def run_model_bench(quick: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="armada-bench-model-") as tmp:
        folder = Path(tmp)
        results: dict[str, Any] = {}
        for size in ("tiny",) if quick else ("tiny", "mid"):
            print(f"bench model: chunk latency ({size}) ...", flush=True)
            results[f"latency_{size}"] = bench_chunk_latency(size, 10 if quick else 30, folder)
        size = "tiny" if quick else "mid"
        print(f"bench model: router cost ({size}) ...", flush=True)
        results["router"] = bench_router(size, [2, 4] if quick else [2, 4, 8], folder)
        print(f"bench model: memory during routing ({size}) ...", flush=True)
        results["routing_memory"] = bench_routing_memory(size, 4, folder)
    return results
