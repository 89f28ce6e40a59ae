"""Context distillation: train a prefix so that the frozen model with the prefix and without a context
behaves like the same model with the whole context in its prompt (Snell et al. 2022; Cartridges,
Eyuboglu et al. 2025). One idea per module: `context` (where the context goes), `prefixes` (teacher and
student on one `PrefixModel`), `selfstudy` (prompts and answers without labels, cached), `loss`
(top-k KL), `trainer` (`PrefixTrainer` with that loss), `report` (the held-out check), `run` (the command)."""

from .run import DistillOptions, distill

__all__ = ["DistillOptions", "distill"]
