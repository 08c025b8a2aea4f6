"""`armada model export-onnx --quantize int8` reaches export_bundle; float32 stays the default."""

from __future__ import annotations

import pytest

from armada.runtime import cli


@pytest.mark.parametrize("argv, expected", [([], None), (["--quantize", "int8"], "int8")])
def test_export_onnx_passes_the_precision(monkeypatch, tmp_path, argv, expected):
    pytest.importorskip("torch", reason="needs the model extra")
    from armada.runtime.model import onnx_export

    seen = {}

    def fake_export(bundle, out, tasks, instruction, quantize=None, progress=None):
        seen["quantize"] = quantize
        return []

    monkeypatch.setattr(onnx_export, "export_bundle", fake_export)
    assert cli.main(["model", "export-onnx", str(tmp_path / "b"), str(tmp_path / "o"), *argv]) == 0
    assert seen == {"quantize": expected}


def test_export_onnx_refuses_an_unknown_precision(tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["model", "export-onnx", str(tmp_path / "b"), str(tmp_path / "o"), "--quantize", "int4"])
    assert exc.value.code == 2
