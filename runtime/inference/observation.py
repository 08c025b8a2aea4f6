"""Observations: the newest frame of each camera plus the drivers' state, with their ages.

A frame or a state older than its limit makes the observation stale: the episode pauses
instead of feeding the policy the past.

Ages are judged on this host's monotonic clock: every message is stamped when it is taken off
its socket, and its age is the time since then. The sender's wall-clock stamp may only make an
age larger (a frame that was already old when it arrived), never smaller: a sender whose clock
runs ahead (a step, or skew between hosts) would otherwise hide a dead stream. A stamp from the
future is counted and reported, never trusted.

Every stream is checked for kind and shape before it is used: a message of another kind, or a
state or frame of the wrong size, is counted and ignored, so it can neither crash the episode
nor reach the policy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from armada.runtime.transport import Frame, FrameSubscriber, Subscriber

log = logging.getLogger("armada.inference")

# At most this many messages are taken off one stream per poll: a flooding sender cannot keep
# the episode loop (and its stop flag) waiting. Above the state subscriber's queue (100), so a
# full queue after a slow moment is read to its newest message in one poll.
MAX_DRAIN_PER_POLL = 128
# A sender stamp this far ahead of our clock is a clock problem worth reporting.
FUTURE_TOLERANCE_S = 0.05

T = TypeVar("T")


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


@dataclass
class Arrival(Generic[T]):
    """A message and when it was taken off its socket (our monotonic clock)."""

    msg: T
    mono_ns: int
    sender_ns: int  # the sender's wall-clock stamp
    t_ns: int  # our wall clock at arrival, to compare with sender_ns
    flagged: bool = False  # its future stamp has been counted


@dataclass
class StreamCounters:
    rejected: int = 0
    future_stamps: int = 0
    last_problem: str = ""


class ObservationBuilder:
    """Assembles observations from camera and driver streams.

    ``frame_shapes`` (camera -> (height, width, 3)) and ``state_dof`` (driver -> joints) say what
    each stream must carry; a stream with no expectation is only checked for kind.
    """

    def __init__(self, cameras: dict[str, FrameSubscriber], states: dict[str, Subscriber],
                 max_frame_age_s: float, max_state_age_s: float,
                 frame_shapes: dict[str, tuple[int, int, int]] | None = None,
                 state_dof: dict[str, int] | None = None):
        self.cameras, self.states = cameras, states
        self.max_frame_age_s, self.max_state_age_s = max_frame_age_s, max_state_age_s
        self.frame_shapes = dict(frame_shapes or {})
        self.state_dof = dict(state_dof or {})
        self.frame_arrivals: dict[str, Arrival[Frame]] = {}
        self.state_arrivals: dict[str, Arrival[dict]] = {}
        self.counters: dict[str, StreamCounters] = {n: StreamCounters() for n in [*cameras, *states]}
        # Stream -> its sender's wall clock minus ours (a stream from another host; runtime/remote/clock.py):
        # stamps are taken back to our clock before they age a message. Absent: the same clock.
        self.sender_offset_ns: dict[str, int] = {}
        # Cameras on a host with no driver: their hosts' offsets from the clock pings they answer
        # (runtime/remote/clock.py CameraClocks, measured from a thread of its own); used for a
        # stream that ``sender_offset_ns`` has no offset for. None: no camera answers clock pings.
        self.camera_clocks: Any = None

    @property
    def latest_states(self) -> dict[str, dict]:
        return {n: a.msg for n, a in self.state_arrivals.items()}

    @property
    def latest_frames(self) -> dict[str, Frame]:
        return {n: a.msg for n, a in self.frame_arrivals.items()}

    def poll(self) -> None:
        """Take what is queued on every input (a bounded amount each) and keep the newest valid."""
        for name, sub in self.cameras.items():
            self._drain(name, sub, self._frame_problem, self.frame_arrivals, lambda f: f.header.get("capture_ns"))
        for name, sub in self.states.items():
            self._drain(name, sub, self._state_problem, self.state_arrivals, lambda m: m.get("t_ns"))

    def _drain(self, name: str, sub: Any, problem_of: Any, arrivals: dict[str, Arrival], stamp_of: Any) -> None:
        for _ in range(MAX_DRAIN_PER_POLL):
            msg = sub.recv(0)
            if msg is None:
                return
            problem = problem_of(name, msg)
            if problem:
                self._reject(name, problem)
                continue
            arrivals[name] = Arrival(msg, time.monotonic_ns(), int(stamp_of(msg)), time.time_ns())

    def _reject(self, name: str, problem: str) -> None:
        counters = self.counters.setdefault(name, StreamCounters())
        counters.rejected += 1
        counters.last_problem = problem
        # The first of a stream's rejections and then one in a thousand: a flood must not flood the log.
        if counters.rejected == 1 or counters.rejected % 1000 == 0:
            log.warning("ignoring a message on %s (%d so far): %s", name, counters.rejected, problem)

    def _state_problem(self, name: str, msg: dict[str, Any]) -> str:
        if msg.get("kind") != "state":
            return f"driver {name}'s state stream carried a {msg.get('kind')!r} message"
        dof = self.state_dof.get(name)
        for key in ("measured", "commanded"):
            value = msg.get(key)
            if not isinstance(value, np.ndarray) or value.ndim != 1 or (dof is not None and value.shape[0] != dof):
                shape = getattr(value, "shape", type(value).__name__)
                return f"driver {name}'s state has {key} of shape {shape}, expected ({dof},)"
            if value.dtype.kind not in "fi" or not np.all(np.isfinite(value)):
                return f"driver {name}'s state has a non-finite or non-numeric {key}"
        if not isinstance(msg.get("mode"), str):
            return f"driver {name}'s state has no mode"
        return ""

    def _frame_problem(self, name: str, frame: Frame) -> str:
        if frame.header.get("kind") != "frame":
            return f"camera {name}'s stream carried a {frame.header.get('kind')!r} message"
        expected = self.frame_shapes.get(name)
        pixels = frame.pixels
        if pixels.dtype != np.uint8 or (expected is not None and pixels.shape != expected):
            return (f"camera {name} sent a {pixels.shape} {pixels.dtype} frame, expected "
                    f"{expected} uint8 (the camera's configured size)")
        if frame.depth is not None and frame.depth.shape != pixels.shape[:2]:
            return f"camera {name} sent depth of shape {frame.depth.shape} for a {pixels.shape} frame"
        return ""

    def age_s(self, name: str, arrival: Arrival, now_mono_ns: int) -> float:
        """Seconds since the message arrived, or since the sender stamped it if that is longer."""
        local = (now_mono_ns - arrival.mono_ns) * 1e-9
        sender_ns = arrival.sender_ns - self.offset_ns(name)  # on our wall clock
        at_arrival = (arrival.t_ns - sender_ns) * 1e-9  # how old the sender says it was then
        if at_arrival < -FUTURE_TOLERANCE_S:
            self._flag_future(name, arrival, -at_arrival)
            return local
        return local + max(0.0, at_arrival)

    def offset_ns(self, name: str) -> int:
        """Stream ``name``'s sender wall clock minus ours: its driver host's, else its own clock pings', else 0."""
        offset = self.sender_offset_ns.get(name)
        if offset is None and self.camera_clocks is not None:
            offset = self.camera_clocks.offset_ns(name)
        return offset or 0

    def close_clocks(self) -> None:
        """Stop measuring camera clocks (the owner's shutdown)."""
        if self.camera_clocks is not None:
            self.camera_clocks.close()

    def _flag_future(self, name: str, arrival: Arrival, ahead_s: float) -> None:
        counters = self.counters.setdefault(name, StreamCounters())
        if arrival.flagged:
            return
        arrival.flagged = True
        counters.future_stamps += 1
        if counters.future_stamps == 1 or counters.future_stamps % 100 == 0:
            log.warning("%s: a message stamped %.3f s in the future (sender clock ahead); ageing it by its "
                        "arrival here instead (%d so far)", name, ahead_s, counters.future_stamps)

    def build(self) -> Observation:
        self.poll()
        t_ns, mono_ns = time.time_ns(), time.monotonic_ns()
        frame_age, state_age, problems = {}, {}, []
        for name in self.cameras:
            arrival = self.frame_arrivals.get(name)
            if arrival is None:
                problems.append(f"no frame yet from camera {name}{self._rejections(name)}")
                continue
            frame_age[name] = self.age_s(name, arrival, mono_ns)
            if frame_age[name] > self.max_frame_age_s:
                problems.append(f"camera {name} frame is {frame_age[name] * 1e3:.0f} ms old "
                                f"(max {self.max_frame_age_s * 1e3:.0f} ms)")
        for name in self.states:
            arrival = self.state_arrivals.get(name)
            if arrival is None:
                problems.append(f"no state yet from driver {name}{self._rejections(name)}")
                continue
            state_age[name] = self.age_s(name, arrival, mono_ns)
            if state_age[name] > self.max_state_age_s:
                problems.append(f"driver {name} state is {state_age[name] * 1e3:.0f} ms old")
        if problems:
            raise StaleObservation("; ".join(problems))
        state = np.concatenate([self.state_arrivals[n].msg["measured"] for n in self.states])
        frames = {n: self.frame_arrivals[n].msg.pixels for n in self.cameras}
        depth = {n: f.depth * np.float32(f.header["depth_scale_m"]) for n in self.cameras
                 if (f := self.frame_arrivals[n].msg).depth is not None}
        return Observation(mono_ns, t_ns, state, frames, frame_age, state_age, depth)

    def _rejections(self, name: str) -> str:
        """Why nothing usable came, if something came: a camera at the wrong size says so."""
        counters = self.counters.get(name)
        if counters is None or not counters.rejected:
            return ""
        return f" ({counters.rejected} ignored, the last: {counters.last_problem})"

    def state_silence_s(self, name: str) -> float | None:
        """Seconds since driver ``name``'s last valid state arrived; None if none yet."""
        arrival = self.state_arrivals.get(name)
        return None if arrival is None else (time.monotonic_ns() - arrival.mono_ns) * 1e-9
