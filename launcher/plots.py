"""PNG plots of a run, drawn from its metrics.jsonl: loss, learning rate, and global batch (with the layout
of each batch phase) vs tokens."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Train records and eval records of a metrics.jsonl."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (evals if "val_loss" in rec else train).append(rec)
    return train, evals


def plot_run(metrics_path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    keys = sorted({k for r in train for k in r if k == "lr" or k.startswith("lr/")})
    for k in keys:
        ax.plot([r["tokens"] for r in train if k in r], [r[k] for r in train if k in r], label=k)
    ax.set_xlabel("tokens")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per param group")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.step([r["tokens"] for r in train], [r["global_batch"] for r in train], where="post")
    previous = None
    for r in train:  # the layout of each batch phase, and the in-job switches with their time
        if r.get("layout") and r["layout"] != previous:
            note = r["layout"] + (f"\nswitch {r['switch_time_s']:.1f}s" if "switch_time_s" in r else "")
            ax.annotate(
                note, (r["tokens"], r["global_batch"]), fontsize=7, xytext=(3, 4), textcoords="offset points"
            )
            if "switch_time_s" in r:
                ax.axvline(r["tokens"], color="gray", ls=":", lw=0.8)
            previous = r["layout"]
    ax.set_xlabel("tokens")
    ax.set_ylabel("global batch (sequences)")
    ax.set_title("Global batch size and layout (dotted: in-job layout switch)")
    ax.grid(alpha=0.3)
    save(fig, "batch.png")
    return written
