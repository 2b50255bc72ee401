"""ramp <-> Hugging Face transformers: which architecture computes ramp's model exactly, and the tensor map.

ramp's model (launcher/model.py) is a megatron-core GPTModel: RMSNorm, SwiGLU, RoPE (non-interleaved
half rotation), no biases, optional per-head qk RMSNorm before RoPE, a softmax top-k router whose chosen
probabilities are renormalised (``moe_router_pre_softmax=false``: top-k of the logits, then a softmax
over the k, which equals softmax -> top-k -> divide by the sum), optional dense first layers and tied
embeddings. Two transformers architectures compute exactly that:

* **Qwen3-MoE** when the recipe has ``qk_layernorm`` (Qwen3 normalises q and k per head over head_dim
  before RoPE, as megatron does; OLMoE normalises the whole projection, so it does not match):
  ``norm_topk_prob = not moe_router_pre_softmax``, dense first layers as ``mlp_only_layers``.
* **Mixtral** without qk-norm, when every layer is MoE and the top-k probabilities are renormalised.

Anything else is refused with the reason (a shared expert: megatron's is ungated here, Qwen2-MoE's has a
sigmoid gate; a dense model).

muP models convert at any width: no transformers model applies muP's forward multipliers, but each is a
positive scalar on a linear map's output, so to-hf folds it into that weight (:class:`Fold`) and the
export is a plain model computing the same logits. from-hf divides the multipliers of the recipe it is
given back out: with the muP recipe that trained the model it gives the muP checkpoint back (to within a
rounding per weight); with ``mup.enabled=false`` (or any recipe whose multipliers are 1) it gives a
standard-parameterisation checkpoint of the same model, the weights exactly as exported.

Tensors are mapped one ramp tensor (or one expert of it) at a time, so conversion streams: a
:class:`Piece` names the torch_dist global key, the expert index when the tensor stacks experts, and the
transformers tensors it splits into. megatron's global tensors do not depend on the layout they were saved
from: ``linear_qkv`` is [q heads, k, v] per query group, a SwiGLU ``linear_fc1`` is [gate; up], experts
stack on dim 0 as ``experts.experts.linear_fc1.weight`` [E, 2F, H] for SequentialMLP and TE grouped GEMM
alike. Only the pre-MLP norm of an MoE layer is named differently by the TE spec (``pre_mlp_layernorm``
instead of the local spec's ``mlp.linear_fc1.layer_norm_weight``); both are read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.errors import RampError, require
from launcher.recipe import ModelConfig, Recipe

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


# ---------------------------------------------------------------------------------------------------------
# Which architecture


def architecture(recipe: Recipe) -> str:
    """The transformers model_type that computes this recipe's model exactly; RampError with the reason."""
    m = recipe.model
    require(m.is_moe, "model.num_experts=0: ramp-convert converts MoE models (Qwen3-MoE or Mixtral) only")
    require(
        not m.moe_shared_expert_hidden_size,
        f"model.moe_shared_expert_hidden_size={m.moe_shared_expert_hidden_size}: no transformers "
        "architecture matches an ungated shared expert with a softmax top-k router and standard attention "
        "(Qwen2-MoE gates its shared expert with a sigmoid); no exact conversion",
    )
    if m.qk_layernorm:
        return "qwen3_moe"
    require(
        m.first_k_dense == 0 and not m.moe_router_pre_softmax,
        f"model.qk_layernorm=false with model.first_k_dense={m.first_k_dense} and "
        f"model.moe_router_pre_softmax={str(m.moe_router_pre_softmax).lower()}: Mixtral (no qk-norm) needs "
        "every layer MoE and renormalised top-k probabilities, and Qwen3-MoE always applies qk-norm",
    )
    return "mixtral"


@dataclass(frozen=True)
class Fold:
    """muP's forward multipliers as factors on transformers tensors (``transformers = ramp x factor``).

    ramp applies them in the forward pass (launcher/parametrization.py hooks and the config's softmax
    scale); each is a positive scalar on the output of a linear map or a norm gain, so it moves exactly
    into that weight: ``embedding`` (embedding output), ``residual`` (every attention and MLP branch:
    o_proj and each down projection, experts included), ``logits`` (the head; with tied embeddings the
    final norm gain carries ``logits / embedding``, since the tied matrix already carries ``embedding``)
    and ``query`` (ramp's softmax scale over the 1/sqrt(head_dim) transformers uses: the q projection
    rows, or the q-norm gain when qk-norm follows the projection). All 1 under the standard
    parameterisation and at the muP base shape.
    """

    embedding: float = 1.0
    residual: float = 1.0
    logits: float = 1.0
    query: float = 1.0


def fold(recipe: Recipe) -> Fold:
    """The factors that put ``recipe``'s muP forward multipliers into the weights (all 1 without muP)."""
    if not recipe.mup.enabled:
        return Fold()
    from launcher.laws.mup import multiplier_table

    t = multiplier_table(recipe.model, recipe.mup, recipe.optimizer.lr_mult, recipe.optimizer.weight_decay)
    # All positive (mup.output_mult and mup.embedding_mult are validated so), so from-hf can divide. megatron
    # runs at 1/sqrt(head_dim) when the table's scale equals it (launcher/model.py): snap rounding-level
    # ratios to 1 so the base shape converts bit for bit.
    return Fold(
        **{
            name: 1.0 if math.isclose(value, 1.0, rel_tol=1e-9) else value
            for name, value in (
                ("embedding", t.embedding_mult),
                ("residual", t.residual_mult),
                ("logits", t.output_logit_mult),
                ("query", t.softmax_scale * math.sqrt(recipe.model.head_dim)),
            )
        }
    )


# ---------------------------------------------------------------------------------------------------------
# Config


def rope_theta(m: ModelConfig) -> float:
    """ramp hands megatron ``int(rotary_base)`` (launcher/model.py), so that is the theta to match."""
    return float(int(m.rotary_base))


def hf_config(
    recipe: Recipe, vocab_size: int, dtype: torch.dtype, tokenizer_ids: dict[str, int] | None = None
):
    """The transformers config of the architecture that matches ``recipe`` (vocab_size: ramp's padded one)."""
    arch = architecture(recipe)
    m = recipe.model
    transformers = transformers_module()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups,
        head_dim=m.head_dim,
        hidden_act="silu",
        max_position_embeddings=m.seq_length,
        initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta(m)},
        attention_dropout=0.0,
        num_experts_per_tok=m.moe_router_topk,
        router_aux_loss_coef=m.moe_aux_loss_coeff,
        output_router_logits=False,
        architectures=[ARCHITECTURES[arch]],
        **(tokenizer_ids or {}),
    )
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=m.ffn_hidden_size,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_experts=m.num_experts,
            norm_topk_prob=not m.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(m.first_k_dense)),
            attention_bias=False,
            use_sliding_window=False,
            **common,
        )
    else:
        cfg = transformers.MixtralConfig(
            intermediate_size=m.moe_ffn_hidden_size,
            num_local_experts=m.num_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
            **common,
        )
    cfg.dtype = dtype
    return cfg


#: (transformers config field, the recipe key it comes from) compared by from-hf.
_CHECKED_FIELDS = (
    ("hidden_size", "model.hidden_size"),
    ("num_hidden_layers", "model.num_layers"),
    ("num_attention_heads", "model.num_attention_heads"),
    ("num_key_value_heads", "model.num_query_groups"),
    ("head_dim", "model.kv_channels"),
    ("hidden_act", "(SwiGLU: silu)"),
    ("rms_norm_eps", "model.norm_epsilon"),
    ("tie_word_embeddings", "model.tie_embeddings"),
    ("num_experts_per_tok", "model.moe_router_topk"),
    ("num_local_experts", "model.num_experts"),
    ("moe_intermediate_size", "model.moe_ffn_hidden_size"),
    ("norm_topk_prob", "model.moe_router_pre_softmax (inverted)"),
    ("mlp_only_layers", "model.first_k_dense"),
    ("decoder_sparse_step", "(every layer after first_k_dense is MoE: 1)"),
    ("attention_bias", "(no biases: false)"),
    ("sliding_window", "(full attention: null)"),
)


def check_hf_config(cfg: Any, recipe: Recipe) -> str:
    """Refuse a transformers config that is not the recipe's model; returns the architecture."""
    mt = getattr(cfg, "model_type", None)
    if mt not in ARCHITECTURES:
        experts = any(getattr(cfg, k, 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
        kind = "an MoE model with no exact ramp counterpart" if experts else "not an MoE model"
        raise RampError(
            f"the transformers model is {mt!r}, {kind}; ramp-convert from-hf reads Qwen3-MoE and Mixtral"
        )
    arch = architecture(recipe)
    require(
        mt == arch,
        f"the transformers model is {mt} but the recipe's model converts to {arch} "
        f"(model.qk_layernorm={str(recipe.model.qk_layernorm).lower()}); pick the recipe that trained it",
    )
    want = hf_config(recipe, cfg.vocab_size, torch.float32)
    pairs = list(_CHECKED_FIELDS)
    if mt == "mixtral":  # Mixtral's intermediate_size is the experts'; it always renormalises the top-k
        pairs = [(f, k) for f, k in pairs if f not in ("moe_intermediate_size", "norm_topk_prob")]
        pairs.append(("intermediate_size", "model.moe_ffn_hidden_size"))
    elif recipe.model.first_k_dense:  # Qwen3-MoE's intermediate_size is the dense layers'
        pairs.append(("intermediate_size", "model.ffn_hidden_size"))
    for field_name, key in pairs:
        if not hasattr(want, field_name):
            continue
        have, expect = _hf_field(cfg, field_name), _hf_field(want, field_name)
        require(
            have == expect,
            f"transformers config {field_name}={have!r} does not match the recipe ({key} gives {expect!r})",
        )
    theta, rope_type = _rope(cfg)
    require(
        rope_type == "default",
        f"transformers config rope_type={rope_type!r}: ramp's RoPE is unscaled (rope_type default)",
    )
    require(
        theta == rope_theta(recipe.model),
        f"transformers config rope_theta={theta:g} does not match the recipe "
        f"(model.rotary_base gives {rope_theta(recipe.model):g})",
    )
    return mt


def _hf_field(cfg: Any, name: str) -> Any:
    value = getattr(cfg, name, None)
    if name == "head_dim" and value is None:
        return cfg.hidden_size // cfg.num_attention_heads
    if name == "mlp_only_layers":
        return sorted(value or [])
    if name == "sliding_window" and getattr(cfg, "use_sliding_window", True) is False:
        return None
    return value


def _rope(cfg: Any) -> tuple[float, str]:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    require(theta is not None, "transformers config has no rope_theta")
    return float(theta), params.get("rope_type", "default")


def transformers_module():
    """transformers, imported on use: it is an optional dependency (ramp[hf])."""
    try:
        import transformers
    except ImportError:
        raise RampError("transformers is not installed: pip install 'ramp[hf]'") from None
    return transformers


# ---------------------------------------------------------------------------------------------------------
# The tensor map


@dataclass(frozen=True)
class Piece:
    """One ramp tensor, or one expert of a stacked expert tensor, and the transformers tensors it becomes.

    ``kind``: ``copy`` (same tensor), ``qkv`` (per-query-group [q; k; v] rows <-> q, k, v), ``glu``
    ([gate; up] rows <-> gate, up). ``keys``: the torch_dist key and its aliases in other layer specs.
    ``scales``: per transformers tensor, the muP factor folded into it (:class:`Fold`); empty: all 1.
    """

    keys: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]  # of the piece (an expert's slice without the expert dim)
    expert: int | None = None
    num_experts: int = 0
    qkv_rows: tuple[int, int, int] = (0, 0, 0)  # rows of q, k, v for kind qkv
    scales: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return self.keys[0]

    def hf_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the transformers tensors, in ``hf`` order."""
        if self.kind == "copy":
            return [self.shape]
        if self.kind == "glu":
            return [(self.shape[0] // 2, *self.shape[1:])] * 2
        return [(rows, self.shape[1]) for rows in self.qkv_rows]

    def global_shape(self) -> tuple[int, ...]:
        return (self.num_experts, *self.shape) if self.expert is not None else self.shape


def pieces(recipe: Recipe, vocab_size: int) -> list[Piece]:
    """Every tensor of ramp's model, in layer order, with its transformers names (architecture-specific)."""
    arch = architecture(recipe)
    m = recipe.model
    H, d, nq, ng = m.hidden_size, m.head_dim, m.num_attention_heads, m.query_groups
    E, Fe, F = m.num_experts, m.moe_ffn_hidden_size, m.ffn_hidden_size
    f = fold(recipe)
    res = (f.residual,)
    out = [
        Piece(
            ("embedding.word_embeddings.weight",),
            ("model.embed_tokens.weight",),
            "copy",
            (vocab_size, H),
            scales=(f.embedding,),
        )
    ]
    for i in range(m.num_layers):
        r, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        moe = i >= m.first_k_dense
        out += [
            Piece(
                (r + "self_attention.linear_qkv.layer_norm_weight",),
                (h + "input_layernorm.weight",),
                "copy",
                (H,),
            ),
            Piece(
                (r + "self_attention.linear_qkv.weight",),
                tuple(f"{h}self_attn.{p}_proj.weight" for p in "qkv"),
                "qkv",
                ((nq + 2 * ng) * d, H),
                qkv_rows=(nq * d, ng * d, ng * d),
                # the softmax scale on q: its rows, unless a q-norm follows (its gain takes it, below)
                scales=(1.0 if m.qk_layernorm else f.query, 1.0, 1.0),
            ),
            Piece(
                (r + "self_attention.linear_proj.weight",),
                (h + "self_attn.o_proj.weight",),
                "copy",
                (H, nq * d),
                scales=res,
            ),
        ]
        if m.qk_layernorm:
            out += [
                Piece(
                    (r + f"self_attention.{p}_layernorm.weight",),
                    (f"{h}self_attn.{p}_norm.weight",),
                    "copy",
                    (d,),
                    scales=(f.query if p == "q" else 1.0,),
                )
                for p in "qk"
            ]
        norm_keys = (r + "mlp.linear_fc1.layer_norm_weight",) + (
            (r + "pre_mlp_layernorm.weight",) if moe else ()
        )
        out.append(Piece(norm_keys, (h + "post_attention_layernorm.weight",), "copy", (H,)))
        if not moe:
            out += [
                Piece(
                    (r + "mlp.linear_fc1.weight",),
                    (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                    "glu",
                    (2 * F, H),
                ),
                Piece(
                    (r + "mlp.linear_fc2.weight",), (h + "mlp.down_proj.weight",), "copy", (H, F), scales=res
                ),
            ]
            continue
        block = h + ("mlp." if arch == "qwen3_moe" else "block_sparse_moe.")
        gate, up, down = ("gate_proj", "up_proj", "down_proj") if arch == "qwen3_moe" else ("w1", "w3", "w2")
        out.append(Piece((r + "mlp.router.weight",), (block + "gate.weight",), "copy", (E, H)))
        x = r + "mlp.experts.experts."
        for e in range(E):
            ex = f"{block}experts.{e}."
            out += [
                Piece(
                    (x + "linear_fc1.weight",),
                    (f"{ex}{gate}.weight", f"{ex}{up}.weight"),
                    "glu",
                    (2 * Fe, H),
                    e,
                    E,
                ),
                Piece((x + "linear_fc2.weight",), (f"{ex}{down}.weight",), "copy", (H, Fe), e, E, scales=res),
            ]
    # The logit multiplier: on the head, or, when the head is the embedding matrix (which already carries
    # the embedding multiplier), on the final norm gain, so the tie survives any pair of multipliers.
    final = f.logits / f.embedding if m.tie_embeddings else 1.0
    out.append(
        Piece(("decoder.final_layernorm.weight",), ("model.norm.weight",), "copy", (H,), scales=(final,))
    )
    if not m.tie_embeddings:
        out.append(
            Piece(("output_layer.weight",), ("lm_head.weight",), "copy", (vocab_size, H), scales=(f.logits,))
        )
    return out


def extra_state_keys(recipe: Recipe) -> list[str]:
    """The ``_extra_state`` objects megatron's linear layers save (None for non-TE layers) and load back."""
    m = recipe.model
    keys = []
    for i in range(m.num_layers):
        r = f"decoder.layers.{i}."
        keys += [
            r + "self_attention.linear_qkv._extra_state/shard_0_1",
            r + "self_attention.linear_proj._extra_state/shard_0_1",
        ]
        if i < m.first_k_dense:
            keys += [r + f"mlp.linear_fc{j}._extra_state/shard_0_1" for j in (1, 2)]
        else:
            keys += [
                r + f"mlp.experts.experts.linear_fc{j}._extra_state/shard_{e}_{m.num_experts}"
                for e in range(m.num_experts)
                for j in (1, 2)
            ]
    return keys


def _scaled(t: torch.Tensor, factor: float, inverse: bool = False) -> torch.Tensor:
    """``t x factor`` (or ``/ factor``) computed wider than t (float64 for fp32, fp32 for 16-bit) and
    rounded to t's dtype; t itself at 1."""
    if factor == 1.0:
        return t
    wide = t.to(torch.float64 if t.element_size() >= 4 else torch.float32)
    return (wide / factor if inverse else wide * factor).to(t.dtype)


def split(piece: Piece, t: torch.Tensor, recipe: Recipe) -> list[torch.Tensor]:
    """A ramp piece -> its transformers tensors (own storage each: safetensors refuses shared memory),
    with the muP factors folded in."""
    if piece.kind == "copy":
        return [_scaled(t, piece.scales[0] if piece.scales else 1.0).contiguous()]
    if piece.kind == "glu":
        parts = torch.chunk(t, 2, dim=0)
    else:
        m = recipe.model
        d, ng, per = m.head_dim, m.query_groups, m.num_attention_heads // m.query_groups
        g = t.reshape(ng, per + 2, d, t.shape[-1])
        parts = [x.reshape(-1, t.shape[-1]) for x in (g[:, :per], g[:, per], g[:, per + 1])]
    out = []
    for x, s in zip(parts, piece.scales or (1.0,) * len(parts)):
        y = _scaled(x, s)
        out.append(y.clone(memory_format=torch.contiguous_format) if y is x else y.contiguous())
    return out


def merge(piece: Piece, ts: list[torch.Tensor], recipe: Recipe) -> torch.Tensor:
    """Inverse of :func:`split`: the muP factors divided back out (the recipe's forward applies them)."""
    ts = [_scaled(x, s, inverse=True) for x, s in zip(ts, piece.scales or (1.0,) * len(ts))]
    if piece.kind == "copy":
        return ts[0].contiguous()
    if piece.kind == "glu":
        return torch.cat(ts, dim=0)
    m = recipe.model
    d, ng, per = m.head_dim, m.query_groups, m.num_attention_heads // m.query_groups
    q, k, v = (x.reshape(ng, -1, d, x.shape[-1]) for x in ts)
    require(q.shape[1] == per, f"{piece.hf[0]}: {q.shape[1]} query heads per group, expected {per}")
    return torch.cat([q, k, v], dim=1).reshape(-1, ts[0].shape[-1])


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: sentencepiece BPE -> a `tokenizers` BPE that encodes to the same ids


def sentencepiece_to_hf(model_path: Path, out_dir: Path, max_length: int, model_vocab: int) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json (+ the .model) encoding exactly like sentencepiece.

    sentencepiece BPE merges, at each step, the adjacent pair whose concatenation is the best-scored
    piece (leftmost on ties); a `tokenizers` BPE whose merge ranks follow the piece scores does the same.
    Control pieces (<s>, </s>, <pad>) are never produced from text by sentencepiece, so the transformers
    tokenizer is told to split special tokens as text. Returns the special token ids for the config.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception:
        raise RampError(f"tokenizer {model_path} is not a sentencepiece model") from None
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    require(
        spec.model_type == sp_pb2.TrainerSpec.BPE,
        f"tokenizer {model_path}: only sentencepiece BPE models convert exactly (this one is "
        f"{sp_pb2.TrainerSpec.ModelType.Name(spec.model_type)})",
    )
    require(
        not norm.precompiled_charsmap and not norm.remove_extra_whitespaces and norm.escape_whitespaces,
        f"tokenizer {model_path}: its normalizer ({norm.name}) is not the identity ramp trains with; "
        "not convertible exactly",
    )
    require(
        len(proto.pieces) <= model_vocab,
        f"tokenizer {model_path} has {len(proto.pieces)} pieces, more than the model's {model_vocab} rows",
    )
    P = sp_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = [(i, p) for i, p in enumerate(proto.pieces) if p.type == P.NORMAL]
    merges = []
    for _, p in sorted(normal, key=lambda ip: (-ip[1].score, ip[0])):
        s = p.piece
        merges += [(s[:j], s[j:]) for j in range(1, len(s)) if s[:j] in vocab and s[j:] in vocab]
    unk = proto.pieces[spec.unk_id].piece
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    )
    steps = [normalizers.Replace(" ", "▁")]
    if norm.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    user = [p.piece for p in proto.pieces if p.type == P.USER_DEFINED]
    tok.add_tokens([AddedToken(u, special=False, normalized=False) for u in user])
    special = {
        name: proto.pieces[i].piece
        for name, i in (
            ("unk", spec.unk_id),
            ("bos", spec.bos_id),
            ("eos", spec.eos_id),
            ("pad", spec.pad_id),
        )
        if 0 <= i < len(proto.pieces)
    }
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special.values()])
    transformers = transformers_module()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **{f"{k}_token": v for k, v in special.items()},
    )
    fast.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.model").write_bytes(model_path.read_bytes())  # for ramp's data pipeline
    return {f"{k}_token_id": vocab[v] for k, v in special.items() if k != "unk"}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
