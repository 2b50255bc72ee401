"""Run the megatron-core/torch scenario one patch exists for, without it and then with it, in this process.

    python tests/patch_scenarios.py PATCH_NAME     # or: apply_all

Every other patch is applied first, as in a real CPU run; the scenario then runs without the named patch
(its failure is caught and recorded), the patch is applied, and the scenario runs again. The last line of
stdout is ``PATCH_SCENARIO {json}``, which tests/unit/test_patches.py asserts on. The patches change torch
and megatron-core for the whole process, so every scenario needs a fresh interpreter.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import patches  # noqa: E402  (needs the repository on sys.path)

MARK = "PATCH_SCENARIO "
SCENARIOS: dict[str, Callable[[str], dict]] = {}
# Megatron's "Transformer Engine / Apex not installed" fallbacks warn on import; the JSON line is the output.
warnings.filterwarnings("ignore")


def scenario(fn: Callable[[str], dict]) -> Callable[[str], dict]:
    SCENARIOS[fn.__name__] = fn
    return fn


def patch(name: str) -> patches.Patch:
    return next(p for p in patches.all_patches() if p.name == name)


def apply_others(name: str) -> None:
    """What ``apply_all(cpu=True)`` does, less the patch under test."""
    version = patches.megatron_version()
    for p in patches.all_patches():
        if p.name != name and p.targets(version) and p.needed():
            p.apply()


def target_info(name: str) -> dict:
    p = patch(name)
    return {"needed": bool(p.needed()), "targets": p.targets(patches.megatron_version())}


def attempt(fn: Callable, *args) -> dict:
    """{"ok": True, "value": ...} or {"ok": False, "error": exception type, "message": ...}."""
    try:
        return {"ok": True, "value": fn(*args)}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e)[:400]}


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def init_single_process_gloo() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def run_two_ranks(body: Callable[[int], dict], timeout: float = 120.0) -> list[dict]:
    """``body(rank)`` in 2 forked gloo processes (they inherit this process's imports and patches)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="patch_scenarios_store_")
    store = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_rank_main, args=(rank, store, body, results)) for rank in range(2)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    try:
        for _ in procs:
            rank, result = results.get(timeout=timeout)
            out[rank] = result
    except Exception as e:  # a hang (queue.Empty) or a crashed rank
        out = {r: out.get(r, {"crashed": f"{type(e).__name__}: no result within {timeout}s"}) for r in (0, 1)}
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(store_dir, ignore_errors=True)
    return [out[0], out[1]]


def _rank_main(rank: int, store: str, body: Callable[[int], dict], results) -> None:
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store, 2),
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=60),
        )
        result = body(rank)
    except Exception:
        result = {"crashed": traceback.format_exc()[-2000:]}
    results.put((rank, result))


# ------------------------------------------------------------------------------------------- scenarios


@scenario
def cuda_stubs(name: str) -> dict:
    import torch

    init_single_process_gloo()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel()

    def model_parallel_seed() -> list[str]:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        return sorted(tensor_parallel.get_cuda_rng_tracker().get_states())

    def calls() -> dict:
        def seeded_draws():
            torch.cuda.manual_seed(7)
            state = torch.cuda.get_rng_state()
            a = torch.randn(3)
            torch.cuda.set_rng_state(state)
            return {"via_cuda": a.tolist(), "replayed": torch.randn(3).tolist()}

        def streams():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                pass
            e = torch.cuda.Event()
            e.record()
            e.synchronize()
            return True

        return {
            "current_device": attempt(lambda: str(torch.cuda.current_device())),
            "synchronize": attempt(torch.cuda.synchronize),
            "streams": attempt(streams),
            "seeded_draws": attempt(seeded_draws),
            # ramp's layout.init_parallel: the first megatron call of a run that needs the stubs.
            "model_parallel_seed": attempt(model_parallel_seed),
        }

    before = calls()
    patch(name).apply()
    after = calls()
    return {"before": before, "after": after, "cpu_draws": torch.randn(3, generator=_gen(7)).tolist()}


@scenario
def device_mode(name: str) -> dict:
    import torch

    init_single_process_gloo()
    import torch.distributed as dist
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    def calls() -> dict:
        grads = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]
        return {
            "zeros_cuda": attempt(lambda: str(torch.zeros(2, device="cuda").device)),
            "zeros_device_obj": attempt(lambda: str(torch.ones(2, device=torch.device("cuda", 0)).device)),
            "zeros_int_device": attempt(lambda: str(torch.zeros(2, device=0).device)),
            "to_cuda": attempt(lambda: str(torch.arange(3).to("cuda").device)),
            # megatron writes device='cuda' literally in its grad-norm (every step with clipping).
            "grad_norm": attempt(
                lambda: get_grad_norm_fp32(grads, grad_stats_parallel_group=dist.group.WORLD)
            ),
        }

    before = calls()
    patch(name).apply()
    return {"before": before, "after": calls()}


@scenario
def rng(name: str) -> dict:
    import logging

    import torch
    from megatron.core.tensor_parallel import random as mrandom

    class Count(logging.Handler):
        n = 0

        def emit(self, record) -> None:
            Count.n += 1

    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(Count())

    def run() -> dict:
        # Reference streams: the default generator from seed 123, and a fresh generator from seed 7.
        torch.manual_seed(123)
        outer_ref = torch.randn(4)
        forked_ref = torch.randn(4, generator=_gen(7))
        queued0, warned0 = len(getattr(torch.cuda, "_queued_calls", ())), Count.n

        torch.manual_seed(123)
        tracker = mrandom.CudaRNGStatesTracker()
        tracker.add("x", 7)
        a = torch.randn(2)
        with tracker.fork("x"):
            f1 = torch.randn(2)
        with tracker.fork("x"):
            f2 = torch.randn(2)
        b = torch.randn(2)
        # A second tracker seeded the same way must replay the same forked numbers.
        again = mrandom.CudaRNGStatesTracker()
        again.add("x", 7)
        with again.fork("x"):
            g1 = torch.randn(2)
        return {
            "outer_stream_intact": torch.equal(torch.cat([a, b]), outer_ref),
            "forked_stream_is_seed_stream": torch.equal(torch.cat([f1, f2]), forked_ref),
            "same_seed_same_numbers": torch.equal(f1, g1),
            "queued_cuda_calls": len(getattr(torch.cuda, "_queued_calls", ())) - queued0,
            "warnings": Count.n - warned0,
        }

    before = attempt(run)
    patch(name).apply()
    return {"before": before, "after": attempt(run)}


@scenario
def te_general_gemm(name: str) -> dict:
    import torch
    from megatron.core.transformer.moe import moe_utils

    def run() -> dict:
        inp = torch.randn(5, 4, generator=_gen(0), requires_grad=True)
        weight = torch.randn(3, 4, generator=_gen(1), requires_grad=True)
        out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
        out.pow(2).sum().backward()
        ref_inp, ref_weight = inp.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        ref = ref_inp @ ref_weight.T
        ref.pow(2).sum().backward()
        return {
            "out_err": (out - ref).abs().max().item(),
            "grad_inp_err": (inp.grad - ref_inp.grad).abs().max().item(),
            "grad_weight_err": (weight.grad - ref_weight.grad).abs().max().item(),
        }

    info = target_info(name)
    before = attempt(run)
    patch(name).apply()
    return {**info, "needed_after": patch(name).needed(), "before": before, "after": attempt(run)}


@scenario
def tensor_type(name: str) -> dict:
    import torch
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    def clip() -> list[float]:
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.ones(4)
        clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=10.0)
        return p.grad.tolist()

    def conversions() -> dict:
        x = torch.ones(2)
        to64 = x.type(torch.float64)
        by_name = x.type("torch.DoubleTensor")
        return {
            "no_arg": x.type(),
            "to_float64": [str(to64.dtype), str(to64.device)],
            "by_name": [str(by_name.dtype), str(by_name.device)],
            "int_no_arg": torch.ones(2, dtype=torch.int64).type(),
        }

    before = {"clip": attempt(clip), "conversions": attempt(conversions)}
    patch(name).apply()
    return {"before": before, "after": {"clip": attempt(clip), "conversions": attempt(conversions)}}


@scenario
def torch_norm_sp(name: str) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def config(normalization: str, sp: bool) -> TransformerConfig:
        # MoE with TP > 1 requires sequence parallelism: the layout the local spec could not build.
        return TransformerConfig(
            num_layers=1,
            hidden_size=8,
            num_attention_heads=2,
            tensor_model_parallel_size=2,
            sequence_parallel=sp,
            normalization=normalization,
            use_cpu_initialization=True,
        )

    def build(normalization: str, sp: bool) -> dict:
        norm = WrappedTorchNorm(config(normalization, sp), 8, eps=1e-6)
        x = torch.randn(3, 8, generator=_gen(0))
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
            if normalization == "RMSNorm":
                ref = F.rms_norm(x, (8,), norm.weight, eps=1e-6)
            else:
                ref = F.layer_norm(x, (8,), norm.weight, norm.bias, eps=1e-6)
            err = (norm(x) - ref).abs().max().item()
        return {
            "type": type(norm).__name__,
            "eps": norm.eps,
            "sequence_parallel": [getattr(p, "sequence_parallel", None) for p in norm.parameters()],
            "err": err,
        }

    cases = (("RMSNorm", True), ("LayerNorm", True), ("RMSNorm", False))
    before = {f"{n}/sp={sp}": attempt(build, n, sp) for n, sp in cases}
    patch(name).apply()
    return {"before": before, "after": {f"{n}/sp={sp}": attempt(build, n, sp) for n, sp in cases}}


def dispatcher_round_trip(rank: int, tp: int, etp: int, ep: int) -> dict:
    """Megatron's alltoall token dispatcher: dispatch, an 'expert e multiplies by e+1', combine.

    Each rank holds a different number of tokens, so the splits are uneven. With every expert's output
    summed over its expert-TP ranks, a token comes back as ``etp * x * sum(e + 1 for its top-k experts)``.
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    experts, topk, hidden = 4, 2, 4
    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=2,
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_token_dispatcher_type="alltoall",
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        add_bias_linear=False,
        use_cpu_initialization=True,
    )
    gen = _gen(rank)
    n = 5 + rank
    x = torch.randn(n, hidden, generator=gen)
    chosen = torch.rand(n, experts, generator=gen).topk(topk, dim=1).indices
    routing_map = torch.zeros(n, experts, dtype=torch.bool).scatter_(1, chosen, True)
    probs = routing_map.float() / topk
    n_local = experts // ep
    first = ps.get_expert_model_parallel_rank() * n_local
    local = list(range(first, first + n_local))
    d = MoEAlltoAllTokenDispatcher(n_local, local, config, pg_collection=get_default_pg_collection())
    tokens, p = d.dispatch_preprocess(x, routing_map, probs)
    tokens, p = d.token_dispatch(tokens, p)
    tokens, per_expert, p = d.dispatch_postprocess(tokens, p)
    chunks = torch.split(tokens, [int(c) for c in per_expert])
    tokens = torch.cat([c * (e + 1) for c, e in zip(chunks, local)])
    out = d.combine_postprocess(d.token_combine(d.combine_preprocess(tokens)))
    expected = etp * x * (routing_map.float() * torch.arange(1, experts + 1)).sum(1, keepdim=True)
    return {
        "max_err": (out - expected).abs().max().item(),
        "tokens_per_local_expert": [int(c) for c in per_expert],
    }


@scenario
def moe_split_sizes(name: str) -> dict:
    def body(rank: int) -> dict:
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe import moe_utils

        ps.initialize_model_parallel(expert_model_parallel_size=2)
        # EP=2 is the layout that needs it: the splits of the expert-parallel all-to-all are uneven.
        before = attempt(dispatcher_round_trip, rank, 1, 1, 2)
        patch(name).apply()
        after = attempt(dispatcher_round_trip, rank, 1, 1, 2)
        splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([2, 3]), as_numpy=True)
        return {"before": before, "after": after, "splits_type": type(splits).__name__}

    return {"ranks": run_two_ranks(body)}


SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


@scenario
def distopt_checkpoint(name: str) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from patches import distopt_checkpoint as module

    init_single_process_gloo()
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)

    def build():
        # A one-layer MoE GPT as ramp builds it: local spec, megatron DDP with the distributed optimizer,
        # experts marked expert-parallel (two inner optimizers, as in every ramp layout), Adam, clip 1.0.
        config = TransformerConfig(
            num_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            ffn_hidden_size=32,
            num_moe_experts=2,
            moe_ffn_hidden_size=16,
            moe_router_topk=2,
            moe_token_dispatcher_type="alltoall",
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_cpu_initialization=True,
        )
        spec = get_gpt_layer_local_spec(num_experts=2, normalization="RMSNorm")
        gpt = GPTModel(config, spec, vocab_size=64, max_sequence_length=8, position_embedding_type="rope")
        for pname, param in gpt.named_parameters():
            if ".experts." in pname:
                param.allreduce = False
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)]
        opt_config = OptimizerConfig(
            optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=True
        )
        return chunks, get_megatron_optimizer(opt_config, chunks)

    def step(chunks, opt, k: int) -> None:
        # Fixed gradients in megatron DDP's buffers, then the real (clipped) distributed-optimizer step.
        for i, p in enumerate(chunks[0].parameters()):
            p.main_grad.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) * 0.01 * (k + 1) * (i + 1))
        ok, _, _ = opt.step()
        assert ok

    def inner(opt) -> list:
        return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]

    def sharded(chunks, opt, is_loading: bool) -> dict:
        msd = chunks[0].module.sharded_state_dict(metadata=SHARDING)
        return {
            "model": msd,
            "optimizer": opt.sharded_state_dict(msd, is_loading=is_loading, metadata=SHARDING),
        }

    def load(chunks, opt, path: str) -> None:
        state = dist_checkpointing.load(sharded(chunks, opt, True), path)
        chunks[0].module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    def steps_of(opt) -> list[list]:
        return [[s["step"] for s in o.state.values()] for o in inner(opt)]

    def adam_state(opt) -> list:
        return [
            v
            for o in inner(opt)
            for g in o.param_groups
            for p in g["params"]
            for _, v in sorted(o.state[p].items())
        ]

    def max_param_diff(a, b) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a[0].parameters(), b[0].parameters()))

    info = target_info(name)
    ckpt = tempfile.mkdtemp(prefix="patch_scenarios_ckpt_")
    atexit.register(shutil.rmtree, ckpt, True)
    # The run to resume: 2 steps, then a torch_dist checkpoint (saving works without the patch).
    c1, o1 = build()
    for k in range(2):
        step(c1, o1, k)
    dist_checkpointing.save(sharded(c1, o1, False), ckpt)
    info["checkpoint"] = sorted(os.listdir(ckpt))

    before: dict = {}
    c2, o2 = build()
    # 1. A fresh optimizer cannot even describe the state it is about to load.
    before["sharded_state_dict_for_load"] = attempt(lambda: bool(sharded(c2, o2, True)))
    # 2. With the first fix done by hand (zero Adam state), the reshardable load hits torch Adam's 'step'.
    for o in inner(o2):
        module._fill_empty_adam_state(o)
    before["load_after_manual_state_fill"] = attempt(lambda: load(c2, o2, ckpt))
    # 3. What the upstream load had assigned by then: one 'step' tensor shared by all of a group's params.
    before["distinct_step_tensors_first_optimizer"] = len({id(s) for s in steps_of(o2)[0]})
    before["params_first_optimizer"] = len(steps_of(o2)[0])

    patch(name).apply()
    after: dict = {}
    c3, o3 = build()
    after["load"] = attempt(lambda: load(c3, o3, ckpt))
    if not after["load"]["ok"]:
        return {**info, "before": before, "after": after}
    steps = [s for group in steps_of(o3) for s in group]
    after["params"] = len(steps)
    after["distinct_step_tensors"] = len({id(s) for s in steps})
    after["step_values"] = sorted({float(s) for s in steps})
    saved, loaded = adam_state(o1), adam_state(o3)
    after["state_equal"] = len(saved) == len(loaded) and all(torch.equal(a, b) for a, b in zip(saved, loaded))
    # What a shared step does to the next update: the same load, then the steps re-shared as upstream does.
    c4, o4 = build()
    load(c4, o4, ckpt)
    for o in inner(o4):
        shared = torch.tensor(2.0)
        for s in o.state.values():
            s["step"] = shared
    for chunks, opt in ((c1, o1), (c3, o3), (c4, o4)):
        step(chunks, opt, 2)
    after["next_step_param_diff_resumed"] = max_param_diff(c1, c3)
    after["next_step_param_diff_shared_step"] = max_param_diff(c1, c4)
    after["step_values_after_next_step"] = sorted({float(s) for group in steps_of(o3) for s in group})
    return {**info, "before": before, "after": after}


UNGUARDED = """\
import os
# An unguarded training script: everything below also runs when multiprocessing re-imports __main__.
with open(os.environ["PATCH_SCENARIO_MARKER"], "a") as f:
    f.write(f"{os.getpid()}\\n")
import warnings
warnings.filterwarnings("ignore")
import patches.async_save_queue
from megatron.core.dist_checkpointing.strategies import filesystem_async
print("NEEDED", patches.async_save_queue.PATCH.needed(), flush=True)
for p in patches.all_patches():
    if p.name != "async_save_queue" or os.environ["PATCH_SCENARIO_WITH"] == "1":
        p.apply()
queue = filesystem_async._get_write_results_queue()
print("QUEUE", type(queue).__name__, flush=True)
# Slurm's time-limit signal, as scancel --signal=TERM delivers it: to every process of the job step, the
# Manager serving the save's queue included. The worker (this script) handles it and checkpoints.
import signal, time
signal.signal(signal.SIGTERM, lambda *_: None)
os.killpg(os.getpgrp(), signal.SIGTERM)
time.sleep(0.5)
queue.put("written")
print("AFTER SIGTERM", queue.get(timeout=10), flush=True)
"""


@scenario
def async_save_queue(name: str) -> dict:
    import signal

    work = Path(tempfile.mkdtemp(prefix="patch_scenarios_async_"))
    script = work / "train.py"
    script.write_text(UNGUARDED)

    def start(with_patch: bool) -> subprocess.Popen:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PATCH_SCENARIO_MARKER": str(work / f"marker_{int(with_patch)}"),
            "PATCH_SCENARIO_WITH": "1" if with_patch else "0",
        }
        return subprocess.Popen(
            [sys.executable, str(script)],
            cwd=str(work),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so a deadlocked save and its Manager process are killed together
        )

    def finish(proc: subprocess.Popen, with_patch: bool, timeout: float = 150.0) -> dict:
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        marker = work / f"marker_{int(with_patch)}"
        return {
            "returncode": proc.returncode,
            "timed_out": timed_out,
            "marker_lines": len(marker.read_text().splitlines()) if marker.exists() else 0,
            "stdout": out[-1000:],
            "stderr_tail": err[-1500:],
            "bootstrapping_error": "bootstrapping phase" in err,
        }

    try:
        # Independent runs (own marker files): run them side by side.
        procs = {with_patch: start(with_patch) for with_patch in (False, True)}
        return {"before": finish(procs[False], False), "after": finish(procs[True], True)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


@scenario
def apply_all(name: str) -> dict:
    import torch

    version = patches.megatron_version()
    registry = [
        {"name": p.name, "cpu_only": p.cpu_only, "targets": p.targets(version), "needed": bool(p.needed())}
        for p in patches.all_patches()
    ]
    applied = patches.apply_all(cpu=False)
    return {
        "cuda_available": torch.cuda.is_available(),
        "registry": registry,
        "applied": applied,
        "applied_flags": {p.name: p.applied for p in patches.all_patches()},
        # The CPU-only patches must have left torch alone.
        "current_device": attempt(lambda: str(torch.cuda.current_device())),
        "type_string": torch.ones(1).type(),
        "zeros_cuda": attempt(lambda: str(torch.zeros(1, device="cuda").device)),
    }


# In-process scenarios get the other patches first; these two set up their own processes.
SELF_CONTAINED = {"async_save_queue", "apply_all"}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SCENARIOS:
        print(f"usage: patch_scenarios.py {{{','.join(SCENARIOS)}}}", file=sys.stderr)
        return 2
    name = argv[0]
    if name not in SELF_CONTAINED:
        import torch

        if torch.cuda.is_available() and patch(name).cpu_only:
            print(MARK + json.dumps({"skip": f"{name} is a CPU-only patch and this torch sees a GPU"}))
            return 0
        torch.set_num_threads(1)
        apply_others(name)
    result = SCENARIOS[name](name)
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
