"""Shared bits for HIL tests: a state recorder running beside the test."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import zmq

from armada.runtime.transport import Subscriber


class StateRecorder:
    """Records every state message a driver publishes, in a thread, until stopped."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sub = Subscriber(ctx, endpoint, hwm=100_000)
        self.messages: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.1)

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.sub.recv(0.05)
            if msg is not None:
                self.messages.append(msg)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sub.close()
        return self.messages

    def latest(self) -> dict | None:
        return self.messages[-1] if self.messages else None

    def fresh(self, after_ns: int | None = None, timeout_s: float = 5.0) -> dict:
        """The first state stamped at or after ``after_ns`` (default: now), waiting for it.

        Drivers stamp states with this host's monotonic clock. On a loaded 2-core host this
        recorder thread can lag the driver by a second, so ``latest()`` read after a sleep may be
        old news; a test that asserts what the driver did by a time reads ``fresh()`` instead."""
        after_ns = time.monotonic_ns() if after_ns is None else after_ns
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = self.latest()
            if m is not None and m["mono_ns"] >= after_ns:
                return m
            time.sleep(0.005)
        last = self.latest()
        raise AssertionError(f"no state stamped after {after_ns} within {timeout_s} s "
                             f"(last stamped {last and last['mono_ns']})")

    def stamped_between(self, t0_ns: int, t1_ns: int) -> list[dict]:
        """The states the driver stamped in [t0_ns, t1_ns), once one after t1_ns has arrived."""
        self.fresh(t1_ns)
        return [m for m in list(self.messages) if t0_ns <= m["mono_ns"] < t1_ns]

    def wait_mode(self, mode: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = self.latest()
            if m is not None and m["mode"] == mode:
                return m
            time.sleep(0.01)
        last = self.latest()
        raise AssertionError(f"driver did not reach {mode} within {timeout_s} s (last: {last and last['mode']})")


def commanded_kinematics(messages: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times (s, driver clock), commanded positions and velocities from consecutive state messages."""
    t = np.array([m["mono_ns"] for m in messages]) * 1e-9
    q = np.stack([m["commanded"] for m in messages])
    v = np.stack([m["velocity"] for m in messages])
    return t, q, v


def variant_cell(folder, **overrides) -> Path:
    """The default cell with some sections replaced, written to ``folder``/cell.yaml."""
    import yaml

    from armada.runtime.config import SCRIPTED_CELL

    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = Path(folder) / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
