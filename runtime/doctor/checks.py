"""The checks of `armada doctor`: each returns rows (status, what was found, a one-line fix).

A check reads the machine only through a ``Host`` (runtime/doctor/host.py), so tests feed a fake
/sys, /dev, getrlimit and command output. Statuses: ``ok``; ``warn`` (the cell runs, but worse:
jitter, a stale calibration); ``fail`` (the cell cannot run as configured); ``skip`` (nothing to
check here, with the reason). No check writes to a device or moves anything.
"""

from __future__ import annotations

import json
import os
import re
import resource
import stat
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal

from armada.runtime.doctor.host import CommandMissing, Host

Status = Literal["ok", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip")

# PiPer, Cobot Magic and the ARX arms all run their CAN bus at 1 Mbit/s; no backend config names
# a bitrate today, so this is what a socketcan bus is checked against.
DEFAULT_CAN_BITRATE = 1_000_000
UR_TIMEOUT_S = 1.0
REALSENSE_TIMEOUT_S = 5.0
# A calibration older than this still loads; the doctor only says to redo it.
CALIBRATION_MAX_AGE_DAYS = 90.0
# Clock offsets (chrony / PTP): above WARN the cross-host staleness numbers get noticeably wrong.
CLOCK_WARN_S = 0.005
# Serial names that change when adapters are replugged or enumerate in another order.
_UNSTABLE_SERIAL = re.compile(r"^/dev/tty(USB|ACM)\d+$")


@dataclass(frozen=True)
class Check:
    name: str  # what was checked: "serial arm.port", "can can0", "clock"
    status: Status
    found: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# --- what the cell names --------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceNeed:
    """One device a driver or camera needs: ``kind`` says how to check it."""

    kind: Literal["serial", "can", "ur_dashboard", "realsense", "video"]
    owner: str  # "arm.port": driver or camera name and the config field
    target: str  # the path, interface, host:port or serial number
    port: int | None = None


def backend_needs(driver_name: str, backend: Any, plugin: Any = None) -> list[DeviceNeed]:
    """The devices one driver's backend names.

    A plugin may list them itself through an optional ``devices(config) -> list[DeviceNeed]``
    attribute; otherwise the config's fields are read by convention: ``port`` / ``*_port`` strings
    are serial ports, ``can`` / ``*_can`` are SocketCAN interfaces (only with ``bustype: socketcan``,
    the default), ``host`` with ``dashboard_port`` is a UR controller. A backend with ``fake: true``
    names no real device."""
    hook = getattr(plugin, "devices", None)
    if callable(hook):
        return list(hook(backend))
    if getattr(backend, "fake", False) is True:
        return []
    fields = backend.model_dump() if hasattr(backend, "model_dump") else dict(vars(backend))
    socketcan = fields.get("bustype", "socketcan") == "socketcan"
    needs: list[DeviceNeed] = []
    for key, value in fields.items():
        if not isinstance(value, str):
            continue
        owner = f"{driver_name}.{key}"
        if key == "port" or key.endswith("_port"):
            needs.append(DeviceNeed("serial", owner, value))
        elif (key == "can" or key.endswith("_can")) and socketcan:
            needs.append(DeviceNeed("can", owner, value))
    if isinstance(fields.get("host"), str) and isinstance(fields.get("dashboard_port"), int):
        needs.append(DeviceNeed("ur_dashboard", f"{driver_name}.host", fields["host"], fields["dashboard_port"]))
    return needs


def camera_needs(camera: Any) -> list[DeviceNeed]:
    kind = getattr(camera, "kind", None)
    if kind == "realsense" and getattr(camera, "playback", None) is None:
        return [DeviceNeed("realsense", f"{camera.name}.serial", camera.serial or "")]
    if kind == "opencv":
        dev = camera.device
        if isinstance(dev, int) or (isinstance(dev, str) and dev.isdigit()):
            return [DeviceNeed("video", f"{camera.name}.device", f"/dev/video{int(dev)}")]
        if isinstance(dev, str) and dev.startswith("/dev/"):
            return [DeviceNeed("video", f"{camera.name}.device", dev)]
    return []  # synthetic, mujoco, a recording, a stream URL: no device node here


# --- devices --------------------------------------------------------------------------------


def check_device_node(host: Host, need: DeviceNeed) -> list[Check]:
    """A serial port or video device: present, a character device, and readable and writable by
    this user (the group that owns it is the fix when not)."""
    name = f"{need.kind} {need.owner}"
    if "{run_dir}" in need.target:
        return [Check(name, "skip", f"{need.target}: made at run time by `armada fake` "
                      "(--run-dir DIR checks a running fake's)")]
    path = host.path(need.target)
    if not path.exists():
        where = "/dev/serial/by-id" if need.kind == "serial" else "/dev/v4l/by-id"
        return [Check(name, "fail", f"{need.target} is missing",
                      f"plug the device in, or set the path to its name under {where} (ls {where})")]
    rows: list[Check] = []
    mode = path.stat().st_mode
    if host.root == Path("/") and not stat.S_ISCHR(mode):  # a fake /dev in tests holds plain files
        rows.append(Check(name, "warn", f"{need.target} is not a character device"))
    if not host.access(path, os.R_OK | os.W_OK):
        group = host.group_name(path.stat().st_gid)
        rows.append(Check(name, "fail", f"{need.target}: no read/write permission (owned by group {group})",
                          f"sudo usermod -aG {group} $USER, then log in again"))
        return rows
    if need.kind == "serial" and _UNSTABLE_SERIAL.match(need.target):
        rows.append(Check(name, "warn", f"{need.target} present, but its number can change on replug",
                          "use its /dev/serial/by-id/... name (or a udev rule) in the cell"))
    else:
        rows.append(Check(name, "ok", f"{need.target} present and writable"))
    return rows


def check_can(host: Host, need: DeviceNeed, bitrate: int = DEFAULT_CAN_BITRATE) -> Check:
    """A SocketCAN interface: present in /sys/class/net, up, at ``bitrate`` (from `ip -details`)."""
    name = f"can {need.owner}"
    iface = need.target
    net = host.path(f"/sys/class/net/{iface}")
    if not net.exists():
        return Check(name, "fail", f"no network interface {iface}",
                     "plug the USB-CAN adapter in (lsusb), or name the right interface (ip link)")
    try:
        flags = int((net / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        flags = None
    up_fix = f"sudo ip link set {iface} up type can bitrate {bitrate}"
    if flags is not None and not flags & 0x1:  # IFF_UP
        return Check(name, "fail", f"{iface} is down", up_fix)
    try:
        out = host.run(["ip", "-details", "-json", "link", "show", iface], 2.0)
        info = json.loads(out)[0].get("linkinfo", {})
    except CommandMissing:
        return Check(name, "warn", f"{iface} is up; bitrate not checked (no `ip` command)", "apt install iproute2")
    except (RuntimeError, ValueError, IndexError, AttributeError) as exc:
        return Check(name, "warn", f"{iface} is up; bitrate unknown ({exc})")
    if info.get("info_kind") != "can":
        return Check(name, "fail", f"{iface} is not a CAN interface (kind {info.get('info_kind')!r})",
                     "name the CAN interface (ip -details link)")
    data = info.get("info_data", {})
    state = data.get("state")
    actual = data.get("bittiming", {}).get("bitrate")
    if actual != bitrate:
        return Check(name, "fail", f"{iface} runs at {actual} bit/s, the arm needs {bitrate}",
                     f"sudo ip link set {iface} down && {up_fix}")
    if state in ("BUS-OFF", "STOPPED"):  # the controller sends nothing until restarted
        return Check(name, "fail", f"{iface} at {actual} bit/s, controller state {state}",
                     f"check wiring, termination and power; then sudo ip link set {iface} down && {up_fix}")
    if state not in (None, "ERROR-ACTIVE"):
        return Check(name, "warn", f"{iface} up at {actual} bit/s, controller state {state}",
                     "check wiring, termination and that the arm is powered; then ip link set down/up")
    return Check(name, "ok", f"{iface} up at {actual} bit/s" + (f", {state}" if state else ""))


def check_ur_dashboard(host: Host, need: DeviceNeed, timeout_s: float = UR_TIMEOUT_S) -> Check:
    """The UR dashboard server answers and the controller is in remote control. Only queries:
    ``is in remote control`` reads a flag (no program is loaded, nothing moves)."""
    name = f"ur {need.owner}"
    where = f"{need.target}:{need.port}"
    try:
        with host.connect(need.target, need.port or 29999, timeout_s) as sock:
            sock.settimeout(timeout_s)
            reader = sock.makefile("rb")
            welcome = reader.readline(256)
            if b"Dashboard" not in welcome and b"Connected" not in welcome:
                return Check(name, "fail", f"{where} answered {welcome[:60]!r}, not a UR dashboard",
                             "check the host address (the controller's IP, Settings > Network)")
            sock.sendall(b"is in remote control\n")
            answer = reader.readline(256).strip().lower()
    except OSError as exc:
        return Check(name, "fail", f"{where}: no answer ({exc})",
                     "power the controller on, check the cable and the address (ping it)")
    if answer == b"true":
        return Check(name, "ok", f"{where} reachable, in remote control")
    if answer == b"false":
        return Check(name, "fail", f"{where} reachable, in local control",
                     "switch the teach pendant to Remote Control (top-right icon)")
    return Check(name, "warn", f"{where} reachable; remote control unknown ({answer[:60]!r}; CB3 has no such query)")


def check_realsense(need: DeviceNeed, query: Callable[[], list[dict[str, str]]] | None = None,
                    timeout_s: float = REALSENSE_TIMEOUT_S) -> Check:
    """A RealSense camera with this serial is connected, on a USB 3 link. ``query`` lists devices as
    {serial, name, usb}; by default pyrealsense2's, only when it is installed."""
    name = f"realsense {need.owner}"
    if query is None:
        import importlib.util

        if importlib.util.find_spec("pyrealsense2") is None:
            return Check(name, "skip", "pyrealsense2 is not installed: camera not checked",
                         "pip install 'armada[devices]'")
        query = _realsense_devices
    found: list[Any] = []
    errors: list[str] = []

    def run() -> None:
        try:
            found.extend(query())
        except Exception as exc:  # noqa: BLE001 (librealsense raises its own types: report any)
            errors.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=run, daemon=True)  # librealsense has no timeout of its own
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return Check(name, "fail", f"librealsense did not list devices within {timeout_s:g} s",
                     "replug the camera; check dmesg for USB errors")
    if errors:
        return Check(name, "fail", f"librealsense: {errors[0]}", "check the udev rules (99-realsense-libusb.rules)")
    serials = [d["serial"] for d in found]
    match = [d for d in found if not need.target or d["serial"] == need.target]
    if not match:
        return Check(name, "fail", f"no RealSense {need.target or '(any)'} connected (found: {serials or 'none'})",
                     "plug it in, or set serial to one of the connected ones (rs-enumerate-devices -s)")
    dev = match[0]
    if need.target == "" and len(found) > 1:
        return Check(name, "fail", f"{len(found)} RealSense cameras connected and no serial set ({serials})",
                     "set serial in the cell")
    usb = str(dev.get("usb", ""))
    if not usb.startswith("3"):
        return Check(name, "warn", f"{dev['serial']} ({dev.get('name', '')}) on USB {usb or '?'}",
                     "use a USB 3 port and cable: USB 2 limits resolution and frame rate")
    return Check(name, "ok", f"{dev['serial']} ({dev.get('name', '')}) on USB {usb}")


def _realsense_devices() -> list[dict[str, str]]:
    import pyrealsense2 as rs

    out = []
    for dev in rs.context().query_devices():
        def info(key: Any) -> str:
            return dev.get_info(key) if dev.supports(key) else ""
        out.append({"serial": info(rs.camera_info.serial_number), "name": info(rs.camera_info.name),
                    "usb": info(rs.camera_info.usb_type_descriptor)})
    return out


# --- permissions and scheduling ------------------------------------------------------------


def check_realtime(host: Host, priorities: dict[str, int]) -> list[Check]:
    """SCHED_FIFO for the drivers that ask (realtime_priority) and memlock room. Without them the
    driver runs on the normal scheduler with a warning (drivers/core/process.py), so: warn."""
    if not priorities:
        return [Check("realtime", "skip", "no driver sets realtime_priority")]
    need = max(priorities.values())
    soft, _hard = host.getrlimit(resource.RLIMIT_RTPRIO)
    rows = []
    if host.is_root:
        rows.append(Check("realtime priority", "ok", f"root: SCHED_FIFO {need} allowed"))
    elif soft == resource.RLIM_INFINITY or soft >= need:
        rows.append(Check("realtime priority", "ok", f"RLIMIT_RTPRIO {_limit(soft)} >= {need}"))
    else:
        rows.append(Check("realtime priority", "warn",
                          f"RLIMIT_RTPRIO {_limit(soft)} < {need} ({', '.join(priorities)}): the loop runs "
                          "on the normal scheduler, with more jitter",
                          "LimitRTPRIO=99 in the unit (armada systemd), or @armada - rtprio 99 in "
                          "/etc/security/limits.d/"))
    soft, _hard = host.getrlimit(resource.RLIMIT_MEMLOCK)
    if host.is_root or soft == resource.RLIM_INFINITY:
        rows.append(Check("memlock", "ok", f"RLIMIT_MEMLOCK {_limit(soft)}"))
    else:
        rows.append(Check("memlock", "warn", f"RLIMIT_MEMLOCK {_limit(soft)}: pages of the loop may be swapped out",
                          "LimitMEMLOCK=infinity in the unit, or @armada - memlock unlimited in limits.d"))
    return rows


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def check_device_groups(host: Host, needed: set[str]) -> Check:
    """Membership of the usual device groups, for devices named in the cell (dialout for serial,
    video / plugdev for cameras). Node permissions themselves are checked per device."""
    if not needed:
        return Check("groups", "skip", "the cell names no serial or camera device")
    have = host.groups()
    missing = sorted(needed - have)
    if missing and not host.is_root:
        return Check("groups", "warn", f"not in {', '.join(missing)} (in: {', '.join(sorted(have))})",
                     f"sudo usermod -aG {','.join(missing)} $USER, then log in again")
    return Check("groups", "ok", f"in {', '.join(sorted(needed))}" if not host.is_root else "root")


def parse_cpu_list(text: str) -> set[int]:
    """The kernel's CPU list format (/sys/devices/system/cpu/online, isolated): ``0-3,6``; '' is none."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.strip().split(",")):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def check_cpu(host: Host, realtime: bool, driver_cpus: dict[str, list[int]] | None = None) -> list[Check]:
    """The CPU frequency governor (powersave adds latency to every wake-up), isolated cores, and the
    CPUs that this host's drivers keep (``cpus:`` in the cell): present here, isolated or not."""
    cpu_dir = host.path("/sys/devices/system/cpu")
    governors: dict[str, list[str]] = {}
    for f in sorted(cpu_dir.glob("cpu[0-9]*/cpufreq/scaling_governor")):
        try:
            governors.setdefault(f.read_text().strip(), []).append(f.parent.parent.name)
        except OSError:
            continue
    rows = []
    if not governors:
        rows.append(Check("cpu governor", "skip", "no cpufreq in /sys (a VM or a fixed-frequency CPU)"))
    elif set(governors) == {"performance"}:
        rows.append(Check("cpu governor", "ok", "performance on every CPU"))
    else:
        seen = ", ".join(f"{g} ({len(c)} CPUs)" for g, c in sorted(governors.items()))
        rows.append(Check("cpu governor", "warn", f"{seen}: frequency scaling adds wake-up latency",
                          "sudo cpupower frequency-set -g performance"))
    isolated_text, isolated = _read_cpu_list(cpu_dir / "isolated")
    kept = {c for cpus in (driver_cpus or {}).values() for c in cpus}
    if isolated is None:
        rows.append(Check("isolated cores", "skip", "no readable /sys/devices/system/cpu/isolated"))
    elif isolated:
        unused = sorted(isolated - kept)
        note = f" ({', '.join(map(str, unused))} kept by no driver of this cell)" if kept and unused else ""
        rows.append(Check("isolated cores", "ok", f"isolated: {isolated_text}{note}"))
    elif realtime or kept:
        rows.append(Check("isolated cores", "warn", "none isolated: the control loop shares its CPU with other services",
                          "optional: isolcpus=N on the kernel command line and `cpus: [N]` for the driver in the cell"))
    else:
        rows.append(Check("isolated cores", "ok", "none isolated (no driver runs real-time)"))
    if driver_cpus:
        online = _read_cpu_list(cpu_dir / "online")
        rows += [_check_driver_cpus(name, cpus, online, isolated) for name, cpus in driver_cpus.items()]
    return rows


def _read_cpu_list(path: Path) -> tuple[str, set[int] | None]:
    """(the text, its CPUs) of a /sys CPU list; None when it cannot be read or parsed."""
    try:
        text = path.read_text().strip()
        return text, parse_cpu_list(text)
    except (OSError, ValueError):
        return "", None


def _check_driver_cpus(name: str, cpus: list[int], online: tuple[str, set[int] | None],
                       isolated: set[int] | None) -> Check:
    """A driver's ``cpus:``: every one online here (else the driver refuses to start), isolated or not."""
    title = f"cpus of driver {name}"
    online_text, online_cpus = online
    if online_cpus is None:
        return Check(title, "skip", f"cpus {cpus}; no readable /sys/devices/system/cpu/online")
    missing = sorted(set(cpus) - online_cpus)
    if missing:
        return Check(title, "fail", f"cpus {cpus}: {missing} not online here (online: {online_text}); "
                     "the driver refuses to start", f"name CPUs of this host ({online_text}) in the driver's `cpus:`")
    if isolated is None:
        return Check(title, "ok", f"cpus {cpus}, online (whether isolated is unknown)")
    shared = sorted(set(cpus) - isolated)
    if shared:
        return Check(title, "warn", f"cpus {cpus}: {shared} not isolated: other services and kernel threads run there",
                     f"optional: isolcpus={','.join(map(str, cpus))} on the kernel command line")
    return Check(title, "ok", f"cpus {cpus}, isolated")


# --- clocks ---------------------------------------------------------------------------------


def check_clock(host: Host, multi_host: bool = False) -> Check:
    """chrony's offset (chronyc tracking), else linuxptp's (pmc), else skip with the reason (a warning
    when the cell spans hosts: their logs and recordings are then stamped by unsynchronised clocks;
    the runtime's own cross-host offsets come from ping and do not need it)."""
    try:
        out = host.run(["chronyc", "-n", "tracking"], 2.0)
    except CommandMissing:
        out = None
    except RuntimeError as exc:
        return Check("clock", "warn", f"chronyc: {exc}", "sudo systemctl start chrony")
    if out is not None:
        return _chrony(out)
    try:
        out = host.run(["pmc", "-u", "-b", "0", "GET CURRENT_DATA_SET"], 2.0)
    except CommandMissing:
        return Check("clock", "warn" if multi_host else "skip",
                     "neither chronyc nor pmc (linuxptp) installed: sync not checked",
                     "apt install chrony (hosts of one cell should share a time source)")
    except RuntimeError as exc:
        return Check("clock", "warn", f"pmc: {exc}", "start ptp4l, or use chrony")
    return _ptp(out)


def _chrony(out: str) -> Check:
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}
    leap = fields.get("Leap status", "")
    m = re.match(r"([0-9.]+) seconds (fast|slow)", fields.get("System time", ""))
    if leap != "Normal" or m is None:
        return Check("clock", "warn", f"chrony not synchronised (leap status {leap or '?'})",
                     "check chronyc sources: a reachable server, then wait or chronyc makestep")
    offset = float(m.group(1))
    ref = fields.get("Reference ID", "?")
    if offset > CLOCK_WARN_S:
        return Check("clock", "warn", f"chrony offset {offset * 1e3:.1f} ms ({ref})", "sudo chronyc makestep")
    return Check("clock", "ok", f"chrony synchronised, offset {offset * 1e6:.0f} us ({ref})")


def _ptp(out: str) -> Check:
    m = re.search(r"offsetFromMaster\s+(-?[0-9.e+-]+)", out)
    if m is None:
        return Check("clock", "warn", "pmc answered without offsetFromMaster (ptp4l not synchronised?)",
                     "check ptp4l's log")
    offset = abs(float(m.group(1))) * 1e-9  # nanoseconds
    if offset > CLOCK_WARN_S:
        return Check("clock", "warn", f"PTP offset {offset * 1e3:.1f} ms", "check ptp4l / phc2sys")
    return Check("clock", "ok", f"PTP offset {offset * 1e6:.1f} us")


def remote_endpoints(endpoints: list[tuple[str, str]]) -> dict[str, list[tuple[str, int]]]:
    """tcp:// endpoints by host name: ``{host: [(key, port), ...]}`` (ipc and inproc are local)."""
    from urllib.parse import urlsplit

    out: dict[str, list[tuple[str, int]]] = {}
    for key, endpoint in endpoints:
        if endpoint.startswith("tcp://"):
            parts = urlsplit(endpoint)
            if parts.hostname and parts.port:
                out.setdefault(parts.hostname, []).append((key, parts.port))
    return out


def check_remote_hosts(host: Host, endpoints: list[tuple[str, str]], timeout_s: float = 1.0,
                       peers: dict[str, str] | None = None) -> list[Check]:
    """Each other host of a cell split over hosts: resolvable, and each of its endpoints answering a
    TCP connect (a process listening) or refusing it (the host is up, the process not started yet).
    The connect carries no ZeroMQ handshake and is closed at once: the peer drops it. ``peers``
    collects the other hosts' addresses (name -> address) for the clock check."""
    rows: list[Check] = []
    for name, ports in remote_endpoints(endpoints).items():
        address = host.resolve(name)
        if address is None:
            rows.append(Check(f"host {name}", "fail", f"{name} does not resolve",
                              "fix the host name in the cell's endpoints (or /etc/hosts)"))
            continue
        if host.is_local(address):
            continue  # this host binds it
        if peers is not None:
            peers[name] = address
        listening, refused, dead = [], [], []
        for key, port in ports:
            t0 = time.monotonic()
            try:
                host.connect(address, port, timeout_s).close()
                listening.append(f"{key} :{port} {1e3 * (time.monotonic() - t0):.1f} ms")
            except ConnectionRefusedError:
                refused.append(f"{key} :{port}")
            except OSError as exc:
                dead.append(f"{key} :{port} ({exc})")
        if dead:
            rows.append(Check(f"host {name}", "fail", f"{address}: no answer: {'; '.join(dead)}",
                              "check the network and the other host's firewall (the port must be open)"))
        elif refused:
            rows.append(Check(f"host {name}", "warn", f"{address} up; not listening yet: {', '.join(refused)}",
                              f"start the cell's processes on {name} (armada systemd units there)"))
        else:
            rows.append(Check(f"host {name}", "ok", f"{address}: " + ", ".join(listening)))
    return rows


_CHRONY_SOURCE = re.compile(r"^[\^=#][*+\-?x~ ]\s+(\S+)\s+\d+\s+\d+\s+\d+\s+\S+\s+([+-]?[0-9.]+)(ns|us|ms|s)\[")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def check_peer_clocks(host: Host, peers: dict[str, str]) -> list[Check]:
    """The clock offset to each other host of the cell, where chrony measures it: when that host is
    one of this host's time sources (`chronyc -n sources`). ``peers``: host name -> address."""
    if not peers:
        return []
    try:
        out = host.run(["chronyc", "-n", "sources"], 2.0)
    except (CommandMissing, RuntimeError):
        return []  # the clock row already says what is missing
    offsets: dict[str, float] = {}
    for line in out.splitlines():
        m = _CHRONY_SOURCE.match(line)
        if m:
            offsets[m.group(1)] = float(m.group(2)) * _UNIT_S[m.group(3)]
    rows = []
    for name, address in peers.items():
        if address not in offsets:
            rows.append(Check(f"clock to {name}", "skip", f"{address} is not a chrony source of this host",
                              f"optional: serve time from one host (chrony `allow`) and add `server {name}` "
                              "on the other, so their offset is measured"))
        elif abs(offsets[address]) > CLOCK_WARN_S:
            rows.append(Check(f"clock to {name}", "warn", f"offset to {address} {offsets[address] * 1e3:+.1f} ms",
                              "sudo chronyc makestep, and check that both hosts sync to the same source"))
        else:
            rows.append(Check(f"clock to {name}", "ok", f"offset to {address} {offsets[address] * 1e6:+.0f} us"))
    return rows


@dataclass(frozen=True)
class ClockProbe:
    """How to measure one other host's clock: through a driver there (ping + one state) or a camera's
    clock endpoint (runtime/remote/clock.py)."""

    host: str  # as the cell's endpoints name it
    owner: str  # "driver arm", "camera ceiling", "inference"
    endpoints: tuple[str, ...]  # driver: (cmd, state); camera: (clock,); inference: (ctl,)

    @property
    def kind(self) -> str:
        return self.owner.split(" ", 1)[0]


def clock_probes(cell: Any, peers: dict[str, str]) -> tuple[list[ClockProbe], dict[str, list[str]]]:
    """One probe per other host (``peers``: its name in the endpoints -> address): a driver there if
    there is one, else a camera with a clock endpoint, else the inference process (a GPU host that
    runs only inference); and {host: [cameras]} for the hosts that have only cameras naming no clock
    endpoint (nothing there answers a clock ping)."""
    from armada.runtime.remote.clock import endpoint_host

    probes: dict[str, ClockProbe] = {}
    for d in cell.drivers:
        h = endpoint_host(d.cmd)
        if h in peers and h not in probes:
            probes[h] = ClockProbe(h, f"driver {d.name}", (d.cmd, d.state))
    silent: dict[str, list[str]] = {}
    for c in cell.cameras:
        h = endpoint_host(c.frames)
        if h not in peers or h in probes:
            continue
        clock = c.clock
        if clock:
            probes[h] = ClockProbe(h, f"camera {c.name}", (clock,))
        else:
            silent.setdefault(h, []).append(c.name)
    inference = getattr(cell, "inference", None)
    if inference is not None:
        h = endpoint_host(inference.ctl)
        if h in peers and h not in probes:
            probes[h] = ClockProbe(h, "inference", (inference.ctl,))
    return list(probes.values()), {h: names for h, names in silent.items() if h not in probes}


def check_measured_clocks(host: Host, cell: Any, peers: dict[str, str], timeout_s: float = 1.0) -> list[Check]:
    """Each other host's wall clock against ours, measured by armada itself (NTP-style: the ping
    with the lowest round trip; the error is within half of it), whatever chrony says. The runtime
    corrects frame and state ages by these offsets where it can measure them; a large one still
    means the hosts' time sync is broken (logs, recordings and any host it cannot measure)."""
    probes, silent = clock_probes(cell, peers)
    rows: list[Check] = []
    for probe in probes:
        name = f"clock of {probe.host}"
        try:
            sample = host.measure_clock(probe, cell.curve, timeout_s)
        except (TimeoutError, OSError, ValueError, RuntimeError) as exc:
            rows.append(Check(name, "warn", f"{probe.owner} did not answer a clock ping: {exc}",
                              f"start the cell's processes on {probe.host}, then run the doctor again"))
            continue
        offset_ms, rtt_ms = sample.offset_ns / 1e6, sample.rtt_ns / 1e6
        found = f"{offset_ms:+.1f} ms +- {rtt_ms / 2:.1f} ms (via {probe.owner}, ping rtt {rtt_ms:.1f} ms)"
        if abs(sample.offset_ns) - sample.rtt_ns / 2 > CLOCK_WARN_S * 1e9:
            rows.append(Check(name, "warn", found,
                              f"sync both hosts to one time source (chrony on {probe.host}: `server <this host> "
                              "iburst`, or the same NTP server on both), then `sudo chronyc makestep`"))
        else:
            rows.append(Check(name, "ok", found))
    for h, names in silent.items():
        rows.append(Check(f"clock of {h}", "skip", f"no driver there and camera(s) {', '.join(names)} name no "
                          "clock endpoint: its offset is not measured",
                          f"give camera {names[0]} a `clock: tcp://{h}:PORT` endpoint (docs/remote.md)"))
    return rows


def check_curve(curve: Any) -> list[Check]:
    """The cell's CURVE key files: present, secret keys private to their owner (0600, as `armada
    keys` writes them), and an allow-list folder holding at least one public key."""
    if curve is None:
        return [Check("curve keys", "skip", "the cell uses no CURVE (ipc or loopback only)")]
    rows: list[Check] = []
    publics = {"server_public_key": getattr(curve, "server_public_key", None),
               **{f"server_keys.{h}": p for h, p in (getattr(curve, "server_keys", None) or {}).items()}}
    for key, file in publics.items():
        if file is not None and not Path(file).is_file():
            rows.append(Check(f"curve {key}", "fail", f"{file} is missing", "write keys with armada keys FOLDER --hosts ..."))
    for key in ("server_secret_key", "client_secret_key"):
        file = getattr(curve, key, None)
        if file is None:
            continue
        file = Path(file)
        if not file.is_file():
            rows.append(Check(f"curve {key}", "fail", f"{file} is missing", "write keys with armada keys FOLDER --hosts ..."))
        elif file.stat().st_mode & 0o077:
            rows.append(Check(f"curve {key}", "warn", f"{file} is readable by others "
                              f"(mode {stat.S_IMODE(file.stat().st_mode):o}): anyone who reads it can pose as this host",
                              f"chmod 600 {file}"))
    allowed = getattr(curve, "authorized_clients", None)
    if allowed is not None:
        folder = Path(allowed)
        count = len(list(folder.glob("*.key"))) if folder.is_dir() else 0
        if count == 0:
            rows.append(Check("curve authorized_clients", "fail", f"{folder}: no *.key public keys: nobody may connect",
                              "copy the client hosts' public keys there (armada keys writes the allow-lists)"))
    if not rows:
        rows.append(Check("curve keys", "ok", "key files present, secret keys private"
                          + (f", {count} allowed clients" if allowed is not None else "")))
    return rows


# --- calibration ----------------------------------------------------------------------------


def check_calibration(host: Host, owner: str, file: Path) -> Check:
    """A calibration file: its age and residuals (calibration/results.py format). load_cell already
    refused missing or malformed files, so here it is about how good and how old."""
    from armada.calibration.results import load_result
    from armada.runtime.errors import ConfigError

    name = f"calibration {owner}"
    try:
        rec = load_result(file)
    except ConfigError as exc:
        # lerobot's joint calibration JSON loads (load_cell checked it) but carries no date.
        return Check(name, "ok", f"{file.name} (no armada record: {str(exc)[:80]})")
    parts = [file.name]
    status: Status = "ok"
    fix = ""
    try:
        date = datetime.fromisoformat(rec.date.replace("Z", "+00:00"))
        age_days = (host.now() - date.timestamp()) / 86400
        parts.append(f"{age_days:.0f} days old")
        if age_days > CALIBRATION_MAX_AGE_DAYS:
            status, fix = "warn", f"older than {CALIBRATION_MAX_AGE_DAYS:g} days: redo it (armada calibrate)"
    except ValueError:
        status, fix = "warn", "the record has no valid date: redo it (armada calibrate)"
        parts.append(f"date {rec.date!r}")
    for key, r in rec.residual.items():
        limit = f" (max {r.max:g})" if r.max is not None else ""
        parts.append(f"{key} {r.value:.3g} {r.unit}{limit}")
        if r.max is not None and r.value > r.max:
            status, fix = "warn", f"{key} above its limit: redo the calibration"
    if rec.forced:
        status, fix = "warn", "written with --force although a check failed: redo it"
    return Check(name, status, ", ".join(parts), fix)


# --- model ----------------------------------------------------------------------------------


def check_onnxruntime(host: Host, onnx_dir: Path | None,
                      providers: Callable[[], list[str]] | None = None,
                      gpu_driver: Callable[[], bool] | None = None,
                      session: Callable[[list[str]], list[str]] | None = None) -> list[Check]:
    """ONNX Runtime's real providers and the GPU: onnxruntime-gpu lists CUDA even on a machine
    without a driver or without cuDNN, so the NVIDIA driver and nvidia-smi are asked, and a one-node
    session is created to read the providers it really got (``session``: requested -> used).
    onnxruntime is imported only here, for a cell that uses a model."""
    rows: list[Check] = []
    if onnx_dir is not None:
        if not onnx_dir.is_dir():
            rows.append(Check("model onnx_dir", "fail", f"{onnx_dir} is not a folder",
                              "export the graphs (armada model export-onnx) or fix inference.policy.onnx_dir"))
        else:
            rows.append(Check("model onnx_dir", "ok", f"{onnx_dir}"))
    if providers is None:
        try:
            import onnxruntime
        except ImportError as exc:
            rows.append(Check("onnxruntime", "fail", f"not importable ({exc})", "pip install 'armada[model]'"))
            return rows
        providers = onnxruntime.get_available_providers
    if gpu_driver is None:
        from armada.runtime.model.engine_ort import nvidia_driver_present as gpu_driver
    listed = providers()
    gpu_listed = [p for p in listed if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    if not gpu_listed:
        rows.append(Check("onnxruntime", "warn", f"providers {', '.join(listed)}: the model runs on the CPU",
                          "pip install onnxruntime-gpu on a host with an NVIDIA GPU"))
        return rows
    if not gpu_driver():
        rows.append(Check("onnxruntime", "warn", f"{', '.join(gpu_listed)} listed, but no NVIDIA driver: CPU only",
                          "install the NVIDIA driver (nvidia-smi must work)"))
        return rows
    try:
        gpus = [line for line in host.run(["nvidia-smi", "-L"], 5.0).splitlines() if line.strip()]
    except (CommandMissing, RuntimeError) as exc:
        rows.append(Check("gpu", "warn", f"nvidia-smi: {exc}", "check the NVIDIA driver install"))
        gpus = []
    else:
        rows.append(Check("gpu", "ok" if gpus else "warn", "; ".join(gpus) or "nvidia-smi lists no GPU"))
    if "CUDAExecutionProvider" not in listed:
        rows.append(Check("onnxruntime", "ok", f"providers {', '.join(listed)}"))
        return rows
    try:
        used = _with_timeout(lambda: (session or _session_providers)(["CUDAExecutionProvider",
                                                                       "CPUExecutionProvider"]), SESSION_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 (onnxruntime and onnx raise their own types: report any)
        rows.append(Check("onnxruntime", "warn", f"providers {', '.join(listed)}; a CUDA test session failed: "
                          f"{type(exc).__name__}: {str(exc)[:120]}", "check the CUDA and cuDNN libraries"))
        return rows
    if used is None:
        rows.append(Check("onnxruntime", "skip", f"providers {', '.join(listed)}; no test session (onnx missing)",
                          "pip install onnx to let the doctor try a CUDA session"))
    elif "CUDAExecutionProvider" in used:
        rows.append(Check("onnxruntime", "ok", f"a test session runs on {', '.join(used)}"))
    else:
        rows.append(Check("onnxruntime", "warn", f"CUDA listed, but a test session got only {', '.join(used)}",
                          "install the CUDA/cuDNN libraries onnxruntime-gpu was built for (its log names the missing one)"))
    return rows


SESSION_TIMEOUT_S = 30.0  # creating a CUDA context takes seconds on a cold GPU


def _with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            error.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if error:
        raise error[0]
    return result[0]


def _session_providers(requested: list[str]) -> list[str] | None:
    """The providers a real one-node (Identity) session gets; None when onnx is not installed."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import onnxruntime

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "doctor", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=requested)
    return list(sess.get_providers())


def check_torch(cuda_devices: Callable[[], list[str] | None] | None = None) -> Check:
    """The PyTorch path of a model (no onnx_dir): which GPU torch really sees. ``cuda_devices``
    returns the GPU names ([] without CUDA) or None when torch is missing; torch is imported only here."""
    if cuda_devices is None:
        cuda_devices = _torch_cuda_devices
    gpus = cuda_devices()
    if gpus is None:
        return Check("torch", "fail", "the model runs on PyTorch, which is not installed", "pip install 'armada[model]'")
    if not gpus:
        return Check("torch", "warn", "PyTorch sees no CUDA GPU: the model runs on the CPU",
                     "install the NVIDIA driver and a CUDA build of torch, or export to ONNX (onnx_dir)")
    return Check("torch", "ok", f"CUDA: {'; '.join(gpus)}")


def _torch_cuda_devices() -> list[str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def check_bundle(bundle: str, folder: Path) -> Check:
    """The model bundle a mergevla policy names ("tiny" is built locally on first use)."""
    if bundle == "tiny":
        return Check("model bundle", "ok", "tiny (built locally on first use)")
    path = Path(bundle).expanduser()
    path = path if path.is_absolute() else folder / path
    if not (path / "manifest.json").is_file():
        return Check("model bundle", "fail", f"{path} has no manifest.json",
                     "fix inference.policy.bundle (a folder from armada model merge or make-tiny)")
    return Check("model bundle", "ok", str(path))
