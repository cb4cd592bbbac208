"""``ShedderConfig``: a pruned model's config = base config + pruning plan + provenance."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .arch import custom_config_class, family_of
from .errors import CheckpointError, PlanError
from .units import Plan

# Attributes mirrored from the base config so generic code (generation, lm-eval, PEFT, Trainer)
# that reads them off the top-level config sees the base model's values.
_MIRRORED = (
    "vocab_size", "hidden_size", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
    "max_position_embeddings", "use_cache",
)


class ShedderConfig(PreTrainedConfig):
    """Config of a model pruned by hf_shedder.

    ``base_config`` is the *unpruned* base model's config (a dict with ``model_type``), ``plan`` the
    ordered pruning plan (``hf_shedder.plan/1`` JSON) and ``provenance`` free-form facts about how the
    plan was made (base model name, search settings, metrics, versions). The model is built by
    constructing the base skeleton and applying the plan before the (smaller) weights load.
    """

    model_type = "hf_shedder"

    base_config: dict | None = None
    plan: dict | None = None
    provenance: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.base_config, PreTrainedConfig):
            self.base_config = self.base_config.to_dict()
        self.base_config = dict(self.base_config or {})
        self.provenance = dict(self.provenance or {})
        if self.plan is None:
            self.plan = Plan().to_dict()
        elif isinstance(self.plan, Plan):
            self.plan = self.plan.to_dict()
        if self.base_config:
            self._check()
            for key in _MIRRORED:
                if key in self.base_config and key not in kwargs:
                    kwargs[key] = self.base_config[key]
        for key in _MIRRORED:
            if key in kwargs:
                setattr(self, key, kwargs.pop(key))
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        model_type = self.base_config.get("model_type")
        if not model_type:
            raise CheckpointError("hf_shedder config: base_config has no 'model_type'")
        family = family_of(model_type)
        plan = Plan.from_dict(self.plan)
        if plan.family is not None and plan.family != family:
            raise PlanError(
                f"hf_shedder config: the plan is for the {plan.family!r} family but the base model is "
                f"{model_type!r} ({family!r})"
            )

    def get_base_config(self) -> PreTrainedConfig:
        """The unpruned base model's config object."""
        data = dict(self.base_config)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise CheckpointError("hf_shedder config has no base_config.model_type")
        cls = custom_config_class(model_type)
        if cls is None:
            if model_type not in CONFIG_MAPPING:
                raise CheckpointError(f"unknown base model_type {model_type!r} in hf_shedder config")
            cls = CONFIG_MAPPING[model_type]
        for key in ("transformers_version", "architectures", "_name_or_path"):
            data.pop(key, None)
        return cls(**data)

    def get_plan(self) -> Plan:
        return Plan.from_dict(self.plan)
