"""Library warnings that a user of hf_shedder cannot act on, dropped at the logger that emits them.

Only these exact messages go; every other record of those loggers (and all other logging) is untouched.

* lm-eval warns "Custom kwargs can be passed to `--metadata`" once per task whose data comes from a
  Python callable: that is how hf_shedder's bundled offline task configs load their data.
* lm-eval's HFLM warns twice per evaluation that it was handed a model object, not a name
  ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model"): hf_shedder
  always passes the loaded model. (Its third, "HF model type is neither marked as CausalLM", is avoided
  at the source: the harness passes ``backend="causal"``.)
* Transformers warns that ``mamba_ssm`` / ``causal_conv1d`` are not installed and the reference PyTorch
  path is used: those kernels are CUDA-only, so on a machine without CUDA there is nothing to install.
* Transformers (after 5.17) warns that ``is_gradient_checkpointing`` is deprecated whenever PEFT reads it
  during LoRA recovery: PEFT's code, not the user's (a Python warning, filtered by message and module).
"""

from __future__ import annotations

import logging
import warnings

_LM_EVAL_TASK_LOGGER = "lm_eval.api.task"
_LM_EVAL_HF_LOGGER = "lm_eval.models.huggingface"
_LM_EVAL_MODEL_OBJECT = ("`pretrained` model kwarg is not of type `str`",
                         "Passed an already-initialized model through `pretrained`")
_KERNELS_LOGGER = "transformers.integrations.hub_kernels"
_CUDA_ONLY_KERNELS = ("`mamba_ssm`", "`causal_conv1d`")


class _DropMessages(logging.Filter):
    def __init__(self, needles: tuple[str, ...], when: object = None) -> None:
        super().__init__()
        self.needles = needles
        self.when = when  # callable: drop only while it returns True

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(n in message for n in self.needles):
            return True
        return not (self.when is None or self.when())


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def _kernel_fallback_filter() -> _DropMessages:
    return _DropMessages(tuple(f"because {k} is not installed" for k in _CUDA_ONLY_KERNELS), when=_no_cuda)


def _install(logger_name: str, new: _DropMessages) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.needles == new.needles for f in logger.filters):
        logger.addFilter(new)


def install() -> None:
    """Add the filters (idempotent)."""
    _install(_LM_EVAL_TASK_LOGGER, _DropMessages(("Custom kwargs can be passed to `--metadata`",)))
    _install(_LM_EVAL_HF_LOGGER, _DropMessages(_LM_EVAL_MODEL_OBJECT))
    _install(_KERNELS_LOGGER, _kernel_fallback_filter())
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")
