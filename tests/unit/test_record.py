"""Recorder pieces without processes: grid alignment and gap counting, keys, the spill queue, the
dataset store's crash recovery and disk checks (these with lerobot, when installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from armada.runtime.record.align import Aligner, Row, state_from_message
from armada.runtime.record.cli import KEY_NEXT, KEY_RERECORD, KEY_STOP, parse_keys
from armada.runtime.record.writer import SpillQueue

MS = 1_000_000
PERIOD = 1_000_000_000 // 30


def _frame(seq: int, t: int, drops: int = 0) -> tuple[dict, np.ndarray]:
    return {"frame_seq": seq, "capture_ns": t, "drops": drops}, np.full((4, 4, 3), seq % 256, np.uint8)


def _state(seq: int, t: int, q: float, leader: list[float] | None = None, hw: bool = False) -> dict:
    msg = {"seq": seq, "t_ns": t, "measured": [q, q], "commanded": [q + 1, q + 1]}
    if leader is not None or hw:
        msg["device"] = {"leader": leader, "leader_follows_in_hardware": hw}
    return msg


def _feed(al: Aligner, t0: int, seconds: float, skip_frames: set[int] = frozenset(), jitter_ns: int = 0,
          skip_states: set[int] = frozenset()) -> None:
    rng = np.random.default_rng(0)
    for i in range(int(seconds * 30)):
        if i not in skip_frames:
            al.add_frame("cam", *_frame(i, t0 + i * PERIOD + int(rng.integers(-jitter_ns, jitter_ns + 1))))
    for j in range(int(seconds * 500)):
        if j not in skip_states:
            al.add_state("arm", _state(j, t0 + j * 2 * MS, j * 0.001))


def test_rows_sit_on_the_grid_with_the_nearest_frame_and_the_state_at_the_instant() -> None:
    al = Aligner(["cam"], ["arm"], 30)
    t0 = 10**18
    al.add_frame("cam", *_frame(0, t0 - PERIOD))  # before the episode: sets the frame phase
    al.start(t0 - PERIOD // 3)  # moved onto the camera's phase: t0 (within a 64th of a period)
    assert 0 <= al.t0_ns - t0 < PERIOD // 64 + 1 or 0 <= t0 - al.t0_ns < PERIOD // 64 + 1
    al.t0_ns = t0
    _feed(al, t0, 1.0, jitter_ns=3 * MS)
    al.stop(t0 + 20 * PERIOD)
    rows = al.due_rows(t0 + 10**10, 150 * MS)
    assert al.finished() and len(rows) == 20
    assert [r.index for r in rows] == list(range(20))
    assert [int(r.images["cam"][0, 0, 0]) for r in rows] == list(range(20))  # frame k for instant k
    # state: the newest at or before the instant (500 Hz: within 2 ms), measured and commanded
    for r in rows:
        j = (r.t_ns - t0) // (2 * MS)
        assert r.observation[0] == pytest.approx(j * 0.001, abs=1e-6)
        assert r.action[0] == pytest.approx(1 + j * 0.001, abs=1e-6)
    rep = al.close_episode()
    assert rep.frames == 20 and rep.total_gaps() == 0 and rep.total_lost() == 0


def test_the_grid_phase_keeps_unsynchronised_cameras_away_from_the_half_period_edge() -> None:
    al = Aligner(["a", "b", "c"], ["arm"], 30)
    t0 = 10**18 - (10**18 % PERIOD)  # phase 0
    for cam, offset in (("a", 0), ("b", PERIOD // 3), ("c", 2 * PERIOD // 3)):
        al.add_frame(cam, *_frame(0, t0 + offset))
    phase = al.grid_phase()
    worst = max(min(abs(phase - p), PERIOD - abs(phase - p)) for p in (0, PERIOD // 3, 2 * PERIOD // 3))
    assert worst <= PERIOD // 3 + PERIOD // 64  # the best a grid can do for three evenly spread phases
    al.start(t0 + 5)
    assert (al.t0_ns - phase) % PERIOD == 0 and t0 + 5 <= al.t0_ns < t0 + 5 + PERIOD


def test_missing_frames_and_lost_messages_are_counted_not_hidden() -> None:
    al = Aligner(["cam"], ["arm"], 30)
    t0 = 10**18
    al.start(t0)
    _feed(al, t0, 1.0, skip_frames={5, 6, 7}, skip_states={100, 101})
    al.add_frame("cam", {"frame_seq": 40, "capture_ns": t0 + 40 * PERIOD, "drops": 4}, np.zeros((4, 4, 3), np.uint8))
    al.stop(t0 + 30 * PERIOD)
    rows = al.due_rows(t0 + 10**10, 150 * MS)
    rep = al.close_episode()
    assert len(rows) == 30 == rep.frames
    # frames 5-7 are missing: instants 5-7 have no frame within half a period (4 and 8 are nearest)
    assert rep.frame_gaps["cam"] == 3
    assert [int(r.images["cam"][0, 0, 0]) for r in rows[4:9]] == [4, 4, 4, 8, 8]  # filled with the nearest
    assert rep.frames_lost["cam"] == 3 + 10  # seq 5-7 and 30-39 never arrived
    assert rep.camera_drops["cam"] == 4  # the camera's own counter went 0 -> 4
    assert rep.states_lost["arm"] == 2
    assert rep.total_lost() == 13 + 4 + 2


def test_rows_wait_for_late_frames_and_an_episode_is_cut_at_its_end() -> None:
    al = Aligner(["cam"], ["arm"], 30)
    t0 = 10**18
    al.start(t0)
    _feed(al, t0, 0.5)
    assert al.due_rows(t0 + 5 * PERIOD, 150 * MS) == []  # nothing settled yet: frames may still arrive
    rows = al.due_rows(t0 + 5 * PERIOD + 150 * MS + PERIOD // 2, 150 * MS)
    assert len(rows) == 6  # instants 0..5
    al.stop(t0 + 10 * PERIOD + 1)
    rows = al.due_rows(t0 + 10**10, 150 * MS)
    assert [r.index for r in rows] == [6, 7, 8, 9, 10] and al.finished()


def test_a_stream_that_never_sent_blocks_rows_and_is_named() -> None:
    al = Aligner(["cam", "wrist"], ["arm"], 30)
    al.start(10**18)
    _feed(al, 10**18, 0.3)
    assert al.due_rows(10**18 + 10**10, 150 * MS) == []
    assert al.missing_streams() == ["camera wrist"]


def test_action_is_the_leader_where_the_follower_obeys_it_in_hardware() -> None:
    s = state_from_message(_state(0, 0, 0.5, leader=[0.7, 0.8], hw=True))
    assert list(s.observation) == [0.5, 0.5] and list(s.action) == pytest.approx([0.7, 0.8])
    s = state_from_message(_state(0, 0, 0.5, leader=[0.7, 0.8], hw=False))
    assert list(s.action) == [1.5, 1.5]  # commanded: teleop's servo targets after the safety filter
    s = state_from_message(_state(0, 0, 0.5, leader=None, hw=True))  # leader unreadable: the follower holds
    assert list(s.action) == [0.5, 0.5]


def test_intervention_flags_rows() -> None:
    al = Aligner(["cam"], ["arm"], 30)
    t0 = 10**18
    al.start(t0)
    _feed(al, t0, 0.5)
    first = al.due_rows(t0 + 3 * PERIOD + 150 * MS + PERIOD, 150 * MS)
    al.intervention = True
    al.stop(t0 + 10 * PERIOD)
    rest = al.due_rows(t0 + 10**10, 150 * MS)
    assert not any(r.intervention for r in first) and all(r.intervention for r in rest)
    assert al.close_episode().intervention_frames == len(rest)


def test_keys() -> None:
    assert parse_keys(b"\x1b[C") == [KEY_NEXT]
    assert parse_keys(b"\x1b[D") == [KEY_RERECORD]
    assert parse_keys(b"nrq") == [KEY_NEXT, KEY_RERECORD, KEY_STOP]
    assert parse_keys(b"\x1b") == [KEY_STOP]
    assert parse_keys(b"\x1b[Ax") == []  # up arrow and unknown keys do nothing


def test_spill_queue_keeps_order_and_bounds_memory(tmp_path: Path) -> None:
    q = SpillQueue(tmp_path / "spill", ram_budget_bytes=3 * 48)  # three 4x4x3 images
    rows = [Row(i, i, {"a": np.full((4, 4, 3), i, np.uint8)}, np.zeros(2, np.float32), np.zeros(2, np.float32),
                False) for i in range(10)]
    for r in rows:
        q.put_row(r)
    q.put("end", "x")
    assert q.spilled == 7 and q.ram_bytes <= 3 * 48
    got = [q.get(timeout=1) for _ in range(11)]
    assert [k for k, _ in got] == ["row"] * 10 + ["end"]
    assert [int(r.images["a"][0, 0, 0]) for _, r in got[:10]] == list(range(10))
    q.close()


# --------------------------------------------------------------------------- the store, with lerobot


def _spec(root: Path, min_free_mb: float = 0.0):
    from armada.runtime.record.store import DatasetSpec

    feats = {"observation.state": {"dtype": "float32", "shape": (2,), "names": ["a.x", "a.y"]},
             "action": {"dtype": "float32", "shape": (2,), "names": ["a.x", "a.y"]},
             "intervention": {"dtype": "bool", "shape": (1,), "names": None},
             "observation.images.cam": {"dtype": "video", "shape": (48, 64, 3),
                                        "names": ["height", "width", "channels"]}}
    return DatasetSpec("local/unit", root, 10, "mock_arm", feats, ["cam"], image_writer_threads=1,
                       min_free_mb=min_free_mb)


def _row(i: int) -> Row:
    return Row(i, i, {"cam": np.full((48, 64, 3), (i * 20) % 256, np.uint8)}, np.full(2, i, np.float32),
               np.full(2, -i, np.float32), False)


def _episode(store, n: int, task: str = "t") -> int:
    store.begin()
    for i in range(n):
        store.add(_row(i), task)
    return store.save({"note": task})


def _load(root: Path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset("local/unit", root=root)


@pytest.fixture
def lerobot():
    pytest.importorskip("lerobot", reason="lerobot is not installed")
    pytest.importorskip("datasets", reason="lerobot's dataset extra (datasets, pandas, pyarrow, av) is not installed")
    pytest.importorskip("av", reason="PyAV is not installed")


def test_a_crash_inside_save_is_rolled_back_on_the_next_open(tmp_path: Path, lerobot, monkeypatch) -> None:
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    from armada.runtime.record.store import DatasetStore, read_sidecar

    root = tmp_path / "ds"
    store = DatasetStore(_spec(root))
    assert _episode(store, 6, "first") == 0

    class Killed(BaseException):  # like kill -9: no except clause of ours runs
        pass

    def die(*_a, **_k):
        raise Killed

    monkeypatch.setattr(LeRobotDatasetMetadata, "save_episode", die)
    store.begin()
    for i in range(5):
        store.add(_row(i), "second")
    with pytest.raises(Killed):
        store.save({})  # the episode's data and video files are written, its metadata is not
    store._drop_writer()
    assert (root / "meta" / "armada_pending.json").exists()
    monkeypatch.undo()

    store2 = DatasetStore(_spec(root))
    assert store2.begin() == 1  # recovered: the half-written episode is gone, index 1 is free again
    assert any("half-written episode 1" in r for r in store2.recovered)
    for i in range(4):
        store2.add(_row(i), "third")
    assert store2.save({"note": "third"}) == 1
    ds = _load(root)
    assert ds.num_episodes == 2 and len(ds) == 10
    assert [e["note"] for e in read_sidecar(root)] == ["first", "third"]
    assert ds[9]["task"] == "third"


def test_too_little_free_space_stops_with_a_clear_error_and_a_loadable_dataset(tmp_path: Path, lerobot) -> None:
    from armada.runtime.record.store import DatasetStore, RecordError

    root = tmp_path / "ds"
    free = [10_000.0]
    store = DatasetStore(_spec(root, min_free_mb=500), free_mb=lambda _p: free[0])
    _episode(store, 3)
    free[0] = 100.0
    with pytest.raises(RecordError, match=r"disk nearly full: 100 MB free .* minimum is 500 MB .* holds 1 episode"):
        store.begin()
    assert _load(root).num_episodes == 1


def test_a_file_size_limit_during_save_leaves_a_loadable_dataset(tmp_path: Path, lerobot) -> None:
    """EFBIG like ENOSPC: the save fails, is rolled back, and the error says what happened."""
    root = tmp_path / "ds"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_record import _spec, _row, _episode
        from armada.runtime.record.align import Row
        from armada.runtime.record.store import DatasetStore, RecordError
        store = DatasetStore(_spec(__import__('pathlib').Path({str(root)!r})))
        _episode(store, 3)
        rng = np.random.default_rng(0)
        store.begin()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            for i in range(30):  # noise: its video outgrows the limit
                store.add(Row(i, i, {{"cam": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)}},
                              np.zeros(2, np.float32), np.zeros(2, np.float32), False), "big")
            store.save({{}})
        except RecordError as exc:
            print("RECORD ERROR:", exc)
            sys.exit(3)
        sys.exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    print(proc.stdout)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert "RECORD ERROR" in proc.stdout and "holds 1 finished episode(s) and loads" in proc.stdout
    ds = _load(root)
    assert ds.num_episodes == 1 and len(ds) == 3
    assert not (root / "meta" / "armada_pending.json").exists()
    json.loads((root / "meta" / "info.json").read_text())  # whole, not torn


def test_features_are_named_after_drivers_groups_and_joints(tmp_path: Path) -> None:
    import copy

    import yaml

    from armada.runtime.config import SCRIPTED_CELL, load_cell
    from armada.runtime.record.features import record_layout

    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    emb = SCRIPTED_CELL.parent.parent / "embodiments"
    left = dict(data["drivers"][0], name="left", embodiment=str(emb / "mock_arm.yaml"),
                state="ipc://{run_dir}/l-state", cmd="ipc://{run_dir}/l-cmd")
    right = dict(copy.deepcopy(left), name="right", embodiment=str(emb / "mock_bimanual.yaml"),
                 state="ipc://{run_dir}/r-state", cmd="ipc://{run_dir}/r-cmd")
    data["drivers"] = [left, right]
    data["cameras"][1]["fps"] = 15
    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(data))
    cell = load_cell(tmp_path / "cell.yaml", tmp_path)
    layout = record_layout(cell)
    assert layout.fps == 15  # the slowest camera: no camera is asked for frames it does not have
    assert layout.robot_type == "mock_arm+mock_bimanual"
    assert layout.joint_names[:2] == ["left.arm.shoulder_pan", "left.arm.shoulder_lift"]
    assert layout.joint_names[7].startswith("right.")
    n_right = cell.embodiment(cell.drivers[1]).dof
    feats = layout.features()
    assert feats["observation.state"]["shape"] == (7 + n_right,) == feats["action"]["shape"]
    assert feats["observation.images.front"]["shape"] == (480, 640, 3)
    assert record_layout(cell, fps=10).fps == 10
    single = record_layout(load_cell(SCRIPTED_CELL, tmp_path))
    assert single.joint_names[0] == "arm.shoulder_pan" and single.fps == 30
