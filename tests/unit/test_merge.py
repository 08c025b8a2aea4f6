"""Merging math on tiny hand-computed state dicts (runtime.model.merge)."""

import pytest

torch = pytest.importorskip("torch")

from armada.runtime.model.merge import (  # noqa: E402
    MergeError,
    average_heads,
    build_moe_head,
    capvector,
    materialize,
    router_subspaces,
    stack_experts,
    tall_masks,
    task_arithmetic,
    task_vectors,
    ties_merge,
    ties_tensor,
    top_right_singular_vectors,
    trim_top_k,
)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------- task vectors


def test_task_vectors_subtract_base_key_by_key():
    base = {"w": t([[1, 2, 3], [4, 5, 6]]), "b": t([10, 20])}
    ft = {"w": t([[2, 2, 2], [4.5, 5, 6]]), "b": t([9, 22])}
    calls = []
    (tau,) = task_vectors(base, [ft], progress=lambda done, total, key: calls.append((done, total, key)))
    # [[2-1, 2-2, 2-3], [4.5-4, 5-5, 6-6]] and [9-10, 22-20]
    assert torch.equal(tau["w"], t([[1, 0, -1], [0.5, 0, 0]]))
    assert torch.equal(tau["b"], t([-1, 2]))
    assert calls == [(1, 2, "w"), (2, 2, "b")]


def test_task_vectors_keep_dtype():
    base = {"w": t([1.0, 2.0], torch.bfloat16)}
    (tau,) = task_vectors(base, [{"w": t([1.5, 1.0], torch.bfloat16)}])
    assert tau["w"].dtype == torch.bfloat16 and torch.equal(tau["w"], t([0.5, -1.0], torch.bfloat16))


def test_task_vectors_name_the_mismatch():
    base = {"w": t([[1, 2, 3], [4, 5, 6]]), "b": t([1, 2])}
    with pytest.raises(MergeError, match=r"finetuned\[1\].*missing 'b'"):
        task_vectors(base, [dict(base), {"w": base["w"]}])
    with pytest.raises(MergeError, match=r"extra 'c'"):
        task_vectors(base, [{**base, "c": t([0])}])
    with pytest.raises(MergeError, match=r"w: shape \(3, 2\) in finetuned\[0\] != \(2, 3\) in base"):
        task_vectors(base, [{"w": base["w"].T.contiguous(), "b": base["b"]}])
    with pytest.raises(MergeError, match="floating-point"):
        task_vectors({"i": torch.tensor([1])}, [{"i": torch.tensor([2])}])


# --------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_sums_and_scales():
    tau1 = {"w": t([[1, -2, 0], [3, 0.5, -1]])}
    tau2 = {"w": t([[2, 1, 0], [-3, 0.5, 4]])}
    # sum = [[3, -1, 0], [0, 1, 3]]
    assert torch.equal(task_arithmetic([tau1, tau2])["w"], t([[3, -1, 0], [0, 1, 3]]))
    # times 0.5
    assert torch.equal(task_arithmetic([tau1, tau2], scaling=0.5)["w"], t([[1.5, -0.5, 0], [0, 0.5, 1.5]]))


# --------------------------------------------------------------------------- TIES


def test_trim_keeps_top_fraction_by_magnitude():
    x = t([[4, -1, 2], [0.5, -3, 1.5]])
    # 6 entries, fraction 0.5 -> keep 3: magnitudes 4, 3, 2 survive
    assert torch.equal(trim_top_k(x, 0.5), t([[4, 0, 2], [0, -3, 0]]))
    assert torch.equal(trim_top_k(x, 1.0), x)
    assert torch.equal(trim_top_k(x, 0.0), torch.zeros(2, 3))
    # ceil(0.1 * 6) = 1: the single largest magnitude
    assert torch.equal(trim_top_k(x, 0.1), t([[4, 0, 0], [0, 0, 0]]))
    # a tie at the threshold keeps both entries (no order-dependent choice)
    assert torch.equal(trim_top_k(t([3, -3, 1, 0]), 0.25), t([3, -3, 0, 0]))
    with pytest.raises(MergeError, match="top_k_fraction"):
        trim_top_k(x, 1.5)


def test_ties_elects_sign_by_mass_not_by_count():
    # No trimming, 3 tasks, 3 entries.
    tau1 = {"w": t([5, 1, 2])}
    tau2 = {"w": t([-1, 1, -2])}
    tau3 = {"w": t([-1, -3, 0])}
    # entry 0: sum 5-1-1 = 3 -> "+" although 2 of 3 tasks are negative; agreeing: {5} -> 5
    # entry 1: sum 1+1-3 = -1 -> "-" although 2 of 3 tasks are positive; agreeing: {-3} -> -3
    # entry 2: sum 2-2+0 = 0 -> full conflict: no sign, no agreeing task -> 0
    merged = ties_merge([tau1, tau2, tau3], top_k_fraction=1.0)
    assert torch.equal(merged["w"], t([5, -3, 0]))
    # task arithmetic would give [3, -1, 0]: the election changes the result
    assert torch.equal(task_arithmetic([tau1, tau2, tau3])["w"], t([3, -1, 0]))


def test_ties_full_conflict_is_zero():
    # every entry cancels exactly: elected sign 0 everywhere, nothing agrees
    merged = ties_merge([{"w": t([[1, -2, 3]])}, {"w": t([[-1, 2, -3]])}], top_k_fraction=1.0)
    assert torch.equal(merged["w"], torch.zeros(1, 3))


def test_ties_trim_elect_disjoint_mean():
    tau1 = {"w": t([[4, -1, 2], [0.5, -3, 1.5]])}  # trimmed to top 3: [[4, 0, 2], [0, -3, 0]]
    tau2 = {"w": t([[-1, 5, -0.5], [2, 1, -6]])}  # trimmed:          [[0, 5, 0], [2, 0, -6]]
    tau3 = {"w": t([[-2, -4, 3], [-1, 0.25, 0.5]])}  # trimmed:       [[-2, -4, 3], [0, 0, 0]]
    # sum of trimmed = [[2, 1, 5], [2, -3, -6]] -> signs [[+, +, +], [+, -, -]]
    # (0,0): agreeing {4} (the -2 of task 3 disagrees)        -> 4
    # (0,1): agreeing {5} (the -4 of task 3 disagrees)        -> 5
    # (0,2): agreeing {2, 3}                                  -> mean 2.5
    # (1,0): {2} -> 2;  (1,1): {-3} -> -3;  (1,2): {-6} -> -6
    taus = [tau1, tau2, tau3]
    assert torch.equal(ties_merge(taus, top_k_fraction=0.5)["w"], t([[4, 5, 2.5], [2, -3, -6]]))
    assert torch.equal(ties_merge(taus, top_k_fraction=0.5, scaling=0.5)["w"], t([[2, 2.5, 1.25], [1, -1.5, -3]]))
    # disjoint sum instead of mean: (0,2) becomes 2 + 3 = 5
    assert torch.equal(ties_merge(taus, top_k_fraction=0.5, aggregate="sum")["w"], t([[4, 5, 5], [2, -3, -6]]))


def test_ties_returns_input_dtype():
    merged = ties_tensor([t([1, -2], torch.bfloat16), t([3, -2], torch.bfloat16)], top_k_fraction=1.0)
    # agreeing means: (1+3)/2 = 2, (-2-2)/2 = -2
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, t([2, -2], torch.bfloat16))


# --------------------------------------------------------------------------- TALL masks


def test_tall_masks_lambda_0_6_with_strict_boundary():
    tau1 = {"w": t([[3, 1, -2], [0, 4, 1]])}
    tau2 = {"w": t([[5, -1, -2], [0, -4, 2]])}
    tau_merge = task_arithmetic([tau1, tau2])  # [[8, 0, -4], [0, 0, 3]]
    # the boundary below is an exact float32 equality: 0.6 * 5 rounds to 3.0
    assert (torch.tensor(5.0) * 0.6).item() == 3.0
    s1, s2 = tall_masks([tau1, tau2], tau_merge, lam=0.6)
    # S_1 = |tau1| > 0.6 |merge - tau1|:
    #   3 > 0.6*5 = 3   False (equality: strict >)   1 > 0.6*1 = 0.6  True    2 > 0.6*2 = 1.2  True
    #   0 > 0.6*0 = 0   False (nothing to keep)      4 > 0.6*4 = 2.4  True    1 > 0.6*2 = 1.2  False
    assert torch.equal(s1["w"], torch.tensor([[False, True, True], [False, True, False]]))
    # S_2 = |tau2| > 0.6 |merge - tau2|:
    #   5 > 0.6*3 = 1.8 True    1 > 0.6  True    2 > 1.2  True
    #   0 > 0       False       4 > 2.4  True    2 > 0.6*1 = 0.6  True
    assert torch.equal(s2["w"], torch.tensor([[True, True, True], [False, True, True]]))
    assert s1["w"].dtype == torch.bool


def test_tall_masks_need_matching_keys():
    with pytest.raises(MergeError, match="tau_merge"):
        tall_masks([{"w": t([1])}], {"v": t([1])})


# --------------------------------------------------------------------------- materialize

BASE = {"w": t([[1, 2, 3], [4, 5, 6]]), "b": t([10, 20])}
TAU_MERGE = {"w": t([[8, 0, -4], [0, 0, 3]])}  # "b" is not merged
S1 = {"w": torch.tensor([[False, True, True], [False, True, False]])}
S2 = {"w": torch.tensor([[True, True, True], [False, True, True]])}


def test_materialize_without_mask_adds_tau_merge():
    weights = materialize(BASE, TAU_MERGE)
    # [[1+8, 2+0, 3-4], [4+0, 5+0, 6+3]]
    assert torch.equal(weights["w"], t([[9, 2, -1], [4, 5, 9]]))
    assert torch.equal(weights["b"], t([10, 20]))  # theta_0
    weights["b"][0] = -1  # a copy, not an alias of the base
    assert BASE["b"][0] == 10


def test_materialize_with_mask_adds_only_masked_entries():
    # S1 keeps (0,1), (0,2), (1,1): [[1, 2+0, 3-4], [4, 5+0, 6]]
    assert torch.equal(materialize(BASE, TAU_MERGE, S1)["w"], t([[1, 2, -1], [4, 5, 6]]))
    # S2 keeps everything tau_merge changes: same as no mask here
    assert torch.equal(materialize(BASE, TAU_MERGE, S2)["w"], t([[9, 2, -1], [4, 5, 9]]))


def test_materialize_in_place_reuses_one_weight_set():
    out = materialize(BASE, TAU_MERGE)
    pointers = {key: tensor.data_ptr() for key, tensor in out.items()}
    for mask, expected in ((S1, [[1, 2, -1], [4, 5, 6]]), (S2, [[9, 2, -1], [4, 5, 9]]), (S1, [[1, 2, -1], [4, 5, 6]])):
        weights = materialize(BASE, TAU_MERGE, mask, out=out)
        assert {key: tensor.data_ptr() for key, tensor in weights.items()} == pointers
        assert all(weights[key] is out[key] for key in weights)
        assert torch.equal(out["w"], t(expected))
    assert torch.equal(BASE["w"], t([[1, 2, 3], [4, 5, 6]]))  # base untouched


def test_materialize_into_lower_precision_out():
    out = {"w": torch.empty(2, 3, dtype=torch.bfloat16), "b": torch.empty(2, dtype=torch.bfloat16)}
    materialize(BASE, TAU_MERGE, S1, out=out)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"].float(), t([[1, 2, -1], [4, 5, 6]]))


def test_materialize_errors_name_the_key():
    with pytest.raises(MergeError, match="w: mask must be bool"):
        materialize(BASE, TAU_MERGE, {"w": torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(MergeError, match="mask has keys tau_merge lacks: 'b'"):
        materialize(BASE, TAU_MERGE, {"b": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(MergeError, match="out lacks keys of the base: 'b'"):
        materialize(BASE, TAU_MERGE, out={"w": torch.empty(2, 3)})
    with pytest.raises(MergeError, match="tau_merge has keys the base lacks: 'z'"):
        materialize(BASE, {"z": t([1])})


# --------------------------------------------------------------------------- CapVector


def test_capvector_adds_scaled_capability_vector():
    pretrained = {"w": t([[1, 2, 3], [4, 5, 6]])}
    aux = {"w": t([[2, 2, 2], [2, 2, 2]])}
    std = {"w": t([[1, 3, 2], [2, 0, 2]])}
    # aux - std = [[1, -1, 0], [0, 2, 0]]; times 0.5 = [[0.5, -0.5, 0], [0, 1, 0]]
    assert torch.equal(capvector(pretrained, aux, std, alpha=0.5)["w"], t([[1.5, 1.5, 3], [4, 6, 6]]))
    with pytest.raises(MergeError, match="std_model.*missing 'w'"):
        capvector(pretrained, aux, {"v": t([0])}, alpha=1.0)


# --------------------------------------------------------------------------- action heads


def test_average_heads_plain_and_weighted():
    h1 = {"a": t([[1, 2, 3], [4, 5, 6]])}
    h2 = {"a": t([[3, 2, 1], [0, 1, 2]])}
    assert torch.equal(average_heads([h1, h2])["a"], t([[2, 2, 2], [2, 3, 4]]))
    # weights 3:1 -> 0.75 h1 + 0.25 h2
    assert torch.equal(average_heads([h1, h2], weights=[3, 1])["a"], t([[1.5, 2, 2.5], [3, 4, 5]]))
    with pytest.raises(MergeError, match="weights"):
        average_heads([h1, h2], weights=[1, -1])


def test_stack_experts_places_head_m_at_expert_m():
    heads = [{"model.fc2.weight": t([[1.0]])}, {"model.fc2.weight": t([[2.0]])}]
    stacked = stack_experts(heads, {"model.fc2.weight": "model.fc2.experts.{m}.weight"})
    assert stacked == {"model.fc2.experts.0.weight": stacked["model.fc2.experts.0.weight"],
                       "model.fc2.experts.1.weight": stacked["model.fc2.experts.1.weight"]}
    assert stacked["model.fc2.experts.0.weight"].item() == 1.0 and stacked["model.fc2.experts.1.weight"].item() == 2.0


D, A, BLOCKS = 4, 2, 3
LINEARS = ["q_proj_adapter", "k_adapter", "v_adapter", "q_proj_task", "k_task", "v_task", "o_proj"]


def single_task_head(seed: int) -> dict:
    """A single-task L1RegressionActionHead state dict (layout section 1d) with D=4, A=2, 3 blocks."""
    gen = torch.Generator().manual_seed(seed)
    head = {
        "model.layer_norm1.weight": torch.randn(A * D, generator=gen),
        "model.layer_norm1.bias": torch.randn(A * D, generator=gen),
        "model.fc1.weight": torch.randn(D, A * D, generator=gen),
        "model.fc1.bias": torch.randn(D, generator=gen),
    }
    for i in range(BLOCKS):
        p = f"model.mlp_resnet_blocks.{i}"
        head[f"{p}.ffn.0.weight"] = torch.randn(D, generator=gen)  # LayerNorm
        head[f"{p}.ffn.0.bias"] = torch.randn(D, generator=gen)
        head[f"{p}.ffn.1.weight"] = torch.randn(D, D, generator=gen)  # Linear
        head[f"{p}.ffn.1.bias"] = torch.randn(D, generator=gen)
        for name in LINEARS:
            head[f"{p}.{name}.weight"] = torch.randn(D, D, generator=gen)
            head[f"{p}.{name}.bias"] = torch.randn(D, generator=gen)
        head[f"{p}.gating_factor"] = torch.full((1,), float(10 * seed + i))
    head.update({
        "model.layer_norm2.weight": torch.randn(D, generator=gen),
        "model.layer_norm2.bias": torch.randn(D, generator=gen),
        "model.fc2.weight": torch.randn(A, D, generator=gen),
        "model.fc2.bias": torch.randn(A, generator=gen),
    })
    return head


def test_build_moe_head_exact_keys_and_values():
    heads = [single_task_head(1), single_task_head(2)]
    merged = build_moe_head(heads, router_k=2)  # 3 blocks: shared 0, 1; expert block 2; routers from block 1

    expected = {"model.layer_norm1.weight", "model.layer_norm1.bias", "model.fc1.weight", "model.fc1.bias",
                "model.mlp_resnet_moe_blocks.0.gating_factor", "model.router_layer_idx"}
    for i in (0, 1):
        expected |= {f"model.mlp_resnet_blocks.{i}.{n}" for n in
                     ["ffn.0.weight", "ffn.0.bias", "ffn.1.weight", "ffn.1.bias", "gating_factor"]}
        expected |= {f"model.mlp_resnet_blocks.{i}.{name}.{p}" for name in LINEARS for p in ("weight", "bias")}
    for m in (0, 1):
        for module in ["ffn.0", "ffn.1"] + LINEARS:
            expected |= {f"model.mlp_resnet_moe_blocks.0.{module}.experts.{m}.weight",
                         f"model.mlp_resnet_moe_blocks.0.{module}.experts.{m}.bias"}
        expected |= {f"model.layer_norm2.experts.{m}.weight", f"model.layer_norm2.experts.{m}.bias",
                     f"model.fc2.experts.{m}.weight", f"model.fc2.experts.{m}.bias",
                     f"model.gate.gate.0.routers.{m}", f"model.gate.gate.1.routers.{m}"}
    assert set(merged) == expected
    # a few spelled out in full, as the loader will look for them
    for key in ("model.mlp_resnet_moe_blocks.0.ffn.0.experts.1.weight",
                "model.mlp_resnet_moe_blocks.0.v_task.experts.0.weight",
                "model.layer_norm2.experts.1.bias", "model.fc2.experts.0.weight", "model.gate.gate.1.routers.1"):
        assert key in merged

    # shared: plain average; experts: head m's block 2 / output layers; gates concatenated [M]
    key = "model.mlp_resnet_blocks.1.v_task.weight"
    assert torch.allclose(merged[key], (heads[0][key] + heads[1][key]) / 2)
    assert torch.allclose(merged["model.fc1.bias"], (heads[0]["model.fc1.bias"] + heads[1]["model.fc1.bias"]) / 2)
    assert torch.equal(merged["model.mlp_resnet_moe_blocks.0.v_task.experts.1.weight"],
                       heads[1]["model.mlp_resnet_blocks.2.v_task.weight"])
    assert torch.equal(merged["model.mlp_resnet_moe_blocks.0.ffn.0.experts.0.bias"],
                       heads[0]["model.mlp_resnet_blocks.2.ffn.0.bias"])
    assert torch.equal(merged["model.fc2.experts.1.weight"], heads[1]["model.fc2.weight"])
    # gating factors of block 2: 10*1+2 = 12 and 10*2+2 = 22
    assert torch.equal(merged["model.mlp_resnet_moe_blocks.0.gating_factor"], t([12, 22]))
    assert merged["model.router_layer_idx"].dtype == torch.long and merged["model.router_layer_idx"].item() == 1
    assert merged["model.gate.gate.0.routers.1"].shape == (2, D)


def test_build_moe_head_rejects_unknown_keys():
    head = single_task_head(1)
    head["model.film_gen.weight"] = torch.zeros(1)
    with pytest.raises(MergeError, match="unexpected key 'model.film_gen.weight'"):
        build_moe_head([head], router_k=2)


# --------------------------------------------------------------------------- router subspaces


def planted_weight(out_features: int, right: torch.Tensor, singular: list[float], seed: int) -> torch.Tensor:
    """W = U diag(s) R^T with R = ``right`` (orthogonal, [in, in]) and a random orthonormal U."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, len(singular), generator=gen))
    return u @ torch.diag(t(singular)) @ right[:, : len(singular)].T


def rotation_5() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen))
    return q


def test_top_right_singular_vectors_live_in_the_input_space():
    right = rotation_5()
    # out=3, in=5; singular values 10, 5, 0.1: the dominant right subspace is span(R[:,0], R[:,1])
    weight = planted_weight(3, right, [10.0, 5.0, 0.1], seed=1)
    v = top_right_singular_vectors(weight, 2)
    assert v.shape == (2, 5)  # [k, in], not [k, out]
    assert torch.allclose(v @ v.T, torch.eye(2), atol=1e-5)
    # each planted direction projects with its full length; the weak one almost not at all
    for j in (0, 1):
        assert torch.linalg.norm(v @ right[:, j]).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.linalg.norm(v @ right[:, 2]).item() == pytest.approx(0.0, abs=1e-5)
    # rows are the planted vectors themselves up to sign (distinct singular values)
    for j in (0, 1):
        assert abs(torch.dot(v[j], right[:, j]).item()) == pytest.approx(1.0, abs=1e-5)


def test_singular_vector_signs_are_deterministic():
    weight = planted_weight(5, rotation_5(), [9.0, 4.0, 1.0, 0.5, 0.25], seed=2)
    v = top_right_singular_vectors(weight, 3)
    # -W has the same singular vectors with arbitrary signs: normalization gives identical rows
    assert torch.allclose(top_right_singular_vectors(-weight, 3), v, atol=1e-5)
    assert torch.equal(top_right_singular_vectors(weight, 3), v)
    pivots = v.abs().argmax(dim=1)
    assert (v[torch.arange(3), pivots] > 0).all()


def test_router_subspaces_keys_and_planted_subspaces():
    right = torch.eye(D)
    heads = []
    for m in range(2):
        head = single_task_head(m)
        # task 0 amplifies inputs e0, e1; task 1 amplifies e2, e3 (v_adapter); v_task the reverse
        first, second = (right, right.flip(1)) if m == 0 else (right.flip(1), right)
        head["model.mlp_resnet_blocks.1.v_adapter.weight"] = planted_weight(D, first, [8, 6, 0.1, 0.05], seed=m)
        head["model.mlp_resnet_blocks.1.v_task.weight"] = planted_weight(D, second, [8, 6, 0.1, 0.05], seed=10 + m)
        heads.append(head)
    routers = router_subspaces(heads, layer=1, k=2)
    assert set(routers) == {"model.gate.gate.0.routers.0", "model.gate.gate.0.routers.1",
                            "model.gate.gate.1.routers.0", "model.gate.gate.1.routers.1"}
    # with standard basis vectors planted, the sign rule makes the rows exactly +e_i (up to rounding)
    assert torch.allclose(routers["model.gate.gate.0.routers.0"], t([[1, 0, 0, 0], [0, 1, 0, 0]]), atol=1e-5)
    assert torch.allclose(routers["model.gate.gate.0.routers.1"], t([[0, 0, 0, 1], [0, 0, 1, 0]]), atol=1e-5)
    assert torch.allclose(routers["model.gate.gate.1.routers.0"], t([[0, 0, 0, 1], [0, 0, 1, 0]]), atol=1e-5)
    assert torch.allclose(routers["model.gate.gate.1.routers.1"], t([[1, 0, 0, 0], [0, 1, 0, 0]]), atol=1e-5)
    # stored in the weight dtype by default
    bf16 = router_subspaces([{k: v.bfloat16() for k, v in heads[0].items()}], layer=1, k=2)
    assert bf16["model.gate.gate.0.routers.0"].dtype == torch.bfloat16
