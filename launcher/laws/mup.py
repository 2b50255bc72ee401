"""muP for Adam on an MoE GPT: per-module LR, init, weight-decay and epsilon multipliers from a base shape.

The recipe names a base shape (hidden size, expert hidden size, depth, head dim). From the ratios of the
model to that base, :func:`multiplier_table` derives, per parameter group, the multipliers the trainer
applies through megatron-core's ``config_overrides`` (``max_lr``/``min_lr``/``wd_mult``/``eps``) and the
init std it re-initialises with, plus the global multipliers (residual branch, output logits, embedding
output, attention softmax scale). megatron-core 0.16 has no muP, so ramp computes the table itself.

Rules (Adam; ``m`` = fan-in ratio of the matrix to the base, ``m_d`` = hidden ratio, ``m_a`` = attention
width ratio (heads x head_dim), ``m_L`` = depth ratio, ``a`` = ``depth_alpha``; references below):

================== ========== =================== ==================== ===============================
group              fan-in m   Adam LR mult        init std             eps mult
================== ========== =================== ==================== ===============================
embedding          -          1                   sigma                1/m_d
attention_qkv      m_d        1/m * m_L^(a-1)     sigma/sqrt(m)        1/m * m_L^-a
attention_out      m_a        1/m * m_L^(a-1)     sigma/sqrt(m * 2L*)  1/m * m_L^-a
dense_mlp.fc1      m_d        1/m * m_L^(a-1)     sigma/sqrt(m)        1/m * m_L^-a
dense_mlp.fc2      m_ffn      1/m * m_L^(a-1)     sigma/sqrt(m * 2L*)  1/m * m_L^-a
experts.fc1        m_d        1/m * m_L^(a-1)     sigma/sqrt(m)        1/m * m_L^-a
experts.fc2        m_e        1/m * m_L^(a-1)     sigma/sqrt(m * 2L*)  1/m * m_L^-a
shared_experts.*   as experts (fc2 fan-in: shared expert hidden size)
router             m_d        1/m * m_L^(a-1)     sigma/m              1/m * m_L^-a   (output-like)
output (logits)    -          1                   sigma                1/m_d   logits x output_mult/m_d
output (lr)        -          1/m_d               sigma/m_d            1       logits x output_mult
norms, biases      -          1                   ones / zeros         1   no weight decay
================== ========== =================== ==================== ===============================

Why these three rows differ from a plain "every matrix is hidden" reading (each is visible in the
coordinate check, ``tools/mup_coord_check.py``, which tracks every module type):

* **attention_out**: its fan-in is ``num_attention_heads x head_dim``, which need not be the hidden size
  (moe-30b-a3b: 32 x 128 = 4096 against hidden 2048) nor scale with it. The base attention width is
  ``base_num_attention_heads x base_head_dim`` (each defaulting to the model's own value).
* **router**: its fan-out is the number of experts, which does not grow with width. Tensor Programs V
  (Table 3) treats such a matrix as output-like: init variance ~ 1/fan_in^2 (std sigma/m_d), Adam LR
  ~ 1/fan_in. Its gradient entries are O(1) in width (the gate's gradient sums the residual stream's
  1/width-sized entries over width coordinates), so its Adam eps need not shrink with
  width; it does anyway (as the hidden matrices'), because megatron identifies groups by (wd_mult, lr_mult)
  when loading a checkpoint and a group differing only in eps would not load. As a hidden
  matrix (the first landing, and megatron's use_mup) its logits start O(1) at every width, so a wide
  model's initial routing is as peaked as the base's instead of tending to uniform.
* **eps of embedding and output (logit-scaled)**: under muP the gradient reaching the residual stream has
  entries ~ 1/m_d, so the embedding rows' gradients shrink like 1/m_d, and so do the output matrix's
  (its logits are multiplied by 1/m_d). Adam's eps must shrink with them or it damps their updates at
  large width. (megatron's use_mup keeps base eps for both.) An LR-scaled head (``output_scaling=lr``)
  has O(1) gradients and keeps base eps.

``L*`` is the base depth when depth scaling is on (the residual multiplier ``m_L^-a`` then carries the
depth dependence, so the block init stays that of the base), else the model's depth: megatron's usual
``sigma/sqrt(2L)`` output-projection init. Weight decay: ``independent`` (default) keeps the per-step
decay ``lr * wd`` of every group equal to the base's, so ``wd_mult = 1/lr_mult`` (Wortsman et al. 2023,
arXiv 2309.14322; Wang & Aitchison 2024, arXiv 2405.13698: under muP the AdamW decay must grow with
fan-in); ``coupled`` leaves ``wd_mult = 1`` (megatron's muP). Norms and biases never decay, as in
megatron's ``get_standard_config_overrides``. Explicit ``optimizer.lr_mult`` entries replace the
derived LR multiplier of a module (or of one group, e.g. ``experts.fc2``); with ``independent`` decay
the group's ``wd_mult`` follows the new LR so the decay stays decoupled.

References: Tensor Programs V (Yang et al., arXiv 2203.03466), Table 3 (``output_scaling=lr``) and
Table 8 (``output_scaling=logits``, embedding and output at base LR, logits x 1/m_d); Depth-muP, Tensor
Programs VI (Yang et al., arXiv 2310.02244) for ``a = 1/2``: branch multiplier ``1/sqrt(m_L)``, Adam LR of
block matrices ``x 1/sqrt(m_L)``; CompleteP (Dey et al., arXiv 2505.01618) for general ``a`` in [1/2, 1].
The MoE paper whose transfer rules we would prefer (arXiv 2601.05049) could not be read in full
(/work/shared/research/papers.md section 3.3), so expert rules follow the fan-in rule above: the expert
down-projection scales with the expert hidden size, not the model width.

Agreement with megatron-core muP (Megatron-LM main, checked in NVIDIA/Megatron-LM at commit
d98e8a64ddf34856e74b24714e3bedb2f5a39553, core >= 0.17; tests/unit/test_mup.py re-states these rules):

- ``megatron/core/optimizer/__init__.py::get_mup_config_overrides``: Adam hidden (2-D, non-embedding)
  params get ``max_lr``/``min_lr`` x 1/width_mult and ``eps`` x 1/width_mult; embedding-class and 1-D
  params keep base LR and eps. Same here when expert, dense-FFN and shared-expert widths scale with the
  hidden size and depth is not scaled (the router and the eps of embedding and output differ: below).
- ``megatron/core/models/common/language_module/language_module.py::setup_embeddings_and_output_layer``
  marks the output layer ``is_embedding_parameter`` under use_mup: base LR/eps. Same as our default
  ``output_scaling=logits``.
- ``megatron/core/transformer/transformer_config.py`` (``use_mup``, ``mup_width_mult``,
  ``mup_base_hidden_size``, ``mup_output_mult``, ``mup_embedding_mult``, ``mup_base_head_dim``,
  ``mup_attn_scale_power`` and the ``__post_init__`` MuP block): width_mult = hidden/base_hidden;
  hidden init std / sqrt(width_mult); output projections ``megatron/core/utils.py::
  mup_scaled_init_method_normal`` = sigma / (sqrt(2L) sqrt(width_mult)); embedding and untied output
  init unscaled (``gpt_model.py`` uses ``embedding_init_method`` for the output layer); logits x
  1/width_mult when ``mup_output_mult`` is left at 1; softmax scale sqrt(base_head_dim)/head_dim
  (1/head_dim without a base head dim). All the same here.

Deliberate differences: (1) weight decay defaults to ``independent`` (megatron keeps it coupled; set
``weight_decay_rule: coupled`` to match); (2) expert/dense/shared down-projections use their own fan-in
ratio (megatron uses width_mult everywhere); (3) depth scaling (residual multiplier, block LR and eps)
which megatron's use_mup does not have; (4) ``output_mult`` is the base-shape logit multiplier and is
divided by m_d, whereas a non-default ``mup_output_mult`` in megatron is absolute; (5) the router is
output-like (megatron: hidden); (6) embedding and logit-scaled output eps x 1/m_d (megatron: base eps);
(7) attention_out's fan-in is heads x head_dim (megatron: width_mult).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.errors import RampError, require

if TYPE_CHECKING:
    from launcher.recipe import ModelConfig

#: Parameter groups: (group name, module, fnmatch globs over megatron-core GPTModel parameter names).
#: Names come from the local spec (SequentialMLP: ``experts.local_experts.E.linear_fc1.weight``), the
#: TE spec (fused ``linear_qkv.layer_norm_weight``, TEGroupedMLP ``experts.linear_fc1.weightE``) and the
#: legacy GroupedMLP (``experts.weight1``/``weight2``). Globs start with ``*`` so DDP/Float16Module
#: prefixes (``module.``) still match. Every parameter matches exactly one group (tested).
GROUP_GLOBS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "embedding",
        "embedding",
        ("*embedding.word_embeddings.weight", "*embedding.position_embeddings.weight"),
    ),
    ("attention_qkv", "attention_qkv", ("*.self_attention.linear_qkv.weight",)),
    ("attention_out", "attention_out", ("*.self_attention.linear_proj.weight",)),
    ("dense_mlp.fc1", "dense_mlp", ("*.mlp.linear_fc1.weight",)),
    ("dense_mlp.fc2", "dense_mlp", ("*.mlp.linear_fc2.weight",)),
    (
        "experts.fc1",
        "experts",
        (
            "*.mlp.experts.local_experts.*.linear_fc1.weight",
            "*.mlp.experts.linear_fc1.weight[0-9]*",
            "*.mlp.experts.weight1",
        ),
    ),
    (
        "experts.fc2",
        "experts",
        (
            "*.mlp.experts.local_experts.*.linear_fc2.weight",
            "*.mlp.experts.linear_fc2.weight[0-9]*",
            "*.mlp.experts.weight2",
        ),
    ),
    ("shared_experts.fc1", "shared_experts", ("*.mlp.shared_experts.linear_fc1.weight",)),
    ("shared_experts.fc2", "shared_experts", ("*.mlp.shared_experts.linear_fc2.weight",)),
    ("router", "router", ("*.mlp.router.weight",)),
    ("output", "output", ("*output_layer.weight",)),
    (
        "norms",
        "norms",
        ("*layernorm.weight", "*.layer_norm_weight", "*.layer_norm_bias", "*.bias", "*.bias[0-9]*"),
    ),
)

MODULES: tuple[str, ...] = tuple(dict.fromkeys(m for _, m, _ in GROUP_GLOBS))
GROUPS: tuple[str, ...] = tuple(g for g, _, _ in GROUP_GLOBS)
_GLOBS = {g: globs for g, _, globs in GROUP_GLOBS}
_MODULE_OF_GROUP = {g: m for g, m, _ in GROUP_GLOBS}

ATTENTION_SCALES = ("1/d", "sqrt")
OUTPUT_SCALINGS = ("logits", "lr")
WD_RULES = ("independent", "coupled")


@dataclass
class MupConfig:
    """Base shape and options for muP. ``enabled: false`` gives the standard parameterisation (all 1).

    A base size left unset means "same as the model" for hidden size, depth and head dim; the dense-FFN
    and expert hidden sizes then scale with the hidden size, and shared experts with the experts.
    """

    enabled: bool = False
    base_hidden_size: int | None = None
    base_moe_ffn_hidden_size: int | None = None  # expert hidden size of the base
    base_ffn_hidden_size: int | None = None  # dense MLP hidden size; None: keeps the model's ffn/hidden
    base_shared_expert_hidden_size: int | None = None  # None: scales like the expert hidden size
    base_num_layers: int | None = None  # None: no depth scaling
    base_head_dim: int | None = None
    base_num_attention_heads: int | None = None  # None: the model's; with base_head_dim, attention width
    attention_scale: str = "1/d"  # 1/d: sqrt(base_head_dim)/head_dim (muP) | sqrt: 1/sqrt(head_dim)
    output_scaling: str = "logits"  # logits: logits x output_mult/m_d, base LR | lr: LR x 1/m_d
    output_mult: float = 1.0  # logit multiplier at the base shape (tunable on the base)
    embedding_mult: float = 1.0  # multiplier on the embedding output (tunable on the base)
    depth_alpha: float = 0.5  # residual multiplier m_L^-alpha; 0.5 = Depth-muP, 1 = CompleteP
    weight_decay_rule: str = "independent"  # independent: lr*wd fixed per group | coupled: wd_mult 1
    scale_eps: bool = True  # Adam eps x the gradient scale of hidden matrices (megatron does)

    def __post_init__(self) -> None:
        for name in (
            "base_hidden_size",
            "base_moe_ffn_hidden_size",
            "base_ffn_hidden_size",
            "base_shared_expert_hidden_size",
            "base_num_layers",
            "base_head_dim",
            "base_num_attention_heads",
        ):
            v = getattr(self, name)
            if v is not None:
                require(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0,
                    f"mup.{name}={v!r}: must be a positive integer",
                )
        for name in ("output_mult", "embedding_mult"):
            v = getattr(self, name)
            require(_positive_number(v), f"mup.{name}={v!r}: multipliers must be positive numbers")
        for name, choices in (
            ("attention_scale", ATTENTION_SCALES),
            ("output_scaling", OUTPUT_SCALINGS),
            ("weight_decay_rule", WD_RULES),
        ):
            v = getattr(self, name)
            require(v in choices, f"mup.{name}={v!r}: choose one of {', '.join(choices)}")
        require(
            _positive_number(self.depth_alpha) and 0.5 <= self.depth_alpha <= 1.0,
            f"mup.depth_alpha={self.depth_alpha!r}: must be in [0.5, 1] (0.5 = Depth-muP, 1 = CompleteP)",
        )


@dataclass(frozen=True)
class GroupMult:
    """Multipliers for one parameter group (a module, or one matrix of an MLP module)."""

    name: str
    module: str
    globs: tuple[str, ...]
    fan_in_mult: float  # fan-in of the matrix / the base's (1 for vector-like and embedding)
    lr_mult: float  # x each group's peak and minimum LR
    wd_mult: float  # megatron's wd_mult: the group's weight decay = optimizer.weight_decay x this
    weight_decay: float  # the resulting AdamW weight-decay coefficient
    eps_mult: float  # x Adam eps
    init_std: float | None  # absolute init std; None: norms (ones) and biases (zeros)
    init_std_mult: float | None  # init_std / model.init_method_std
    source: str  # derived | override | tied
    note: str = ""


@dataclass(frozen=True)
class MupTable:
    """The resolved table: per-group multipliers plus the model-wide ones. Printed at start, saved as JSON."""

    enabled: bool
    groups: tuple[GroupMult, ...]
    width_mult: float
    attention_width_mult: float  # (heads x head_dim) / the base's: fan-in of attention_out
    ffn_width_mult: float
    expert_width_mult: float
    shared_expert_width_mult: float
    depth_mult: float
    head_dim_mult: float
    residual_mult: float  # x the output of every attention and MLP branch before the residual add
    output_logit_mult: float  # x the logits
    embedding_mult: float  # x the embedding output
    softmax_scale: float  # attention QK^T scale (pass as TransformerConfig.softmax_scale)
    attention_scale: str
    weight_decay: float
    weight_decay_rule: str
    depth_alpha: float
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, key: str) -> GroupMult:
        """A group by name (``experts.fc2``) or a module with a single group (``router``)."""
        for g in self.groups:
            if g.name == key:
                return g
        hits = [g for g in self.groups if g.module == key]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise KeyError(f"module {key!r} has several groups: {', '.join(g.name for g in hits)}")
        raise KeyError(key)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.module for g in self.groups))

    def module(self, name: str) -> tuple[GroupMult, ...]:
        """All groups of one module (``experts`` -> fc1 and fc2)."""
        return tuple(g for g in self.groups if g.module == name)

    def group_for(self, param_name: str) -> GroupMult:
        """The group a megatron-core parameter name belongs to."""
        name = group_of(param_name)
        for g in self.groups:
            if g.name == name:
                return g
        raise RampError(f"parameter {param_name!r} belongs to muP group {name!r}, absent from this model")

    def lr_mults(self) -> dict[str, float]:
        """LR multiplier per group name: ``optim.build_optimizer(lr_mults=..., module_of=group_of)``."""
        return {g.name: g.lr_mult for g in self.groups}

    def wd_mults(self) -> dict[str, float]:
        """megatron ``wd_mult`` per group name (0 for norms and biases)."""
        return {g.name: g.wd_mult for g in self.groups}

    def eps_mults(self) -> dict[str, float]:
        """Adam eps multiplier per group name (a param-group ``eps`` override)."""
        return {g.name: g.eps_mult for g in self.groups}

    def init_stds(self) -> dict[str, float]:
        """Init std per group name for matrices (norms and biases keep ones and zeros)."""
        return {g.name: g.init_std for g in self.groups if g.init_std is not None}

    def param_group_overrides(
        self, lr: float, min_lr: float, adam_eps: float
    ) -> list[tuple[tuple[str, ...], dict[str, float]]]:
        """(globs, override) pairs in the shape of megatron-core's ``ParamGroupOverride``.

        Wrap each glob tuple in ``ParamKey(name=globs)``. ``lr_mult`` is only a tag for megatron (its
        scheduler reads ``max_lr``/``min_lr``), but checkpoint loading identifies groups by
        ``(wd_mult, lr_mult)``, so keep it. Norms and biases carry ``wd_mult=0``, the same value megatron's
        standard overrides give 1-D params, so the two can be combined without a conflict.
        """
        return [
            (
                g.globs,
                {
                    "max_lr": lr * g.lr_mult,
                    "min_lr": min_lr * g.lr_mult,
                    "lr_mult": g.lr_mult,
                    "wd_mult": g.wd_mult,
                    "eps": adam_eps * g.eps_mult,
                },
            )
            for g in self.groups
        ]

    def format_table(self) -> str:
        """A fixed-width table for the start-up print."""
        head = (
            f"muP {'on' if self.enabled else 'off'}: width x{self.width_mult:g}, "
            f"attention x{self.attention_width_mult:g}, ffn x{self.ffn_width_mult:g}, "
            f"experts x{self.expert_width_mult:g}, shared x{self.shared_expert_width_mult:g}, "
            f"depth x{self.depth_mult:g}, head dim x{self.head_dim_mult:g}"
        )
        glob = (
            f"residual x{self.residual_mult:.4g}, logits x{self.output_logit_mult:.4g}, embedding x"
            f"{self.embedding_mult:.4g}, softmax scale {self.softmax_scale:.4g} ({self.attention_scale}), "
            f"weight decay {self.weight_decay:g} ({self.weight_decay_rule})"
        )
        cols = ("group", "fan-in", "lr x", "wd x", "wd", "eps x", "init std", "source", "note")
        rows = [
            (
                g.name,
                f"{g.fan_in_mult:.4g}",
                f"{g.lr_mult:.4g}",
                f"{g.wd_mult:.4g}",
                f"{g.weight_decay:.4g}",
                f"{g.eps_mult:.4g}",
                "ones/zeros" if g.init_std is None else f"{g.init_std:.4g}",
                g.source,
                g.note,
            )
            for g in self.groups
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [head, glob, fmt.format(*cols).rstrip()]
        lines += [fmt.format(*r).rstrip() for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, saved beside the run."""
        out: dict[str, Any] = {
            k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("groups", "notes")
        }
        out["groups"] = {
            g.name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.__dict__.items()}
            for g in self.groups
        }
        out["notes"] = list(self.notes)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def group_of(param_name: str) -> str:
    """The muP group (``experts.fc2``, ``norms``, ...) whose globs select this parameter name."""
    hits = [g for g, globs in _GLOBS.items() if any(fnmatch.fnmatchcase(param_name, p) for p in globs)]
    require(
        len(hits) > 0, f"parameter {param_name!r} matches no muP module; add it to laws/mup.py GROUP_GLOBS"
    )
    require(len(hits) == 1, f"parameter {param_name!r} matches several muP groups: {', '.join(hits)}")
    return hits[0]


def module_of(param_name: str) -> str:
    """The muP module (``experts``, ``router``, ``norms``, ...) of a megatron-core parameter name."""
    return _MODULE_OF_GROUP[group_of(param_name)]


def multiplier_table(
    model: ModelConfig, mup: MupConfig, lr_mult_overrides: dict[str, float], weight_decay: float
) -> MupTable:
    """Derive the per-group table for ``model`` from ``mup`` and apply the recipe's LR overrides."""
    require(
        _positive_number(weight_decay) or weight_decay == 0,
        f"optimizer.weight_decay={weight_decay!r}: must be >= 0",
    )
    on = mup.enabled
    notes: list[str] = []
    has_shared = model.is_moe and bool(model.moe_shared_expert_hidden_size)

    def ratio(value: int, base: int | None, what: str, base_field: str, default: float) -> float:
        if not on or base is None:
            return default
        require(
            base <= value,
            f"mup.{base_field}={base} is larger than model.{what}={value}: "
            "the base shape must not exceed the model",
        )
        require(
            value % base == 0,
            f"mup.{base_field}={base} does not divide model.{what}={value}: "
            "the model must be a whole multiple of the base shape",
        )
        return value / base

    m_d = ratio(model.hidden_size, mup.base_hidden_size, "hidden_size", "base_hidden_size", 1.0)
    m_L = ratio(model.num_layers, mup.base_num_layers, "num_layers", "base_num_layers", 1.0)
    m_h = ratio(model.head_dim, mup.base_head_dim, "head_dim (kv_channels)", "base_head_dim", 1.0)
    m_heads = ratio(
        model.num_attention_heads,
        mup.base_num_attention_heads,
        "num_attention_heads",
        "base_num_attention_heads",
        1.0,
    )
    m_a = m_h * m_heads  # attention width heads x head_dim, relative to the base's
    has_dense = not model.is_moe or model.first_k_dense > 0
    m_ff = (
        ratio(model.ffn_hidden_size, mup.base_ffn_hidden_size, "ffn_hidden_size", "base_ffn_hidden_size", m_d)
        if has_dense
        else m_d
    )
    m_e = (
        ratio(
            model.moe_ffn_hidden_size,
            mup.base_moe_ffn_hidden_size,
            "moe_ffn_hidden_size",
            "base_moe_ffn_hidden_size",
            m_d,
        )
        if model.is_moe
        else m_d
    )
    m_s = (
        ratio(
            int(model.moe_shared_expert_hidden_size or 0),
            mup.base_shared_expert_hidden_size,
            "moe_shared_expert_hidden_size",
            "base_shared_expert_hidden_size",
            m_e,
        )
        if has_shared
        else m_e
    )
    alpha = mup.depth_alpha
    depth_on = on and mup.base_num_layers is not None
    residual = m_L**-alpha if depth_on else 1.0
    depth_lr = m_L ** (alpha - 1.0) if depth_on else 1.0
    depth_eps = m_L**-alpha if depth_on else 1.0
    sigma = model.init_method_std
    l_ref = mup.base_num_layers if depth_on else model.num_layers
    out_proj_scale = 1.0 / math.sqrt(2.0 * l_ref)

    if on and mup.output_scaling == "lr":
        require(
            not model.tie_embeddings,
            "mup.output_scaling=lr needs model.tie_embeddings=false (a tied head shares the embedding's LR)",
        )

    def hidden(name: str, fan_in: float, out_proj: bool, note: str = "") -> GroupMult:
        lr = depth_lr / fan_in
        eps = depth_eps / fan_in if mup.scale_eps else 1.0
        std = sigma / math.sqrt(fan_in) * (out_proj_scale if out_proj else 1.0)
        return _group(name, fan_in, lr, eps, std, sigma, "derived", note)

    # Gradients of the embedding and of a logit-scaled head shrink like 1/m_d under muP: so does their eps.
    small_grad_eps = 1.0 / m_d if mup.scale_eps else 1.0
    groups: list[GroupMult] = [
        _group("embedding", 1.0, 1.0, small_grad_eps, sigma, sigma, "derived", "base LR (muP)")
    ]
    groups.append(hidden("attention_qkv", m_d, False, "fan-in hidden"))
    groups.append(hidden("attention_out", m_a, True, "fan-in heads*head_dim"))
    if has_dense:
        groups.append(hidden("dense_mlp.fc1", m_d, False, "fan-in hidden"))
        groups.append(hidden("dense_mlp.fc2", m_ff, True, "fan-in ffn_hidden_size"))
    if model.is_moe:
        groups.append(hidden("experts.fc1", m_d, False, "fan-in hidden"))
        groups.append(hidden("experts.fc2", m_e, True, "fan-in moe_ffn_hidden_size"))
        if has_shared:
            groups.append(hidden("shared_experts.fc1", m_d, False, "fan-in hidden"))
            groups.append(hidden("shared_experts.fc2", m_s, True, "fan-in shared expert hidden size"))
        # Output-like (fan-out = experts, fixed): Tensor Programs V Table 3, init std sigma/m, LR 1/m.
        # eps as the hidden matrices' (smaller than its O(1) gradients need, which is harmless): megatron
        # matches param groups by (wd_mult, lr_mult) when loading, so a group differing only in eps from the
        # hidden matrices' would not load.
        router_eps = depth_eps / m_d if mup.scale_eps else 1.0
        groups.append(
            _group(
                "router",
                m_d,
                depth_lr / m_d,
                router_eps,
                sigma / m_d,
                sigma,
                "derived",
                "output-like: fan-out experts",
            )
        )
    if model.tie_embeddings:
        groups.append(
            _group("output", 1.0, 1.0, small_grad_eps, sigma, sigma, "tied", "tied: the embedding's copy")
        )
        logit = mup.output_mult / m_d if on else 1.0
    elif on and mup.output_scaling == "lr":
        groups.append(_group("output", m_d, 1.0 / m_d, 1.0, sigma / m_d, sigma, "derived", "LR-scaled head"))
        logit = mup.output_mult
    else:
        groups.append(
            _group("output", 1.0, 1.0, small_grad_eps, sigma, sigma, "derived", "base LR, logits scaled")
        )
        logit = mup.output_mult / m_d if on else 1.0
    groups.append(
        GroupMult(
            "norms", "norms", _GLOBS["norms"], 1.0, 1.0, 0.0, 0.0, 1.0, None, None, "derived", "and biases"
        )
    )

    if not on:
        # With muP off every ratio above is 1: this is megatron's standard init (sigma, sigma/sqrt(2L)).
        notes.append("muP disabled: standard parameterisation; only optimizer.lr_mult overrides apply")
        groups = [dataclasses.replace(g, note=g.note if g.source == "tied" else "") for g in groups]

    groups = _apply_overrides(groups, lr_mult_overrides, model)
    groups = [_with_decay(g, weight_decay, mup.weight_decay_rule if on else "coupled") for g in groups]

    if on and mup.attention_scale == "1/d":
        softmax_scale = (math.sqrt(mup.base_head_dim) if mup.base_head_dim else 1.0) / model.head_dim
    else:
        softmax_scale = 1.0 / math.sqrt(model.head_dim)
    if on and mup.attention_scale == "1/d" and mup.base_head_dim is None:
        notes.append(
            "attention scale 1/head_dim without mup.base_head_dim: not the standard scale at the base"
        )
    if depth_on:
        notes.append(
            f"depth: residual branches x m_L^-{alpha:g}; block matrices LR x m_L^{alpha - 1:g}, "
            f"eps x m_L^-{alpha:g}; output-projection init uses the base depth {l_ref}"
        )
    return MupTable(
        enabled=on,
        groups=tuple(groups),
        width_mult=m_d,
        attention_width_mult=m_a,
        ffn_width_mult=m_ff,
        expert_width_mult=m_e,
        shared_expert_width_mult=m_s,
        depth_mult=m_L,
        head_dim_mult=m_h,
        residual_mult=residual,
        output_logit_mult=logit,
        embedding_mult=mup.embedding_mult if on else 1.0,
        softmax_scale=softmax_scale,
        attention_scale=mup.attention_scale if on else "sqrt",
        weight_decay=float(weight_decay),
        weight_decay_rule=mup.weight_decay_rule if on else "coupled",
        depth_alpha=alpha,
        notes=tuple(notes),
    )


def _group(
    name: str, fan_in: float, lr: float, eps: float, std: float, sigma: float, source: str, note: str
) -> GroupMult:
    return GroupMult(
        name=name,
        module=_MODULE_OF_GROUP[name],
        globs=_GLOBS[name],
        fan_in_mult=fan_in,
        lr_mult=lr,
        wd_mult=1.0,
        weight_decay=0.0,
        eps_mult=eps,
        init_std=std,
        init_std_mult=std / sigma,
        source=source,
        note=note,
    )


def _apply_overrides(
    groups: list[GroupMult], overrides: dict[str, float], model: ModelConfig
) -> list[GroupMult]:
    """Explicit ``optimizer.lr_mult`` entries replace derived LR multipliers (a module or one group)."""
    for key, value in (overrides or {}).items():
        require(
            _positive_number(value),
            f"optimizer.lr_mult.{key}={value!r}: multipliers must be positive numbers",
        )
        if key not in MODULES and key not in GROUPS:
            near = difflib.get_close_matches(str(key), [*MODULES, *GROUPS], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise RampError(
                f"optimizer.lr_mult.{key}: unknown module{hint} (modules: {', '.join(MODULES)}; "
                f"groups: {', '.join(g for g in GROUPS if '.' in g)})"
            )
        if key == "output" and model.tie_embeddings:
            raise RampError(
                "optimizer.lr_mult.output: model.tie_embeddings=true, the head is the embedding; "
                "set optimizer.lr_mult.embedding"
            )
        targets = [g for g in groups if g.name == key or g.module == key]
        if key == "embedding" and model.tie_embeddings:
            targets += [g for g in groups if g.name == "output"]
        require(
            bool(targets),
            f"optimizer.lr_mult.{key}: this model has no {key} "
            f"(its groups: {', '.join(g.name for g in groups)}); remove the entry",
        )
        for g in targets:
            i = groups.index(g)
            groups[i] = dataclasses.replace(g, lr_mult=float(value), source="override")
    return groups


def _with_decay(g: GroupMult, weight_decay: float, rule: str) -> GroupMult:
    if g.name == "norms":
        return dataclasses.replace(g, wd_mult=0.0, weight_decay=0.0)
    wd_mult = 1.0 / g.lr_mult if rule == "independent" else 1.0
    return dataclasses.replace(g, wd_mult=wd_mult, weight_decay=weight_decay * wd_mult)


def _positive_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
