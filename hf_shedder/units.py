"""Removable units and ordered pruning plans.

A *unit* is one removable component of a model: a whole block, the SSM inside a mixer, or a set of
indices (heads, channels) inside one layer. A *plan* is the ordered list of removed units, in the
order the search removed them. Layer indices always refer to the layer numbering of the *unpruned*
base model, so a plan reads the same before and after extraction.

Plans are stored as JSON (``hf_shedder.plan/1``) and can also be read from and written to the files
of the Mamba-Shedder reference implementation (``{"pruned_mamba_block_idx": [...]}`` etc.).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError

PLAN_FORMAT = "hf_shedder.plan/1"

# The Mamba-Shedder reference's plan-file keys -> our unit kinds. Families whose reference scripts use
# other keys list theirs on their adapter (``ArchAdapter.reference_keys``); the first key of a kind is the
# one written.
REFERENCE_KEYS: dict[str, str] = {"pruned_mamba_block_idx": "block", "pruned_ssm_idx": "ssm"}


@dataclass(frozen=True, order=True)
class Unit:
    """One removable component: ``kind`` at original layer ``layer`` (``indices`` for width units)."""

    kind: str
    layer: int
    indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise PlanError(f"unit kind must be a non-empty string, got {self.kind!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise PlanError(f"unit layer must be an integer, got {self.layer!r}")
        if self.layer < 0:
            raise PlanError(f"unit layer must be >= 0, got {self.layer}")
        idx = tuple(int(i) for i in self.indices)
        if len(set(idx)) != len(idx):
            raise PlanError(f"unit {self.kind}@{self.layer} lists an index twice: {list(idx)}")
        if any(i < 0 for i in idx):
            raise PlanError(f"unit {self.kind}@{self.layer} has a negative index: {list(idx)}")
        object.__setattr__(self, "indices", tuple(sorted(idx)))

    @property
    def is_width(self) -> bool:
        return bool(self.indices)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "layer": self.layer}
        if self.indices:
            out["indices"] = list(self.indices)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Unit:
        if not isinstance(data, dict) or "kind" not in data or "layer" not in data:
            raise PlanError(f"a unit needs 'kind' and 'layer', got {data!r}")
        return cls(data["kind"], data["layer"], tuple(data.get("indices", ())))

    def __str__(self) -> str:
        if self.indices:
            shown = ",".join(map(str, self.indices[:8])) + ("..." if len(self.indices) > 8 else "")
            return f"{self.kind}@{self.layer}[{shown}]"
        return f"{self.kind}@{self.layer}"


@dataclass
class Plan:
    """An ordered list of removed units, tied to a model family and its original layer count."""

    units: list[Unit] = field(default_factory=list)
    family: str | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        self.units = [u if isinstance(u, Unit) else Unit.from_dict(u) for u in self.units]
        seen: set[Unit] = set()
        for u in self.units:
            if u in seen:
                raise PlanError(f"duplicate unit in plan: {u}")
            seen.add(u)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    def __contains__(self, unit: object) -> bool:
        return unit in self.units

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.units == other.units and self.family == other.family and self.num_layers == other.num_layers

    def extended(self, *units: Unit) -> Plan:
        return Plan([*self.units, *units], self.family, self.num_layers)

    def prefix(self, n: int) -> Plan:
        return Plan(self.units[:n], self.family, self.num_layers)

    def kinds(self) -> set[str]:
        return {u.kind for u in self.units}

    def of_kind(self, kind: str) -> list[Unit]:
        return [u for u in self.units if u.kind == kind]

    def removed_blocks(self) -> set[int]:
        return {u.layer for u in self.units if u.kind == "block"}

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "family": self.family,
            "num_layers": self.num_layers,
            "units": [u.to_dict() for u in self.units],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], family: str | None = None, num_layers: int | None = None,
                  reference_keys: Mapping[str, str] | None = None) -> Plan:
        """Read our format or a reference file; ``family``/``num_layers`` fill in what a reference file lacks,
        ``reference_keys`` (the family adapter's) says how its keys map to unit kinds."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        if "units" in data:
            fmt = data.get("format", PLAN_FORMAT)
            if fmt != PLAN_FORMAT:
                raise PlanError(f"unknown plan format {fmt!r}; this version reads {PLAN_FORMAT!r}")
            if not isinstance(data["units"], list):
                raise PlanError("'units' must be a list")
            return cls(
                [Unit.from_dict(u) for u in data["units"]],
                data.get("family", family),
                data.get("num_layers", num_layers),
            )
        known = REFERENCE_KEYS if reference_keys is None else reference_keys
        ref_keys = [k for k in data if k in known]
        unknown = [k for k in data if k not in known]
        if not ref_keys:
            raise PlanError(
                "not a pruning plan: expected an hf_shedder plan ({'units': [...]}) or a Mamba-Shedder file "
                f"with one of {sorted(known)}; got keys {sorted(data)}"
            )
        if unknown:
            raise PlanError(f"unknown keys in reference plan file: {unknown}")
        units: list[Unit] = []
        for key in ref_keys:
            values = data[key]
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise PlanError(f"{key} must be a list of layer indices, got {values!r}")
            units.extend(Unit(known[key], v) for v in values)
        return cls(units, family, num_layers)

    def to_reference(self, reference_keys: Mapping[str, str] | None = None) -> dict[str, list[int]]:
        """The reference tool's file content (keys: ``reference_keys``, the family adapter's, or the generic
        ones); only whole components with a reference key can be written that way."""
        keys: dict[str, str] = {}
        for key, kind in (REFERENCE_KEYS if reference_keys is None else reference_keys).items():
            keys.setdefault(kind, key)
        out: dict[str, list[int]] = {}
        for u in self.units:
            key = keys.get(u.kind)
            if key is None or u.indices:
                raise PlanError(
                    f"unit {u} cannot be written in the reference format (whole {'/'.join(keys)} units only)"
                )
            out.setdefault(key, []).append(u.layer)
        # SSMs first: a file is read back key by key, and an SSM may precede its layer's block, never follow it
        return dict(sorted(out.items(), key=lambda kv: kv[0] != keys.get("ssm")))

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str], family: str | None = None, num_layers: int | None = None,
             reference_keys: Mapping[str, str] | None = None) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {p} is not valid JSON: {e}") from e
        return cls.from_dict(data, family, num_layers, reference_keys)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for u in self.units:
            counts[u.kind] = counts.get(u.kind, 0) + 1
        return ", ".join(f"{n} x {k}" for k, n in counts.items()) or "nothing removed"


def load_plan_for(adapter: Any, path: str | os.PathLike[str]) -> Plan:
    """Our plan file or any file the reference writes, read with ``adapter``'s (the model family's) meaning."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"plan file {p} is not valid JSON: {e}") from e
    if isinstance(data, dict) and "units" in data:
        return Plan.from_dict(data, adapter.family, adapter.num_layers())
    if not isinstance(data, dict):
        raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
    return adapter.plan_from_reference(data)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON so that a reader never sees a half-written file (write to temp, fsync, rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def as_units(items: Iterable[Unit | dict[str, Any]]) -> list[Unit]:
    return [u if isinstance(u, Unit) else Unit.from_dict(u) for u in items]
