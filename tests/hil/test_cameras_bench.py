"""`armada bench cameras` in quick mode: it runs end to end and its numbers are sane."""

from __future__ import annotations

import pytest

from armada.drivers.cameras.bench import run_camera_bench

pytestmark = pytest.mark.hil


def test_camera_bench_quick_reports_latency_cpu_wire_cost_and_no_loss(capsys):
    results = run_camera_bench(seconds=2.0, quick=True)
    rows = {(r["size"], r["encoding"]): r for r in results["latency"]}
    assert set(rows) == {(s, e) for s in ("640x480", "1280x720") for e in ("raw", "jpeg")}
    for (size, encoding), row in rows.items():
        assert row["frames"] >= 45 and row["lost"] == 0, row  # 2 s at 30 fps
        assert 0 < row["latency_ms"]["p50"] < 50, row
        assert 0 < row["camera_cpu_pct"] < 100, row
        if encoding == "jpeg":
            assert row["encode_ms"]["p50"] > 0 and row["decode_ms"]["p50"] > 0
            assert row["wire_bytes_per_frame"] < row["raw_bytes_per_frame"] / 5
        else:
            assert row["wire_bytes_per_frame"] == row["raw_bytes_per_frame"]
    # JPEG costs CPU in the camera process: more than raw at the same size.
    for size in ("640x480", "1280x720"):
        assert rows[(size, "jpeg")]["camera_cpu_pct"] > rows[(size, "raw")]["camera_cpu_pct"]
    cams = results["all_frames"]["cameras"]
    assert len(cams) == 3 and {c["source"] for c in cams.values()} == {"synthetic", "opencv"}
    for name, row in cams.items():
        assert row["received"] >= 45 and row["lost"] == 0, (name, row)
    out = capsys.readouterr().out
    assert "machine:" in out and "no camera attached" in out
