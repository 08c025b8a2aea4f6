"""A fake Cobot Magic master (teaching) arm: broadcasts joint and gripper commands on a puppet's bus.

On a Cobot Magic each master PiPer shares one CAN bus with its puppet. Configured as a teaching
arm, the master sends the same frames a program would send to command the puppet, and the puppet
follows them in hardware:

  0x155-0x157  joint targets, two int32 each, 0.001 deg (what the operator's hand put it at)
  0x159        gripper: int32 0.001 mm, uint16 effort 0.001 N·m, uint8 code 0x01, uint8 zero

piper_sdk on the puppet's bus decodes them as GetArmJointCtrl / GetArmGripperCtrl, which is how
recording reads the master. Here the motion is scripted (a slow sine per joint around ``center``)
so a test can compare what the SDK decoded with ``pose_at``; ``move_by_hand(pose)`` stops the sine
and holds the master at that pose (the operator's hand), ``set_broadcasting(False)`` switches it
off (no frames: a master powered off or out of teaching mode).
"""

from __future__ import annotations

import math
import struct
import threading
import time

import can
import numpy as np

from armada.drivers.piper.fake.bus import open_bus

MDEG_PER_RAD = math.degrees(1.0) * 1000.0
UM_PER_M = 1e6
# A teaching pose inside the PiPer's ranges (rad, gripper m): slightly unfolded, gripper half open.
DEFAULT_CENTER = np.array([0.0, 0.6, -0.6, 0.0, 0.3, 0.0, 0.03])
DEFAULT_AMPLITUDE = np.array([0.2, 0.15, 0.15, 0.2, 0.2, 0.3, 0.01])


class PiperMaster:
    """Broadcasts master command frames at ``rate_hz`` until ``close()``; ``broadcasting`` toggles it."""

    def __init__(self, channel: str, bustype: str = "virtual", port: int | None = None, rate_hz: float = 200.0,
                 center: np.ndarray | None = None, amplitude: np.ndarray | None = None,
                 frequency_hz: float = 0.25, broadcasting: bool = True):
        self.channel = channel
        self.bustype = bustype
        self.period = 1.0 / rate_hz
        self.center = DEFAULT_CENTER.copy() if center is None else np.asarray(center, dtype=np.float64)
        self.amplitude = DEFAULT_AMPLITUDE.copy() if amplitude is None else np.asarray(amplitude, dtype=np.float64)
        self.frequency_hz = frequency_hz
        self.broadcasting = broadcasting
        self.held: np.ndarray | None = None  # move_by_hand's pose, replacing the scripted motion
        self.t0 = time.monotonic()
        self.frames_sent = 0
        self._stop = threading.Event()
        self._bus = open_bus(channel, bustype, port)
        self._thread = threading.Thread(target=self._run, name=f"piper-master-{channel}", daemon=True)
        self._thread.start()

    def pose_at(self, t_mono: float) -> np.ndarray:
        """The master pose (6 joints rad, gripper m) at monotonic time ``t_mono``: scripted, or held by hand."""
        held = self.held
        if held is not None:
            return held
        phase = 2 * math.pi * self.frequency_hz * (t_mono - self.t0) + np.arange(7) * 0.7
        return self.center + self.amplitude * np.sin(phase)

    def max_speed(self) -> np.ndarray:
        """The fastest each value moves (per s): what a reading may lag by, per second of lag."""
        return 2 * math.pi * self.frequency_hz * np.abs(self.amplitude)

    def set_broadcasting(self, on: bool) -> None:
        self.broadcasting = on

    def move_by_hand(self, pose: np.ndarray) -> None:
        """Hold the master at ``pose`` (6 joints rad, gripper m) from the next frame on: no more sine."""
        pose = np.asarray(pose, dtype=np.float64)
        if pose.shape != (7,) or not np.all(np.isfinite(pose)):
            raise ValueError(f"a master pose is 6 joints (rad) and the gripper (m), got {pose!r}")
        self.held = pose.copy()  # one attribute: the sending thread sees the old pose or the new, never a mix

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._bus.shutdown()

    # ------------------------------------------------------------------ the teaching arm's loop

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            if self.broadcasting:
                self._send_pose(time.monotonic())
            if self.bustype == "virtual":
                self._drain()  # a virtual bus queues everything it hears, without bound
            next_t += self.period
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_t = time.monotonic()

    def _send_pose(self, now: float) -> None:
        pose = self.pose_at(now)
        mdeg = [int(round(v * MDEG_PER_RAD)) for v in pose[:6]]
        frames = [(0x155 + k, struct.pack(">ii", mdeg[2 * k], mdeg[2 * k + 1])) for k in range(3)]
        frames.append((0x159, struct.pack(">iHBB", int(round(pose[6] * UM_PER_M)), 1000, 0x01, 0x00)))
        for arb_id, data in frames:
            try:
                self._bus.send(can.Message(arbitration_id=arb_id, data=data, is_extended_id=False), timeout=0.01)
                self.frames_sent += 1
            except can.CanError:
                pass

    def _drain(self) -> None:
        while self._bus.recv(timeout=0) is not None:
            pass
