"""The inference process under abuse, as `armada infer` runs it: floods, garbage, signals, deaths.

The drivers here are the scriptable FakeDriver (it speaks the protocol over the cell's real
sockets) where a test needs to flood or silence a driver's stream on demand, and the real
driver where a test kills it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from armada.runtime.config import SCRIPTED_CELL
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.protocol import PROTOCOL_MAJOR
from armada.runtime.supervisor import CellProcesses
from armada.runtime.transport import CommandClient, FramePublisher
from tests.unit.test_inference_fakes import FakeDriver

pytestmark = pytest.mark.hil

BIG_KEY = b"\x00" * 1_200_000  # a rejection that quotes it (4 characters a byte) is 4.8 MB
SLOW_KEY = b"K" * 1_200_000  # quoted, 1.2 MB: encodable, but slow to reject and answer


def _worst_messages(fatal: bool = True) -> list[bytes]:
    """Garbage and hostile messages for the ctl socket, each a single frame; ``fatal`` adds the
    ones that made the inference process exit before."""
    common = {"v": PROTOCOL_MAJOR, "seq": 7, "t_ns": 1}
    # ~1.2 MB maps with a large bytes key
    killers = [msgpack.packb({BIG_KEY: 1}), msgpack.packb(common | {"kind": "status", BIG_KEY: 0})] if fatal else []
    return killers + [
        msgpack.packb({SLOW_KEY: 1}),
        msgpack.packb(common | {"kind": "status", SLOW_KEY: 0}),
        msgpack.packb(common | {"kind": "K" * 1_000_000}),  # the rejection would quote it
        msgpack.packb(common | {"kind": "episode_start", "instruction": 5}),
        msgpack.packb(common | {"kind": "episode_start", "instruction": "x", "duration_s": float("nan")}),
        msgpack.packb([[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]),
        msgpack.packb(common | {"kind": "status", "x": [msgpack.ExtType(1, b"")] * 10_000}),
        b"\xc1\xff\x00garbage",
        b"",
        os.urandom(300),
        msgpack.packb(common | {"kind": "shutdown", "extra": "looks legit, but seq is fake"})[:-3],
    ]


class Flood:
    """Threads that send the worst messages to ``endpoint`` as fast as they can, never reading."""

    def __init__(self, ctx: zmq.Context, endpoint: str, threads: int = 2, fatal: bool = True):
        self.ctx, self.endpoint = ctx, endpoint
        self.sent = 0
        self._stop = threading.Event()
        # The first thread sends every kind (the big ones are slow to send); the others only the
        # small ones, as fast as they can.
        self._threads = [threading.Thread(target=self._run, args=(i == 0, fatal), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, big: bool, fatal: bool) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        messages = [m for m in _worst_messages(fatal) if big or len(m) < 100_000]
        try:
            while not self._stop.is_set():
                for raw in messages:
                    try:
                        sock.send(raw, zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.Again:
                        time.sleep(0.001)
        finally:
            sock.close(0)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)


class Cameras:
    """The scripted cell's cameras, played from the test: real frames at 30 fps, and optionally a
    flood of frames of the wrong size in between."""

    def __init__(self, ctx: zmq.Context, cell, flood: bool = False):
        self.pubs = {c.name: (FramePublisher(ctx, c.frames, hwm=1000), (c.height, c.width, 3)) for c in cell.cameras}
        self.flood = flood
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq, wrong = 0, np.zeros((2, 2, 3), np.uint8)
        images = {n: np.zeros(shape, np.uint8) for n, (_, shape) in self.pubs.items()}
        next_frame = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_frame:
                next_frame += 1 / 30
                for name, (pub, _) in self.pubs.items():
                    pub.send(images[name], camera=name, frame_seq=seq, capture_ns=time.time_ns())
                seq += 1
            elif self.flood:
                for name, (pub, _) in self.pubs.items():
                    pub.send(wrong, camera=name, frame_seq=seq, capture_ns=time.time_ns())
            else:
                time.sleep(0.002)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for pub, _ in self.pubs.values():
            pub.close()


@pytest.fixture
def infer_cell(short_tmp):
    """`armada infer` on the scripted cell, with a FakeDriver and played cameras in this process."""
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        d = procs.cell.drivers[0]
        driver = FakeDriver(procs.ctx, d.cmd, d.state)
        child = procs.spawn("infer")
        procs.wait_ready()
        yield procs, driver, child
        driver.close()


def _ask(ctx, cell, kind: str, timeout_s: float = 2.0, **fields) -> dict:
    client = CommandClient(ctx, cell.inference.ctl, default_timeout_s=timeout_s)
    try:
        return client.request(kind, **fields)
    finally:
        client.close()


def test_sigterm_ends_the_inference_process_promptly_under_a_flood_on_ctl_and_on_its_streams(infer_cell):
    procs, driver, child = infer_cell
    cameras = Cameras(procs.ctx, procs.cell)
    client = EpisodeClient(procs.ctx, procs.cell)
    episode = client.start("wave", duration_s=60.0, arm=True)
    deadline = time.monotonic() + 10
    while "trajectory" not in driver.kinds():
        assert time.monotonic() < deadline, f"no chunk reached the driver: {child.log_tail()}"
        time.sleep(0.05)
    # Now flood everything the episode reads: wrong-size frames between the real ones (the real
    # ones drown and the episode pauses, as it should), garbage on the state stream, and ctl.
    cameras.flood = True
    driver.garbage.set()
    # Slow messages, not the ones that crashed the old process: those have a test of their own.
    flood = Flood(procs.ctx, procs.cell.inference.ctl, fatal=False)
    time.sleep(1.0)
    sent = time.monotonic()
    child.proc.send_signal(signal.SIGTERM)
    try:
        child.proc.wait(timeout=10)
    finally:
        took = time.monotonic() - sent
        flood.stop()
        cameras.close()
        client.close()
    print(f"SIGTERM to exit under a flood of {flood.sent} ctl messages: {took:.2f} s")
    assert flood.sent > 1000
    assert took < 3.0, f"SIGTERM took {took:.1f} s under a flood:\n{child.log_tail()}"
    assert child.proc.returncode == 0, child.log_tail()
    assert "release" in driver.kinds()[-5:], "the episode did not hand control back on the way out"
    assert episode == 1


def test_ctl_fuzz_the_process_stays_up_answers_and_episode_stop_still_works(infer_cell):
    procs, driver, child = infer_cell
    cameras = Cameras(procs.ctx, procs.cell)
    flood = Flood(procs.ctx, procs.cell.inference.ctl)
    try:
        time.sleep(1.0)
        assert child.proc.poll() is None, child.log_tail()
        assert "mono_ns" in _ask(procs.ctx, procs.cell, "ping", timeout_s=3.0)
        assert _ask(procs.ctx, procs.cell, "status", timeout_s=3.0)["running"] is False
        client = EpisodeClient(procs.ctx, procs.cell)
        client.ctl.default_timeout_s = 3.0
        episode = client.start("wave", duration_s=60.0, arm=True)
        time.sleep(1.5)
        stopped = time.monotonic()
        client.stop()
        report = client.wait_report(episode, timeout_s=10)
        assert report["outcome"] == "stopped", report
        print(f"episode_stop to report under a ctl flood: {time.monotonic() - stopped:.2f} s")
        assert time.monotonic() - stopped < 5.0
        client.close()
    finally:
        flood.stop()
        cameras.close()
    assert flood.sent > 1000
    assert child.proc.poll() is None, child.log_tail()
    assert "mono_ns" in _ask(procs.ctx, procs.cell, "ping")
    assert _ask(procs.ctx, procs.cell, "status")["last_report"]["outcome"] == "stopped"
    assert driver.lease is None and "release" in driver.kinds()


def test_a_driver_killed_mid_episode_fails_the_episode_naming_it(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.start_all()
        client = EpisodeClient(procs.ctx, procs.cell)
        episode = client.start("wave", duration_s=10.0, arm=True)
        time.sleep(2.0)
        killed = time.monotonic()
        os.kill(procs.child("arm").proc.pid, signal.SIGKILL)
        report = client.wait_report(episode, timeout_s=20)
        ended = time.monotonic()
        client.close()
    print(f"driver killed -> episode failed: {ended - killed:.2f} s")
    assert report["outcome"].startswith("failed"), report
    assert "driver arm" in report["outcome"], report
    assert ended - killed < 5.0
