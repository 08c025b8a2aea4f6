"""ONNX export (runtime.model.onnx_export) and the ONNX Runtime engine (runtime.model.engine_ort),
checked against the PyTorch reference on a tiny random MergeVLA with two tasks.

The model is exported once per module (about 35 s on 2 CPU cores, the whole file 50-60 s), so
these tests stay in the default run. Observed float32 parity on CPU: max |ORT - torch| about 1e-6
on actions of magnitude about 2; the tolerance is 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

for _needed in ("torch", "timm", "transformers", "onnx", "onnxscript", "onnxruntime"):  # the 'model' extra
    pytest.importorskip(_needed, reason="needs the model extra: pip install -e '.[model]'")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from armada.runtime.model import engine_ort  # noqa: E402
from armada.runtime.model.engine_ort import OrtEngine, OrtEngineError, device_of_session_providers  # noqa: E402
from armada.runtime.model.mergevla import MergeVLAConfig, MergeVLAModel, randomize_  # noqa: E402
from armada.runtime.model.onnx_export import export_onnx  # noqa: E402

C = MergeVLAConfig.tiny(num_tasks=2)
PROMPT_LEN = 5
ATOL_CPU = 1e-4  # float32, same math; observed about 1e-6
ATOL_GPU = 5e-4  # float32 with TF32 off; GPU kernels reduce in another order (not run on this machine)


@pytest.fixture(scope="module")
def model() -> MergeVLAModel:
    return randomize_(MergeVLAModel(C), seed=0).eval()


@pytest.fixture(scope="module")
def exported(model: MergeVLAModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("onnx")
    calls: list[tuple[str, int, int]] = []
    manifest = export_onnx(model, out, prompt_len=PROMPT_LEN, opset=18,
                           progress=lambda name, done, total, seconds: calls.append((name, done, total)))
    return {"dir": out, "manifest": manifest, "progress": calls}


@pytest.fixture(scope="module")
def engine(exported: dict[str, Any]) -> OrtEngine:
    return OrtEngine(exported["dir"], providers=["CPUExecutionProvider"])


def make_inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch, C.num_images, 3, C.image_size, C.image_size)
    return {
        "pixels_dino": rng.standard_normal(shape, dtype=np.float32),
        "pixels_siglip": rng.standard_normal(shape, dtype=np.float32),
        "prompt_ids": rng.integers(0, C.llm.vocab, (batch, PROMPT_LEN), dtype=np.int64),
        "proprio_normalized": rng.uniform(-1, 1, (batch, C.proprio_dim)).astype(np.float32),
    }


def reference(model: MergeVLAModel, inputs: dict[str, np.ndarray], expert: int) -> np.ndarray:
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        return model.predict_normalized_actions(**tensors, expert=expert).numpy()


# --------------------------------------------------------------------------- export


def test_manifest_lists_the_graphs(exported: dict[str, Any]) -> None:
    out: Path = exported["dir"]
    manifest = json.loads((out / "onnx_manifest.json").read_text())
    assert manifest == exported["manifest"]
    for name in ("vision", "llm", "head", "embed"):
        graph = manifest["graphs"][name]
        assert graph["file"] == f"{name}.onnx"
        assert all((out / f).is_file() for f in graph["files"])
    assert manifest["prompt_len"] == PROMPT_LEN
    assert manifest["sequence_length"] == C.sequence_length(PROMPT_LEN)
    assert manifest["opset"] == 18
    assert manifest["exporter"]["torch"] == torch.__version__
    assert "transformers" in manifest["exporter"]

    def io(graph: str, kind: str) -> dict[str, list]:
        return {v["name"]: v["shape"] for v in manifest["graphs"][graph][kind]}

    layers, dim = C.llm.layers + 1, C.llm.hidden
    pixels = ["batch", C.num_images, 3, C.image_size, C.image_size]
    assert io("vision", "inputs") == {"pixels_dino": pixels, "pixels_siglip": pixels}
    assert io("vision", "outputs") == {"image_embeds": ["batch", C.num_image_tokens, dim]}
    assert io("llm", "inputs") == {"inputs_embeds": ["batch", C.sequence_length(PROMPT_LEN), dim]}
    assert io("llm", "outputs") == {"task_hidden": ["batch", layers, C.num_image_tokens, dim],
                                    "action_hidden": ["batch", layers, C.num_action_queries, dim]}
    assert io("head", "inputs") == {"task_hidden": ["batch", layers, C.num_image_tokens, dim],
                                    "action_hidden": ["batch", layers, C.num_action_queries, dim],
                                    "proprio_normalized": ["batch", C.proprio_dim], "expert": [1]}
    assert io("head", "outputs") == {"actions": ["batch", C.chunk, C.action_dim]}
    assert [c[0] for c in exported["progress"]] == ["vision", "embed", "llm", "head"]
    assert exported["progress"][-1][1:] == (4, 4)


def test_each_graph_matches_its_pytorch_part(model: MergeVLAModel, engine: OrtEngine) -> None:
    inputs = make_inputs(batch=2, seed=3)
    with torch.no_grad():
        image = model.vla.vision(torch.from_numpy(inputs["pixels_dino"]), torch.from_numpy(inputs["pixels_siglip"]))
        embeds = model.vla.build_inputs_embeds(image, torch.from_numpy(inputs["prompt_ids"]))
        task, action = model.vla.slice_for_head(model.vla.llm_hidden_states(embeds), PROMPT_LEN)
    (ort_image,) = engine.sessions["vision"].run(None, {k: inputs[k] for k in ("pixels_dino", "pixels_siglip")})
    np.testing.assert_allclose(ort_image, image.numpy(), atol=ATOL_CPU, rtol=0)
    # host assembly from the torch image embeddings: exact gathers and copies
    np.testing.assert_array_equal(engine.assemble_inputs_embeds(image.numpy(), inputs["prompt_ids"]), embeds.numpy())
    ort_task, ort_action = engine.sessions["llm"].run(None, {"inputs_embeds": embeds.numpy()})
    np.testing.assert_allclose(ort_task, task.numpy(), atol=ATOL_CPU, rtol=0)
    np.testing.assert_allclose(ort_action, action.numpy(), atol=ATOL_CPU, rtol=0)


# --------------------------------------------------------------------------- engine


@pytest.mark.parametrize("batch", [1, 2])
def test_actions_match_pytorch_for_both_experts(model: MergeVLAModel, engine: OrtEngine, batch: int) -> None:
    inputs = make_inputs(batch, seed=batch)
    for expert in range(C.num_tasks):
        actions = engine.predict_normalized(**inputs, expert=expert)
        expected = reference(model, inputs, expert)
        assert actions.shape == (batch, C.chunk, C.action_dim) and actions.dtype == np.float32
        diff = float(np.abs(actions - expected).max())
        assert diff < ATOL_CPU, f"expert {expert}: max |ORT - torch| = {diff:.2e}"
    assert set(engine.timing) == {"vision", "embed", "llm", "head", "total"}
    assert all(ms >= 0 for ms in engine.timing.values())


def test_expert_input_selects_the_expert(model: MergeVLAModel, engine: OrtEngine) -> None:
    inputs = make_inputs(batch=1, seed=7)
    first = engine.predict_normalized(**inputs, expert=0)
    second = engine.predict_normalized(**inputs, expert=1)
    # randomized experts differ by O(1), far above the parity tolerance
    assert np.abs(first - second).max() > 100 * ATOL_CPU
    np.testing.assert_allclose(second, reference(model, inputs, 1), atol=ATOL_CPU, rtol=0)


def test_wrong_prompt_length_is_refused(engine: OrtEngine) -> None:
    inputs = make_inputs(batch=1, seed=0)
    inputs["prompt_ids"] = np.zeros((1, PROMPT_LEN + 2), dtype=np.int64)
    with pytest.raises(OrtEngineError, match=rf"prompt length {PROMPT_LEN + 2} differs .* {PROMPT_LEN}.*re-export"):
        engine.predict_normalized(**inputs, expert=0)


@pytest.mark.parametrize("expert", [-1, 2, True, 0.0])
def test_bad_expert_is_refused(engine: OrtEngine, expert: Any) -> None:
    with pytest.raises(OrtEngineError, match="expert"):
        engine.predict_normalized(**make_inputs(batch=1, seed=0), expert=expert)


def test_bad_shapes_and_ids_are_refused(engine: OrtEngine) -> None:
    inputs = make_inputs(batch=2, seed=0)
    with pytest.raises(OrtEngineError, match="proprio_normalized"):
        engine.predict_normalized(**{**inputs, "proprio_normalized": inputs["proprio_normalized"][:1]}, expert=0)
    with pytest.raises(OrtEngineError, match="pixels_siglip"):
        engine.predict_normalized(**{**inputs, "pixels_siglip": inputs["pixels_siglip"][:, :1]}, expert=0)
    with pytest.raises(OrtEngineError, match="token ids"):
        engine.predict_normalized(**{**inputs, "prompt_ids": inputs["prompt_ids"] + C.llm.vocab}, expert=0)


def _fake_session_class(reported: list[str], requests: list[list[str]]) -> type:
    real_session = ort.InferenceSession

    class FakeSession:
        """A real CPU session that claims the providers `reported`, recording what was requested."""

        def __init__(self, path: str, sess_options: Any = None, providers: Any = None):
            requests.append([p if isinstance(p, str) else p[0] for p in providers])
            self._real = real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self) -> list[str]:
            return list(reported)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

    return FakeSession


@pytest.mark.parametrize("reported, device", [
    (["CPUExecutionProvider"], "cpu"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "tensorrt"),
])
def test_device_comes_from_get_providers_not_the_request(exported: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                         reported: list[str], device: str) -> None:
    requests: list[list[str]] = []
    monkeypatch.setattr(engine_ort.ort, "InferenceSession", _fake_session_class(reported, requests))
    requested = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    eng = OrtEngine(exported["dir"], providers=requested)
    assert requests == [requested] * 4  # every graph asked for the GPU providers ...
    assert eng.device == device  # ... and the device is what the sessions say they use
    assert all(used == reported for used in eng.session_providers.values())


@pytest.mark.parametrize("driver", [True, False])
def test_auto_asks_for_gpu_providers_only_with_an_nvidia_driver(monkeypatch: pytest.MonkeyPatch, driver: bool) -> None:
    monkeypatch.setattr(engine_ort.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(engine_ort, "nvidia_driver_present", lambda: driver)
    expected = (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"] if driver
                else ["CPUExecutionProvider"])
    assert engine_ort.resolve_providers("auto") == expected


def test_auto_providers_on_this_machine(exported: dict[str, Any]) -> None:
    eng = OrtEngine(exported["dir"], providers="auto")
    asked = [p for p in eng.requested_providers if isinstance(p, str)]
    if engine_ort.nvidia_driver_present():
        assert "CUDAExecutionProvider" in asked or "CUDAExecutionProvider" not in ort.get_available_providers()
    else:
        assert asked == ["CPUExecutionProvider"]  # no driver: no page of CUDA/TensorRT load errors
    assert eng.device == min((device_of_session_providers(s.get_providers()) for s in eng.sessions.values()),
                             key=["cpu", "cuda", "tensorrt"].index)
    if not torch.cuda.is_available():
        # onnxruntime-gpu lists CUDA as available without a GPU; the sessions fall back to the CPU
        assert eng.device == "cpu"


def test_engine_module_does_not_import_torch() -> None:
    code = "import sys, runtime.model.engine_ort; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
def test_gpu_parity(model: MergeVLAModel, exported: dict[str, Any]) -> None:
    providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    eng = OrtEngine(exported["dir"], providers=providers)
    if eng.device != "cuda":
        pytest.skip(f"onnxruntime created no CUDA session here (get_providers: {eng.session_providers['llm']})")
    inputs = make_inputs(batch=2, seed=11)
    for expert in range(C.num_tasks):
        actions = eng.predict_normalized(**inputs, expert=expert)
        np.testing.assert_allclose(actions, reference(model, inputs, expert), atol=ATOL_GPU, rtol=0)
