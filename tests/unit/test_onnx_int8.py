"""The opt-in int8 ONNX export (export_onnx(..., quantize="int8")) against the float32 PyTorch model.

int8 changes the actions by design; this file checks that the change stays within the stated
tolerance (onnx_export.INT8_PARITY_TOLERANCE, normalized action units) on the tiny random model, that
the graphs really are quantized, and that the default float export is untouched (test_onnx.py keeps
its 1e-4 parity). One export per module, about 40 s on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

for _needed in ("torch", "timm", "transformers", "onnx", "onnxscript", "onnxruntime"):  # the 'model' extra
    pytest.importorskip(_needed, reason="needs the model extra: pip install -e '.[model]'")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from armada.runtime.model.engine_ort import OrtEngine  # noqa: E402
from armada.runtime.model.mergevla import MergeVLAConfig, MergeVLAModel, randomize_  # noqa: E402
from armada.runtime.model.onnx_export import INT8_PARITY_TOLERANCE, QUANTIZED_GRAPHS, export_onnx  # noqa: E402

C = MergeVLAConfig.tiny(num_tasks=2)
PROMPT_LEN = 5


@pytest.fixture(scope="module")
def model() -> MergeVLAModel:
    return randomize_(MergeVLAModel(C), seed=0).eval()


@pytest.fixture(scope="module")
def exported(model: MergeVLAModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("onnx-int8")
    manifest = export_onnx(model, out, prompt_len=PROMPT_LEN, quantize="int8")
    return {"dir": out, "manifest": manifest}


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


def test_manifest_and_graphs_say_int8(exported: dict[str, Any], engine: OrtEngine) -> None:
    quantization = exported["manifest"]["quantization"]
    assert quantization["type"] == "int8" and engine.quantization == quantization
    assert quantization["tested_parity_normalized_actions"] == INT8_PARITY_TOLERANCE
    out: Path = exported["dir"]
    for name in QUANTIZED_GRAPHS:
        graph = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        integer = [n for n in graph.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
        assert integer and len(integer) == quantization["graphs"][name]["matmul_integer_nodes"], name
        int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert int8_weights, f"{name}: no int8 weights"
        assert all((out / f).is_file() for f in exported["manifest"]["graphs"][name]["files"])
    assert not list(out.glob("*.float.onnx*")), "the float intermediates must be removed"


@pytest.mark.parametrize("batch, seed", [(1, 1), (2, 2), (2, 3)])
def test_int8_actions_stay_within_the_stated_tolerance(model: MergeVLAModel, engine: OrtEngine,
                                                       batch: int, seed: int) -> None:
    inputs = make_inputs(batch, seed)
    for expert in range(C.num_tasks):
        actions = engine.predict_normalized(**inputs, expert=expert)
        expected = reference(model, inputs, expert)
        assert actions.shape == expected.shape and actions.dtype == np.float32
        gap = float(np.abs(actions - expected).max())
        assert gap < INT8_PARITY_TOLERANCE, f"expert {expert}: max |int8 ORT - torch| = {gap:.3f}"
        # quantized for real: a float graph would sit at about 1e-6 (test_onnx.py)
        assert gap > 1e-3


def test_bad_quantize_values_are_refused(model: MergeVLAModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        export_onnx(model, tmp_path, prompt_len=PROMPT_LEN, quantize="int4")
    half = MergeVLAModel(C).half()
    with pytest.raises(ValueError, match="starts from float32 weights"):
        export_onnx(half, tmp_path, prompt_len=PROMPT_LEN, quantize="int8")
    assert not list(tmp_path.iterdir()), "refused before writing anything"
