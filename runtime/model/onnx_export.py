"""Export a MergeVLAModel to ONNX as separate graphs, for `runtime.model.engine_ort.OrtEngine`.

Layout of `out_dir` (the notes' "ONNX" section: host-assembled embeddings, no KV cache, eager
attention, the LLM emitting the sliced hidden states of every layer):

- `vision.onnx`: pixels_dino, pixels_siglip (B, I, 3, S, S) -> image_embeds (B, I * patches, D).
- `embed.onnx`: ids (B, n) int64 -> embeddings (B, n, D); one Gather over the LLM's token table.
- `llm.onnx`: inputs_embeds (B, T, D) -> task_hidden (B, L+1, n_img, D), action_hidden (B, L+1, Q, D).
- `head.onnx`: task_hidden, action_hidden, proprio_normalized (B, P), expert (1,) int64
  -> actions (B, C, A); the proprio projector is inside this graph.
- `host_tensors.npz`: action_queries (Q, D), concatenated into the sequence on the host.
- `onnx_manifest.json`: every graph's inputs and outputs, prompt_len, opset, versions.
Every graph keeps its weights in `<graph>.onnx.data` beside it: the real LLM is about 2 GB in
float32, at the protobuf limit, so one layout for all sizes.

The prompt length is fixed per export. The LLM graph's sequence length T = sequence_length(prompt_len)
and the action-query slice offset both come from prompt_len; the engine refuses another length
rather than padding or truncating, because the graph has no attention mask (the reference runs
unpadded) and truncating changes the instruction. Prompts of another length need another export.

The batch dimension is dynamic in every graph. torch.export specializes sizes 0 and 1, so the
example inputs use batch 2; the graphs then accept any batch >= 1.

Why embed.onnx and not an npz of the token table: the real table is 151936 x 896 (545 MB in float32).
An npz cannot be memory-mapped, so the host would hold it all in RAM just to look up a few dozen
rows; as an ONNX initializer it is stored once, loads with the other sessions and runs where they
run. The action queries are small (Q x D) and are added to every sequence, so they go in the npz.

Precision: by default the graphs keep the model's float dtype (float32: parity with PyTorch within
1e-4, tests/unit/test_onnx.py). `quantize="int8"` is an explicit opt-in for CPU inference: the
MatMul weights of vision, llm and head become int8 (onnxruntime.quantization.quantize_dynamic,
per-tensor; activations are quantized to uint8 per call). On a 2-core Xeon with AVX-512 VNNI/AMX
the mid bench model's chunk takes 68 ms instead of 122 ms (float32 ORT; eager PyTorch 141 ms), but
the actions change: on the tiny test model max |int8 - torch| is about 0.07 in normalized action
units (the test allows INT8_PARITY_TOLERANCE), where one gray level on one camera moves them by
0.01. How far a real checkpoint moves must be measured on it before a robot uses it.
The manifest's "quantization" says which precision an export has.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from armada.runtime.model.engine_ort import HOST_TENSORS_NAME, MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from armada.runtime.model.mergevla import MergeVLAModel, PrismaticVLA

QUANTIZATIONS = ("int8",)
# Max |int8 ORT - float32 torch| allowed by the test, in normalized action units (actions in [-1, 1]).
# Observed on the tiny test model: 0.03 to 0.07 over 8 input/expert draws; twice that as the bound.
INT8_PARITY_TOLERANCE = 0.15
QUANTIZED_GRAPHS = ("vision", "llm", "head")  # embed is one Gather: nothing to quantize

EXPORT_BATCH = 2  # not 1: torch.export would specialize the batch dimension to a constant 1
BATCH_DIM_NAME = "batch"

# progress(graph_name, graphs_done, graphs_total, seconds_for_this_graph), called after each graph
ExportProgress = Callable[[str, int, int, float], None]


# --------------------------------------------------------------------------- wrappers


class VisionGraph(nn.Module):
    def __init__(self, vla: PrismaticVLA):
        super().__init__()
        self.vla = vla

    def forward(self, pixels_dino: Tensor, pixels_siglip: Tensor) -> Tensor:
        return self.vla.vision(pixels_dino, pixels_siglip)


class LLMGraph(nn.Module):
    """llm_hidden_states + slice_for_head for one fixed prompt length (the slice offset depends on it)."""

    def __init__(self, vla: PrismaticVLA, prompt_len: int):
        super().__init__()
        self.vla = vla
        self.prompt_len = prompt_len

    def forward(self, inputs_embeds: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.vla.llm_hidden_states(inputs_embeds)
        return self.vla.slice_for_head(hidden, self.prompt_len)


class HeadGraph(nn.Module):
    """Proprio projector + merged head; the expert is an input, so one graph serves every task."""

    def __init__(self, model: MergeVLAModel):
        super().__init__()
        self.proprio_projector = model.proprio_projector
        self.action_head = model.action_head

    def forward(self, task_hidden: Tensor, action_hidden: Tensor, proprio_normalized: Tensor,
                expert: Tensor) -> Tensor:
        proprio = self.proprio_projector(proprio_normalized.to(action_hidden.dtype))
        return self.action_head(task_hidden, action_hidden, proprio, expert)


# --------------------------------------------------------------------------- export


def _torch_export(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], dynamic_shapes: dict[str, Any], opset: int) -> None:
    with warnings.catch_warnings():
        # the exporter warns once per extra input that shares the one "batch" Dim; expected here
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape.*")
        torch.onnx.export(
            module.eval(), args, str(path), dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=True, verbose=False,
        )


def _write_embed_graph(table: np.ndarray, path: Path, opset: int) -> None:
    """A single Gather over the token table, written directly: nothing for torch.export to trace."""
    tensor_type = helper.np_dtype_to_tensor_dtype(table.dtype)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens", "ids"], ["embeddings"], axis=0)],
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [BATCH_DIM_NAME, "tokens"])],
        [helper.make_tensor_value_info("embeddings", tensor_type, [BATCH_DIM_NAME, "tokens", table.shape[1]])],
        [numpy_helper.from_array(table, "embed_tokens")],
    )
    opsets = [helper.make_opsetid("", opset)]
    # onnx's default IR version can be newer than the installed onnxruntime reads; the lowest one
    # that carries this opset loads everywhere the other graphs load
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    # onnx creates the data file owner-only (0600); give it the graph file's mode like the other
    # graphs' data files, so a service user can read an export made by another account
    data = path.with_name(path.name + ".data")
    data.chmod(path.stat().st_mode & 0o777)


def _quantize_int8(path: Path) -> dict[str, Any]:
    """Replace the float graph at `path` by one with int8 MatMul weights; returns what was done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415 (opt-in only)

    model = onnx.load(str(path))
    # The dynamo exporter's value_info annotations fail onnx's strict re-inference inside
    # quantize_dynamic (the head's expert Gathers: "inferred shape and existing shape differ");
    # they are hints only, and ONNX Runtime infers shapes itself when it loads the graph.
    del model.graph.value_info[:]
    source = path.with_name(path.stem + ".float.onnx")
    onnx.save_model(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=source.name + ".data", size_threshold=0)
    del model
    data = path.with_name(path.name + ".data")
    mode = path.stat().st_mode & 0o777
    try:
        path.unlink()
        data.unlink(missing_ok=True)
        # MatMulConstBOnly: only MatMuls with a weight operand; activation x activation products
        # (attention scores) stay float. Per-tensor scales: per-channel measured no better here.
        quantize_dynamic(str(source), str(path), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=False, use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    finally:
        source.unlink(missing_ok=True)
        source.with_name(source.name + ".data").unlink(missing_ok=True)
    if data.exists():
        data.chmod(mode)  # onnx writes it owner-only; keep the graph file's mode (see _write_embed_graph)
    quantized = onnx.load(str(path), load_external_data=False)
    return {"matmul_integer_nodes": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                                        for n in quantized.graph.node)}


def _value_infos(values: Any) -> list[dict[str, Any]]:
    infos = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        infos.append({"name": value.name, "shape": shape, "dtype": dtype})
    return infos


def _describe_graph(path: Path) -> dict[str, Any]:
    """Inputs and outputs as the saved file declares them (so the manifest cannot drift from it)."""
    model = onnx.load(str(path), load_external_data=False)
    files = [path.name] + sorted(p.name for p in path.parent.glob(path.name + ".data"))
    return {"file": path.name, "files": files, "inputs": _value_infos(model.graph.input),
            "outputs": _value_infos(model.graph.output)}


def _check_prompt_len(prompt_len: int) -> None:
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
        raise ValueError(f"prompt_len must be an int >= 1, got {prompt_len!r}")


def _check_quantize(quantize: str | None, dtype: torch.dtype) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}")
    if dtype != torch.float32:
        raise ValueError(f"quantize={quantize!r} starts from float32 weights, the model is {dtype}")


def export_onnx(model: MergeVLAModel, out_dir: str | Path, prompt_len: int, opset: int = 18,
                progress: ExportProgress | None = None, quantize: str | None = None) -> dict[str, Any]:
    """Export vision, embed, llm and head graphs plus host tensors and the manifest into out_dir.

    prompt_len: the number of prompt ids (without BOS) the LLM graph is built for; fixed per export.
    progress: called after each graph as progress(name, done, total, seconds).
    quantize: None (default: the model's float weights, parity 1e-4) or "int8" (opt-in, CPU: int8
    MatMul weights; actions move by up to INT8_PARITY_TOLERANCE, see the module docstring).
    Returns the manifest (also written to out_dir/onnx_manifest.json). Uses the model's device and
    dtype (float32 or float16; bfloat16 has too few ONNX Runtime kernels: cast the model first)."""
    _check_prompt_len(prompt_len)
    c = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"export needs a float32 or float16 model, got {dtype}: call model.float() first")
    _check_quantize(quantize, dtype)

    # Example inputs: only their shapes and dtypes matter; values are seeded for reproducibility.
    g = torch.Generator().manual_seed(0)
    batch, dim = EXPORT_BATCH, c.llm.hidden
    pixels_shape = (batch, c.num_images, 3, c.image_size, c.image_size)
    pixels_dino = torch.randn(pixels_shape, generator=g).to(device, dtype)
    pixels_siglip = torch.randn(pixels_shape, generator=g).to(device, dtype)
    seq_len = c.sequence_length(prompt_len)
    inputs_embeds = torch.randn(batch, seq_len, dim, generator=g).to(device, dtype)
    task_hidden = torch.randn(batch, c.llm.layers + 1, c.num_image_tokens, dim, generator=g).to(device, dtype)
    action_hidden = torch.randn(batch, c.llm.layers + 1, c.num_action_queries, dim, generator=g).to(device, dtype)
    proprio = torch.randn(batch, c.proprio_dim, generator=g).to(device, dtype)
    expert = torch.zeros(1, dtype=torch.int64, device=device)

    b = torch.export.Dim(BATCH_DIM_NAME, min=1)
    vla = model.vla

    def export_vision(path: Path) -> None:
        _torch_export(VisionGraph(vla), (pixels_dino, pixels_siglip), path,
                      ["pixels_dino", "pixels_siglip"], ["image_embeds"],
                      {"pixels_dino": {0: b}, "pixels_siglip": {0: b}}, opset)

    def export_embed(path: Path) -> None:
        table = vla.language_model.get_input_embeddings().weight.detach().cpu().numpy()
        _write_embed_graph(table, path, opset)

    def export_llm(path: Path) -> None:
        _torch_export(LLMGraph(vla, prompt_len), (inputs_embeds,), path, ["inputs_embeds"],
                      ["task_hidden", "action_hidden"], {"inputs_embeds": {0: b}}, opset)

    def export_head(path: Path) -> None:
        _torch_export(HeadGraph(model), (task_hidden, action_hidden, proprio, expert), path,
                      ["task_hidden", "action_hidden", "proprio_normalized", "expert"], ["actions"],
                      {"task_hidden": {0: b}, "action_hidden": {0: b}, "proprio_normalized": {0: b},
                       "expert": None}, opset)

    steps = {"vision": export_vision, "embed": export_embed, "llm": export_llm, "head": export_head}
    graphs: dict[str, Any] = {}
    timings: dict[str, float] = {}
    quantized: dict[str, Any] = {}
    was_training = model.training
    model.eval()  # restored below: the caller's module should come back as it was given
    try:
        with torch.no_grad():
            for done, (name, step) in enumerate(steps.items(), start=1):
                started = time.perf_counter()
                path = out / f"{name}.onnx"
                for stale in (path, path.with_name(path.name + ".data")):
                    stale.unlink(missing_ok=True)  # a previous export's weights must not linger
                step(path)
                if quantize == "int8" and name in QUANTIZED_GRAPHS:
                    quantized[name] = _quantize_int8(path)
                graphs[name] = _describe_graph(path)
                timings[name] = round(time.perf_counter() - started, 3)
                if progress is not None:
                    progress(name, done, len(steps), timings[name])
            queries = vla.action_queries.weight.detach().cpu().numpy()
            np.savez(out / HOST_TENSORS_NAME, action_queries=queries)
    finally:
        model.train(was_training)

    import onnxscript  # noqa: PLC0415  (only for its version: the dynamo exporter runs on it)
    import transformers  # noqa: PLC0415

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "opset": opset,
        "prompt_len": prompt_len,
        "sequence_length": seq_len,
        "batch": "dynamic (named 'batch'; exported with an example batch of 2)",
        "dtype": np.dtype(queries.dtype).name,
        "num_experts": c.num_tasks,
        "stop_token_id": c.stop_token_id,
        "vocab_size": c.llm.vocab,
        "num_image_tokens": c.num_image_tokens,
        "num_action_queries": c.num_action_queries,
        "chunk": c.chunk,
        "action_dim": c.action_dim,
        "proprio_dim": c.proprio_dim,
        "assembly": "inputs_embeds = concat(embed(prompt_ids)[:, :1], image_embeds, "
                    "embed(prompt_ids)[:, 1:], action_queries, embed([stop_token_id])) along tokens",
        "host_tensors": {"file": HOST_TENSORS_NAME, "arrays": {"action_queries": list(queries.shape)}},
        "graphs": graphs,
        "quantization": None if quantize is None else {
            "type": quantize,
            "method": "onnxruntime.quantization.quantize_dynamic(op_types=['MatMul'], weight_type=QInt8, "
                      "per_channel=False, MatMulConstBOnly=True); activations uint8, quantized per call",
            "graphs": quantized,
            "tested_parity_normalized_actions": INT8_PARITY_TOLERANCE,
        },
        "export_seconds": timings,
        "exporter": {
            "method": "torch.onnx.export(dynamo=True) for vision/llm/head; onnx.helper for embed",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
        },
        "architecture": c.to_dict(),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_bundle(bundle_dir: str | Path, out_dir: str | Path, tasks: list[str] | None = None,
                  instruction: str | None = None, progress: Callable[[str], None] | None = None,
                  quantize: str | None = None) -> list[Path]:
    """Export one graph set per task of a merged bundle: ``out_dir/<task name>/``.

    The VLM weights differ per task (the task's mask), so each task gets its own vision and LLM
    graphs, built from that task's materialized weights. The prompt length is fixed per export:
    each task's own instruction (or ``instruction``) sets it. ``quantize``: as in export_onnx.
    """
    from armada.runtime.model.bundle import load_bundle
    from armada.runtime.model.engine import TorchEngine
    from armada.runtime.model.policy import PromptTokenizer

    say = progress or (lambda _: None)
    bundle = load_bundle(bundle_dir)
    engine = TorchEngine(bundle)
    tokenizer = PromptTokenizer(bundle.manifest.prompt, bundle.directory, engine.config.llm.vocab)
    chosen = [bundle.task(name) for name in tasks] if tasks else list(bundle.manifest.tasks)
    written = []
    for task in chosen:
        engine.use_task(task.expert_index)
        prompt_len = len(tokenizer.ids(instruction or task.instruction))
        target = Path(out_dir) / task.name
        say(f"exporting task {task.name} (prompt length {prompt_len}) to {target}")
        export_onnx(engine.model, target, prompt_len, quantize=quantize)
        written.append(target)
    return written
