"""Clocks and counters shared by every camera source.

One clock domain: every frame's ``capture_ns`` is on the host wall clock (``time.time_ns``), the
clock all processes of a cell share. A device clock is mapped onto it by ``ClockMapper``; a
source without a device clock estimates the capture instant from the arrival time.

``ClockMapper`` fits ``host = device + offset`` with the offset taken as the *minimum* of
``host_arrival - device_time`` over a sliding window. Every arrival is late by the transport
delay (exposure readout, USB, driver queues) plus scheduling noise, all positive, so the minimum
is the sample with the least delay: noise and load spikes never pull the estimate later, and a
window of a few seconds follows the slow drift between the two crystals (tens of ppm, well under
a millisecond over the window). What remains is a constant bias: the mapped time is the
arrival time of the fastest frame in the window, i.e. it lags the true exposure by the minimum
transport delay (a few ms on USB 3). A latency calibration can subtract that constant.
"""

from __future__ import annotations

import time
from collections import deque


class ClockMapper:
    """Maps a device clock (ns) to the host wall clock with a sliding min-filter on the offset."""

    def __init__(self, window: int = 300, max_jump_ns: int = 1_000_000_000):
        self.window = window
        self.max_jump_ns = max_jump_ns
        self._offsets: deque[tuple[int, int]] = deque()  # (sample index, offset), offsets increasing
        self._index = 0
        self._last_device_ns: int | None = None
        self.resets = 0

    def map(self, device_ns: int, arrival_ns: int) -> int:
        """The host wall-clock time of a frame stamped ``device_ns`` that arrived at ``arrival_ns``."""
        if self._jumped(device_ns, arrival_ns):
            self.reset()
            self.resets += 1
        self._last_device_ns = device_ns
        self._push(arrival_ns - device_ns)
        return device_ns + self._offsets[0][1]

    def _jumped(self, device_ns: int, arrival_ns: int) -> bool:
        """The device clock went backwards (reset, replug, replay loop) or leapt away from the fit."""
        if self._last_device_ns is None:
            return False
        if device_ns <= self._last_device_ns:
            return True
        return abs(arrival_ns - device_ns - self._offsets[0][1]) > self.max_jump_ns

    def _push(self, offset: int) -> None:
        # A monotonic deque: the front is the window's minimum, each sample enters and leaves once.
        while self._offsets and self._offsets[-1][1] >= offset:
            self._offsets.pop()
        self._offsets.append((self._index, offset))
        while self._offsets[0][0] <= self._index - self.window:
            self._offsets.popleft()
        self._index += 1

    @property
    def offset_ns(self) -> int | None:
        return self._offsets[0][1] if self._offsets else None

    def reset(self) -> None:
        self._offsets.clear()
        self._last_device_ns = None


class DropCounter:
    """Counts frames a camera lost before they reached us.

    With a device frame counter, a gap in the counter is a drop. Without one, a gap between
    consecutive capture stamps longer than 1.5 frame intervals is ``round(gap / interval) - 1``
    drops. A counter that goes backwards (replug, a recording looping) starts a new run.
    """

    def __init__(self, interval_ns: int):
        self.interval_ns = interval_ns
        self.drops = 0
        self._last_number: int | None = None
        self._last_ns: int | None = None

    def update(self, device_frame: int | None, capture_ns: int) -> int:
        """Account for one frame; returns the drops just before it (0 for most frames)."""
        missed = 0
        if device_frame is not None and self._last_number is not None:
            if device_frame > self._last_number:
                missed = device_frame - self._last_number - 1
        elif device_frame is None and self._last_ns is not None:
            gap = capture_ns - self._last_ns
            if gap > 1.5 * self.interval_ns:
                missed = max(0, round(gap / self.interval_ns) - 1)
        self._last_number, self._last_ns = device_frame, capture_ns
        self.drops += missed
        return missed

    def restart(self) -> None:
        """After reopening a device: the outage is a recovery, not a run of drops."""
        self._last_number = self._last_ns = None


def wall_from_monotonic_ns(mono_ns: int) -> int:
    """A CLOCK_MONOTONIC instant (V4L2 buffer stamps) on the host wall clock, read now."""
    return time.time_ns() - (time.monotonic_ns() - mono_ns)
