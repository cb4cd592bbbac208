"""Exceptions raised by hf_shedder. Every user-facing failure is a ShedderError with an actionable message."""


class ShedderError(Exception):
    """Base class for all hf_shedder errors."""


class PlanError(ShedderError, ValueError):
    """A pruning plan is malformed or does not fit the model it is applied to."""


class UnsupportedModelError(ShedderError, TypeError):
    """The model class has no hf_shedder adapter."""


class DataError(ShedderError, ValueError):
    """Calibration, evaluation or training data is missing, empty, too short or cannot be fetched."""


class CheckpointError(ShedderError, OSError):
    """A checkpoint directory is missing files, is corrupt or does not match its config."""


class SearchError(ShedderError, RuntimeError):
    """A pruning search cannot start or resume with the given settings."""


class HubError(ShedderError, RuntimeError):
    """A model folder cannot be pushed (no token, offline, incomplete folder)."""


class RecoveryError(ShedderError, ValueError):
    """Recovery tuning cannot run with these settings (LoRA targets, data, output folder)."""


class EvalDependencyError(ShedderError, ImportError):
    """An optional evaluation dependency (lm-eval) is not installed."""


class TaskError(ShedderError, ValueError):
    """A requested task cannot be evaluated (unknown name, missing local data)."""
