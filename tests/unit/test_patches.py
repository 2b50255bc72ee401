"""Every patch in patches/: the megatron-core/torch scenario it exists for fails without it and works with it.

Each case runs ``tests/patch_scenarios.py NAME`` in a fresh interpreter (the patches change torch and
megatron-core globally): every other patch applied as in a real CPU run, the scenario without the patch
(its failure recorded), then with it. The scenarios of the selected cases start together when the first one
is needed, two at a time, so the file costs about one megatron import per patch on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from ramp_run import ramp_env

import patches

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS_SCRIPT = ROOT / "tests" / "patch_scenarios.py"
MARK = "PATCH_SCENARIO "
JOBS = 2
TIMEOUT_S = 400
SLOW_FIRST = ("async_save_queue", "distopt_checkpoint")  # started first so the pool stays busy

COVERED: dict[str, Callable] = {}


def uses_scenario(name: str, *marks: pytest.MarkDecorator) -> Callable:
    """The test receives, as ``scenario``, the JSON result of ``patch_scenarios.py name``."""

    def register(fn: Callable) -> Callable:
        fn.scenario_name = name
        for mark in marks:
            fn = mark(fn)
        return fn

    return register


def covers(name: str, *marks: pytest.MarkDecorator) -> Callable:
    """Register a test as the case for patch ``name``."""

    def register(fn: Callable) -> Callable:
        COVERED[name] = fn
        return uses_scenario(name, *marks)(fn)

    return register


# ------------------------------------------------------------------------------------------ scenario runner


@dataclass
class ProbeRun:
    returncode: int | None
    stdout: str
    stderr: str
    result: dict | None


class Scenarios:
    def __init__(self, names: list[str]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=JOBS, thread_name_prefix="patch-scenario")
        self._futures: dict[str, Future] = {}
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        for name in sorted(names, key=lambda n: n not in SLOW_FIRST):
            self._submit(name)

    def _submit(self, name: str) -> Future:
        with self._lock:
            if name not in self._futures:
                self._futures[name] = self._pool.submit(self._run, name)
            return self._futures[name]

    def _run(self, name: str) -> ProbeRun:
        proc = subprocess.Popen(
            [sys.executable, str(SCENARIOS_SCRIPT), name],
            cwd=str(ROOT),
            env=ramp_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with self._lock:
            self._procs.append(proc)
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n[scenario killed after {TIMEOUT_S}s]"
        lines = [line for line in out.splitlines() if line.startswith(MARK)]
        result = json.loads(lines[-1][len(MARK) :]) if lines else None
        return ProbeRun(proc.returncode, out, err, result)

    def __call__(self, name: str) -> dict:
        run = self._submit(name).result()
        assert run.result is not None and run.returncode == 0, (
            f"scenario {name} failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
        )
        if "skip" in run.result:
            pytest.skip(run.result["skip"])
        return run.result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()


@pytest.fixture(scope="module")
def scenarios(request: pytest.FixtureRequest):
    # Start the scenarios of every selected case of this module now, not one by one as the tests reach them.
    names = [
        item.function.scenario_name
        for item in request.session.items
        if item.module is request.module and hasattr(getattr(item, "function", None), "scenario_name")
    ]
    runner = Scenarios(names)
    yield runner
    runner.close()


@pytest.fixture
def scenario(request: pytest.FixtureRequest, scenarios: Scenarios) -> dict:
    return scenarios(request.function.scenario_name)


def failed(outcome: dict, error: str, text: str = "") -> None:
    assert not outcome["ok"], f"expected {error}, but it worked: {outcome}"
    assert outcome["error"] == error, outcome
    assert text in outcome["message"], outcome


def worked(outcome: dict):
    assert outcome["ok"], f"still fails with the patch: {outcome}"
    return outcome["value"]


# ----------------------------------------------------------------------------------------------- cases


@covers("cuda_stubs")
def test_cuda_stubs(scenario):
    before, after = scenario["before"], scenario["after"]
    for call in ("current_device", "synchronize", "seeded_draws", "model_parallel_seed"):
        failed(before[call], "AssertionError", "Torch not compiled with CUDA enabled")
    failed(before["streams"], "RuntimeError", "requires CUDA")

    assert worked(after["current_device"]) == "cpu"
    worked(after["synchronize"])
    assert worked(after["streams"]) is True
    # The "CUDA" generator is the CPU one: seeding it gives the CPU stream, and its state replays.
    draws = worked(after["seeded_draws"])
    assert draws["via_cuda"] == draws["replayed"] == scenario["cpu_draws"]
    # ramp's init_parallel: megatron seeds its data-, tensor- and expert-parallel RNG streams.
    assert worked(after["model_parallel_seed"]) == [
        "data-parallel-rng",
        "expert-parallel-rng",
        "model-parallel-rng",
    ]


@covers("device_mode")
def test_device_mode(scenario):
    before, after = scenario["before"], scenario["after"]
    for call in ("zeros_cuda", "zeros_device_obj", "to_cuda", "grad_norm"):
        failed(before[call], "AssertionError", "Torch not compiled with CUDA enabled")
    failed(before["zeros_int_device"], "RuntimeError")

    for call in ("zeros_cuda", "zeros_device_obj", "zeros_int_device", "to_cuda"):
        assert worked(after[call]) == "cpu", call
    # megatron's grad norm over [3, 4] and [12]: sqrt(9 + 16 + 144).
    assert worked(after["grad_norm"]) == pytest.approx(13.0, abs=1e-5)


@covers("rng")
def test_rng(scenario):
    # Without the patch nothing raises: megatron's _set_cuda_rng_state hands the new state to
    # torch.cuda._lazy_call, which queues it until CUDA initialises (never, on CPU). Forks then neither
    # switch to the tracker's stream nor restore the default one.
    before = worked(scenario["before"])
    assert before["queued_cuda_calls"] > 0
    assert not before["outer_stream_intact"]
    assert not before["forked_stream_is_seed_stream"]
    assert before["warnings"] > 0

    after = worked(scenario["after"])
    assert after == {
        "outer_stream_intact": True,
        "forked_stream_is_seed_stream": True,
        "same_seed_same_numbers": True,
        "queued_cuda_calls": 0,
        "warnings": 0,
    }


@covers("te_general_gemm")
def test_te_general_gemm(scenario):
    assert scenario["targets"] and scenario["needed"]
    failed(scenario["before"], "NameError", "te_general_gemm")
    errors = worked(scenario["after"])
    assert errors == {"out_err": 0.0, "grad_inp_err": 0.0, "grad_weight_err": 0.0}  # the plain matmul
    assert not scenario["needed_after"]


@covers("tensor_type")
def test_tensor_type(scenario):
    before, after = scenario["before"], scenario["after"]
    failed(before["clip"], "AssertionError")
    assert worked(before["conversions"])["no_arg"] == "torch.FloatTensor"

    # clip_grad_by_total_norm_fp32 scales by max_norm / (total_norm + 1e-6).
    assert worked(after["clip"]) == pytest.approx([1.0 / (10.0 + 1e-6)] * 4, rel=1e-6)
    conversions = worked(after["conversions"])
    assert conversions["no_arg"] == "torch.cuda.FloatTensor"
    assert conversions["int_no_arg"] == "torch.cuda.LongTensor"
    # Conversions are untouched: still real conversions, still on the CPU.
    assert conversions["to_float64"] == ["torch.float64", "cpu"]
    assert conversions["by_name"] == ["torch.float64", "cpu"]


@covers("torch_norm_sp")
def test_torch_norm_sp(scenario):
    before, after = scenario["before"], scenario["after"]
    for case in ("RMSNorm/sp=True", "LayerNorm/sp=True"):
        failed(before[case], "AssertionError", "sequence parallel not supported")
    worked(before["RMSNorm/sp=False"])

    expected = {
        "RMSNorm/sp=True": ("RMSNorm", [True]),
        "LayerNorm/sp=True": ("LayerNorm", [True, True]),  # weight and bias
        "RMSNorm/sp=False": ("RMSNorm", [False]),
    }
    for case, (kind, sp) in expected.items():
        norm = worked(after[case])
        assert (norm["type"], norm["sequence_parallel"], norm["eps"]) == (kind, sp, 1e-6), case
        assert norm["err"] < 1e-6, case  # the same numbers as torch's functional norm


@covers("moe_split_sizes", pytest.mark.dist)
def test_moe_split_sizes(scenario):
    # Megatron's alltoall dispatcher with EP=2 on two gloo ranks holding 5 and 6 tokens (top-2 of 4).
    tokens = 0
    for rank in scenario["ranks"]:
        assert "crashed" not in rank, rank
        failed(rank["before"], "TypeError", "all_to_all_single(): incompatible function arguments")
        after = worked(rank["after"])
        assert after["max_err"] < 1e-5  # every token came back from its experts, weighted correctly
        tokens += sum(after["tokens_per_local_expert"])
        assert rank["splits_type"] == "ndarray"
    assert tokens == (5 + 6) * 2


@covers("distopt_checkpoint")
def test_distopt_checkpoint(scenario):
    assert scenario["targets"] and scenario["needed"]
    assert "metadata.json" in scenario["checkpoint"]
    before, after = scenario["before"], scenario["after"]
    # state_dict of a fresh optimizer over torch Adam: "assert len(steps) == 1" on empty state.
    failed(before["sharded_state_dict_for_load"], "AssertionError")
    # Past that, the fully_reshardable load copies torch Adam's per-parameter 'step', absent in the file.
    failed(before["load_after_manual_state_fill"], "KeyError", "step")
    # And the upstream load had already given all of a group's parameters one shared 'step' tensor.
    assert before["params_first_optimizer"] > 1
    assert before["distinct_step_tensors_first_optimizer"] == 1

    worked(after["load"])
    assert after["distinct_step_tensors"] == after["params"] > 1
    assert after["step_values"] == [2.0]  # the saved step, two optimizer steps
    assert after["state_equal"]  # exp_avg, exp_avg_sq and step exactly as saved
    # The resumed run's next step equals the uninterrupted run's; with a shared step it does not.
    assert after["next_step_param_diff_resumed"] == 0.0
    assert after["next_step_param_diff_shared_step"] > 1e-5
    assert after["step_values_after_next_step"] == [3.0]


@covers("async_save_queue")
def test_async_save_queue(scenario):
    before, after = scenario["before"], scenario["after"]
    # The spawn Manager re-imported the unguarded script (a second marker line) and the save's queue
    # was never made: the child dies in its bootstrap, the parent sees EOFError (or, in a real training
    # script, deadlocks).
    assert before["marker_lines"] >= 2, before
    assert before["returncode"] != 0 or before["timed_out"], before
    assert "QUEUE" not in before["stdout"], before

    assert "NEEDED True" in after["stdout"], after
    assert after["returncode"] == 0 and not after["timed_out"], after
    assert after["marker_lines"] == 1, after
    assert "QUEUE AutoProxy[Queue]" in after["stdout"], after
    # The queue's Manager outlives a SIGTERM sent to the whole job (Slurm's time limit): the save at
    # SIGTERM still has its results queue.
    assert "AFTER SIGTERM written" in after["stdout"], after


# ------------------------------------------------------------------------------------ registry, apply_all


def test_every_patch_module_has_a_case():
    modules = {p.stem for p in (ROOT / "patches").glob("*.py") if p.stem != "__init__"}
    assert set(patches._MODULES) == modules, "patches/__init__.py _MODULES and the files in patches/ differ"
    assert set(COVERED) == modules, f"patches without a test here: {sorted(modules - set(COVERED))}"


@uses_scenario("apply_all")
def test_apply_all_without_cpu_applies_only_the_patches_for_every_device(scenario):
    result = scenario
    if result["cuda_available"]:
        pytest.skip("needs a machine without CUDA")
    registry = result["registry"]
    assert [p["name"] for p in registry] == list(patches._MODULES)
    expected = [p["name"] for p in registry if not p["cpu_only"] and p["targets"] and p["needed"]]
    assert expected, "no patch applies on every device any more: check this test"
    assert result["applied"] == expected
    assert {name for name, applied in result["applied_flags"].items() if applied} == set(expected)
    # torch is untouched by the CPU-only patches.
    failed(result["current_device"], "AssertionError")
    failed(result["zeros_cuda"], "AssertionError")
    assert result["type_string"] == "torch.FloatTensor"
