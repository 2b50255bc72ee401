"""The online CBS-probe callback's decisions on the real recipe plan, with the branches stubbed: when it
forks, what it decides, when it does not fork, and what a rewind or a stop does. (The branches themselves,
the pause and the resume are trained for real in tests/dist/test_online_probes.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher import probes, recipe
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

    def agree_to_stop(self) -> bool:
        return self.sigterm

    @property
    def signalled(self) -> bool:
        return self.sigterm


def setup(monkeypatch, tmp_path, cbs: list[float]):
    r = recipe.load("moe-tiny", [*SETS, f"logging.run_dir={tmp_path}"])
    d = r.derive(1)
    forks = []

    def fake_fork(run_dir, checkpoint, out_dir, cfg, **kw):
        forks.append(kw)
        return {"tokens": 0, "cbs": cbs[len(forks) - 1], "branch_tokens": 1000, "note": "stub"}

    monkeypatch.setattr(probes, "run_fork", fake_fork)
    t = FakeTrainer(recipe=r, derived=d, state=TrainState(global_batch_size=16), pauses=0, sigterm=False)
    t.stop_requested = False
    cb = CbsProbes(r.probes, tmp_path, r.requested_tokens, r.batch_schedule)
    cb.on_train_start(t)
    return t, cb, forks


def advance(t, steps: int) -> None:
    t.state.step += steps
    t.state.consumed_tokens += steps * t.state.global_batch_size * 256


def test_forks_at_the_grid_and_doubles_by_the_rule(pg, monkeypatch, tmp_path):
    t, cb, forks = setup(monkeypatch, tmp_path, cbs=[64, 256, 1024])
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
