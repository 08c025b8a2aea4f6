"""A whole episode with the real model path: a tiny merged bundle routed at t=0, through the
inference process, cameras and the mock arm's driver."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the model extra: pip install -e '.[model]'")
pytest.importorskip("timm", reason="needs the model extra")

from armada.runtime.config import CONFIG_DIR  # noqa: E402
from armada.runtime.inference.client import EpisodeClient  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from tests.hil.helpers import StateRecorder  # noqa: E402

pytestmark = [pytest.mark.hil, pytest.mark.slow]


def test_tiny_merged_vla_routes_at_t0_and_drives_the_arm(short_tmp):
    import yaml

    data = yaml.safe_load((CONFIG_DIR / "cells" / "default.yaml").read_text())
    cell = short_tmp / "cell.yaml"
    data["inference"]["policy"]["tiny_dir"] = str(short_tmp / "bundles")
    data["inference"]["policy"]["tiny_tasks"] = 3
    cell.write_text(yaml.safe_dump(data))
    events: list[tuple[str, dict]] = []
    with CellProcesses(cell, short_tmp) as procs:
        procs.start_all()
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        client = EpisodeClient(procs.ctx, procs.cell)
        episode = client.start("auto", duration_s=4.0, arm=True)
        report = client.wait_report(episode, timeout_s=90, on_event=lambda e, d: events.append((e, d)))
        pinned = client.start("auto", duration_s=1.5, arm=True, task="open_drawer")
        pinned_report = client.wait_report(pinned, timeout_s=60)
        client.close()
        states = rec.stop()

    assert report["outcome"] == "completed", report
    route = next(d for e, d in events if e == "route")
    assert set(route["scores"]) == {"pick_cube", "open_drawer", "stack_blocks"}
    assert abs(sum(route["probabilities"].values()) - 1.0) < 1e-6
    assert route["task"] == report["task"] and 0.0 <= route["margin"] <= 1.0
    assert report["chunks"] >= 3 and report["starved_ticks"] < 0.5 * 500 * report["duration_s"]
    assert pinned_report["outcome"] == "completed" and pinned_report["task"] == "open_drawer"
    running = [m for m in states if m["mode"] == "running"]
    assert running, "the arm never ran"
    requested = np.stack([m["requested"] for m in running])
    assert np.ptp(requested, axis=0).max() > 1e-4  # the model's actions really moved the arm
