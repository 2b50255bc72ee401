"""Batch phases as the recipe derives them: hand-computed step counts, per-phase layouts, refused input."""

from __future__ import annotations

import pytest

from launcher import build, recipe, resilience
from launcher.callbacks.base import Callback
from launcher.errors import RampError
from launcher.trainer import Trainer


def derive(sets: list[str], world: int = 1):
    return recipe.load("moe-tiny", sets).derive(world)


def test_step_schedule_phases_by_hand():
    # moe-tiny: 256 tokens per sequence. 16 sequences (4,096 tokens a step) until 600,000 tokens: the
    # phase ends at the first step boundary at or past it, ceil(600000 / 4096) = 147 steps = 602,112 tokens.
    # Then 32 sequences (8,192 a step) up to 1.6 M: ceil(997,888 / 8,192) = 122 steps, ending at 1,601,536.
    d = derive(
        ["batch_schedule.kind=steps", "batch_schedule.steps=0:16 600K:32", "training.train_tokens=1.6M"]
    )
    got = [(ph.batch, ph.first_step, ph.start_tokens, ph.steps, ph.end_tokens) for ph in d.phases]
    assert got == [(16, 0, 0, 147, 602_112), (32, 147, 602_112, 122, 1_601_536)]
    assert (d.train_steps, d.train_tokens) == (269, 1_601_536)
    assert [d.phase_at(t).batch for t in (0, 602_111, 602_112, 1_601_536)] == [16, 16, 32, 32]
    # moe-tiny's micro-batch 8 on one process: 2 then 4 micro-batches
    assert [ph.num_microbatches for ph in d.phases] == [2, 4]


@pytest.mark.parametrize(
    "key",
    ["training.train_steps=100", "schedule.warmup_steps=5", "schedule.decay.start_steps=50"],
)
def test_step_denominated_keys_refused_when_the_batch_varies(key):
    sets = ["batch_schedule.kind=steps", "batch_schedule.steps=0:16 600K:32", key]
    with pytest.raises(RampError, match=key.split("=")[0].replace(".", r"\.") + ".*counts steps"):
        derive(sets)


def test_a_phase_batch_the_layout_cannot_split_is_refused():
    # 2 processes, micro-batch 8: a batch of 24 is no multiple of 8 x dp 2
    sets = ["batch_schedule.kind=steps", "batch_schedule.steps=0:16 600K:24"]
    with pytest.raises(
        RampError, match="global_batch_size=24 is not divisible by micro_batch_size\\*dp=8\\*2"
    ):
        derive(sets, world=2)


def test_named_layouts_per_phase_keep_the_recipes_other_keys():
    sets = [
        "training.global_batch_size=8",
        "batch_schedule.kind=steps",
        "batch_schedule.steps=0:8 600K:16",
        "batch_schedule.layouts={8: {pp: 2}, 16: {micro_batch_size: 4}}",
    ]
    d = derive(sets, world=2)
    first, second = d.phases
    assert (first.parallel.pp, first.parallel.tp, first.dp, first.micro_batch_size) == (2, 1, 1, 8)
    assert (second.parallel.pp, second.parallel.tp, second.dp, second.micro_batch_size) == (1, 1, 2, 4)
    assert second.num_microbatches == 2  # 16 / (4 x 2)
    assert not first.same_layout(second)


ONLINE = [
    "training.train_tokens=1.6M",
    "batch_schedule.kind=cbs",
    "batch_schedule.cbs_source=probes",
    "batch_schedule.max_batch=64",
    "probes.every_tokens=200K",
    "training.eval_samples=16",
]


def test_online_probes_plan_one_phase_then_replan_by_hand():
    from launcher.laws.batch_size import grow_at

    r = recipe.load("moe-tiny", ONLINE)
    d = r.derive(1)
    # 16 sequences x 256 tokens until the probes decide: ceil(1.6M / 4,096) = 391 steps, 1,601,536 tokens
    assert [(ph.batch, ph.steps) for ph in d.phases] == [(16, 391)] and d.train_tokens == 1_601_536
    # the data covers any end a decision can give: 1.6M + one step of the largest batch, 64 x 256
    assert d.data_tokens == 1_600_000 + 64 * 256
    # a decision for 64 after 50 steps (204,800 tokens): ceil(1,395,200 / 16,384) = 86 steps, to 1,613,824
    e = r.replan(d, grow_at(d.batch_schedule, 204_800, 64))
    got = [(ph.batch, ph.first_step, ph.start_tokens, ph.steps, ph.end_tokens) for ph in e.phases]
    assert got == [(16, 0, 0, 50, 204_800), (64, 50, 204_800, 86, 1_613_824)]
    assert (e.train_steps, e.train_tokens) == (136, 1_613_824) and e.train_tokens <= d.data_tokens
    assert [ph.num_microbatches for ph in e.phases] == [2, 8]


@pytest.mark.parametrize(
    "sets, words",
    [
        (ONLINE[:4], "cbs_source=probes needs online probes"),
        ([*ONLINE[:5], "training.eval_samples=0"], "needs the run's fixed validation set"),
        ([*ONLINE, "batch_schedule.layouts={16: {pp: 1}, 32: {pp: 1}}"], "names no layout for batch 64"),
        ([*ONLINE, "probes.multipliers=[0.5, 1]"], "must be >= 1"),
        ([*ONLINE, "batch_schedule.max_batch=16"], "leaves the probes nothing to grow to"),
        # half the CBS at batch 16: a doubling needs 0.5 x k x 16 > 32, k > 4, and 1, 2, 4 have none
        (
            [*ONLINE, "probes.multipliers=[1, 2, 4]", "batch_schedule.cbs_fraction=0.5"],
            "no multiplier can grow batch 16",
        ),
        ([*ONLINE, "probes.every_tokens=2M"], "no fork point before the run's end"),
        ([*ONLINE, "probes.timeout_s=0"], "timeout_s=0"),
        # 3 processes per branch: 16 sequences are no multiple of micro-batch 8 x dp 3
        ([*ONLINE, "probes.nproc=3"], "branch at k=1 from batch 16 on 3 process"),
    ],
)
def test_online_probes_refuse_what_cannot_run_before_it_starts(sets, words):
    with pytest.raises(RampError, match=words):
        derive(sets)


def test_auto_layout_gives_model_parallelism_where_the_batch_leaves_no_room_for_dp():
    # one sequence per step cannot be split over 2 data-parallel ranks: the cost model must pick TP2 or PP2
    d = derive(["training.global_batch_size=1", "training.eval_samples=8", "batch_schedule.layouts=auto"], 2)
    (only,) = d.phases
    assert only.dp == 1 and only.parallel.tp * only.parallel.pp == 2


def test_fingerprint_covers_the_batch_schedule_but_not_its_layouts():
    def fp(*sets):
        r = recipe.load("moe-tiny", ["batch_schedule.kind=steps", *sets])
        d = r.derive(2)
        schedule, _ = build.schedule_and_table(r, d)
        return resilience.fingerprint(r, "data", schedule)

    base = fp("batch_schedule.steps=0:16 600K:32")
    assert fp("batch_schedule.steps=0:16 800K:32") != base
    assert fp("batch_schedule.steps=0:16 600K:32", "batch_schedule.layouts={16: {}, 32: {pp: 2}}") == base


def test_fingerprint_covers_what_the_probes_decide_by_when_they_drive_the_batch():
    def fp(*sets):
        r = recipe.load("moe-tiny", [*ONLINE, *sets])
        d = r.derive(1)
        schedule, _ = build.schedule_and_table(r, d)
        return resilience.fingerprint(r, "data", schedule)

    base = fp()
    assert fp("probes.epsilon=0.02") != base and fp("probes.every_tokens=300K") != base
    assert fp("probes.nproc=2", "probes.timeout_s=600") == base  # how branches run, not what they decide


class _Named(Callback):
    name = "same"


def test_callbacks_with_one_name_are_refused_before_anything_is_built():
    r = recipe.load("moe-tiny", [])
    d = r.derive(1)
    _, table = build.schedule_and_table(r, d)
    with pytest.raises(RampError, match="callbacks share the name same"):
        Trainer(r, d, table, [_Named(), _Named()])


def test_data_tokens_sizes_the_data_for_at_least_the_given_tokens():
    # a CBS branch of 100K tokens reads its 2.46M-token parent's data order: the index is built for the
    # parent's size; a value below the run's own need changes nothing
    assert derive(["training.train_tokens=100K", "training.data_tokens=2.46M"]).data_tokens == 2_460_000
    assert derive(["training.train_tokens=100K", "training.data_tokens=1K"]).data_tokens == 102_400
    with pytest.raises(RampError, match=r"training\.data_tokens=0"):
        derive(["training.train_tokens=100K", "training.data_tokens=0"])
