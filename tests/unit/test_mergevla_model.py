"""The MergeVLA reference model: key layout (docs/mergevla-layout.md section 1) and forward pass
(section 2), checked on a tiny float32 instance, plus the real LIBERO layout on the meta device."""

from __future__ import annotations

import copy
import json
import math

import pytest

for _needed in ("torch", "timm", "transformers"):  # the 'model' extra
    pytest.importorskip(_needed, reason="needs the model extra: pip install -e '.[model]'")

import torch  # noqa: E402
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from armada.runtime.model.mergevla import (
    BLOCK_LINEARS,
    ActionHead,
    MergeVLAConfig,
    MergeVLAModel,
    StateDictMismatch,
    apply_head_rope,
    randomize_,
    rope_cos_sin,
    second_to_last_patch_tokens,
    strip_ddp_prefix,
)

C = MergeVLAConfig.tiny(num_tasks=2)
BATCH, PROMPT_LEN = 2, 5


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model() -> MergeVLAModel:
    return randomize_(MergeVLAModel(C), seed=0).eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (BATCH, C.num_images, 3, C.image_size, C.image_size)
    return {
        "pixels_dino": torch.randn(shape, generator=g),
        "pixels_siglip": torch.randn(shape, generator=g),
        "prompt_ids": torch.randint(0, C.llm.vocab, (BATCH, PROMPT_LEN), generator=g),
        "proprio_normalized": torch.rand((BATCH, C.proprio_dim), generator=g) * 2 - 1,
    }


@pytest.fixture(scope="module")
def head_inputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        task, action = model.head_inputs(inputs["pixels_dino"], inputs["pixels_siglip"], inputs["prompt_ids"])
        proprio = model.proprio_projector(inputs["proprio_normalized"])
    return task, action, proprio


# --------------------------------------------------------------------------- layout formulas (section 1)


def expected_vla_shapes(c: MergeVLAConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    patches, p = c.patches_per_image, c.patch_size

    def vit_block(prefix: str, width: int, hidden: int, layer_scale: bool) -> None:
        shapes.update({
            f"{prefix}.norm1.weight": (width,), f"{prefix}.norm1.bias": (width,),
            f"{prefix}.attn.qkv.weight": (3 * width, width), f"{prefix}.attn.qkv.bias": (3 * width,),
            f"{prefix}.attn.proj.weight": (width, width), f"{prefix}.attn.proj.bias": (width,),
            f"{prefix}.norm2.weight": (width,), f"{prefix}.norm2.bias": (width,),
            f"{prefix}.mlp.fc1.weight": (hidden, width), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (width, hidden), f"{prefix}.mlp.fc2.bias": (width,),
        })
        if layer_scale:
            shapes[f"{prefix}.ls1.scale_factor"] = (width,)
            shapes[f"{prefix}.ls2.scale_factor"] = (width,)

    d, dp = c.dino, "vision_backbone.featurizer"
    shapes.update({
        f"{dp}.cls_token": (1, 1, d.width), f"{dp}.reg_token": (1, d.reg_tokens, d.width),
        f"{dp}.pos_embed": (1, patches, d.width),
        f"{dp}.patch_embed.proj.weight": (d.width, 3, p, p), f"{dp}.patch_embed.proj.bias": (d.width,),
        f"{dp}.norm.weight": (d.width,), f"{dp}.norm.bias": (d.width,),
    })
    for i in range(d.depth):
        vit_block(f"{dp}.blocks.{i}", d.width, int(d.width * d.mlp_ratio), layer_scale=True)

    s, sp = c.siglip, "vision_backbone.fused_featurizer"
    shapes.update({
        f"{sp}.pos_embed": (1, patches, s.width),
        f"{sp}.patch_embed.proj.weight": (s.width, 3, p, p), f"{sp}.patch_embed.proj.bias": (s.width,),
        f"{sp}.norm.weight": (s.width,), f"{sp}.norm.bias": (s.width,),
        f"{sp}.attn_pool.latent": (1, 1, s.width),
        f"{sp}.attn_pool.q.weight": (s.width, s.width), f"{sp}.attn_pool.q.bias": (s.width,),
        f"{sp}.attn_pool.kv.weight": (2 * s.width, s.width), f"{sp}.attn_pool.kv.bias": (2 * s.width,),
        f"{sp}.attn_pool.proj.weight": (s.width, s.width), f"{sp}.attn_pool.proj.bias": (s.width,),
        f"{sp}.attn_pool.norm.weight": (s.width,), f"{sp}.attn_pool.norm.bias": (s.width,),
        f"{sp}.attn_pool.mlp.fc1.weight": (s.mlp, s.width), f"{sp}.attn_pool.mlp.fc1.bias": (s.mlp,),
        f"{sp}.attn_pool.mlp.fc2.weight": (s.width, s.mlp), f"{sp}.attn_pool.mlp.fc2.bias": (s.width,),
    })
    for i in range(s.depth):
        vit_block(f"{sp}.blocks.{i}", s.width, s.mlp, layer_scale=False)

    f, dim = c.vision_dim, c.llm.hidden
    shapes.update({
        "projector.fc1.weight": (4 * f, f), "projector.fc1.bias": (4 * f,),
        "projector.fc2.weight": (dim, 4 * f), "projector.fc2.bias": (dim,),
        "projector.fc3.weight": (dim, dim), "projector.fc3.bias": (dim,),
        "action_queries.weight": (c.num_action_queries, dim),
        "language_model.model.embed_tokens.weight": (c.llm.vocab, dim),
        "language_model.model.norm.weight": (dim,),
    })
    kv = c.llm.kv_heads * (dim // c.llm.heads)
    for i in range(c.llm.layers):
        lp = f"language_model.model.layers.{i}"
        shapes.update({
            f"{lp}.self_attn.q_proj.weight": (dim, dim), f"{lp}.self_attn.q_proj.bias": (dim,),
            f"{lp}.self_attn.k_proj.weight": (kv, dim), f"{lp}.self_attn.k_proj.bias": (kv,),
            f"{lp}.self_attn.v_proj.weight": (kv, dim), f"{lp}.self_attn.v_proj.bias": (kv,),
            f"{lp}.self_attn.o_proj.weight": (dim, dim),
            f"{lp}.mlp.gate_proj.weight": (c.llm.intermediate, dim),
            f"{lp}.mlp.up_proj.weight": (c.llm.intermediate, dim),
            f"{lp}.mlp.down_proj.weight": (dim, c.llm.intermediate),
            f"{lp}.input_layernorm.weight": (dim,), f"{lp}.post_attention_layernorm.weight": (dim,),
        })
    return shapes


def expected_head_shapes(c: MergeVLAConfig) -> dict[str, tuple[int, ...]]:
    dim, a, experts = c.llm.hidden, c.action_dim, c.num_tasks
    shapes: dict[str, tuple[int, ...]] = {
        "model.layer_norm1.weight": (a * dim,), "model.layer_norm1.bias": (a * dim,),
        "model.fc1.weight": (dim, a * dim), "model.fc1.bias": (dim,),
        "model.mlp_resnet_moe_blocks.0.gating_factor": (experts,),
        "model.router_layer_idx": (),
    }
    for i in range(c.llm.layers - 1):
        bp = f"model.mlp_resnet_blocks.{i}"
        shapes.update({f"{bp}.ffn.0.weight": (dim,), f"{bp}.ffn.0.bias": (dim,),
                       f"{bp}.ffn.1.weight": (dim, dim), f"{bp}.ffn.1.bias": (dim,),
                       f"{bp}.gating_factor": (1,)})
        for name in BLOCK_LINEARS:
            shapes.update({f"{bp}.{name}.weight": (dim, dim), f"{bp}.{name}.bias": (dim,)})
    for m in range(experts):
        ep = "model.mlp_resnet_moe_blocks.0"
        shapes.update({f"{ep}.ffn.0.experts.{m}.weight": (dim,), f"{ep}.ffn.0.experts.{m}.bias": (dim,),
                       f"{ep}.ffn.1.experts.{m}.weight": (dim, dim), f"{ep}.ffn.1.experts.{m}.bias": (dim,)})
        for name in BLOCK_LINEARS:
            shapes.update({f"{ep}.{name}.experts.{m}.weight": (dim, dim), f"{ep}.{name}.experts.{m}.bias": (dim,)})
        shapes.update({
            f"model.layer_norm2.experts.{m}.weight": (dim,), f"model.layer_norm2.experts.{m}.bias": (dim,),
            f"model.fc2.experts.{m}.weight": (a, dim), f"model.fc2.experts.{m}.bias": (a,),
            f"model.gate.gate.0.routers.{m}": (c.router_k, dim),
            f"model.gate.gate.1.routers.{m}": (c.router_k, dim),
        })
    return shapes


def expected_proprio_shapes(c: MergeVLAConfig) -> dict[str, tuple[int, ...]]:
    dim = c.llm.hidden
    return {"fc1.weight": (dim, c.proprio_dim), "fc1.bias": (dim,), "fc2.weight": (dim, dim), "fc2.bias": (dim,)}


def shapes_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_tiny_state_dicts_match_the_layout_formulas_exactly(model):
    assert shapes_of(model.vla_state_dict()) == expected_vla_shapes(C)
    assert shapes_of(model.action_head_state_dict()) == expected_head_shapes(C)
    assert shapes_of(model.proprio_state_dict()) == expected_proprio_shapes(C)


def test_tiny_layout_spot_checks(model):
    vla = model.vla_state_dict()
    assert not any("gamma" in k for k in vla), "timm LayerScale must be stored as scale_factor"
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in vla
    assert "vision_backbone.fused_featurizer.cls_token" not in vla
    assert "language_model.lm_head.weight" not in vla  # tied, dropped as HF save_pretrained does
    assert "language_model.model.layers.0.self_attn.o_proj.bias" not in vla
    head = model.action_head_state_dict()
    last = C.llm.layers - 1
    assert f"model.mlp_resnet_blocks.{last - 1}.v_task.weight" in head
    assert f"model.mlp_resnet_blocks.{last}.v_task.weight" not in head  # the last block is the expert block
    assert "model.mlp_resnet_moe_blocks.1.gating_factor" not in head
    assert f"model.fc2.experts.{C.num_tasks - 1}.weight" in head
    assert f"model.fc2.experts.{C.num_tasks}.weight" not in head
    idx = head["model.router_layer_idx"]
    assert idx.dtype == torch.int64 and idx.item() == C.llm.layers - 2 == C.router_layer_idx
    # RoPE frequencies are computed, never stored
    assert not any("inv_freq" in k for k in list(vla) + list(head))


def test_tiny_model_is_under_8_mb(model):
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert total < 8 * 1024 * 1024, total


@pytest.fixture(scope="module")
def real_on_meta() -> MergeVLAModel:
    with torch.device("meta"):
        return MergeVLAModel(MergeVLAConfig.real_libero(num_tasks=4))


def test_real_libero_layout_matches_the_doc(real_on_meta):
    c = real_on_meta.config
    assert (c.patches_per_image, c.num_image_tokens, c.vision_dim, c.head_dim) == (256, 512, 2176, 112)
    vla = shapes_of(real_on_meta.vla_state_dict())
    head = shapes_of(real_on_meta.action_head_state_dict())
    assert vla == expected_vla_shapes(c)
    assert head == expected_head_shapes(c)
    assert shapes_of(real_on_meta.proprio_state_dict()) == expected_proprio_shapes(c)
    # numbers written out in section 1
    assert vla["vision_backbone.featurizer.pos_embed"] == (1, 256, 1024)
    assert vla["vision_backbone.featurizer.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert vla["vision_backbone.featurizer.blocks.0.mlp.fc1.weight"] == (4096, 1024)
    assert vla["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert vla["vision_backbone.fused_featurizer.blocks.0.attn.qkv.weight"] == (3456, 1152)
    assert vla["projector.fc1.weight"] == (8704, 2176)
    assert vla["projector.fc2.weight"] == (896, 8704)
    assert vla["language_model.model.layers.23.self_attn.k_proj.weight"] == (128, 896)
    assert vla["language_model.model.layers.0.mlp.gate_proj.weight"] == (4864, 896)
    assert vla["language_model.model.embed_tokens.weight"] == (151936, 896)
    assert vla["action_queries.weight"] == (64, 896)
    assert head["model.fc1.weight"] == (896, 7 * 896)
    assert "model.mlp_resnet_blocks.22.v_adapter.weight" in head
    assert "model.mlp_resnet_blocks.23.ffn.0.weight" not in head
    assert head["model.mlp_resnet_moe_blocks.0.v_task.experts.3.weight"] == (896, 896)
    assert head["model.gate.gate.1.routers.3"] == (8, 896)
    assert c.router_layer_idx == 22
    # about 1.25 B VLA parameters (the notes say 1.24 B)
    params = sum(p.numel() for p in real_on_meta.vla.parameters())
    assert 1.2e9 < params < 1.3e9


def test_real_featurizers_match_the_registered_timm_models(real_on_meta):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        dino = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=224)
        siglip = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False, num_classes=0, img_size=224)
    backbone = real_on_meta.vla.vision_backbone
    renamed = {k.replace(".gamma", ".scale_factor"): v for k, v in dino.state_dict().items()}
    assert shapes_of(backbone.featurizer.state_dict()) == shapes_of(renamed)
    assert shapes_of(backbone.fused_featurizer.state_dict()) == shapes_of(siglip.state_dict())


# --------------------------------------------------------------------------- config


def test_config_json_round_trip_and_strictness():
    for config in (C, MergeVLAConfig.real_libero(), MergeVLAConfig.tiny(num_tasks=3, image_size=56)):
        data = json.loads(json.dumps(config.to_dict()))
        assert MergeVLAConfig.from_dict(data) == config
    data = C.to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        MergeVLAConfig.from_dict({**data, "extra": 1})
    with pytest.raises(ValueError, match="missing keys.*chunk"):
        MergeVLAConfig.from_dict({k: v for k, v in data.items() if k != "chunk"})
    with pytest.raises(ValueError, match="llm.layers"):
        MergeVLAConfig.from_dict({**data, "llm": {**data["llm"], "layers": "3"}})
    with pytest.raises(ValueError, match="num_tasks"):
        MergeVLAConfig.from_dict({**data, "num_tasks": True})
    with pytest.raises(ValueError, match="rope_theta"):
        MergeVLAConfig.from_dict({**data, "llm": {**data["llm"], "rope_theta": "1e6"}})
    with pytest.raises(ValueError, match="architecture.dino: expected an object"):
        MergeVLAConfig.from_dict({**data, "dino": [1, 2]})
    with pytest.raises(ValueError, match="head_heads"):
        MergeVLAConfig.tiny(head_heads=5)
    with pytest.raises(ValueError, match="patch_size"):
        MergeVLAConfig.tiny(image_size=30)


# --------------------------------------------------------------------------- VLA pieces


def test_shapes_of_every_piece(model, inputs):
    vla, c = model.vla, C
    image = vla.vision(inputs["pixels_dino"], inputs["pixels_siglip"])
    assert image.shape == (BATCH, c.num_image_tokens, c.llm.hidden)
    embeds = vla.build_inputs_embeds(image, inputs["prompt_ids"])
    length = c.sequence_length(PROMPT_LEN)
    assert length == PROMPT_LEN + c.num_image_tokens + c.num_action_queries + 1
    assert embeds.shape == (BATCH, length, c.llm.hidden)
    hidden = vla.llm_hidden_states(embeds)
    assert hidden.shape == (BATCH, c.llm.layers + 1, length, c.llm.hidden)
    task, action = vla.slice_for_head(hidden, PROMPT_LEN)
    assert task.shape == (BATCH, c.llm.layers + 1, c.num_image_tokens, c.llm.hidden)
    assert action.shape == (BATCH, c.llm.layers + 1, c.num_action_queries, c.llm.hidden)
    actions = model.predict_normalized_actions(**inputs, expert=0)
    assert actions.shape == (BATCH, c.chunk, c.action_dim)
    assert torch.isfinite(actions).all()
    task_last, action_last = model.router_hidden(inputs["pixels_dino"], inputs["pixels_siglip"], inputs["prompt_ids"])
    torch.testing.assert_close(task_last, task[:, c.llm.layers], rtol=0, atol=0)
    torch.testing.assert_close(action_last, action[:, c.llm.layers], rtol=0, atol=0)
    score = model.action_head.router_score(task_last, action_last, 1)
    assert score.shape == (BATCH,)


def test_wrong_shapes_are_refused(model, inputs, head_inputs):
    with pytest.raises(ValueError, match="pixels_dino"):
        model.vla.vision(inputs["pixels_dino"][:, :1], inputs["pixels_siglip"])
    hidden = torch.zeros(1, C.llm.layers + 1, C.sequence_length(PROMPT_LEN), C.llm.hidden)
    with pytest.raises(ValueError, match="prompt_len=4"):
        model.vla.slice_for_head(hidden, PROMPT_LEN - 1)
    task, action, proprio = head_inputs
    with pytest.raises(ValueError, match="proprio_features"):
        model.action_head(task, action, proprio[:, None], 0)
    with pytest.raises(ValueError, match="expert"):
        model.action_head(task, action, proprio, C.num_tasks)


def test_vision_takes_second_to_last_block_without_norm_and_drops_prefix_tokens(model, inputs):
    backbone = model.vla.vision_backbone
    dino_vit, siglip_vit = backbone.featurizer, backbone.fused_featurizer
    images = inputs["pixels_dino"][:, 0]

    # independent: run the blocks by hand
    x = dino_vit.patch_embed(images) + dino_vit.pos_embed  # position embeddings over patches only
    x = torch.cat([dino_vit.cls_token.expand(BATCH, -1, -1), dino_vit.reg_token.expand(BATCH, -1, -1), x], dim=1)
    for block in dino_vit.blocks[: C.dino.depth - 1]:
        x = block(x)
    manual = x[:, 1 + C.dino.reg_tokens:]
    (timm_way,) = dino_vit.get_intermediate_layers(images, n=[C.dino.depth - 2])  # the reference's call
    ours = second_to_last_patch_tokens(dino_vit, images)
    assert ours.shape == (BATCH, C.patches_per_image, C.dino.width)
    torch.testing.assert_close(ours, manual)
    torch.testing.assert_close(ours, timm_way)
    normed = dino_vit.norm(x)[:, 1 + C.dino.reg_tokens:]
    assert not torch.allclose(ours, normed, atol=1e-3)

    s_images = inputs["pixels_siglip"][:, 0]
    y = siglip_vit.patch_embed(s_images) + siglip_vit.pos_embed
    for block in siglip_vit.blocks[: C.siglip.depth - 1]:
        y = block(y)
    torch.testing.assert_close(second_to_last_patch_tokens(siglip_vit, s_images), y)

    # per image cat(dino, siglip) on features, images concatenated on patches, then the projector
    proj = model.vla.projector
    per_image = [torch.cat([second_to_last_patch_tokens(dino_vit, inputs["pixels_dino"][:, i]),
                            second_to_last_patch_tokens(siglip_vit, inputs["pixels_siglip"][:, i])], dim=-1)
                 for i in range(C.num_images)]
    features = torch.cat(per_image, dim=1)
    expected = proj.fc3(F.gelu(proj.fc2(F.gelu(proj.fc1(features)))))
    torch.testing.assert_close(model.vla.vision(inputs["pixels_dino"], inputs["pixels_siglip"]), expected)


def test_inputs_embeds_order(model, inputs):
    vla, n, q = model.vla, C.num_image_tokens, C.num_action_queries
    ids = inputs["prompt_ids"]
    image = torch.randn(BATCH, n, C.llm.hidden)
    embeds = vla.build_inputs_embeds(image, ids)
    table = vla.language_model.get_input_embeddings().weight
    torch.testing.assert_close(embeds[:, 0], table[ids[:, 0]], rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, 1 : 1 + n], image, rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, 1 + n : n + PROMPT_LEN], table[ids[:, 1:]], rtol=0, atol=0)
    aq = vla.action_queries.weight[None].expand(BATCH, -1, -1)
    torch.testing.assert_close(embeds[:, n + PROMPT_LEN : n + PROMPT_LEN + q], aq, rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, -1], table[[C.stop_token_id] * BATCH], rtol=0, atol=0)


def test_llm_hidden_states_equal_hf_output_hidden_states(model):
    embeds = torch.randn(BATCH, 17, C.llm.hidden)
    ours = model.vla.llm_hidden_states(embeds)
    lm = model.vla.language_model.model
    for mask in (torch.ones(BATCH, 17, dtype=torch.long), torch.tensor([[1] * 17, [0] * 3 + [1] * 14])):
        ref = lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
        got = model.vla.llm_hidden_states(embeds, mask)
        assert len(ref) == C.llm.layers + 1
        for i, r in enumerate(ref):
            torch.testing.assert_close(got[:, i], r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, 0], embeds, rtol=0, atol=0)
    # index L is after the final RMSNorm: unit RMS up to the norm weight
    normed = ours[:, -1] / lm.norm.weight
    torch.testing.assert_close(normed.pow(2).mean(-1), torch.ones(BATCH, 17), rtol=1e-3, atol=1e-3)


def test_slice_for_head_reproduces_the_shifted_windows(model):
    n, q = C.num_image_tokens, C.num_action_queries
    length = C.sequence_length(PROMPT_LEN)
    # value = sequence position, so the slices tell which positions they took
    hidden = torch.arange(length, dtype=torch.float32)[None, None, :, None].expand(1, C.llm.layers + 1, -1, 3)
    task, action = model.vla.slice_for_head(hidden, PROMPT_LEN)
    task_positions, action_positions = task[0, 0, :, 0].long(), action[0, 0, :, 0].long()
    # sequence: [tok_0][n patches][tok_1..tok_{P-1}][q action queries][stop]
    first_aq = 1 + n + (PROMPT_LEN - 1)
    assert task_positions.tolist() == list(range(n))  # tok_0 and patches 0..n-2: the last patch is left out
    assert action_positions.tolist() == list(range(first_aq - 1, first_aq - 1 + q))  # last prompt token + AQ 0..q-2
    assert action_positions[0].item() == n + PROMPT_LEN - 1


# --------------------------------------------------------------------------- head (section 2 steps 3-5)


def ref_rope(x: torch.Tensor, base: float, bf16_tables: bool) -> torch.Tensor:
    """Lane by lane: lane l is paired with its even/odd partner and turned by angle
    position * inv_freq[l mod d/2] (the cat(freqs, freqs) layout)."""
    length, d = x.shape[-2], x.shape[-1]
    if bf16_tables:
        # what the bf16-cast reference module computes
        inv = (1.0 / (base ** (torch.arange(0, d, 2).float() / d))).to(torch.bfloat16)
        t = torch.arange(length, dtype=torch.bfloat16)
        angles = torch.einsum("i,j->ij", t, inv)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().float(), angles.sin().float()
    else:
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        lanes = torch.arange(d, dtype=torch.float64)[None]
        angles = pos * base ** (-2 * (lanes % (d // 2)) / d)
        cos, sin = angles.cos().float(), angles.sin().float()
    out = torch.empty_like(x)
    for lane in range(d):
        partner, sign = (lane + 1, -1.0) if lane % 2 == 0 else (lane - 1, 1.0)
        out[..., lane] = x[..., lane] * cos[:, lane] + sign * x[..., partner] * sin[:, lane]
    return out


def ref_block(w, prefix, x, h_a, h_t, proprio, heads, bf16_tables):
    def lin(name, inp):
        return inp @ w[f"{prefix}.{name}.weight"].T + w[f"{prefix}.{name}.bias"]

    def split(t):
        b, n, d = t.shape
        return t.view(b, n, heads, d // heads).permute(0, 2, 1, 3)

    def rope(t):
        return ref_rope(t, 10000.0, bf16_tables)

    keys_a = torch.cat([h_a, proprio[:, None]], dim=1)
    q_a, q_t = rope(split(lin("q_proj_adapter", x))), rope(split(lin("q_proj_task", x)))
    k_a, k_t = rope(split(lin("k_adapter", keys_a))), rope(split(lin("k_task", h_t)))
    v_a, v_t = split(lin("v_adapter", keys_a)), split(lin("v_task", h_t))
    gate = torch.sigmoid(w[f"{prefix}.gating_factor"])
    head_dim = x.shape[-1] // heads
    logits = torch.cat([q_a @ k_a.transpose(-1, -2), gate * (q_t @ k_t.transpose(-1, -2))], dim=-1)
    logits = logits / math.sqrt(head_dim)
    out = logits.softmax(dim=-1) @ torch.cat([v_a, v_t], dim=2)
    out = lin("o_proj", out.permute(0, 2, 1, 3).reshape(x.shape))
    normed = F.layer_norm(out + x, (x.shape[-1],), w[f"{prefix}.ffn.0.weight"], w[f"{prefix}.ffn.0.bias"], 1e-5)
    return torch.relu(lin("ffn.1", normed))


def ref_single_head(w, c, task, action, proprio, bf16_tables):
    """Single-task head straight from section 2, on a plain state dict."""
    dim = c.llm.hidden
    x = torch.zeros(task.shape[0], c.chunk, c.action_dim * dim)
    x = F.layer_norm(x, (x.shape[-1],), w["model.layer_norm1.weight"], w["model.layer_norm1.bias"], 1e-5)
    x = torch.relu(x @ w["model.fc1.weight"].T + w["model.fc1.bias"])
    for i in range(c.llm.layers):
        x = ref_block(w, f"model.mlp_resnet_blocks.{i}", x, action[:, i + 1], task[:, i + 1], proprio,
                      c.head_heads, bf16_tables)
    x = F.layer_norm(x, (dim,), w["model.layer_norm2.weight"], w["model.layer_norm2.bias"], 1e-5)
    return x @ w["model.fc2.weight"].T + w["model.fc2.bias"]


def single_task_state_dict(merged: dict[str, torch.Tensor], m: int, c: MergeVLAConfig) -> dict[str, torch.Tensor]:
    """Task m's single-task head keys (section 1d, first form) from a merged head."""
    last, moe = c.llm.layers - 1, "model.mlp_resnet_moe_blocks.0."
    out = {}
    for key, value in merged.items():
        if key.startswith("model.gate.") or key == "model.router_layer_idx":
            continue
        if key == moe + "gating_factor":
            out[f"model.mlp_resnet_blocks.{last}.gating_factor"] = value[m : m + 1]
        elif key.startswith(moe):
            if f".experts.{m}." in key:
                out[f"model.mlp_resnet_blocks.{last}." + key[len(moe):].replace(f".experts.{m}.", ".")] = value
        elif ".experts." in key:
            if f".experts.{m}." in key:
                out[key.replace(f".experts.{m}.", ".")] = value
        else:
            out[key] = value
    return out


def test_expert_m_equals_the_single_task_head_built_from_its_weights(model, head_inputs):
    task, action, proprio = head_inputs
    merged = model.action_head_state_dict()
    outputs = []
    for m in range(C.num_tasks):
        single = ActionHead(C)
        single.load_state_dict(single_task_state_dict(merged, m, C), strict=True)
        expected = single(task, action, proprio)
        got = model.action_head(task, action, proprio, m)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        outputs.append(got)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2


def test_expert_tensor_path_equals_int_path(model, head_inputs):
    task, action, proprio = head_inputs
    for m in range(C.num_tasks):
        by_int = model.action_head(task, action, proprio, m)
        for index in (torch.tensor(m), torch.tensor([m])):
            torch.testing.assert_close(model.action_head(task, action, proprio, index), by_int, rtol=0, atol=0)


@pytest.mark.parametrize("bf16_tables", [False, True])
def test_head_matches_an_independent_implementation_of_section_2(head_inputs, bf16_tables):
    config = MergeVLAConfig.tiny(num_tasks=2, head_rope_bf16_tables=bf16_tables)
    head = randomize_(ActionHead(config), seed=3)
    task, action, proprio = head_inputs
    expected = ref_single_head(head.state_dict(), config, task, action, proprio, bf16_tables)
    torch.testing.assert_close(head(task, action, proprio), expected, rtol=1e-4, atol=1e-5)


def test_gate_scales_only_the_task_logits(head_inputs):
    head = randomize_(ActionHead(C), seed=4)
    block = head.model.mlp_resnet_blocks[0]
    task, action, proprio = head_inputs
    g = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, C.chunk, C.llm.hidden, generator=g)
    args = (x, action[:, 1], task[:, 1], proprio)

    def run(gate: float, zero: str | None = None) -> torch.Tensor:
        b = copy.deepcopy(block)
        b.gating_factor.fill_(gate)
        if zero:
            getattr(b, zero).weight.zero_()
            getattr(b, zero).bias.zero_()
        return b(*args)

    # the gate matters when task logits are not zero ...
    assert (run(-2.0) - run(2.0)).abs().max() > 1e-3
    # ... and does nothing when they are: it touches neither the adapter logits, nor values, nor probabilities
    torch.testing.assert_close(run(-2.0, "k_task"), run(2.0, "k_task"), rtol=0, atol=1e-6)
    # a closed gate (sigmoid = 0) is the same as zero task logits: it multiplies the logits before softmax
    torch.testing.assert_close(run(-1e4), run(5.0, "k_task"), rtol=1e-5, atol=1e-6)
    # zero adapter logits do not switch the gate off
    assert (run(-2.0, "k_adapter") - run(2.0, "k_adapter")).abs().max() > 1e-3


def test_expert_block_uses_its_own_gate(model, head_inputs):
    task, action, proprio = head_inputs
    head = copy.deepcopy(model.action_head)
    before = [head(task, action, proprio, m) for m in range(C.num_tasks)]
    head.model.mlp_resnet_moe_blocks[0].gating_factor[1] += 3.0
    torch.testing.assert_close(head(task, action, proprio, 0), before[0], rtol=0, atol=0)
    assert (head(task, action, proprio, 1) - before[1]).abs().max() > 1e-4


def test_block_i_reads_hidden_index_i_plus_1(model, head_inputs):
    head = model.action_head
    task, action, proprio = head_inputs
    blocks = list(head.model.mlp_resnet_blocks) + list(head.model.mlp_resnet_moe_blocks)
    assert len(blocks) == C.llm.layers

    def block_outputs(t: torch.Tensor, a: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        seen: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out)) for b in blocks]
        try:
            final = head(t, a, proprio, 1)
        finally:
            for hook in hooks:
                hook.remove()
        return seen, final

    base, base_final = block_outputs(task, action)
    for index in range(C.llm.layers + 1):
        for which in ("task", "action"):
            t, a = task.clone(), action.clone()
            target = t if which == "task" else a
            target[:, index] += 1.0
            outs, final = block_outputs(t, a)
            changed = [not torch.equal(o, b) for o, b in zip(outs, base)]
            # index 0 (the input embeddings) is read by no block
            first = index - 1 if index >= 1 else len(blocks)
            assert changed == [i >= first for i in range(len(blocks))], (which, index, changed)
            assert torch.equal(final, base_final) == (index == 0)


def test_stem_is_the_same_vector_at_every_chunk_position(model, head_inputs):
    m = model.action_head.model
    stem = torch.relu(m.fc1(m.layer_norm1(torch.zeros(1, C.chunk, C.action_dim * C.llm.hidden))))
    torch.testing.assert_close(stem, torch.relu(m.fc1.bias + m.fc1.weight @ m.layer_norm1.bias).expand_as(stem))


def test_rope_quirk_against_an_independent_implementation():
    head_dim, length = 8, 11
    x = torch.randn(2, 3, length, head_dim, generator=torch.Generator().manual_seed(6))
    ours = apply_head_rope(x, *rope_cos_sin(length, head_dim, 10000.0, bf16_tables=False))
    torch.testing.assert_close(ours, ref_rope(x, 10000.0, bf16_tables=False))
    # the quirk is real: conventional interleaved RoPE (one frequency per pair) differs
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    pair_freq = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = (pos * pair_freq).repeat_interleave(2, dim=-1)
    conventional = apply_head_rope(x, angles.cos(), angles.sin())
    assert (ours - conventional).abs().max() > 1e-2
    # position 0 is the identity
    torch.testing.assert_close(ours[:, :, 0], x[:, :, 0])


def test_rope_bf16_tables_match_the_bf16_module_and_round_positions():
    head_dim, length = 112, 300
    x = torch.randn(1, 1, length, head_dim, generator=torch.Generator().manual_seed(7))
    cos, sin = rope_cos_sin(length, head_dim, 10000.0, bf16_tables=True)
    torch.testing.assert_close(apply_head_rope(x, cos, sin), ref_rope(x, 10000.0, bf16_tables=True))
    # bf16 cannot hold 257: the reference's task keys 256 and 257 get the same rotation
    torch.testing.assert_close(cos[257], cos[256], rtol=0, atol=0)
    exact_cos, _ = rope_cos_sin(length, head_dim, 10000.0, bf16_tables=False)
    assert not torch.equal(exact_cos[257], exact_cos[256])


# --------------------------------------------------------------------------- state dicts


def test_state_dict_round_trip_through_safetensors_gives_identical_outputs(model, inputs, tmp_path):
    files = {"vla": model.vla_state_dict(), "head": model.action_head_state_dict(),
             "proprio": model.proprio_state_dict()}
    for name, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / f"{name}.safetensors")
    other = randomize_(MergeVLAModel(C), seed=99).eval()
    expected = model.predict_normalized_actions(**inputs, expert=1)
    assert not torch.allclose(other.predict_normalized_actions(**inputs, expert=1), expected)
    other.load_vla_state_dict(load_file(tmp_path / "vla.safetensors"))
    other.load_action_head_state_dict(load_file(tmp_path / "head.safetensors"))
    other.load_proprio_state_dict(load_file(tmp_path / "proprio.safetensors"))
    torch.testing.assert_close(other.predict_normalized_actions(**inputs, expert=1), expected, rtol=0, atol=0)
    # the tied LM head follows the embedding
    lm = other.vla.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


def test_loaders_name_what_is_wrong(model):
    target = copy.deepcopy(model)
    vla = dict(model.vla_state_dict())
    with pytest.raises(StateDictMismatch, match="missing keys: action_queries.weight"):
        target.load_vla_state_dict({k: v for k, v in vla.items() if k != "action_queries.weight"})
    with pytest.raises(StateDictMismatch, match="unexpected keys: .*blocks.0.ls1.gamma"):
        target.load_vla_state_dict({**vla, "vision_backbone.featurizer.blocks.0.ls1.gamma": torch.zeros(1)})
    with pytest.raises(StateDictMismatch, match=r"projector.fc3.bias: checkpoint \[3\] vs model \[64\]"):
        target.load_vla_state_dict({**vla, "projector.fc3.bias": torch.zeros(3)})
    # an explicit tied head is accepted when it is the embedding, refused otherwise
    embed = vla["language_model.model.embed_tokens.weight"]
    target.load_vla_state_dict({**vla, "language_model.lm_head.weight": embed.clone()})
    with pytest.raises(StateDictMismatch, match="tied"):
        target.load_vla_state_dict({**vla, "language_model.lm_head.weight": embed + 1})

    head = dict(model.action_head_state_dict())
    with pytest.raises(StateDictMismatch, match="router_layer_idx is 0"):
        target.load_action_head_state_dict({**head, "model.router_layer_idx": torch.tensor(0)})
    three = randomize_(MergeVLAModel(MergeVLAConfig.tiny(num_tasks=3)), seed=2).action_head_state_dict()
    with pytest.raises(StateDictMismatch, match=r"unexpected keys: .*experts\.2"):
        target.load_action_head_state_dict(three)
    with pytest.raises(StateDictMismatch, match="proprio projector.*missing keys: fc1.bias"):
        target.load_proprio_state_dict({k: v for k, v in model.proprio_state_dict().items() if k != "fc1.bias"})
    ddp = {f"module.{k}": v for k, v in model.proprio_state_dict().items()}
    target.load_proprio_state_dict(strip_ddp_prefix(ddp))
