"""A loopback Universal Robots controller for tests, in its own process.

    python -m armada.drivers.ur3.fake.controller --host 127.0.0.1 [--dashboard-port 29999]
        [--script-port 30003] [--rtde-port 30004] [--control-port 0] [--version 5.11.1.0]

ur-rtde hard-codes 30004 (RTDE) and 30003 (script) and only lets the dashboard port be chosen, so
parallel fakes need distinct loopback addresses (127.0.0.2, 127.0.0.3, ...), not distinct ports.

It serves:
  * the dashboard line protocol (29999),
  * a script sink (30003): once a script arrives the program is "running" (runtime_state PLAYING,
    robot_status_bits bit 1) and the emulated control script answers through the registers:
    output_int_register_0 = 1 ready, 2 done; the command id is input_int_register_0
    (11 servoJ, 1 moveJ, 255 stop script, ...), its arguments the input double registers,
  * the control script's timing, as ur-rtde's script runs on a controller: once per controller
    cycle (2 ms e-Series, 8 ms CB3 = a version below 5) it reads input_int_register_0 once. Only a
    servoJ there (11) sets a new servo target; "no command" (0, which is also how ur-rtde encodes
    kickWatchdog) leaves the old target in place, so a kick that lands between two servoJ packages
    costs that cycle its target. RTDE input packages are applied as they arrive, whole, in order: two
    that arrive in one cycle (Nagle merging them, or a late one) leave only the later one for the
    script to see. Each cycle is logged: ``cycles`` (below),
  * RTDE v2 (30004): V, v, O, I, S, P, U; outputs streamed at the requested frequency,
  * a control socket (line protocol, port printed at start) for fault injection:
    ``pstop``, ``estop``, ``clear``, ``drop`` (close every client connection), ``slow SECONDS``
    (delay every answer), ``silent 0|1`` (stop answering), ``unlock_delay SECONDS`` (refuse
    ``unlock protective stop`` that long after the stop, as a real UR does for 5 s),
    ``set_q q0 .. q5``, ``state`` (JSON), ``log`` (JSON), ``targets`` (JSON list of every servoJ
    target received since the last ``targets``), ``cycles`` (JSON list, one entry per controller
    cycle the script ran since the last ``cycles``: [controller time s, command seen, 1 if a servoJ
    package arrived since the previous cycle and became the target else 0, the servo target]),
    ``quit``. ``state`` counts ``script_bytes`` received and ``program_starts``.

On start it prints one line ``READY {json}`` with the bound ports to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import struct
import sys
import threading
import time

TYPES = {  # RTDE type name -> struct format (big-endian)
    "BOOL": "?", "UINT8": "B", "UINT32": "I", "UINT64": "Q", "INT32": "i", "DOUBLE": "d",
    "VECTOR3D": "3d", "VECTOR6D": "6d", "VECTOR6INT32": "6i", "VECTOR6UINT32": "6I",
}

_V6 = [
    "target_q", "target_qd", "target_qdd", "target_current", "target_moment", "actual_q", "actual_qd",
    "actual_qdd", "actual_current", "actual_current_window", "actual_current_as_torque", "joint_control_output",
    "actual_TCP_pose", "actual_TCP_speed", "actual_TCP_force", "target_TCP_pose", "target_TCP_speed",
    "joint_temperatures", "actual_joint_voltage", "ft_raw_wrench", "payload_inertia", "external_force_torque",
    "actual_moment",
]
_D = [
    "timestamp", "actual_execution_time", "speed_scaling", "target_speed_fraction", "actual_momentum",
    "actual_main_voltage", "actual_robot_voltage", "actual_robot_current", "standard_analog_input0",
    "standard_analog_input1", "standard_analog_output0", "standard_analog_output1", "io_current",
    "euromap67_24V_voltage", "euromap67_24V_current", "tool_analog_input0", "tool_analog_input1",
    "tool_output_current", "tool_temperature", "tcp_force_scalar", "payload", "speed_slider_fraction",
    "joint_position_deviation_ratio", "collision_detection_ratio", "standard_analog_output_0",
    "standard_analog_output_1",
]
_U32 = [
    "runtime_state", "robot_status_bits", "safety_status_bits", "analog_io_types", "euromap67_input_bits",
    "euromap67_output_bits", "tool_mode", "tool_analog_input_types", "output_bit_registers0_to_31",
    "output_bit_registers32_to_63", "input_bit_registers0_to_31", "input_bit_registers32_to_63",
    "script_control_line", "speed_slider_mask",
]
_U8 = [
    "tool_output_mode", "tool_digital_output0_mode", "tool_digital_output1_mode", "standard_digital_output_mask",
    "standard_digital_output", "configurable_digital_output_mask", "configurable_digital_output",
    "tool_digital_output_mask", "tool_digital_output", "standard_analog_output_mask", "standard_analog_output_type",
]
VAR_TYPES: dict[str, str] = {}
VAR_TYPES.update({n: "VECTOR6D" for n in _V6})
VAR_TYPES.update({n: "DOUBLE" for n in _D})
VAR_TYPES.update({n: "UINT32" for n in _U32})
VAR_TYPES.update({n: "UINT8" for n in _U8})
VAR_TYPES.update({
    "actual_digital_input_bits": "UINT64", "actual_digital_output_bits": "UINT64", "robot_mode": "INT32",
    "safety_mode": "INT32", "safety_status": "INT32", "tool_output_voltage": "INT32", "joint_mode": "VECTOR6INT32",
    "actual_tool_accelerometer": "VECTOR3D", "elbow_position": "VECTOR3D", "elbow_velocity": "VECTOR3D",
    "payload_cog": "VECTOR3D",
})
for _i in range(48):
    for _io in ("input", "output"):
        VAR_TYPES[f"{_io}_int_register_{_i}"] = "INT32"
        VAR_TYPES[f"{_io}_double_register_{_i}"] = "DOUBLE"
for _i in range(64, 128):
    VAR_TYPES[f"input_bit_register_{_i}"] = "BOOL"
    VAR_TYPES[f"output_bit_register_{_i}"] = "BOOL"

REALTIME_CMDS = {24, 11, 9, 10, 6, 25, 26, 27, 38, 58, 66, 67, 68, 69, 70, 71}  # the script answers "ready"
CMD_SERVOJ, CMD_SPEEDJ, CMD_MOVEJ, CMD_STOP_SCRIPT = 11, 9, 1, 255
CMD_SET_WATCHDOG = 35  # argument: the minimum kick frequency in input_double_register_0
MAX_SERVO_LOG = 200_000  # servoJ targets kept for `targets` (400 s at 500 Hz)
MAX_CYCLE_LOG = 200_000  # controller cycles kept for `cycles`
E_SERIES_CYCLE_S, CB3_CYCLE_S = 0.002, 0.008
RT_STOPPED, RT_PLAYING = 1, 2
SAFETY_NORMAL, SAFETY_PROTECTIVE, SAFETY_ROBOT_ESTOP = 1, 3, 7
VMAX = [math.pi, math.pi, math.pi, 2 * math.pi, 2 * math.pi, 2 * math.pi]



# Dashboard commands whose answer does not depend on the fake's state.
FIXED_DASHBOARD_REPLIES = {
    "get serial number": "20235300001",
    "get robot model": "UR3",
    "robotmode": "Robotmode: RUNNING",
    "close popup": "closing popup",
    "close safety popup": "closing safety popup",
    "is in remote control": "true",
    "power on": "Powering on",
    "power off": "Powering off",
    "brake release": "Brake releasing",
}

class Robot:
    """Shared controller state, advanced by one physics thread."""

    def __init__(self, q0):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.q = list(q0)
        self.qd = [0.0] * 6
        self.target = list(q0)
        self.tau = 0.02  # first-order time constant of the joint servo, s
        self.program_running = False
        self.safety_mode = SAFETY_NORMAL
        self.in_int = [0] * 48
        self.in_double = [0.0] * 48
        self.out_int = [0] * 48
        self.out_double = [0.0] * 48
        self.cmd_done_at = None
        self.commands: list[int] = []
        self.script_bytes = 0
        self.stale_cmd: int | None = None
        self.fault_at = 0.0
        self.servo_targets: list[list[float]] = []  # every servoJ target received, in order
        self.servoj_packages = 0  # servoJ input packages received
        self.servoj_taken = 0  # the package count when the script last took a servoJ target
        self.cycles: list[list] = []  # per controller cycle: [time, cmd seen, fresh target 0/1, target]
        self.program_starts = 0  # how often an arriving script started the program
        # The script's RTDE watchdog. A real script counts kickWatchdog calls; here any input
        # package from a client counts as a kick, which is what a live client sends every tick.
        self.watchdog_period_s: float | None = None
        self.last_input_at = time.monotonic()
        self.watchdog_trips = 0

    # the emulated control script, called each tick with the lock held
    def _script_step(self) -> None:
        if not self.program_running:
            self.out_int[0] = 0
            return
        cmd = self.in_int[0]  # read once per cycle, as the script's loop does
        if cmd == self.stale_cmd:
            cmd = 0  # a command left in the register from before this program started
        fresh = cmd == CMD_SERVOJ and self.servoj_packages != self.servoj_taken
        if len(self.cycles) < MAX_CYCLE_LOG:
            target = list(self.in_double[0:6]) if cmd == CMD_SERVOJ else list(self.target)
            self.cycles.append([round(time.monotonic() - self.t0, 6), cmd, int(fresh), target])
        if cmd == 0:
            self.out_int[0] = 1  # no command (or a watchdog kick): the servo target stays
            return
        if cmd in REALTIME_CMDS:
            if cmd == CMD_SERVOJ:
                self.target = list(self.in_double[0:6])
                self.servoj_taken = self.servoj_packages
            elif cmd == CMD_SPEEDJ:
                self.target = [q + v * 0.05 for q, v in zip(self.q, self.in_double[0:6])]
            self.out_int[0] = 1
            return
        if self.out_int[0] == 2:
            return  # done, waiting for the client to clear the command
        if cmd == CMD_STOP_SCRIPT:
            self.out_int[0] = 2
            self.program_running = False
            return
        if cmd == CMD_MOVEJ:
            self.target = list(self.in_double[0:6])
            if max(abs(a - b) for a, b in zip(self.q, self.target)) > 1e-3:
                return
        self.out_int[0] = 2  # any other command completes at once

    def step(self, dt: float) -> None:
        with self.lock:
            self._script_step()
            self._watchdog_step()
            moving = self.program_running and self.safety_mode == SAFETY_NORMAL
            for j in range(6):
                if moving:
                    v = (self.target[j] - self.q[j]) / self.tau
                    v = max(-VMAX[j], min(VMAX[j], v))
                else:
                    v = 0.0
                self.q[j] += v * dt
                self.qd[j] = v

    def _watchdog_step(self) -> None:
        if self.watchdog_period_s is None or not self.program_running:
            return
        if time.monotonic() - self.last_input_at > self.watchdog_period_s:
            self.program_running = False  # the script stops the arm and exits
            self.target = list(self.q)
            self.watchdog_period_s = None
            self.watchdog_trips += 1

    def fault(self, safety_mode: int) -> None:
        with self.lock:
            self.safety_mode = safety_mode
            self.fault_at = time.monotonic()
            if safety_mode != SAFETY_NORMAL:
                self.program_running = False  # a real controller halts the program on a stop
                self.target = list(self.q)

    def value(self, name: str):
        """The current value of an output variable (lock held)."""
        if name == "timestamp":
            return time.monotonic() - self.t0
        if name in ("actual_q", "target_q"):
            return self.q if name == "actual_q" else self.target
        if name in ("actual_qd", "target_qd"):
            return self.qd
        if name in ("actual_TCP_pose", "target_TCP_pose"):
            return fk_ur3(self.q)
        if name == "robot_mode":
            return 7  # RUNNING
        if name == "safety_mode" or name == "safety_status":
            return self.safety_mode
        if name == "runtime_state":
            return RT_PLAYING if self.program_running else RT_STOPPED
        if name == "robot_status_bits":
            return 0b1 | (0b10 if self.program_running else 0)
        if name == "safety_status_bits":
            bit = {SAFETY_NORMAL: 0, SAFETY_PROTECTIVE: 2, SAFETY_ROBOT_ESTOP: 6}.get(self.safety_mode, 9)
            bits = 1 << bit
            if self.safety_mode == SAFETY_ROBOT_ESTOP:
                bits |= 1 << 7  # is_emergency_stopped
            return bits
        if name == "speed_scaling" or name == "target_speed_fraction":
            return 1.0
        if name == "joint_mode":
            return [253] * 6  # RUNNING
        if name == "joint_temperatures":
            return [30.0] * 6
        if name == "actual_main_voltage" or name == "actual_robot_voltage":
            return 48.0
        if name.startswith("output_int_register_"):
            return self.out_int[int(name.rsplit("_", 1)[1])]
        if name.startswith("output_double_register_"):
            return self.out_double[int(name.rsplit("_", 1)[1])]
        if name.startswith("input_int_register_"):
            return self.in_int[int(name.rsplit("_", 1)[1])]
        if name.startswith("input_double_register_"):
            return self.in_double[int(name.rsplit("_", 1)[1])]
        kind = VAR_TYPES[name]
        return {"VECTOR6D": [0.0] * 6, "VECTOR3D": [0.0] * 3, "VECTOR6INT32": [0] * 6, "VECTOR6UINT32": [0] * 6,
                "DOUBLE": 0.0, "BOOL": False}.get(kind, 0)

    def apply_input(self, name: str, value) -> None:
        if name == "input_int_register_0" and value != self.in_int[0]:
            self.stale_cmd = None
        if name.startswith("input_int_register_"):
            self.in_int[int(name.rsplit("_", 1)[1])] = value
        elif name.startswith("input_double_register_"):
            self.in_double[int(name.rsplit("_", 1)[1])] = value


def fk_ur3(q):
    """UR3 forward kinematics (standard DH), returning [x, y, z, rx, ry, rz]."""
    d = [0.1519, 0.0, 0.0, 0.11235, 0.08535, 0.0819]
    a = [0.0, -0.24365, -0.21325, 0.0, 0.0, 0.0]
    alpha = [math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0]
    t = [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)]
    for i in range(6):
        ct, st, ca, sa = math.cos(q[i]), math.sin(q[i]), math.cos(alpha[i]), math.sin(alpha[i])
        m = [[ct, -st * ca, st * sa, a[i] * ct], [st, ct * ca, -ct * sa, a[i] * st], [0, sa, ca, d[i]], [0, 0, 0, 1]]
        t = [[sum(t[r][k] * m[k][c] for k in range(4)) for c in range(4)] for r in range(4)]
    r = t
    angle = math.acos(max(-1.0, min(1.0, (r[0][0] + r[1][1] + r[2][2] - 1) / 2)))
    if angle < 1e-9:
        rv = [0.0, 0.0, 0.0]
    else:
        s = angle / (2 * math.sin(angle)) if math.sin(angle) > 1e-9 else 0.0
        rv = [(r[2][1] - r[1][2]) * s, (r[0][2] - r[2][0]) * s, (r[1][0] - r[0][1]) * s]
    return [r[0][3], r[1][3], r[2][3]] + rv


class Server:
    def __init__(self, args):
        self.args = args
        self.version = [int(x) for x in (args.version.split(".") + ["0"] * 4)[:4]]
        self.robot = Robot([0.0, -1.57, 1.57, -1.57, -1.57, 0.0])
        self.stop = threading.Event()
        self.slow_s = 0.0
        self.unlock_delay_s = args.unlock_delay
        self.silent = False
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        self.log_lines: list[str] = []

    def log(self, msg: str) -> None:
        self.log_lines.append(msg)
        if self.args.verbose:
            print(f"[fake-ur] {msg}", file=sys.stderr, flush=True)

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.args.host, port))
        s.listen(8)
        return s

    def _serve(self, sock: socket.socket, handler) -> None:
        def loop():
            while not self.stop.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self.conns_lock:
                    self.conns.add(conn)
                threading.Thread(target=self._run_conn, args=(conn, handler), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()

    def _run_conn(self, conn, handler) -> None:
        try:
            handler(conn)
        except (OSError, ConnectionError, struct.error):
            pass
        finally:
            with self.conns_lock:
                self.conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _delay(self) -> None:
        while self.silent and not self.stop.is_set():
            time.sleep(0.01)
        if self.slow_s:
            time.sleep(self.slow_s)

    def drop_all(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- dashboard --------------------------------------------------------------------------
    def dashboard(self, conn) -> None:
        f = conn.makefile("rb")
        self._delay()
        conn.sendall(b"Connected: Universal Robots Dashboard Server\n")
        v = self.version
        for raw in f:
            cmd = raw.decode(errors="replace").strip()
            self._delay()
            self.log(f"dashboard: {cmd!r}")
            r = self.robot
            low = cmd.lower()
            if low == "polyscopeversion":
                ans = f"URSoftware {v[0]}.{v[1]}.{v[2]}.{v[3]} (Jan 01 2024)"
            elif low == "version":
                ans = f"{v[0]}.{v[1]}.{v[2]}.{v[3]}"
            elif low in FIXED_DASHBOARD_REPLIES:
                ans = FIXED_DASHBOARD_REPLIES[low]
            elif low == "safetymode" or low == "safetystatus":
                name = {SAFETY_NORMAL: "NORMAL", SAFETY_PROTECTIVE: "PROTECTIVE_STOP",
                        SAFETY_ROBOT_ESTOP: "ROBOT_EMERGENCY_STOP"}[r.safety_mode]
                ans = f"{'Safetymode' if low == 'safetymode' else 'Safetystatus'}: {name}"
            elif low == "unlock protective stop":
                if r.safety_mode == SAFETY_PROTECTIVE and time.monotonic() - r.fault_at < self.unlock_delay_s:
                    ans = ("Cannot unlock protective stop until 5s after occurrence. "
                           "Always inspect cause of protective stop before unlocking")
                else:
                    if r.safety_mode == SAFETY_PROTECTIVE:
                        r.fault(SAFETY_NORMAL)
                    ans = "Protective stop releasing"
            elif low == "running":
                ans = f"Program running: {'true' if r.program_running else 'false'}"
            elif low == "programstate":
                ans = f"{'PLAYING' if r.program_running else 'STOPPED'} <unnamed>"
            elif low == "stop":
                with r.lock:
                    r.program_running = False
                ans = "Stopped"
            elif low == "restart safety":
                r.fault(SAFETY_NORMAL)
                ans = "Restarting safety"
            elif low == "quit":
                conn.sendall(b"Disconnected\n")
                return
            else:
                ans = f"could not understand: '{cmd}'"
            conn.sendall(ans.encode() + b"\n")

    # ---- script sink ------------------------------------------------------------------------
    def script(self, conn) -> None:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            r = self.robot
            with r.lock:
                r.script_bytes += len(data)
            self.log(f"script: {len(data)} bytes")
            with r.lock:  # the program starts as soon as a script arrives, unless the robot is stopped
                if r.safety_mode == SAFETY_NORMAL and not r.program_running:
                    r.program_running = True
                    r.program_starts += 1
                    r.watchdog_period_s = None  # a new script has no watchdog until it is set again
                    r.stale_cmd = r.in_int[0] or None

    # ---- RTDE -------------------------------------------------------------------------------
    @staticmethod
    def _recv_exact(conn, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def rtde(self, conn) -> None:
        send_lock = threading.Lock()
        outputs: list[tuple[str, str]] = []  # (name, type)
        out_freq = [125.0]
        inputs: dict[int, list[tuple[str, str]]] = {}
        started = threading.Event()
        closed = threading.Event()
        proto = [1]

        def send(kind: bytes, payload: bytes) -> None:
            with send_lock:
                conn.sendall(struct.pack(">HB", len(payload) + 3, kind[0]) + payload)

        def streamer():
            period = 1.0 / out_freq[0]
            nxt = time.monotonic()
            fmt = ">B" + "".join(TYPES[t] for _, t in outputs)
            r = self.robot
            while started.is_set() and not closed.is_set() and not self.stop.is_set():
                if not self.silent:
                    vals = [1]
                    with r.lock:
                        for name, t in outputs:
                            v = r.value(name)
                            vals.extend(v if isinstance(v, (list, tuple)) else [v])
                    try:
                        send(b"U", struct.pack(fmt, *vals))
                    except OSError:
                        return
                nxt += period
                dt = nxt - time.monotonic()
                if dt > 0:
                    time.sleep(dt)
                else:
                    nxt = time.monotonic()

        try:
            while True:
                size, kind = struct.unpack(">HB", self._recv_exact(conn, 3))
                payload = self._recv_exact(conn, size - 3)
                k = chr(kind)
                if k != "U":
                    self._delay()
                if k == "V":
                    (proto[0],) = struct.unpack(">H", payload[:2])
                    self.log(f"rtde: V protocol {proto[0]}")
                    send(b"V", struct.pack(">B", 1 if proto[0] in (1, 2) else 0))
                elif k == "v":
                    self.log("rtde: v")
                    send(b"v", struct.pack(">IIII", *self.version))
                elif k == "O":
                    if proto[0] >= 2:
                        (out_freq[0],) = struct.unpack(">d", payload[:8])
                        names = payload[8:].decode().split(",")
                    else:
                        names = payload.decode().split(",")
                    names = [n.strip() for n in names if n.strip()]  # ur-rtde sends a trailing comma
                    types = [VAR_TYPES.get(n, "NOT_FOUND") for n in names]
                    self.log(f"rtde: O {out_freq[0]} Hz {names} -> {types}")
                    if "NOT_FOUND" not in types:
                        outputs[:] = list(zip(names, types))
                    send(b"O", struct.pack(">B", 1) + ",".join(types).encode())
                elif k == "I":
                    names = [n.strip() for n in payload.decode().split(",") if n.strip()]
                    types = [VAR_TYPES.get(n, "NOT_FOUND") if n.startswith(("input_", "speed_slider", "standard_",
                             "configurable_", "tool_digital", "external_")) else "NOT_FOUND" for n in names]
                    rid = len(inputs) + 1
                    if "NOT_FOUND" in types:
                        rid = 0
                    else:
                        inputs[rid] = list(zip(names, types))
                    self.log(f"rtde: I id {rid} {names}")
                    send(b"I", struct.pack(">B", rid) + ",".join(types).encode())
                elif k == "S":
                    self.log("rtde: S")
                    ok = bool(outputs)
                    send(b"S", struct.pack(">B", 1 if ok else 0))
                    if ok and not started.is_set():
                        started.set()
                        threading.Thread(target=streamer, daemon=True).start()
                elif k == "P":
                    self.log("rtde: P")
                    started.clear()
                    send(b"P", struct.pack(">B", 1))
                elif k == "U":
                    rid = payload[0]
                    recipe = inputs.get(rid)
                    if recipe is None:
                        continue
                    vals = struct.unpack(">" + "".join(TYPES[t] for _, t in recipe), payload[1:])
                    it = iter(vals)
                    r = self.robot
                    with r.lock:
                        for name, t in recipe:
                            n = int(t[6]) if t.startswith("VECTOR") else 1
                            v = [next(it) for _ in range(n)] if n > 1 else next(it)
                            r.apply_input(name, v)
                        cmd = r.in_int[0]
                        r.last_input_at = time.monotonic()
                        if cmd == CMD_SET_WATCHDOG and r.in_double[0] > 0:
                            r.watchdog_period_s = 1.0 / r.in_double[0]
                        if cmd == CMD_SERVOJ:
                            r.servoj_packages += 1
                            if len(r.servo_targets) < MAX_SERVO_LOG:
                                r.servo_targets.append(list(r.in_double[0:6]))
                        if cmd and (not r.commands or r.commands[-1] != cmd):
                            r.commands.append(cmd)
                            self.log(f"script cmd {cmd}")
                elif k == "M":
                    pass
                else:
                    self.log(f"rtde: unknown message {k!r}")
        finally:
            closed.set()

    # ---- fault-injection control socket -----------------------------------------------------
    def control(self, conn) -> None:
        f = conn.makefile("rb")
        r = self.robot
        for raw in f:
            parts = raw.decode().split()
            if not parts:
                continue
            cmd, rest = parts[0], parts[1:]
            ans = "ok"
            if cmd == "pstop":
                r.fault(SAFETY_PROTECTIVE)
            elif cmd == "estop":
                r.fault(SAFETY_ROBOT_ESTOP)
            elif cmd == "clear":
                r.fault(SAFETY_NORMAL)
            elif cmd == "drop":
                threading.Thread(target=self.drop_all_but, args=(conn,), daemon=True).start()
            elif cmd == "slow":
                self.slow_s = float(rest[0])
            elif cmd == "unlock_delay":
                self.unlock_delay_s = float(rest[0])
            elif cmd == "silent":
                self.silent = rest[0] == "1"
            elif cmd == "set_q":
                with r.lock:
                    r.q = [float(x) for x in rest[:6]]
                    r.target = list(r.q)
            elif cmd == "state":
                with r.lock:
                    ans = json.dumps({"q": r.q, "target": r.target, "safety_mode": r.safety_mode,
                                      "program_running": r.program_running, "commands": r.commands[-20:],
                                      "script_bytes": r.script_bytes, "program_starts": r.program_starts, "out_int0": r.out_int[0],
                                      "in_int0": r.in_int[0], "watchdog_trips": r.watchdog_trips})
            elif cmd == "targets":  # every servoJ target received since the last `targets`
                with r.lock:
                    ans = json.dumps(r.servo_targets)
                    r.servo_targets = []
            elif cmd == "cycles":  # what the script saw in each controller cycle since the last `cycles`
                with r.lock:
                    ans = json.dumps(r.cycles)
                    r.cycles = []
            elif cmd == "log":
                ans = json.dumps(self.log_lines[-200:])
            elif cmd == "quit":
                self.stop.set()
            else:
                ans = f"error unknown {cmd}"
            conn.sendall(ans.encode() + b"\n")

    def drop_all_but(self, keep) -> None:
        with self.conns_lock:
            conns = [c for c in self.conns if c is not keep]
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> int:
        a = self.args
        try:
            socks = {
                "dashboard": self._listen(a.dashboard_port),
                "script": self._listen(a.script_port),
                "rtde": self._listen(a.rtde_port),
                "control": self._listen(a.control_port),
            }
        except OSError as e:
            print(f"BIND_FAILED {e}", flush=True)
            return 2
        for name, handler in (("dashboard", self.dashboard), ("script", self.script), ("rtde", self.rtde),
                              ("control", self.control)):
            self._serve(socks[name], handler)
        ports = {k: s.getsockname()[1] for k, s in socks.items()}
        print("READY " + json.dumps({"host": a.host, **ports}), flush=True)
        dt = E_SERIES_CYCLE_S if self.version[0] >= 5 else CB3_CYCLE_S
        nxt = time.monotonic()
        while not self.stop.is_set():
            self.robot.step(dt)
            nxt += dt
            pause = nxt - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                nxt = time.monotonic()
        for s in socks.values():
            s.close()
        self.drop_all()
        return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="armada fake ur3", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dashboard-port", type=int, default=29999)
    p.add_argument("--script-port", type=int, default=30003)
    p.add_argument("--rtde-port", type=int, default=30004)
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--version", default="5.11.1.0", help="controller version major.minor.bugfix.build")
    p.add_argument("--unlock-delay", type=float, default=0.0,
                   help="refuse 'unlock protective stop' this long after the stop (a real UR: 5 s)")
    p.add_argument("--verbose", action="store_true")
    return Server(p.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
