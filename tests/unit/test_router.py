"""Router scoring and decisions on hand-computed cases (runtime.model.router)."""

import logging
import math

import pytest

torch = pytest.importorskip("torch")

from armada.runtime.model.merge import materialize, tall_masks, task_arithmetic  # noqa: E402
from armada.runtime.model.router import Router, RouterRefused, RouterSubspaces, route, score_task  # noqa: E402


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def basis(dim: int, *indices: int) -> torch.Tensor:
    """Rows e_i of R^dim: an orthonormal [k, dim] subspace."""
    return torch.eye(dim)[list(indices)]


# --------------------------------------------------------------------------- score_task


def test_score_task_by_hand():
    sub_adapter = basis(3, 0, 1)  # span(e0, e1)
    sub_task = basis(3, 2, 1)  # span(e2, e1)
    action = t([[3, 4, 12], [0, 0, 5]])  # Q=2
    task = t([[5, 3, 4], [0, 6, 8], [7, 0, 0]])  # T=3
    # action tokens on (e0, e1): (3, 4) -> 5 and (0, 0) -> 0; mean 2.5
    # task tokens on (e2, e1): (4, 3) -> 5, (8, 6) -> 10, (0, 0) -> 0; mean 5
    # score = (2.5 + 5) / 2
    assert score_task(action, task, sub_adapter, sub_task) == pytest.approx(3.75)
    # a batch axis changes nothing for B=1
    assert score_task(action[None], task[None], sub_adapter, sub_task) == pytest.approx(3.75)


def test_score_task_oblique_subspace():
    sub = t([[0.6, 0.8, 0], [0, 0, 1]])
    # (3, 4, 0) -> coordinates (0.6*3 + 0.8*4, 0) = (5, 0) -> 5 on both branches
    assert score_task(t([[3, 4, 0]]), t([[3, 4, 0]]), sub, sub) == pytest.approx(5.0)


def test_score_task_checks_shapes():
    with pytest.raises(ValueError, match="hidden size 4 != subspace width 3"):
        score_task(torch.zeros(2, 4), torch.zeros(2, 3), basis(3, 0), basis(3, 0))
    with pytest.raises(ValueError, match="task hidden states"):
        score_task(torch.zeros(2, 3), torch.zeros(3), basis(3, 0), basis(3, 0))


# --------------------------------------------------------------------------- route


def test_route_softmax_and_margin():
    decision = route({"a": 1.0, "b": 0.0})
    # p_a = e / (e + 1), margin = p_a - p_b = tanh(1/2)
    assert decision.task == "a" and not decision.pinned
    assert decision.probabilities["a"] == pytest.approx(math.e / (math.e + 1))
    assert decision.margin == pytest.approx(math.tanh(0.5))
    # temperature 2 halves the logits: margin tanh(1/4)
    assert route({"a": 1.0, "b": 0.0}, temperature=2.0).margin == pytest.approx(math.tanh(0.25))


def test_route_three_candidates_exact_probabilities():
    # exp(0) : exp(ln 2) : exp(ln 3) = 1 : 2 : 3 -> probabilities 1/6, 2/6, 3/6; margin 1/6
    decision = route({"a": 0.0, "b": math.log(2), "c": math.log(3)})
    assert decision.task == "c"
    assert [decision.probabilities[k] for k in "abc"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert decision.margin == pytest.approx(1 / 6)


def test_route_single_candidate_margin_is_one():
    decision = route({"only": 0.3}, min_margin=1.0)
    assert decision.task == "only" and decision.margin == 1.0 and decision.probabilities == {"only": 1.0}


def test_route_refuses_low_margin_and_names_the_top_two():
    scores = {"a": 0.0, "b": math.log(2), "c": math.log(3)}
    expected = r"'c' \(p=0.500\) leads 'b' \(p=0.333\) by margin 0.167 < min_margin 0.200"
    with pytest.raises(RouterRefused, match=expected) as err:
        route(scores, min_margin=0.2)
    assert err.value.decision.scores == scores  # the caller can still log what was seen
    assert route(scores, min_margin=0.1).task == "c"


def test_route_pin_bypasses_margin_but_logs_scores(caplog):
    scores = {"a": 0.0, "b": math.log(2), "c": math.log(3)}
    with caplog.at_level(logging.INFO, logger="armada.router"):
        decision = route(scores, pinned="a", min_margin=0.9)
    assert decision.task == "a" and decision.pinned
    assert decision.margin == pytest.approx(1 / 6)  # still computed from the scores
    assert "pinned=True" in caplog.text and "best=c" in caplog.text and "scores={a: 0" in caplog.text
    with pytest.raises(ValueError, match=r"pinned task 'zzz' is not a candidate; candidates: \['a', 'b', 'c'\]"):
        route(scores, pinned="zzz")


def test_route_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        route({})
    with pytest.raises(ValueError, match="score for task 'a' is nan"):
        route({"a": float("nan"), "b": 0.0})
    with pytest.raises(ValueError, match="temperature"):
        route({"a": 1.0}, temperature=0.0)


def test_decision_converts_to_policy_route_result():
    result = route({"a": 1.0, "b": 0.0}).as_route_result()
    assert result.task == "a" and result.margin == pytest.approx(math.tanh(0.5))


# --------------------------------------------------------------------------- RouterSubspaces


def test_subspaces_from_merged_head():
    head = {"model.gate.gate.0.routers.0": basis(4, 0, 1).bfloat16(), "model.gate.gate.1.routers.0": basis(4, 2, 3),
            "model.gate.gate.0.routers.1": basis(4, 2, 3), "model.gate.gate.1.routers.1": basis(4, 0, 1),
            "model.fc2.experts.0.weight": torch.zeros(2, 4)}
    subspaces = RouterSubspaces.from_head(head)
    assert len(subspaces) == 2
    assert subspaces.adapter[0].dtype == torch.float32
    assert torch.equal(subspaces.task[1], basis(4, 0, 1))
    del head["model.gate.gate.1.routers.1"]
    with pytest.raises(ValueError, match="gate 1: \\[0\\]"):
        RouterSubspaces.from_head(head)


# --------------------------------------------------------------------------- Router, end to end

DIM = 8
TASKS = ["spatial", "object"]


def constructed_case():
    """A one-matrix "VLM" whose weights follow the mask, and orthogonal router subspaces.

    Task 0 writes input direction e2 into output e0 (tau_0 = 4 e0 e2^T); task 1 writes e6 into e4
    (tau_1 = 4 e4 e6^T). TALL masks keep each task's own entry. Router subspaces: task 0 span(e0, e1),
    task 1 span(e4, e5) on both branches.
    """
    base = {"w": torch.zeros(DIM, DIM)}
    tau0, tau1 = {"w": torch.zeros(DIM, DIM)}, {"w": torch.zeros(DIM, DIM)}
    tau0["w"][0, 2] = 4.0
    tau1["w"][4, 6] = 4.0
    tau_merge = task_arithmetic([tau0, tau1])
    masks = tall_masks([tau0, tau1], tau_merge)
    subspaces = RouterSubspaces(adapter=(basis(DIM, 0, 1), basis(DIM, 4, 5)), task=(basis(DIM, 0, 1), basis(DIM, 4, 5)))
    return base, tau_merge, masks, subspaces


def make_router(token: torch.Tensor, min_margin: float = 0.0):
    base, tau_merge, masks, subspaces = constructed_case()
    weights = materialize(base, tau_merge)  # the single preallocated weight set
    pointer = weights["w"].data_ptr()
    calls = []

    def hidden_for(m: int):
        calls.append(m)
        materialize(base, tau_merge, masks[m], out=weights)  # swap masks in place
        assert weights["w"].data_ptr() == pointer
        action = token.expand(3, DIM) @ weights["w"].T  # Q = 3
        task = token.expand(5, DIM) @ weights["w"].T  # T = 5
        return action, task

    return Router(TASKS, subspaces, hidden_for, min_margin=min_margin), calls


def test_router_picks_the_task_whose_subspace_holds_the_hidden_states():
    token = 2.0 * torch.eye(DIM)[6]  # input along e6: only task 1's weights respond
    router, calls = make_router(token, min_margin=0.5)
    decision = router.route()
    # candidate 0: W_0 x = 4 e0 (e2 . x) = 0 -> score 0
    # candidate 1: W_1 x = 4 * 2 e4 = 8 e4, in span(e4, e5) -> score 8 on both branches
    assert decision.scores == {"spatial": pytest.approx(0.0), "object": pytest.approx(8.0)}
    assert decision.task == "object"
    # p_object = e^8 / (1 + e^8); margin = tanh(4) ~ 0.9993
    assert decision.margin == pytest.approx(math.tanh(4.0))
    assert calls == [0, 1]
    assert set(decision.timings) == set(TASKS) and all(s >= 0 for s in decision.timings.values())


def test_router_refuses_when_hidden_states_are_split_between_tasks():
    token = 2.0 * torch.eye(DIM)[2] + 2.05 * torch.eye(DIM)[6]  # half for each task, slightly more for task 1
    router, _ = make_router(token, min_margin=0.25)
    # scores 4 * 2 = 8 (task 0) and 4 * 2.05 = 8.2 (task 1): margin tanh(0.1) ~ 0.0997 < 0.25
    expected = r"'object' .* leads 'spatial' .* by margin 0.100 < min_margin 0.250"
    with pytest.raises(RouterRefused, match=expected) as err:
        router.route()
    assert err.value.decision.scores == {"spatial": pytest.approx(8.0), "object": pytest.approx(8.2)}
    assert err.value.decision.margin == pytest.approx(math.tanh(0.1), abs=1e-6)
    # the operator can pin past the refusal; every candidate is still scored
    decision = router.route(pinned="spatial")
    assert decision.task == "spatial" and decision.pinned and set(decision.scores) == set(TASKS)


def test_router_candidates_and_pins_are_checked():
    router, calls = make_router(torch.eye(DIM)[6])
    assert router.route(candidates=["object"]).margin == 1.0 and calls == [1]
    with pytest.raises(ValueError, match="pinned task 'spatial' is not a candidate"):
        router.route(pinned="spatial", candidates=["object"])
    with pytest.raises(ValueError, match="unknown candidate"):
        router.route(candidates=["libero_10"])
    with pytest.raises(ValueError, match="3 task names for 2 router subspaces"):
        Router(["a", "b", "c"], router.subspaces, router.hidden_for)
