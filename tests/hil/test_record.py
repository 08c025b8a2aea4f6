"""Recording with real processes: the mock arm, two small synthetic cameras, the recorder process,
`armada record` under a pseudo-terminal (keys), `armada run --record`; every dataset is loaded
back with lerobot's LeRobotDataset, offline."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.hil

pytest.importorskip("lerobot", reason="lerobot is not installed")
pytest.importorskip("datasets", reason="lerobot's dataset extra (datasets, pandas, pyarrow, av) is not installed")
pytest.importorskip("av", reason="PyAV is not installed")

FPS = 15
W, H = 96, 64
CAMERAS = [{"name": n, "width": W, "height": H, "fps": FPS, "frames": f"ipc://{{run_dir}}/cam-{n}"}
           for n in ("front", "wrist")]


@pytest.fixture(scope="module")
def cell_dir():
    path = Path(tempfile.mkdtemp(prefix="armada-rec-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cell(cell_dir):
    """The mock arm with its scripted leader (configs/cells/teleop_mock.yaml), two small cameras."""
    import yaml

    from armada.runtime.config import SCRIPTED_CELL

    data = yaml.safe_load((SCRIPTED_CELL.parent / "teleop_mock.yaml").read_text())
    data["drivers"][0]["embodiment"] = str(SCRIPTED_CELL.parent.parent / "embodiments" / "mock_arm.yaml")
    data["cameras"] = CAMERAS
    data["inference"]["episode_duration_s"] = 2
    # Recording, two cameras, inference and the driver share 2 cores here: a 0.3 s lease lapsed under
    # CI-like load (a heartbeat late). Not a lease test; the lease's own tests keep their TTLs.
    data["drivers"][0]["lease_ttl_s"] = 1.0
    path = cell_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def procs(cell, cell_dir):
    """The driver and both cameras, shared by the tests that do not start their own."""
    from armada.runtime.supervisor import CellProcesses

    with CellProcesses(cell, cell_dir / "run") as p:
        p.spawn("driver", "arm")
        for c in ("front", "wrist"):
            p.spawn("camera", c)
        p.wait_ready()
        yield p


def _load(root: Path, repo_id: str):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(repo_id, root=root)


def _check_dataset(root: Path, repo_id: str, lengths: list[int]) -> None:
    """Shapes, fps, monotone timestamps on the grid, every video frame decodes, lengths as reported."""
    ds = _load(root, repo_id)
    assert ds.num_episodes == len(lengths) and ds.fps == FPS
    assert ds.meta.robot_type == "mock_arm"
    assert ds.features["observation.state"]["names"][:2] == ["arm.shoulder_pan", "arm.shoulder_lift"]
    assert ds.features["observation.state"]["names"][-1] == "gripper.gripper"
    ep_len = [int(e["length"]) for e in ds.meta.episodes]
    assert ep_len == lengths
    i = 0
    for ep, n in enumerate(lengths):
        stamps = []
        for k in range(n):
            item = ds[i]
            assert int(item["episode_index"]) == ep and int(item["frame_index"]) == k
            for cam in ("front", "wrist"):
                img = item[f"observation.images.{cam}"]
                assert tuple(img.shape) == (3, H, W) and float(img.float().mean()) > 0  # decoded, not black
            assert tuple(item["observation.state"].shape) == (7,) and tuple(item["action"].shape) == (7,)
            stamps.append(float(item["timestamp"]))
            i += 1
        assert np.allclose(np.diff(stamps), 1 / FPS, atol=1e-4)  # monotone, on the grid


def _sidecar(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "meta" / "armada_episodes.jsonl").read_text().splitlines()]


def test_record_three_episodes_re_record_one_and_load(procs, cell, cell_dir) -> None:
    """`armada record --teleop leader` under a pty: episode 2 is discarded with 'r' and recorded again."""
    root = cell_dir / "three"
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "armada.runtime.cli", "record", str(cell), "--dataset", str(root),
           "--repo-id", "local/three", "--task", "pick the cube", "--episodes", "3", "--episode-time", "1.5",
           "--reset-time", "0.3", "--warmup", "0", "--teleop", "leader", "--yes",
           "--run-dir", str(procs.run_dir)]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    os.close(slave)
    out = b""
    pressed = False
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    break
            if not pressed and b"recording episode 2/3" in out:
                time.sleep(0.5)
                os.write(master, b"r")  # re-record episode 2
                pressed = True
        proc.wait(timeout=max(1, deadline - time.monotonic()))
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "keys: right arrow/n next" in text  # it saw a terminal
    assert "episode 2 discarded" in text
    assert text.count("recording episode 2/3") == 2
    assert "3 episode(s) saved this session, 3 in" in text
    side = _sidecar(root)
    assert [e["episode_index"] for e in side] == [0, 1, 2]
    lengths = [e["report"]["frames"] for e in side]
    assert all(18 <= n <= 26 for n in lengths), lengths  # 1.5 s at 15 fps
    for e in side:
        rep = e["report"]
        assert sum(rep["frames_lost"].values()) == 0 and sum(rep["states_lost"].values()) == 0, rep
    _check_dataset(root, "local/three", lengths)
    ds = _load(root, "local/three")
    assert ds[0]["task"] == "pick the cube"
    assert "following the leader" in text
    # The follower followed the scripted leader: actions (teleop's servo targets after the safety
    # filter) move, and the measured pose tracks them.
    act = np.stack([ds[i]["action"].numpy() for i in range(len(ds))])
    obs = np.stack([ds[i]["observation.state"].numpy() for i in range(len(ds))])
    assert float(act[:, :6].std(axis=0).max()) > 0.01
    assert float(np.abs(act - obs)[:, :6].max()) < 0.1


def test_kill_9_mid_episode_keeps_earlier_episodes_and_resume_adds(procs, cell, cell_dir) -> None:
    from armada.runtime.record.client import RecorderClient

    root = cell_dir / "killed"
    # A tiny RAM budget: every row goes through the spill file, as when encoding lags for long.
    rec = RecorderClient(cell, procs.run_dir, root, "local/killed", ram_budget_mb=0.01)
    try:
        rec.wait_ready()
        rec.send("start", task="first")
        rec.wait_for(("started",), 30)
        time.sleep(1.0)
        rec.send("save")
        first = rec.wait_for(("saved",), 60)
        assert first["spilled"] >= first["frames"] > 0
        rec.send("start", task="doomed")
        rec.wait_for(("started",), 30)
        time.sleep(1.0)  # frames of the doomed episode are being staged
        os.kill(rec.pid, signal.SIGKILL)
        rec.proc.wait(timeout=5)
    finally:
        rec.kill()
    assert (root / "images").exists()  # the doomed episode's staging is left behind
    ds = _load(root, "local/killed")
    assert ds.num_episodes == 1 and len(ds) == first["frames"]

    rec = RecorderClient(cell, procs.run_dir, root, "local/killed")
    try:
        assert rec.wait_ready()["episodes"] == 1
        rec.send("start", task="after")
        started = rec.wait_for(("started",), 30)
        assert started["index"] == 1 and any("interrupted episode" in r for r in started["recovered"])
        time.sleep(1.0)
        rec.send("save")
        second = rec.wait_for(("saved",), 60)
        assert rec.close() == 0
    finally:
        rec.kill()
    assert not (root / "images").exists()
    _check_dataset(root, "local/killed", [first["frames"], second["frames"]])
    assert [e["task"] for e in _sidecar(root)] == ["first", "after"]


def test_too_little_disk_space_refuses_with_a_clear_error(procs, cell, cell_dir) -> None:
    root = cell_dir / "full"
    proc = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "record", str(cell), "--dataset", str(root),
                           "--task", "t", "--episodes", "1", "--episode-time", "1", "--warmup", "0",
                           "--min-free-mb", "1e12", "--run-dir", str(procs.run_dir)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "disk nearly full" in proc.stdout and "(--min-free-mb)" in proc.stdout


def test_run_record_writes_the_routed_task_and_scores(cell, cell_dir) -> None:
    """`armada run --record` on the scripted cell (its own processes, inference included)."""
    root = cell_dir / "auto"
    run_dir = cell_dir / "run-auto"
    proc = subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", "run", str(cell), "--run-dir", str(run_dir),
                             "--episodes", "2", "--duration", "2", "--instruction", "wave hello",
                             "--record", str(root), "--repo-id", "local/auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        _intervene_once(run_dir)  # the operator takes over episode 1 for a moment, then hands back
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "2 of 2 episode(s) recorded" in stdout
    side = _sidecar(root)
    assert [e["episode_index"] for e in side] == [0, 1]
    for e in side:
        assert e["task"] == "wave hello" and e["routed_task"] == "scripted"
        assert e["router"]["scores"] == {"scripted": pytest.approx(1.0)}
        assert e["inference_report"]["outcome"] == "completed"
    _check_dataset(root, "local/auto", [e["report"]["frames"] for e in side])
    ds = _load(root, "local/auto")
    assert ds[0]["task"] == "wave hello"
    # the arm moved under the scripted policy: the recorded action is not constant
    actions = np.stack([ds[i]["action"].numpy() for i in range(len(ds))])
    assert float(actions[:, 0].std()) > 1e-3
    # the intervention shows in episode 0's frames, and only there
    flags = np.array([bool(ds[i]["intervention"]) for i in range(len(ds))])
    n0 = side[0]["report"]["frames"]
    assert side[0]["report"]["intervention_frames"] == int(flags[:n0].sum()) > 0
    assert not flags[n0:].any() and side[1]["report"]["intervention_frames"] == 0
    assert side[0]["inference_report"]["interventions"] == 1
    # as a training loader sees it: action chunks by delta_timestamps (as ACT asks), batched
    import torch

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    chunked = LeRobotDataset("local/auto", root=root, delta_timestamps={"action": [k / FPS for k in range(5)]})
    batch = next(iter(torch.utils.data.DataLoader(chunked, batch_size=8, shuffle=True, num_workers=0)))
    assert tuple(batch["action"].shape) == (8, 5, 7) and tuple(batch["observation.images.front"].shape) == (8, 3, H, W)
    assert len(batch["task"]) == 8 and set(batch["task"]) == {"wave hello"}


def _intervene_once(run_dir: Path) -> None:
    import zmq

    from armada.runtime.transport import CommandClient, Subscriber

    ctx = zmq.Context()
    events = ctl = None
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "events").exists():  # the run dir's sockets appear once inference binds
            assert time.monotonic() < deadline, "armada run never started its inference process"
            time.sleep(0.1)
        events = Subscriber(ctx, f"ipc://{run_dir}/events")
        while True:
            assert time.monotonic() < deadline, "no episode started"
            msg = events.recv(0.2)
            if msg is not None and msg.get("event") == "episode_started":
                break
        time.sleep(0.6)
        ctl = CommandClient(ctx, f"ipc://{run_dir}/ctl", default_timeout_s=2.0)
        ctl.request("intervene")
        time.sleep(0.5)
        ctl.request("resume")
    finally:
        for sock in (events, ctl):
            if sock is not None:
                sock.close()
        ctx.destroy(linger=0)
