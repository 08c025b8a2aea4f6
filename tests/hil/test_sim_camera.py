"""Sim cameras under HIL: `armada driver` on the shipped sim cell (backend kind mujoco) and one
`armada camera` process per camera (kind mujoco), started as in production.

Each camera renders the driver's published scene state and stamps the frame with that state
message's t_ns, so every frame's capture_ns is the stamp of a state the driver published.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zmq

pytest.importorskip("mujoco")

from armada.runtime.config import CONFIG_DIR  # noqa: E402
from armada.runtime.supervisor import CellProcesses  # noqa: E402
from armada.runtime.transport import FrameSubscriber, Subscriber  # noqa: E402

pytestmark = [pytest.mark.hil, pytest.mark.slow]  # ~25 s: three processes import and build their scenes

SIM_CELL = CONFIG_DIR / "cells" / "sim_so101.yaml"
COLLECT_S = 2.5
FIRST_FRAME_S = 30.0  # each camera process imports mujoco and builds its scene and renderer first


def _wait_for_frames(procs: CellProcesses) -> None:
    """Until every camera has published a frame (so the collection measures steady state)."""
    subs = {c.name: FrameSubscriber(procs.ctx, c.frames, hwm=10) for c in procs.cell.cameras}
    deadline = time.monotonic() + FIRST_FRAME_S
    try:
        for name, sub in subs.items():
            while sub.recv(0.2) is None:
                if time.monotonic() > deadline:
                    log = procs.child(name).log_path.read_text()
                    raise AssertionError(f"camera {name}: no frame within {FIRST_FRAME_S} s\n{log}")
    finally:
        for sub in subs.values():
            sub.close()


def _collect(procs: CellProcesses, seconds: float) -> tuple[set[int], dict[str, list]]:
    """The stamps of every driver state, and every frame of every camera with its age at receipt."""
    drv = procs.cell.drivers[0]
    states = Subscriber(procs.ctx, drv.state, hwm=10_000)
    subs = {c.name: FrameSubscriber(procs.ctx, c.frames, hwm=1000) for c in procs.cell.cameras}
    poller = zmq.Poller()
    poller.register(states.socket, zmq.POLLIN)
    by_socket = {}
    for name, sub in subs.items():
        poller.register(sub.socket, zmq.POLLIN)
        by_socket[sub.socket] = name
    stamps: set[int] = set()
    frames: dict[str, list] = {n: [] for n in subs}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for socket, _ in poller.poll(10):
            if socket is states.socket:
                for msg in states.drain():
                    assert "sim" in msg.get("device", {}), "the sim driver's state carries no device['sim']"
                    stamps.add(msg["t_ns"])
                continue
            frame = subs[by_socket[socket]].recv(0)
            if frame is not None:
                frames[by_socket[socket]].append((frame.header, (time.time_ns() - frame.header["capture_ns"]) * 1e-9,
                                                  frame.pixels.shape))
    states.close()
    for sub in subs.values():
        sub.close()
    return stamps, frames


@pytest.mark.skipif(not SIM_CELL.exists(), reason=f"{SIM_CELL} is not shipped")
def test_sim_cameras_render_the_driver_state_stamped_with_its_time(short_tmp):
    os.environ.setdefault("MUJOCO_GL", "egl")  # the camera processes inherit it
    with CellProcesses(SIM_CELL, short_tmp) as procs:
        assert procs.cell.cameras, f"{SIM_CELL} has no cameras"
        procs.spawn("driver", procs.cell.drivers[0].name)
        for cam in procs.cell.cameras:
            procs.spawn("camera", cam.name)
        procs.wait_ready(timeout_s=30)
        _wait_for_frames(procs)
        stamps, frames = _collect(procs, COLLECT_S)
        cameras = {c.name: c for c in procs.cell.cameras}
        max_age_s = procs.cell.inference.max_frame_age_s
        logs = {c.name: procs.child(c.name).log_path.read_text() for c in procs.cell.cameras}

    assert stamps, "no driver state received"
    for name, got in frames.items():
        cam = cameras[name]
        # A loaded 2-core machine slows rendering down a little, not by half.
        assert len(got) >= 0.5 * cam.fps * COLLECT_S, f"{name}: {len(got)} frames in {COLLECT_S} s at {cam.fps} fps\n{logs[name]}"
        assert {shape for _, _, shape in got} == {(cam.height, cam.width, 3)}, name
        assert {h["clock"] for h, _, _ in got} == {"sim:driver-state"}
        # Each frame is stamped with a state the driver published (those before we joined aside).
        late = [h["capture_ns"] for h, _, _ in got[3:]]
        unknown = [t for t in late if t not in stamps]
        assert len(unknown) <= max(1, len(late) // 10), f"{name}: {len(unknown)} of {len(late)} stamps are no state's"
        ages_ms = np.sort([age for _, age, _ in got]) * 1e3
        assert ages_ms[0] > -5.0, f"{name}: a frame stamped in the future"
        # A frame is one state's age (< a tick) plus its render (~45 ms for SO-101 on an idle CPU core)
        # and transport old: fresh enough for the policy (the cell's max_frame_age_s) on a loaded machine.
        limit_ms = max_age_s * 1e3
        assert np.percentile(ages_ms, 90) < limit_ms, f"{name}: ages p90 {np.percentile(ages_ms, 90):.1f} ms > {limit_ms}"
        stamps_seen = [h["capture_ns"] for h, _, _ in got]
        assert all(b > a for a, b in zip(stamps_seen, stamps_seen[1:])), f"{name}: a state rendered twice or out of order"
