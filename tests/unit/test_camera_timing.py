"""Camera clocks and counters: the min-filter clock mapping and drop counting."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from armada.drivers.cameras.timing import ClockMapper, DropCounter

PERIOD_NS = 33_333_333


@settings(max_examples=60, deadline=None)
@given(offset_ns=st.integers(-10**18, 10**18), seed=st.integers(0, 2**32 - 1),
       min_delay_ms=st.floats(0.5, 20), jitter_ms=st.floats(0, 50))
def test_mapped_time_is_never_after_arrival_and_lags_truth_by_at_most_the_window_min_delay(
        offset_ns, seed, min_delay_ms, jitter_ms):
    rng = np.random.default_rng(seed)
    mapper = ClockMapper(window=60)
    device = 10**12 + np.arange(300, dtype=np.int64) * PERIOD_NS
    delays = (min_delay_ms + rng.exponential(jitter_ms + 1e-9, device.size)) * 1e6
    delays = delays.astype(np.int64)
    for i, (d, delay) in enumerate(zip(device, delays)):
        truth = int(d) + offset_ns
        arrival = truth + int(delay)
        mapped = mapper.map(int(d), arrival)
        assert mapped <= arrival
        window_min = int(delays[max(0, i - 59): i + 1].min())
        # Exactly the truth plus the smallest transport delay seen in the window: spikes never bias it.
        assert mapped - truth == window_min


def test_a_delay_spike_does_not_move_the_mapping_but_a_new_minimum_does():
    mapper = ClockMapper(window=100)
    offset = 5_000_000_000
    for i in range(50):
        mapper.map(i * PERIOD_NS, i * PERIOD_NS + offset + 4_000_000)  # 4 ms transport
    spike = mapper.map(50 * PERIOD_NS, 50 * PERIOD_NS + offset + 80_000_000)  # an 80 ms hiccup
    assert spike == 50 * PERIOD_NS + offset + 4_000_000
    fast = mapper.map(51 * PERIOD_NS, 51 * PERIOD_NS + offset + 2_000_000)
    assert fast == 51 * PERIOD_NS + offset + 2_000_000
    assert mapper.offset_ns == offset + 2_000_000


def test_the_window_follows_clock_drift():
    mapper = ClockMapper(window=90)  # 3 s at 30 fps
    drift = 100e-6  # a 100 ppm crystal: 6 ms per minute
    errors = []
    for i in range(1800):  # one minute
        device = i * PERIOD_NS
        truth = int(device * (1 + drift)) + 7_000_000_000
        mapped = mapper.map(device, truth + 3_000_000)
        errors.append(mapped - truth)
    # Off by at most the drift over one window (0.3 ms); a fit frozen at its first offset would
    # be 6 ms off by the end of the minute.
    assert abs(errors[-1] - 3_000_000) <= drift * 3e9 + 1
    assert abs(errors[-1] - errors[100]) < 0.5e6


def test_a_device_clock_that_goes_backwards_restarts_the_fit():
    mapper = ClockMapper()
    for i in range(10):
        mapper.map(10**9 + i * PERIOD_NS, 10**18 + i * PERIOD_NS + 2_000_000)
    # A replug or a looping recording: the device clock starts again from a small value.
    mapped = mapper.map(5 * PERIOD_NS, 10**18 + 11 * PERIOD_NS + 3_000_000)
    assert mapper.resets == 1
    assert mapped == 10**18 + 11 * PERIOD_NS + 3_000_000


def test_drops_from_device_frame_number_gaps_and_restarts():
    counter = DropCounter(PERIOD_NS)
    for n in (10, 11, 14, 15):  # 12 and 13 never came
        counter.update(n, n * PERIOD_NS)
    assert counter.drops == 2
    assert counter.update(0, 16 * PERIOD_NS) == 0  # the counter restarted (replug, loop): not a drop
    assert counter.update(1, 17 * PERIOD_NS) == 0
    counter.restart()
    assert counter.update(50, 60 * PERIOD_NS) == 0  # after a reopen, the outage is not counted as drops
    assert counter.drops == 2


def test_drops_from_timestamp_gaps_without_a_frame_counter():
    counter = DropCounter(PERIOD_NS)
    t = 0
    stamps = []
    for step in (1, 1, 1.4, 1, 3, 1, 2):  # 1.4 intervals is jitter, 3 is two lost frames, 2 is one
        t += int(step * PERIOD_NS)
        stamps.append(t)
    for s in stamps:
        counter.update(None, s)
    assert counter.drops == 3
