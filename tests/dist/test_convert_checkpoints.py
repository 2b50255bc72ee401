"""ramp <-> transformers on trained checkpoints: same logits, bitwise round trips, loadable in other layouts.

Each case trains the tiny model 3 steps under a 2-rank layout (TP2 for the Qwen3-MoE shape, EP2 for the
Mixtral shape), so conversion is exercised on checkpoints whose tensors are split across ranks. A muP case
trains off its base shape (every forward multiplier not 1), so the export must fold them into the weights.
ramp's logits come from this file run as a script in a fresh process (the CPU patches change torch
globally). Conversions run from another working directory than training: a run directory is self-contained.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ramp_run import ROOT, ramp_env, run_ramp

pytestmark = pytest.mark.dist

TINY_QWEN3 = [  # qk-norm, GQA, head dim != hidden/heads, a dense first layer, untied head
    "model.qk_layernorm=true",
    "model.num_query_groups=2",
    "model.kv_channels=32",
    "model.first_k_dense=1",
    "model.tie_embeddings=false",
]
# muP off its base shape: width x2, depth x4 (residual branches x 0.5), head dim x4 (softmax scale
# sqrt(8)/32, half transformers' 1/sqrt(32)), logits x 0.5/2, embedding x3; tied, so the logit and embedding
# multipliers differ on one matrix; qk-norm, so the softmax ratio goes into the q-norm gain.
TINY_MUP = [
    *TINY_QWEN3,
    "model.tie_embeddings=true",
    "model.hidden_size=128",
    "mup.enabled=true",
    "mup.base_hidden_size=64",
    "mup.base_num_layers=1",
    "mup.base_head_dim=8",
    "mup.output_mult=0.5",
    "mup.embedding_mult=3",
]
CASES = {
    # name: (model overrides, layout trained in, another layout the converted checkpoint must load in)
    "qwen3_moe-tp2": (TINY_QWEN3, "parallel.tp=2", "parallel.ep=2"),
    "mixtral-ep2": (["model.qk_layernorm=false"], "parallel.ep=2", "parallel.tp=2"),
    "qwen3_moe-mup-tp2": (TINY_MUP, "parallel.tp=2", None),
}
STANDARD = [c for c in CASES if "mup" not in c]
STEPS = 3


def convert(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.convert_checkpoint", *map(str, args)],
        cwd=cwd,
        env=ramp_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    """A 3-step 2-rank training run and its transformers export (through the run directory, converted from
    another working directory than the one it trained in)."""
    sets, trained_in, other = CASES[request.param]
    run_dir = tmp_path_factory.mktemp(request.param)
    run = run_ramp(run_dir, [*sets, trained_in, f"training.train_steps={STEPS}"], nproc=2).check()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert Path(saved["cache_dir"]).is_absolute() and (run_dir / "tokenizer.model").is_file()
    out = convert("to-hf", run_dir, run_dir / "hf", cwd=tmp_path_factory.mktemp("elsewhere"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ramp-convert: to-hf: 100%" in out.stderr  # progress lines
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    return {
        "name": request.param,
        "sets": sets,
        "other": other,
        "run": run,
        "ckpt": ckpt,
        "hf": run_dir / "hf",
    }


@pytest.fixture(scope="module")
def back(case, tmp_path_factory) -> Path:
    """The export converted back into a (model-only) ramp checkpoint, with the recipe the run saved."""
    out = tmp_path_factory.mktemp(f"{case['name']}-back") / "ckpt"
    p = convert("from-hf", case["hf"], out, "--recipe", case["run"].run_dir / "config.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ramp-convert: from-hf: 100%" in p.stderr
    return out


def _sample_tokens(hf_dir: Path, n: int, length: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from launcher.corpus import document_order, stdlib_files

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids: list[int] = []
    for f in document_order(stdlib_files()):
        ids += tok(f.read_text(errors="replace"))["input_ids"]
        if len(ids) >= n * length:
            break
    return torch.tensor(ids[: n * length]).view(n, length)


def _logits(case, ckpt: Path, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformers logits of the export, ramp's logits of ``ckpt``) on the same corpus tokens."""
    from transformers import AutoModelForCausalLM

    tokens = _sample_tokens(case["hf"], 2, 64)
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {**ramp_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    p = subprocess.run(
        [sys.executable, __file__, "logits", ckpt, tmp_path / "tokens.pt", tmp_path / "ramp.pt"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    model, info = AutoModelForCausalLM.from_pretrained(str(case["hf"]), output_loading_info=True)
    assert not any(info.values()), info  # every tensor placed, none left over
    arch = "Qwen3MoeForCausalLM" if case["name"].startswith("qwen3") else "MixtralForCausalLM"
    assert type(model).__name__ == arch
    with torch.no_grad():
        return model.eval()(tokens).logits, torch.load(tmp_path / "ramp.pt")


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_logits_match_transformers(case, tmp_path):
    """The transformers model computes ramp's model (muP off its base shape included, its multipliers
    folded into the weights): max |logit difference| < 1e-4 in fp32."""
    hf_logits, ramp_logits = _logits(case, case["ckpt"], tmp_path)
    diff = (hf_logits - ramp_logits).abs().max().item()
    print(f"{case['name']}: max |logits(transformers) - logits(ramp)| = {diff:.3g}")
    assert hf_logits.shape == ramp_logits.shape and diff < 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if c not in STANDARD], indirect=True)
def test_mup_export_comes_back_as_a_standard_checkpoint(case, tmp_path):
    """from-hf of a folded muP export with the run's recipe and mup.enabled=false: a standard-
    parameterisation checkpoint (no multipliers in its forward) with the transformers model's logits."""
    ckpt = tmp_path / "standard"
    recipe = case["run"].run_dir / "config.yaml"
    p = convert("from-hf", case["hf"], ckpt, "--recipe", recipe, "--set", "mup.enabled=false")
    assert p.returncode == 0, p.stderr[-3000:]
    hf_logits, ramp_logits = _logits(case, ckpt, tmp_path)
    diff = (hf_logits - ramp_logits).abs().max().item()
    print(f"{case['name']} -> standard: max |logits(transformers) - logits(ramp)| = {diff:.3g}")
    assert hf_logits.shape == ramp_logits.shape and diff < 1e-4


@pytest.mark.parametrize("case", STANDARD, indirect=True)
def test_tokenizer_encodes_the_corpus_like_sentencepiece(case):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from launcher.corpus import document_order, stdlib_files

    sp = spm.SentencePieceProcessor(model_file=str(case["hf"] / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(case["hf"]))
    for f in document_order(stdlib_files())[100:160]:
        text = f.read_text(errors="replace")
        assert tok(text)["input_ids"] == sp.encode(text), f


def _model_state(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    from tools.convert_checkpoint import TorchDistReader

    reader = TorchDistReader(path)
    tensors = {k: reader.read(k) for k in reader.tensors() if not k.startswith("optimizer.")}
    objects = {
        k
        for k in reader.metadata.state_dict_metadata
        if k not in tensors and not k.startswith(("optimizer.", "rng_state"))
    }
    return tensors, objects


@pytest.mark.parametrize("case", STANDARD, indirect=True)
def test_round_trip_is_bitwise(case, back):
    """ramp -> transformers -> ramp gives back every model tensor bit for bit (every expert included)."""
    (a, a_obj), (b, b_obj) = _model_state(case["ckpt"]), _model_state(back)
    assert sorted(a) == sorted(b) and a_obj == b_obj
    experts = [k for k in a if ".experts.experts.linear_fc" in k]
    assert experts and all(a[k].shape[0] == 4 for k in experts)  # [expert, ...]: all 4 experts compared
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", STANDARD, indirect=True)
def test_converted_checkpoint_trains_in_any_layout(case, back, tmp_path):
    """A from-hf checkpoint loads (model only) in one process and in another 2-rank layout: same first loss,
    below the untrained model's (the trained weights, not an init, were loaded)."""
    sets = [
        *case["sets"],
        "training.train_steps=1",
        f"checkpoint.load={back}",
        "checkpoint.load_optimizer=false",
    ]
    one = run_ramp(tmp_path / "one", sets, nproc=1).check().series("loss")
    two = run_ramp(tmp_path / "two", [*sets, case["other"]], nproc=2).check().series("loss")
    assert sorted(one) == sorted(two) == [1]
    assert two[1] == pytest.approx(one[1], abs=5e-5)
    assert one[1] < case["run"].series("loss")[1] - 0.05


@pytest.mark.parametrize("case", STANDARD, indirect=True)
def test_missing_shard_is_refused_and_nothing_is_written(case, tmp_path):
    from tools.convert_checkpoint import TorchDistReader

    broken = tmp_path / "step"
    shutil.copytree(case["ckpt"], broken)
    reader = TorchDistReader(broken)
    victim = next(i for idx, i in reader.metadata.storage_data.items() if "experts" in idx.fqn).relative_path
    (broken / victim).unlink()
    out = tmp_path / "hf"
    p = convert("to-hf", broken, out)
    errors = [line for line in p.stderr.splitlines() if line.startswith("ramp: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    # The checkpoint's manifest (checkpoint.py) catches it first; without one the reader names the shard.
    assert victim in errors[0] and "missing" in errors[0], errors[0]
    assert not out.exists() and not list(tmp_path.glob(".hf*"))


# ---------------------------------------------------------------------------------------------------------
# Run as a script: ramp's logits for a checkpoint, one process, TP=PP=EP=1 (any saved layout reshards).


def _ramp_logits(ckpt: Path, tokens_path: Path, out: Path) -> None:
    import patches

    patches.apply_all(cpu=True)
    from launcher import checkpoint, layout, model, parametrization, recipe
    from launcher.laws.mup import multiplier_table
    from tools.convert_checkpoint import TorchDistReader

    saved = checkpoint.read_trainer_state(ckpt)["recipe"]
    single = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.vpp=null"]
    r = recipe.load(
        saved, [*single, "parallel.sequence_parallel=null", "parallel.distributed_optimizer=false"]
    )
    d = r.derive(1)
    layout.init_world("cpu", layout.Env(0, 1, 0, 1))
    try:
        layout.init_parallel(r.parallel, r.training.seed)
        vocab = int(TorchDistReader(ckpt).tensors()["embedding.word_embeddings.weight"].size[0])
        table = multiplier_table(r.model, r.mup, r.optimizer.lr_mult, r.optimizer.weight_decay)
        config = model.transformer_config(r, d, table)
        chunks = model.build_chunks(r, d, config, vocab)
        parametrization.apply(chunks, table, config)  # muP's multipliers, as in training
        checkpoint.load(ckpt, chunks, None, with_optimizer=False)
        tokens = torch.load(tokens_path)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            torch.save(chunks[0].eval()(tokens, positions, None).float(), out)
    finally:
        layout.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["logits"]:
        _ramp_logits(*map(Path, sys.argv[2:5]))
