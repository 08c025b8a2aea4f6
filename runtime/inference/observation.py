"""Observations: the newest frame of each camera plus the drivers' state, with their ages.

A frame or a state older than its limit makes the observation stale: the episode pauses
instead of feeding the policy the past.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from runtime.transport import Frame, FrameSubscriber, Subscriber


@dataclass(frozen=True)
class Observation:
    mono_ns: int  # when it was assembled, on this host's monotonic clock
    t_ns: int  # the same instant on the wall clock
    state: np.ndarray  # measured joints of all drivers, concatenated in action layout
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    frame_age_s: dict[str, float] = field(default_factory=dict)
    state_age_s: dict[str, float] = field(default_factory=dict)
    # Depth aligned to each camera's colour frame, in metres, for the cameras that send it.
    depth_m: dict[str, np.ndarray] = field(default_factory=dict)


class StaleObservation(Exception):
    """Some input is too old or missing; the message says which and by how much."""


class ObservationBuilder:
    def __init__(self, cameras: dict[str, FrameSubscriber], states: dict[str, Subscriber],
                 max_frame_age_s: float, max_state_age_s: float):
        self.cameras, self.states = cameras, states
        self.max_frame_age_s, self.max_state_age_s = max_frame_age_s, max_state_age_s
        self.latest_frames: dict[str, Frame] = {}
        self.latest_states: dict[str, dict] = {}

    def poll(self) -> None:
        """Drain every input to its newest message."""
        for name, sub in self.cameras.items():
            frame = sub.recv_latest()
            if frame is not None:
                self.latest_frames[name] = frame
        for name, sub in self.states.items():
            msg = sub.recv_latest()
            if msg is not None:
                self.latest_states[name] = msg

    def build(self) -> Observation:
        self.poll()
        t_ns, mono_ns = time.time_ns(), time.monotonic_ns()
        frame_age, state_age, problems = {}, {}, []
        for name in self.cameras:
            frame = self.latest_frames.get(name)
            if frame is None:
                problems.append(f"no frame yet from camera {name}")
                continue
            frame_age[name] = (t_ns - frame.header["capture_ns"]) * 1e-9
            if frame_age[name] > self.max_frame_age_s:
                problems.append(f"camera {name} frame is {frame_age[name] * 1e3:.0f} ms old "
                                f"(max {self.max_frame_age_s * 1e3:.0f} ms)")
        for name in self.states:
            msg = self.latest_states.get(name)
            if msg is None:
                problems.append(f"no state yet from driver {name}")
                continue
            state_age[name] = (t_ns - msg["t_ns"]) * 1e-9
            if state_age[name] > self.max_state_age_s:
                problems.append(f"driver {name} state is {state_age[name] * 1e3:.0f} ms old")
        if problems:
            raise StaleObservation("; ".join(problems))
        state = np.concatenate([self.latest_states[n]["measured"] for n in self.states])
        frames = {n: self.latest_frames[n].pixels for n in self.cameras}
        depth = {n: f.depth * np.float32(f.header["depth_scale_m"]) for n in self.cameras
                 if (f := self.latest_frames[n]).depth is not None}
        return Observation(mono_ns, t_ns, state, frames, frame_age, state_age, depth)
