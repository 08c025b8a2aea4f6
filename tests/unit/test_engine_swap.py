"""TorchEngine.use_task: whatever order the router tries tasks in, the model holds exactly the
weights merge.materialize computes for the task (bit for bit), while skipping keys that cannot change."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the model extra: pip install -e '.[model]'")
pytest.importorskip("timm", reason="needs the model extra")

from armada.runtime.model import merge  # noqa: E402
from armada.runtime.model.bundle import load_bundle  # noqa: E402
from armada.runtime.model.engine import TorchEngine  # noqa: E402
from armada.runtime.model.tiny import BASE_FILE, TAU_FILE, make_tiny_bundle  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("swap") / "bundle"
    make_tiny_bundle(path, num_tasks=3)
    return load_bundle(path, verify=False)


def _reference(bundle, masks: dict[str, tuple[np.ndarray, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """theta_0 + tau_merge * S from the bundle's files through merge.materialize, for ``masks``."""
    base = {k: torch.from_numpy(np.array(v)) for k, v in bundle.tensors(BASE_FILE).items()}
    tau = {k: torch.from_numpy(np.array(v)) for k, v in bundle.tensors(TAU_FILE).items()}
    unpacked = {k: torch.from_numpy(np.unpackbits(bits, count=int(np.prod(shape)), bitorder="little")
                                    .view(bool).reshape(shape)) for k, (bits, shape) in masks.items()}
    return merge.materialize(base, tau, unpacked)


def _assert_holds(engine: TorchEngine, expected: dict[str, torch.Tensor], task: int) -> None:
    for key, weight in engine.weights.items():
        assert torch.equal(weight.detach(), expected[key].to(weight.dtype)), f"task {task}: {key}"


def test_any_order_of_swaps_gives_materialize_bit_for_bit(bundle):
    engine = TorchEngine(bundle)
    assert engine.weights and set(engine.weights) <= set(engine.flips)
    expected = [_reference(bundle, engine.masks[m]) for m in range(3)]
    for m in (2, 0, 1, 1, 2, 0):
        engine.use_task(m)
        _assert_holds(engine, expected[m], m)
    engine.task_index = None  # unknown: every key is written again
    engine.use_task(1)
    _assert_holds(engine, expected[1], 1)


def test_keys_that_cannot_change_are_skipped_and_still_right(bundle):
    engine = TorchEngine(bundle)
    keys = [k for k in engine.masks[0] if k in engine.masks[1]]
    same, unmasked = keys[0], keys[1]
    for m in range(3):
        engine.masks[m][same] = engine.masks[0][same]  # three tasks, one mask for this key
        del engine.masks[m][unmasked]  # tau_merge added for every task
    expected = [_reference(bundle, engine.masks[m]) for m in range(3)]
    engine.use_task(0)
    _assert_holds(engine, expected[0], 0)
    # Poison both keys: a swap that skips them (as it should) leaves the poison; compare the rest.
    engine.weights[same].data.fill_(7.0)
    engine.weights[unmasked].data.fill_(7.0)
    engine.use_task(2)
    assert torch.all(engine.weights[same] == 7.0) and torch.all(engine.weights[unmasked] == 7.0)
    engine.task_index = None
    engine.use_task(1)
    _assert_holds(engine, expected[1], 1)


def test_flips_replace_tau_and_masked_out_entries_are_exactly_the_base(bundle):
    engine = TorchEngine(bundle)
    assert not hasattr(engine, "tau")  # flips replace tau_merge: one extra weight set in memory, not two
    engine.use_task(0)
    key, (bits, shape) = next(iter(engine.masks[0].items()))
    off = ~np.unpackbits(bits, count=int(np.prod(shape)), bitorder="little").view(bool).reshape(shape)
    base = np.array(bundle.tensors(BASE_FILE)[key])
    assert off.any() and np.array_equal(engine.weights[key].detach().numpy()[off], base[off])


def test_the_router_and_memory_benches_run_at_tiny_size(tmp_path):
    from armada.runtime.model.bench_model import bench_router, bench_routing_memory

    router = bench_router("tiny", [2], tmp_path)["M=2"]
    assert router["route_ms"] > 0 and router["route_warm_ms"] > 0 and router["route_over_M_forwards"] > 0
    memory = bench_routing_memory("tiny", 2, tmp_path)
    assert memory["flips_mb"] == memory["one_weight_set_mb"]  # flips replace tau_merge, key for key
