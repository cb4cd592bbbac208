"""``PrunedMambaForCausalLM``: a base causal LM with a pruning plan applied while it is built.

The base model (e.g. ``Mamba2ForCausalLM``) lives in ``self.model``; its weights are stored under
``model.*``. ``from_pretrained`` builds the base skeleton from ``config.base_config``, applies
``config.plan`` physically (fewer layers, smaller weights), then loads the pruned weights, so a saved
pruned model loads with no missing or unexpected keys.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .arch import custom_model_class, get_adapter
from .config import ShedderConfig
from .errors import CheckpointError, PlanError, UnsupportedModelError
from .runtime import enable_fast_path
from .units import Plan

EXPORTS = (None, "remote_code", "plain", "mamba_ssm")

def base_model_class(config: Any) -> type[PreTrainedModel]:
    cls = custom_model_class(config.model_type)
    if cls is not None:
        return cls
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedModelError(f"no causal-LM class for model_type {config.model_type!r}") from None


class PrunedMambaForCausalLM(PreTrainedModel, GenerationMixin):
    """A Mamba-family causal LM pruned by hf_shedder; behaves like its base model."""

    config_class = ShedderConfig
    config: ShedderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True
    _supports_cache_class = True

    def __init__(self, config: ShedderConfig, model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        # A given model is already initialised (trained weights): post_init must not re-initialise it.
        self._wraps_initialised_model = model is not None
        if model is None:
            model = base_model_class(config.get_base_config())(config.get_base_config())
            get_adapter(model).apply_plan(config.get_plan())
        # Fused Mamba forwards and CUDA-graph decode where the kernels and a GPU are there (no-op otherwise).
        self.model = enable_fast_path(model)
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls,
        model: PreTrainedModel,
        plan: Plan,
        provenance: dict[str, Any] | None = None,
        inplace: bool = False,
    ) -> PrunedMambaForCausalLM:
        """Apply ``plan`` physically to an unpruned base ``model`` and wrap it."""
        if isinstance(model, PrunedMambaForCausalLM):
            raise PlanError("this model is already pruned; apply the plan to its unpruned base model")
        adapter = get_adapter(model)
        adapter.validate(plan)
        plan = Plan(list(plan), adapter.family, adapter.num_layers())
        base_config = copy.deepcopy(model.config).to_dict()
        if not inplace:
            model = copy.deepcopy(model)
        get_adapter(model).apply_plan(plan)
        prov = dict(provenance or {})
        prov.setdefault("base_model", getattr(model.config, "_name_or_path", None) or None)
        config = ShedderConfig(base_config=base_config, plan=plan.to_dict(), provenance=prov)
        training = model.training
        wrapped = cls(config, model=model)
        return wrapped.train(training)

    @property
    def plan(self) -> Plan:
        return self.config.get_plan()

    # ------------------------------------------------------------------ delegation
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        # Explicit names: Trainer keeps only dataset columns that appear in forward's signature, and
        # generation/benchmarks look for logits_to_keep there.
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            logits_to_keep=logits_to_keep, **kwargs,
        )

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.model.prepare_inputs_for_generation(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        # The base model's generate knows its cache type (recurrent / hybrid); delegate to it.
        return self.model.generate(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # Weights come from the base model or the checkpoint; nothing to initialise at this level.
        return

    def init_weights(self) -> None:
        if self._wraps_initialised_model:
            self.tie_weights(recompute_mapping=False)
            return
        super().init_weights()

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], export: str | None = None, **kwargs: Any) -> None:
        """Save the pruned model.

        ``export=None`` or ``"hf_shedder"``: hf_shedder checkpoint (needs ``import hf_shedder`` to load).
        ``export="remote_code"``: also writes the loading code + ``auto_map`` so that
        ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without hf_shedder.
        ``export="plain"``: a stock base-architecture checkpoint (block-only plans), loadable with
        plain Transformers.
        ``export="mamba_ssm"``: a mamba-ssm checkpoint (Mamba / Mamba-2, block-only plans) that stock
        ``MambaLMHeadModel.from_pretrained`` loads.
        """
        if export == "hf_shedder":  # the CLI's name for the default
            export = None
        if export not in EXPORTS:
            raise ValueError(f"export must be 'hf_shedder' (or None), 'remote_code', 'plain' or 'mamba_ssm', "
                             f"got {export!r}")
        if export == "mamba_ssm":
            from .mamba_ssm_format import save_mamba_ssm

            save_mamba_ssm(self, save_directory)
            return
        if export == "plain":
            from .export import save_plain

            save_plain(self, save_directory, **kwargs)
            return
        if export == "remote_code":
            from .export import remote_code_auto_map

            self.config.auto_map = remote_code_auto_map()
        super().save_pretrained(save_directory, **kwargs)
        if export == "remote_code":
            from .export import write_remote_code

            write_remote_code(save_directory, model_type=self.config.base_config.get("model_type"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            check_checkpoint_dir(path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def check_checkpoint_dir(path: str) -> None:
    """Fail early, with a clear message, on a directory that cannot hold a model."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: it is not a saved model directory")
    names = os.listdir(path)
    if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".index.json") for n in names):
        raise CheckpointError(f"{path} has a config.json but no weights (*.safetensors): nothing to load")
