"""Training curves from ``metrics.jsonl``: training loss per step (raw, faint, and smoothed),
validation loss at its points, the learning rate on a second axis. Several runs share one figure.

A rollback logs the steps it repeats again: the last record of a step is the one that counts (the
earlier ones were rolled back), so every series is one value per step, in step order.
matplotlib's Agg backend: nothing needs a display.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Curves:
    """One run's series, each as (x, y) arrays in step order."""
    label: str
    train: tuple[np.ndarray, np.ndarray]
    smooth: tuple[np.ndarray, np.ndarray]
    lr: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    steps: dict[int, dict] = field(repr=False, default_factory=dict)


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _last_per_step(rows: list[dict], key: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in rows:
        if key in r:
            out[int(r["step"])] = r  # a repeated step (rollback) replaces the rolled-back record
    return dict(sorted(out.items()))


def _step_tokens(r: dict) -> float:
    if "tokens" in r:
        return float(r["tokens"])
    return float(round(r.get("tokens_per_s", 0.0) * r.get("step_time_s", 0.0)))  # files from before "tokens"


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (over fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    end = np.arange(1, len(y) + 1)
    start = np.maximum(end - window, 0)
    return (c[end] - c[start]) / (end - start)


def curves(rows: list[dict], *, label: str, x: str = "step", window: int | None = None) -> Curves:
    if x not in ("step", "tokens"):
        raise ValueError(f"x={x!r}: expected 'step' or 'tokens'")
    train, valid = _last_per_step(rows, "loss"), _last_per_step(rows, "valid/loss")
    steps = np.array(list(train), dtype=np.int64)
    if x == "step":
        xs, at = steps.astype(float), {int(s): float(s) for s in steps}
    else:
        xs = np.cumsum([_step_tokens(r) for r in train.values()])
        at = dict(zip((int(s) for s in steps), xs.tolist()))
    loss = np.array([r["loss"] for r in train.values()], dtype=float)
    window = window or max(1, len(loss) // 25)
    lr = np.array([r.get("lr", np.nan) for r in train.values()], dtype=float)
    vx = np.array([at.get(s, float(s) if x == "step" else np.nan) for s in valid], dtype=float)
    vy = np.array([r["valid/loss"] for r in valid.values()], dtype=float)
    return Curves(label=label, train=(xs, loss), smooth=(xs, smooth(loss, window)), lr=(xs, lr), valid=(vx, vy),
                  steps=train)


def plot(runs: list[Curves], out: str | Path, *, x: str = "step", title: str | None = None):
    """Draw ``runs`` on one figure and save it to ``out`` (PNG, or any format matplotlib writes);
    returns the figure (its lines carry the plotted data, labelled ``<run> train`` and so on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    ax_lr = ax.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(runs):
        color = colors[i % len(colors)]
        ax.plot(*c.train, color=color, alpha=0.2, linewidth=0.8, label=f"{c.label} train")
        ax.plot(*c.smooth, color=color, linewidth=1.8, label=f"{c.label} train (smoothed)")
        if len(c.valid[0]):
            ax.plot(*c.valid, color=color, marker="o", linestyle="--", linewidth=1.2, label=f"{c.label} valid")
        ax_lr.plot(*c.lr, color=color, linestyle=":", linewidth=1.0, label=f"{c.label} lr")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats per token)")
    ax_lr.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(title or ", ".join(c.label for c in runs))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return fig
