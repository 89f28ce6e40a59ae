"""Training progress as one rich progress bar (step, loss, learning rate, tokens/s), a `TrainerCallback`.

It replaces what `Trainer` prints by itself: a tqdm bar with its log dicts (``{'loss': ...}``) printed
between the bar's redraws. `PrefixTrainer` runs with ``disable_tqdm`` and without `PrinterCallback`,
and adds this instead. Validation results are printed as one line each above the bar. Tokens/s
counts the real (non-padding) tokens `Trainer` saw (``include_num_input_tokens_seen``).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class RichProgress(TrainerCallback):
    """The bar of rank 0; every other rank shows nothing."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress: Progress | None = None
        self.stats: dict[str, float] = {}
        self.started = 0.0
        self.tokens_at_start = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("training", total=state.max_steps, completed=state.global_step, stats="")
        self.started, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen  # a resumed run's too
        self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self.line(state))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.progress is None or not logs:
            return
        self.stats.update({key: logs[key] for key in ("loss", "learning_rate") if key in logs})
        evaluated = {key[5:]: value for key, value in logs.items() if key.startswith("eval_") and _number(value)}
        if "loss" in evaluated:
            shown = "  ".join(f"{key} {value:.4g}" for key, value in evaluated.items() if "per_second" not in key)
            self.progress.console.print(f"step {state.global_step}: validation {shown}")
        self.progress.update(self.task, stats=self.line(state))

    def line(self, state: Any) -> str:
        """``loss 1.234  lr 4.0e-03  1,234 tokens/s`` from what has been logged so far."""
        parts = []
        if "loss" in self.stats:
            parts.append(f"loss {self.stats['loss']:.4f}")
        if "learning_rate" in self.stats:
            parts.append(f"lr {self.stats['learning_rate']:.1e}")
        seconds = time.perf_counter() - self.started
        if seconds > 0 and state.num_input_tokens_seen > self.tokens_at_start:
            parts.append(f"{(state.num_input_tokens_seen - self.tokens_at_start) / seconds:,.0f} tokens/s")
        return "  ".join(parts)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self.line(state))
            self.progress.stop()
            self.progress = None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
