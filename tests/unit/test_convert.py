"""Checkpoint conversion without training: architecture choice, tensor layouts, tokenizer, HF -> ramp -> HF.

The ramp-side tests (logits of a trained model, TP2/EP2 checkpoints, ramp loading a converted checkpoint)
are in tests/dist/test_convert_checkpoints.py.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import transformers

from launcher import hf, recipe
from launcher.corpus import stdlib_files
from launcher.errors import RampError
from launcher.tokenizer import train_tokenizer
from tools import convert_checkpoint as cc

# A tiny model (as tests/ramp_run.py TINY) in the two shapes ramp exports: Qwen3-MoE (qk-norm, GQA, head dim
# != hidden/heads, a dense first layer, untied head) and Mixtral (no qk-norm, every layer MoE, tied).
TINY_MODEL = [
    "model.num_layers=3",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=96",
    "model.num_experts=4",
    "model.moe_ffn_hidden_size=32",
    "model.seq_length=32",
    "model.vocab_size=512",
]
QWEN3 = [
    *TINY_MODEL,
    "model.qk_layernorm=true",
    "model.num_query_groups=2",
    "model.kv_channels=24",
    "model.first_k_dense=1",
    "model.tie_embeddings=false",
    "model.rotary_base=500000",
]
MIXTRAL = [*TINY_MODEL, "model.qk_layernorm=false", "model.tie_embeddings=true"]
# muP off its base shape: width x2, depth x4, head dim x4, tuned output and embedding multipliers. By hand:
# embedding x3; residual branches (4/1)^-1/2 = 0.5; logits 0.5 / (128/64) = 0.25; softmax scale
# sqrt(8)/32 where transformers uses 1/sqrt(32): ratio 0.5.
MUP_OFF_BASE = [
    "model.hidden_size=128",
    "model.num_layers=4",
    "model.kv_channels=32",
    "mup.enabled=true",
    "mup.base_hidden_size=64",
    "mup.base_num_layers=1",
    "mup.base_head_dim=8",
    "mup.output_mult=0.5",
    "mup.embedding_mult=3",
]


def _mup_factor(name: str, tied: bool, qk_norm: bool) -> float:
    """transformers tensor = ramp tensor x this, for MUP_OFF_BASE (hand values above)."""
    if name == "model.embed_tokens.weight":
        return 3.0
    if name == "lm_head.weight":
        return 0.25
    if name == "model.norm.weight":  # tied: the head is the x3 embedding, the norm gain brings it to x0.25
        return 0.25 / 3.0 if tied else 1.0
    if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
        return 0.5
    if name.endswith("q_norm.weight" if qk_norm else "q_proj.weight"):  # q-norm after q_proj takes it
        return 0.5
    return 1.0


def _files(n: int, start: int = 0) -> list[Path]:
    files = stdlib_files()
    return [files[i] for i in random.Random(7).sample(range(len(files)), start + n)[start:]]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A small sentencepiece BPE model with ramp's training settings (byte fallback, newline piece)."""
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    docs = (f.read_text(errors="replace") for f in _files(40))
    train_tokenizer(docs, path, vocab_size=512, sample_bytes=400_000, threads=1)
    return path


# -- architecture choice ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,arch",
    [
        ("moe-tiny", "mixtral"),
        ("moe-1b-a0.2b", "qwen3_moe"),
        ("moe-7b-a1b", "qwen3_moe"),
        ("moe-30b-a3b", "qwen3_moe"),
    ],
)
def test_each_recipe_exports_to_its_architecture(name, arch):
    assert hf.architecture(recipe.load(name)) == arch


@pytest.mark.parametrize(
    "sets,reason",
    [
        (["model.moe_shared_expert_hidden_size=128"], "shared expert"),
        (["model.first_k_dense=1"], "Mixtral (no qk-norm) needs every layer MoE"),
        (["model.moe_router_pre_softmax=true"], "renormalised top-k"),
        (["model.num_experts=0"], "MoE models"),
    ],
)
def test_unmatched_recipes_are_refused_with_the_reason(sets, reason):
    with pytest.raises(RampError, match=re.escape(reason)) as e:
        hf.architecture(recipe.load("moe-tiny", sets))
    assert "\n" not in str(e.value)


def test_pre_softmax_router_maps_to_qwen3_without_renormalisation():
    r = recipe.load("moe-tiny", ["model.qk_layernorm=true", "model.moe_router_pre_softmax=true"])
    assert hf.hf_config(r, 4096, torch.float32).norm_topk_prob is False


def test_qwen3_config_of_the_30b_recipe():
    r = recipe.load("moe-30b-a3b")
    c = hf.hf_config(r, 151936, torch.bfloat16)
    assert (c.model_type, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (
        "qwen3_moe",
        128,
        32,
        4,
    )
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (128, 8, 768)
    assert c.norm_topk_prob is True and c.mlp_only_layers == [] and c.tie_word_embeddings is False
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rms_norm_eps == 1e-6 and c.sliding_window is None
    assert hf.check_hf_config(c, r) == "qwen3_moe"


def test_config_mismatch_names_field_and_recipe_key():
    r = recipe.load("moe-1b-a0.2b")
    c = hf.hf_config(r, 32768, torch.float32)
    c.num_experts_per_tok = 2
    with pytest.raises(RampError, match=r"num_experts_per_tok=2 .*model.moe_router_topk gives 4"):
        hf.check_hf_config(c, r)
    c = hf.hf_config(r, 32768, torch.float32)
    c.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(RampError, match="rope_theta"):
        hf.check_hf_config(c, r)


# -- tensor layouts -----------------------------------------------------------------------------------------


def test_qkv_split_follows_megatron_query_group_layout():
    """megatron's linear_qkv rows are, per query group, that group's q heads, then its k, then its v."""
    r = recipe.load("moe-tiny", QWEN3)
    m = r.model
    piece = next(p for p in hf.pieces(r, 512) if p.kind == "qkv")
    d, per = m.head_dim, m.num_attention_heads // m.query_groups
    rows = []  # label every row: (kind, head, row-in-head)
    for g in range(m.query_groups):
        rows += [("q", g * per + h, i) for h in range(per) for i in range(d)]
        rows += [("k", g, i) for i in range(d)] + [("v", g, i) for i in range(d)]
    code = {"q": 0, "k": 1, "v": 2}
    t = torch.tensor([[code[k], h, i] for k, h, i in rows], dtype=torch.float32)
    q, k, v = hf.split(piece, t, r)
    for got, kind, heads in ((q, 0, m.num_attention_heads), (k, 1, m.query_groups), (v, 2, m.query_groups)):
        want = torch.tensor([[kind, h, i] for h in range(heads) for i in range(d)], dtype=torch.float32)
        assert torch.equal(got, want)
    assert torch.equal(hf.merge(piece, [q, k, v], r), t)


def test_split_merge_are_inverse_for_every_piece():
    r = recipe.load("moe-tiny", QWEN3)
    for p in hf.pieces(r, 512):
        t = torch.randn(p.shape)
        parts = hf.split(p, t, r)
        assert [tuple(x.shape) for x in parts] == p.hf_shapes()
        assert len({x.untyped_storage().data_ptr() for x in parts}) == len(parts) or p.kind == "copy"
        assert torch.equal(hf.merge(p, parts, r), t)


def test_every_expert_has_its_own_pieces():
    """The failure mode of other converters: experts silently dropped. Each expert maps to 2 pieces."""
    r = recipe.load("moe-tiny", MIXTRAL)
    names = [n for p in hf.pieces(r, 512) for n in p.hf]
    for layer in range(3):
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert names.count(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight") == 1
    assert len(names) == len(set(names))


# -- tokenizer ----------------------------------------------------------------------------------------------


def test_converted_tokenizer_encodes_like_sentencepiece(sp_model, tmp_path):
    import sentencepiece as spm

    hf.sentencepiece_to_hf(sp_model, tmp_path, 32, 512)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tricky = ["<s> x </s><pad><unk>", "  a\n\n\tb   ", "héllo 😀 ▁ 中文 \x00", "", " ", "\n"]
    texts = tricky + [f.read_text(errors="replace") for f in _files(30, start=40)]
    for text in texts:
        ids = sp.encode(text)
        assert tok(text)["input_ids"] == ids, text[:80]
        assert tok.decode(ids) == sp.decode(ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)


def test_unigram_tokenizer_is_refused(sp_model, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.UNIGRAM  # a unigram model's header, for the check
    path = tmp_path / "uni.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(RampError, match="only sentencepiece BPE"):
        hf.sentencepiece_to_hf(path, tmp_path, 32, 512)


# -- HF -> ramp -> HF, and bad HF input ---------------------------------------------------------------------


def _hf_model(sets: list[str], directory: Path, dtype: torch.dtype = torch.float32) -> Path:
    r = recipe.load("moe-tiny", sets)
    cfg = hf.hf_config(r, 512, torch.float32)
    cls = getattr(transformers, cfg.architectures[0])
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(str(directory))
    return directory


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    "sets,dtype",
    [(QWEN3, torch.float32), (MIXTRAL, torch.float32), (QWEN3, torch.bfloat16)],
    ids=["qwen3_moe", "mixtral", "qwen3_moe-bf16"],
)
def test_hf_to_ramp_to_hf_is_bitwise(sets, dtype, sp_model, tmp_path, capsys):
    src = _hf_model(sets, tmp_path / "hf", dtype)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert cc.main(["from-hf", str(src), str(ckpt), "--recipe", "moe-tiny", *_sets(sets)]) == 0
    assert (
        cc.main(["to-hf", str(ckpt), str(back), "--tokenizer", str(sp_model), "--max-shard-size", "200KB"])
        == 0
    )
    a, b = _tensors(src), _tensors(back)
    if "model.tie_embeddings=true" in sets:
        a.pop("lm_head.weight", None)  # transformers stores a tied head once, as the embedding
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((back / cc.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index naming every tensor
    assert sorted(index["weight_map"]) == sorted(b)
    assert json.loads((back / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    m, info = transformers.AutoModelForCausalLM.from_pretrained(str(back), output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected keys
    x = torch.randint(0, 512, (2, 32))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref(x).logits)


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _ramp_tensors_by_hf_name(ckpt: Path, r: recipe.Recipe) -> dict[str, torch.Tensor]:
    """A ramp checkpoint's tensors under their transformers names, split by a recipe with no muP (so
    unscaled): the weights ramp's forward multiplies."""
    reader = cc.TorchDistReader(ckpt)
    out = {}
    for p in hf.pieces(r, 512):
        if p.expert is None:
            t = reader.read(p.key)
        else:
            t = reader.read(p.key, (p.expert, *[0] * len(p.shape)), (1, *p.shape))[0]
        out.update(zip(p.hf, hf.split(p, t, r)))
    return out


@pytest.mark.parametrize("sets", [QWEN3, MIXTRAL], ids=["qwen3_moe", "mixtral-tied"])
def test_mup_multipliers_fold_into_the_weights(sets, sp_model, tmp_path):
    """A muP model off its base shape: from-hf with its recipe divides the hand-computed multipliers out,
    to-hf folds them back in, and from-hf with muP off keeps the exported weights as they are (a
    standard-parameterisation checkpoint of the same model). Logits: tests/dist/test_convert_checkpoints."""
    mup = [*sets, *MUP_OFF_BASE]
    src = _hf_model(mup, tmp_path / "hf")
    exported = _tensors(src)
    tied = "model.tie_embeddings=true" in sets
    standard = recipe.load("moe-tiny", [*mup, "mup.enabled=false"])
    assert cc.main(["from-hf", str(src), str(tmp_path / "mup"), "--recipe", "moe-tiny", *_sets(mup)]) == 0
    ramp = _ramp_tensors_by_hf_name(tmp_path / "mup", standard)
    assert sorted(ramp) == sorted(k for k in exported if not (tied and k == "lm_head.weight"))
    scaled = 0
    for name, t in ramp.items():
        factor = _mup_factor(name, tied, "model.qk_layernorm=true" in sets)
        torch.testing.assert_close(t * factor, exported[name], rtol=1e-6, atol=0, msg=name)
        scaled += factor != 1.0
    assert scaled >= 4 * 2 + 13 + 2  # 4 layers x (o_proj, q), >= 13 down projections, embedding, head
    back = tmp_path / "back"
    assert cc.main(["to-hf", str(tmp_path / "mup"), str(back), "--tokenizer", str(sp_model)]) == 0
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is tied
    round_trip = _tensors(back)
    assert sorted(round_trip) == sorted(ramp)
    for name, t in round_trip.items():
        torch.testing.assert_close(t, exported[name], rtol=1e-6, atol=0, msg=name)
    sp = tmp_path / "standard"
    assert cc.main(["from-hf", str(src), str(sp), "--recipe", "moe-tiny", *_sets(mup), "--set",
                    "mup.enabled=false"]) == 0  # fmt: skip
    for name, t in _ramp_tensors_by_hf_name(sp, standard).items():
        assert torch.equal(t, exported[name]), name


def test_run_directory_tokenizer_copy_is_read_first(sp_model, tmp_path):
    """The copy beside config.yaml wins over the recipe's path, which may be relative to elsewhere."""
    r = recipe.load("moe-tiny", ["data.cache_dir=nowhere/relative"])
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    r.dump(run / "config.yaml")
    with pytest.raises(RampError, match="--tokenizer"):
        cc.find_tokenizer(r, None, cc.run_dir_of(step, step))
    (run / "tokenizer.model").write_bytes(sp_model.read_bytes())
    for src in (run, step):  # given the run directory, or one of its checkpoints
        assert cc.find_tokenizer(r, None, cc.run_dir_of(src, step)) == run / "tokenizer.model"


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ramp: error:")]
    assert len(err) == 1
    return err[0]


def test_dense_hf_model_is_refused(tmp_path, capsys):
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "llama"))
    out = tmp_path / "out"
    assert (
        cc.main(["from-hf", str(tmp_path / "llama"), str(out), "--recipe", "moe-tiny", *_sets(MIXTRAL)]) == 2
    )
    assert "'llama', not an MoE model" in _error_line(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.num_experts=8", "num_local_experts=4 does not match the recipe (model.num_experts gives 8)"),
        ("model.hidden_size=128", "hidden_size=64 does not match"),
        (
            "model.qk_layernorm=true",
            "the transformers model is mixtral but the recipe's model converts to qwen3_moe",
        ),
        ("model.vocab_size=1000", "vocab_size=512 but the recipe's model has 1024 rows"),
    ],
)
def test_hf_config_that_does_not_match_the_recipe_is_refused(override, message, tmp_path, capsys):
    src = _hf_model(MIXTRAL, tmp_path / "hf")
    out = tmp_path / "out"
    assert cc.main(["from-hf", str(src), str(out), "--recipe", "moe-tiny", *_sets([*MIXTRAL, override])]) == 2
    assert message in _error_line(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_hf_weights_missing_an_expert_are_refused(tmp_path, capsys):
    src = _hf_model(MIXTRAL, tmp_path / "hf")
    from safetensors.torch import save_file

    tensors = _tensors(src)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / cc.SAFETENSORS_INDEX).unlink(missing_ok=True)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert cc.main(["from-hf", str(src), str(out), "--recipe", "moe-tiny", *_sets(MIXTRAL)]) == 2
    assert "experts.3.w2.weight" in _error_line(capsys)
    assert not out.exists()


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    src = _hf_model(MIXTRAL, tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert cc.main(["from-hf", str(src), str(out), "--recipe", "moe-tiny", *_sets(MIXTRAL)]) == 2
    assert "already exists" in _error_line(capsys)
    assert (out / "keep").read_text() == "x"


def test_parse_size():
    assert cc.parse_size("2GB") == 2 * 2**30 and cc.parse_size("500MB") == 500 * 2**20
    assert cc.parse_size("1.5GiB") == 3 * 2**29 and cc.parse_size("1024") == 1024
    with pytest.raises(RampError):
        cc.parse_size("lots")
