"""A simulated arm behind the backend interface: the one stepping MuJoCo physics of a sim cell.

Sim time is the driver's tick count: each read after the first advances the physics by one
control period, so a late tick makes sim time lag behind the wall clock, never jump, and a run is
deterministic for a given sequence of targets. Each reading carries the whole scene state as
device["sim"] (cameras render it, experts plan on it). The sim control socket is polled here,
once per read, in the driver's control thread: no locks, and a reset lands between two ticks.
"""

from __future__ import annotations

import time

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading


class MujocoBackend(Backend):
    def __init__(self, scene: str, task: str, seed: int, control: str | None, home: np.ndarray, period_s: float,
                 lower: np.ndarray, upper: np.ndarray):
        self.scene, self.task, self.seed, self.control = scene, task, seed, control
        self.home = np.asarray(home, dtype=np.float64)
        self.period_s = float(period_s)
        self.lower, self.upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
        self.world = None  # SimWorld, built in connect (imports mujoco)
        self._server = None  # SimControlServer
        self._stepped = False  # the first read shows the start, later ones advance one period
        self._halted = False  # e-stopped or faulted: holding where the arm was, ignoring writes
        self.writes = 0  # targets that reached the physics (tests)

    def connect(self, timeout_s: float) -> None:
        from armada.drivers.sim.control import SimControlServer
        from armada.drivers.sim.world import SimWorld

        self.close()
        try:
            world = SimWorld(self.scene)
        except Exception as exc:  # a missing package or asset: nothing the loop can retry
            raise BackendError(f"sim {self.scene}: cannot build the scene: {exc}", transient=False) from exc
        bad = [f"{n} {lo:g}..{hi:g} (scene {wl:.4f}..{wh:.4f})"
               for n, lo, hi, wl, wh in zip(world.joint_names, self.lower, self.upper, world.lower, world.upper)
               if lo < wl - 1e-4 or hi > wh + 1e-4]
        if bad:
            raise BackendError(f"sim {self.scene}: the embodiment's ranges exceed the model's joints: {'; '.join(bad)}",
                               transient=False)
        world.place_arm(self.home)  # the arm starts at the embodiment's home, at rest
        world.reset(self.task, self.seed)
        if self.control is not None:
            try:
                self._server = SimControlServer(self.control, world)
            except OSError as exc:
                raise BackendError(f"sim {self.scene}: control socket: {exc}", transient=False) from None
        self.world, self._stepped, self._halted = world, False, False

    def read(self) -> Reading:
        world = self.world
        if world is None:
            raise BackendError(f"sim {self.scene} is not connected", transient=False)
        if self._stepped:
            world.step(self.period_s)
        self._stepped = True
        if self._server is not None:
            self._server.poll()  # at most one request per tick, never blocking
        return Reading(position=world.arm_position(), mono_ns=time.monotonic_ns(), extras={"sim": world.state()})

    def write(self, position: np.ndarray) -> None:
        if self.world is None:
            raise BackendError(f"sim {self.scene} is not connected", transient=False)
        if self._halted:
            return  # e-stopped or faulted: the arm holds, as a real controller ignores motion then
        self.world.set_target(position)
        self.writes += 1

    def estop(self) -> None:
        self._hold()

    def release_estop(self) -> None:
        self._halted = False

    def on_fault(self, reason: str) -> None:
        self._hold()

    def recover(self, timeout_s: float) -> None:
        if self.world is None:
            self.connect(timeout_s)
        self._halted = False

    def close(self) -> None:
        # Nothing is "dropped": the physics simply stops with the process.
        if self._server is not None:
            self._server.close()
            self._server = None

    def _hold(self) -> None:
        self._halted = True
        if self.world is not None:
            self.world.set_target(self.world.arm_position())  # hold where the arm is now
