"""The loss-curve PNG a run leaves behind, so users look at a plot, not only at logs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def write_loss_curve(history: Sequence[dict[str, Any]], path: str, *, title: str = "") -> None:
    """Plots training loss (and eval loss, when present) against step; writes atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history if "loss" in r]
    losses = [r["loss"] for r in history if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, label="train loss", linewidth=0.8, alpha=0.35, color="C0")
    ax.plot(steps, _ema(losses), label="train loss (EMA 0.9)", linewidth=1.8, color="C0")
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "lorax training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _ema(values: Sequence[float], decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: small-batch losses are noisy per step."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**i))
    return out
