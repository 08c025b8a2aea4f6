"""Aligning camera frames and state messages onto a fixed fps grid (pure logic, no sockets).

LeRobot stores ``timestamp = frame_index / fps``: every row of an episode sits on a fixed grid.
Grid instant k of an episode is ``t0 + k / fps`` on the host wall clock (the clock cameras stamp
``capture_ns`` with and messages carry as ``t_ns``). For each instant:

- each camera's frame nearest by ``capture_ns``; farther than half a period is a *gap* (the row
  still gets that nearest frame, because a row needs every camera, and the gap is counted);
- each driver's state: the newest message stamped at or before the instant (what was measured
  and commanded then); older than half a period is a state gap.

Losses are counted on every message, inside or outside episodes: frame_seq gaps and the
camera's own ``drops`` counter for frames, seq gaps for state messages. Nothing is dropped
without being counted: ``EpisodeReport`` carries the counts of the episode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Messages older than this (relative to the next grid instant) are no longer candidates.
KEEP_NS = 500_000_000
PHASE_CANDIDATES = 64


@dataclass
class StreamCounters:
    """Running counts for one stream (camera or driver), since the recorder started."""

    received: int = 0
    seq_lost: int = 0  # messages missing from the seq / frame_seq sequence (lost in transport)
    camera_drops: int = 0  # frames the camera itself lost before sending (its ``drops`` header, delta)
    last_seq: int | None = None
    last_drops: int | None = None

    def see(self, seq: int, drops: int | None = None) -> None:
        self.received += 1
        if self.last_seq is not None and seq > self.last_seq + 1:
            self.seq_lost += seq - self.last_seq - 1
        if seq > (self.last_seq if self.last_seq is not None else -1):
            self.last_seq = seq
        else:  # a restarted publisher: its counters begin again
            self.last_seq = seq
            self.last_drops = None
        if drops is not None:
            if self.last_drops is not None and drops > self.last_drops:
                self.camera_drops += drops - self.last_drops
            self.last_drops = drops


@dataclass
class EpisodeReport:
    """What the recorder saw during one episode; saved beside the episode, printed to the operator."""

    frames: int = 0  # grid rows
    fps: int = 0
    # per camera: rows whose nearest frame was farther than half a period (filled with it anyway)
    frame_gaps: dict[str, int] = field(default_factory=dict)
    # per camera: frames received during the episode that no row used (a camera faster than the grid)
    frames_unused: dict[str, int] = field(default_factory=dict)
    # per camera: frames lost in transport (frame_seq gaps) / lost by the camera (its drops) during the episode
    frames_lost: dict[str, int] = field(default_factory=dict)
    camera_drops: dict[str, int] = field(default_factory=dict)
    # per driver: rows whose newest state was older than half a period; state messages lost (seq gaps)
    state_gaps: dict[str, int] = field(default_factory=dict)
    states_lost: dict[str, int] = field(default_factory=dict)
    intervention_frames: int = 0

    def total_lost(self) -> int:
        return sum(self.frames_lost.values()) + sum(self.camera_drops.values()) + sum(self.states_lost.values())

    def total_gaps(self) -> int:
        return sum(self.frame_gaps.values()) + sum(self.state_gaps.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.frames} frames at {self.fps} fps"]
        lost = self.total_lost()
        gaps = self.total_gaps()
        parts.append(f"{lost} lost" if lost else "nothing lost")
        if gaps:
            parts.append(f"{gaps} gaps (frame {self.frame_gaps}, state {self.state_gaps})")
        if lost:
            parts.append(f"(transport {self.frames_lost} {self.states_lost}, camera {self.camera_drops})")
        return ", ".join(parts)


@dataclass
class State:
    t_ns: int
    observation: np.ndarray  # measured
    action: np.ndarray  # commanded after the safety filter, or the leader where it drives the follower


@dataclass
class Row:
    """One grid instant: images per camera, concatenated state and action, flags."""

    index: int
    t_ns: int
    images: dict[str, np.ndarray]
    observation: np.ndarray
    action: np.ndarray
    intervention: bool


def state_from_message(msg: dict[str, Any]) -> State:
    """observation = measured; action = commanded, or the leader where the follower obeys it in hardware."""
    measured = np.asarray(msg["measured"], dtype=np.float32)
    action = np.asarray(msg["commanded"], dtype=np.float32)
    device = msg.get("device") or {}
    if device.get("leader_follows_in_hardware") is True:
        leader = device.get("leader")
        if leader is not None and len(leader) == len(measured):
            action = np.asarray(leader, dtype=np.float32)
        else:  # no leader reading now: the follower holds, so its measured pose is what it was told
            action = measured.copy()
    return State(int(msg["t_ns"]), measured, action)


class Aligner:
    """Holds recent frames and states; cuts rows on the grid of the current episode."""

    def __init__(self, cameras: list[str], drivers: list[str], fps: int):
        self.cameras = list(cameras)
        self.drivers = list(drivers)
        self.fps = int(fps)
        self.period_ns = 1_000_000_000 // self.fps
        self.half_ns = self.period_ns // 2
        self.frames: dict[str, deque[tuple[int, int, np.ndarray]]] = {c: deque() for c in cameras}
        self.states: dict[str, deque[State]] = {d: deque() for d in drivers}
        self.frame_counters = {c: StreamCounters() for c in cameras}
        self.state_counters = {d: StreamCounters() for d in drivers}
        self.intervention = False
        # episode
        self.t0_ns: int | None = None
        self.t_end_ns: int | None = None
        self.next_index = 0
        self.report = EpisodeReport()
        self._used: dict[str, set[int]] = {}
        self._seen: dict[str, set[int]] = {}
        self._start_counts: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ input

    def add_frame(self, camera: str, header: dict[str, Any], pixels: np.ndarray) -> None:
        self.frame_counters[camera].see(int(header["frame_seq"]), header.get("drops"))
        capture = int(header["capture_ns"])
        self.frames[camera].append((capture, int(header["frame_seq"]), pixels))
        if self.t0_ns is not None and capture >= self.t0_ns - self.half_ns and (
                self.t_end_ns is None or capture < self.t_end_ns + self.half_ns):
            self._seen[camera].add(int(header["frame_seq"]))

    def add_state(self, driver: str, msg: dict[str, Any]) -> None:
        self.state_counters[driver].see(int(msg["seq"]))
        self.states[driver].append(state_from_message(msg))

    # ------------------------------------------------------------------ episodes

    @property
    def recording(self) -> bool:
        return self.t0_ns is not None

    def grid_phase(self) -> int | None:
        """The grid phase (ns, modulo a period) nearest to every camera's frame phase: the one that
        minimises the largest offset, so unsynchronised cameras stay clear of the half-period edge."""
        phases = [f[-1][0] % self.period_ns for f in self.frames.values() if f]
        if not phases:
            return None
        best, best_cost = phases[0], None
        for k in range(PHASE_CANDIDATES):
            cand = k * self.period_ns // PHASE_CANDIDATES
            cost = max(min(abs(cand - p), self.period_ns - abs(cand - p)) for p in phases)
            if best_cost is None or cost < best_cost:
                best, best_cost = cand, cost
        return best

    def start(self, t0_ns: int) -> None:
        """Starts an episode at ``t0_ns``, moved later by less than a period onto the cameras' frame
        phase (see grid_phase), so frames sit near grid instants instead of up to half a period off."""
        phase = self.grid_phase()
        if phase is not None:
            t0_ns += (phase - t0_ns) % self.period_ns
        self.t0_ns, self.t_end_ns, self.next_index = t0_ns, None, 0
        self.report = EpisodeReport(fps=self.fps)
        self._used = {c: set() for c in self.cameras}
        self._seen = {c: set() for c in self.cameras}
        self.report.frame_gaps = {c: 0 for c in self.cameras}
        self.report.state_gaps = {d: 0 for d in self.drivers}
        self._start_counts = {f"c:{c}": (k.seq_lost, k.camera_drops) for c, k in self.frame_counters.items()}
        self._start_counts |= {f"d:{d}": (k.seq_lost, 0) for d, k in self.state_counters.items()}
        for c, frames in self.frames.items():  # frames already there that fall in the episode
            self._seen[c] = {seq for cap, seq, _ in frames if cap >= t0_ns - self.half_ns}

    def stop(self, t_end_ns: int) -> None:
        """The episode ends at this instant: rows before it are still cut by ``due_rows``."""
        if self.t0_ns is not None and self.t_end_ns is None:
            self.t_end_ns = max(t_end_ns, self.t0_ns)

    def end_index(self) -> int | None:
        if self.t0_ns is None or self.t_end_ns is None:
            return None
        return -(-(self.t_end_ns - self.t0_ns) // self.period_ns)  # instants t0 + k*period < t_end

    def finished(self) -> bool:
        end = self.end_index()
        return end is not None and self.next_index >= end

    def close_episode(self) -> EpisodeReport:
        """The report of the episode just cut (call once ``finished()``); the aligner goes idle."""
        rep = self.report
        rep.frames = self.next_index
        for c, k in self.frame_counters.items():
            lost0, drops0 = self._start_counts[f"c:{c}"]
            rep.frames_lost[c] = k.seq_lost - lost0
            rep.camera_drops[c] = k.camera_drops - drops0
            rep.frames_unused[c] = len(self._seen[c] - self._used[c])
        for d, k in self.state_counters.items():
            rep.states_lost[d] = k.seq_lost - self._start_counts[f"d:{d}"][0]
        self.t0_ns = self.t_end_ns = None
        return rep

    def abort(self) -> None:
        self.t0_ns = self.t_end_ns = None

    def due_rows(self, now_ns: int, slack_ns: int) -> list[Row]:
        """Rows whose instant is settled: now is past instant + half a period + the arrival slack."""
        rows: list[Row] = []
        if self.t0_ns is not None:
            end = self.end_index()
            while end is None or self.next_index < end:
                t = self.t0_ns + self.next_index * self.period_ns
                if now_ns < t + self.half_ns + slack_ns:
                    break
                row = self._cut(t)
                if row is None:
                    break  # no frame or state at all yet from some stream: wait (the caller times out)
                rows.append(row)
                self.next_index += 1
        self._prune(now_ns)
        return rows

    def missing_streams(self) -> list[str]:
        """Streams that never sent anything (a row cannot be cut without them)."""
        return ([f"camera {c}" for c, f in self.frames.items() if not f]
                + [f"driver {d}" for d, s in self.states.items() if not s])

    def _cut(self, t: int) -> Row | None:
        if self.missing_streams():
            return None
        images = {}
        for c, frames in self.frames.items():
            cap, seq, pixels = min(frames, key=lambda f: abs(f[0] - t))
            if abs(cap - t) > self.half_ns:
                self.report.frame_gaps[c] += 1
            self._used[c].add(seq)
            images[c] = pixels
        obs, act = [], []
        for d, states in self.states.items():
            before = [s for s in states if s.t_ns <= t]
            s = before[-1] if before else states[0]
            if abs(t - s.t_ns) > self.half_ns:
                self.report.state_gaps[d] += 1
            obs.append(s.observation)
            act.append(s.action)
        if self.intervention:
            self.report.intervention_frames += 1
        return Row(self.next_index, t, images, np.concatenate(obs), np.concatenate(act), self.intervention)

    def _prune(self, now_ns: int) -> None:
        """Forget what no future row can use; keep the newest of each stream (a row needs one)."""
        if self.t0_ns is not None:
            horizon = self.t0_ns + self.next_index * self.period_ns - self.period_ns
        else:
            horizon = now_ns - KEEP_NS
        for frames in self.frames.values():
            while len(frames) > 1 and frames[1][0] <= horizon:
                frames.popleft()
        for states in self.states.values():
            while len(states) > 1 and states[1].t_ns <= horizon:
                states.popleft()
