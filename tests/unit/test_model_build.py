"""Bundles built from checkpoints (runtime.model.build): merge, CapVector, MergeVLA import."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the model extra: pip install -e '.[model]'")
pytest.importorskip("timm", reason="needs the model extra")

from safetensors.torch import save_file  # noqa: E402

from armada.runtime.model import merge  # noqa: E402
from armada.runtime.model.build import (  # noqa: E402
    BuildError,
    Serving,
    capvector_bundle,
    import_mergevla,
    load_task_checkpoint,
    load_torch_pickle,
    merge_bundle,
)
from armada.runtime.model.bundle import load_bundle  # noqa: E402
from armada.runtime.model.engine import TorchEngine  # noqa: E402
from armada.runtime.model.mergevla import (  # noqa: E402
    EMBED_KEY, LM_HEAD_KEY, ActionHead, MergeVLAConfig, MergeVLAModel, ProprioProjector, randomize_,
)
from armada.runtime.model.tiny import BASE_FILE, HEAD_FILE, PROPRIO_FILE, TAU_FILE  # noqa: E402

CONFIG = MergeVLAConfig.tiny(num_tasks=2)
LAST = CONFIG.llm.layers - 1  # the single-task head's last block = the expert block
UNCHANGED = "vision_backbone.fused_featurizer."  # no task changes these keys
AQ = "action_queries.weight"


# --------------------------------------------------------------------------- tiny checkpoints


def _clone(state):
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _finetune(base, seed):
    """A sparse per-task change on every key except the SigLIP ones (left identical)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.items():
        support = torch.rand(value.shape, generator=gen) < 0.3
        delta = torch.randn(value.shape, generator=gen) * 0.05
        out[key] = value.clone() if key.startswith(UNCHANGED) else value + delta * support
    return out


def _head(seed):
    return _clone(randomize_(ActionHead(CONFIG), seed).state_dict())


def _proprio(seed):
    return _clone(randomize_(ProprioProjector(CONFIG.proprio_dim, CONFIG.llm.hidden), seed).state_dict())


def _stats_json(dim, offset):
    return {"kind": "quantile", "q01": [offset - 1.0] * dim, "q99": [offset + 1.0] * dim,
            "mask": [True] * (dim - 1) + [False]}


def _dataset_entry(offset):
    action, proprio = _stats_json(CONFIG.action_dim, offset), _stats_json(CONFIG.proprio_dim, offset)
    return {"action": {"q01": action["q01"], "q99": action["q99"], "mask": action["mask"],
                       "mean": [0.0] * CONFIG.action_dim},
            "proprio": {"q01": proprio["q01"], "q99": proprio["q99"]}, "num_transitions": 10}


def write_armada_task(directory: Path, vla, head, proprio, name: str, offset: float) -> Path:
    directory.mkdir(parents=True)
    save_file(vla, directory / "vla.safetensors")
    save_file(head, directory / "action_head.safetensors")
    save_file(proprio, directory / "proprio_projector.safetensors")
    (directory / "task.json").write_text(json.dumps({
        "name": name, "instruction": name.replace("_", " "),
        "action_stats": _stats_json(CONFIG.action_dim, offset),
        "proprio_stats": _stats_json(CONFIG.proprio_dim, offset)}))
    return directory


def write_mergevla_task(directory: Path, vla, head, proprio, dataset: str, offset: float) -> Path:
    """MergeVLA per-task run: HF model.safetensors (with the tied LM head), DDP-prefixed .pt files."""
    directory.mkdir(parents=True)
    save_file({**vla, LM_HEAD_KEY: vla[EMBED_KEY].clone()}, directory / "model.safetensors")
    torch.save({f"module.{k}": v for k, v in head.items()}, directory / "action_head--checkpoint.pt")
    torch.save({f"module.{k}": v for k, v in proprio.items()}, directory / "proprio_projector--checkpoint.pt")
    (directory / "dataset_statistics.json").write_text(json.dumps({dataset: _dataset_entry(offset)}))
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = _clone(randomize_(MergeVLAModel(CONFIG), 0).vla_state_dict())
    vlas = [_finetune(base, 1), _finetune(base, 2)]
    heads, projs = [_head(100), _head(101)], [_proprio(200), _proprio(201)]
    root.joinpath("base").mkdir()
    save_file(base, root / "base" / "vla.safetensors")
    dirs = [write_armada_task(root / "pick", vlas[0], heads[0], projs[0], "pick_cube", 0.0),
            write_mergevla_task(root / "goal", vlas[1], heads[1], projs[1], "libero_goal_no_noops", 0.5)]
    return {"root": root, "base": base, "vlas": vlas, "heads": heads, "projs": projs, "dirs": dirs}


@pytest.fixture(scope="module")
def merged(ckpt):
    stages = []
    out = ckpt["root"] / "bundle_ta"
    merge_bundle(ckpt["root"] / "base", ckpt["dirs"], out, architecture=CONFIG,
                 progress=lambda stage, done, total: stages.append(stage))
    return out, stages


def _expected_weights(bundle, m):
    """base + tau_merge * S_m, straight from the bundle's tensors."""
    base, tau = bundle.tensors(BASE_FILE), bundle.tensors(TAU_FILE)
    out = dict(base)
    masked = set(bundle.mask_keys(m))
    for key, delta in tau.items():
        out[key] = base[key] + (np.where(bundle.mask(m, key), delta, np.float32(0)) if key in masked else delta)
    return out


# --------------------------------------------------------------------------- task checkpoints


def test_loads_both_single_task_layouts(ckpt):
    armada = load_task_checkpoint(ckpt["dirs"][0])
    assert (armada.layout, armada.name, armada.instruction) == ("armada", "pick_cube", "pick cube")
    mv = load_task_checkpoint(ckpt["dirs"][1])
    assert (mv.layout, mv.name, mv.instruction) == ("mergevla", "libero_goal", "libero goal")
    assert set(mv.action_head) == set(ckpt["heads"][1])  # "module." stripped
    assert all(torch.equal(mv.action_head[k], v) for k, v in ckpt["heads"][1].items())
    assert LM_HEAD_KEY not in mv.vla and set(mv.vla) == set(ckpt["base"])  # tied LM head dropped
    assert mv.action_stats.kind == "quantile" and mv.action_stats.q01 == [-0.5] * CONFIG.action_dim
    assert mv.action_stats.mask == [True] * (CONFIG.action_dim - 1) + [False]
    assert mv.proprio_stats.mask == [True] * CONFIG.proprio_dim  # no proprio mask in the file: all dims


def test_task_checkpoint_errors_name_the_file(tmp_path, ckpt):
    d = tmp_path / "two"
    d.mkdir()
    (d / "dataset_statistics.json").write_text(json.dumps({"a": _dataset_entry(0), "b": _dataset_entry(0)}))
    expected = r"two/dataset_statistics\.json: .*exactly one dataset key, found \['a', 'b'\]"
    with pytest.raises(BuildError, match=expected):
        load_task_checkpoint(d)
    with pytest.raises(BuildError, match=r"empty: not a task checkpoint.*task\.json"):
        (tmp_path / "empty").mkdir()
        load_task_checkpoint(tmp_path / "empty")
    wrong = MergeVLAConfig.tiny(num_tasks=2, action_dim=4)
    expected = r"pick/action_head\.safetensors: .*model\.fc2\.weight: checkpoint \[3, 64\] vs model \[4, 64\]"
    with pytest.raises(BuildError, match=expected):
        merge_bundle(ckpt["root"] / "base", ckpt["dirs"], tmp_path / "x", architecture=wrong)


# --------------------------------------------------------------------------- merge_bundle


def test_merge_bundle_round_trip(ckpt, merged):
    out, stages = merged
    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert manifest.kind == "mergevla" and [t.name for t in manifest.tasks] == ["pick_cube", "libero_goal"]
    assert manifest.router is not None and manifest.router.layer == CONFIG.router_layer_idx
    assert manifest.tasks[1].action_stats.q99 == [1.5] * CONFIG.action_dim
    assert {"task vectors, merge, TALL masks", "action heads", "checksums"} <= set(stages)

    base, tau = bundle.tensors(BASE_FILE), bundle.tensors(TAU_FILE)
    # identical keys: zero task vector, no mask; action queries: the tasks' average, in the base
    assert set(tau) == set(base) == set(ckpt["base"])
    zero = {k for k in tau if k.startswith(UNCHANGED)} | {AQ}
    assert all(not tau[k].any() for k in zero) and all(tau[k].any() for k in set(tau) - zero)
    assert set(bundle.mask_keys(0)) == set(bundle.mask_keys(1)) == set(tau) - zero
    assert np.allclose(base[AQ], ((ckpt["vlas"][0][AQ] + ckpt["vlas"][1][AQ]) / 2).numpy())
    key = "projector.fc1.weight"
    assert np.allclose(tau[key], (ckpt["vlas"][0][key] + ckpt["vlas"][1][key] - 2 * ckpt["base"][key]).numpy(),
                       atol=1e-6)
    assert not np.array_equal(bundle.mask(0, key), bundle.mask(1, key))

    engine = TorchEngine(bundle)
    for m in (1, 0):
        engine.use_task(m)
        weights = engine.model.vla.state_dict()
        for k, expected in _expected_weights(bundle, m).items():
            assert np.array_equal(weights[k].numpy(), expected), k


def test_merged_head_experts_are_the_task_heads_last_block(ckpt, merged):
    head = load_bundle(merged[0]).tensors(HEAD_FILE)
    for m, task_head in enumerate(ckpt["heads"]):
        for module in ("v_task", "q_proj_adapter", "o_proj", "ffn.0", "ffn.1"):
            for param in ("weight", "bias"):
                got = head[f"model.mlp_resnet_moe_blocks.0.{module}.experts.{m}.{param}"]
                assert np.array_equal(got, task_head[f"model.mlp_resnet_blocks.{LAST}.{module}.{param}"].numpy())
        assert np.array_equal(head["model.fc2.experts.%d.weight" % m], task_head["model.fc2.weight"].numpy())
        assert head["model.mlp_resnet_moe_blocks.0.gating_factor"][m] == task_head[
            f"model.mlp_resnet_blocks.{LAST}.gating_factor"].item()
    shared = f"model.mlp_resnet_blocks.{LAST - 1}.v_task.weight"
    assert np.allclose(head[shared], ((ckpt["heads"][0][shared] + ckpt["heads"][1][shared]) / 2).numpy())
    proprio = load_bundle(merged[0]).tensors(PROPRIO_FILE)
    assert np.allclose(proprio["fc1.weight"], ((ckpt["projs"][0]["fc1.weight"] + ckpt["projs"][1]["fc1.weight"]) / 2))


def test_ties_and_ta_give_different_task_vectors(ckpt, merged):
    out = ckpt["root"] / "bundle_ties"
    merge_bundle(ckpt["root"] / "base", ckpt["dirs"], out, method="ties", top_k=0.2, architecture=CONFIG)
    ta, ties = load_bundle(merged[0]).tensors(TAU_FILE), load_bundle(out).tensors(TAU_FILE)
    assert ta.keys() == ties.keys()
    assert any(not np.array_equal(ta[k], ties[k]) for k in ta)
    key = "projector.fc2.weight"
    taus = merge.task_vectors({key: ckpt["base"][key]}, [{key: v[key]} for v in ckpt["vlas"]])
    assert np.array_equal(ties[key], merge.ties_merge(taus, top_k_fraction=0.2)[key].numpy())
    with pytest.raises(BuildError, match="method must be 'ta' or 'ties'"):
        merge_bundle(ckpt["root"] / "base", ckpt["dirs"], out / "x", method="avg", architecture=CONFIG)


def test_bf16_checkpoints_stay_bf16(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in _clone(randomize_(MergeVLAModel(CONFIG), 3).vla_state_dict()).items()}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "vla.safetensors")
    dirs = [write_armada_task(tmp_path / f"t{m}", {k: v.to(torch.bfloat16) for k, v in _finetune(base, 5 + m).items()},
                              _head(m), _proprio(m), f"task_{m}", 0.0) for m in range(2)]
    manifest = merge_bundle(tmp_path / "base", dirs, tmp_path / "out", architecture=CONFIG)
    assert {e.dtype for e in manifest.tensors[TAU_FILE].values()} == {"BF16"}
    bundle = load_bundle(tmp_path / "out")
    key = "projector.fc1.weight"  # BF16 widens to float32 exactly on load
    assert np.array_equal(bundle.tensor(BASE_FILE, key), base[key].float().numpy())
    TorchEngine(bundle).use_task(1)


# --------------------------------------------------------------------------- capvector_bundle


def test_capvector_arithmetic_and_single_layout(ckpt, tmp_path):
    key = "projector.fc3.bias"  # shape [hidden]
    pre, aux, std = dict(ckpt["base"]), dict(ckpt["base"]), dict(ckpt["base"])
    pre[key] = torch.full_like(pre[key], 1.0)
    aux[key] = torch.full_like(aux[key], 3.0)
    std[key] = torch.full_like(std[key], 2.0)
    aux[key][0], std[key][0] = 10.0, 2.0
    for name, state in (("pre", pre), ("std", std)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "vla.safetensors")
    aux_dir = write_armada_task(tmp_path / "aux", aux, ckpt["heads"][0], ckpt["projs"][0], "pick_cube", 0.0)

    manifest = capvector_bundle(tmp_path / "pre", aux_dir, tmp_path / "std", 0.5, tmp_path / "cv", architecture=CONFIG)
    bundle = load_bundle(tmp_path / "cv")
    assert manifest.kind == "capvector" and manifest.router is None and len(manifest.tasks) == 1
    assert sorted(manifest.tensors) == sorted([BASE_FILE, HEAD_FILE, PROPRIO_FILE])  # no tau, no masks
    theta = bundle.tensors(BASE_FILE)
    # 1 + 0.5 * (3 - 2) = 1.5; index 0: 1 + 0.5 * (10 - 2) = 5; elsewhere aux == std: theta = pretrained
    assert theta[key][0] == 5.0 and np.all(theta[key][1:] == 1.5)
    other = "projector.fc1.weight"
    assert np.array_equal(theta[other], ckpt["base"][other].numpy())

    # the files load into the single-model parts an engine needs for this layout
    single = MergeVLAConfig.from_dict(manifest.architecture)
    assert single.num_tasks == 1
    ActionHead(single).load_state_dict({k: torch.from_numpy(v) for k, v in bundle.tensors(HEAD_FILE).items()})
    MergeVLAModel(single).load_vla_state_dict({k: torch.from_numpy(v) for k, v in theta.items()})

    # and the engine serves it: no router, no swaps, the plain head
    from armada.runtime.model.engine import TorchEngine

    engine = TorchEngine(bundle)
    assert engine.single and engine.use_task(0) == 0.0
    assert torch.equal(engine.model.vla.state_dict()[key], torch.from_numpy(theta[key]))
    size = single.image_size
    pixels = {t: np.zeros((single.num_images, 3, size, size), np.float32) for t in ("dino", "siglip")}
    actions = engine.predict_normalized(pixels, np.array([1, 5, 6, 7]), np.zeros(single.proprio_dim, np.float32), 0)
    assert actions.shape == (single.chunk, single.action_dim) and np.all(np.isfinite(actions))


# --------------------------------------------------------------------------- import_mergevla


TaskSuite = enum.Enum("TaskSuite", {"LIBERO_SPATIAL": "libero_spatial", "LIBERO_10": "libero_10"},
                      type=str, module="__main__", qualname="TaskSuite")


def _save_as_main(monkeypatch, obj, path):
    """torch.save as mergy.py did when run as a script: TaskSuite pickles as __main__.TaskSuite."""
    monkeypatch.setattr(sys.modules["__main__"], "TaskSuite", TaskSuite, raising=False)
    torch.save(obj, path)


@pytest.fixture
def mergevla_dir(ckpt, tmp_path, monkeypatch):
    """A synthetic mergy.py output: expert 0 = libero_spatial (task vla 0), expert 1 = libero_10."""
    base, vlas = ckpt["base"], ckpt["vlas"]
    pretrained = dict(base, **{AQ: torch.zeros_like(base[AQ])})  # the pretrained VLM's queries are zeros
    (tmp_path / "pretrained").mkdir()
    save_file(pretrained, tmp_path / "pretrained" / "model.safetensors")
    keys = [k for k in base if k != AQ]
    taus = merge.task_vectors({k: pretrained[k] for k in keys}, [{k: v[k] for k in keys} for v in vlas])
    tau_merge = merge.task_arithmetic(taus)
    masks = merge.tall_masks(taus, tau_merge)
    stored = dict(tau_merge, **{AQ: (vlas[0][AQ] + vlas[1][AQ]) / 2})
    d = tmp_path / "merged"
    d.mkdir()
    save_file(stored, d / "model.safetensors")
    # insertion order differs from index order: the index decides
    _save_as_main(monkeypatch, {TaskSuite.LIBERO_10: 1, TaskSuite.LIBERO_SPATIAL: 0}, d / "task2idx.pt")
    _save_as_main(monkeypatch, {TaskSuite.LIBERO_10: masks[1], TaskSuite.LIBERO_SPATIAL: masks[0]}, d / "tall_masks.pt")
    head = merge.build_moe_head(ckpt["heads"], router_k=CONFIG.router_k, router_layer=CONFIG.router_layer_idx)
    torch.save(head, d / "action_head--checkpoint.pt")
    torch.save(merge.average_heads(ckpt["projs"]), d / "proprio_projector--checkpoint.pt")
    (d / "dataset_statistics.json").write_text(json.dumps({
        "libero_spatial_no_noops": _dataset_entry(0.25), "libero_10": _dataset_entry(-0.25),
        "libero_goal_no_noops": _dataset_entry(9.0)}))
    return {"dir": d, "pretrained": tmp_path / "pretrained", "masks": masks, "stored": stored, "head": head}


def test_import_mergevla(mergevla_dir, tmp_path):
    src = mergevla_dir
    manifest = import_mergevla(src["dir"], src["pretrained"], tmp_path / "out", architecture=CONFIG,
                               serving=Serving(), instructions={"libero_10": "do the long tasks"})
    bundle = load_bundle(tmp_path / "out")
    assert [(t.name, t.expert_index) for t in manifest.tasks] == [("libero_spatial", 0), ("libero_10", 1)]
    assert manifest.tasks[1].instruction == "do the long tasks"
    assert manifest.tasks[0].action_stats.q01 == [-0.75] * CONFIG.action_dim  # libero_spatial_no_noops
    assert manifest.tasks[1].action_stats.q01 == [-1.25] * CONFIG.action_dim  # libero_10 directly

    tau = bundle.tensors(TAU_FILE)
    nonzero = {k for k, v in src["stored"].items() if k != AQ and bool(v.ne(0).any())}
    assert set(tau) == set(src["stored"]) and not any(tau[k].any() for k in set(tau) - nonzero)
    assert not any(k.startswith(UNCHANGED) for k in nonzero)
    for m in (0, 1):
        assert set(bundle.mask_keys(m)) == nonzero
        for key in nonzero:  # dense bool -> bit-packed -> exactly the same mask
            assert np.array_equal(bundle.mask(m, key), src["masks"][m][key].numpy()), key
    base = bundle.tensors(BASE_FILE)
    assert np.array_equal(base[AQ], src["stored"][AQ].numpy())  # real weights, not added to zeros
    head = bundle.tensors(HEAD_FILE)
    assert all(np.array_equal(head[k], v.numpy()) for k, v in src["head"].items())

    engine = TorchEngine(bundle)
    engine.use_task(1)
    weights = engine.model.vla.state_dict()
    assert all(np.array_equal(weights[k].numpy(), v) for k, v in _expected_weights(bundle, 1).items())


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", [os.system, subprocess.call], ids=["os.system", "subprocess.call"])
def test_import_refuses_a_pickle_with_a_forbidden_global(mergevla_dir, tmp_path, func):
    marker = tmp_path / "ran"
    command = f"touch {marker}" if func is os.system else ["touch", str(marker)]
    torch.save({"libero_spatial": _Reduce(func, (command,))},
               mergevla_dir["dir"] / "task2idx.pt")
    expected = r"task2idx\.pt: refused to unpickle: .*(system|call).*nothing in the file was run"
    with pytest.raises(BuildError, match=expected):
        import_mergevla(mergevla_dir["dir"], mergevla_dir["pretrained"], tmp_path / "out", architecture=CONFIG,
                        serving=Serving())
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_restricted_loader_reads_enum_keys_as_strings(mergevla_dir):
    assert load_torch_pickle(mergevla_dir["dir"] / "task2idx.pt") == {"libero_10": 1, "libero_spatial": 0}


def test_import_checks_masks_against_the_tasks(mergevla_dir, tmp_path, monkeypatch):
    d = mergevla_dir["dir"]
    _save_as_main(monkeypatch, {TaskSuite.LIBERO_10: mergevla_dir["masks"][1]}, d / "tall_masks.pt")
    with pytest.raises(BuildError, match=r"tall_masks\.pt: expected masks for exactly the tasks"):
        import_mergevla(d, mergevla_dir["pretrained"], tmp_path / "out", architecture=CONFIG, serving=Serving())
    bad = {k: v.float() for k, v in mergevla_dir["masks"][0].items()}
    _save_as_main(monkeypatch, {TaskSuite.LIBERO_10: bad, TaskSuite.LIBERO_SPATIAL: bad}, d / "tall_masks.pt")
    with pytest.raises(BuildError, match=r"expected a bool tensor of shape"):
        import_mergevla(d, mergevla_dir["pretrained"], tmp_path / "out", architecture=CONFIG, serving=Serving())


def test_libero_serving_reads_the_im_start_id(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"added_tokens": [{"id": 151643, "content": "<|endoftext|>"},
                                                      {"id": 151644, "content": "<|im_start|>"}]}))
    serving = Serving.libero(tokenizer)
    assert serving.prompt.bos_id == 151644 and serving.prompt.tokenizer == "tokenizer.json"
    ops = [s.op for s in serving.preprocessing["wrist"]]
    assert ops[:4] == ["rotate180", "jpeg_roundtrip", "resize", "center_crop"]
    tokenizer.write_text(json.dumps({"added_tokens": []}))
    with pytest.raises(BuildError, match=r"tokenizer\.json: no added token '<\|im_start\|>'"):
        Serving.libero(tokenizer)
