"""Recipe schema: every recipe loads; bad input gives one line naming the problem, and exit code 2."""

from __future__ import annotations

import pytest

from launcher import pretrain, recipe
from launcher.errors import RampError

RECIPES = sorted(p.stem for p in recipe.RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_derives(name):
    r = recipe.load(name)
    # A layout is stated for each recipe; its world size is the smallest one the layout accepts.
    world = r.parallel.tp * r.parallel.pp
    while True:
        try:
            d = r.derive(world, cuda_available=True)
            break
        except RampError:
            world += r.parallel.tp * r.parallel.pp
            assert world <= 4096, f"{name}: no world size up to 4096 fits its layout"
    assert d.train_steps > 0 and d.tokens_per_step == r.training.global_batch_size * r.model.seq_length


def test_overrides_and_suffixes():
    r = recipe.load("moe-tiny", ["training.train_tokens=2M", "model.hidden_size=64", "parallel.tp=2"])
    assert r.training.train_tokens == 2_000_000 and r.model.hidden_size == 64 and r.parallel.tp == 2
    assert r.parallel.sequence_parallel is True  # derived: MoE with TP needs sequence parallel


def test_exponent_numbers_without_a_dot_are_numbers():
    # YAML 1.1 reads 1e-8 as a string; a float field takes it as the number it is.
    r = recipe.load("moe-tiny", ["optimizer.adam_eps=1e-8", "optimizer.lr=3E-4"])
    assert (r.optimizer.adam_eps, r.optimizer.lr) == (1e-8, 3e-4)


def test_set_replaces_the_alternatives_a_recipe_gave():
    # moe-tiny gives train_tokens and decay.start_frac; setting the other form replaces them.
    r = recipe.load("moe-tiny", ["training.train_steps=7", "schedule.decay.start_tokens=1000"])
    assert (r.training.train_steps, r.training.train_tokens) == (7, None)
    assert (r.schedule.decay.start_tokens, r.schedule.decay.start_frac) == (1000, None)


def test_a_recipe_giving_two_alternatives_is_refused():
    with pytest.raises(RampError, match=r"exactly one of training\.train_tokens or training\.train_steps"):
        recipe.load({"training": {"train_tokens": 1000, "train_steps": 5}})
    with pytest.raises(RampError, match="at most one of start_frac"):
        recipe.load(
            {"training": {"train_steps": 5}, "schedule": {"decay": {"start_frac": 0.5, "start_steps": 2}}}
        )


def test_derived_quantities():
    r = recipe.load(
        "moe-tiny",
        [
            "training.global_batch_size=32",
            "training.micro_batch_size=4",
            "training.train_tokens=null",
            "training.train_steps=10",
            "parallel.pp=2",
        ],
    )
    d = r.derive(4)
    assert (d.dp, d.num_microbatches, d.train_steps) == (2, 4, 10)
    assert d.tokens_per_step == 32 * r.model.seq_length and d.train_tokens == 10 * d.tokens_per_step


# (overrides, world size, words the one-line error must contain)
BAD = [
    (["model.hiden_size=64"], 1, ["model.hiden_size", "did you mean 'model.hidden_size'"]),
    (["parallel.tp=4"], 2, ["tp*pp", "does not divide the world size 2"]),
    (["parallel.ep=2", "model.num_experts=3"], 2, ["parallel.ep=2", "num_experts=3"]),
    (["parallel.tp=2", "model.num_attention_heads=3", "model.hidden_size=96"], 2, ["num_attention_heads=3"]),
    (["parallel.pp=2", "model.num_layers=3"], 2, ["num_layers=3", "pp*vpp"]),
    (["training.global_batch_size=10", "training.micro_batch_size=4"], 2, ["global_batch_size=10", "4*2"]),
    (["parallel.vpp=2"], 1, ["parallel.vpp=2", "pp > 1"]),
    (["training.micro_batch_size=abc"], 1, ["training.micro_batch_size", "integer"]),
    (["optimizer.lr=-1"], 1, ["optimizer.lr=-1.0", "> 0"]),
    (["optimizer.lr_mult={router: -1}"], 1, ["optimizer.lr_mult.router", "positive"]),
    (["checkpoint.load=/nonexistent/ckpt"], 1, ["/nonexistent/ckpt", "does not exist"]),
    (["checkpoint.load=latest", "checkpoint.dir=/nonexistent/dir"], 1, ["latest", "does not exist"]),
    (["schedule.decay.length_tokens=10B"], 1, ["decay"]),
    (["schedule.style=linearr"], 1, ["schedule.style", "wsd"]),
    (["model.moe_router_topk=9"], 1, ["moe_router_topk=9", "1..8"]),
    (["training.eval_samples=100"], 2, ["eval_samples=100", "multiple of 16"]),
    (["mup.base_hidden_size=96", "mup.enabled=true"], 1, ["mup.base_hidden_size=96", "hidden_size=128"]),
    (["optimizer.lr_mult={shared_experts: 0.5}"], 1, ["lr_mult.shared_experts", "no shared_experts"]),
    (["gpu.transformer_engine=te"], 1, ["gpu.transformer_engine='te'", "require, local"]),
    (["recompute.modules=[attn]"], 1, ["recompute.modules", "core_attn"]),
    (["cluster.gpu_memory_gb=0"], 1, ["cluster.gpu_memory_gb=0", "> 0"]),
]


@pytest.mark.parametrize(("sets", "world", "words"), BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(sets, world, words, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["--recipe", "moe-tiny", "--dry-run"]
    for s in sets:
        argv += ["--set", s]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ramp: error: ")
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def test_unknown_recipe_name_suggests(capsys):
    assert pretrain.main(["--recipe", "moe-tinny", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'moe-tiny'" in err


def test_dry_run_prints_plan(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pretrain.main(["--recipe", "moe-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dp=2" in out and "train_steps=" in out


@pytest.mark.parametrize("text", ["", "# nothing here\n", "name: x\n", "trainig:\n  seed: 1\n"])
def test_empty_or_sectionless_recipe_is_refused(text, tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert pretrain.main(["--recipe", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no sections" in err, err


def test_a_zero_z_loss_coefficient_is_refused():
    """megatron records the z-loss divided by its coefficient: 0 would make every step's loss NaN (each
    skipped as bad until the run stops). null is how the z-loss is turned off; negative aux losses too."""
    with pytest.raises(RampError, match=r"model\.moe_z_loss_coeff=0\.0: must be > 0 \(null turns"):
        recipe.load("moe-tiny", ["model.moe_z_loss_coeff=0.0"])
    with pytest.raises(RampError, match=r"model\.moe_aux_loss_coeff=-0\.1: >= 0"):
        recipe.load("moe-tiny", ["model.moe_aux_loss_coeff=-0.1"])
    assert recipe.load("moe-tiny", ["model.moe_z_loss_coeff=null"]).model.moe_z_loss_coeff is None
    assert recipe.load("moe-tiny", ["model.moe_z_loss_coeff=1e-3"]).model.moe_z_loss_coeff == 1e-3
