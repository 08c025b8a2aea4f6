"""`armada bench estop`: e-stop latency while N connections flood the driver's command socket.

The driver runs as its own process (a mock arm that stamps when its ``estop`` was called and
reports the stamp in its state), so flooding clients and the measuring client never share its
GIL. Each flooder is a process that sends, as fast as the socket takes them, the worst messages
we know how to build: the largest accepted and over-sized ones, a map keyed by a megabyte of
bytes, tens of thousands of tiny array extensions, deep nesting, garbage, truncated and
multipart messages, and valid-but-costly commands (a very slow move_to, full-size trajectories,
stats, hello with a large map). The measuring client holds the lease and keeps the arm armed;
another connection presses the e-stop at random moments. For each press:

- reply: send -> the driver's reply (the latch is set before the reply is sent);
- device: send -> the mock arm's ``estop`` call, as stamped by the arm (the same host clock);
- overruns: loop overruns counted by the driver over the whole run at that N.

The tests in tests/hil/test_stop_path.py use the same flood with generous bounds; precise numbers
belong here.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from armada.drivers.core.backend import Reading
from armada.drivers.mock.arm import MockArm
from armada.runtime import protocol
from armada.runtime.config import SCRIPTED_CELL, driver_embodiment, load_cell
from armada.runtime.transport import CommandClient, RemoteError, Subscriber

F = protocol.MessageFactory()
PR_SET_PDEATHSIG = 1


class TimedMockArm(MockArm):
    """A mock arm that stamps each ``estop`` call and publishes the stamp with its readings."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.estop_calls = 0
        self.estop_ns = 0

    def estop(self) -> None:
        self.estop_ns = time.monotonic_ns()
        self.estop_calls += 1
        super().estop()

    def read(self) -> Reading:
        r = super().read()
        return Reading(r.position, r.mono_ns, r.velocity, r.estopped, r.fault,
                       {"estop_calls": self.estop_calls, "estop_ns": self.estop_ns})


# --------------------------------------------------------------------------- the worst messages


def adversarial_messages(dof: int, seed: int = 0) -> list[tuple[str, bytes | list[bytes]]]:
    """Named messages meant to cost the driver as much as possible (none of them an e-stop)."""
    rng = np.random.default_rng(seed)
    lease = "0123456789abcdef"  # not the real lease: every leased command is refused, after decoding
    head = {"v": protocol.PROTOCOL_MAJOR, "kind": "ping", "seq": 1, "t_ns": 0}
    # Both the over-sized kind (refused by size, before decoding) and the largest that decodes.
    many_exts = protocol.encode(F.make("ping", x=[np.zeros(0, np.float32)] * 60_000))
    few_exts = protocol.encode(F.make("ping", x=[np.zeros(0, np.float32)] * 8_000))
    trajectory = protocol.encode(F.make("trajectory", lease=lease, t0_ns=0, dt=0.002,
                                        points=rng.normal(size=(4096, dof)) * 0.01))
    rows = (protocol.COMMAND_LIMITS.max_bytes - 4096) // (8 * dof)
    largest = protocol.encode(F.make("trajectory", lease=lease, t0_ns=0, dt=0.002,
                                     points=rng.normal(size=(rows, dof)) * 0.01))
    move = protocol.encode(F.make("move_to", lease=lease, target=np.zeros(dof), max_velocity=1e-9))
    slowest = protocol.encode(F.make("move_to", lease=lease, target=np.zeros(dof), max_velocity=0.0011))
    # Nesting built by hand: msgpack's packer refuses it, a hostile sender does not.
    deep = b"\x85" + msgpack.packb(head)[1:] + msgpack.packb("deep") + b"\x91" * 100_000 + b"\x01"
    return _random_messages(rng, dof, lease) + [
        ("huge_key", msgpack.packb({b"k" * 1_200_000: 1, **head})),
        ("max_size", msgpack.packb({**head, "blob": b"\x00" * (protocol.MAX_MESSAGE_BYTES - 100)})),
        ("over_size", b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1024)),
        ("many_exts", many_exts),
        ("exts_within_size", few_exts),
        ("deep", deep),
        ("big_map", msgpack.packb({**head, **{f"k{i}": i for i in range(4000)}})),
        ("garbage", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()),
        ("truncated", trajectory[: len(trajectory) // 2]),
        ("multipart", [b"a" * 1000, b"b" * 1000, b"c"]),
        ("trajectory", trajectory),
        ("largest_trajectory", largest),
        ("move_to_slow", move),
        ("move_to_slowest_valid", slowest),
        ("stats", protocol.encode(F.make("stats"))),
        ("hello_big", protocol.encode(F.make("hello", version="1.0", role="x",
                                             description={f"k{i}": "v" * 64 for i in range(4000)}))),
        ("ping", protocol.encode(F.make("ping"))),
    ]


def _random_messages(rng: np.random.Generator, dof: int, lease: str, n: int = 40) -> list[tuple[str, bytes]]:
    """Valid commands with byte flips, cuts and random field values: the fuzz part of the flood."""
    kinds = [k for k in protocol.KINDS if k != "estop"]
    values = [None, True, -1, 2**63 - 1, -(2**63), 1e308, float("nan"), "x" * 300, b"\xff" * 64, [1] * 40,
              {"a": 1}, np.zeros((3, dof)), np.full(dof, np.inf)]
    out = []
    for i in range(n):
        msg = F.make(str(rng.choice(kinds)), lease=lease, target=np.zeros(dof), points=np.zeros((2, dof)))
        for field in rng.choice(["v", "seq", "t_ns", "lease", "target", "dt", "t0_ns", "client", "ttl_s"],
                                size=int(rng.integers(1, 4)), replace=False):
            msg[str(field)] = values[int(rng.integers(len(values)))]
        try:
            raw = bytearray(protocol.encode(msg))
        except protocol.ProtocolError:
            continue
        for _ in range(int(rng.integers(0, 4))):  # flip a few bytes
            raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
        if rng.random() < 0.2:
            raw = raw[: int(rng.integers(1, len(raw)))]
        out.append((f"random_{i}", bytes(raw)))
    return out


def flood(endpoint: str, dof: int, seconds: float, seed: int, ready: Any = None) -> None:
    """One flooding connection (run in its own process): send, never wait, discard replies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    messages = adversarial_messages(dof, seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.connect(endpoint)
    rng = np.random.default_rng(seed)
    # ZeroMQ drops the connection of a peer that sends more than MAXMSGSIZE; it reconnects at
    # once, but while it does it floods nothing. Over-sized messages are therefore sent rarely.
    limit = protocol.COMMAND_LIMITS.max_bytes
    weights = np.array([0.02 if _size(raw) > limit else 1.0 for _, raw in messages])
    weights /= weights.sum()
    deadline = time.monotonic() + seconds
    if ready is not None:
        ready.set()
    try:
        while time.monotonic() < deadline:
            _, raw = messages[int(rng.choice(len(messages), p=weights))]
            try:
                if isinstance(raw, list):
                    sock.send_multipart(raw, zmq.NOBLOCK)
                else:
                    sock.send(raw, zmq.NOBLOCK)
            except zmq.Again:
                sock.poll(1, zmq.POLLOUT)
            while sock.poll(0, zmq.POLLIN):
                sock.recv(zmq.NOBLOCK)
    finally:
        sock.close(0)
        ctx.term()


def _size(raw: bytes | list[bytes]) -> int:
    return sum(map(len, raw)) if isinstance(raw, list) else len(raw)


def start_flooders(endpoint: str, dof: int, n: int, seconds: float, seed: int = 1) -> list[multiprocessing.Process]:
    """``n`` flooding processes, returned once every one of them is sending (or 30 s have passed)."""
    mp = multiprocessing.get_context("spawn")
    ready = [mp.Event() for _ in range(n)]
    procs = [mp.Process(target=flood, args=(endpoint, dof, seconds, seed + i, ready[i]), daemon=True)
             for i in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 30.0
    for event in ready:
        event.wait(max(deadline - time.monotonic(), 0.0))
    return procs


# --------------------------------------------------------------------------- the driver under test


def serve(cell_path: str, run_dir: str) -> None:
    """Run the cell's first driver over a TimedMockArm, until SIGTERM (the bench's driver process)."""
    from armada.drivers.core.process import DriverProcess

    cell = load_cell(cell_path, run_dir)
    cfg = cell.drivers[0]
    emb = driver_embodiment(Path(cell_path), cfg)
    b = cfg.backend
    arm = TimedMockArm(emb.home, b.tracking_time_constant_s, b.latency_s, b.noise_std, b.seed)
    process = DriverProcess(cfg, emb, arm, cell, Path(run_dir))
    signal.signal(signal.SIGTERM, process.request_stop)
    signal.signal(signal.SIGINT, process.request_stop)
    # A bench killed half-way must not leave its driver behind. The kernel tells us (no Python
    # thread: one at normal priority holding the GIL would delay the real-time ones).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    process.run()


class DriverUnderTest:
    """A driver process on ipc in a short private folder, with a state recorder."""

    def __init__(self, cell_path: Path = SCRIPTED_CELL, realtime: bool = False, wrapper: list[str] | None = None,
                 loop_spin_us: float = 0.0):
        import subprocess
        import sys

        import yaml

        self.run_dir = Path(tempfile.mkdtemp(prefix="armada-e-"))  # ipc paths are limited to ~100 bytes
        data = yaml.safe_load(Path(cell_path).read_text())
        data["drivers"] = data["drivers"][:1]
        data["drivers"][0]["embodiment"] = str(Path(cell_path).parent.parent / "embodiments" /
                                               f"{data['drivers'][0]['embodiment']}.yaml")
        data["drivers"][0]["realtime_priority"] = 80 if realtime else None
        data["drivers"][0]["loop_spin_us"] = loop_spin_us
        cell_path = self.run_dir / "cell.yaml"
        cell_path.write_text(yaml.safe_dump(data))
        self.cell = load_cell(cell_path, self.run_dir)
        self.cfg = self.cell.drivers[0]
        self.emb = driver_embodiment(Path(cell_path), self.cfg)
        self._argv = [*(wrapper or []), sys.executable, "-m", "armada.drivers.core.stop_bench", "serve", str(cell_path),
                      str(self.run_dir)]
        self.proc = subprocess.Popen(self._argv)
        self.ctx = zmq.Context()
        self.states: list[dict] = []
        self._stop = threading.Event()
        self._sub = Subscriber(self.ctx, self.cfg.state, hwm=100_000)
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()
        self.client = CommandClient(self.ctx, self.cfg.cmd, default_timeout_s=2.0)
        self._wait_up()

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 20.0
        while True:
            try:
                self.client.request("ping", timeout_s=0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("the driver under test did not start") from None

    def restart(self, hard: bool) -> None:
        """Stop the driver (SIGKILL when ``hard``, else SIGTERM) and start it again on the same run dir."""
        import subprocess

        self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        self.proc.wait(10)
        self.states.clear()
        self.client.close()  # a fresh connection: the old one's requests died with the process
        self.client = CommandClient(self.ctx, self.cfg.cmd, default_timeout_s=2.0)
        self.proc = subprocess.Popen(self._argv)
        self._wait_up()

    def _record(self) -> None:
        while not self._stop.is_set():
            msg = self._sub.recv(0.05)
            if msg is not None:
                self.states.append(msg)

    def state_after(self, t0_ns: int, pred, timeout_s: float) -> dict | None:
        """The first state message stamped after ``t0_ns`` that satisfies ``pred``."""
        deadline = time.monotonic() + timeout_s
        start = 0
        while time.monotonic() < deadline:
            msgs = self.states
            for i in range(start, len(msgs)):
                if msgs[i]["mono_ns"] >= t0_ns and pred(msgs[i]):
                    return msgs[i]
            start = max(len(msgs) - 1, 0)
            time.sleep(0.002)
        return None

    def close(self) -> int | None:
        self._stop.set()
        self._thread.join(2.0)
        self._sub.close()
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.proc.returncode


def _retry(conn: CommandClient, kind: str, attempts: int = 5, **fields: Any) -> dict:
    """A request that a flooded backlog may drop: try again (each try times out on its own)."""
    for i in range(attempts):
        try:
            return conn.request(kind, **fields)
        except TimeoutError:
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def measure_estops(dut: DriverUnderTest, seconds: float, seed: int = 0) -> dict[str, list[float]]:
    """Press the e-stop at random moments for ``seconds``; re-arm between presses."""
    rng = np.random.default_rng(seed)
    op, button = dut.client, CommandClient(dut.ctx, dut.cfg.cmd, default_timeout_s=2.0)
    reply_ms, device_ms, failures = [], [], 0
    lease = _retry(op, "acquire", client="bench")["lease"]
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                mode = _retry(op, "heartbeat", lease=lease)["mode"]
                if mode == "estop":
                    _retry(op, "reset_estop", lease=lease)
                _retry(op, "arm", lease=lease)
                pause_end = time.monotonic() + rng.uniform(0.02, 0.08)
                while time.monotonic() < pause_end:
                    _retry(op, "heartbeat", lease=lease)
                    time.sleep(0.01)
            except (TimeoutError, RemoteError):
                failures += 1
                if failures > 20:
                    raise
                try:
                    lease = op.request("acquire", client="bench")["lease"]  # the lease may have lapsed
                except (TimeoutError, RemoteError):
                    pass
                continue
            t0 = time.monotonic_ns()
            reply = button.request("estop", reason="bench", timeout_s=5.0)
            reply_ms.append((time.monotonic_ns() - t0) * 1e-6)
            assert reply["mode"] == "estop", reply
            state = dut.state_after(t0, lambda m: m.get("device", {}).get("estop_ns", 0) >= t0, 2.0)
            if state is not None:
                device_ms.append((state["device"]["estop_ns"] - t0) * 1e-6)
    finally:
        button.close()
    return {"reply_ms": reply_ms, "device_ms": device_ms}


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


def bench_estop(seconds: float, connections: tuple[int, ...] = (0, 1, 3, 8), realtime: bool = False) -> dict[str, Any]:
    """E-stop latency per number of flooding connections; ``seconds`` of presses per N."""
    out: dict[str, Any] = {"realtime": realtime}
    dut = DriverUnderTest(realtime=realtime)
    try:
        dof = dut.emb.dof
        for n in connections:
            before = dut.states[-1]["counters"] if dut.states else {}
            flooders = start_flooders(dut.cfg.cmd, dof, n, seconds + 5.0)
            time.sleep(0.5 if n else 0.0)  # let the flood build up
            result = measure_estops(dut, seconds)
            after = dut.states[-1]["counters"]
            for p in flooders:
                p.terminate()
                p.join(5)
            tick_ms = 1e3 / dut.emb.control_rate_hz
            out[f"N={n}"] = {"reply_ms": _pct(result["reply_ms"]), "device_ms": _pct(result["device_ms"]),
                             "overruns": after["overruns"] - before.get("overruns", 0),
                             "rejected": after.get("rejected_messages", 0) - before.get("rejected_messages", 0),
                             "dropped": after.get("dropped_requests", 0) - before.get("dropped_requests", 0),
                             "driver_alive": dut.proc.poll() is None, "tick_ms": tick_ms}
            time.sleep(0.5)
    finally:
        dut.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m armada.drivers.core.stop_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a driver over a TimedMockArm (used by the bench and the tests)")
    s.add_argument("cell")
    s.add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.cell, args.run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
