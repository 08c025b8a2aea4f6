"""`armada model train`: a synthetic LeRobotDataset written by our recorder's store, a base and
fine-tunes trained a few steps, merged, served: the served chunks equal the trained model's."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lerobot")

from armada.runtime.model.train import TrainError, read_serving, train  # noqa: E402

TASKS = ("touch the red cube", "press the green button")
CAMERAS = ("front", "wrist")
FRAMES, SIDE, DOF = 12, 32, 3


def _write_dataset(root: Path) -> None:
    """4 episodes (2 per task) through runtime/record's DatasetStore, as `armada run --record` writes them.
    Each frame's images carry a square whose place follows the state, so frames differ."""
    from armada.runtime.record.align import Row
    from armada.runtime.record.features import RecordLayout
    from armada.runtime.record.store import DatasetSpec, DatasetStore

    layout = RecordLayout(fps=10, robot_type="test", joint_names=[f"arm.j{i}" for i in range(DOF)],
                          cameras={c: (SIDE, SIDE) for c in CAMERAS}, drivers=["robot"])
    store = DatasetStore(DatasetSpec("local/train-test", root, layout.fps, layout.robot_type, layout.features(),
                                     list(layout.cameras), image_writer_threads=1, min_free_mb=0))
    for episode in range(4):
        task = episode % 2
        store.begin()
        for i in range(FRAMES):
            state = np.array([0.1 * i, task, 0.05 * episode], np.float32)
            images = {}
            for c, camera in enumerate(CAMERAS):
                image = np.full((SIDE, SIDE, 3), 40 + 60 * task, np.uint8)
                x = (2 * i + 8 * c) % (SIDE - 8)
                image[8:16, x:x + 8] = (220, 30 + 100 * c, 30)
                images[camera] = image
            store.add(Row(i, i, images, state, state + np.float32(0.2 + task), False), TASKS[task])
        store.save({})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    dataset = root / "dataset"
    _write_dataset(dataset)
    kw = dict(size="tiny", batch=4, progress=None)
    out = {"dataset": dataset, "base": train(dataset, root / "base", steps=3, **kw).out}
    for i, (key, task) in enumerate(zip("AB", TASKS)):
        out[key] = train(dataset, root / key, task=task, init=out["base"], steps=2, seed=i + 1, name=f"task_{key}",
                         **kw).out
        out["expert" + key] = train(dataset, root / f"expert{key}", task=task, init=out["base"], steps=2,
                                    seed=i + 3, parts="expert", name=f"task_{key}", **kw).out
    out["root"] = root
    return out


def _architecture(directory: Path):
    from armada.runtime.model.mergevla import MergeVLAConfig

    return MergeVLAConfig.from_dict(json.loads((directory / "architecture.json").read_text()))


def _direct_and_served(trained, bundle: Path, checkpoint: Path, task: str, frame: int,
                       pinned: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tune run on training's own batch path vs the bundle served by MergedVLAPolicy on the
    full-resolution decoded frame."""
    import torch

    from armada.runtime.inference.observation import Observation
    from armada.runtime.inference.policy import ActionSpace
    from armada.runtime.model.build import load_task_checkpoint
    from armada.runtime.model.policy import MergedVLAPolicy
    from armada.runtime.model.train import build_inputs, load_demos, load_model, load_steps

    config, serving = _architecture(checkpoint), read_serving(checkpoint)
    ck = load_task_checkpoint(checkpoint)
    demos = load_demos(trained["dataset"], None, task, None, load_steps(config.image_size), lambda _: None)
    inputs = build_inputs(demos, config, serving, ck.action_stats, ck.proprio_stats)
    with torch.no_grad():
        normalized = load_model(checkpoint)(*inputs.batch(np.array([frame]))[:4])[0].numpy()
    direct = ck.action_stats.unnormalize(normalized)
    if serving.relative is not None:  # trained as offsets from the state at the chunk's start: add it back
        direct[:, list(serving.relative)] += demos.state[frame, list(serving.relative)]

    raw = load_demos(trained["dataset"], None, task, None, lambda _: [], lambda _: None)  # no resize
    assert raw.images.shape[2:] == (SIDE, SIDE, 3)
    policy = MergedVLAPolicy(bundle)
    names = [f"arm.j{i}" for i in range(DOF)]
    policy.reset(ActionSpace(names, np.full(DOF, -9.0), np.full(DOF, 9.0), np.zeros(DOF, bool)))
    obs = Observation(time.monotonic_ns(), time.time_ns(), raw.state[frame].astype(np.float64),
                      {c: raw.images[frame, i] for i, c in enumerate(CAMERAS)})
    policy.route(obs, task, pinned_task=pinned)
    return direct, policy.infer(obs).actions


def test_checkpoints_hold_what_merge_and_serving_need(trained):
    from armada.runtime.model.build import load_task_checkpoint

    serving = read_serving(trained["base"])
    assert serving.cameras == CAMERAS and serving.dt == pytest.approx(0.1)
    assert serving.action_names == tuple(f"arm.j{i}" for i in range(DOF))
    assert serving.relative == (True,) * DOF  # the default: joints relative (no gripper here)
    config = _architecture(trained["base"])
    assert (config.action_dim, config.proprio_dim, config.num_images) == (DOF, DOF, 2)
    base = load_task_checkpoint(trained["base"])
    assert base.name == "base"
    a = load_task_checkpoint(trained["A"])
    assert (a.name, a.instruction) == ("task_A", TASKS[0])
    # each fine-tune's statistics are its own task's, over the relative targets action[t+k] - state[t]:
    # dimension 1 (constant state) is 0.2 for task A, 1.2 for task B; the base spans both
    assert a.action_stats.q01[1] == pytest.approx(0.2) and a.action_stats.q99[1] == pytest.approx(0.2)
    assert base.action_stats.q01[1] == pytest.approx(0.2) and base.action_stats.q99[1] == pytest.approx(1.2)
    assert a.proprio_stats.q99[0] == pytest.approx(np.quantile(np.tile(0.1 * np.arange(FRAMES), 2), 0.99), abs=1e-6)
    log = json.loads((trained["A"] / "train_log.json").read_text())
    assert log["steps"] == 2 and log["episodes"] == {TASKS[0]: 2} and len(log["loss_curve"]) == 1


def test_single_task_bundle_serves_the_fine_tune_exactly(trained):
    from armada.runtime.model import build
    from armada.runtime.model.bundle import load_bundle

    bundle = trained["root"] / "bundle-A"
    build.merge_bundle(trained["base"], [trained["A"]], bundle, architecture=_architecture(trained["base"]),
                       serving=read_serving(trained["base"]), overwrite=True)
    direct, served = _direct_and_served(trained, bundle, trained["A"], TASKS[0], frame=FRAMES + 3, pinned=None)
    assert served.shape == (4, DOF)
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-5)
    assert load_bundle(bundle).manifest.action.relative == [True] * DOF


def test_two_task_merge_pinned_equals_each_expert_fine_tune(trained):
    """Fine-tunes of the per-task parts only: the merge keeps exactly those per task, so each pinned
    expert is exactly its fine-tune (expert index, statistics and instruction follow the pin)."""
    from armada.runtime.model import build

    bundle = trained["root"] / "bundle-experts"
    build.merge_bundle(trained["base"], [trained["expertA"], trained["expertB"]], bundle,
                       architecture=_architecture(trained["base"]), serving=read_serving(trained["base"]),
                       overwrite=True)
    for key, task in zip("AB", TASKS):
        direct, served = _direct_and_served(trained, bundle, trained["expert" + key], task, frame=5,
                                            pinned=f"task_{key}")
        np.testing.assert_allclose(served, direct, rtol=0, atol=1e-5)
    a, _ = _direct_and_served(trained, bundle, trained["expertA"], TASKS[0], frame=5, pinned="task_A")
    b, _ = _direct_and_served(trained, bundle, trained["expertB"], TASKS[1], frame=5, pinned="task_B")
    assert not np.allclose(a, b)  # the experts differ: the comparison above could fail


def test_full_fine_tunes_merge_and_route(trained):
    from armada.runtime.model import build
    from armada.runtime.model.policy import MergedVLAPolicy

    bundle = trained["root"] / "bundle-merged"
    manifest = build.merge_bundle(trained["base"], [trained["A"], trained["B"]], bundle,
                                  architecture=_architecture(trained["base"]), serving=read_serving(trained["base"]),
                                  overwrite=True)
    assert [t.name for t in manifest.tasks] == ["task_A", "task_B"] and manifest.router is not None
    assert manifest.prompt.template == "{instruction}" and manifest.action.dt == pytest.approx(0.1)
    assert MergedVLAPolicy(bundle).manifest.observation.cameras == list(CAMERAS)


def test_clear_errors(trained, tmp_path):
    dataset, base = trained["dataset"], trained["base"]
    with pytest.raises(TrainError, match="not a LeRobotDataset"):
        train(tmp_path / "nothing", tmp_path / "out", size="tiny", progress=None)
    with pytest.raises(TrainError, match=r"no episodes of task 'fold the towel'.*press the green button"):
        train(dataset, tmp_path / "out", task="fold the towel", size="tiny", progress=None)
    with pytest.raises(TrainError, match=r"cameras \['top'\] are not in the dataset"):
        train(dataset, tmp_path / "out", cameras=["front", "top"], size="tiny", progress=None)
    with pytest.raises(TrainError, match="chunk 4 there, 6 here"):
        train(dataset, tmp_path / "out", init=base, chunk=6, steps=1, progress=None)
    with pytest.raises(TrainError, match=r"trained with relative \[True, True, True\] actions, this run would "
                                         r"train absolute actions"):
        train(dataset, tmp_path / "out", init=base, actions="absolute", steps=1, progress=None)
    with pytest.raises(TrainError, match="exists; pass --overwrite"):
        train(dataset, base, size="tiny", progress=None)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    config = json.loads((other / "architecture.json").read_text())
    config["llm"]["hidden"] = 32
    (other / "architecture.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match="weights do not fit the architecture.*shape mismatches"):
        train(dataset, tmp_path / "out", init=other, steps=1, progress=None)
    assert not (tmp_path / "out").exists()


def test_chunks_repeat_the_last_action_past_the_episode_end():
    from armada.runtime.model.train import Demos, _nearest

    demos = Demos(Path("."), 10, ["a"], ["x"], ["x"], ["t"], np.zeros((5, 1, 2, 2, 3), np.uint8),
                  np.zeros((5, 1), np.float32), np.arange(5, dtype=np.float32)[:, None],
                  np.array([3, 3, 3, 5, 5]), np.zeros(5, np.int64), {"t": 2})
    np.testing.assert_array_equal(demos.chunk_indices(np.array([0, 2, 3]), 3), [[0, 1, 2], [2, 2, 2], [3, 4, 4]])
    # video frames matched to data timestamps: the nearest one
    np.testing.assert_array_equal(_nearest(np.array([0.0, 0.1, 0.2]), np.array([-1.0, 0.04, 0.06, 0.29])), [0, 0, 1, 2])
    np.testing.assert_array_equal(_nearest(np.array([0.5]), np.array([0.0, 1.0])), [0, 0])


def test_relative_flags_follow_the_embodiment_then_the_names():
    from armada.runtime.model.train import Demos, action_stats, action_targets, relative_flags

    def demos(names: list[str], robot_type: str) -> Demos:
        n, d = 4, len(names)
        state = np.arange(n * d, dtype=np.float32).reshape(n, d)
        return Demos(Path("."), 10, ["a"], names, names, ["t"], np.zeros((n, 1, 2, 2, 3), np.uint8),
                     state, state + 100, np.full(n, n), np.zeros(n, np.int64), {"t": 1}, robot_type=robot_type)

    so101 = ["arm.shoulder_pan", "arm.shoulder_lift", "arm.elbow_flex", "arm.wrist_flex", "arm.wrist_roll",
             "gripper.gripper"]
    assert relative_flags(demos(so101, "so101"), "relative") == (True,) * 5 + (False,)  # group modes
    assert relative_flags(demos(so101, "so101"), "absolute") is None
    # an unknown robot type: a name holding "gripper" stays absolute
    assert relative_flags(demos(["a.j0", "a.left_gripper"], "custom"), "relative") == (True, False)
    d = demos(["a.j0", "a.left_gripper"], "custom")
    targets = action_targets(d, np.array([0, 2]), 3, (True, False))
    # frame 0: actions of frames 0..2 minus state[0] on j0; the gripper stays absolute
    np.testing.assert_array_equal(targets[0, :, 0], d.action[[0, 1, 2], 0] - d.state[0, 0])
    np.testing.assert_array_equal(targets[1, :, 1], d.action[[2, 3, 3], 1])
    np.testing.assert_array_equal(action_targets(d, np.array([0]), 3, None)[0], d.action[[0, 1, 2]])
    stats = action_stats(d, np.arange(4), 3, (True, False))
    assert stats.q01[0] == pytest.approx(np.quantile(action_targets(d, np.arange(4), 3, (True, False))[..., 0], 0.01))
    with pytest.raises(TrainError, match="relative actions need the state and the action"):
        bad = demos(["a.j0", "a.j1"], "custom")
        bad.state_names = ["s0", "s1"]
        relative_flags(bad, "relative")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    from armada.runtime.model.train_cli import add_train_parser, run_train

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert run_train(args) == 2
    assert "not a LeRobotDataset" in capsys.readouterr().err
