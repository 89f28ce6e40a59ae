"""One run of the E2E protocol: build a method on a fresh copy of the frozen base, train it with the
Hugging Face `Trainer` on one fold's training rows, decode the held-out MRs, and time the steps.

Every method uses the same loop (AdamW, the setting's schedule, the same data order for a seed), the
same prompt format ("{mr}\\n" + completion + EOS, loss on the completion) and the same decoding
length. PEFT methods are built with `get_peft_model` as PEFT documents them. PEFT 0.21's
`generate()` ignores a prefix-tuning or cartridge prefix with transformers 5.24 (its outputs equal the
bare model's), so those two are decoded by prefixtune: the trained adapter is saved as PEFT saves it
and loaded into a `PrefixModel` on the same frozen base (`peft_format`; tests/test_peft_interop.py
proves its logits are PEFT's forward's), which decodes with a cache like every other method.
(`greedy_through_forward`, a full forward per token, is the older `e2e_quality.py`'s way.)

Early stopping is transformers' `EarlyStoppingCallback` on the inner fold's loss. Best-of-N is
`KeepBest`: it keeps the trainable weights of the best inner-fold loss in memory and restores them
at the end (the Trainer's own ``load_best_model_at_end`` would write a checkpoint, the whole frozen
base included, at every evaluation).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from e2e_grid import Setting
from prefixtune import PrefixConfig, PrefixModel
from prefixtune.data import PromptFormatter, pad_batch

Rows = list[dict[str, list[int]]]


@dataclass
class Budget:
    steps: int
    batch_size: int
    max_new_tokens: int
    eval_batch_size: int = 16
    device: str = "cpu"


def build(setting: Setting, base, tokenizer) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """(trainable model, generate(**batch) -> token ids) for a fresh copy `base` of the frozen base."""
    if setting.method.startswith("ours-"):
        config = PrefixConfig(
            prefix_length=setting.prefix_length,
            parameterization=setting.method.removeprefix("ours-"),
            init=setting.init,
            init_text=setting.init_text,
            dropout=setting.dropout,
            **({"mlp_hidden_size": setting.mlp_hidden_size} if setting.mlp_hidden_size else {}),
        )
        model = PrefixModel(base, config, tokenizer=tokenizer)
        return model, model.generate
    if setting.method == "full":
        base.requires_grad_(True)
        return base, base.generate
    from peft import CartridgeConfig, LoraConfig, PrefixTuningConfig, get_peft_model

    if setting.method == "peft-lora":
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=setting.dropout, target_modules=["q_proj", "v_proj"]
        )
        model = get_peft_model(base, lora)
        return model, model.generate
    kind = PrefixTuningConfig if setting.method == "peft-prefix" else CartridgeConfig
    model = get_peft_model(base, kind(task_type="CAUSAL_LM", num_virtual_tokens=setting.prefix_length))
    return model, decoded_by_prefixtune(model, tokenizer)


def decoded_by_prefixtune(model, tokenizer) -> Callable[..., torch.Tensor]:
    """generate(**batch) for a PEFT prompt-learning model, through its trained prefix as a `PrefixModel`
    (read once, at the first call: after training)."""
    loaded: list[PrefixModel] = []

    def generate(**batch) -> torch.Tensor:
        if not loaded:
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                loaded.append(PrefixModel.from_pretrained(model.get_base_model(), folder, tokenizer=tokenizer))
        return loaded[0].generate(**batch)

    return generate


@torch.no_grad()
def greedy_through_forward(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
    """Greedy decoding by full forward passes (no cache), so PEFT's prefix is applied at every step."""
    ids, mask = input_ids, attention_mask
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        next_token = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)  # [B]
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        finished |= next_token == eos_token_id
        ids = torch.cat([ids, next_token[:, None]], 1)  # [B, T + 1]
        mask = torch.cat([mask, (~finished | (next_token == eos_token_id)).long()[:, None]], 1)
        if finished.all():
            break
    return ids


def decode(generate, formatter: PromptFormatter, prompts: list[str], budget: Budget, num_beams: int) -> list[str]:
    """One completion per prompt (its first line), in batches of `budget.eval_batch_size`."""
    tokenizer, outputs = formatter.tokenizer, []
    for start in range(0, len(prompts), budget.eval_batch_size):
        rows = [{"input_ids": formatter.prompt_ids(p)} for p in prompts[start : start + budget.eval_batch_size]]
        batch = {k: v.to(budget.device) for k, v in pad_batch(rows, tokenizer.pad_token_id).items()}
        beams = {"num_beams": num_beams} if num_beams > 1 else {}
        tokens = generate(
            **batch,
            **beams,
            max_new_tokens=budget.max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = tokens[:, batch["input_ids"].shape[1] :]  # [B, new tokens]
        outputs += [text.strip().split("\n")[0] for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outputs


class StepClock(TrainerCallback):
    """Seconds spent in training steps only (evaluations excluded); synchronises CUDA to be exact."""

    def __init__(self) -> None:
        self.seconds, self.began = 0.0, 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += self._now() - self.began


class KeepBest(TrainerCallback):
    """Best-of-N checkpoints by the inner-fold loss, kept in memory (trainable weights only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.best_loss, self.best_step, self.weights = model, float("inf"), 0, None
        self.losses: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = metrics["eval_loss"]
        self.losses.append((state.global_step, loss))
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, state.global_step
            self.weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self) -> None:
        if self.weights is not None:
            with torch.no_grad():
                for name, parameter in self.model.named_parameters():
                    if name in self.weights:
                        parameter.copy_(self.weights[name])


def training_arguments(setting: Setting, budget: Budget, seed: int, output: str) -> TrainingArguments:
    steps = max(1, round(budget.steps * setting.steps_factor))
    evaluating = {}
    if setting.evaluations:
        evaluating = {
            "eval_strategy": "steps",
            "eval_steps": max(1, steps // setting.evaluations),
            "per_device_eval_batch_size": budget.batch_size,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    return TrainingArguments(
        output_dir=output,
        max_steps=steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=setting.lr,
        lr_scheduler_type=setting.schedule,
        warmup_steps=max(1, round(steps * setting.warmup_ratio)),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=budget.device == "cpu",
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        disable_tqdm=True,
        **evaluating,
    )


def train_and_decode(
    setting: Setting,
    pristine,
    formatter: PromptFormatter,
    rows: Rows,
    inner: Rows,
    prompts: list[str],
    budget: Budget,
    seed: int,
    output: str,
) -> dict:
    """Train `setting` on `rows` (its inner-fold loss on `inner`) and decode `prompts`: the run's row
    (its hypotheses, trainable parameters, steps done, seconds per step, inner-fold losses)."""
    set_seed(seed)
    model, generate = build(setting, copy.deepcopy(pristine), formatter.tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clock, best = StepClock(), KeepBest(model)
    callbacks = [clock, best]
    if setting.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=setting.patience))
    trainer = Trainer(
        model=model,
        args=training_arguments(setting, budget, seed, output),
        train_dataset=rows,
        eval_dataset=inner if setting.evaluations else None,
        callbacks=callbacks,
        data_collator=lambda batch: pad_batch(batch, formatter.tokenizer.pad_token_id),
    )
    steps_done = trainer.train().global_step
    if setting.best_of_n:
        best.restore()
    model.eval()
    began = time.perf_counter()
    hypotheses = decode(generate, formatter, prompts, budget, setting.num_beams)
    return {
        "hypotheses": hypotheses,
        "trainable_parameters": trainable,
        "steps_done": steps_done,
        "train_seconds": clock.seconds,
        "seconds_per_step": clock.seconds / max(steps_done, 1),
        "eval_seconds": time.perf_counter() - began,
        "inner_losses": best.losses,
        "best_step": best.best_step if setting.best_of_n else steps_done,
    }
