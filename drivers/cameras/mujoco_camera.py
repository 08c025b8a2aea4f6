"""A simulated camera: renders the sim driver's newest published scene state (camera kind ``mujoco``).

Why a separate renderer: the sim driver owns the only stepping physics and publishes the whole
scene state (``device["sim"]["qpos"]``, about 20 floats) in every state message. Rendering costs
10-50 ms a frame on a CPU and would break the driver's 20 ms tick, so each camera is its own
process that loads the same scene model, sets the newest state and renders its MJCF camera, at its
own rate, as the cameras of a real cell run beside its driver.

Clock: a frame shows the scene as it was when the driver measured the state it renders, so it is
stamped with that state message's ``t_ns`` (the driver's wall clock, the host clock every process
of a cell shares): frames and states then share one clock domain (``clock`` "sim:driver-state").

A state is rendered at most once: when no new state arrives within the timeout (the driver
stopped, or publishes no scene state), ``read`` returns None, a stall, and the camera process
reopens the source, exactly as for a real camera that stopped delivering frames. A state that
cannot be rendered (no ``device["sim"]`` map, a qpos of the wrong length: the camera names another
scene than the driver's) is logged once per opening and skipped, never raised into the process.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from armada.drivers.cameras.source import Captured, SourceError
from armada.runtime.transport import Subscriber

if TYPE_CHECKING:
    from armada.drivers.cameras.plugins import MujocoCameraConfig

log = logging.getLogger("armada.camera")

CLOCK = "sim:driver-state"
STATE_QUEUE = 10  # states queued at most: only the newest is ever rendered


class MujocoCameraSource:
    """CameraSource (drivers/cameras/source.py) rendering one MJCF camera of a sim driver's scene."""

    def __init__(self, cfg: "MujocoCameraConfig"):
        self.cfg = cfg
        self.period_ns = int(1e9 / cfg.fps)
        self.world: Any = None  # armada.drivers.sim.world.SimWorld, built on open (imports mujoco)
        self.renderer: Any = None
        self._ctx: zmq.Context | None = None
        self._sub: Subscriber | None = None
        self._deadline = 0  # monotonic ns of the next frame slot
        self._number = 0  # frame slot number: a skipped slot counts as a dropped frame
        self._last_t_ns = -1  # stamp of the last state rendered: each state is rendered once
        self.problem: str | None = None  # the last state that could not be rendered, and why
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ open / close

    def open(self) -> dict[str, Any]:
        try:
            from armada.drivers.sim.gl import choose_gl

            choose_gl()  # EGL, else OSMesa; must precede the first mujoco import
            import mujoco

            from armada.drivers.sim.world import SimWorld
        except ImportError as exc:
            raise SourceError(f"camera {self.cfg.name}: kind mujoco needs the sim extra "
                              f"(pip install 'armada[sim]'): {exc}") from None
        cfg = self.cfg
        try:
            self.world = SimWorld(cfg.scene, render_size=(cfg.width, cfg.height))
        except (ValueError, KeyError) as exc:
            raise SourceError(f"camera {cfg.name}: cannot load scene {cfg.scene!r}: {exc}") from None
        if cfg.camera not in self.world.camera_names:
            raise SourceError(f"camera {cfg.name}: scene {cfg.scene} has no camera {cfg.camera!r}; "
                              f"it has {self.world.camera_names}")
        model = self.world.model
        # The offscreen buffer must hold the frame; no MSAA and no shadows: with them a 224 px
        # SO-101 frame costs ~390 ms on a CPU instead of ~35 ms (SimWorld sets the model's side).
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), cfg.width)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), cfg.height)
        model.vis.quality.offsamples = 0
        try:
            self.renderer = mujoco.Renderer(model, height=cfg.height, width=cfg.width)
        except Exception as exc:  # no EGL device, no framebuffer: say which camera and why
            self.close()
            raise SourceError(f"camera {cfg.name}: cannot create a {cfg.width}x{cfg.height} MuJoCo renderer "
                              f"(MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {exc}") from None
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._ctx = zmq.Context()
        self._sub = Subscriber(self._ctx, cfg.state, hwm=STATE_QUEUE)
        self._deadline, self._number, self._last_t_ns = time.monotonic_ns(), 0, -1
        self._logged.clear()
        return {"source": "mujoco", "scene": cfg.scene, "camera": cfg.camera, "state": cfg.state,
                "width": cfg.width, "height": cfg.height, "fps": cfg.fps, "clock": CLOCK}

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.renderer is not None:
            self.renderer.close()  # frees the GL context now, not in a finalizer at exit
            self.renderer = None
        self.world = None

    # ------------------------------------------------------------------ frames

    def read(self, timeout_s: float) -> Captured | None:
        if self._sub is None:
            return None
        start = time.monotonic_ns()
        late = start - self._deadline
        if late > self.period_ns:  # missed slots (descheduled, or no state came): those frames were never taken
            missed = late // self.period_ns
            self._deadline += missed * self.period_ns
            self._number += int(missed)
        wait_ns = self._deadline - start
        if wait_ns > timeout_s * 1e9:
            time.sleep(timeout_s)
            return None
        if wait_ns > 0:
            time.sleep(wait_ns * 1e-9)
        end = start + int(timeout_s * 1e9)
        state = self._newest_state(max(0.0, (end - time.monotonic_ns()) * 1e-9))
        if state is None:
            return None
        t_ns, qpos = state
        self.world.load_state(qpos)
        self.renderer.update_scene(self.world.data, camera=self.cfg.camera)
        rgb = self.renderer.render()  # a fresh array each call: the publisher sends it without copying
        self._last_t_ns = t_ns
        frame = Captured(rgb, t_ns, CLOCK, device_frame=self._number)
        self._number += 1
        self._deadline += self.period_ns
        return frame

    def _newest_state(self, timeout_s: float) -> tuple[int, np.ndarray] | None:
        """The newest renderable state not rendered yet: what is queued, else the first to come
        within the timeout; None if none."""
        assert self._sub is not None
        deadline = time.monotonic() + timeout_s
        msg = self._sub.recv_latest(0.0)
        while True:
            if msg is not None:
                state = self._renderable(msg)
                if state is not None:
                    return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            msg = self._sub.recv(remaining)
            if msg is not None:
                msg = self._sub.recv_latest(0.0) or msg

    def _renderable(self, msg: dict[str, Any]) -> tuple[int, np.ndarray] | None:
        if msg.get("kind") != "state":
            return self._skip(f"a {msg.get('kind')!r} message on {self.cfg.state}, not a driver state")
        t_ns = int(msg["t_ns"])
        if t_ns <= self._last_t_ns:
            return None  # rendered already
        device = msg.get("device")
        sim = device.get("sim") if isinstance(device, dict) else None
        if not isinstance(sim, dict) or "qpos" not in sim:
            return self._skip(f"the driver state on {self.cfg.state} carries no device['sim']['qpos']: "
                              "is that driver simulated (backend kind mujoco)?")
        try:
            qpos = np.asarray(sim["qpos"], dtype=np.float64)
        except (TypeError, ValueError):
            return self._skip(f"device['sim']['qpos'] on {self.cfg.state} is not a list of numbers")
        nq = int(self.world.model.nq)
        if qpos.shape != (nq,):
            return self._skip(f"device['sim']['qpos'] on {self.cfg.state} has shape {qpos.shape}, scene "
                              f"{self.cfg.scene} has {nq} values: does the driver simulate another scene?")
        if not np.all(np.isfinite(qpos)):
            return self._skip(f"device['sim']['qpos'] on {self.cfg.state} is not finite")
        return t_ns, qpos

    def _skip(self, problem: str) -> None:
        """Count a state that cannot be rendered; log each kind of problem once per opening."""
        self.problem = problem
        if problem not in self._logged:
            self._logged.add(problem)
            log.error("camera %s: skipping a state: %s", self.cfg.name, problem)
        return None
