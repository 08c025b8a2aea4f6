"""Model bundles: round trip, bit-packed masks, clear errors on damaged bundles, loading writes nothing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from armada.runtime.model.bundle import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleError,
    Manifest,
    NormStats,
    inspect_bundle,
    load_bundle,
    mask_key,
    pack_mask,
    unpack_mask,
    write_bundle,
)

DINO = {"op": "normalize", "mean": [0.484375, 0.455078125, 0.40625],
        "std": [0.228515625, 0.2236328125, 0.224609375], "target": "dino"}
SIGLIP = {"op": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "target": "siglip"}
LIBERO_STEPS = [{"op": "rotate180"}, {"op": "jpeg_roundtrip", "quality": 95},
                {"op": "resize", "size": 224, "interpolation": "lanczos"},
                {"op": "center_crop", "area_fraction": 0.9}, {"op": "to_float"}, DINO, SIGLIP]


def stats(dim: int, kind: str = "quantile", mask: list[bool] | None = None) -> dict[str, Any]:
    lo, hi = ("q01", "q99") if kind == "quantile" else ("min", "max")
    return {"kind": kind, lo: [-1.0 - i for i in range(dim)], hi: [2.0 + i for i in range(dim)],
            "mask": mask if mask is not None else [True] * dim}


def manifest_data(tasks: int = 2) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "mergevla",
        "architecture": {"hidden": 8, "layers": 2, "vision": {"dino": "tiny"}},
        "tasks": [{"name": f"task{m}", "instruction": f"do thing {m}", "expert_index": m,
                   "action_stats": stats(7, mask=[True] * 6 + [False]), "proprio_stats": stats(8)}
                  for m in range(tasks)],
        "action": {"dim": 7, "chunk": 8, "dt": 0.05},
        "observation": {"cameras": ["primary", "wrist"], "image_size": 224, "proprio_dim": 8},
        "preprocessing": {"primary": LIBERO_STEPS, "wrist": LIBERO_STEPS},
        "router": {"k": 2, "layer": 0} if tasks > 1 else None,
    }


def tensor_files(rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    return {
        "model.safetensors": {"layer.weight": weight, "layer.bias": np.arange(4, dtype=np.float16),
                              "router_layer_idx": np.array(0, dtype=np.int64)},
        "masks.safetensors": {mask_key(m, "layer.weight"): rng.random((4, 3)) < 0.5 for m in range(2)},
    }


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bundle"
    write_bundle(directory, Manifest.model_validate(manifest_data()), tensor_files(np.random.default_rng(0)),
                 extra_files={"tokenizer/tokenizer.json": b'{"vocab": {}}'})
    return directory


def edit_manifest(directory: Path, change) -> None:
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def load_error(directory: Path) -> BundleError:
    with pytest.raises(BundleError) as info:
        load_bundle(directory)
    return info.value


# --------------------------------------------------------------------------- round trip


def test_round_trip_gives_back_manifest_tensors_and_masks(tmp_path: Path):
    files = tensor_files(np.random.default_rng(1))
    calls: list[tuple[int, int]] = []
    written = write_bundle(tmp_path / "b", Manifest.model_validate(manifest_data()), files,
                           extra_files={"tokenizer.json": b"{}"})
    bundle = load_bundle(tmp_path / "b", progress=lambda done, total: calls.append((done, total)))

    assert bundle.manifest == written
    assert [f.path for f in written.files] == ["model.safetensors", "masks.safetensors", "tokenizer.json"]
    total = sum(f.bytes for f in written.files)
    assert calls[-1] == (total, total) and all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    for key, array in files["model.safetensors"].items():
        loaded = bundle.tensor("model.safetensors", key)
        assert loaded.dtype == array.dtype and loaded.shape == array.shape
        np.testing.assert_array_equal(loaded, array)
    for m in range(2):
        expected = files["masks.safetensors"][mask_key(m, "layer.weight")]
        np.testing.assert_array_equal(bundle.mask(m, "layer.weight"), expected)
        assert bundle.mask_keys(m) == ["layer.weight"]
    assert set(bundle.tensors("model.safetensors")) == set(files["model.safetensors"])
    entry = written.tensors["masks.safetensors"][mask_key(0, "layer.weight")]
    assert (entry.dtype, entry.shape, entry.packed_shape) == ("BOOL", [4, 3], [2])
    assert bundle.task("task1").expert_index == 1
    assert bundle.manifest.preprocessing["wrist"][-1].target == "siglip"


def test_bf16_tensors_come_back_widened_exactly(tmp_path: Path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array([1.5, -2.25, 3.0e38, 1e-3], dtype=ml_dtypes.bfloat16)
    manifest = Manifest.model_validate(manifest_data(tasks=1))
    write_bundle(tmp_path / "b", manifest, {"w.safetensors": {"w": values, "x": np.ones(2, np.float32)}})
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest.tensors["w.safetensors"]["w"].dtype == "BF16"
    loaded = bundle.tensor("w.safetensors", "w")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values.astype(np.float32))


def test_unknown_names_raise_bundle_errors(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    for call, text in ((lambda: bundle.task("nope"), "no task named 'nope'"),
                       (lambda: bundle.tensor("model.safetensors", "nope"), "no tensor 'nope'"),
                       (lambda: bundle.tensor("nope.safetensors", "x"), "no tensor file"),
                       (lambda: bundle.mask(0, "nope"), "no mask 'mask/0/nope'")):
        with pytest.raises(BundleError, match=text):
            call()


def test_write_refuses_a_non_empty_directory_unless_told(bundle_dir: Path):
    manifest = Manifest.model_validate(manifest_data())
    files = tensor_files(np.random.default_rng(2))
    with pytest.raises(BundleError, match="not empty; pass overwrite=True"):
        write_bundle(bundle_dir, manifest, files)
    write_bundle(bundle_dir, manifest, files, overwrite=True)
    np.testing.assert_array_equal(load_bundle(bundle_dir).tensor("model.safetensors", "layer.weight"),
                                  files["model.safetensors"]["layer.weight"])


def test_write_refuses_paths_outside_the_bundle(tmp_path: Path):
    with pytest.raises(BundleError, match="plain relative path"):
        write_bundle(tmp_path / "b", Manifest.model_validate(manifest_data()), {"../evil.safetensors": {}})


# --------------------------------------------------------------------------- masks


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.bool_, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=13)))
def test_pack_unpack_round_trip(mask: np.ndarray):
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8 and packed.shape == ((mask.size + 7) // 8,)
    restored = unpack_mask(packed, mask.shape)
    assert restored.dtype == np.bool_ and restored.shape == mask.shape
    np.testing.assert_array_equal(restored, mask)


def test_packing_is_eight_times_smaller(tmp_path: Path):
    mask = np.random.default_rng(3).random((1000, 1024)) < 0.3
    assert pack_mask(mask).nbytes * 8 == mask.nbytes
    manifest = Manifest.model_validate(manifest_data())
    written = write_bundle(tmp_path / "b", manifest, {"m.safetensors": {mask_key(1, "w"): mask}})
    assert written.files[0].bytes < mask.nbytes / 8 + 1024  # data plus a small header
    np.testing.assert_array_equal(load_bundle(tmp_path / "b").mask(1, "w"), mask)


def test_unpack_refuses_the_wrong_byte_count():
    with pytest.raises(ValueError, match="2 uint8 bytes"):
        unpack_mask(np.zeros(3, np.uint8), (3, 5))


# --------------------------------------------------------------------------- damaged bundles


def test_checksum_mismatch_names_file_and_key(bundle_dir: Path):
    path = bundle_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte of tensor data: the header stays valid
    path.write_bytes(bytes(data))
    err = load_error(bundle_dir)
    assert err.file == str(path) and err.key == "files.0.sha256"
    assert "checksum mismatch" in str(err) and "corrupt" in str(err)
    load_bundle(bundle_dir, verify=False)  # only the checksum pass notices


def test_missing_file(bundle_dir: Path):
    (bundle_dir / "masks.safetensors").unlink()
    err = load_error(bundle_dir)
    assert err.key == "files.1.path" and "missing file" in err.reason and "masks.safetensors" in err.reason


def test_truncated_file(bundle_dir: Path):
    path = bundle_dir / "tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:-1])
    err = load_error(bundle_dir)
    assert err.key == "files.2.bytes" and "truncated" in err.reason


def test_tensor_shape_differs_from_manifest(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda d: d["tensors"]["model.safetensors"]["layer.weight"].update(shape=[3, 4]))
    err = load_error(bundle_dir)
    assert err.file == str(bundle_dir / "model.safetensors") and err.key == "layer.weight"
    assert err.reason == "file holds F32 [4, 3], manifest says F32 [3, 4]"


def test_tensor_missing_from_manifest(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda d: d["tensors"]["model.safetensors"].pop("layer.bias"))
    assert "unlisted ['layer.bias']" in load_error(bundle_dir).reason


def test_unknown_schema_version(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda d: d.update(schema_version="armada-bundle/2"))
    err = load_error(bundle_dir)
    assert err.key == "schema_version"
    assert "unsupported bundle schema version 'armada-bundle/2'" in err.reason
    assert f"reads only {SCHEMA_VERSION!r}" in err.reason


def test_schema_version_is_checked_before_fields(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda d: (d.update(schema_version="armada-bundle/9"), d.pop("tasks")))
    assert load_error(bundle_dir).key == "schema_version"


def test_malformed_json_names_the_line(bundle_dir: Path):
    path = bundle_dir / MANIFEST_NAME
    lines = path.read_text().splitlines()
    lines.insert(3, '  "broken": ,')  # becomes line 4
    path.write_text("\n".join(lines))
    err = load_error(bundle_dir)
    assert err.key == "line 4" and err.reason == "not valid JSON: Expecting value (column 13)"


@pytest.mark.parametrize("text, reason", [('{"a": NaN}', "NaN is not allowed"),
                                          ('{"a": 1, "a": 2}', "duplicate key 'a'"),
                                          ("[1]", "must be a JSON object")])
def test_json_that_parses_but_is_refused(tmp_path: Path, text: str, reason: str):
    (tmp_path / MANIFEST_NAME).write_text(text)
    assert reason in load_error(tmp_path).reason


@pytest.mark.parametrize("change, key, reason", [
    (lambda d: d["router"].update(k=0), "router.k", "greater than 0"),
    (lambda d: d["tasks"][1]["action_stats"]["q99"].pop(), "tasks.1.action_stats.q99", "has 6 values, q01 has 7"),
    (lambda d: d["tasks"][1].update(expert_index=0), "tasks.1.expert_index", "duplicate expert index 0"),
    (lambda d: d["tasks"][1].update(expert_index=5), "tasks.1.expert_index", "out of range"),
    (lambda d: d["tasks"][1].update(name="task0"), "tasks.1.name", "duplicate task name"),
    (lambda d: d["tasks"][0]["proprio_stats"]["q01"].pop(), "tasks.0.proprio_stats.q99", "has 8 values"),
    (lambda d: d.update(router=None), "router", "required for a mergevla bundle with 2 tasks"),
    (lambda d: d["files"][0].update(path="../x"), "files.0.path", "plain relative path"),
    (lambda d: d["preprocessing"]["wrist"].insert(0, {"op": "resize", "size": 224, "interpolation": "nearest"}),
     "preprocessing.wrist.0.resize.interpolation", "'bilinear', 'bicubic' or 'lanczos'"),
    (lambda d: d["preprocessing"]["wrist"].append({"op": "rotate180"}), "preprocessing.wrist.7",
     "rotate180 after normalize"),
    (lambda d: d["action"].update(extra=1), "action.extra", "Extra inputs are not permitted"),
    (lambda d: d["action"].update(relative=[True] * 6), "action.relative", "has 6 flags for 7 dimensions"),
])
def test_manifest_field_errors_name_the_key_path(bundle_dir: Path, change, key: str, reason: str):
    edit_manifest(bundle_dir, change)
    err = load_error(bundle_dir)
    assert err.file == str(bundle_dir / MANIFEST_NAME) and err.key == key
    assert reason in err.reason


def test_relative_action_flags_round_trip_and_old_manifests_stay_absolute(tmp_path: Path, bundle_dir: Path):
    data = manifest_data()
    data["action"]["relative"] = [True] * 6 + [False]
    write_bundle(tmp_path / "rel", Manifest.model_validate(data), tensor_files(np.random.default_rng(2)))
    action = load_bundle(tmp_path / "rel").manifest.action
    assert action.relative == [True] * 6 + [False]
    np.testing.assert_array_equal(action.relative_mask(), [True] * 6 + [False])
    # a manifest written before the field existed: no "relative" key, every dimension absolute
    edit_manifest(bundle_dir, lambda d: d["action"].pop("relative"))
    assert "relative" not in json.loads((bundle_dir / MANIFEST_NAME).read_text())["action"]
    old = load_bundle(bundle_dir).manifest.action
    assert old.relative is None and old.relative_mask() is None


def test_mismatched_action_stats_length():
    data = manifest_data()
    data["action"]["dim"] = 6
    with pytest.raises(ValidationError, match="tasks.0.action_stats: has 7 dimensions, action.dim is 6"):
        Manifest.model_validate(data)


def test_single_model_bundles_have_one_task_and_no_router():
    data = manifest_data(tasks=1) | {"kind": "capvector"}
    assert Manifest.model_validate(data).router is None
    with pytest.raises(ValidationError, match="must be absent"):
        Manifest.model_validate(data | {"router": {"k": 8, "layer": 22}})


# --------------------------------------------------------------------------- normalization


def test_norm_stats_round_trip_and_mask_passthrough():
    s = NormStats.model_validate(stats(3, mask=[True, True, False]))
    a = np.random.default_rng(4).uniform(-1, 1, (8, 3))
    x = s.unnormalize(a)
    np.testing.assert_allclose(x[:, 0], 0.5 * (a[:, 0] + 1) * (3.0 + 1e-8) - 1.0)
    np.testing.assert_array_equal(x[:, 2], a[:, 2])  # unmasked: untouched
    np.testing.assert_allclose(s.normalize(x), a, atol=1e-12)
    far = np.array([100.0, -100.0, 100.0])
    np.testing.assert_array_equal(s.normalize(far), [1.0, -1.0, 100.0])  # clipped only where masked


def test_minmax_stats_use_min_and_max():
    s = NormStats(kind="minmax", min=[0.0, 10.0], max=[2.0, 20.0], mask=[True, True])
    np.testing.assert_allclose(s.unnormalize(np.array([-1.0, 1.0])), [0.0, 20.0])
    np.testing.assert_allclose(s.normalize(np.array([1.0, 15.0])), [0.0, 0.0], atol=1e-8)


@pytest.mark.parametrize("data, text", [
    ({"kind": "quantile", "min": [0.0], "max": [1.0], "mask": [True]}, "q01: required"),
    ({"kind": "minmax", "min": [0.0], "max": [1.0], "q01": [0.0], "mask": [True]}, "q01: not allowed"),
    ({"kind": "minmax", "min": [2.0], "max": [1.0], "mask": [True]}, "below min"),
    ({"kind": "minmax", "min": [0.0], "max": [float("nan")], "mask": [True]}, "finite number"),
])
def test_bad_norm_stats(data: dict[str, Any], text: str):
    with pytest.raises(ValidationError, match=text):
        NormStats.model_validate(data)


def test_normalize_checks_the_dimension():
    with pytest.raises(ValueError, match="last axis of 3"):
        NormStats.model_validate(stats(3)).normalize(np.zeros(4))


# --------------------------------------------------------------------------- side effects, cost


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_mode,
                                            p.read_bytes() if p.is_file() else b"")
            for p in sorted([directory, *directory.rglob("*")])}


def test_load_writes_nothing_and_works_read_only(bundle_dir: Path):
    before = snapshot(bundle_dir)
    bundle = load_bundle(bundle_dir)
    bundle.tensors("model.safetensors")
    bundle.mask(1, "layer.weight")
    inspect_bundle(bundle_dir, verify=True)
    assert snapshot(bundle_dir) == before
    paths = [bundle_dir, *bundle_dir.rglob("*")]
    try:
        for p in reversed(paths):
            p.chmod(stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR)
        read_only = snapshot(bundle_dir)
        load_bundle(bundle_dir).tensor("model.safetensors", "layer.weight")
        assert snapshot(bundle_dir) == read_only
    finally:
        for p in paths:
            p.chmod(stat.S_IRWXU)


def test_inspect_summarizes_tasks_files_and_parameters(bundle_dir: Path):
    text = inspect_bundle(bundle_dir)
    assert "kind mergevla" in text and "[1] task1: 'do thing 1'" in text and "1 masks" in text
    assert "model.safetensors" in text and "3 tensors, 17 parameters" in text  # 12 + 4 + 1
    assert "2 packed masks" in text and "router: k 2, layer 0" in text
    assert "primary: rotate180 > jpeg_roundtrip(quality=95) > resize(size=224" in text


def test_bundle_module_imports_no_torch():
    code = "import sys, runtime.model.bundle; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2], env=os.environ | {"PYTHONPATH": "."})
    assert out.stdout.strip() == "False"
