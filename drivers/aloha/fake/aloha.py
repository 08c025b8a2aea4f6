"""A whole fake ALOHA: four Dynamixel buses on ptys (two ViperX 300 S followers, two WidowX 250 S
leaders), each a ``DynamixelBusFake`` with the real arm's IDs, models and linked shadow motors.

In-process (tests): ``fake = AlohaFake(); ports = fake.start()`` -> {"puppet_left": "/dev/pts/7", ...}.

As its own process (a cell, `armada fake aloha`):

    python -m armada.drivers.aloha.fake.aloha --link-dir DIR [--control SOCK] [--no-leaders]

creates ``DIR/ttyDXL_puppet_left`` etc. (ALOHA's udev names) as symlinks to the ptys, so a cell names
fixed paths (``{run_dir}/ttyDXL_puppet_left``), prints ``ready`` with the paths as one JSON line, and
serves until SIGTERM/SIGINT. ``--control SOCK`` listens on a Unix socket for fault injection: one
JSON object per line in, one JSON reply per line out, e.g.

    {"op": "set_error", "bus": "puppet_left", "id": 4, "overload": true}
    {"op": "set_missing", "bus": "puppet_right", "id": 9}
    {"op": "set_bad_crc", "bus": "puppet_left", "id": 1}
    {"op": "unplug", "bus": "puppet_left"}          (its pty closes; the symlink stays, dangling)
    {"op": "goals", "bus": "puppet_left"}           -> {"goals": [[id, ticks], ...]} (every goal received)
    {"op": "torque", "bus": "puppet_left"}          -> {"torque": {id: 0|1}}
    {"op": "move_by_hand", "bus": "master_left", "id": 1, "position": 2300}
    {"op": "position", "bus": "puppet_left", "id": 1} -> {"position": ticks}
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

from armada.drivers.aloha.fake.dynamixel import TORQUE_ENABLE, DynamixelBusFake

BUSES = ("puppet_left", "puppet_right", "master_left", "master_right")
# id -> model, as on the arms (vx300s / wx250s; shadows 3 and 5 are linked to 2 and 4).
FOLLOWER = {1: "xm540-w270", 2: "xm540-w270", 3: "xm540-w270", 4: "xm540-w270", 5: "xm540-w270",
            6: "xm540-w270", 7: "xm540-w270", 8: "xm430-w350", 9: "xm430-w350"}
LEADER = {1: "xm430-w350", 2: "xm430-w350", 3: "xm430-w350", 4: "xm430-w350", 5: "xm430-w350",
          6: "xm430-w350", 7: "xm430-w350", 8: "xl430-w250", 9: "xc430-w150"}
SHADOW_LINKS = {3: 2, 5: 4}
# Start mid-range: joints at 2048 (0 rad), grippers half open between ALOHA's open/close readings.
FOLLOWER_GRIPPER_START = 2331
LEADER_GRIPPER_START = 1925


class AlohaFake:
    def __init__(self, leaders: bool = True, max_speed: float = 3000.0, tick_s: float = 0.005):
        self.buses: dict[str, DynamixelBusFake] = {}
        for name in BUSES if leaders else BUSES[:2]:
            follower = name.startswith("puppet")
            servos = FOLLOWER if follower else LEADER
            positions = {i: 2048 for i in servos}
            positions[9] = FOLLOWER_GRIPPER_START if follower else LEADER_GRIPPER_START
            bus = DynamixelBusFake(dict(servos), positions=positions, max_speed=max_speed, tick_s=tick_s)
            for shadow, primary in SHADOW_LINKS.items():
                bus.link_shadow(shadow, primary)
            self.buses[name] = bus
        self.ports: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        self.ports = {name: bus.start() for name, bus in self.buses.items()}
        return dict(self.ports)

    def stop(self) -> None:
        for bus in self.buses.values():
            bus.stop()

    def __enter__(self) -> AlohaFake:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def bus(self, name: str) -> DynamixelBusFake:
        try:
            return self.buses[name]
        except KeyError:
            raise KeyError(f"no bus {name!r}; buses are {list(self.buses)}") from None

    # --- the control socket's commands ----------------------------------------------------------
    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        bus = self.bus(str(msg.get("bus")))
        sid = msg.get("id")
        if op == "set_error":
            flags = {k: bool(msg.get(k, False)) for k in ("overload", "overheat", "voltage", "electrical_shock",
                                                          "encoder")}
            bus.set_error(int(sid), **flags)
        elif op == "set_missing":
            bus.set_missing(int(sid), bool(msg.get("missing", True)))
        elif op == "set_bad_crc":
            bus.set_bad_crc(int(sid), bool(msg.get("bad", True)))
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


class AlohaFakeProcess:
    """`python -m armada.drivers.aloha.fake.aloha` as a child process, with a client for its control socket
    (tests and `armada bench aloha`)."""

    def __init__(self, link_dir: Path, *extra: str, ready_timeout_s: float = 10.0):
        import subprocess
        import sys
        import time

        self.link_dir = Path(link_dir)
        self.control = self.link_dir / "aloha-fake.sock"
        root = Path(__file__).resolve().parents[3]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "armada.drivers.aloha.fake.aloha", "--link-dir", str(link_dir),
                                      "--control", str(self.control), *extra], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env, text=True)
        end = time.monotonic() + ready_timeout_s
        line = ""
        while time.monotonic() < end and not line:
            line = self.proc.stdout.readline()
            if self.proc.poll() is not None:
                break
        if not line:
            self.close()
            raise RuntimeError("the ALOHA fake did not start")
        self.ports: dict[str, str] = json.loads(line)["ports"]
        self._sock: socket.socket | None = None

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
            raise RuntimeError(f"ALOHA fake: {op}: {reply['error']}")
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

    def __enter__(self) -> AlohaFakeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve_control(fake: AlohaFake, path: Path, done: threading.Event) -> socket.socket:
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

    threading.Thread(target=accept, name="aloha-fake-control", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="armada fake aloha",
                                     description="A fake ALOHA: four Dynamixel Protocol 2.0 buses on ptys")
    parser.add_argument("--link-dir", type=Path, required=True,
                        help="where to create ttyDXL_puppet_left, ... (symlinks to the ptys)")
    parser.add_argument("--control", type=Path, default=None, help="Unix socket for fault injection (JSON lines)")
    parser.add_argument("--no-leaders", action="store_true", help="only the two follower buses")
    parser.add_argument("--max-speed", type=float, default=3000.0, help="servo speed, ticks/s at Profile Velocity 0")
    args = parser.parse_args(argv)
    fake = AlohaFake(leaders=not args.no_leaders, max_speed=args.max_speed)
    ports = fake.start()
    args.link_dir.mkdir(parents=True, exist_ok=True)
    links = {}
    for name, port in ports.items():
        link = args.link_dir / f"ttyDXL_{name}"
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
