"""Configuration of the Hymba hybrid-head language model (NVIDIA, arXiv 2411.13676).

Field names follow the ``config.json`` files published with the Hymba checkpoints
(e.g. ``nvidia/Hymba-1.5B-Base``) so such a file loads unchanged.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

# Attention back-ends Transformers itself knows; Hymba configs name others ("flex")
# that only meant something to the original remote code.
_KNOWN_ATTN_IMPLEMENTATIONS = {"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}


class HymbaConfig(PreTrainedConfig):
    r"""Configuration for [`HymbaForCausalLM`].

    Every decoder layer holds a hybrid-head module (attention heads and a Mamba SSM
    reading the same normalised input, their outputs normalised and averaged) followed
    by a gated MLP.  Notable fields:

    - ``num_memory_tokens``: learned "meta tokens" prepended to every sequence.
    - ``sliding_window`` / ``global_attn_idx``: layers listed in ``global_attn_idx``
      attend to the whole past, all others to the last ``sliding_window`` positions
      (meta tokens stay visible to every layer).
    - ``kv_reuse_group``: lists ``[producer, consumer, ...]``; consumers use the keys
      and values computed by the producer layer instead of projecting their own.
      ``kv_reuse_every_i_layer`` is the older, periodic form of the same idea.
    - ``mamba_*``: the SSM branch (expand, state size, conv width, dt rank, ...).
    """

    model_type = "hymba"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 65536
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    mlp_hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    calc_logits_for_entire_prompt: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sliding_window: int | None = None
    max_position_embeddings: int = 262144
    orig_max_position_embeddings: int | None = None
    seq_length: int | None = None
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    use_mamba_kernels: bool = True
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_inner_layernorms: bool = True
    kv_reuse_every_i_layer: int = -1
    kv_reuse_group: list[list[int]] | None = None
    kv_weight_reuse: bool = False
    global_attn_idx: list[int] | None = None
    num_mamba: int = 1
    attn_implementation_new: str = "sdpa"
    rope_type: str | None = None
    attn_hidden_size: int = -1
    kq_head_dim: int = -1
    v_head_dim: int = -1
    kq_norm: str | None = "none"
    rope: bool = False
    rope_theta: float = 10000.0
    num_memory_tokens: int = 0
    memory_tokens_interspersed_every: int = 0
    conv_dim: dict[str, int] | None = None
    layer_type: list[str] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if self.kq_norm is None:
            self.kq_norm = "none"
        # Published configs say "attn_implementation": "flex", which Transformers would
        # try to honour; this implementation always uses SDPA, so keep it only as a note.
        requested = kwargs.get("attn_implementation")
        if isinstance(requested, str) and requested not in _KNOWN_ATTN_IMPLEMENTATIONS:
            kwargs.pop("attn_implementation")
            self.attn_implementation_new = requested
        super().__post_init__(**kwargs)
        # Derived, never read from the file: one value per layer in the published configs.
        self.v_head_dim = self.ssm_intermediate_size // self.num_attention_heads

    @property
    def ssm_intermediate_size(self) -> int:
        """Width of the SSM branch (and of the fused attention/SSM output)."""
        return int(self.mamba_expand * self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def kv_producer_of(self) -> list[int | None]:
        """For every layer, the layer whose keys/values it reuses (``None``: its own)."""
        producers: list[int | None] = [None] * self.num_hidden_layers
        if self.kv_reuse_group:
            for group in self.kv_reuse_group:
                for consumer in group[1:]:
                    producers[int(consumer)] = int(group[0])
        elif self.kv_reuse_every_i_layer and self.kv_reuse_every_i_layer > 0:
            period = self.kv_reuse_every_i_layer
            for i in range(self.num_hidden_layers):
                if i % period:
                    producers[i] = i - i % period
        return producers

    def is_global_layer(self, layer_idx: int) -> bool:
        """Whether a layer attends to the whole past (no sliding window)."""
        if self.sliding_window is None:
            return True
        return layer_idx in (self.global_attn_idx or [])

    def validate_architecture(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.ssm_intermediate_size % self.num_attention_heads:
            raise ValueError("mamba_expand * hidden_size must be a multiple of num_attention_heads")
        if self.attn_hidden_size not in (-1, self.hidden_size):
            raise ValueError("attn_hidden_size other than hidden_size is not supported by Hymba blocks")
        if self.kq_head_dim not in (-1, self.head_dim):
            raise ValueError("kq_head_dim other than hidden_size // num_attention_heads is not supported")
        if self.kq_norm not in ("none", "rms", "perhead-rms"):
            raise ValueError(f"unknown kq_norm {self.kq_norm!r}; expected 'none', 'rms' or 'perhead-rms'")
        if self.memory_tokens_interspersed_every:
            raise ValueError("memory_tokens_interspersed_every > 0 is not supported")
        if self.rope and self.rope_type not in (None, "default", "ntk", "dynamic_ntk"):
            raise ValueError(f"unknown rope_type {self.rope_type!r}")
        if self.rope and self.rope_type in ("ntk", "dynamic_ntk") and not self.orig_max_position_embeddings:
            raise ValueError(f"rope_type {self.rope_type!r} needs orig_max_position_embeddings")
        if self.mlp_hidden_act not in ("silu", "relu2"):
            raise ValueError(f"unsupported mlp_hidden_act {self.mlp_hidden_act!r}")
        for layer, producer in enumerate(self.kv_producer_of()):
            if producer is not None and not 0 <= producer < layer:
                raise ValueError(f"layer {layer} reuses keys/values of layer {producer}, which does not precede it")


__all__ = ["HymbaConfig"]
