"""MergedVLAPolicy on a tiny merged bundle: routing, pinning, refusals, unnormalization."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the model extra: pip install -e '.[model]'")
pytest.importorskip("timm", reason="needs the model extra")

from armada.runtime.config import load_embodiment  # noqa: E402
from armada.runtime.inference.observation import Observation  # noqa: E402
from armada.runtime.inference.policy import ActionSpace, PolicyError  # noqa: E402
from armada.runtime.model.bundle import load_bundle  # noqa: E402
from armada.runtime.model.policy import MergedVLAPolicy  # noqa: E402
from armada.runtime.model.tiny import make_tiny_bundle  # noqa: E402

EMB = load_embodiment("mock_arm")
SPACE = ActionSpace(EMB.joint_names, EMB.lower, EMB.upper, EMB.gripper_mask())


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    make_tiny_bundle(path, num_tasks=3)
    return path


def _obs(seed: int = 0, cameras=("front", "wrist")) -> Observation:
    rng = np.random.default_rng(seed)
    frames = {c: (rng.random((48, 64, 3)) * 255).astype(np.uint8) for c in cameras}
    return Observation(time.monotonic_ns(), time.time_ns(), EMB.home.copy(), frames)


def test_routes_over_every_task_and_unnormalizes_with_the_routed_tasks_stats(bundle_dir):
    policy = MergedVLAPolicy(bundle_dir)
    policy.reset(SPACE)
    route = policy.route(_obs(), "auto")
    assert set(route.scores) == {"pick_cube", "open_drawer", "stack_blocks"}
    assert abs(sum(route.probabilities.values()) - 1) < 1e-9
    best = sorted(route.probabilities.values())
    assert route.margin == pytest.approx(best[-1] - best[-2])
    chunk = policy.infer(_obs(1))
    manifest = load_bundle(bundle_dir).manifest
    stats = manifest.task(route.task).action_stats
    assert chunk.actions.shape == (manifest.action.chunk, 7) and chunk.dt == manifest.action.dt
    lo, hi = np.array(stats.q01), np.array(stats.q99)
    # The head's output is in [-1, 1]-ish normalized units: unnormalized actions sit around the
    # routed task's range, not another task's.
    assert np.all(chunk.actions > lo - (hi - lo)) and np.all(chunk.actions < hi + (hi - lo))


def test_pinned_task_wins_and_each_expert_gives_different_actions(bundle_dir):
    policy = MergedVLAPolicy(bundle_dir)
    policy.reset(SPACE)
    outputs = {}
    for task in ("pick_cube", "stack_blocks"):
        assert policy.route(_obs(), "auto", pinned_task=task).task == task
        outputs[task] = policy.infer(_obs(2)).actions
    assert not np.allclose(outputs["pick_cube"], outputs["stack_blocks"])


def test_refusals_are_policy_errors_with_clear_messages(bundle_dir):
    policy = MergedVLAPolicy(bundle_dir)
    with pytest.raises(PolicyError, match="7 action values"):
        policy.reset(ActionSpace(EMB.joint_names[:3], EMB.lower[:3], EMB.upper[:3], EMB.gripper_mask()[:3]))
    policy.reset(SPACE)
    with pytest.raises(PolicyError, match="missing"):
        policy.route(_obs(cameras=("front",)), "auto")
    with pytest.raises(PolicyError, match="not among|no task|unknown|nope"):
        policy.route(_obs(), "auto", pinned_task="nope")
    with pytest.raises(PolicyError, match="before route"):
        MergedVLAPolicy(bundle_dir).infer(_obs())


def test_router_refuses_below_the_bundles_min_margin(bundle_dir, tmp_path):
    import json
    import shutil

    copy = tmp_path / "strict"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["router"]["min_margin"] = 0.99  # random tiny experts are never that far apart
    (copy / "manifest.json").write_text(json.dumps(manifest))
    policy = MergedVLAPolicy(copy)
    policy.reset(SPACE)
    with pytest.raises(PolicyError, match="margin"):
        policy.route(_obs(), "auto")
    assert policy.route(_obs(), "auto", pinned_task="open_drawer").task == "open_drawer"  # pin overrides


def test_routing_keeps_at_most_one_materialized_weight_set(bundle_dir):
    policy = MergedVLAPolicy(bundle_dir)
    policy.reset(SPACE)
    weights_before = {k: v.data_ptr() for k, v in policy.engine.weights.items()}
    policy.route(_obs(), "auto")
    assert {k: v.data_ptr() for k, v in policy.engine.weights.items()} == weights_before  # written in place


def test_onnx_runtime_chunks_match_pytorch_for_the_routed_task(bundle_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from armada.runtime.model.onnx_export import export_bundle

    export_bundle(bundle_dir, tmp_path / "onnx", tasks=["open_drawer"])
    torch_policy = MergedVLAPolicy(bundle_dir)
    ort_policy = MergedVLAPolicy(bundle_dir, onnx_dir=tmp_path / "onnx")
    for p in (torch_policy, ort_policy):
        p.reset(SPACE)
        p.route(_obs(), "auto", pinned_task="open_drawer")
    assert ort_policy.ort is not None and ort_policy.ort.device == "cpu"
    a = torch_policy.infer(_obs(3)).actions
    b = ort_policy.infer(_obs(3)).actions
    assert np.max(np.abs(a - b)) < 1e-4  # both float32; observed about 1e-6
    with pytest.raises(PolicyError, match="no ONNX export"):
        ort_policy.route(_obs(), "auto", pinned_task="pick_cube")


def test_relative_dimensions_get_the_observed_state_added(bundle_dir, tmp_path):
    """A bundle whose manifest marks dimensions relative: chunk = unnormalized output + obs.state on
    those dimensions only (the same weights read as absolute give the bare unnormalized output)."""
    import json
    import shutil

    relative = [True] * 6 + [False]
    copy = tmp_path / "relative"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["action"]["relative"] = relative
    (copy / "manifest.json").write_text(json.dumps(manifest))
    absolute_policy, relative_policy = MergedVLAPolicy(bundle_dir), MergedVLAPolicy(copy)
    obs = _obs(4)
    obs.state[:] = np.linspace(-0.4, 0.6, 7)  # away from zero on every dimension
    for p in (absolute_policy, relative_policy):
        p.reset(SPACE)
        p.route(obs, "auto", pinned_task="open_drawer")
    bare, shifted = absolute_policy.infer(obs).actions, relative_policy.infer(obs).actions
    expected = bare.copy()
    expected[:, :6] += obs.state[:6]
    np.testing.assert_allclose(shifted, expected, rtol=0, atol=1e-9)
    assert shifted[:, 6].tolist() == bare[:, 6].tolist()  # the gripper stays absolute
    short = Observation(obs.mono_ns, obs.t_ns, obs.state[:5], obs.frames)
    with pytest.raises(PolicyError, match="state has 5 values for 7 action dimensions"):
        relative_policy.infer(short)
