"""`armada doctor`: each check against a fake machine (a /sys and /dev under tmp_path, canned
command output, fake limits), the UR dashboard against a loopback server, and the CLI's exit codes."""

from __future__ import annotations

import json
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from armada.calibration.results import CalibrationRecord, Residual, write_result
from armada.drivers.arx_lift2.config import ArxLift2BackendConfig
from armada.drivers.piper.config import PiperBackendConfig
from armada.drivers.so101.config import So101BackendConfig
from armada.drivers.ur3.config import UR3BackendConfig
from armada.runtime.doctor.checks import (
    DeviceNeed,
    backend_needs,
    check_bundle,
    check_calibration,
    check_can,
    check_clock,
    check_curve,
    check_cpu,
    check_device_groups,
    check_device_node,
    check_onnxruntime,
    check_peer_clocks,
    check_realsense,
    check_realtime,
    check_remote_hosts,
    check_torch,
    check_ur_dashboard,
    parse_cpu_list,
)
from armada.runtime.doctor.cli import diagnose, format_table
from armada.runtime.doctor.host import CommandMissing, Host

REPO = Path(__file__).resolve().parents[2]


def commands(outputs: dict[str, str | Exception]):
    """A Host.run that answers by program name; a program not listed is not installed."""
    calls: list[list[str]] = []

    def run(argv: list[str], timeout_s: float) -> str:
        calls.append(argv)
        assert timeout_s > 0, "every command needs a timeout"
        out = outputs.get(argv[0])
        if out is None:
            raise CommandMissing(argv[0])
        if isinstance(out, Exception):
            raise out
        return out

    run.calls = calls  # type: ignore[attr-defined]
    return run


def fake_host(tmp_path: Path, **kw) -> Host:
    defaults = dict(root=tmp_path, run=commands({}), getrlimit=lambda r: (0, 0), groups=lambda: {"me"},
                    group_name=lambda gid: "dialout", access=lambda p, m: True, is_root=False,
                    now=lambda: time.time())
    defaults.update(kw)
    return Host(**defaults)


# --- what a backend names -------------------------------------------------------------------


def test_needs_read_from_backend_fields():
    assert backend_needs("arm", PiperBackendConfig(can="can0")) == [DeviceNeed("can", "arm.can", "can0")]
    # udp_multicast is the fake's bus: no interface to check.
    assert backend_needs("arm", PiperBackendConfig(can="239.1.1.1", bustype="udp_multicast")) == []
    so = So101BackendConfig(port="/dev/ttyACM0", leader_port="/dev/serial/by-id/usb-leader")
    assert backend_needs("so", so) == [DeviceNeed("serial", "so.port", "/dev/ttyACM0"),
                                       DeviceNeed("serial", "so.leader_port", "/dev/serial/by-id/usb-leader")]
    assert backend_needs("ur", UR3BackendConfig(host="10.0.0.5")) == [
        DeviceNeed("ur_dashboard", "ur.host", "10.0.0.5", 29999)]
    assert backend_needs("lift", ArxLift2BackendConfig(fake=True)) == []
    assert [n.target for n in backend_needs("lift", ArxLift2BackendConfig())] == ["can1", "can3", "can5"]


def test_plugin_hook_wins_over_the_field_convention():
    class Plugin:
        @staticmethod
        def devices(cfg):
            return [DeviceNeed("serial", "x.bus", "/dev/ttyX")]

    assert backend_needs("x", PiperBackendConfig(can="can0"), Plugin()) == [DeviceNeed("serial", "x.bus", "/dev/ttyX")]


# --- device nodes ---------------------------------------------------------------------------


def test_serial_port_missing_present_unstable_and_unwritable(tmp_path):
    (tmp_path / "dev/serial/by-id").mkdir(parents=True)
    (tmp_path / "dev/serial/by-id/usb-FTDI-if00").touch()
    (tmp_path / "dev/ttyUSB0").touch()
    host = fake_host(tmp_path)
    [row] = check_device_node(host, DeviceNeed("serial", "arm.port", "/dev/ttyUSB1"))
    assert row.status == "fail" and "missing" in row.found and "/dev/serial/by-id" in row.fix
    [row] = check_device_node(host, DeviceNeed("serial", "arm.port", "/dev/serial/by-id/usb-FTDI-if00"))
    assert row.status == "ok"
    [row] = check_device_node(host, DeviceNeed("serial", "arm.port", "/dev/ttyUSB0"))
    assert row.status == "warn" and "by-id" in row.fix
    denied = fake_host(tmp_path, access=lambda p, m: False)
    [row] = check_device_node(denied, DeviceNeed("serial", "arm.port", "/dev/ttyUSB0"))
    assert row.status == "fail" and "usermod -aG dialout" in row.fix
    [row] = check_device_node(host, DeviceNeed("serial", "arm.port", "{run_dir}/ttyFake"))
    assert row.status == "skip"


def test_device_groups(tmp_path):
    row = check_device_groups(fake_host(tmp_path, groups=lambda: {"me", "video"}), {"dialout", "video"})
    assert row.status == "warn" and "dialout" in row.fix and "video" not in row.found.split("(")[0]
    assert check_device_groups(fake_host(tmp_path, groups=lambda: {"dialout"}), {"dialout"}).status == "ok"
    assert check_device_groups(fake_host(tmp_path), set()).status == "skip"


# --- CAN ------------------------------------------------------------------------------------


def _ip_json(kind="can", bitrate=1_000_000, state="ERROR-ACTIVE") -> str:
    return json.dumps([{"ifname": "can0", "linkinfo": {"info_kind": kind, "info_data": {
        "state": state, "bittiming": {"bitrate": bitrate, "sample_point": "0.875"}}}}])


def _net(tmp_path: Path, flags: str) -> None:
    d = tmp_path / "sys/class/net/can0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "flags").write_text(flags + "\n")


NEED_CAN = DeviceNeed("can", "arm.can", "can0")


def test_can_missing_down_wrong_bitrate_ok(tmp_path):
    assert check_can(fake_host(tmp_path), NEED_CAN).status == "fail"
    _net(tmp_path, "0x80")  # not IFF_UP
    row = check_can(fake_host(tmp_path, run=commands({"ip": _ip_json()})), NEED_CAN)
    assert row.status == "fail" and "down" in row.found and "bitrate 1000000" in row.fix
    _net(tmp_path, "0xc1")
    run = commands({"ip": _ip_json(bitrate=500_000)})
    row = check_can(fake_host(tmp_path, run=run), NEED_CAN)
    assert row.status == "fail" and "500000" in row.found
    assert run.calls == [["ip", "-details", "-json", "link", "show", "can0"]]
    row = check_can(fake_host(tmp_path, run=commands({"ip": _ip_json()})), NEED_CAN)
    assert row.status == "ok" and "1000000" in row.found
    row = check_can(fake_host(tmp_path, run=commands({"ip": _ip_json(state="ERROR-PASSIVE")})), NEED_CAN)
    assert row.status == "warn" and "ERROR-PASSIVE" in row.found
    row = check_can(fake_host(tmp_path, run=commands({"ip": _ip_json(state="BUS-OFF")})), NEED_CAN)
    assert row.status == "fail" and "BUS-OFF" in row.found
    assert check_can(fake_host(tmp_path, run=commands({"ip": _ip_json(kind="vcan")})), NEED_CAN).status == "fail"
    assert check_can(fake_host(tmp_path), NEED_CAN).status == "warn"  # no ip: up, bitrate unknown


# --- UR dashboard ---------------------------------------------------------------------------


class Dashboard:
    """A loopback stand-in for the UR dashboard server: a welcome line, then one canned answer.
    Records what it was sent, so the test sees that only a query went out."""

    def __init__(self, welcome: bytes, answer: bytes | None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.welcome, self.answer = welcome, answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(5)
        conn, _ = self.sock.accept()
        with conn:
            conn.sendall(self.welcome)
            conn.settimeout(2)
            try:
                self.received = conn.recv(256)
            except OSError:
                return
            if self.answer is not None:
                conn.sendall(self.answer)
            else:
                time.sleep(1.0)  # a dashboard that never answers

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("answer,status", [(b"true\n", "ok"), (b"false\n", "fail"),
                                           (b"could not understand: 'is in remote control'\n", "warn")])
def test_ur_dashboard_remote_control(answer, status):
    server = Dashboard(b"Connected: Universal Robots Dashboard Server\n", answer)
    try:
        row = check_ur_dashboard(Host(), DeviceNeed("ur_dashboard", "ur.host", "127.0.0.1", server.port))
    finally:
        server.close()
    assert row.status == status, row
    assert server.received == b"is in remote control\n"  # a query, nothing that loads or moves


def test_ur_dashboard_silent_wrong_and_refused():
    server = Dashboard(b"Connected: Universal Robots Dashboard Server\n", None)
    t0 = time.monotonic()
    try:
        row = check_ur_dashboard(Host(), DeviceNeed("ur_dashboard", "ur.host", "127.0.0.1", server.port), timeout_s=0.3)
    finally:
        server.close()
    assert row.status == "fail" and time.monotonic() - t0 < 2.0
    server = Dashboard(b"SSH-2.0-OpenSSH\n", b"")
    try:
        row = check_ur_dashboard(Host(), DeviceNeed("ur_dashboard", "ur.host", "127.0.0.1", server.port))
    finally:
        server.close()
    assert row.status == "fail" and "not a UR dashboard" in row.found
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert check_ur_dashboard(Host(), DeviceNeed("ur_dashboard", "ur.host", "127.0.0.1", port)).status == "fail"


# --- RealSense ------------------------------------------------------------------------------


def test_realsense_serial_usb_link_and_hang():
    cams = [{"serial": "123", "name": "Intel RealSense D435", "usb": "3.2"},
            {"serial": "456", "name": "Intel RealSense D405", "usb": "2.1"}]
    assert check_realsense(DeviceNeed("realsense", "c.serial", "123"), lambda: cams).status == "ok"
    row = check_realsense(DeviceNeed("realsense", "c.serial", "456"), lambda: cams)
    assert row.status == "warn" and "USB 3" in row.fix
    row = check_realsense(DeviceNeed("realsense", "c.serial", "789"), lambda: cams)
    assert row.status == "fail" and "123" in row.found
    assert check_realsense(DeviceNeed("realsense", "c.serial", ""), lambda: cams).status == "fail"  # which one?
    t0 = time.monotonic()
    row = check_realsense(DeviceNeed("realsense", "c.serial", "123"), lambda: time.sleep(5) or [], timeout_s=0.2)
    assert row.status == "fail" and time.monotonic() - t0 < 1.0


def test_realsense_through_this_machines_librealsense():
    """The real pyrealsense2 query (no camera on a CI machine): lists devices, finds none of ours."""
    pytest.importorskip("pyrealsense2", reason="pyrealsense2 (armada[devices]) is not installed")
    from armada.runtime.doctor.checks import _realsense_devices

    connected = _realsense_devices()
    assert all(set(d) == {"serial", "name", "usb"} for d in connected)
    row = check_realsense(DeviceNeed("realsense", "c.serial", "no-such-serial"))
    assert row.status == "fail" and "no RealSense no-such-serial connected" in row.found


# --- limits, CPU, clock ---------------------------------------------------------------------


def test_realtime_limits(tmp_path):
    limits = {resource.RLIMIT_RTPRIO: (0, 0), resource.RLIMIT_MEMLOCK: (65536, 65536)}
    rows = check_realtime(fake_host(tmp_path, getrlimit=limits.__getitem__), {"arm": 80})
    assert [r.status for r in rows] == ["warn", "warn"]
    assert "LimitRTPRIO" in rows[0].fix and "LimitMEMLOCK" in rows[1].fix
    limits = {resource.RLIMIT_RTPRIO: (99, 99), resource.RLIMIT_MEMLOCK: (resource.RLIM_INFINITY,) * 2}
    rows = check_realtime(fake_host(tmp_path, getrlimit=limits.__getitem__), {"arm": 80})
    assert [r.status for r in rows] == ["ok", "ok"]
    assert [r.status for r in check_realtime(fake_host(tmp_path), {})] == ["skip"]


def test_cpu_governor_and_isolated_cores(tmp_path):
    cpu = tmp_path / "sys/devices/system/cpu"
    assert [r.status for r in check_cpu(fake_host(tmp_path), realtime=True)] == ["skip", "skip"]
    for i, gov in enumerate(["performance", "powersave"]):
        (cpu / f"cpu{i}/cpufreq").mkdir(parents=True)
        (cpu / f"cpu{i}/cpufreq/scaling_governor").write_text(gov + "\n")
    (cpu / "isolated").write_text("\n")
    gov, iso = check_cpu(fake_host(tmp_path), realtime=True)
    assert gov.status == "warn" and "powersave (1 CPUs)" in gov.found and "cpupower" in gov.fix
    assert iso.status == "warn"
    (cpu / "cpu1/cpufreq/scaling_governor").write_text("performance\n")
    (cpu / "isolated").write_text("2-3\n")
    assert [r.status for r in check_cpu(fake_host(tmp_path), realtime=True)] == ["ok", "ok"]


def test_cpu_lists_in_the_kernels_format():
    assert parse_cpu_list("") == set() and parse_cpu_list("\n") == set()
    assert parse_cpu_list("0-3,6,8-9\n") == {0, 1, 2, 3, 6, 8, 9}
    with pytest.raises(ValueError):
        parse_cpu_list("0-x")


def test_a_drivers_cpus_present_isolated_or_shared(tmp_path):
    cpu = tmp_path / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text("0-3\n")
    (cpu / "isolated").write_text("\n")

    def rows(**driver_cpus):
        return {r.name: r for r in check_cpu(fake_host(tmp_path), realtime=False, driver_cpus=driver_cpus)}

    shared = rows(arm=[3])
    assert shared["isolated cores"].status == "warn" and "`cpus: [N]`" in shared["isolated cores"].fix
    assert shared["cpus of driver arm"].status == "warn" and "isolcpus=3" in shared["cpus of driver arm"].fix
    missing = rows(arm=[2, 5])["cpus of driver arm"]
    assert missing.status == "fail" and "[5] not online here (online: 0-3)" in missing.found
    (cpu / "isolated").write_text("2-3\n")
    ok = rows(arm=[3])
    assert ok["cpus of driver arm"].status == "ok" and ok["isolated cores"].status == "ok"
    assert "2 kept by no driver" in ok["isolated cores"].found
    assert rows(left=[2], right=[3])["isolated cores"].found == "isolated: 2-3"
    assert "cpus of driver arm" not in rows()  # no driver keeps CPUs: no row
    (cpu / "isolated").unlink()  # no isolated file (old kernels): a CPU that is not here still fails
    assert rows(arm=[5])["cpus of driver arm"].status == "fail"
    assert rows(arm=[3])["cpus of driver arm"].status == "ok" and rows(arm=[3])["isolated cores"].status == "skip"
    (cpu / "online").unlink()
    assert rows(arm=[3])["cpus of driver arm"].status == "skip"


def test_diagnose_fails_a_driver_whose_cpus_this_host_lacks(tmp_path):
    root = tmp_path / "root"
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text("0-1\n")
    (root / "sys/devices/system/cpu/isolated").write_text("\n")
    cell = _cell(tmp_path, {"kind": "mock"}, cpus=[4])
    report = diagnose(cell, fake_host(root))
    row = {r.name: r for r in report.checks}["cpus of driver arm"]
    assert row.status == "fail" and report.exit_code == 1, format_table(report)

    def refused(*_):
        raise ConnectionRefusedError

    def silent(*_):
        raise TimeoutError("no answer")

    # The same driver bound on another host (a loopback address this fake host does not own): its CPUs
    # are that host's to check.
    elsewhere = _cell(tmp_path, {"kind": "mock"}, cpus=[4], state="tcp://127.0.0.5:5555", cmd="tcp://127.0.0.5:5556")
    data = yaml.safe_load(elsewhere.read_text())
    elsewhere.write_text(yaml.safe_dump({**data, "plain_tcp_loopback": True}))
    report = diagnose(elsewhere, fake_host(root, resolve=lambda name: name, is_local=lambda a: False,
                                           connect=refused, measure_clock=silent))
    assert report.checks[0].status == "ok", format_table(report)
    assert "cpus of driver arm" not in {r.name for r in report.checks}, format_table(report)


CHRONY = """Reference ID    : C0A80001 (192.168.0.1)
Stratum         : 3
Ref time (UTC)  : Sat Dec 05 07:50:00 2026
System time     : {offset} seconds fast of NTP time
Last offset     : -0.000001234 seconds
Leap status     : {leap}
"""
PMC = """sending: GET CURRENT_DATA_SET
\t90e2ba.fffe.123456-0 seq 0 RESPONSE MANAGEMENT CURRENT_DATA_SET
\t\tstepsRemoved     1
\t\toffsetFromMaster {offset}
\t\tmeanPathDelay    500.0
"""


def test_clock_chrony_ptp_and_neither(tmp_path):
    def clock(**outputs):
        return check_clock(fake_host(tmp_path, run=commands(outputs)))

    assert clock(chronyc=CHRONY.format(offset="0.000012000", leap="Normal")).status == "ok"
    row = clock(chronyc=CHRONY.format(offset="0.020000000", leap="Normal"))
    assert row.status == "warn" and "20.0 ms" in row.found
    assert clock(chronyc=CHRONY.format(offset="0.0", leap="Not synchronised")).status == "warn"
    assert clock(chronyc=RuntimeError("chronyc -n tracking exited 1: 506 Cannot talk to daemon")).status == "warn"
    assert clock(pmc=PMC.format(offset="-12.0")).status == "ok"
    assert clock(pmc=PMC.format(offset="9000000.0")).status == "warn"
    row = clock()
    assert row.status == "skip" and "chronyc" in row.found


# --- calibration and model ------------------------------------------------------------------


def _latency_file(path: Path, date: str, value: float = 0.002, force: bool = False) -> Path:
    rec = CalibrationRecord("camera_latency", "flash", {"fit_rms": Residual(value, "s", 0.005)},
                            {"delay_s": 0.05}, date=date, tool_version="test")
    return write_result(path, rec, force=force)


def test_calibration_age_residual_forced(tmp_path):
    now = time.time()
    host = fake_host(tmp_path, now=lambda: now)
    fresh = _latency_file(tmp_path / "fresh.yaml", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 5 * 86400)))
    row = check_calibration(host, "cam.latency", fresh)
    assert row.status == "ok" and "5 days old" in row.found and "fit_rms 0.002 s (max 0.005)" in row.found
    old = _latency_file(tmp_path / "old.yaml", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 200 * 86400)))
    row = check_calibration(host, "cam.latency", old)
    assert row.status == "warn" and "200 days old" in row.found and "redo" in row.fix
    forced = _latency_file(tmp_path / "forced.yaml", "2026-01-01T00:00:00Z", value=0.01, force=True)
    assert check_calibration(host, "cam.latency", forced).status == "warn"


def test_model_runtime_checks(tmp_path):
    host = fake_host(tmp_path, run=commands({"nvidia-smi": "GPU 0: NVIDIA H100 (UUID: GPU-1)\n"}))
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    (tmp_path / "onnx").mkdir()
    asked = []
    rows = check_onnxruntime(host, tmp_path / "onnx", lambda: gpu, lambda: True,
                             lambda req: asked.append(req) or ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [(r.name, r.status) for r in rows] == [("model onnx_dir", "ok"), ("gpu", "ok"), ("onnxruntime", "ok")]
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    # A driver, but the CUDA provider does not load (cuDNN missing): the session falls back to the CPU.
    rows = check_onnxruntime(host, None, lambda: gpu, lambda: True, lambda req: ["CPUExecutionProvider"])
    assert rows[-1].status == "warn" and "only CPUExecutionProvider" in rows[-1].found

    def broken(req):
        raise RuntimeError("libcudnn.so.9: cannot open shared object file")

    rows = check_onnxruntime(host, None, lambda: gpu, lambda: True, broken)
    assert rows[-1].status == "warn" and "libcudnn" in rows[-1].found
    # onnxruntime-gpu lists CUDA without a driver: that is still the CPU.
    rows = check_onnxruntime(host, None, lambda: gpu, lambda: False)
    assert [r.status for r in rows] == ["warn"] and "no NVIDIA driver" in rows[0].found
    rows = check_onnxruntime(host, tmp_path / "missing", lambda: ["CPUExecutionProvider"], lambda: False)
    assert [r.status for r in rows] == ["fail", "warn"]
    assert check_torch(lambda: None).status == "fail"
    assert check_torch(lambda: []).status == "warn"
    assert check_torch(lambda: ["NVIDIA H100"]).status == "ok"
    assert check_bundle("tiny", tmp_path).status == "ok"
    assert check_bundle("nope", tmp_path).status == "fail"


def test_a_real_onnxruntime_session_reports_its_providers():
    """The probe session itself, on this machine's onnxruntime (CPU here: no GPU in CI)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from armada.runtime.doctor.checks import _session_providers

    assert _session_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


# --- the whole cell -------------------------------------------------------------------------


def _cell(tmp_path: Path, backend: dict, **driver) -> Path:
    cell = {"name": "doc", "drivers": [{"name": "arm", "embodiment": "piper", "backend": backend,
                                        "state": "ipc://{run_dir}/s", "cmd": "ipc://{run_dir}/c", **driver}],
            "inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev"}}
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(cell))
    return path


def test_diagnose_a_can_cell_on_a_fake_machine(tmp_path):
    root = tmp_path / "root"
    cell = _cell(tmp_path, {"kind": "piper", "can": "can0"}, realtime_priority=80)
    host = fake_host(root, run=commands({"chronyc": CHRONY.format(offset="0.0001", leap="Normal")}),
                     getrlimit=lambda r: (99, 99) if r == resource.RLIMIT_RTPRIO else (resource.RLIM_INFINITY,) * 2)
    report = diagnose(cell, host)
    rows = {r.name: r for r in report.checks}
    assert rows["config"].status == "ok"
    assert rows["can arm.can"].status == "fail" and report.exit_code == 1
    _net(root, "0x1")
    host.run = commands({"ip": _ip_json(), "chronyc": CHRONY.format(offset="0.0001", leap="Normal")})
    report = diagnose(cell, host)
    assert report.exit_code == 0, format_table(report)
    statuses = {r.name: r.status for r in report.checks}
    assert statuses["can arm.can"] == "ok" and statuses["clock"] == "ok" and statuses["realtime priority"] == "ok"
    assert statuses["model"] == "skip"
    text = format_table(report)
    assert "can arm.can" in text and "the cell can run here" in text


def test_diagnose_bad_cell_is_exit_2(tmp_path):
    report = diagnose(_cell(tmp_path, {"kind": "piper"}), fake_host(tmp_path))
    assert report.exit_code == 2 and report.checks[0].status == "fail" and "drivers.0.backend.can" in report.checks[0].found
    assert diagnose(tmp_path / "missing.yaml", fake_host(tmp_path)).exit_code == 2


def _armada(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "armada.runtime.cli", "doctor", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_cli_json_and_exit_codes(tmp_path):
    done = _armada(str(REPO / "configs/cells/piper_fake.yaml"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["can_run"] is True and report["checks"][0] == {
        "name": "config", "status": "ok", "found": "piper_fake: 1 drivers, 1 cameras, policy scripted", "fix": ""}
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn", "skip"}
    done = _armada(str(_cell(tmp_path, {"kind": "nope"})))
    assert done.returncode == 2 and "FAIL" in done.stdout and "unknown backend kind" in done.stdout


# --- other hosts of the cell ----------------------------------------------------------------


def test_remote_hosts_listening_refused_unreachable_and_local(tmp_path):
    listening = socket.create_server(("127.0.0.1", 0))
    try:
        open_port = listening.getsockname()[1]
        closed = socket.create_server(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        names = {"gpu": "127.0.0.1", "robot": "127.0.0.1", "gone": None, "me": "127.0.0.9"}

        def connect(address, port, timeout_s):
            assert timeout_s <= 1.0
            if port == 9:
                raise TimeoutError("timed out")
            return socket.create_connection((address, port), timeout=timeout_s)

        host = fake_host(tmp_path, resolve=names.get, is_local=lambda a: a == "127.0.0.9", connect=connect)
        rows = check_remote_hosts(host, [
            ("inference.ctl", f"tcp://gpu:{open_port}"), ("arm.cmd", f"tcp://robot:{closed_port}"),
            ("cam.frames", "tcp://robot:9"), ("x.state", "tcp://gone:1"), ("y.state", "tcp://me:5"),
            ("z.state", "ipc:///tmp/x")])
    finally:
        listening.close()
    by = {r.name: r for r in rows}
    assert set(by) == {"host gpu", "host robot", "host gone"}  # local and ipc endpoints are not checked
    assert by["host gpu"].status == "ok" and "ms" in by["host gpu"].found
    assert by["host robot"].status == "fail" and "cam.frames" in by["host robot"].found  # a dead port wins
    assert by["host gone"].status == "fail" and "resolve" in by["host gone"].found
    rows = check_remote_hosts(host, [("arm.cmd", f"tcp://robot:{closed_port}")])
    assert [r.status for r in rows] == ["warn"] and "not listening yet" in rows[0].found
    # A cell over several hosts without any time source: a warning, not a skip.
    assert check_clock(host, multi_host=True).status == "warn"


@pytest.mark.skipif(not Path("/sys/class/net/lo").exists() or shutil.which("ip") is None,
                    reason="needs /sys/class/net/lo and iproute2's ip")
def test_can_check_on_this_machine_reads_real_sys_and_ip():
    """The real /sys and the real `ip -details -json` output: lo is up, and it is not a CAN link."""
    row = check_can(Host(), DeviceNeed("can", "arm.can", "lo"))
    assert row.status == "fail" and "not a CAN interface" in row.found, row
    assert check_can(Host(), DeviceNeed("can", "arm.can", "nosuchcan9")).status == "fail"


# --- CURVE keys -----------------------------------------------------------------------------


def test_curve_key_files(tmp_path):
    import zmq.auth

    from armada.runtime.config import CurveConfig

    assert [r.status for r in check_curve(None)] == ["skip"]
    server_pub, server_sec = zmq.auth.create_certificates(tmp_path, "server")
    client_pub, client_sec = zmq.auth.create_certificates(tmp_path, "client")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    Path(server_sec).chmod(0o600)
    Path(client_sec).chmod(0o600)
    curve = CurveConfig(server_public_key=server_pub, server_secret_key=server_sec, authorized_clients=allowed)
    rows = check_curve(curve)
    assert [(r.name, r.status) for r in rows] == [("curve authorized_clients", "fail")]
    (allowed / "client.key").write_bytes(Path(client_pub).read_bytes())
    rows = check_curve(curve)
    assert [r.status for r in rows] == ["ok"] and "1 allowed clients" in rows[0].found
    Path(server_sec).chmod(0o644)
    rows = check_curve(curve)
    assert [r.status for r in rows] == ["warn"] and "chmod 600" in rows[0].fix
    gone = CurveConfig(server_public_key=tmp_path / "nope.key", client_secret_key=client_sec,
                       authorized_clients=allowed)
    assert [(r.name, r.status) for r in check_curve(gone)] == [("curve server_public_key", "fail")]


SOURCES = """MS Name/IP address         Stratum Poll Reach LastRx Last sample
===============================================================================
^* 192.168.0.10                  2   6   377    35    -12us[  -15us] +/-   20ms
^- 10.0.0.7                      3   7   377    2m  +8123us[+8123us] +/-   40ms
^? 10.0.0.8                      0   7     0     -     +0ns[   +0ns] +/-    0ns
"""


def test_clock_offset_to_the_other_hosts(tmp_path):
    host = fake_host(tmp_path, run=commands({"chronyc": SOURCES}))
    rows = check_peer_clocks(host, {"robot": "192.168.0.10", "gpu": "10.0.0.7", "cam": "10.0.0.99"})
    by = {r.name: r for r in rows}
    assert by["clock to robot"].status == "ok" and "-12 us" in by["clock to robot"].found
    assert by["clock to gpu"].status == "warn" and "+8.1 ms" in by["clock to gpu"].found
    assert by["clock to cam"].status == "skip" and "not a chrony source" in by["clock to cam"].found
    assert check_peer_clocks(fake_host(tmp_path), {"robot": "192.168.0.10"}) == []  # no chronyc: the clock row says so
    assert check_peer_clocks(host, {}) == []


def test_diagnose_a_cell_split_over_two_hosts(tmp_path):
    import zmq.auth

    keys = tmp_path / "keys"
    keys.mkdir()
    pub, sec = zmq.auth.create_certificates(keys, "robot")
    cpub, _ = zmq.auth.create_certificates(keys, "gpu")
    (keys / "allowed").mkdir()
    (keys / "allowed" / "gpu.key").write_bytes(Path(cpub).read_bytes())
    Path(sec).chmod(0o600)
    cell = {"name": "split", "curve": {"server_public_key": str(pub), "server_secret_key": str(sec),
                                       "authorized_clients": str(keys / "allowed")},
            "drivers": [{"name": "arm", "embodiment": "mock_arm", "backend": {"kind": "mock"},
                         "state": "tcp://robot:5601", "cmd": "tcp://robot:5602"}],
            "inference": {"ctl": "tcp://gpu:5701", "events": "tcp://gpu:5702"}}
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(cell))
    addresses = {"robot": "10.9.9.1", "gpu": "10.9.9.2"}
    connected = []

    def connect(address, port, timeout_s):
        connected.append((address, port))
        raise ConnectionRefusedError  # the gpu host is up, its inference process not started

    sources = SOURCES.replace("192.168.0.10", "10.9.9.2")
    host = fake_host(tmp_path, resolve=addresses.get, is_local=lambda a: a == "10.9.9.1", connect=connect,
                     run=commands({"chronyc": sources}))
    report = diagnose(path, host)
    rows = {r.name: r for r in report.checks}
    assert rows["curve keys"].status == "ok"
    assert rows["host gpu"].status == "warn" and "host robot" not in rows  # this is the robot host
    assert sorted(connected) == [("10.9.9.2", 5701), ("10.9.9.2", 5702)]
    assert rows["clock to gpu"].status == "ok"
    assert report.exit_code == 0, format_table(report)
