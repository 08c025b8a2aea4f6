"""A cell split over two hosts: driver and camera on the robot host (127.0.0.2), inference on the
GPU host (127.0.0.3), each with its own CURVE key set from `armada keys --hosts robot=127.0.0.2,
gpu=127.0.0.3`, picked per host the documented ways (the cell's `curve: {keys: ...}`, and
ARMADA_KEYS in the robot processes' environment). The GPU host reaches the robot's driver and camera
through our delaying proxy (runtime/remote/proxy.py, bound at the robot's address); camera frames
cross it as JPEG. The operator (as `armada run` on the robot PC) talks to the driver on its own host
and to inference on the GPU host: one key set, a server key per endpoint host.

- an episode completes across the link (CURVE, JPEG, 20 ms each way);
- a key set the robot host does not allow is refused;
- the link cut mid-episode: the driver's lease lapses and the arm holds within its TTL, and the
  episode's report says the driver went silent;
- `armada run` on the GPU host (``--this-host 127.0.0.3``) starts only its inference process, finds
  the robot's driver and camera answering across the link and drives an episode.

One set of processes serves the whole file (module fixture): starting them is most of its time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from armada.runtime.config import SCRIPTED_CELL, CurveConfig, load_cell
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.remote.hostkeys import host_curve
from armada.runtime.remote.keys import make_keys, parse_hosts
from armada.runtime.remote.bench import loopback_aliases
from armada.runtime.remote.proxy import DelayProxy
from armada.runtime.supervisor import answers_hello
from armada.runtime.transport import FrameSubscriber, Subscriber

pytestmark = pytest.mark.hil

ROBOT, GPU = "127.0.0.2", "127.0.0.3"
LINK_DELAY_S = 0.02
LEASE_TTL_S = 1.0  # a loaded CI host (load 12 on 2 cores) misses 0.3 s heartbeats; the bound is the same law


if not loopback_aliases():
    pytest.skip("this machine cannot bind 127.0.0.2/127.0.0.3 (no 127/8 loopback)", allow_module_level=True)


def _free_port(host: str) -> int:
    with socket.create_server((host, 0)) as s:
        return s.getsockname()[1]


def _write_cell(folder: Path, endpoints: dict[str, str], keys: Path, duration_s: float = 3) -> Path:
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["name"] = "remote-test"
    drv = data["drivers"][0]
    drv["state"], drv["cmd"], drv["lease_ttl_s"] = endpoints["state"], endpoints["cmd"], LEASE_TTL_S
    data["cameras"] = [{"name": "front", "width": 320, "height": 240, "fps": 30, "jpeg_quality": 80,
                        "frames": endpoints["frames"]}]
    data["inference"]["ctl"], data["inference"]["events"] = endpoints["ctl"], endpoints["events"]
    data["inference"]["episode_duration_s"] = duration_s
    data["curve"] = {"keys": os.path.relpath(keys, folder)}  # this host's folder, relative to the cell
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Split:
    """The two hosts' processes and the link between them."""

    def __init__(self, root: Path):
        self.root = root
        self.keys = make_keys(root / "keys", parse_hosts(f"robot={ROBOT},gpu={GPU}"))
        ports = {k: _free_port(ROBOT) for k in ("state", "cmd", "frames")}
        inference = {k: f"tcp://{GPU}:{_free_port(GPU)}" for k in ("ctl", "events")}
        self.robot_eps = {k: f"tcp://{ROBOT}:{p}" for k, p in ports.items()} | inference
        # The GPU host's end of the link: the robot's address, other ports, 20 ms each way.
        self.proxies = {k: DelayProxy(ROBOT, (ROBOT, p), delay_s=LINK_DELAY_S) for k, p in ports.items()}
        gpu_eps = {k: self.proxies[k].address for k in ports} | inference
        self.robot_cell = _write_cell(root / "robot", self.robot_eps, self.keys["robot"])
        self.gpu_cell = _write_cell(root / "gpu", gpu_eps, self.keys["gpu"])
        self.robot_run, self.gpu_run = root / "run-r", root / "run-g"
        self.procs: list[subprocess.Popen] = []
        self.ctx = zmq.Context()
        self.gpu = load_cell(self.gpu_cell, self.gpu_run)  # what the GPU host sees
        self.robot = load_cell(self.robot_cell, self.robot_run)  # what the robot PC (the operator) sees

    def spawn(self, role: str, cell: Path, run_dir: Path, name: str | None = None, keys: Path | None = None) -> None:
        args = [sys.executable, "-m", "armada.runtime.cli", role, str(cell), "--run-dir", str(run_dir)]
        if name:
            args += ["--name", name]
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | ({"ARMADA_KEYS": str(keys)} if keys else {})
        log = open(self.root / f"{name or role}.log", "wb")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env))

    def start(self) -> None:
        for run in (self.robot_run, self.gpu_run):
            run.mkdir(mode=0o700)
        self.spawn("driver", self.robot_cell, self.robot_run, "arm", keys=self.keys["robot"])
        self.spawn("camera", self.robot_cell, self.robot_run, "front", keys=self.keys["robot"])
        self._wait(lambda: answers_hello(self.ctx, self.gpu.drivers[0].cmd, self.gpu.curve, "test", 0.5), "driver")
        self._wait(self._frame_arrives, "camera")
        self.spawn("infer", self.gpu_cell, self.gpu_run)
        self._wait(lambda: answers_hello(self.ctx, self.robot.inference.ctl, self.robot.curve, "test", 0.5),
                   "inference", 90)

    def _frame_arrives(self) -> bool:
        sub = FrameSubscriber(self.ctx, self.gpu.cameras[0].frames, curve=self.gpu.curve)
        try:
            return sub.recv(1.0) is not None
        finally:
            sub.close()

    def _wait(self, ready, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"{p.args[3]} exited {p.returncode}: {self.logs()}")
            if ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"{what} not ready in {timeout_s} s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.root.glob("*.log"))

    def close(self) -> None:
        for p in reversed(self.procs):  # inference first: the driver sees the lease released
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for proxy in self.proxies.values():
            proxy.close()
        self.ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def split():
    root = Path(tempfile.mkdtemp(prefix="armada-rh-"))
    s = Split(root)
    try:
        s.start()
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def test_each_host_loads_its_own_key_set(split):
    g, r = split.gpu.curve, split.robot.curve
    assert g.client_secret_key == split.keys["gpu"] / "gpu.key_secret"
    assert r.server_secret_key == split.keys["robot"] / "robot.key_secret"
    # One key set, a server key per endpoint host: the robot PC reaches its driver and the GPU's inference.
    assert r.server_keys[ROBOT].name == "robot.key" and r.server_keys[GPU].name == "gpu.key"


def test_an_episode_runs_across_hosts_with_separate_keys_and_jpeg_frames(split):
    sub = FrameSubscriber(split.ctx, split.gpu.cameras[0].frames, curve=split.gpu.curve)
    frame = sub.recv(10.0)  # the CURVE handshake across the link, on a loaded host
    sub.close()
    assert frame is not None and frame.pixels.shape == (240, 320, 3)  # JPEG decoded on the GPU host
    assert frame.wire_bytes < 240 * 320 * 3 / 4, frame.wire_bytes  # it crossed as JPEG, not raw
    assert answers_hello(split.ctx, split.robot_eps["cmd"], split.robot.curve, "operator", 2.0)  # robot PC -> its driver
    client = EpisodeClient(split.ctx, split.robot)  # robot PC -> inference on the GPU host
    try:
        episode = client.start("remote", arm=True)
        report = client.wait_report(episode, 30)
    finally:
        client.close()
    assert report["outcome"] == "completed", (report, split.logs())
    assert report["chunks"] > 0
    assert split.proxies["frames"].stats.bytes_down > 0 and split.proxies["cmd"].stats.bytes_up > 0


def test_a_host_whose_key_is_not_allowed_is_refused(split):
    stranger = make_keys(split.root / "stranger", parse_hosts("gpu"))["gpu"]  # a gpu key the robot never saw
    section = {k: v for k, v in host_curve(stranger).items()}
    curve = CurveConfig(**section).model_copy(update={"server_public_key": split.keys["robot"] / "robot.key"})
    assert not answers_hello(split.ctx, split.robot_eps["cmd"], curve, "stranger", 1.0)
    assert answers_hello(split.ctx, split.robot_eps["cmd"], split.gpu.curve, "gpu", 1.0)  # the right key set


def test_link_cut_mid_episode_the_arm_holds_within_the_lease_ttl_and_the_report_says_so(split):
    # The operator on the robot PC: the driver's state on its own host, the episode on the GPU host's
    # inference (not through the cut link: only the GPU host's view of the robot is cut).
    state = Subscriber(split.ctx, split.robot_eps["state"], curve=split.robot.curve, hwm=100_000)
    client = EpisodeClient(split.ctx, split.robot)
    try:
        episode = client.start("remote", duration_s=8, arm=True)
        _wait_mode(state, "running", 15)
        time.sleep(0.5)
        lost_before = _latest(state)["counters"]["lease_lost"]
        for proxy in split.proxies.values():
            proxy.cut()
        cut_at = time.monotonic()
        held = _wait_mode(state, "armed", LEASE_TTL_S + 1.0)
        held_after = time.monotonic() - cut_at
        assert held["counters"]["lease_lost"] == lost_before + 1
        # It holds: the commanded velocity decays to zero, nothing follows a plan any more.
        time.sleep(0.5)
        assert np.all(np.abs(_latest(state)["velocity"]) < 1e-6), _latest(state)["velocity"]
        report = client.wait_report(episode, 15)
    finally:
        for proxy in split.proxies.values():
            proxy.restore()
        client.close()
        state.close()
    print(f"link cut: the driver held {held_after * 1000:.0f} ms after the cut (lease TTL {LEASE_TTL_S * 1000:.0f} ms)")
    assert held_after < LEASE_TTL_S + 0.5
    assert report["outcome"].startswith("failed") and "arm" in report["outcome"], report
    assert "silent" in report["outcome"] or "answer" in report["outcome"] or "lease" in report["outcome"], report


def test_loss_as_a_short_stall_is_ridden_out(split):
    # TCP turns loss into a stall; one shorter than the lease TTL pauses the episode at most.
    state = Subscriber(split.ctx, split.robot_eps["state"], curve=split.robot.curve, hwm=100_000)
    client = EpisodeClient(split.ctx, split.robot)
    try:
        episode = client.start("remote", duration_s=4, arm=True)
        _wait_mode(state, "running", 15)
        lost_before = _latest(state)["counters"]["lease_lost"]
        time.sleep(0.5)
        for proxy in split.proxies.values():
            proxy.stall(0.3)
        report = client.wait_report(episode, 30)
        lost_after = _latest(state)["counters"]["lease_lost"]
    finally:
        client.close()
        state.close()
    assert report["outcome"] == "completed", (report, split.logs())
    assert lost_after == lost_before  # the lease held across the stall


def _latest(sub: Subscriber) -> dict:
    msg = sub.recv_latest(1.0)
    assert msg is not None, "no state from the driver"
    return msg


def _wait_mode(sub: Subscriber, mode: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        msg = sub.recv(0.05)
        if msg is not None:
            last = msg
            if msg["mode"] == mode:
                return msg
    raise AssertionError(f"driver not {mode} within {timeout_s} s (last: {last and last['mode']})")


def test_armada_run_on_the_gpu_host_starts_only_inference_and_drives_the_robots_processes(split):
    # A second GPU-side cell (its own inference ports; the robot's driver and camera through the link):
    # `armada run` there must start inference only and find the robot's processes answering.
    ports = {k: f"tcp://{GPU}:{_free_port(GPU)}" for k in ("ctl", "events")}
    eps = {k: split.proxies[k].address for k in ("state", "cmd", "frames")} | ports
    cell = _write_cell(split.root / "gpu-run", eps, split.keys["gpu"], duration_s=2)
    run_dir = split.root / "run-gpu-run"
    args = [sys.executable, "-m", "armada.runtime.cli", "run", str(cell), "--run-dir", str(run_dir), "--arm",
            "--json", "--this-host", GPU, "--remote-timeout", "20"]
    env = {k: v for k, v in os.environ.items() if k != "ARMADA_KEYS"} | {"PYTHONUNBUFFERED": "1"}
    out = subprocess.run(args, capture_output=True, text=True, timeout=150, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, (out.stdout, out.stderr[-4000:])
    assert (f"this host runs inference; other hosts run driver arm ({ROBOT}), camera front ({ROBOT})"
            in out.stderr), out.stderr
    reports = json.loads(out.stdout)
    assert [r["outcome"] for r in reports] == ["completed"] and reports[0]["chunks"] > 0, reports
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["infer.log"]  # nothing else started here


def _doctor_clock(cell: Path, this_host: str, other_host: str) -> tuple[str, float, float]:
    """The doctor's clock row for ``other_host``, run as on ``this_host`` (this machine binds both
    addresses; each host is only its own): (status and text, offset ms, ping rtt ms)."""
    from armada.runtime.doctor.cli import diagnose
    from armada.runtime.doctor.host import CommandMissing, Host

    def no_commands(argv, timeout_s):  # chrony is not what is tested here
        raise CommandMissing(argv[0])

    report = diagnose(cell, Host(is_local=lambda a: a == this_host, run=no_commands))
    row = {r.name: r for r in report.checks}[f"clock of {other_host}"]
    print(f"doctor on {this_host}: clock of {other_host}: {row.found}")
    offset_ms = float(row.found.split(" ms")[0])
    rtt_ms = float(row.found.split("ping rtt ")[1].split(" ms")[0])
    return f"{row.status}: {row.found}", offset_ms, rtt_ms


def test_the_doctor_on_the_gpu_host_measures_the_robot_hosts_clock_through_its_driver(split):
    found, offset_ms, rtt_ms = _doctor_clock(split.gpu_cell, GPU, ROBOT)
    assert found.startswith("ok: ") and "via driver arm" in found, found
    # One machine: the true offset is 0; the estimate is within half the ping's round trip (>= 40 ms here).
    assert rtt_ms >= 2 * LINK_DELAY_S * 1000 and abs(offset_ms) <= rtt_ms / 2 + 1, found


def test_the_doctor_on_the_robot_host_measures_the_gpu_hosts_clock_through_inference(split, monkeypatch):
    """No driver or camera runs on the GPU host: its inference process answers the clock ping."""
    monkeypatch.setenv("ARMADA_KEYS", str(split.keys["robot"]))  # as the robot host's processes pick theirs
    found, offset_ms, rtt_ms = _doctor_clock(split.robot_cell, ROBOT, GPU)
    assert found.startswith("ok: ") and "via inference" in found, found
    assert abs(offset_ms) <= rtt_ms / 2 + 1, found  # one machine: the true offset is 0
