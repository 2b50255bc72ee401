"""The online CBS-probe callback's decisions on the real recipe plan, with the branches stubbed: when it
forks, what it decides, when it does not fork, what a rewind or a stop does, and how a fork's checkpoint is
kept past the run's retention (hard links, or a copy across filesystems). (The branches themselves,
the pause and the resume are trained for real in tests/dist/test_online_probes.py.)"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher import build, probes, recipe
from launcher.callbacks.cbs_probes import CbsProbes
from launcher.trainer import TrainState

# moe-tiny: 16 sequences x 256 tokens = 4,096 tokens a step; forks every 40,960 tokens (10 steps)
SETS = [
    "training.train_tokens=409600",
    "batch_schedule.kind=cbs",
    "batch_schedule.cbs_source=probes",
    "batch_schedule.max_batch=64",
    "batch_schedule.cbs_fraction=0.5",
    "probes.every_tokens=40960",
    "training.eval_samples=16",
]


class FakeTrainer(SimpleNamespace):
    def pause(self, work):
        self.pauses += 1
        return work(Path("/nonexistent/step"))

    def checkpoint_now(self) -> Path:
        self.saves += 1
        return self.checkpoint

    def evaluate(self) -> dict:
        self.evals.append(self.state.consumed_tokens)
        return {"val_loss": 5.0 - len(self.evals) / 10}

    def agree_to_stop(self) -> bool:
        return self.sigterm

    @property
    def signalled(self) -> bool:
        return self.sigterm


def setup(monkeypatch, tmp_path, cbs: list[float], sets=(), run_is_k1: bool = False):
    r = recipe.load("moe-tiny", [*SETS, *sets, f"logging.run_dir={tmp_path}"])
    d = r.derive(1)
    forks = []

    def fake_fork(run_dir, checkpoint, out_dir, cfg, **kw):
        forks.append({"checkpoint": checkpoint, "multipliers": cfg.multipliers, **kw})
        # run_fork's contract: the run's evaluations for the k = 1 read-off count in the fork's eval_tokens
        evaluated = kw.get("reference_evals", 0) * 16 * 256
        return {"tokens": 0, "cbs": cbs[len(forks) - 1], "branch_tokens": 1000, "eval_tokens": evaluated}

    monkeypatch.setattr(probes, "run_fork", fake_fork)
    ckpt = tmp_path / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / "weights").write_text("w")
    t = FakeTrainer(recipe=r, derived=d, state=TrainState(global_batch_size=16), pauses=0, sigterm=False)
    t.stop_requested, t.saves, t.evals, t.checkpoint = False, 0, [], ckpt
    schedule = build.schedule_and_table(r, d)[0] if run_is_k1 else None
    cb = CbsProbes(r.probes, tmp_path, r.requested_tokens, r.batch_schedule, schedule)
    cb.on_train_start(t)
    return t, cb, forks


def advance(t, steps: int) -> None:
    t.state.step += steps
    t.state.consumed_tokens += steps * t.state.global_batch_size * 256


def test_forks_at_the_grid_and_doubles_by_the_rule(pg, monkeypatch, tmp_path):
    t, cb, forks = setup(monkeypatch, tmp_path, cbs=[64, 256, 1024], sets=["probes.deciding_only=false"])
    advance(t, 9)
    cb.on_step_start(t)
    assert not forks  # 36,864 tokens: before the first point
    advance(t, 1)
    cb.on_step_start(t)  # 40,960: fork; 0.5 x 64 = 32 is not over 2 x 16: no growth
    assert len(forks) == 1 and cb.records[-1]["batch_after"] == 16 and t.pauses == 1
    assert [p.batch for p in t.derived.phases] == [16]
    advance(t, 10)
    cb.on_step_start(t)  # 81,920: 0.5 x 256 = 128 > 32, > 64, not > 128: 64 (the cap) from here
    assert cb.records[-1]["batch_after"] == 64 and cb.phases == [[0, 16], [81920, 64]]
    assert [(p.batch, p.start_tokens) for p in t.derived.phases] == [(16, 0), (64, 81920)]
    metrics: dict = {}
    cb.on_step_end(t, metrics)
    assert metrics["cbs"] == 256 and metrics["probe_tokens"] == 2000
    assert metrics["probe_cost_frac"] == pytest.approx(2000 / t.derived.train_tokens)
    t.state.global_batch_size = 64
    advance(t, 3)  # 81,920 + 3 x 16,384 = 131,072: past the point at 122,880
    cb.on_step_start(t)
    assert len(forks) == 2 and t.pauses == 2  # at the cap: nothing left to decide, no fork
    assert cb.done_until == 131_072


def test_a_sigterm_before_the_fork_stops_without_forking(pg, monkeypatch, tmp_path):
    t, cb, forks = setup(monkeypatch, tmp_path, cbs=[256])
    t.sigterm = True
    advance(t, 10)
    cb.on_step_start(t)
    assert t.stop_requested and not forks and t.pauses == 0 and cb.done_until == 0  # the requeue forks


def test_a_rewind_restores_the_plan_of_the_reloaded_state(pg, monkeypatch, tmp_path):
    t, cb, _ = setup(monkeypatch, tmp_path, cbs=[256])
    saved = cb.state_dict()  # before any decision
    advance(t, 10)
    cb.on_step_start(t)
    assert [p.batch for p in t.derived.phases] == [16, 64]
    cb.load_state_dict(saved)
    cb.on_rewind(t)
    assert [p.batch for p in t.derived.phases] == [16] and cb.phases is None and not cb.records


# the run as k = 1: multipliers 1, 8 over 32,768 tokens (8 steps of 16 from the fork at step 10; whole
# steps of k = 8 too); evals=2: a k = 1 branch evaluates every 8 // 2 = 4th step number and at its end, so
# at steps 12, 16 and 18 (49,152, 65,536 and 73,728 tokens)
RUN_K1 = ["probes.multipliers=[1,8]", "probes.budget_tokens=8192", "probes.evals=2"]


def test_the_run_is_k1_then_the_other_branches_run_from_the_kept_checkpoint(pg, monkeypatch, tmp_path):
    t, cb, forks = setup(monkeypatch, tmp_path, cbs=[128], sets=RUN_K1, run_is_k1=True)
    advance(t, 10)
    cb.on_step_start(t)  # the fork: a checkpoint kept, no pause, no branch yet
    kept = tmp_path / "probes" / "fork_000000040960" / "checkpoint"
    assert (kept / "weights").read_text() == "w" and t.saves == 1 and t.pauses == 0 and not forks
    assert cb.pending["eval_tokens"] == [49_152, 65_536, 73_728] and cb.done_until == 40_960
    advance(t, 2)
    cb.on_step_start(t)  # step 12's point: evaluated here (4.9)
    advance(t, 1)
    cb.on_eval(t, {"val_loss": 4.0})  # the run's own evaluation off the points: not the branch's
    advance(t, 3)
    cb.on_eval(t, {"val_loss": 4.5})  # the run's own evaluation at step 16's point: taken, not repeated
    cb.on_step_start(t)
    advance(t, 2)
    cb.on_step_start(t)  # 73,728: the branch's end: evaluate (4.8), then run k = 8 from the kept checkpoint
    assert t.evals == [49_152, 73_728] and t.pauses == 1
    assert cb.records[-1]["tokens"] == 0  # (the stub's record)
    (fork,) = forks
    assert fork["checkpoint"] == kept and fork["multipliers"] == [1, 8]
    # the last evaluation; the tail (the last half of the branch) holds 2 points: no noise sd of its own
    assert fork["reference"] == (pytest.approx(4.8), None) and fork["reference_evals"] == 2
    # 0.5 x 128 = 64 > 32, not > 64: batch 32 from the branch's end on
    rec = cb.records[-1]
    assert (rec["decided_at_tokens"], rec["batch_after"]) == (73_728, 32)
    assert cb.phases == [[0, 16], [73_728, 32]] and cb.pending is None
    # the kept checkpoint stays while the newest checkpoint (the pause's, step 18) still holds the pending
    # fork, and goes once one without it is complete
    assert kept.exists()
    cb.on_checkpoint_saved(t, "step_0000020")
    assert not kept.exists()
    metrics: dict = {}
    cb.on_step_end(t, metrics)  # one child branch's tokens and the run's two extra evaluations
    evaluated = 2 * 16 * 256
    assert metrics["probe_tokens"] == 1000 and metrics["probe_eval_tokens"] == evaluated
    run = t.derived.train_tokens + 2 * 16 * 256 / 3  # the run's own two evaluations count in its compute
    assert metrics["probe_cost_frac"] == pytest.approx((1000 + evaluated / 3) / run)


def test_a_rewind_inside_the_window_runs_a_k1_branch(pg, monkeypatch, tmp_path):
    t, cb, forks = setup(monkeypatch, tmp_path, cbs=[128], sets=RUN_K1, run_is_k1=True)
    advance(t, 10)
    cb.on_step_start(t)
    advance(t, 2)
    cb.on_step_start(t)
    cb.on_rewind(t)  # bad steps skipped: the run no longer trains the k = 1 branch's sequences
    advance(t, 6)
    cb.on_step_start(t)
    (fork,) = forks
    assert fork["reference"] is None and cb.records[-1]["batch_after"] == 32


def test_the_run_is_not_k1_when_its_lr_moves_over_the_branch(pg, monkeypatch, tmp_path):
    # the WSD decay starts at 80% (327,680 tokens): a fork at 311,296 would span it
    t, cb, forks = setup(monkeypatch, tmp_path, cbs=[128], sets=RUN_K1, run_is_k1=True)
    cb.points = [311_296]
    advance(t, 76)
    cb.on_step_start(t)
    assert cb.pending is None and t.pauses == 1 and forks[0]["reference"] is None


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("links", [True, False])
def test_keep_checkpoint_links_or_copies_and_outlives_the_source(tmp_path, monkeypatch, links):
    src = tmp_path / "run" / "checkpoints" / "step_0000010"
    (src / "common").mkdir(parents=True)
    (src / "common" / "shard.pt").write_bytes(b"\x00weights" * 100)
    (src / "metadata.json").write_text('{"step": 10}')
    if not links:  # another filesystem: os.link raises EXDEV, so the bytes are copied

        def no_link(a, b, *args, **kw):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    dst = tmp_path / "probes" / "fork_000000040960" / "checkpoint"
    probes.keep_checkpoint(src, dst)
    before = _tree(src)
    assert _tree(dst) == before and not dst.with_name(dst.name + ".tmp").exists()
    same_inode = (src / "metadata.json").stat().st_ino == (dst / "metadata.json").stat().st_ino
    assert same_inode is links
    shutil.rmtree(src)  # the run's retention deletes its checkpoint: the kept one stays whole
    assert _tree(dst) == before
