"""The plots callback: drawn at checkpoints and at the end, but not at a layout switch's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from launcher.callbacks.plotting import Plots


def _metrics(run_dir: Path) -> None:
    rows = [
        {"step": s, "tokens": 512 * s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "global_batch": 8 if s < 3 else 16}
        for s in range(1, 6)
    ]
    rows.append({"step": 5, "tokens": 2560, "val_loss": 4.6})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_switch_checkpoint_draws_nothing_and_a_plain_one_draws(tmp_path: Path, pg) -> None:
    _metrics(tmp_path)
    plots = Plots(tmp_path)
    plots.on_checkpoint_saved(SimpleNamespace(switching=True), str(tmp_path / "step_3"))
    assert not (tmp_path / "plots").exists()
    plots.on_checkpoint_saved(SimpleNamespace(switching=False), str(tmp_path / "step_5"))
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
