"""`armada bench anchors`, the parts that need no process: metrics, wire format, options, cell."""

from __future__ import annotations

import argparse
import importlib.util

import msgpack
import numpy as np
import pytest

from armada.runtime.anchors.bench import _floats, _notes, run_anchors_bench
from armada.runtime.anchors.common import RunSpec, velocity_jump, write_cell
from armada.runtime.anchors.openpi_stack import pack, unpack
from armada.runtime.config import load_cell


def test_velocity_jump_is_small_on_a_smooth_stream_and_sees_a_stall():
    rate = 500.0
    t = np.arange(0, 1, 1 / rate) + 1e-4
    x = np.stack([0.5 * t, -0.5 * t], axis=1)  # 0.5 rad/s on two joints
    assert velocity_jump(t, x, rate, 0.0, 1.0) < 1e-6
    stalled = x.copy()
    stalled[250:] = stalled[250:] - stalled[250] + stalled[249]  # one tick holds, then the motion goes on
    assert velocity_jump(t, stalled, rate, 0.0, 1.0) == pytest.approx(0.5, rel=1e-6)
    jumped = x.copy()
    jumped[250:] += 0.01  # a 10 mrad step at a seam: 5 rad/s for one tick
    assert velocity_jump(t, jumped, rate, 0.0, 1.0) == pytest.approx(5.0, rel=1e-3)


def test_velocity_jump_samples_the_held_target_between_sparse_updates():
    # One fresh target every other tick at 0.5 rad/s: the arm's target moves every other tick.
    rate = 100.0
    t = np.arange(0, 1, 2 / rate) + 1e-4
    x = (0.5 * t)[:, None]
    assert velocity_jump(t, x, rate, 0.0, 1.0) == pytest.approx(1.0, rel=1e-6)  # v goes 0, 1, 0, 1 rad/s


def test_openpi_wire_format_round_trips_numeric_arrays():
    obs = {"state": np.arange(7, dtype=np.float64), "t_ns": np.int64(123),
           "images": {"front": np.zeros((4, 5, 3), np.uint8)}, "prompt": "pick"}
    back = unpack(pack(obs))
    assert np.array_equal(back["state"], obs["state"]) and back["state"].dtype == np.float64
    assert back["t_ns"] == 123 and back["images"]["front"].shape == (4, 5, 3) and back["prompt"] == "pick"


def test_openpi_wire_format_refuses_object_arrays_both_ways():
    with pytest.raises(ValueError, match="dtype"):
        pack({"x": np.array([object()], dtype=object)})
    hostile = msgpack.packb({"x": {b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]}})
    with pytest.raises(ValueError, match="refused an array of dtype object"):
        unpack(hostile)


@pytest.mark.skipif(importlib.util.find_spec("openpi_client") is None, reason="openpi-client is not installed")
def test_our_server_reads_what_openpi_client_sends_and_it_reads_our_replies():
    from openpi_client import msgpack_numpy

    obs = {"state": np.linspace(0, 1, 7), "t_ns": np.int64(5), "images": {"wrist": np.ones((2, 2, 3), np.uint8)}}
    back = unpack(msgpack_numpy.Packer().pack(obs))
    assert np.array_equal(back["state"], obs["state"]) and back["t_ns"] == 5
    reply = msgpack_numpy.unpackb(pack({"actions": np.ones((50, 7)), "server_timing": {"infer_ms": 1.5}}))
    assert reply["actions"].shape == (50, 7) and reply["server_timing"]["infer_ms"] == 1.5


def test_rates_and_loads_are_checked_before_anything_starts(capsys):
    assert _floats(None, (50.0,), "rates") == (50.0,)
    assert _floats("50, 500", (), "rates") == (50.0, 500.0)
    for bad in ("fast", "0", "-1", "nan", ","):
        with pytest.raises(ValueError, match="--rates"):
            _floats(bad, (), "rates")
    args = argparse.Namespace(rates="50,x", loads=None, quick=True, seconds=None, json=None)
    assert run_anchors_bench(args) == 2
    assert "--rates" in capsys.readouterr().err
    args = argparse.Namespace(rates=None, loads="0.5,1.2", quick=True, seconds=None, json=None)
    assert run_anchors_bench(args) == 2
    assert "below 1" in capsys.readouterr().err


def test_the_bench_cell_runs_the_arm_at_the_rate_and_the_policy_at_the_load(short_tmp):
    spec = RunSpec(rate_hz=50.0, load=0.6, seconds=3.0)
    cell = load_cell(write_cell(short_tmp, spec), short_tmp)
    assert cell.inference.chunking.size == 50 and cell.inference.chunking.dt == pytest.approx(0.02)
    assert cell.inference.chunking.mode == "async" and cell.inference.chunking.execute == 50
    assert cell.inference.policy.latency_s == pytest.approx(0.6 * 50 * 0.02)
    assert len(cell.cameras) == 2 and all((c.width, c.height) == (640, 480) for c in cell.cameras)
    emb = (short_tmp / "mock_arm.yaml").read_text()
    assert "control_rate_hz: 50.0" in emb


@pytest.mark.skipif(importlib.util.find_spec("lerobot") is None, reason="lerobot is not installed")
def test_lerobot_finds_our_robot_class_by_its_third_party_naming_rule():
    """LeRobot's make_robot_from_config looks a third-party robot up by module and class name
    (config_<x>.py beside <x>.py, the class name minus Config): the LeRobot stack needs it to hold."""
    import importlib

    from armada.runtime.anchors.config_lerobot_arm import _config_class

    config_cls = _config_class()
    assert config_cls.__name__ == "LerobotArmConfig"
    assert config_cls.__module__ == "armada.runtime.anchors.config_lerobot_arm"
    robot_cls = importlib.import_module("armada.runtime.anchors.lerobot_arm").LerobotArm
    assert robot_cls.config_class is config_cls and robot_cls.name == "armada_anchor_arm"
    assert config_cls(cell="c.yaml", run_dir="/tmp").type == "armada_anchor_arm"


def test_quick_is_one_rate_one_load_and_a_few_seconds_even_after_the_cli_default(monkeypatch):
    from armada.runtime.anchors import bench

    seen = []
    monkeypatch.setattr(bench, "run_anchors", lambda *a: seen.append(a) or {"rows": []})
    assert run_anchors_bench(argparse.Namespace(rates=None, loads=None, quick=True, seconds=10.0, json=None)) == 0
    assert run_anchors_bench(argparse.Namespace(rates=None, loads=None, quick=False, seconds=10.0, json=None)) == 0
    assert seen == [((500.0,), (0.6,), 3.0), ((50.0, 500.0), (0.3, 0.6, 0.9), 10.0)]


def test_a_row_whose_arm_was_moved_by_realigns_says_so_and_how_many_chunks_played():
    row = {"outcome": "completed", "chunks": 0, "realign_moves": 7, "realign_move_ticks": 240}
    assert "0 chunks played, 7 realign moves (240 ticks, not counted fresh)" in _notes(row)
    assert _notes({"outcome": "completed", "chunks": 12, "realign_moves": 0}) == ""
