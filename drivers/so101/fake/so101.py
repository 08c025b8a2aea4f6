"""A whole fake SO-101: the follower's and the leader's Feetech buses on ptys, each a
``FeetechBusFake`` of six STS3215 at IDs 1-6 (shoulder_pan .. gripper).

In-process (tests): ``fake = So101Fake(); ports = fake.start()`` -> {"follower": "/dev/pts/7", ...}.

As its own process (a cell, `armada fake so101`):

    python -m armada.drivers.so101.fake.so101 --link-dir DIR [--control SOCK] [--no-leader]

creates ``DIR/ttySO101_follower`` and ``DIR/ttySO101_leader`` as symlinks to the ptys, prints
``ready`` with the paths as one JSON line, and serves until SIGTERM/SIGINT. ``--control SOCK``
listens on a Unix socket for fault injection: one JSON object per line in, one reply per line out:

    {"op": "set_error", "bus": "follower", "id": 3, "overload": true}   (also overheat, voltage, overcurrent, angle)
    {"op": "set_missing", "bus": "follower", "id": 6}
    {"op": "set_bad_checksum", "bus": "follower", "id": 1}
    {"op": "unplug", "bus": "follower"}          (its pty closes; the symlink stays, dangling)
    {"op": "goals", "bus": "follower"}           -> {"goals": [[id, ticks], ...]} (every goal received)
    {"op": "torque", "bus": "follower"}          -> {"torque": {id: 0|1}}
    {"op": "move_by_hand", "bus": "leader", "id": 1, "position": 2300}
    {"op": "position", "bus": "follower", "id": 1} -> {"position": ticks}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from armada.drivers.so101.fake.feetech import TORQUE_ENABLE, FeetechBusFake

BUSES = ("follower", "leader")
IDS = (1, 2, 3, 4, 5, 6)
ERROR_FLAGS = ("overload", "overheat", "voltage", "overcurrent", "angle")


class So101Fake:
    def __init__(self, leader: bool = True, max_speed: float = 3000.0, tick_s: float = 0.005):
        self.buses = {name: FeetechBusFake(IDS, max_speed=max_speed, tick_s=tick_s)
                      for name in (BUSES if leader else BUSES[:1])}
        self.ports: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        self.ports = {name: bus.start() for name, bus in self.buses.items()}
        return dict(self.ports)

    def stop(self) -> None:
        for bus in self.buses.values():
            bus.stop()

    def __enter__(self) -> So101Fake:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def bus(self, name: str) -> FeetechBusFake:
        try:
            return self.buses[name]
        except KeyError:
            raise KeyError(f"no bus {name!r}; buses are {list(self.buses)}") from None

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        bus = self.bus(str(msg.get("bus")))
        sid = msg.get("id")
        if op == "set_error":
            bus.set_error(int(sid), **{k: bool(msg.get(k, False)) for k in ERROR_FLAGS})
        elif op == "set_missing":
            bus.set_missing(int(sid), bool(msg.get("missing", True)))
        elif op == "set_bad_checksum":
            bus.set_bad_checksum(int(sid), bool(msg.get("bad", True)))
        elif op == "unplug":
            bus.unplug()
        elif op == "goals":
            return {"goals": [list(g) for g in bus.received_goals]}
        elif op == "torque":
            return {"torque": {str(i): bus.register(i, TORQUE_ENABLE) for i in bus.ids()}}
        elif op == "move_by_hand":
            bus.move_by_hand(int(sid), msg.get("position"), float(msg.get("speed", 2000.0)))
        elif op == "position":
            return {"position": bus.present_position(int(sid))}
        else:
            raise ValueError(f"unknown op {op!r}")
        return {}


class So101FakeProcess:
    """`python -m armada.drivers.so101.fake.so101` as a child process, with a client for its control socket."""

    def __init__(self, link_dir: Path, *extra: str, ready_timeout_s: float = 10.0):
        import subprocess
        import sys
        import time

        self.link_dir = Path(link_dir)
        self.control = self.link_dir / "so101-fake.sock"
        root = Path(__file__).resolve().parents[3]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "armada.drivers.so101.fake.so101", "--link-dir", str(link_dir),
                                      "--control", str(self.control), *extra], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env, text=True)
        self._sock: socket.socket | None = None
        end = time.monotonic() + ready_timeout_s
        line = ""
        while time.monotonic() < end and not line:
            line = self.proc.stdout.readline()
            if self.proc.poll() is not None:
                break
        if not line:
            self.close()
            raise RuntimeError("the SO-101 fake did not start")
        self.ports: dict[str, str] = json.loads(line)["ports"]

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(5.0)
            self._sock.connect(str(self.control))
            self._file = self._sock.makefile("rwb")
        self._file.write((json.dumps({"op": op, **fields}) + "\n").encode())
        self._file.flush()
        reply = json.loads(self._file.readline())
        if not reply.pop("ok"):
            raise RuntimeError(f"SO-101 fake: {op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> So101FakeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve_control(fake: So101Fake, path: Path, done: threading.Event) -> socket.socket:
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(4)
    server.settimeout(0.2)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = {"ok": True, **fake.command(json.loads(line))}
                except Exception as exc:  # noqa: BLE001 (a bad command gets an error reply, the fake stays up)
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                f.write((json.dumps(reply) + "\n").encode())
                f.flush()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, name="so101-fake-control", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="armada fake so101",
                                     description="A fake SO-101: follower and leader Feetech STS3215 buses on ptys")
    parser.add_argument("--link-dir", type=Path, required=True,
                        help="where to create ttySO101_follower and ttySO101_leader (symlinks to the ptys)")
    parser.add_argument("--control", type=Path, default=None, help="Unix socket for fault injection (JSON lines)")
    parser.add_argument("--no-leader", action="store_true", help="only the follower bus")
    parser.add_argument("--max-speed", type=float, default=3000.0, help="servo speed, steps/s at Goal_Velocity 0")
    args = parser.parse_args(argv)
    fake = So101Fake(leader=not args.no_leader, max_speed=args.max_speed)
    ports = fake.start()
    args.link_dir.mkdir(parents=True, exist_ok=True)
    links = {}
    for name, port in ports.items():
        link = args.link_dir / f"ttySO101_{name}"
        link.unlink(missing_ok=True)
        link.symlink_to(port)
        links[name] = str(link)
    done = threading.Event()
    server = _serve_control(fake, args.control, done) if args.control is not None else None
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(json.dumps({"ready": True, "ports": links, "control": str(args.control) if args.control else None}),
          flush=True)
    while not done.wait(0.5):
        pass
    if server is not None:
        server.close()
        args.control.unlink(missing_ok=True)
    fake.stop()
    for link in links.values():
        Path(link).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
