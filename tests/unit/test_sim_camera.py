"""Camera kind ``mujoco``: renders the newest sim driver state a (fake) driver publishes.

The fake driver here is a real state publisher (runtime/transport.Publisher) sending state
messages as the driver process does, with the sim's scene state in ``device["sim"]``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco's first import in this process: headless rendering
pytest.importorskip("mujoco")

from armada.drivers.cameras.plugins import MujocoCameraConfig  # noqa: E402
from armada.drivers.cameras.registry import CAMERAS  # noqa: E402
from armada.drivers.cameras.source import SourceError  # noqa: E402
from armada.drivers.sim.world import SimWorld  # noqa: E402
from armada.runtime.transport import Publisher  # noqa: E402

W, H = 64, 48


@pytest.fixture(scope="module")
def world() -> SimWorld:
    return SimWorld("so101")


def _config(short_tmp, **changes) -> MujocoCameraConfig:
    fields = dict(name="front", kind="mujoco", scene="so101", camera="front", state=f"ipc://{short_tmp}/state",
                  frames=f"ipc://{short_tmp}/front", width=W, height=H, fps=50)
    return MujocoCameraConfig(**(fields | changes))


def _publish(pub: Publisher, qpos, device: dict | None = None) -> int:
    """One driver state message, as drivers/core/process.py publishes it; returns its t_ns."""
    zeros = np.zeros(6)
    fields = dict(mono_ns=time.monotonic_ns(), mode="armed", measured=zeros, requested=zeros, commanded=zeros,
                  velocity=zeros, counters={})
    sim = {"task": "reach_cube", "seed": 0, "time_s": 0.0, "qpos": list(qpos), "success": False, "resets": 1}
    msg = pub.publish("state", **fields, device=device if device is not None else {"sim": sim})
    return msg["t_ns"]


def _first_frame(source, pub: Publisher, qpos, device: dict | None = None, timeout_s: float = 5.0):
    """Publish until the source renders one (a SUB joins a moment after connecting)."""
    sent: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sent.append(_publish(pub, qpos, device))
        frame = source.read(0.05)
        if frame is not None:
            return frame, sent
    return None, sent


@pytest.fixture(scope="module")
def running():
    """One open source and its fake driver for the module (opening builds the scene: ~1 s)."""
    folder = Path(tempfile.mkdtemp(prefix="armada-t-"))
    ctx = zmq.Context()
    cfg = _config(folder)
    pub = Publisher(ctx, cfg.state)
    source = CAMERAS.get("mujoco").build(cfg, None)
    source.open()
    yield source, pub
    source.close()
    pub.close()
    ctx.destroy(linger=0)
    shutil.rmtree(folder, ignore_errors=True)


def test_renders_the_published_state_stamped_with_its_time(running, world):
    source, pub = running
    home = np.array(world.data.qpos)
    frame, sent = _first_frame(source, pub, home)
    assert frame is not None, "no frame from published states"
    assert frame.rgb.shape == (H, W, 3) and frame.rgb.dtype == np.uint8 and frame.rgb.flags["C_CONTIGUOUS"]
    assert frame.capture_ns in sent  # the state's own stamp: frames and states share one clock
    assert frame.clock == "sim:driver-state"
    assert frame.rgb.std() > 5  # a scene, not a blank buffer

    # Another arm pose renders another image: the camera shows the state it was sent.
    moved = home.copy()
    moved[:3] += [0.8, -0.6, 0.6]  # shoulder pan, lift, elbow (the arm's first qpos entries)
    time.sleep(0.03)
    t_ns = _publish(pub, moved)
    frame2 = source.read(1.0)
    assert frame2 is not None and frame2.capture_ns == t_ns
    assert np.abs(frame2.rgb.astype(int) - frame.rgb.astype(int)).mean() > 1.0


def test_no_new_state_is_a_stall_never_a_repeat(running, world):
    source, pub = running
    frame, _ = _first_frame(source, pub, world.data.qpos)
    assert frame is not None
    time.sleep(0.05)
    while source.read(0.05) is not None:  # states still queued from joining
        pass
    t = time.monotonic()
    assert source.read(0.3) is None  # the driver went quiet: nothing is re-rendered
    assert time.monotonic() - t < 1.0


def test_a_state_of_another_scene_is_skipped_with_a_clear_reason(running, world):
    source, pub = running
    frame, _ = _first_frame(source, pub, np.zeros(world.model.nq + 3), timeout_s=0.5)
    assert frame is None
    assert "shape (23,)" in source.problem and "so101 has 20" in source.problem
    frame, _ = _first_frame(source, pub, world.data.qpos)  # and it renders the next good one
    assert frame is not None


def test_a_state_without_the_sim_map_is_skipped(running, world):
    source, pub = running
    frame, _ = _first_frame(source, pub, world.data.qpos, device={"tcp_pose": [0.0] * 6}, timeout_s=0.5)
    assert frame is None
    assert "device['sim']" in source.problem and "backend kind mujoco" in source.problem


def test_an_unknown_camera_is_refused_when_opening(short_tmp):
    source = CAMERAS.get("mujoco").build(_config(short_tmp, camera="nope"), None)
    with pytest.raises(SourceError, match="no camera 'nope'.*front"):
        source.open()
    source.close()


def test_the_config_wants_a_local_state_endpoint(short_tmp):
    with pytest.raises(ValueError, match="ipc://"):
        _config(short_tmp, state="tcp://127.0.0.1:5555")


def test_the_config_wants_a_known_scene(short_tmp):
    with pytest.raises(ValueError, match="known scenes: so101, aloha"):
        _config(short_tmp, scene="kitchen")


def test_validating_the_config_imports_no_mujoco():
    import subprocess
    import sys

    code = ("import sys; from armada.drivers.cameras.plugins import MujocoCameraConfig as C; "
            "from armada.drivers.sim.expert_plugin import SimExpertConfig as E; "
            "C(name='f', kind='mujoco', scene='so101', camera='front', state='ipc:///tmp/s', frames='ipc:///tmp/f'); "
            "E(control='ipc:///tmp/c', scene='so101'); print('mujoco' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.slow  # ~4 s: renders every camera of both scenes at two sizes
def test_bench_sim_measures_physics_and_every_camera():
    from armada.drivers.sim.bench import SIZES, run_sim_bench

    result = run_sim_bench(0.2, quick=True)
    for scene in ("so101", "aloha"):
        got = result["scenes"][scene]
        assert got["physics"]["substep"]["median_ms"] > 0 and got["physics"]["tick_50hz"]["n"] > 0
        assert got["physics"]["substeps_per_tick"] == round(0.02 / got["timestep_s"])
        cameras = SimWorld(scene).camera_names
        assert set(got["render"]) == {f"{c}@{s}" for c in cameras for s in SIZES}
        assert all(r["median_ms"] > 0 and r["n"] >= 3 for r in got["render"].values())
