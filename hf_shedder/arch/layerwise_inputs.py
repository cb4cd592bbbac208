"""What the layer-wise forward (``ArchAdapter.embed``) of the hybrid adapters hands to every layer.

The search runs layers one by one without a cache, so it builds the masks a Transformers hybrid model
builds in its own forward: a causal mask for attention layers and a padding mask for recurrent ones.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask


def position_ids_for(hidden: torch.Tensor) -> torch.Tensor:
    """Positions ``0..seq_len-1`` (no cache, so every sequence starts at 0)."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def layer_type_masks(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """The masks of a cache-free forward, keyed by HF layer type (``full_attention`` / ``linear_attention``)."""
    # No cache: passed positionally, as the keyword was renamed (past_key_values -> cache) after Transformers 5.17.
    return {
        "full_attention": create_causal_mask(config, hidden, attention_mask, None, position_ids=position_ids),
        "linear_attention": create_recurrent_attention_mask(config, hidden, attention_mask),
    }
