"""``SearchSettings``: what a search does, and which of it must match to resume a journal."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..defaults import CALIBRATION_MODES, NORMALIZE_CHOICES, SPLIT_CHOICES
from ..errors import SearchError
from .racing import DEFAULT_DELTA, DEFAULT_MIN_SAMPLES

# Settings that only decide where to stop or how to run: a journal may be resumed (or extended) with
# other values. Everything else changes the numbers or the journal's contents and must match.
NOT_IN_HASH = frozenset({"steps", "target_params", "max_ppl", "device", "cache_device", "split"})


@dataclass
class SearchSettings:
    """Settings of one greedy Mamba-Shedder search.

    ``units``: unit kinds of the model's adapter (``block``, ``ssm``, ...). ``steps``: units to remove
    (the search stops earlier at ``target_params``, a fraction of the base parameter count, or when the
    best candidate's perplexity would exceed ``max_ppl``). Calibration fields describe the data (the
    token fingerprint is what the journal checks); ``calibration_mode`` names how ``load_calibration``
    drew it: ``windows`` (default) or ``reference`` (rows sampled as Mamba-Shedder's prune.py does). ``exact_reference`` runs the plain loop (a full
    ``model(...)`` forward per candidate and batch, as the reference does); the default accelerated search
    reuses the hidden states entering each layer and gives the same plan. ``early_abandon`` (exact)
    drops a candidate as soon as its partial NLL sum proves it cannot win. ``race_fraction``/``race_keep``
    (approximate, off by default) keep only the ``race_keep`` best candidates after that fraction of
    the calibration batches. ``reference_numerics`` (with ``exact_reference``) scores as the reference's
    utils.evaluate_ppl does: cross-entropy on fp16 logits, fp32 means (see ``reference_mode``). ``normalize="params"`` ranks candidates by NLL increase per removed
    parameter instead of raw perplexity.
    """

    units: tuple[str, ...] = ("block",)
    steps: int = 1
    target_params: float | None = None
    max_ppl: float | None = None
    calibration: str = "alpaca"
    samples: int = 256
    seqlen: int = 2048
    seed: int = 42
    calibration_mode: str = "windows"
    batch_size: int = 8
    dtype: str | None = None
    device: str | None = None
    exact_reference: bool = False
    reference_numerics: bool = False
    normalize: str | None = None
    early_abandon: bool = True
    race_fraction: float | None = None
    race_keep: int = 3
    race_delta: float | None = DEFAULT_DELTA
    race_min_samples: int = DEFAULT_MIN_SAMPLES
    ignore_token_id: int | None = None
    cache_device: str | None = None
    split: str = "batches"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.units, str):
            self.units = tuple(u.strip() for u in self.units.split(",") if u.strip())
        self.units = tuple(self.units)
        if not self.units:
            raise SearchError("choose at least one unit kind (e.g. units=('block',) or --units ssm)")
        if len(set(self.units)) != len(self.units):
            raise SearchError(f"unit kinds listed twice: {list(self.units)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SearchError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.target_params is not None and not 0.0 < self.target_params < 1.0:
            raise SearchError(f"target_params is a fraction of the base parameter count in (0, 1), got {self.target_params}")
        if self.max_ppl is not None and not self.max_ppl > 0:
            raise SearchError(f"max_ppl must be > 0, got {self.max_ppl}")
        if self.batch_size < 1:
            raise SearchError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.normalize not in NORMALIZE_CHOICES:
            raise SearchError(f"normalize must be one of {NORMALIZE_CHOICES}, got {self.normalize!r}")
        if self.race_fraction is not None and not 0.0 < self.race_fraction < 1.0:
            raise SearchError(f"race_fraction must be in (0, 1) (or None to turn racing off), got {self.race_fraction}")
        if self.race_keep < 1:
            raise SearchError(f"race_keep must be >= 1, got {self.race_keep}")
        if self.race_delta is not None and not 0.0 < self.race_delta < 1.0:
            raise SearchError(f"race_delta must be in (0, 1) (or None for the exact search), got {self.race_delta}")
        if isinstance(self.race_min_samples, bool) or not isinstance(self.race_min_samples, int) \
                or self.race_min_samples < 2:
            raise SearchError(f"race_min_samples must be an integer >= 2, got {self.race_min_samples!r}")
        if self.exact_reference:
            self.race_delta = None  # the plain loop measures every candidate on every batch
        if self.calibration_mode not in CALIBRATION_MODES:
            raise SearchError(f"calibration_mode must be one of {CALIBRATION_MODES}, got {self.calibration_mode!r}")
        if self.reference_numerics and (not self.exact_reference or self.normalize or self.race_fraction is not None):
            raise SearchError("reference_numerics needs the plain loop (exact_reference=True), no normalize, no racing")
        if self.split not in SPLIT_CHOICES:
            raise SearchError(f"split must be one of {SPLIT_CHOICES}, got {self.split!r}")

    @property
    def approximate(self) -> bool:
        return self.race_fraction is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["units"] = list(self.units)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Model identity fields kept in the journal for information only: the same weights loaded from another
# path (or hub name) are the same model, so the name must not block a resume.
INFO_ONLY = frozenset({"model.name"})
# Identity fields added after the journal format was fixed, with the value older journals implied.
IDENTITY_DEFAULTS = {"calibration_mode": "windows", "reference_numerics": False, "race_delta": None,
                     "race_min_samples": DEFAULT_MIN_SAMPLES}


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Name, architecture hash and a weight checksum (the hash and checksum identify the model)."""
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures", "_attn_implementation"):
        cfg.pop(k, None)
    arch = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    with torch.no_grad():
        total = sum(float(p.detach().double().sum()) for p in model.parameters())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return {
        "name": getattr(model.config, "_name_or_path", None) or None,
        "architecture_sha": arch,
        "weights_checksum": f"{total:.8e}",
        "dtype": ",".join(dtypes),
    }


def identity(settings: SearchSettings, model_id: dict[str, Any], calibration_fingerprint: str) -> dict[str, Any]:
    """Everything that must match for a journal to be resumed (flat, so differences can be named)."""
    out = {k: v for k, v in settings.to_dict().items() if k not in NOT_IN_HASH}
    out.update({f"model.{k}": v for k, v in model_id.items() if f"model.{k}" not in INFO_ONLY})
    out["calibration_fingerprint"] = calibration_fingerprint
    return out


def identity_hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
