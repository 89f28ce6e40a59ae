"""A walk over every causal-LM model type that the installed `transformers` registers.

Each type gets a tiny random model (its default config with every size shrunk, two layers or one of
each layer kind) and one of these outcomes:

* ``exact``: two `activations` prefixes (text T1, and a shorter T2) in one batch, one per row and a
  row without, give the bare model's logits on T_i + x at x's positions (relative error <= 1e-4);
  left-padded when the bare model itself is exact under left padding, else rows of equal length.
  Checked for both parameterizations whose `activations` init is exact: `kv` (the text's keys and
  values) and `hidden` (the text's layer inputs, sent through each layer's own key/value path).
  Types with a sliding window are checked twice each: with it wider than the input, and with 3 tokens.
  Then every row under T1's prefix alone (one prefix shared by the batch: `injection.shared_prefix`)
  against the bare model on T1 + x.
* ``refused``: `PrefixModel` raises `UnsupportedModelError` naming the type and the reason.
* ``kv exact, hidden refused``: the same, for the `hidden` parameterization alone.
* ``skipped``: no tiny model could be built or run bare (the reason is kept).

Anything else, a raw error or a silent difference, is a failure (``tests/test_architectures.py``).
``python tests/architecture_walk.py`` prints the outcome table that README's models section quotes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError  # noqa: E402
from prefixtune.injection import shared_prefix  # noqa: E402
from tiny import VOCAB, tiny_tokenizer  # noqa: E402

TEXTS = ("the restaurant near the river serves cheap french food", "a family friendly pub")
ROWS = [[5, 9, 12, 30], [7, 8, 11], [11, 40, 41, 42, 43], [20, 21]]
ROW_PREFIXES = ["a", "b", "", "a"]
TOLERANCE = 1e-4
WINDOW = 3  # a sliding window that cuts T off for every x token
PARAMETERIZATIONS = ("kv", "hidden")  # hidden: P_theta through each layer's own key/value path

# Every size a default config may carry, shrunk. Keys a config does not have are not added.
SMALL = {
    "vocab_size": VOCAB,
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embedding_size", "word_embed_proj_dim", "dim"), 32),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads"), 4),
    **dict.fromkeys(("encoder_attention_heads", "decoder_attention_heads", "num_decoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "num_query_groups"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "d_head", "dim_head"), 8),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim"), 64),
    **dict.fromkeys(("ffn_hidden_size", "d_inner", "dim_ff", "dff", "feed_forward_size"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size"), 32),
    **dict.fromkeys(("shared_intermediate_size", "dense_intermediate_size", "intermediate_size_mlp"), 64),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions"), 128),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k"), 2),
    **dict.fromkeys(("n_group", "topk_group", "n_groups", "mamba_n_groups", "mamba_ngroups"), 1),
    # multi-head latent attention: key head 8 + 8 (rope), value head 8: different key and value sizes
    **{"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8},
    **{"qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2},
    # linear attention / state-space layers
    **dict.fromkeys(("linear_num_key_heads", "linear_num_heads"), 2),
    # Mamba: heads x head size = expand (2) x hidden size (32)
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 16),
    **{"mamba_d_ssm": 64, "mamba_dt_rank": 8},
    # hybrids that place attention every `period` layers: layer 0 another kind, layer 1 attention
    **dict.fromkeys(("attn_layer_period", "expert_layer_period"), 2),
    **dict.fromkeys(("attn_layer_offset", "expert_layer_offset"), 1),
    **dict.fromkeys(("linear_num_value_heads",), 4),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "attention_head_size"), 8),
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size"), 8),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 16),
    **dict.fromkeys(("rotary_dim",), 4),
    # Gemma 3n / 4 per-layer token embeddings (default 262,144 x 256 per layer: 1 GiB at 4 layers)
    **{"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8},
    # windows wider than any walk input; `classify` checks again with a window that binds
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_window_size", "window_size"), 64),
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


# What a type's own validators or layout need beyond SMALL (hybrids: layer 0 another kind, layer 1 attention).
LAYOUTS = {
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    # Zamba 2's shared attention reads hidden states and embeddings concatenated (2 x 32 wide); 4 heads of 16
    "zamba2": {"hybrid_layer_ids": [1], "layers_block_type": ["mamba", "hybrid"]}
    | {"attention_hidden_size": 64, "attention_head_dim": 16, "adapter_rank": 8},
    "falcon_h1": {"mamba_d_head": 16},
    "mamba2": {"head_dim": 16},
    "xmod": {"default_language": "en_XX"},
    "rwkv": {"attention_hidden_size": 32},  # its default (4096) is not derived from hidden_size
    # LFM2-MoE's default config names no layer kinds: a convolution layer, then attention (both dense)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 2},
    # Gemma 3n: per-layer sizes are lists; KV sharing needs a sliding and a full layer both before and
    # among the shared ones (layers 2, 3 reuse layers 0, 1's keys/values)
    "gemma3n_text": {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2}
    | {"num_kv_shared_layers": 2, "intermediate_size": [64] * 4, "activation_sparsity_pattern": [0.0] * 4},
    "dots1": {"n_shared_experts": 1},  # its default (None) multiplies a size
    "reformer": {"axial_pos_embds_dim": [16, 16]},  # axial position factors must sum to the hidden size
    "recurrent_gemma": {"num_hidden_layers": 3},  # two recurrent layers, then attention (its block pattern)
}


OUTCOMES = ("exact", "kv exact, hidden refused", "refused", "skipped", "silently different", "error")


@dataclass
class Outcome:
    model_type: str
    outcome: str  # one of OUTCOMES
    detail: str = ""


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(values: dict) -> dict:
    """A config dict with every known size made small, per-layer lists cut to one of each layer kind."""
    values = dict(values) | {"is_decoder": True}  # causal self-attention, as *ForCausalLM classes expect
    for key, value in list(values.items()):
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (text, vision, ...)
            values[key] = _shrink(value)
        elif key in SMALL and value is None:  # derived from other sizes by the model; make it explicit
            values[key] = SMALL[key]
        elif key in SMALL and isinstance(value, int) and not isinstance(value, bool):
            values[key] = min(value, SMALL[key])
        elif key in TOKEN_IDS and isinstance(value, int) and value >= VOCAB:
            values[key] = 2
        elif key in TOKEN_IDS and isinstance(value, list):
            values[key] = [2]
    if values.get("kv_lora_rank") and "num_key_value_heads" in values:  # MLA: one key/value per query head
        values["num_key_value_heads"] = values.get("num_attention_heads")
    layer_key = next((key for key in LAYER_COUNTS if isinstance(values.get(key), int)), None)
    if layer_key is None:
        return values
    old = values[layer_key]
    kinds = values.get("layer_types") if isinstance(values.get("layer_types"), list) else None
    if "attn_layer_period" in values:  # layer kinds follow the (shrunk) period, not layer_types
        keep = [0, 1]
    elif kinds and len(kinds) == old:
        keep = [kinds.index(kind) for kind in dict.fromkeys(kinds)]  # first layer of each kind
    else:
        keep = list(range(min(old, 2)))
    if len(keep) < 2 and old >= 2:
        keep = sorted({*keep, next(i for i in range(old) if i not in keep)})
    for key, value in list(values.items()):
        if isinstance(value, list) and len(value) == old and old > 1:
            values[key] = [value[i] for i in keep]
    if "attn_layer_period" in values:  # let the config lay out its layers from the shrunk period again
        for key in ("layer_types", "layers_block_type"):
            values.pop(key, None)
    if isinstance(values.get("per_layer_config"), dict):  # per-layer overrides, keyed by layer index
        overrides = {int(index): value for index, value in values["per_layer_config"].items()}
        values["per_layer_config"] = {new: overrides[old] for new, old in enumerate(keep) if old in overrides}
    for key in LAYER_COUNTS:
        if isinstance(values.get(key), int) and values[key] == old:
            values[key] = len(keep)
    if isinstance(values.get("full_attn_idxs"), list):  # LFM2 (default: all attention): a convolution layer too
        values |= {"full_attn_idxs": [1], "layer_types": ["conv", "full_attention"]}
    return values


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    return type(default).from_dict(_shrink(default.to_dict()) | LAYOUTS.get(model_type, {}) | overrides)


def build(model_type: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError as error:  # no sdpa for this type: its eager attention
        if "scaled_dot_product_attention" not in str(error):
            raise
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # a scale at which differences show, as tests/tiny.py's initializer_range=0.3
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "embed" in name:
                parameter.normal_(0, 0.3)
    return model.float().eval()


@contextlib.contextmanager
def every_prefix_shared():
    """The shared-prefix path for any prefix length (by default only for prefixes far longer than the text)."""
    default, shared_prefix.MIN_SLOTS_PER_TEXT_KEY = shared_prefix.MIN_SLOTS_PER_TEXT_KEY, 0
    try:
        yield
    finally:
        shared_prefix.MIN_SLOTS_PER_TEXT_KEY = default


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _padded(rows: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([[pad] * (width - len(row)) + row for row in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows]),
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def check(model_type: str, parameterization: str = "kv", **overrides) -> Outcome:
    """Build, run bare, then compare the prefixed batch with the bare model on T_i + x per row."""
    tokenizer = tiny_tokenizer()
    try:
        model = build(model_type, **overrides)
        texts = {
            name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in zip("ab", TEXTS, strict=True)
        }
        texts[""] = []
        full = [texts[p] + row for p, row in zip(ROW_PREFIXES, ROWS, strict=True)]
        want = [
            _logits(model, input_ids=torch.tensor([ids]))[0, len(ids) - len(row) :]
            for ids, row in zip(full, ROWS, strict=True)
        ]
        # every row under prefix "a": the shared-prefix path (`injection.shared_prefix`)
        want_a = [_logits(model, input_ids=torch.tensor([texts["a"] + row]))[0, -len(row) :] for row in ROWS]
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
        pad = pad if isinstance(pad, int) and 0 <= pad < VOCAB else 0  # RoBERTa counts positions after it
        padded_bare = _logits(model, **_padded(full, pad))
    except Exception as error:  # noqa: BLE001 - a type we cannot build small or run bare is skipped, with why
        return Outcome(model_type, "skipped", f"{type(error).__name__}: {_first_line(error)}")
    padding_exact = max(_row_errors(padded_bare, ROWS, want)) <= TOLERANCE
    rows = ROWS if padding_exact else [row[:2] for row in ROWS]  # equal lengths: no padding needed
    want = want if padding_exact else [w[:2] for w in want]
    want_a = want_a if padding_exact else [w[:2] for w in want_a]
    try:
        prefixed = PrefixModel(model, None, name=None, tokenizer=tokenizer)
        for name, text in zip("ab", TEXTS, strict=True):
            config = PrefixConfig(None, parameterization, init="activations", init_text=text)
            prefixed.add_prefix(name, config)
        logits = _logits(prefixed, **_padded(rows, pad), prefix=ROW_PREFIXES)
        with every_prefix_shared():
            shared = _logits(prefixed, **_padded(rows, pad), prefix="a")
    except UnsupportedModelError as error:
        return Outcome(model_type, "refused", _first_line(error))
    except Exception as error:  # noqa: BLE001 - reported as a failure, not skipped
        return Outcome(model_type, "error", f"{type(error).__name__}: {_first_line(error)}")
    worst = max(_row_errors(logits, rows, want))
    if worst > TOLERANCE:
        return Outcome(model_type, "silently different", f"relative error {worst:.2e}")
    worst = max(_row_errors(shared, rows, want_a))
    if worst > TOLERANCE:
        return Outcome(model_type, "silently different", f"one prefix for every row: relative error {worst:.2e}")
    return Outcome(
        model_type, "exact", "" if padding_exact else "unpadded rows (the bare model is not exact when padded)"
    )


def classify(model_type: str) -> Outcome:
    """`check` a `kv` prefix, then a `hidden` one (each layer's own key/value path, see
    `KeyValuePath`); types with a sliding window each again with a window that binds. Exact when all
    are, else the first other outcome (a `hidden` prefix refused alone has an outcome of its own)."""
    first = check(model_type)
    if first.outcome != "exact":
        return first
    windowed = getattr(tiny_config(model_type), "sliding_window", None) is not None
    for parameterization in PARAMETERIZATIONS:
        for window in (None, WINDOW) if windowed else (None,):
            overrides = {"sliding_window": window} if window else {}
            outcome = (
                first
                if (parameterization, window) == ("kv", None)
                else check(model_type, parameterization, **overrides)
            )
            if outcome.outcome != "exact":
                where = f"{parameterization} prefix" + (f" with sliding_window={window}" if window else "")
                kind = f"kv exact, {parameterization} refused" if outcome.outcome == "refused" else outcome.outcome
                return Outcome(model_type, kind, f"{where}: {outcome.detail}")
    also = f" (also with sliding_window={WINDOW})" if windowed else ""
    return Outcome(model_type, "exact", f"{first.detail}{also}".lstrip())


def _row_errors(logits: torch.Tensor, rows: list[list[int]], want: list[torch.Tensor]) -> list[float]:
    """Each left-padded row's relative error against its expected logits."""
    return [
        relative_error(logits[i, logits.shape[1] - len(row) :], w)
        for i, (row, w) in enumerate(zip(rows, want, strict=True))
    ]


def _first_line(error: BaseException) -> str:
    """The error's first line (and the second, where the first only announces it, as validators do)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [""]
    return " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:300]


def walk(types: list[str] | None = None) -> list[Outcome]:
    """`classify` each type, on one thread: for models this tiny, more threads cost 3x the CPU time."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    outcomes, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model_type in types or causal_lm_types():
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                outcomes.append(classify(model_type))
    finally:
        torch.set_num_threads(threads)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    import transformers

    lines = [
        f"| outcome (transformers {transformers.__version__}, {len(outcomes)} causal-LM types) | count | types |",
        "|---|---|---|",
    ]
    for kind in OUTCOMES:
        names = [o.model_type for o in outcomes if o.outcome == kind]
        if names:
            lines.append(f"| {kind} | {len(names)} | {', '.join(names)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    results = walk([arg for arg in sys.argv[1:] if arg != "-v"] or None)
    for result in results:
        if result.outcome != "exact" or "-v" in sys.argv:
            print(f"{result.model_type:28s} {result.outcome:20s} {result.detail}")
    print(table(results))
    print(f"walk took {time.perf_counter() - start:.1f} s")
