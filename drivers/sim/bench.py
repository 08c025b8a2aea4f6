"""`armada bench sim`: what simulating a cell costs on this machine.

Per scene (drivers/sim/world.py SCENES):
- physics: the cost of one MuJoCo substep and of one 50 Hz control tick (SimWorld.step of 20 ms,
  as the sim driver's read() advances it), median and p99, with the arm following a moving target
  so the solver has contacts and actuators to work on;
- render: per camera at 96 and 224 px square, what the camera process spends per frame (load the
  state: qpos + mj_forward; update the scene; render offscreen; read the pixels back), median and
  p99, with no MSAA and no shadows as the camera process renders.

``seconds`` bounds each timed run; ``quick`` takes far fewer samples (a smoke run). Prints nothing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

SIZES = (96, 224)
TICK_S = 0.02  # a 50 Hz control tick


def _stats(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e3
    return {"median_ms": round(float(np.median(a)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "max_ms": round(float(a.max()), 4), "n": int(a.size)}


def run_sim_bench(seconds: float = 10.0, quick: bool = False) -> dict[str, Any]:
    from armada.drivers.sim.gl import choose_gl

    choose_gl()
    import mujoco

    from armada.drivers.sim.world import SCENES, SimWorld, tasks_for

    result: dict[str, Any] = {"mujoco": mujoco.__version__, "mujoco_gl": os.environ.get("MUJOCO_GL"),
                              "tick_s": TICK_S, "scenes": {}}
    window = min(seconds, 0.5) if quick else seconds  # per timed run
    for scene in SCENES:
        world = SimWorld(scene, render_size=(max(SIZES), max(SIZES)))
        task = tasks_for(scene)[0]
        world.reset(task, 0)
        result["scenes"][scene] = {"task": task, "nq": int(world.model.nq), "timestep_s": float(world.model.opt.timestep),
                                   "physics": _physics(world, scene, window, quick),
                                   "render": _render(world, mujoco, window, quick)}
    return result


def _physics(world: Any, scene: str, window: float, quick: bool) -> dict[str, Any]:
    """Substeps and 50 Hz ticks, the arm swinging slowly around where it starts."""
    import mujoco

    from armada.runtime.config import load_embodiment

    model, data = world.model, world.data
    start = np.asarray(world.arm_position(), dtype=float)
    # 0.1 rad on the arm joints; grippers stay (their units differ: 0..1, metres). Each scene is
    # named after its embodiment (configs/embodiments/<scene>.yaml).
    swing = np.where(load_embodiment(scene).gripper_mask(), 0.0, 0.1)
    substeps: list[float] = []
    ticks: list[float] = []
    max_samples = 200 if quick else 100_000
    t_end = time.monotonic() + window / 2
    while time.monotonic() < t_end and len(substeps) < max_samples * 10:
        t = time.perf_counter()
        mujoco.mj_step(model, data)
        substeps.append(time.perf_counter() - t)
    t_end = time.monotonic() + window / 2
    i = 0
    while time.monotonic() < t_end and len(ticks) < max_samples:
        world.set_target(start + swing * np.sin(0.05 * i))  # 2.5 s period at 50 Hz
        t = time.perf_counter()
        world.step(TICK_S)
        ticks.append(time.perf_counter() - t)
        i += 1
    return {"substep": _stats(substeps), "tick_50hz": _stats(ticks),
            "substeps_per_tick": int(round(TICK_S / model.opt.timestep)),
            "realtime_factor": round(TICK_S / float(np.median(ticks)), 1)}


def _render(world: Any, mujoco: Any, window: float, quick: bool) -> dict[str, Any]:
    """Per camera and size: load_state + update_scene + render, as the camera process does per frame."""
    out: dict[str, Any] = {}
    qpos = np.array(world.data.qpos)
    frames = 10 if quick else 200
    model = world.model
    model.vis.quality.offsamples = 0
    for size in SIZES:
        renderer = mujoco.Renderer(model, height=size, width=size)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        try:
            for camera in world.camera_names:
                renderer.update_scene(world.data, camera=camera)
                renderer.render()  # warm-up: the first frame uploads the meshes and textures
                samples: list[float] = []
                t_end = time.monotonic() + window / (len(SIZES) * len(world.camera_names))
                while len(samples) < 3 or (time.monotonic() < t_end and len(samples) < frames):
                    t = time.perf_counter()
                    world.load_state(qpos)
                    renderer.update_scene(world.data, camera=camera)
                    renderer.render()
                    samples.append(time.perf_counter() - t)
                out[f"{camera}@{size}"] = _stats(samples)
        finally:
            renderer.close()
    return out
