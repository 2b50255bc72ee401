"""ramp-probe: measure the critical batch size of a run by branched training from its checkpoints.

    ramp-probe --run runs/moe-tiny --checkpoint 200 --checkpoint 400 --out runs/moe-tiny-probes
    ramp-probe --run runs/moe-tiny --checkpoint latest --out P --multipliers 1,2,4 --budget-tokens 65536

Every fork runs its branches (batch k x B, LR x f(k), the same tokens on the same data) through the real
entry point, each in its own directory under ``--out``; the parent run is only read. Writes
``OUT/probes.jsonl`` (one line per fork: its tokens, the branches' losses with noise estimates, the CBS and
a confidence note), ``OUT/cbs_fit.json`` and ``OUT/cbs_vs_tokens.png``. See launcher/probes.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.errors import RampError, require
from launcher.laws import cbs as cbs_law
from launcher.laws.batch_size import LR_RULES


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RampError(
            f"--multipliers {text!r}: give numbers separated by commas, e.g. 1,2,4,8,16"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from launcher.probes import BRANCH_SCHEDULES

    ap = argparse.ArgumentParser(prog="ramp-probe", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="the parent run directory (holds config.yaml)")
    ap.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="a checkpoint of the run to fork from: a step number, 'latest' or a path (repeat for more)",
    )
    ap.add_argument("--out", required=True, type=Path, help="probe output directory (outside the run)")
    ap.add_argument("--multipliers", type=_floats, default=list(cbs_law.DEFAULT_MULTIPLIERS))
    ap.add_argument("--lr-rule", choices=LR_RULES, default="sqrt", help="branch LR x f(k) (default sqrt)")
    ap.add_argument(
        "--lr-schedule",
        choices=BRANCH_SCHEDULES,
        default="hold",
        help="hold: the fork's LR held constant (the paper); decay: annealed over the branch to the "
        "parent's final LR (the decay a WSD run will see)",
    )
    ap.add_argument("--budget-tokens", type=int, default=None, help="tokens per branch (default: from noise)")
    ap.add_argument("--noise-sd", type=float, default=0.0025, help="read-off noise sd, epsilon's units")
    ap.add_argument(
        "--noise-tokens", type=int, default=262_144, help="branch length the noise was measured at"
    )
    ap.add_argument("--min-steps", type=int, default=4, help="steps of the largest branch, at least")
    ap.add_argument("--rule", choices=cbs_law.READOFF_RULES, default="val", help="val (default) or ema")
    ap.add_argument("--epsilon", type=float, default=cbs_law.DEFAULT_EPSILON)
    ap.add_argument("--epsilon-mode", choices=cbs_law.EPSILON_MODES, default="relative")
    ap.add_argument("--evals", type=int, default=6, help="validation passes per branch")
    ap.add_argument("--all", action="store_true", help="run every multiplier (no stop at the first failure)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per branch (torchrun when > 1)")
    ap.add_argument("--timeout-s", type=float, default=None, help="a branch running longer is failed")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override on every branch"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from launcher import checkpoint, recipe
    from launcher.probes import ProbeConfig, fit_and_plot, run_fork

    try:
        require(
            bool(args.checkpoint), "ramp-probe: give at least one --checkpoint (a step, 'latest' or a path)"
        )
        cfg = ProbeConfig(
            multipliers=args.multipliers,
            lr_rule=args.lr_rule,
            lr_schedule=args.lr_schedule,
            budget_tokens=args.budget_tokens,
            noise_sd=args.noise_sd,
            noise_tokens=args.noise_tokens,
            min_steps=args.min_steps,
            rule=args.rule,
            epsilon=args.epsilon,
            epsilon_mode=args.epsilon_mode,
            evals=args.evals,
            stop_at_failure=not args.all,
            nproc=args.nproc,
            timeout_s=args.timeout_s,
            extra_sets=args.set,
        )
        config = args.run / "config.yaml"
        require(
            config.exists(), f"ramp-probe: --run {args.run} holds no config.yaml; give a ramp run directory"
        )
        ck_dir = recipe.load(config).checkpoint_dir
        paths = [checkpoint.resolve(str(c), ck_dir, verify_checksums=True) for c in args.checkpoint]
        for spec, path in zip(args.checkpoint, paths):
            require(path is not None, f"ramp-probe: --checkpoint {spec}: no checkpoint in {ck_dir}")
        for path in paths:
            rec = run_fork(args.run, path, args.out, cfg, cwd=Path.cwd())
            ks = ", ".join(
                f"k={b['k']:g}: {b['loss']:.4f}"
                if b["loss"] is not None
                else f"k={b['k']:g}: FAILED ({b['error']})"
                for b in rec["branches"]
            )
            print(f"ramp-probe: fork at {rec['tokens']} tokens (batch {rec['base_batch']}): {ks}", flush=True)
            print(
                f"ramp-probe:   CBS {rec['cbs']} sequences [{rec['confidence']}: {rec['note']}]", flush=True
            )
        fit = fit_and_plot(args.out)
        print(f"ramp-probe: curve fit: {fit if fit else 'too few forks for a held-out fit'}", flush=True)
        print(
            f"ramp-probe: wrote {args.out / 'probes.jsonl'} and {args.out / 'cbs_vs_tokens.png'}", flush=True
        )
    except RampError as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
