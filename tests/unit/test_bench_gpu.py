"""`armada bench gpu` at tiny size on this machine: every phase measured or skipped with a reason,
and no phase claims a GPU that is not there. The GPU numbers themselves need a lent GPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
import torch  # noqa: E402

from armada.runtime.model import bench_gpu  # noqa: E402
from armada.runtime.model.bundle import load_bundle  # noqa: E402

NO_CUDA = not torch.cuda.is_available()


def _args(tmp_path: Path, **overrides: Any) -> argparse.Namespace:
    values = dict(size="tiny", quick=True, budget_s=None, json=tmp_path / "gpu.json") | overrides
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench-gpu")
    assert bench_gpu.run_gpu_bench(_args(tmp)) == 0
    return json.loads((tmp / "gpu.json").read_text())


def test_every_phase_is_measured_or_skipped_with_a_reason(report: dict[str, Any]) -> None:
    phases = report["phases"]
    assert list(phases) == list(bench_gpu.PHASES)
    for name, result in phases.items():
        assert result["status"] in ("measured", "skipped"), (name, result)
        if result["status"] == "skipped":
            assert result["reason"].strip(), name
    for name in ("build", "torch_eager_fp32", "onnxruntime", "parity", "router"):
        assert phases[name]["status"] == "measured", (name, phases[name])
    assert report["machine"] and report["versions"]["torch"] == torch.__version__


@pytest.mark.skipif(not NO_CUDA, reason="checks the honesty of the skips on a machine without CUDA")
def test_no_phase_claims_a_gpu_without_cuda(report: dict[str, Any]) -> None:
    assert report["device"] == "cpu" and report["gpu"] is None
    for name, result in report["phases"].items():
        if result["status"] == "measured" and "device" in result:
            assert result["device"] == "cpu", (name, result["device"])
    ort = report["phases"]["onnxruntime"]
    assert set(p[0] for p in ort["session_providers"].values()) == {"CPUExecutionProvider"}
    assert "no CUDA" in ort["notes"]
    for name in bench_gpu.GPU_ONLY:
        assert "CUDA" in report["phases"][name]["reason"]
    assert "--quick" in report["phases"]["torch_compile"]["reason"]  # CPU compile is opt-in (slow)


def test_latency_and_parity_are_numbers_that_mean_something(report: dict[str, Any]) -> None:
    phases = report["phases"]
    for name in ("torch_eager_fp32", "torch_eager_bf16", "onnxruntime"):
        row = phases[name]
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], name
    rows = phases["parity"]["rows"]
    # float32 ONNX Runtime on the CPU: within the export's stated tolerance (1e-4), and above zero
    # (a different runtime: an exact 0 would mean the same outputs were compared twice)
    assert 0 < rows["onnxruntime"]["max_abs_normalized"] <= bench_gpu.FP32_TOLERANCE["cpu"]
    assert rows["onnxruntime"]["within"] is True
    # bf16 rounds: a visible gap, but far below the [-1, 1] range on this well-conditioned model
    assert 1e-5 < rows["torch_eager_bf16"]["max_abs_normalized"] < 0.5
    assert phases["onnxruntime"]["parity"] == rows["onnxruntime"]["max_abs_normalized"]
    router = phases["router"]
    for m in bench_gpu.ROUTER_M:
        cost = router[f"M={m}"]
        assert cost["route_ms"] > 0 and cost["route_warm_ms"] > 0
        assert cost["route_over_M_forwards"] == pytest.approx(cost["route_ms"] / (m * router["one_forward_ms"]))


def test_a_spent_budget_skips_every_phase_with_its_reason(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_gpu.run_gpu_bench(_args(tmp_path, budget_s=0)) == 0
    phases = json.loads((tmp_path / "gpu.json").read_text())["phases"]
    assert phases["build"]["status"] == "skipped" and "budget" in phases["build"]["reason"]
    for name in bench_gpu.PHASES[1:]:
        assert phases[name]["status"] == "skipped" and "no bundle" in phases[name]["reason"]
    table = capsys.readouterr().out
    assert all(name in table for name in bench_gpu.PHASES)


def test_random_bundle_has_the_real_layout_and_orthonormal_routers(tmp_path: Path) -> None:
    config = bench_gpu.config_for("tiny")
    manifest = bench_gpu.build_random_bundle(tmp_path / "b", config, "cpu", say=lambda _: None)
    assert len(manifest.tasks) == bench_gpu.NUM_TASKS
    bundle = load_bundle(tmp_path / "b")  # verify=True: checksums and the schema
    head = bundle.tensors("action_head.safetensors")
    router = head["model.gate.gate.0.routers.0"]
    np.testing.assert_allclose(router @ router.T, np.eye(router.shape[0]), atol=1e-5)
    masks = [bundle.mask(m, bundle.mask_keys(0)[0]) for m in range(2)]
    assert 0.3 < masks[0].mean() < 0.7 and not np.array_equal(masks[0], masks[1])  # tasks differ
