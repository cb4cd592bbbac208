"""Only the library warnings a user cannot act on are dropped, and only those."""

from __future__ import annotations

import logging

import torch

from hf_shedder import log_filters


def _emitted(logger_name: str, message: str, caplog) -> bool:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger_name):
        logging.getLogger(logger_name).warning(message)
    return any(r.getMessage() == message for r in caplog.records)


def test_lm_eval_metadata_hint_is_dropped_other_warnings_are_kept(caplog):
    log_filters.install()
    log_filters.install()  # idempotent
    assert len(logging.getLogger("lm_eval.api.task").filters) == 1
    hint = "arc_easy: Custom kwargs can be passed to `--metadata` in console (as json string) or to the TaskManager."
    assert not _emitted("lm_eval.api.task", hint, caplog)
    assert _emitted("lm_eval.api.task", "arc_easy: something else went wrong", caplog)
    for msg in ("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.",
                "Passed an already-initialized model through `pretrained`, assuming single-process call"):
        assert not _emitted("lm_eval.models.huggingface", msg, caplog)
    assert _emitted("lm_eval.models.huggingface", "Failed to get model SHA for x", caplog)


def test_kernel_fallback_warning_dropped_only_without_cuda(caplog, monkeypatch):
    log_filters.install()
    msg = ("`mamba_chunk_scan_combined` is falling back to its reference PyTorch implementation because "
           "`mamba_ssm` is not installed. This is correct but much slower; install `mamba_ssm` for the optimized kernel.")
    name = "transformers.integrations.hub_kernels"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _emitted(name, msg, caplog)
    assert _emitted(name, msg.replace("`mamba_ssm`", "`fla`"), caplog)  # an installable package: kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _emitted(name, msg, caplog)  # with CUDA the kernels can be installed: the hint stays


def test_peft_gradient_checkpointing_deprecation_is_dropped_others_kept():
    import warnings

    from hf_shedder.log_filters import install

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install()
        for message in ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", "something else"):
            warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["something else"]
