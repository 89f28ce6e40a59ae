"""Attention-level injection: how prefix keys/values get into a frozen `transformers` model.

Differences from the base model, and nothing else, in these modules:

* `attention`: the model's attention implementation (``sdpa`` or ``eager``) is swapped for
  ``prefixtune_sdpa`` / ``prefixtune_eager``. When the forward call carries ``prefix_key_values``
  ``[B, layers, 2, kv_heads, P, head_dim]`` (in a training forward split by layer, `split_by_layer`)
  and ``prefix_attention_mask`` ``[B, layers, P]``, each layer puts its slice in front of the
  text's keys/values, adds always-visible mask columns for the valid prefix slots, and hands over
  to the model's own function. Without those arguments the model computes exactly what it did before.
* `shared_prefix`: where every row of an inference batch has the same prefix, a layer attends to
  that one ``[kv_heads, P, head_dim]`` prefix and to each row's text separately and merges the two
  softmax parts, instead of concatenating a copy per row (same result; a long prefix no longer
  costs a copy and a read per row at every decoding step).
* `positions`: text positions shift per row by that row's prefix length: the prefix owns positions
  ``0..P-1``. Positions come from the attention mask, so left padding is exact.
* `states`: hybrid models' linear-attention layers (Gated DeltaNet; Mamba-1 and Mamba-2 mixers and
  short convolutions registered from `mamba1_states`, `mamba_states`, `conv_states`) start from the
  prefix's state when the call carries ``prefix_conv_states`` / ``prefix_recurrent_states``: their
  prefix is an initial state, not keys/values (a replacement forward on those module instances).
* `probing`: a probe forward finds the attention layers (numbered model-wide; encoder-decoders have
  three places: encoder self-, decoder self- and cross-attention), giving the prefix `Geometry`
  (with each layer's heads and head sizes where layers differ, and layers that reuse another's
  keys/values tagged with that layer's index); `inject` puts it all in place.
* `key_value_path`: `KeyValuePath`, hidden states through a layer's frozen key/value path (its
  attention module, called with the arguments its layer really hands it), used at every training
  step of the `hidden` parameterization.

The prefix travels as forward keyword arguments, never through the KV cache. So the generation
cache holds only text (greedy, beam, sampling, streaming all keep the prefix: `generate` expands
the tensors per beam like any model input), and gradient checkpointing replays layers with the same
arguments.
"""

from ..config import PLACES
from .attention import (
    PREFIX_KWARGS,
    SUPPORTED_IMPLEMENTATIONS,
    AttentionCall,
    Capture,
    UnsupportedModelError,
    model_kind,
    refuse_pooled_keys,
    split_by_layer,
)
from .key_value_path import KeyValuePath, attention_input
from .positions import prefix_lengths, text_positions
from .probing import TAGS, Geometry, inject, uninject
from .states import STATE_KWARGS

__all__ = [
    "PLACES",
    "PREFIX_KWARGS",
    "STATE_KWARGS",
    "SUPPORTED_IMPLEMENTATIONS",
    "TAGS",
    "AttentionCall",
    "Capture",
    "Geometry",
    "KeyValuePath",
    "UnsupportedModelError",
    "inject",
    "uninject",
    "attention_input",
    "model_kind",
    "split_by_layer",
    "refuse_pooled_keys",
    "prefix_lengths",
    "text_positions",
]
