"""PiPer command-to-feedback latency through the real PiperBackend and piper_sdk, against the fake.

    python -m armada.drivers.piper.bench [--seconds 10]      (``armada bench piper``)

Method. The fake runs with ``time_constant_s=0``: at each 200 Hz cycle its joints jump to the
last target received, so the first feedback frame sent after a JointCtrl arrives carries exactly
that target. The bench writes step targets (joint 1 alternating +-0.02 rad about home, at a random
phase of the fake's cycle), then polls ``PiperBackend.read()`` until joint 1 shows the new target.

- ``frame``: write() call -> arrival of that feedback frame on this host. The arrival time is the
  SDK's frame timestamp (udp_multicast: the kernel's receive time; virtual: the fake's send time),
  which ``Reading.mono_ns`` carries, so how often we poll does not count.
- ``visible``: write() call -> the moment ``read()`` returned the new value (adds the SDK's reader
  thread and our 0.2 ms polling).

Both include the fake's cycle: a target waits up to one period (5 ms, about 2.5 ms on average) for
the next cycle, as it would for a real controller's. Two transports: ``udp_multicast`` with the fake
in its own process (the realistic case: two processes, the kernel in between) and ``virtual`` in
this process (one interpreter, the fake's thread competing for the GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from armada.drivers.core.backend import BackendError
from armada.drivers.piper.backend import PiperBackend
from armada.drivers.piper.fake.client import FakePiperProcess, free_udp_port, random_group
from armada.drivers.piper.fake.firmware import PiperFirmware
from armada.runtime.config import load_embodiment

STEP_RAD = 0.02
STEP_TIMEOUT_S = 0.1  # a step not seen by then is counted lost
POLL_S = 0.0002
CONNECT_TIMEOUT_S = 5.0
FAKE_RATE_HZ = 200.0
MATCH_RAD = 1e-4  # feedback is in 0.001 deg (1.7e-5 rad): this is "the same target"


def bench_piper(seconds: float = 10.0) -> dict:
    """Half the time over udp_multicast (fake in a child process), half over an in-process virtual bus."""
    per = max(0.5, seconds / 2)
    return {
        "method": "write() of a step target -> first feedback frame showing it (fake with zero tracking lag, "
                  f"{FAKE_RATE_HZ:.0f} Hz cycle included)",
        "fake_rate_hz": FAKE_RATE_HZ,
        "udp_multicast": _bench_process(per),
        "virtual": _bench_in_process(per),
    }


# --------------------------------------------------------------------------- the two set-ups


@contextmanager
def _udp_port(port: int) -> Iterator[None]:
    """python-can reads ``CAN_CONFIG`` when a bus is created: a private port keeps other fakes out."""
    old = os.environ.get("CAN_CONFIG")
    os.environ["CAN_CONFIG"] = json.dumps({"port": port})
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CAN_CONFIG", None)
        else:
            os.environ["CAN_CONFIG"] = old


def _bench_process(seconds: float) -> dict:
    emb = load_embodiment("piper")
    group, port = random_group(), free_udp_port()
    with FakePiperProcess([group], port, "--home", "--time-constant-s", "0", "--rate-hz", str(FAKE_RATE_HZ)):
        backend = PiperBackend(group, emb, bustype="udp_multicast")
        with _udp_port(port):
            backend.connect(CONNECT_TIMEOUT_S)
        try:
            return _measure(backend, emb.home, seconds)
        finally:
            backend.close()


def _bench_in_process(seconds: float) -> dict:
    emb = load_embodiment("piper")
    channel = f"piper-bench-{uuid.uuid4().hex[:8]}"
    fw = PiperFirmware(channel, rate_hz=FAKE_RATE_HZ, initial_deg=np.degrees(emb.home[:6]),
                       initial_gripper_mm=emb.home[6] * 1e3, time_constant_s=0.0)
    backend = PiperBackend(channel, emb, bustype="virtual")
    try:
        backend.connect(CONNECT_TIMEOUT_S)
        return _measure(backend, emb.home, seconds)
    finally:
        backend.close()
        fw.close()


# --------------------------------------------------------------------------- measuring


def _measure(backend: PiperBackend, home: np.ndarray, seconds: float) -> dict:
    rng = random.Random(0)
    frame_ms: list[float] = []
    visible_ms: list[float] = []
    lost = 0
    sign = 1.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        target = home.copy()
        target[0] += sign * STEP_RAD
        sign = -sign
        seen = _step(backend, target)
        if seen is None:
            lost += 1
        else:
            frame_ms.append(seen[0])
            visible_ms.append(seen[1])
        time.sleep(rng.uniform(0.002, 0.007))  # a random phase of the fake's 5 ms cycle
    return {"count": len(frame_ms), "lost": lost, **_stats("", frame_ms), **_stats("visible_", visible_ms)}


def _step(backend: PiperBackend, target: np.ndarray) -> tuple[float, float] | None:
    """Write one target; (frame latency, visible latency) in ms, or None if not seen in time."""
    sent_ns = time.monotonic_ns()
    backend.write(target)
    deadline = sent_ns + int(STEP_TIMEOUT_S * 1e9)
    while (now := time.monotonic_ns()) < deadline:
        try:
            reading = backend.read()
        except BackendError:  # stale for a moment (a loaded machine): keep polling until the deadline
            reading = None
        if reading is not None and abs(reading.position[0] - target[0]) < MATCH_RAD:
            return max(0, reading.mono_ns - sent_ns) * 1e-6, (now - sent_ns) * 1e-6
        time.sleep(POLL_S)
    return None


def _stats(prefix: str, ms: list[float]) -> dict:
    if not ms:
        return {f"{prefix}median_ms": None, f"{prefix}p99_ms": None, f"{prefix}max_ms": None}
    a = np.asarray(ms)
    return {f"{prefix}median_ms": round(float(np.median(a)), 3), f"{prefix}p99_ms": round(float(np.percentile(a, 99)), 3),
            f"{prefix}max_ms": round(float(a.max()), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="PiPer command-to-feedback latency against the fake firmware")
    p.add_argument("--seconds", type=float, default=10.0, help="total measuring time (half per transport)")
    args = p.parse_args(argv)
    print(json.dumps(bench_piper(args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
