"""`PrefixModel`: a frozen `transformers` model plus named prefixes, PEFT-style.

How it differs from the base model: every base parameter is frozen; ``forward`` and ``generate``
take the same arguments plus ``prefix`` (a name, or one name per row) and pass the chosen prefixes'
keys/values to the attention layers (see `injection.py`). Nothing else changes: same outputs, same
loss with ``labels``, same generation options. ``with model.disable_prefix():`` runs the bare model
through the same object; ``unload()`` gives the base model back as it was (PEFT's ``unload``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from . import files, peft_format
from .config import PrefixConfig
from .initialization import init_token_ids, text_activations, word_embeddings
from .injection import PREFIX_KWARGS, STATE_KWARGS, inject, split_by_layer, uninject
from .names import check_prefix_name
from .parameterizations import PARAMETERIZATION_CLASSES, KVPrefix, Prefix
from .prefix_arguments import PrefixArguments
from .transformers_private import enable_checkpointing, reentrant_checkpointing

logger = logging.getLogger(__name__)

PrefixChoice = str | Sequence[str] | None
REENTRANT_REFUSAL = (
    "{what} asks for reentrant gradient checkpointing (use_reentrant=True); prefixtune needs the "
    "non-reentrant kind: gradient_checkpointing_enable() without use_reentrant, or "
    "gradient_checkpointing_kwargs={{'use_reentrant': False}}"
)


class PrefixModel(nn.Module):
    def __init__(
        self,
        base_model: PreTrainedModel,
        config: PrefixConfig | None = None,
        name: str | None = "default",
        tokenizer: Any = None,
    ) -> None:
        """Freeze `base_model` and add the prefix `name` (``name=None``: no prefix yet)."""
        super().__init__()
        self._base_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}  # for unload
        base_model.requires_grad_(False)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.geometry, self.kv_path = inject(base_model)
        self.fingerprint = files.fingerprint(base_model, self.geometry)
        self.prefix_arguments = PrefixArguments(self.geometry, self.kv_path, base_model)
        self.prefixes = nn.ModuleDict()
        self.prefix_configs: dict[str, PrefixConfig] = {}
        self.active_prefix: str | None = None
        self._prefix_disabled = False  # inside `disable_prefix()`
        self._checkpointing_checked = False  # see `_refuse_reentrant_checkpointing`
        if name is not None:
            self.add_prefix(name, config or PrefixConfig())

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    @property
    def config(self) -> Any:
        """The base model's config (as PEFT's wrapper shows it): trainers such as TRL's `SFTTrainer` read
        and set token ids there. A prefix's own settings are in `prefixes[name].config`."""
        return self.base_model.config

    @property
    def generation_config(self) -> Any:
        return self.base_model.generation_config

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags for the base's model card (TRL's trainers tag the model they train)."""
        self.base_model.add_model_tags(tags)

    # ----------------------------------------------------------------------------- prefixes by name
    @property
    def prefix_names(self) -> list[str]:
        return list(self.prefixes.keys())

    def add_prefix(self, name: str, config: PrefixConfig) -> Prefix:
        """Add a new prefix (initialised per `config`) and make it active."""
        check_prefix_name(name)
        if name in self.prefixes:
            raise ValueError(f"a prefix named {name!r} exists already (have {self.prefix_names})")
        token_ids = (
            None if config.init == "random" else init_token_ids(self.tokenizer, config.init_text, config.prefix_length)
        )
        length = config.prefix_length or len(token_ids)
        prefix = PARAMETERIZATION_CLASSES[config.parameterization](config, length, self.geometry)
        prefix.to(self.device)
        if prefix.runs_base_model:  # tried once now: layers its path cannot follow are refused here, not mid-training
            with torch.no_grad():
                prefix.key_values(self.kv_path)
        if token_ids is not None:
            self._init_from_text(prefix, config.init, token_ids)
        self.prefixes[name] = prefix
        self.prefix_configs[name] = config
        self.active_prefix = name
        return prefix

    def _init_from_text(self, prefix: Prefix, init: str, token_ids: Tensor) -> None:
        was_training = self.base_model.training
        self.base_model.eval()
        try:
            if init == "vocab":
                prefix.init_vocab(word_embeddings(self.base_model, token_ids), self.kv_path)
            else:
                modules, states = self.kv_path.attention_modules, self.kv_path.states.modules
                sizes = self.geometry.kv_heads, self.geometry.head_dim
                activations = text_activations(self.base_model, modules, token_ids, *sizes, states)
                prefix.init_activations(activations)
        finally:
            self.base_model.train(was_training)

    def set_active(self, name: str) -> None:
        self._check_names([name])
        self.active_prefix = name

    def delete_prefix(self, name: str) -> None:
        self._check_names([name])
        del self.prefixes[name]
        del self.prefix_configs[name]
        if self.active_prefix == name:
            self.active_prefix = self.prefix_names[0] if self.prefixes else None

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = [name for name in names if name not in self.prefixes]
        if unknown:
            raise KeyError(f"unknown prefix {unknown[0]!r}; have {self.prefix_names}")

    # ------------------------------------------------------------------------- parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's method of the same name."""
        return sum(p.numel() for p in self.trainable_parameters()), sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------------- running
    def prefix_inputs(self, prefix: PrefixChoice, batch_size: int) -> dict[str, Tensor]:
        """The keyword arguments that carry the chosen prefixes into the attention layers.

        ``prefix``: None (the active prefix), a name, or one name per row (rows may differ in
        prefix length; shorter ones are padded with masked slots). ``""`` in a per-row list means
        "no prefix" for that row. Hybrid models also get each row's linear-attention states
        (``prefix_conv_states``, ``prefix_recurrent_states``; zeros for a row without a prefix).
        """
        if not getattr(self.base_model, "_prefixtune_injected", None):
            raise RuntimeError("the base model was unloaded from prefixtune (unload()); wrap it in a new PrefixModel")
        if prefix is None:
            if self.active_prefix is None:
                raise ValueError("no prefix is active: add or load one first")
            prefix = self.active_prefix
        names = [prefix] * batch_size if isinstance(prefix, str) else list(prefix)
        if len(names) != batch_size:
            raise ValueError(f"prefix: got {len(names)} names for a batch of {batch_size} rows")
        self._check_names([name for name in set(names) if name])
        rows = {name: self.prefix_arguments.row(self.prefixes[name]) for name in dict.fromkeys(names) if name}
        return self.prefix_arguments.batch([rows[name] if name else None for name in names])

    def prefix(self, name: str) -> Prefix:
        """The prefix module added or loaded as `name`."""
        self._check_names([name])
        return self.prefixes[name]

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
        if args:
            raise TypeError(
                "PrefixModel takes model inputs by keyword (input_ids=..., prefix=...), "
                f"got {len(args)} positional argument(s)"
            )
        for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "inputs"):
            if kwargs.get(key) is not None:
                return kwargs[key].shape[0]
        raise ValueError("pass input_ids or inputs_embeds by keyword")

    def _model_inputs(self, args: tuple, prefix: PrefixChoice, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's keyword arguments: the caller's plus the prefix's (none inside `disable_prefix`)."""
        batch_size = self._batch_size(args, kwargs)
        if not self._prefix_disabled:
            return dict(**kwargs, **self.prefix_inputs(prefix, batch_size))
        if prefix is not None:
            raise ValueError(f"prefix={prefix!r} inside disable_prefix(): the bare model runs there, without prefixes")
        return kwargs

    def forward(self, *args: Any, prefix: PrefixChoice = None, **kwargs: Any):
        """The base model's forward (same arguments and output, loss with ``labels``) with the prefix."""
        if self.training and torch.is_grad_enabled() and not self._checkpointing_checked:
            self._refuse_reentrant_checkpointing()
        inputs = self._model_inputs(args, prefix, kwargs)
        for name in (PREFIX_KWARGS[0], *STATE_KWARGS):  # keys/values, and hybrid models' initial states
            per_row = inputs.get(name)
            if isinstance(per_row, Tensor) and per_row.requires_grad:
                inputs[name] = split_by_layer(per_row)  # see injection.attention
        return self.base_model(**inputs)

    @torch.no_grad()
    def generate(self, *args: Any, prefix: PrefixChoice = None, **kwargs: Any) -> Tensor:
        """``base_model.generate`` with the prefix: greedy, beam, sampling and streamers all keep it."""
        return self.base_model.generate(**self._model_inputs(args, prefix, kwargs))

    @contextmanager
    def disable_prefix(self) -> Iterator[None]:
        """Inside the block, ``forward`` and ``generate`` run the bare base model (no prefix at all, not
        an empty one), through this same object (torchtune's ``disable_adapter``)."""
        was_disabled, self._prefix_disabled = self._prefix_disabled, True
        try:
            yield
        finally:
            self._prefix_disabled = was_disabled

    def unload(self) -> PreTrainedModel:
        """Give the base model back as it was before wrapping (PEFT's ``unload``): its own attention
        implementation, no prefixtune hooks or module tags, ``generate``'s own keyword check, and each
        parameter's ``requires_grad`` as it was. Gradient checkpointing enabled through this object
        stays enabled. This object (and any other PrefixModel on the same base) refuses to run afterwards."""
        uninject(self.base_model)
        for name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._base_requires_grad[name])
        return self.base_model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the base model's layers (non-reentrant; the prefix reaches them as arguments)."""
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(REENTRANT_REFUSAL.format(what="gradient_checkpointing_kwargs"))
        enable_checkpointing(self.base_model, gradient_checkpointing_kwargs)

    def _refuse_reentrant_checkpointing(self) -> None:
        """Reentrant checkpointing backpropagates each layer separately into the prefix's graph, which
        the MLP and hidden parameterizations share across layers, so they fail. Checked once, on the
        first training forward, for checkpointing enabled on the base model directly (before or after
        wrapping; `gradient_checkpointing_enable` checks its own argument). Turned on directly on the
        base model later still, `kv` trains correctly and the others fail in backward with torch's
        "backward through the graph a second time" (tests/test_training.py)."""
        for module in self.base_model.modules():
            if reentrant_checkpointing(module):
                raise ValueError(REENTRANT_REFUSAL.format(what=type(module).__name__))
        self._checkpointing_checked = True

    # ------------------------------------------------------------------------- compile, save, load
    @torch.no_grad()
    def compile_prefix(self, name: str | None = None) -> None:
        """Replace a prefix by a plain `kv` prefix with the same keys/values (e.g. collapse the MLP) and,
        in hybrid models, the same linear-attention states."""
        name = name or self.active_prefix
        self._check_names([name])
        prefix = self.prefixes[name]
        config = PrefixConfig(
            **{
                **self.prefix_configs[name].to_dict(),
                "parameterization": "kv",
                "prefix_length": prefix.length,
                "init": "random",
                "init_text": None,
            }
        )
        compiled = KVPrefix(config, prefix.length, self.geometry).to(self.device)
        compiled.prefix_key_values.copy_(prefix.key_values(self.kv_path))
        compiled.set_states(prefix.states(self.kv_path))
        compiled.train(prefix.training)
        self.prefixes[name] = compiled
        self.prefix_configs[name] = config

    def save_prefix(
        self, path: str | Path, name: str | None = None, extra: dict[str, Any] | None = None, format: str = "prefixtune"
    ) -> Path:
        """Write ``prefix.safetensors`` + ``prefix_config.json`` (`extra`: more JSON fields, e.g. the prompt
        format), or with ``format="peft"`` a PEFT prefix-tuning folder (keys/values, `mlp`/`hidden` compiled)."""
        name = name or self.active_prefix
        self._check_names([name])
        prefix = self.prefixes[name]
        if format == "peft":
            peft_format.check_model(self.base_model.config, self.geometry)
            if extra:
                raise ValueError(f"a PEFT adapter has no place for extra fields {sorted(extra)}")
            with torch.no_grad():
                key_values = prefix.key_values(self.kv_path)
            model_name = self.base_model.config.name_or_path or None
            return peft_format.write(path, key_values, prefix.layers, self.geometry, model_name)
        if format != "prefixtune":
            raise ValueError(f"save_prefix: format must be 'prefixtune' or 'peft', got {format!r}")
        return files.save(
            path, name, self.prefix_configs[name], prefix.length, prefix.state_dict(), self.fingerprint, extra
        )

    def _checked_meta(self, path: str | Path) -> dict[str, Any]:
        """The prefix folder's config, after checking it belongs to this base model."""
        meta = files.read_meta(path)
        files.check_fingerprint(path, meta["base_model"], self.fingerprint)
        return meta

    @staticmethod
    def _fill(prefix: Prefix, path: str | Path) -> None:
        """Load the folder's tensors into `prefix` in place, checking names and shapes first."""
        expected = {key: tuple(value.shape) for key, value in prefix.state_dict().items()}
        prefix.load_state_dict(files.load_tensors(path, expected))

    def read_prefix(self, path: str | Path) -> tuple[PrefixConfig, Prefix, str | None]:
        """A saved prefix (checked against this base model) as (config, module on this model's device,
        saved name), without adding it. A PEFT prefix-tuning or cartridge folder reads as a `kv` prefix (see
        `peft_format.py`)."""
        if peft_format.is_peft_folder(path):
            (config, prefix), saved_name = self._peft_prefix(path), None
        else:
            meta = self._checked_meta(path)
            config, saved_name = meta["config"], meta.get("name")
            prefix = PARAMETERIZATION_CLASSES[config.parameterization](config, meta["prefix_length"], self.geometry)
            self._fill(prefix, path)
        return config, prefix.to(self.device), saved_name

    def load_prefix(self, path: str | Path, name: str | None = None) -> str:
        """Load a saved prefix (`read_prefix`) under `name` (default: its saved name)."""
        config, prefix, saved_name = self.read_prefix(path)
        name = check_prefix_name(name or saved_name or "default")
        if name in self.prefixes:
            raise ValueError(f"a prefix named {name!r} exists already (have {self.prefix_names})")
        self.prefixes[name] = prefix
        self.prefix_configs[name] = config
        self.active_prefix = name
        return name

    @torch.no_grad()
    def _peft_prefix(self, path: str | Path) -> tuple[PrefixConfig, KVPrefix]:
        peft_format.check_model(self.base_model.config, self.geometry)
        config, key_values = peft_format.read(path, self.geometry)
        prefix = KVPrefix(config, config.prefix_length, self.geometry)
        prefix.prefix_key_values.copy_(key_values)  # read() checked the shape against this geometry
        return config, prefix

    @torch.no_grad()
    def restore_prefix(self, path: str | Path, name: str | None = None) -> None:
        """Copy saved values into the existing prefix `name` in place (its parameters keep their
        identity, so an optimizer holding them resumes correctly)."""
        name = name or self.active_prefix
        self._check_names([name])
        meta = self._checked_meta(path)
        if meta["config"] != self.prefix_configs[name]:
            raise files.PrefixFileError(
                f"{path}: saved config {meta['config']} differs from prefix {name!r}'s {self.prefix_configs[name]}"
            )
        self._fill(self.prefixes[name], path)

    @classmethod
    def from_pretrained(cls, base_model: PreTrainedModel, path: str | Path, tokenizer: Any = None) -> PrefixModel:
        model = cls(base_model, name=None, tokenizer=tokenizer)
        model.load_prefix(path)
        return model
