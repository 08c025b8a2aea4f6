"""The live view's pieces without a cell: modes, a parser that imports no rerun, event handling
that survives odd payloads (logged to an in-memory rerun recording)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from armada.runtime.view import ViewMode, parse_mode


def test_modes_parse_and_a_bad_one_says_what_is_accepted():
    assert parse_mode("spawn") == ViewMode("spawn")
    assert parse_mode("serve") == ViewMode("serve")
    assert parse_mode("save:/tmp/x.rrd") == ViewMode("save", Path("/tmp/x.rrd"))
    for bad in ("save:", "window", "", "SAVE:x.rrd"):
        with pytest.raises(ValueError, match="spawn, serve or save:FILE.rrd"):
            parse_mode(bad)


def test_building_the_cli_parser_does_not_import_rerun():
    code = ("import sys; from armada.runtime.cli import build_parser; "
            "a = build_parser().parse_args(['view', 'c.yaml', '--mode', 'save:x.rrd', '--seconds', '2']); "
            "assert a.mode == 'save:x.rrd' and a.seconds == 2.0; "
            "print('rerun' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_events_of_any_shape_are_logged_not_raised(short_tmp):
    rr = pytest.importorskip("rerun", reason="rerun-sdk is not installed (.venv/bin/pip install rerun-sdk)")
    from armada.runtime.config import SCRIPTED_CELL, load_cell
    from armada.runtime.view import LiveView

    rec = rr.RecordingStream("armada-test")
    rrd = short_tmp / "events.rrd"
    rec.save(rrd)
    view = LiveView(load_cell(SCRIPTED_CELL, short_tmp), SCRIPTED_CELL, rec)
    try:
        t = 1_700_000_000_000_000_000
        for event, data in [("episode_started", {"episode": 1, "instruction": "wave", "duration_s": 2.0}),
                            ("route", {"task": "a", "scores": {"a": 2.5, "b": 0.1}, "probabilities": {"a": 0.9},
                                       "margin": 0.8}),
                            ("route", {"task": "a", "scores": [1, 2]}),  # not a map: text only
                            ("chunk", {"chunk": 0, "latency_ms": 31.0, "dropped": 0}),
                            ("intervention_started", {"episode": 1}),
                            ("intervention_ended", {"episode": 1, "intervened_s": 1.25, "resumed": True}),
                            ("something_new", {"x": "y" * 1000}),
                            ("episode_ended", {"episode": 1, "outcome": "failed: driver arm went silent"})]:
            view._take_event({"event": event, "data": data, "t_ns": t})
            t += 10_000_000
        view._take_state("arm", {"t_ns": t, "mode": "armed", "measured": [0.0] * 7, "commanded": [0.0] * 7,
                                 "lease_holder": "teleop"})
        view.flush_joints()
    finally:
        view.close()
    from armada.runtime.view import read_rrd

    data = read_rrd(rrd)
    texts = [x[0] for x in data["/inference/log"]["TextLog:text"]]
    assert any("took over" in x for x in texts) and any("handed back after 1.2 s" in x for x in texts), texts
    assert any(x.startswith("something_new:") and x.endswith("...") for x in texts)
    assert data["/inference/log"]["TextLog:level"][-1] == ["WARN"]  # the failed episode
    assert data["/router/scores/a"]["Scalars:scalars"] == [[2.5]]
    assert data["/router/probabilities/a"]["Scalars:scalars"] == [[0.9]]
    assert "lease free -> teleop" in data["/drivers/arm/log"]["TextLog:text"][0][0]
    assert data["/joints/arm/elbow/commanded"]["Scalars:scalars"] == [[0.0]]
