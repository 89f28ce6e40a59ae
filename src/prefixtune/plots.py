"""Training curves as PNG: train/validation loss, and generation metrics, per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def plot_history(history: list[dict[str, Any]], folder: str | Path) -> list[Path]:
    """Write ``loss.png`` (and ``metrics.png`` when generation metrics were logged); return the paths."""
    folder = Path(folder)
    written = []
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        steps, values = _series(history, key)
        if steps:
            axes.plot(steps, values, marker="." if key == "eval_loss" else None, label=label)
    axes.set(xlabel="step", ylabel="loss", title="prefix tuning loss")
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    figure.savefig(folder / "loss.png", dpi=100)
    plt.close(figure)
    written.append(folder / "loss.png")

    metric_keys = sorted({k for entry in history for k in entry if k in ("eval_bleu", "eval_chrf", "eval_rougeL")})
    if metric_keys:
        figure, axes = plt.subplots(figsize=(6, 4))
        for key in metric_keys:
            axes.plot(*_series(history, key), marker="o", label=key.removeprefix("eval_"))
        axes.set(xlabel="step", ylabel="score", title="validation generation metrics")
        axes.legend()
        figure.tight_layout()
        figure.savefig(folder / "metrics.png", dpi=100)
        plt.close(figure)
        written.append(folder / "metrics.png")
    return written
