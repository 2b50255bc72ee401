"""muP multiplier table: width/expert/depth scaling, overrides, glob partition, megatron agreement, errors."""

from __future__ import annotations

import json
import math

import pytest

from launcher.errors import RampError
from launcher.laws.mup import GROUPS, MODULES, MupConfig, group_of, module_of, multiplier_table
from launcher.recipe import ModelConfig

HIDDEN = ("attention_qkv", "attention_out", "dense_mlp.fc1", "dense_mlp.fc2", "experts.fc1", "experts.fc2")
HIDDEN += ("shared_experts.fc1", "shared_experts.fc2")
OUT_PROJ = ("attention_out", "dense_mlp.fc2", "experts.fc2", "shared_experts.fc2")


def model(width: int = 1, expert: int = 1, layers: int = 4, tied: bool = False, **kw) -> ModelConfig:
    """A base of hidden 64, 4 heads of 16, ffn 256, experts 32, shared 64, scaled by the given factors."""
    return ModelConfig(
        hidden_size=64 * width,
        num_attention_heads=4,
        num_layers=layers,
        ffn_hidden_size=256 * width,
        num_experts=4,
        moe_ffn_hidden_size=32 * expert,
        moe_shared_expert_hidden_size=64 * expert,
        first_k_dense=1,
        tie_embeddings=tied,
        **kw,
    )


BASE = dict(
    enabled=True,
    base_hidden_size=64,
    base_ffn_hidden_size=256,
    base_moe_ffn_hidden_size=32,
    base_shared_expert_hidden_size=64,
    base_head_dim=16,
)


def table(m: ModelConfig, overrides: dict | None = None, wd: float = 0.1, **mup):
    return multiplier_table(m, MupConfig(**{**BASE, **mup}), overrides or {}, wd)


@pytest.mark.parametrize("mup", [dict(BASE), dict(enabled=False)], ids=["base-shape", "disabled"])
def test_everything_is_one_at_the_base_shape(mup: dict) -> None:
    m = model()
    t = multiplier_table(m, MupConfig(**mup), {}, 0.1)
    assert {g.name for g in t.groups} == set(GROUPS)
    sigma = m.init_method_std
    for g in t.groups:
        assert (g.lr_mult, g.eps_mult) == (1.0, 1.0), g.name
        assert g.wd_mult == (0.0 if g.name == "norms" else 1.0), g.name
        if (
            g.init_std is not None
        ):  # megatron's standard init: sigma, and sigma/sqrt(2L) on output projections
            expected = sigma / math.sqrt(2 * m.num_layers) if g.name in OUT_PROJ else sigma
            assert g.init_std == pytest.approx(expected), g.name
    assert (t.residual_mult, t.output_logit_mult, t.embedding_mult) == (1.0, 1.0, 1.0)
    assert t.softmax_scale == pytest.approx(1 / math.sqrt(16))  # 1/d with base head dim 16 == 1/sqrt(16)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_hidden_matrices_scale_as_one_over_width(k: int) -> None:
    m = model(width=k, expert=k)
    t = table(m)
    assert t.width_mult == k
    for name in HIDDEN:
        g = t[name]
        assert g.lr_mult == pytest.approx(1 / k), name
        assert g.eps_mult == pytest.approx(1 / k), name
        assert g.init_std == pytest.approx(table(model())[name].init_std / math.sqrt(k)), name
        assert g.wd_mult == pytest.approx(k), name  # independent decay: lr * wd stays the base's
        assert g.weight_decay == pytest.approx(0.1 * k), name
    for name in ("embedding", "output", "norms"):
        assert t[name].lr_mult == 1.0, name
    assert t["embedding"].init_std == t["output"].init_std == m.init_method_std
    # Their gradients shrink like 1/width (logits x 1/k; the residual stream's gradient ~ 1/k): so does eps.
    assert t["embedding"].eps_mult == t["output"].eps_mult == pytest.approx(1 / k)
    assert t["norms"].eps_mult == 1.0
    # The router is output-like (fan-out = 4 experts at every width): init sigma/k, LR 1/k, eps 1.
    router = t["router"]
    assert (router.lr_mult, router.eps_mult) == (pytest.approx(1 / k), pytest.approx(1 / k))
    assert router.init_std == pytest.approx(m.init_method_std / k)
    assert t.output_logit_mult == pytest.approx(1 / k)
    assert t.softmax_scale == pytest.approx(math.sqrt(16) / (16 * k))  # 4 heads: head dim 16k, 1/d
    assert table(m, output_mult=2.0).output_logit_mult == pytest.approx(2.0 / k)
    coupled = table(m, weight_decay_rule="coupled")
    assert all(coupled[n].wd_mult == 1.0 for n in HIDDEN)


def test_expert_down_projection_scales_with_the_expert_hidden_size() -> None:
    t = table(model(width=1, expert=4))
    assert t.expert_width_mult == 4 and t.width_mult == 1
    assert t["experts.fc1"].lr_mult == 1.0  # fan-in is the model width
    assert t["experts.fc2"].lr_mult == pytest.approx(0.25)  # fan-in is the expert hidden size
    assert t["shared_experts.fc2"].lr_mult == pytest.approx(0.25)
    assert t["router"].lr_mult == 1.0
    assert t["experts.fc2"].init_std == pytest.approx(table(model())["experts.fc2"].init_std / 2)


def test_attention_out_fan_in_is_heads_times_head_dim() -> None:
    # moe-30b-a3b's attention: 32 heads x 128 = 4096 wide on a 2048 hidden. A base of hidden 512 with
    # 32 heads x 64 doubles the attention width but quadruples the hidden size.
    m = ModelConfig(hidden_size=2048, num_attention_heads=32, kv_channels=128, num_layers=2, num_experts=0)
    t = multiplier_table(m, MupConfig(enabled=True, base_hidden_size=512, base_head_dim=64), {}, 0.1)
    assert (t.width_mult, t.attention_width_mult) == (4, 2)
    assert t["attention_qkv"].lr_mult == pytest.approx(1 / 4)  # fan-in: hidden
    assert t["attention_out"].lr_mult == pytest.approx(1 / 2)  # fan-in: 32 x 128 against 32 x 64
    # Fewer heads in the base: 8 x 128 = 1024 -> 4096 is 4x.
    t = multiplier_table(
        m,
        MupConfig(enabled=True, base_hidden_size=512, base_num_attention_heads=8, base_head_dim=128),
        {},
        0.1,
    )
    assert t.attention_width_mult == 4 and t["attention_out"].lr_mult == pytest.approx(1 / 4)


def test_unset_base_sizes_follow_the_hidden_ratio() -> None:
    t = multiplier_table(model(width=4, expert=4), MupConfig(enabled=True, base_hidden_size=64), {}, 0.1)
    assert t.ffn_width_mult == t.expert_width_mult == t.shared_expert_width_mult == 4
    assert t.depth_mult == 1 and t.residual_mult == 1.0


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_depth_residual_multiplier_and_block_lr(alpha: float) -> None:
    m = model(width=2, expert=2, layers=16)
    t = table(m, base_num_layers=4, depth_alpha=alpha)
    assert t.depth_mult == 4
    assert t.residual_mult == pytest.approx(4**-alpha)  # 1/sqrt(depth ratio) for Depth-muP
    for name in HIDDEN:
        assert t[name].lr_mult == pytest.approx(0.5 * 4 ** (alpha - 1)), name
        assert t[name].eps_mult == pytest.approx(0.5 * 4**-alpha), name
    assert t["router"].lr_mult == pytest.approx(0.5 * 4 ** (alpha - 1))  # a block matrix
    assert t["router"].eps_mult == pytest.approx(0.5 * 4**-alpha)  # as hidden: one group when loading
    # Output projections keep the base depth's init; the residual multiplier carries the depth scaling.
    assert t["attention_out"].init_std == pytest.approx(m.init_method_std / math.sqrt(2 * 4) / math.sqrt(2))
    for name in ("embedding", "output", "norms"):
        assert t[name].lr_mult == 1.0


def test_overrides_win_over_derived_values() -> None:
    m = model(width=4, expert=4)
    t = table(m, {"router": 0.5, "experts.fc2": 0.125, "norms": 2.0})
    assert t["router"].lr_mult == 0.5 and t["router"].source == "override"
    assert t["router"].wd_mult == pytest.approx(2.0)  # decay stays decoupled from the new LR
    assert t["experts.fc2"].lr_mult == 0.125 and t["experts.fc1"].lr_mult == pytest.approx(0.25)
    assert t["norms"].lr_mult == 2.0 and t["norms"].wd_mult == 0.0
    both = table(m, {"experts": 0.3})
    assert both["experts.fc1"].lr_mult == both["experts.fc2"].lr_mult == 0.3
    off = multiplier_table(m, MupConfig(enabled=False), {"router": 0.5}, 0.1)
    assert off["router"].lr_mult == 0.5 and off["attention_qkv"].lr_mult == 1.0


def test_tied_embeddings_share_the_embedding_multipliers() -> None:
    m = model(width=4, expert=4, tied=True)
    t = table(m, {"embedding": 0.5})
    assert t["output"].lr_mult == t["embedding"].lr_mult == 0.5
    assert t.output_logit_mult == pytest.approx(0.25)
    with pytest.raises(RampError, match="tie_embeddings"):
        table(m, {"output": 0.5})
    with pytest.raises(RampError, match="tie_embeddings=false"):
        table(m, output_scaling="lr")
    untied = table(model(width=4, expert=4), output_scaling="lr")
    assert untied["output"].lr_mult == pytest.approx(0.25) and untied.output_logit_mult == 1.0
    assert untied["output"].init_std == pytest.approx(m.init_method_std / 4)


def test_table_prints_and_saves() -> None:
    t = table(model(width=2, expert=2), {"router": 0.5})
    text = t.format_table()
    for g in t.groups:
        assert g.name in text
    data = json.loads(t.to_json())
    assert set(data["groups"]) == {g.name for g in t.groups}
    assert data["groups"]["router"]["lr_mult"] == 0.5 and data["width_mult"] == 2
    ov = dict((g, o) for g, o in t.param_group_overrides(lr=1e-3, min_lr=1e-4, adam_eps=1e-8))
    qkv = ov[t["attention_qkv"].globs]
    assert qkv["max_lr"] == pytest.approx(5e-4) and qkv["min_lr"] == pytest.approx(5e-5)
    assert qkv["eps"] == pytest.approx(5e-9) and qkv["wd_mult"] == pytest.approx(2.0)
    assert t.lr_mults()["experts.fc2"] == pytest.approx(0.5) and t.wd_mults()["norms"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# The globs partition megatron-core GPTModel parameter names. The local-spec names were listed from a real
# GPTModel (megatron-core 0.16.1, get_gpt_decoder_block_spec, SequentialMLP); TE (fused layer norms,
# TEGroupedMLP weightN) and legacy GroupedMLP (weight1/weight2) names come from their sources.

LOCAL = [
    "embedding.word_embeddings.weight",
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.self_attention.linear_proj.bias",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv.bias",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc1.bias",
    "decoder.layers.0.mlp.linear_fc2.weight",
    "decoder.layers.0.mlp.linear_fc2.bias",
    "decoder.layers.1.input_layernorm.weight",
    "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.self_attention.linear_qkv.weight",
    "decoder.layers.1.pre_mlp_layernorm.weight",
    "decoder.layers.1.mlp.router.weight",
    "decoder.layers.1.mlp.router.bias",
    "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
    "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.bias",
    "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight",
    "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.bias",
    "decoder.layers.1.mlp.experts.local_experts.11.linear_fc1.weight",
    "decoder.layers.1.mlp.experts.local_experts.11.linear_fc2.weight",
    "decoder.layers.1.mlp.shared_experts.linear_fc1.weight",
    "decoder.layers.1.mlp.shared_experts.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
]
TE = [
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.1.mlp.experts.linear_fc1.weight0",
    "decoder.layers.1.mlp.experts.linear_fc1.weight15",
    "decoder.layers.1.mlp.experts.linear_fc1.bias3",
    "decoder.layers.1.mlp.experts.linear_fc2.weight7",
    "decoder.layers.1.mlp.experts.linear_fc2.bias0",
    "decoder.layers.1.mlp.experts.weight1",
    "decoder.layers.1.mlp.experts.weight2",
    "embedding.position_embeddings.weight",
]
EXPECTED_GROUP = {
    "embedding": "embedding",
    "linear_qkv.weight": "attention_qkv",
    "linear_proj.weight": "attention_out",
    "0.mlp.linear_fc1.weight": "dense_mlp.fc1",
    "0.mlp.linear_fc2.weight": "dense_mlp.fc2",
    "linear_fc1.weight0": "experts.fc1",
    "linear_fc1.weight15": "experts.fc1",
    "experts.weight1": "experts.fc1",
    "linear_fc2.weight7": "experts.fc2",
    "experts.weight2": "experts.fc2",
    "local_experts.0.linear_fc1.weight": "experts.fc1",
    "local_experts.11.linear_fc1.weight": "experts.fc1",
    "local_experts.0.linear_fc2.weight": "experts.fc2",
    "local_experts.11.linear_fc2.weight": "experts.fc2",
    "shared_experts.linear_fc1.weight": "shared_experts.fc1",
    "shared_experts.linear_fc2.weight": "shared_experts.fc2",
    "router.weight": "router",
    "output_layer.weight": "output",
}


def _expected(name: str) -> str:
    for suffix, group in EXPECTED_GROUP.items():
        if name.endswith(suffix) or (suffix == "embedding" and name.startswith("embedding.")):
            return group
    return "norms"  # layer norms, their fused TE forms, and every bias


@pytest.mark.parametrize("prefix", ["", "module.", "module.module."])
def test_globs_partition_every_parameter_name(prefix: str) -> None:
    for name in LOCAL + TE:
        assert group_of(prefix + name) == _expected(name), name
        assert module_of(prefix + name) == _expected(name).split(".")[0], name
    assert set(MODULES) == {
        "embedding",
        "attention_qkv",
        "attention_out",
        "dense_mlp",
        "experts",
        "shared_experts",
        "router",
        "output",
        "norms",
    }


def test_megatron_param_key_selects_the_same_partition() -> None:
    import torch
    from megatron.core.optimizer import ParamKey

    t = table(model(width=2, expert=2))
    param = torch.nn.Parameter(torch.zeros(1))
    for name in LOCAL + TE:
        hits = [g.name for g in t.groups if ParamKey(name=g.globs).matches(param, "module." + name)]
        assert hits == [_expected(name)], name


def test_unknown_parameter_names_are_refused() -> None:
    with pytest.raises(RampError, match="matches no muP module"):
        module_of("decoder.layers.0.mixer.in_proj.weight")
    with pytest.raises(RampError, match="absent from this model"):
        table(ModelConfig(num_experts=0, hidden_size=64)).group_for("decoder.layers.1.mlp.router.weight")


# ----------------------------------------------------------------------------------------------------------
# Agreement with megatron-core muP (Megatron-LM main, core >= 0.17), re-stated from
#   megatron/core/optimizer/__init__.py::get_mup_config_overrides (Adam),
#   megatron/core/transformer/transformer_config.py (MuP block of __post_init__),
#   megatron/core/utils.py::mup_scaled_init_method_normal,
#   megatron/core/models/common/language_module/language_module.py (output is embedding-class under muP).
# It applies when every width scales with the hidden size and depth is not scaled.


def _megatron_main_rule(
    name: str, ndim: int, m: float, sigma: float, layers: int
) -> tuple[float, float, float]:
    """(lr mult, eps mult, init std) that megatron-core's use_mup gives one parameter."""
    embedding_class = name.startswith("embedding.") or name == "output_layer.weight"
    vector_like = embedding_class or ndim <= 1
    lr = eps = 1.0 if vector_like else 1.0 / m
    if embedding_class:
        std = sigma  # embedding_init_method is built before the width scaling; the untied head uses it
    elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = sigma / (math.sqrt(2 * layers) * math.sqrt(m))  # output_layer_init_method
    else:
        std = sigma / math.sqrt(m)  # init_method (qkv, fc1, router)
    return lr, eps, std


@pytest.mark.parametrize("k", [1, 2, 8])
def test_table_agrees_with_megatron_main_mup(k: int) -> None:
    m = model(width=k, expert=k)
    t = multiplier_table(
        m,
        MupConfig(enabled=True, base_hidden_size=64, base_head_dim=16, weight_decay_rule="coupled"),
        {},
        0.1,
    )
    for name in LOCAL:
        ndim = 1 if ("layernorm" in name or name.endswith(".bias")) else 2
        lr, eps, std = _megatron_main_rule(name, ndim, k, m.init_method_std, m.num_layers)
        g = t.group_for(name)
        # ramp's deliberate differences (laws/mup.py docstring): the router is output-like (init
        # sigma/k; same LR and eps as megatron only at k = 1); embedding and output eps x 1/k.
        if group_of(name) == "router":
            std = m.init_method_std / k
        elif group_of(name) in ("embedding", "output"):
            eps = 1.0 / k
        assert (g.lr_mult, g.eps_mult) == (pytest.approx(lr), pytest.approx(eps)), name
        if g.init_std is not None:
            assert g.init_std == pytest.approx(std), name
        assert g.wd_mult == (0.0 if ndim == 1 else 1.0), name  # coupled: megatron's standard wd rules
    # mup_output_mult auto-set to 1/width_mult; softmax_scale = sqrt(base_head_dim) / kv_channels.
    assert t.output_logit_mult == pytest.approx(1 / k)
    assert t.softmax_scale == pytest.approx(math.sqrt(16) / m.head_dim)
    assert t.embedding_mult == 1.0  # mup_embedding_mult default


# ----------------------------------------------------------------------------------------------------------
# Bad input: one-line errors.


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(base_hidden_size=128), "larger than model.hidden_size"),
        (dict(base_moe_ffn_hidden_size=64), "larger than model.moe_ffn_hidden_size"),
        (dict(base_num_layers=8), "larger than model.num_layers"),
        (dict(base_head_dim=32), "larger than model.head_dim"),
    ],
)
def test_base_shape_larger_than_the_model_is_refused(kw: dict, match: str) -> None:
    with pytest.raises(RampError, match=match) as e:
        table(model(), **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(base_hidden_size=48), r"mup.base_hidden_size=48 does not divide model.hidden_size=64"),
        (dict(base_moe_ffn_hidden_size=24), r"mup.base_moe_ffn_hidden_size=24 does not divide"),
        (dict(base_num_layers=3), r"mup.base_num_layers=3 does not divide model.num_layers=4"),
        (dict(base_num_attention_heads=3), r"mup.base_num_attention_heads=3 does not divide"),
    ],
)
def test_base_shape_that_does_not_divide_the_model_is_refused(kw: dict, match: str) -> None:
    with pytest.raises(RampError, match=match) as e:
        table(model(), **kw)
    assert "\n" not in str(e.value)


def test_multiplier_for_a_module_the_model_lacks_is_refused() -> None:
    no_shared = ModelConfig(hidden_size=64, num_attention_heads=4, num_layers=2, num_experts=4)
    with pytest.raises(
        RampError, match=r"optimizer.lr_mult.shared_experts: this model has no shared_experts"
    ):
        multiplier_table(no_shared, MupConfig(enabled=False), {"shared_experts": 0.5}, 0.1)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(base_hidden_size=0), "positive integer"),
        (dict(base_num_layers=-2), "positive integer"),
        (dict(output_mult=0.0), "positive numbers"),
        (dict(embedding_mult=-1.0), "positive numbers"),
        (dict(attention_scale="cube"), "choose one of"),
        (dict(output_scaling="both"), "choose one of"),
        (dict(weight_decay_rule="l2"), "choose one of"),
        (dict(depth_alpha=2.0), r"\[0.5, 1\]"),
    ],
)
def test_bad_mup_config_is_refused(kw: dict, match: str) -> None:
    with pytest.raises(RampError, match=match) as e:
        MupConfig(enabled=True, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), "0.5", True, None])
def test_non_positive_overrides_are_refused(value: object) -> None:
    with pytest.raises(RampError, match="positive numbers"):
        table(model(), {"router": value})


def test_unknown_override_names_suggest_the_nearest() -> None:
    with pytest.raises(RampError, match="did you mean 'router'"):
        table(model(), {"routr": 0.5})
