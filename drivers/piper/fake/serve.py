"""Fake PiPer arms in their own process, so a real cell's driver process can talk to them.

    python -m armada.drivers.piper.fake.serve --channel 239.74.163.2 [--channel 239.74.163.3 ...]
        [--bustype udp_multicast] [--port 43113] [--rate-hz 200] [--home | --initial-deg J1 .. J6]
        [--initial-gripper-mm MM] [--time-constant-s 0.03] [--master [on|off]]

One ``PiperFirmware`` per ``--channel``. With ``udp_multicast`` (the default; ``virtual`` buses
only reach inside one process) a channel is an IPv4 multicast group, and the driver's backend
config names the same group with ``bustype: udp_multicast``. Fakes on one UDP port are isolated
from each other; a PiperBackend is not (see ``drivers.piper.fake.bus``), so run one fake group per
port, or give each its own ``--port`` and the driver ``CAN_CONFIG='{"port": N}'``.

``--master`` adds a scripted Cobot Magic master (teaching) arm on each channel, broadcasting
joint/gripper commands the puppet follows (``drivers.piper.fake.master``); ``--master off`` adds
them silent, to be switched on with the ``master`` control command.

Once every firmware streams it prints one line ``READY {json}`` (channels, bustype, port, control
port) and runs until SIGTERM/SIGINT or ``quit``, then exits 0.

Fault injection: a line-protocol TCP socket on 127.0.0.1 (the ``control`` port in READY). One
command per line, one answer line each (``ok``, JSON, or ``error ...``):
  ``estop CH``                 press the arm's e-stop (status frame reports 0x01)
  ``error CH CODE [STATUS]``   set err_code bits (0x.. or decimal) and optionally arm_status
  ``clear CH``                 clear err_code and arm_status
  ``silent CH 0|1``            stop/resume all feedback (a cable pulled, power lost)
  ``disable CH MOTOR ..``      disable motors 1-6 (none: all); they then refuse enable commands
  ``release CH MOTOR ..``      those motors (none: all) accept enable commands again (still disabled)
  ``mode CH standby|can|teach`` switch the control mode, as the arm's buttons do
  ``powercycle CH [J1 .. J6]`` power off and on: standby, motors disabled; optionally the joints (deg)
                               are somewhere else afterwards (sagged, moved by hand)
  ``hand CH J1 .. J6``         the joints (deg) are moved by hand, with no command
  ``master CH 0|1``            stop/resume the master arm's broadcast (needs ``--master``)
  ``masterhand CH J1 .. J6 MM`` the master is held by hand at these joints (deg) and gripper (mm): its
                               scripted motion stops (needs ``--master``)
  ``state CH``                 JSON snapshot of the firmware (SI units)
  ``targets CH [SINCE]``       JSON list of [monotonic s, 6 joint targets rad] received after SINCE
  ``ping``                     ``ok``
  ``quit``                     stop the process (exit 0)
CH is a channel name as given to ``--channel``.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from armada.drivers.piper.fake.bus import bus_port
from armada.drivers.piper.fake.firmware import PiperFirmware
from armada.drivers.piper.fake.master import PiperMaster

READY_TIMEOUT_S = 5.0
ACCEPT_POLL_S = 0.2  # how often the control server looks at the stop flag
CONN_READ_TIMEOUT_S = 0.5
MAX_HISTORY = 20_000  # frames and targets kept per firmware (~25 s of targets at 200 Hz x 4)


class FakeArms:
    """The firmwares (and masters) of one fake process, addressed by channel name."""

    def __init__(self, args: argparse.Namespace):
        initial_deg, initial_mm = _initial_pose(args)
        self.firmwares: dict[str, PiperFirmware] = {}
        self.masters: dict[str, PiperMaster] = {}
        try:
            for ch in args.channel:
                self.firmwares[ch] = PiperFirmware(
                    ch, rate_hz=args.rate_hz, initial_deg=initial_deg, initial_gripper_mm=initial_mm,
                    time_constant_s=args.time_constant_s, bustype=args.bustype, port=args.port,
                    max_history=MAX_HISTORY)
                if args.master:
                    self.masters[ch] = PiperMaster(ch, bustype=args.bustype, port=args.port, rate_hz=args.rate_hz,
                                                   broadcasting=args.master == "on")
        except Exception:
            self.close()
            raise

    def wait_streaming(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(fw.frames_sent > 0 for fw in self.firmwares.values()):
                return True
            time.sleep(0.01)
        return False

    def port(self) -> int | None:
        """The UDP port the udp_multicast buses use (None for other bus types)."""
        return bus_port(next(iter(self.firmwares.values())).bus)

    def close(self) -> None:
        for master in self.masters.values():
            master.close()
        for fw in self.firmwares.values():
            fw.close()


def _initial_pose(args: argparse.Namespace) -> tuple[np.ndarray | None, float]:
    """Joint angles (deg, None: all zero, the folded rest pose) and gripper opening (mm)."""
    deg, mm = (None if args.initial_deg is None else np.asarray(args.initial_deg, dtype=np.float64)), 0.0
    if args.home:
        from armada.runtime.config import load_embodiment

        home = load_embodiment("piper").home
        deg, mm = np.degrees(home[:6]), float(home[6] * 1e3)
    return deg, mm if args.initial_gripper_mm is None else args.initial_gripper_mm


# --------------------------------------------------------------------------- control commands


def _int(text: str) -> int:
    return int(text, 0)


CTRL_MODES = {"standby": 0x00, "can": 0x01, "teach": 0x02}


def _motors(texts: list[str]) -> list[int]:
    motors = [_int(m) for m in texts]
    if any(not 1 <= m <= 6 for m in motors):
        raise ValueError(f"motors are 1-6, got {motors}")
    return motors


def _joints_deg(texts: list[str]) -> np.ndarray:
    q = np.array([float(t) for t in texts], dtype=np.float64)
    if q.shape != (6,) or not np.all(np.isfinite(q)) or np.any(np.abs(q) > 360.0):
        raise ValueError(f"6 finite joint angles in degrees, got {texts}")
    return q


def _on(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {text!r}")
    return text == "1"


class Control:
    """Executes one control line against the fake arms; returns the answer line."""

    def __init__(self, arms: FakeArms, stop: threading.Event):
        self.arms = arms
        self.stop = stop
        self.commands: dict[str, Callable[[list[str]], str]] = {
            "estop": self._estop, "error": self._error, "clear": self._clear, "silent": self._silent,
            "disable": self._disable, "master": self._master, "state": self._state, "targets": self._targets,
            "release": self._release, "mode": self._mode, "powercycle": self._powercycle, "hand": self._hand,
            "masterhand": self._master_hand,
        }

    def execute(self, line: str) -> str:
        parts = line.split()
        if not parts:
            return "error empty command"
        cmd, rest = parts[0], parts[1:]
        if cmd == "ping":
            return "ok"
        if cmd == "quit":
            self.stop.set()
            return "ok"
        handler = self.commands.get(cmd)
        if handler is None:
            return f"error unknown command {cmd!r}; known: {', '.join(sorted(self.commands))}, ping, quit"
        if not rest:
            return f"error {cmd} needs a channel; have {list(self.arms.firmwares)}"
        try:
            return handler(rest)
        except (ValueError, IndexError) as exc:
            return f"error {cmd}: {exc}"

    def _fw(self, channel: str) -> PiperFirmware:
        fw = self.arms.firmwares.get(channel)
        if fw is None:
            raise ValueError(f"no channel {channel!r}; have {list(self.arms.firmwares)}")
        return fw

    def _estop(self, a: list[str]) -> str:
        self._fw(a[0]).press_estop()
        return "ok"

    def _error(self, a: list[str]) -> str:
        self._fw(a[0]).inject_error(_int(a[1]), _int(a[2]) if len(a) > 2 else None)
        return "ok"

    def _clear(self, a: list[str]) -> str:
        self._fw(a[0]).clear_error()
        return "ok"

    def _silent(self, a: list[str]) -> str:
        self._fw(a[0]).silence(_on(a[1]))
        return "ok"

    def _disable(self, a: list[str]) -> str:
        self._fw(a[0]).disable_motors(*_motors(a[1:]))
        return "ok"

    def _release(self, a: list[str]) -> str:
        self._fw(a[0]).enable_motors(*_motors(a[1:]))
        return "ok"

    def _mode(self, a: list[str]) -> str:
        if len(a) != 2 or a[1] not in CTRL_MODES:
            raise ValueError(f"mode is one of {', '.join(CTRL_MODES)}")
        self._fw(a[0]).set_mode(CTRL_MODES[a[1]])
        return "ok"

    def _powercycle(self, a: list[str]) -> str:
        self._fw(a[0]).power_cycle(_joints_deg(a[1:]) if len(a) > 1 else None)
        return "ok"

    def _hand(self, a: list[str]) -> str:
        self._fw(a[0]).move_by_hand(_joints_deg(a[1:]))
        return "ok"

    def _master(self, a: list[str]) -> str:
        self._fw(a[0])
        master = self.arms.masters.get(a[0])
        if master is None:
            raise ValueError("no master arm on this channel: start the fake with --master")
        master.set_broadcasting(_on(a[1]))
        return "ok"

    def _master_hand(self, a: list[str]) -> str:
        self._fw(a[0])
        master = self.arms.masters.get(a[0])
        if master is None:
            raise ValueError("no master arm on this channel: start the fake with --master")
        if len(a) != 8:
            raise ValueError("masterhand CH J1 .. J6 GRIPPER_MM")
        master.move_by_hand(np.append(np.radians(_joints_deg(a[1:7])), float(a[7]) / 1e3))
        return "ok"

    def _state(self, a: list[str]) -> str:
        state = self._fw(a[0]).state()
        master = self.arms.masters.get(a[0])
        if master is not None:
            state["master_broadcasting"] = master.broadcasting
        return json.dumps(state)

    def _targets(self, a: list[str]) -> str:
        since = float(a[1]) if len(a) > 1 else 0.0
        return json.dumps(self._fw(a[0]).joint_targets_since(since))


# --------------------------------------------------------------------------- control socket


def serve_control(control: Control, stop: threading.Event) -> tuple[socket.socket, threading.Thread]:
    """Listen on 127.0.0.1 (ephemeral port); one thread per connection."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(ACCEPT_POLL_S)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_serve_conn, args=(conn, control, stop), daemon=True).start()

    thread = threading.Thread(target=accept_loop, name="fake-piper-control", daemon=True)
    thread.start()
    return server, thread


def _serve_conn(conn: socket.socket, control: Control, stop: threading.Event) -> None:
    conn.settimeout(CONN_READ_TIMEOUT_S)  # so a quiet client never pins this thread past shutdown
    buf = b""
    with conn:
        while not stop.is_set():
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                answer = control.execute(line.decode("utf-8", "replace"))
                try:
                    conn.sendall(answer.encode() + b"\n")
                except OSError:
                    return


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="armada fake piper", description=__doc__.splitlines()[0])
    p.add_argument("--channel", action="append", required=True,
                   help="a CAN channel to serve (udp_multicast: an IPv4 multicast group such as 239.74.163.2); "
                        "repeat for more arms")
    p.add_argument("--bustype", default="udp_multicast", choices=["udp_multicast", "virtual", "socketcan"],
                   help="python-can interface (virtual only reaches buses in this same process)")
    p.add_argument("--port", type=int, default=None, help="udp_multicast UDP port (python-can's default 43113)")
    p.add_argument("--rate-hz", type=float, default=200.0, help="feedback rate")
    pose = p.add_mutually_exclusive_group()
    pose.add_argument("--home", action="store_true", help="start at the piper embodiment's home pose")
    pose.add_argument("--initial-deg", type=float, nargs=6, metavar="J", help="start at these joint angles (deg)")
    p.add_argument("--initial-gripper-mm", type=float, default=None, help="start with this gripper opening (mm)")
    p.add_argument("--time-constant-s", type=float, default=0.03,
                   help="joint tracking time constant; 0 jumps to each target at the next cycle")
    p.add_argument("--master", nargs="?", const="on", default=None, choices=["on", "off"],
                   help="also run a scripted Cobot Magic master (teaching) arm on each channel, broadcasting "
                        "(on, the default) or silent until the `master CH 1` control command (off)")
    args = p.parse_args(argv)
    if len(set(args.channel)) != len(args.channel):
        p.error(f"--channel given twice: {args.channel}")
    if args.rate_hz <= 0 or args.time_constant_s < 0:
        p.error("--rate-hz must be > 0 and --time-constant-s >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    try:
        arms = FakeArms(args)
    except RuntimeError as exc:
        print(f"fake piper: {exc}", file=sys.stderr, flush=True)
        return 2
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = None
    try:
        if not arms.wait_streaming(READY_TIMEOUT_S):
            print(f"fake piper: firmwares did not start streaming within {READY_TIMEOUT_S} s", file=sys.stderr)
            return 2
        server, accept_thread = serve_control(Control(arms, stop), stop)
        ready = {"channels": args.channel, "bustype": args.bustype, "port": arms.port(),
                 "control": server.getsockname()[1], "master": args.master}
        print("READY " + json.dumps(ready), flush=True)
        while not stop.wait(0.2):
            pass
        return 0
    finally:
        if server is not None:
            server.close()
            accept_thread.join(timeout=1.0)
        arms.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
