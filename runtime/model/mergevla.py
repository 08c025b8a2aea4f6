"""PyTorch reference of the MergeVLA architecture, sized by a config.

Implemented from docs/mergevla-layout.md (sections 1 and 2); the state-dict keys and shapes match
the public MergeVLA layout, so weights with the real layout load into `MergeVLAConfig.real_libero()`
and a tiny random instance (`MergeVLAConfig.tiny()`, about 2 MB) runs the same code in unit tests.

Three modules, one per checkpoint file:
- `PrismaticVLA`: the HF `save_pretrained` part (section 1a): `vision_backbone.featurizer` (DINOv2
  with 4 registers), `vision_backbone.fused_featurizer` (SigLIP), `projector.fc1/fc2/fc3`,
  `language_model` (Qwen2ForCausalLM) and `action_queries`.
- `ProprioProjector` (section 1c).
- `MergedActionHead` (section 1d, merged MoE form) and `ActionHead` (single-task form, used by
  single-model deployments and by tests that check an expert against its task's head).

Every forward piece is a pure tensor function with shape-only Python logic, so it can be wrapped
for ONNX export: the expert index may be an int (eager, no copies) or an int64 tensor (exportable:
the expert weights are stacked and gathered).

timm's LayerScale parameter `gamma` is stored as `scale_factor` (the checkpoint's name: HF renames
parameters containing "gamma" on load, so Prismatic renamed them). We do this by swapping timm's
LayerScale modules for `ScaleFactorLayerScale`, whose parameter is named `scale_factor`: the module
tree itself then has the checkpoint's key names, so `state_dict()`, `load_state_dict()` and ONNX
initializer names agree without hooks or renaming tables.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM

# The tied LM head: HF save_pretrained drops it from safetensors files (it aliases the embedding),
# so vla_state_dict() leaves it out and the loader accepts it only if it equals the embedding.
LM_HEAD_KEY = "language_model.lm_head.weight"
EMBED_KEY = "language_model.model.embed_tokens.weight"

# Names of the Linear layers of one Pro block, in checkpoint order (section 1d).
BLOCK_LINEARS = ("q_proj_adapter", "k_adapter", "v_adapter", "q_proj_task", "k_task", "v_task", "o_proj")
HEAD_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default, used by every LayerNorm of the action head
VIT_LAYER_SCALE_INIT = 1e-5  # timm's DINOv2 init_values


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DinoConfig:
    """DINOv2 ViT with registers (`vit_large_patch14_reg4_dinov2` at real size)."""

    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    reg_tokens: int = 4


@dataclass(frozen=True)
class SiglipConfig:
    """SigLIP ViT with a MAP head (`vit_so400m_patch14_siglip_224` at real size)."""

    width: int = 1152
    depth: int = 27
    heads: int = 16
    mlp: int = 4304


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2.5-0.5B at real size."""

    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936
    rope_theta: float = 1e6
    rms_eps: float = 1e-6


@dataclass(frozen=True)
class MergeVLAConfig:
    """Architecture of a MergeVLA model; stored as JSON in a bundle manifest ("architecture").

    The action head has one block per LLM layer: blocks 0..L-2 are shared, block L-1 (reading
    the final, normed hidden state) is the per-task expert block.
    """

    image_size: int = 224
    patch_size: int = 14
    dino: DinoConfig = field(default_factory=DinoConfig)
    siglip: SiglipConfig = field(default_factory=SiglipConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    num_action_queries: int = 64
    action_dim: int = 7
    chunk: int = 8
    proprio_dim: int = 8
    head_heads: int = 8
    num_tasks: int = 4
    router_k: int = 8
    num_images: int = 2
    stop_token_id: int = 2
    head_rope_base: float = 10000.0
    # The published heads were trained and evaluated after `module.to(torch.bfloat16)`, which also
    # casts the head's RoPE inv_freq buffer: positions, frequencies and cos/sin are bf16-rounded
    # (task-key positions above 256 round to even). True reproduces those tables exactly.
    head_rope_bf16_tables: bool = True

    def __post_init__(self) -> None:
        _check_config(self)

    # ---- constructors

    @classmethod
    def real_libero(cls, num_tasks: int = 4) -> "MergeVLAConfig":
        """The published LIBERO model: DINOv2-L + SigLIP-SO400M at 224 px, Qwen2.5-0.5B, 8 x 7 chunks."""
        return cls(num_tasks=num_tasks, action_dim=7, chunk=8, proprio_dim=8)

    @classmethod
    def tiny(cls, num_tasks: int = 2, **overrides: Any) -> "MergeVLAConfig":
        """A few-MB instance with the real structure, for CPU tests; top-level fields can be overridden."""
        base = cls(
            image_size=28,
            patch_size=14,
            dino=DinoConfig(width=32, depth=3, heads=2, mlp_ratio=4.0, reg_tokens=4),
            # mlp not a multiple of width, as in SigLIP (4304 / 1152), to exercise the ratio rounding
            siglip=SiglipConfig(width=48, depth=3, heads=2, mlp=80),
            llm=LLMConfig(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, vocab=256),
            num_action_queries=6,
            action_dim=3,
            chunk=4,
            proprio_dim=5,
            head_heads=8,
            num_tasks=num_tasks,
            router_k=4,
            num_images=2,
        )
        return dataclasses.replace(base, **overrides)

    # ---- derived sizes

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Image patches in the LLM sequence; also the length of the head's "task" slice (512 real)."""
        return self.num_images * self.patches_per_image

    @property
    def vision_dim(self) -> int:
        return self.dino.width + self.siglip.width

    @property
    def head_dim(self) -> int:
        return self.llm.hidden // self.head_heads

    @property
    def num_shared_blocks(self) -> int:
        return self.llm.layers - 1

    @property
    def router_layer_idx(self) -> int:
        """Index of the last shared block, whose value projections define the router subspaces."""
        return self.llm.layers - 2

    def sequence_length(self, prompt_len: int) -> int:
        """LLM input length: prompt tokens, image patches, action queries and the stop token."""
        return prompt_len + self.num_image_tokens + self.num_action_queries + 1

    # ---- JSON

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MergeVLAConfig":
        """Strict inverse of to_dict: every field required, no unknown keys, types checked."""
        nested = {"dino": DinoConfig, "siglip": SiglipConfig, "llm": LLMConfig}
        values = _typed_fields(cls, data, "architecture", skip=frozenset(nested))
        for name, sub_cls in nested.items():
            values[name] = sub_cls(**_typed_fields(sub_cls, data[name], f"architecture.{name}"))
        return cls(**values)


def _typed_fields(cls: type, data: Mapping[str, Any], where: str,
                  skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    missing = sorted(set(names) - set(data))
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    values: dict[str, Any] = {}
    for name, f in names.items():
        if name in skip:
            continue
        value = data[name]
        kind = type(f.default)
        # bool is an int subclass: accept it only where a bool is expected, and never as a number
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"{where}.{name}: expected {kind.__name__}, got {value!r}")
        values[name] = float(value) if kind is float else value
    return values


def _check_config(c: MergeVLAConfig) -> None:
    problems = []

    def need(cond: bool, text: str) -> None:
        if not cond:
            problems.append(text)

    for name in ("image_size", "patch_size", "num_action_queries", "action_dim", "chunk", "proprio_dim",
                 "head_heads", "num_tasks", "router_k", "num_images"):
        need(getattr(c, name) >= 1, f"{name} must be >= 1")
    need(c.image_size % c.patch_size == 0, "image_size must be a multiple of patch_size")
    for vit_name, vit in (("dino", c.dino), ("siglip", c.siglip)):
        need(vit.width % vit.heads == 0, f"{vit_name}.width must be a multiple of {vit_name}.heads")
        # the features come from the second-to-last block
        need(vit.depth >= 2, f"{vit_name}.depth must be >= 2")
    need(c.dino.reg_tokens >= 0, "dino.reg_tokens must be >= 0")
    need(c.dino.mlp_ratio > 0 and c.siglip.mlp >= 1, "ViT MLP sizes must be positive")
    llm = c.llm
    need(llm.hidden % llm.heads == 0 and (llm.hidden // llm.heads) % 2 == 0,
         "llm.hidden / llm.heads must be an even integer (RoPE)")
    need(llm.heads % llm.kv_heads == 0, "llm.heads must be a multiple of llm.kv_heads")
    # the head needs at least one shared block (the router reads block L-2) and the expert block
    need(llm.layers >= 2, "llm.layers must be >= 2")
    need(0 <= c.stop_token_id < llm.vocab, "stop_token_id must be a valid token id")
    need(llm.hidden % c.head_heads == 0 and (llm.hidden // c.head_heads) % 2 == 0,
         "llm.hidden / head_heads must be an even integer (head RoPE)")
    need(c.router_k <= llm.hidden, "router_k must be <= llm.hidden")
    if problems:
        raise ValueError("invalid MergeVLAConfig: " + "; ".join(problems))


def qwen2_config(llm: LLMConfig) -> Qwen2Config:
    """The HF config of the language model; eager attention so the graph exports plainly."""
    return Qwen2Config(
        vocab_size=llm.vocab,
        hidden_size=llm.hidden,
        intermediate_size=llm.intermediate,
        num_hidden_layers=llm.layers,
        num_attention_heads=llm.heads,
        num_key_value_heads=llm.kv_heads,
        rms_norm_eps=llm.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(llm.rope_theta)},
        tie_word_embeddings=True,
        use_sliding_window=False,
        attn_implementation="eager",
    )


# --------------------------------------------------------------------------- vision


class ScaleFactorLayerScale(nn.Module):
    """timm's LayerScale with its parameter named `scale_factor`, the checkpoint's name."""

    def __init__(self, gamma: Tensor):
        super().__init__()
        self.scale_factor = nn.Parameter(gamma.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale_factor


def _rename_layer_scales(vit: VisionTransformer) -> None:
    for block in vit.blocks:
        for name in ("ls1", "ls2"):
            if isinstance(getattr(block, name), LayerScale):
                setattr(block, name, ScaleFactorLayerScale(getattr(block, name).gamma))


def build_dino(config: MergeVLAConfig) -> VisionTransformer:
    """Configured as timm's `vit_large_patch14_reg4_dinov2` (class token, registers, LayerScale,
    position embeddings over patches only), created with num_classes=0 at `image_size`."""
    d = config.dino
    vit = VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, num_classes=0,
        embed_dim=d.width, depth=d.depth, num_heads=d.heads, mlp_ratio=d.mlp_ratio,
        init_values=VIT_LAYER_SCALE_INIT, class_token=True, reg_tokens=d.reg_tokens, no_embed_class=True,
    )
    _rename_layer_scales(vit)
    return vit


def build_siglip(config: MergeVLAConfig) -> VisionTransformer:
    """Configured as timm's `vit_so400m_patch14_siglip_224` (no class token, MAP pooling head)."""
    s = config.siglip
    # timm sizes the MLP as int(width * ratio); +0.5 keeps that equal to `mlp` despite float error
    ratio = (s.mlp + 0.5) / s.width
    vit = VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, num_classes=0,
        embed_dim=s.width, depth=s.depth, num_heads=s.heads, mlp_ratio=ratio,
        class_token=False, global_pool="map",
    )
    if vit.blocks[0].mlp.fc1.out_features != s.mlp:
        raise RuntimeError(f"timm sized the SigLIP MLP {vit.blocks[0].mlp.fc1.out_features}, expected {s.mlp}")
    return vit


def second_to_last_patch_tokens(vit: VisionTransformer, images: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, patches, width): the second-to-last block's output, prefix tokens dropped,
    no final norm (timm `get_intermediate_layers(n={depth - 2})` with its default norm=False).
    stop_early skips the last block, whose result is never used."""
    (tokens,) = vit.forward_intermediates(
        images, indices=[len(vit.blocks) - 2], norm=False, stop_early=True,
        output_fmt="NLC", intermediates_only=True,
    )
    return tokens


class VisionBackbone(nn.Module):
    def __init__(self, config: MergeVLAConfig):
        super().__init__()
        self.featurizer = build_dino(config)
        self.fused_featurizer = build_siglip(config)


class FusedProjector(nn.Module):
    """Vision features (dino + siglip widths) -> LLM width: fc1 (x4), GELU, fc2, GELU, fc3."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


# --------------------------------------------------------------------------- VLA


def causal_additive_mask(attention_mask: Tensor | None, length: int, dtype: torch.dtype,
                         device: torch.device) -> Tensor:
    """(B or 1, 1, T, T) additive mask for eager attention: causal, plus key padding if given."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]
    # finfo.min rather than -inf: a fully masked (padding) row stays finite
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class PrismaticVLA(nn.Module):
    """The VLA saved by HF `save_pretrained` (section 1a); keys are exactly `state_dict()` minus the
    tied LM head."""

    def __init__(self, config: MergeVLAConfig):
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config)
        self.projector = FusedProjector(config.vision_dim, config.llm.hidden)
        self.language_model = Qwen2ForCausalLM(qwen2_config(config.llm))
        self.action_queries = nn.Embedding(config.num_action_queries, config.llm.hidden)

    def vision(self, pixels_dino: Tensor, pixels_siglip: Tensor) -> Tensor:
        """(B, num_images, 3, H, W) each, already normalized per backbone -> (B, num_images * patches, D).

        Per image the DINO features come first along the feature axis; images are concatenated along
        the patch axis in input order (primary, then wrist)."""
        c = self.config
        expected = (c.num_images, 3, c.image_size, c.image_size)
        for name, pixels in (("pixels_dino", pixels_dino), ("pixels_siglip", pixels_siglip)):
            if pixels.dim() != 5 or tuple(pixels.shape[1:]) != expected:
                raise ValueError(f"{name}: expected (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")
        batch = pixels_dino.shape[0]
        # images of all batch items go through the ViTs together; they do not interact
        dino = second_to_last_patch_tokens(self.vision_backbone.featurizer, pixels_dino.flatten(0, 1))
        siglip = second_to_last_patch_tokens(self.vision_backbone.fused_featurizer, pixels_siglip.flatten(0, 1))
        features = torch.cat([dino, siglip], dim=-1)
        features = features.reshape(batch, c.num_images * c.patches_per_image, c.vision_dim)
        return self.projector(features)

    def build_inputs_embeds(self, image_embeds: Tensor, prompt_ids: Tensor) -> Tensor:
        """[first prompt token, image patches, remaining prompt tokens, action queries, stop token].

        image_embeds: (B, num_image_tokens, D) from `vision`; prompt_ids: (B, prompt_len) int64, the
        tokenized prompt without BOS, all rows the same length (the reference runs batch 1, no padding).
        Returns (B, sequence_length(prompt_len), D)."""
        c = self.config
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
            raise ValueError(f"prompt_ids: expected (B, prompt_len >= 1), got {tuple(prompt_ids.shape)}")
        batch = prompt_ids.shape[0]
        if tuple(image_embeds.shape) != (batch, c.num_image_tokens, c.llm.hidden):
            raise ValueError(f"image_embeds: expected ({batch}, {c.num_image_tokens}, {c.llm.hidden}), "
                             f"got {tuple(image_embeds.shape)}")
        embed = self.language_model.get_input_embeddings()
        tokens = embed(prompt_ids)
        queries = self.action_queries.weight[None].expand(batch, -1, -1)
        stop_ids = torch.full((batch, 1), c.stop_token_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
        stop = embed(stop_ids)
        parts = [tokens[:, :1], image_embeds.to(tokens.dtype), tokens[:, 1:], queries.to(tokens.dtype), stop]
        return torch.cat(parts, dim=1)

    def llm_hidden_states(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, L + 1, T, D): index 0 the input embeddings, index l (1..L-1) the output of
        decoder layer l-1, index L the last layer's output after the final RMSNorm (the HF
        `output_hidden_states` convention). attention_mask: optional (B, T) 1 = attend; causal always.

        The decoder layers are called directly (same modules, positions 0..T-1) so the graph has no
        output-capturing hooks; tests check equality with HF's own forward."""
        model = self.language_model.model
        length = inputs_embeds.shape[1]
        position_ids = torch.arange(length, device=inputs_embeds.device)[None]
        mask = causal_additive_mask(attention_mask, length, inputs_embeds.dtype, inputs_embeds.device)
        position_embeddings = model.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        states = [hidden]
        for layer in model.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
            # transformers 4.x decoder layers return a tuple, 5.x a tensor
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            states.append(hidden)
        states[-1] = model.norm(hidden)
        return torch.stack(states, dim=1)

    def slice_for_head(self, hidden: Tensor, prompt_len: int) -> tuple[Tensor, Tensor]:
        """Split (B, L+1, T, D) into the head's inputs, exactly as the reference (section 2.1):

        - task: positions [0, num_image_tokens) = the first prompt token and all image patches but the
          last one;
        - action: num_action_queries positions starting at num_image_tokens + prompt_len - 1, i.e. the
          last prompt token and action queries 0..Q-2 (one position early, as in training).
        prompt_len is the number of prompt ids given to build_inputs_embeds."""
        c = self.config
        expected = c.sequence_length(prompt_len)
        if hidden.dim() != 4 or hidden.shape[2] != expected:
            raise ValueError(f"hidden: expected (B, L+1, {expected}, D) for prompt_len={prompt_len}, "
                             f"got {tuple(hidden.shape)}")
        start = c.num_image_tokens + prompt_len - 1
        task = hidden[:, :, : c.num_image_tokens]
        action = hidden[:, :, start : start + c.num_action_queries]
        return task, action


class ProprioProjector(nn.Module):
    """Normalized proprio state (B, P) -> (B, D): fc1, GELU, fc2 (section 1c)."""

    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(proprio)))


# --------------------------------------------------------------------------- action head: math


def _round_bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def rope_cos_sin(length: int, head_dim: int, base: float, device: torch.device | None = None,
                 bf16_tables: bool = False) -> tuple[Tensor, Tensor]:
    """(length, head_dim) float32 cos and sin for positions 0..length-1, laid out as
    cat(freqs, freqs) (lane l uses frequency l mod head_dim/2).

    bf16_tables rounds every intermediate to bf16 as the bf16-cast reference module does (positions,
    inv_freq, their products, cos/sin); values stay float32 so an exported graph needs no bf16 ops."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(length, device=device, dtype=torch.float32)
    if bf16_tables:
        inv_freq, positions = _round_bf16(inv_freq), _round_bf16(positions)
    freqs = torch.outer(positions, inv_freq)
    if bf16_tables:
        freqs = _round_bf16(freqs)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if bf16_tables:
        cos, sin = _round_bf16(cos), _round_bf16(sin)
    return cos, sin


def rotate_pairs(x: Tensor) -> Tensor:
    """Rotate each even/odd lane pair by 90 degrees: (x[2j], x[2j+1]) -> (-x[2j+1], x[2j])."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_head_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, d); cos/sin: (T, d). Reproduces the reference quirk: lanes are paired even/odd
    while the tables are cat(freqs, freqs), so the two lanes of a pair use different frequencies."""
    return x * cos.to(x.dtype) + rotate_pairs(x) * sin.to(x.dtype)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


BlockParams = Mapping[str, tuple[Tensor, Tensor]]


def pro_block_forward(x: Tensor, h_a: Tensor, h_t: Tensor, proprio: Tensor, params: BlockParams,
                      gate_logit: Tensor, heads: int, rope_base: float, bf16_tables: bool) -> Tensor:
    """One head block (section 2 step 4).

    x: (B, C, D) queries; h_a: (B, Q, D) action window; h_t: (B, n_img, D) task tokens;
    proprio: (B, D); params: (weight, bias) for "ffn.0" (LayerNorm), "ffn.1" and BLOCK_LINEARS;
    gate_logit: shape [1]. Returns (B, C, D)."""
    width = x.shape[-1]
    head_dim = width // heads
    # adapter keys/values: the action window followed by the proprio token (Q + 1 keys)
    h_adapter = torch.cat([h_a, proprio[:, None].to(h_a.dtype)], dim=1)

    def project(name: str, source: Tensor) -> Tensor:
        return _split_heads(F.linear(source, *params[name]), heads)

    def rope(t: Tensor) -> Tensor:
        cos, sin = rope_cos_sin(t.shape[2], head_dim, rope_base, t.device, bf16_tables)
        return apply_head_rope(t, cos, sin)

    q_a, q_t = rope(project("q_proj_adapter", x)), rope(project("q_proj_task", x))
    k_a, v_a = rope(project("k_adapter", h_adapter)), project("v_adapter", h_adapter)
    k_t, v_t = rope(project("k_task", h_t)), project("v_task", h_t)

    # the gate scales only the task logits, before the one joint softmax over both key sets
    scores_a = q_a @ k_a.transpose(-2, -1)
    scores_t = (q_t @ k_t.transpose(-2, -1)) * torch.sigmoid(gate_logit).to(x.dtype)
    scores = torch.cat([scores_a, scores_t], dim=-1) / math.sqrt(head_dim)
    weights = torch.softmax(scores, dim=-1)
    attended = weights @ torch.cat([v_a, v_t], dim=2)
    attended = attended.transpose(1, 2).reshape(x.shape)
    out = F.linear(attended, *params["o_proj"])

    # residual before the FFN, none around it
    normed = F.layer_norm(out + x, (width,), *params["ffn.0"], eps=HEAD_LAYER_NORM_EPS)
    return F.relu(F.linear(normed, *params["ffn.1"]))


def _expert_index(expert: int | Tensor, num_experts: int) -> int | Tensor:
    """An int stays an int (checked); a tensor becomes a 1-element int64 index (for index_select)."""
    if isinstance(expert, Tensor):
        return expert.reshape(1).to(torch.int64)
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
        raise ValueError(f"expert must be an int in [0, {num_experts}) or an int64 tensor, got {expert!r}")
    return expert


# --------------------------------------------------------------------------- action head: modules


class ProBlock(nn.Module):
    """A single-task / shared head block (`MLPResNetBlock_Pro` key layout)."""

    def __init__(self, dim: int, heads: int, rope_base: float, bf16_tables: bool):
        super().__init__()
        self.heads, self.rope_base, self.bf16_tables = heads, rope_base, bf16_tables
        self.ffn = nn.Sequential(nn.LayerNorm(dim, eps=HEAD_LAYER_NORM_EPS), nn.Linear(dim, dim), nn.ReLU())
        for name in BLOCK_LINEARS:
            setattr(self, name, nn.Linear(dim, dim))
        self.gating_factor = nn.Parameter(torch.zeros(1))

    def params(self) -> dict[str, tuple[Tensor, Tensor]]:
        params = {name: (getattr(self, name).weight, getattr(self, name).bias) for name in BLOCK_LINEARS}
        params["ffn.0"] = (self.ffn[0].weight, self.ffn[0].bias)
        params["ffn.1"] = (self.ffn[1].weight, self.ffn[1].bias)
        return params

    def forward(self, x: Tensor, h_a: Tensor, h_t: Tensor, proprio: Tensor) -> Tensor:
        return pro_block_forward(x, h_a, h_t, proprio, self.params(), self.gating_factor,
                                 self.heads, self.rope_base, self.bf16_tables)


class _ExpertParams(nn.Module):
    """Per-expert copies of one layer, keys `experts.{m}.weight/bias`."""

    experts: nn.ModuleList

    def select(self, expert: int | Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(expert, int):
            return self.experts[expert].weight, self.experts[expert].bias
        # tensor path for export: gather from the stacked copies (constant-folded into one initializer)
        weight = torch.stack([e.weight for e in self.experts]).index_select(0, expert)[0]
        bias = torch.stack([e.bias for e in self.experts]).index_select(0, expert)[0]
        return weight, bias


class ExpertLinear(_ExpertParams):
    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(num_experts))

    def forward(self, x: Tensor, expert: int | Tensor) -> Tensor:
        return F.linear(x, *self.select(expert))


class ExpertLayerNorm(_ExpertParams):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.LayerNorm(dim, eps=HEAD_LAYER_NORM_EPS) for _ in range(num_experts))

    def forward(self, x: Tensor, expert: int | Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), *self.select(expert), eps=HEAD_LAYER_NORM_EPS)


class ProExpertBlock(nn.Module):
    """The per-task block (`MLPResNetBlock_Pro_MoE` key layout): every Linear and the FFN LayerNorm
    hold one copy per expert; gating_factor holds one logit per expert."""

    def __init__(self, dim: int, heads: int, num_experts: int, rope_base: float, bf16_tables: bool):
        super().__init__()
        self.heads, self.rope_base, self.bf16_tables = heads, rope_base, bf16_tables
        self.ffn = nn.Sequential(ExpertLayerNorm(dim, num_experts), ExpertLinear(dim, dim, num_experts), nn.ReLU())
        for name in BLOCK_LINEARS:
            setattr(self, name, ExpertLinear(dim, dim, num_experts))
        self.gating_factor = nn.Parameter(torch.zeros(num_experts))

    def params(self, expert: int | Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        params = {name: getattr(self, name).select(expert) for name in BLOCK_LINEARS}
        params["ffn.0"] = self.ffn[0].select(expert)
        params["ffn.1"] = self.ffn[1].select(expert)
        return params

    def gate_logit(self, expert: int | Tensor) -> Tensor:
        if isinstance(expert, int):
            return self.gating_factor[expert : expert + 1]
        return self.gating_factor.index_select(0, expert)

    def forward(self, x: Tensor, h_a: Tensor, h_t: Tensor, proprio: Tensor, expert: int | Tensor) -> Tensor:
        return pro_block_forward(x, h_a, h_t, proprio, self.params(expert), self.gate_logit(expert),
                                 self.heads, self.rope_base, self.bf16_tables)


class RouterBank(nn.Module):
    """Per-expert router subspaces, keys `routers.{m}` of shape [k, D]."""

    def __init__(self, dim: int, num_experts: int, k: int):
        super().__init__()
        self.routers = nn.ParameterList(nn.Parameter(torch.zeros(k, dim)) for _ in range(num_experts))

    def score(self, tokens: Tensor, expert: int) -> Tensor:
        """(B, N, D) -> (B,): the norm of each token's k coordinates, averaged over tokens."""
        return F.linear(tokens, self.routers[expert].to(tokens.dtype)).norm(dim=-1).mean(dim=1)


class RouterGate(nn.Module):
    """`gate.0` scores the action window (v_adapter subspace), `gate.1` the task tokens (v_task)."""

    def __init__(self, dim: int, num_experts: int, k: int):
        super().__init__()
        self.gate = nn.ModuleList([RouterBank(dim, num_experts, k), RouterBank(dim, num_experts, k)])

    def forward(self, task_last: Tensor, action_last: Tensor, expert: int) -> Tensor:
        return 0.5 * (self.gate[0].score(action_last, expert) + self.gate[1].score(task_last, expert))


def _check_head_inputs(config: MergeVLAConfig, task_hidden: Tensor, action_hidden: Tensor,
                       proprio_features: Tensor) -> None:
    c = config
    batch, layers, dim = task_hidden.shape[0], c.llm.layers + 1, c.llm.hidden
    expected = {
        "task_hidden": (task_hidden, (batch, layers, c.num_image_tokens, dim)),
        "action_hidden": (action_hidden, (batch, layers, c.num_action_queries, dim)),
        "proprio_features": (proprio_features, (batch, dim)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected {shape}, got {tuple(tensor.shape)}")


def _stem(layer_norm: nn.LayerNorm, fc: nn.Linear, batch: int, config: MergeVLAConfig, like: Tensor) -> Tensor:
    """The head's input is zeros (B, C, A*D): LayerNorm -> fc1 -> ReLU gives the same vector at every
    chunk position; only the queries' RoPE tells positions apart."""
    zeros = torch.zeros(batch, config.chunk, config.action_dim * config.llm.hidden,
                        dtype=like.dtype, device=like.device)
    return F.relu(fc(layer_norm(zeros)))


class _SingleHeadBody(nn.Module):
    def __init__(self, config: MergeVLAConfig):
        super().__init__()
        c, dim = config, config.llm.hidden
        self.layer_norm1 = nn.LayerNorm(c.action_dim * dim, eps=HEAD_LAYER_NORM_EPS)
        self.fc1 = nn.Linear(c.action_dim * dim, dim)
        self.mlp_resnet_blocks = nn.ModuleList(
            ProBlock(dim, c.head_heads, c.head_rope_base, c.head_rope_bf16_tables) for _ in range(c.llm.layers))
        self.layer_norm2 = nn.LayerNorm(dim, eps=HEAD_LAYER_NORM_EPS)
        self.fc2 = nn.Linear(dim, c.action_dim)


class ActionHead(nn.Module):
    """Single-task head (`L1RegressionActionHead` layout): L blocks, block i reads hidden index i+1."""

    def __init__(self, config: MergeVLAConfig):
        super().__init__()
        self.config = config
        self.model = _SingleHeadBody(config)

    def forward(self, task_hidden: Tensor, action_hidden: Tensor, proprio_features: Tensor) -> Tensor:
        """(B, L+1, n_img, D), (B, L+1, Q, D), (B, D) -> normalized actions (B, C, A)."""
        _check_head_inputs(self.config, task_hidden, action_hidden, proprio_features)
        m = self.model
        x = _stem(m.layer_norm1, m.fc1, task_hidden.shape[0], self.config, action_hidden)
        for i, block in enumerate(m.mlp_resnet_blocks):
            x = block(x, action_hidden[:, i + 1], task_hidden[:, i + 1], proprio_features)
        return m.fc2(m.layer_norm2(x))


class _MergedHeadBody(nn.Module):
    def __init__(self, config: MergeVLAConfig):
        super().__init__()
        c, dim, experts = config, config.llm.hidden, config.num_tasks
        self.layer_norm1 = nn.LayerNorm(c.action_dim * dim, eps=HEAD_LAYER_NORM_EPS)
        self.fc1 = nn.Linear(c.action_dim * dim, dim)
        self.mlp_resnet_blocks = nn.ModuleList(
            ProBlock(dim, c.head_heads, c.head_rope_base, c.head_rope_bf16_tables)
            for _ in range(c.num_shared_blocks))
        self.mlp_resnet_moe_blocks = nn.ModuleList(
            [ProExpertBlock(dim, c.head_heads, experts, c.head_rope_base, c.head_rope_bf16_tables)])
        self.layer_norm2 = ExpertLayerNorm(dim, experts)
        self.fc2 = ExpertLinear(dim, c.action_dim, experts)
        self.gate = RouterGate(dim, experts, c.router_k)
        self.register_buffer("router_layer_idx", torch.tensor(c.router_layer_idx, dtype=torch.int64))


class MergedActionHead(nn.Module):
    """Merged head (`L1RegressionMoEActionHead` layout): L-1 shared blocks reading hidden indices
    1..L-1, then expert m's block reading index L, expert m's layer_norm2 and fc2."""

    def __init__(self, config: MergeVLAConfig):
        super().__init__()
        self.config = config
        self.model = _MergedHeadBody(config)

    def forward(self, task_hidden: Tensor, action_hidden: Tensor, proprio_features: Tensor,
                expert: int | Tensor) -> Tensor:
        """(B, L+1, n_img, D), (B, L+1, Q, D), (B, D), expert -> normalized actions (B, C, A).

        expert: an int, or an int64 tensor with one element (the exportable path)."""
        _check_head_inputs(self.config, task_hidden, action_hidden, proprio_features)
        index = _expert_index(expert, self.config.num_tasks)
        m = self.model
        x = _stem(m.layer_norm1, m.fc1, task_hidden.shape[0], self.config, action_hidden)
        for i, block in enumerate(m.mlp_resnet_blocks):
            x = block(x, action_hidden[:, i + 1], task_hidden[:, i + 1], proprio_features)
        last = self.config.llm.layers
        x = m.mlp_resnet_moe_blocks[0](x, action_hidden[:, last], task_hidden[:, last], proprio_features, index)
        return m.fc2(m.layer_norm2(x, index), index)

    def router_score(self, task_last: Tensor, action_last: Tensor, expert: int) -> Tensor:
        """(B, n_img, D) and (B, Q, D) final-layer states -> (B,) score of candidate `expert` (section 4):
        the mean token norm in its v_adapter subspace (action window, no proprio) and in its v_task
        subspace (task tokens), averaged."""
        index = _expert_index(expert, self.config.num_tasks)
        if not isinstance(index, int):
            raise ValueError("router_score takes a Python int expert index")
        return self.model.gate(task_last, action_last, index)


# --------------------------------------------------------------------------- state dicts


class StateDictMismatch(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and wrongly shaped keys."""


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_state_dict(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str) -> None:
    """Raise StateDictMismatch naming every missing, unexpected and wrongly shaped key."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: checkpoint {list(given[k].shape)} vs model {list(expected[k].shape)}"
              for k in sorted(set(expected) & set(given)) if tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_preview(shapes)}")
    if problems:
        raise StateDictMismatch(f"{what} checkpoint does not match the model: " + "; ".join(problems))


def strip_ddp_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-task proprio/head files saved from DDP carry a `module.` prefix on every key; drop it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


class MergeVLAModel(nn.Module):
    """VLA + proprio projector + merged head, with the three checkpoint files' state dicts."""

    def __init__(self, config: MergeVLAConfig):
        super().__init__()
        self.config = config
        self.vla = PrismaticVLA(config)
        self.proprio_projector = ProprioProjector(config.proprio_dim, config.llm.hidden)
        self.action_head = MergedActionHead(config)

    # ---- inference

    def head_inputs(self, pixels_dino: Tensor, pixels_siglip: Tensor, prompt_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Vision, LLM (causal, no padding) and slicing: (task (B, L+1, n_img, D), action (B, L+1, Q, D))."""
        image = self.vla.vision(pixels_dino, pixels_siglip)
        embeds = self.vla.build_inputs_embeds(image, prompt_ids)
        hidden = self.vla.llm_hidden_states(embeds)
        return self.vla.slice_for_head(hidden, prompt_ids.shape[1])

    def predict_normalized_actions(self, pixels_dino: Tensor, pixels_siglip: Tensor, prompt_ids: Tensor,
                                   proprio_normalized: Tensor, expert: int | Tensor) -> Tensor:
        """Normalized action chunk (B, C, A) for expert `expert`; unnormalization is the caller's."""
        task, action = self.head_inputs(pixels_dino, pixels_siglip, prompt_ids)
        proprio = self.proprio_projector(proprio_normalized.to(action.dtype))
        return self.action_head(task, action, proprio, expert)

    def router_hidden(self, pixels_dino: Tensor, pixels_siglip: Tensor, prompt_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Final-layer (index L, after the final RMSNorm) task (B, n_img, D) and action (B, Q, D) states."""
        task, action = self.head_inputs(pixels_dino, pixels_siglip, prompt_ids)
        last = self.config.llm.layers
        return task[:, last], action[:, last]

    # ---- state dicts (tensors share storage with the module: clone before changing them)

    def vla_state_dict(self) -> dict[str, Tensor]:
        """Section 1a keys, without the tied `language_model.lm_head.weight`."""
        return {k: v for k, v in self.vla.state_dict().items() if k != LM_HEAD_KEY}

    def action_head_state_dict(self) -> dict[str, Tensor]:
        return dict(self.action_head.state_dict())

    def proprio_state_dict(self) -> dict[str, Tensor]:
        return dict(self.proprio_projector.state_dict())

    def load_vla_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        given = dict(state_dict)
        if LM_HEAD_KEY in given:
            embed = given.get(EMBED_KEY)
            if embed is None or not torch.equal(given[LM_HEAD_KEY].to(embed.dtype), embed):
                raise StateDictMismatch(f"{LM_HEAD_KEY} is tied to {EMBED_KEY} but differs from it")
            del given[LM_HEAD_KEY]
        check_state_dict(self.vla_state_dict(), given, "VLA")
        given[LM_HEAD_KEY] = given[EMBED_KEY]  # the same tensor, loaded into the tied parameter
        self.vla.load_state_dict(given, strict=True)

    def load_action_head_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        check_state_dict(self.action_head_state_dict(), state_dict, "action head")
        stored = int(state_dict["model.router_layer_idx"])
        if stored != self.config.router_layer_idx:
            raise StateDictMismatch(f"action head router_layer_idx is {stored}, this architecture "
                                    f"expects {self.config.router_layer_idx} (llm.layers - 2)")
        self.action_head.load_state_dict(state_dict, strict=True)

    def load_proprio_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        check_state_dict(self.proprio_state_dict(), state_dict, "proprio projector")
        self.proprio_projector.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- random weights


def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Fill every floating parameter with seeded noise, independent of the global RNG: norm weights
    1 + N(0, std), everything else N(0, std). Default inits leave gates, routers and LayerScales at
    zero or 1e-5, which would hide mistakes in tests and make a flat demo model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            is_norm = isinstance(owner, nn.LayerNorm) or type(owner).__name__.endswith("RMSNorm")
            for name, param in owner.named_parameters(recurse=False):
                if not param.is_floating_point():
                    continue
                noise = torch.randn(param.shape, generator=generator) * std
                if is_norm and name == "weight":
                    noise += 1.0
                param.copy_(noise)
    return module
