"""The report's figures (matplotlib, Agg backend) as PNG bytes: metric trends and the training loss."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

FIGSIZE = (6.4, 3.2)
DPI = 100


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    return buf.getvalue()


def trend_plot(rows: list[dict[str, Any]], key: str, ylabel: str, reference_key: str | None = None,
               reference_label: str = "") -> bytes:
    """`key` against checkpoint steps (one point per checkpoint); an optional dashed reference level."""
    rows = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r["steps_done"])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot([r["steps_done"] for r in rows], [r[key] for r in rows], "o-", label=ylabel)
    if reference_key:
        ref = [r[reference_key] for r in rows if r.get(reference_key) is not None]
        if ref:
            ax.axhline(ref[-1], linestyle="--", color="gray", label=reference_label)
    ax.set_xlabel("training steps (checkpoint)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def nights_plot(rows: list[dict[str, Any]], key: str, ylabel: str) -> bytes:
    """`key` against the time each checkpoint was evaluated (one point per row, labelled with its step)."""
    rows = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r["timestamp"])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    times = [datetime.fromisoformat(r["timestamp"]) for r in rows]
    ax.plot(times, [r[key] for r in rows], "s", color="tab:orange")
    for t, r in zip(times, rows):
        ax.annotate(str(r["steps_done"]), (t, r[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("evaluated at (UTC); labels = checkpoint step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _png(fig)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential smoothing, debiased so the start is not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_plot(metrics: list[dict[str, Any]], checkpoint_steps: list[int]) -> bytes:
    """Training loss per step (raw and smoothed), the learning rate, and evaluated checkpoints."""
    rows = sorted((r for r in metrics if r.get("loss") is not None), key=lambda r: r["step"])
    steps = [r["step"] + 1 for r in rows]  # steps done after the row's step, as checkpoints count them
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", alpha=0.35, label="loss")
    ax.plot(steps, smooth([r["loss"] for r in rows]), color="tab:blue", label="loss (smoothed)")
    for s in checkpoint_steps:
        ax.axvline(s, color="gray", alpha=0.4, linewidth=0.8)
    ax.set_xlabel("training steps (grey: evaluated checkpoints)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if any(r.get("lr") is not None for r in rows):
        lr = ax.twinx()
        lr.plot(steps, [r.get("lr") for r in rows], color="tab:green", linewidth=0.8, label="lr")
        lr.set_ylabel("learning rate", color="tab:green")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


__all__ = ["loss_plot", "nights_plot", "smooth", "trend_plot"]
