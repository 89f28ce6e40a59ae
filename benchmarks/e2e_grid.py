"""What the E2E cross-validation protocol (`e2e_cv.py`) measures, in one place: the methods, the
baselines' settings at one budget, and the levers tried on our prefix.

A `Setting` is everything that makes one training run differ from another apart from the fold and
the seed. Fields that do not apply to a method must stay ``None`` (or their neutral value): a lever
that a method cannot use is refused by `Setting.check`, never silently ignored.

Levers are tried one at a time on the best of our three parameterizations (the selection rule is in
`e2e_cv.select_recipe`); each value is a dict of field changes, so one lever may move several fields
together (e.g. early stopping = evaluations + patience + best-of-N).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

INIT_TEXT = "Describe the restaurant in one sentence."
OURS = ("ours-kv", "ours-mlp", "ours-hidden")  # prefixtune's parameterizations
PEFT_PROMPT = ("peft-prefix", "peft-cartridge")  # PEFT prompt learning: decoded through prefixtune (e2e_run)
METHODS = (*PEFT_PROMPT, "peft-lora", "full", *OURS)
PREFIXED = (*PEFT_PROMPT, *OURS)  # methods with a prefix length


@dataclass(frozen=True)
class Setting:
    """One training recipe. lr, schedule and warmup are transformers `TrainingArguments`' own."""

    method: str
    lr: float
    prefix_length: int | None = None  # prefix methods only
    init: str | None = None  # ours only: random / vocab / activations
    init_text: str | None = None  # ours with a text init
    dropout: float = 0.0  # ours: dropout on the prefix keys/values; PEFT LoRA: lora_dropout
    mlp_hidden_size: int | None = None  # ours-mlp only
    schedule: str = "linear"  # lr_scheduler_type
    warmup_ratio: float = 0.1  # warmup steps = this fraction of the run's steps (at least 1)
    steps_factor: float = 1.0  # training length: this times the protocol's budget of steps
    evaluations: int = 0  # inner-fold loss this many times, evenly spaced (0: never)
    patience: int = 0  # early stopping after this many evaluations without a better loss (0: never)
    best_of_n: bool = False  # end with the trainable weights of the best inner-fold loss
    num_beams: int = 1  # beam search at evaluation

    def key(self) -> str:
        """A stable id of the setting's content (resume matches runs by it)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def changed(self, **changes) -> Setting:
        return dataclasses.replace(self, **changes).check()

    def check(self) -> Setting:
        """The setting itself, or a ValueError naming the field that does not fit its method."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"method: expected one of {METHODS}")
        if (self.prefix_length is not None) != (self.method in PREFIXED):
            problems.append("prefix_length: set for prefix methods, None for the others")
        if (self.init is not None) != (self.method in OURS):
            problems.append("init: set for ours-* only")
        if (self.init_text is not None) != (self.init in ("vocab", "activations")):
            problems.append("init_text: needed by the vocab/activations init, None otherwise")
        if (self.mlp_hidden_size is not None) != (self.method == "ours-mlp"):
            problems.append("mlp_hidden_size: set for ours-mlp only")
        if self.dropout and self.method not in (*OURS, "peft-lora"):
            problems.append("dropout: only ours-* (prefix dropout) and peft-lora (lora_dropout) have one")
        if (self.patience or self.best_of_n) and not self.evaluations:
            problems.append("patience / best_of_n: need evaluations > 0 (the inner-fold loss)")
        if problems:
            raise ValueError(f"Setting {self}: " + "; ".join(problems))
        return self


# The baselines, at the protocol's one budget (steps x batch) and seeds: each method's usual lr. PEFT's
# prompt learning: 3e-2, the lr of PEFT's own prefix-tuning example (examples/causal_language_modeling/
# peft_prefix_tuning_clm.ipynb) for its randomly initialised prefix; at 5e-3 its train loss stalled at 3.3.
BASELINES = {
    "PEFT prefix tuning": Setting("peft-prefix", 3e-2, prefix_length=10),
    "PEFT CartridgeConfig": Setting("peft-cartridge", 3e-2, prefix_length=10),
    "PEFT LoRA r=8": Setting("peft-lora", 1e-3),
    "full fine-tuning": Setting("full", 5e-5),
    "ours kv": Setting("ours-kv", 5e-3, prefix_length=10, init="activations", init_text=INIT_TEXT),
    "ours mlp": Setting(
        "ours-mlp", 5e-4, prefix_length=10, init="activations", init_text=INIT_TEXT, mlp_hidden_size=512
    ),
    "ours hidden": Setting("ours-hidden", 5e-3, prefix_length=10, init="activations", init_text=INIT_TEXT),
}

REFERENCE_TEXT = "The Eagle is a cheap coffee shop near Burger King in the riverside area."
EARLY_STOPPING = {"evaluations": 10, "patience": 3, "best_of_n": True}
LEVERS: dict[str, list[dict]] = {  # lever: the values tried, each as field changes to the base
    "prefix_length": [{"prefix_length": n} for n in (5, 20, 50, 100, 200)],
    "init": [{"init": "random", "init_text": None}, {"init": "vocab"}],
    "init_text": [{"init_text": REFERENCE_TEXT}, {"init_text": "name eatType food priceRange area near"}],
    "lr": [{"lr": lr} for lr in (1e-3, 2e-3, 1e-2, 2e-2)],
    "schedule": [{"schedule": "cosine"}, {"schedule": "constant_with_warmup"}],
    "dropout": [{"dropout": 0.1}, {"dropout": 0.3}],
    "mlp_hidden_size": [{"mlp_hidden_size": n} for n in (128, 1024)],
    "best_of_n": [{"evaluations": 5, "best_of_n": True}, {"evaluations": 10, "best_of_n": True}],
    "training_length": [{"steps_factor": 2.0, **EARLY_STOPPING}, {"steps_factor": 4.0, **EARLY_STOPPING}],
    "num_beams": [{"num_beams": 4}],
}
QUICK_LEVERS = {name: values[:1] for name, values in LEVERS.items()}  # --quick: one value per lever


def lever_settings(base: Setting, levers: dict[str, list[dict]]) -> tuple[dict[str, list[Setting]], dict[str, str]]:
    """The settings each lever tries on `base`, and for each lever that does not apply to the base's
    method, why (recorded in the JSON, not dropped silently)."""
    tried, skipped = {}, {}
    for lever, values in levers.items():
        try:
            tried[lever] = [base.changed(**changes) for changes in values]
        except ValueError as error:
            skipped[lever] = f"not applicable to {base.method}: {error}"
    return tried, skipped
