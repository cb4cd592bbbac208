"""Supported Transformers releases: the tested range, the import guard, and what differs between releases
(cache keyword names, top-k router output order)."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch.nn import functional as F

from hf_shedder import compat, versions
from hf_shedder.arch.hybrid_parts import ExpertMaskedLogits, slice_router, top_k_router_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("version", "tested"), [
    (versions.TRANSFORMERS_OLDEST, True), (versions.TRANSFORMERS_NEWEST, True), ("5.20.2", True),
    ("5.24.7", True), ("5.24.0.dev0", True), ("5.16.1", False), ("5.25.0", False), ("6.0.0", False),
    ("4.57.6", False), ("not-a-version", False),
])
def test_tested_range(version, tested):
    assert versions.is_tested(version) is tested
    assert (compat.untested_transformers_message(version) is None) is tested


def test_installed_release_is_tested():
    # CI runs the suite on the oldest and newest tested release: neither may warn.
    assert compat.untested_transformers_message() is None


def test_guard_warns_once_naming_the_range(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.40.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_if_untested_transformers()
    assert len(caught) == 1 and caught[0].category is compat.UntestedTransformersWarning
    text = str(caught[0].message)
    assert "5.17 to 5.24" in text and "5.40.0" in text and "transformers>=5.17,<5.25" in text


def test_import_warns_once_outside_the_tested_range():
    code = "import transformers; transformers.__version__ = '5.99.0'; import hf_shedder"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("UntestedTransformersWarning") == 1, run.stderr
    assert "tested with transformers 5.17 to 5.24; transformers 5.99.0 is installed" in run.stderr


def test_setup_cfg_admits_the_tested_range():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    req = next(r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip().startswith("transformers"))
    from packaging.requirements import Requirement

    spec = Requirement(req).specifier
    for version in (versions.TRANSFORMERS_OLDEST, versions.TRANSFORMERS_NEWEST):
        assert spec.contains(version), (req, version)
    assert not spec.contains("5.16.1")  # the oldest tested release is the lower bound


def test_versions_file_runs_without_the_package():
    out = subprocess.run([sys.executable, "-S", str(ROOT / "hf_shedder" / "versions.py"), "newest"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == versions.TRANSFORMERS_NEWEST


def test_pop_cache_takes_every_name():
    cache = object()
    for name in compat.CACHE_NAMES:
        kwargs = {name: cache, "attention_mask": None}
        assert compat.pop_cache(kwargs) is cache
        assert kwargs == {"attention_mask": None}
    assert compat.pop_cache({"past_key_values": None, "cache": cache}) is cache
    assert compat.pop_cache({}) is None


# ---------------------------------------------------------------- top-k routers in either output order
class _TopKRouter(torch.nn.Module):
    """A GraniteMoeHybrid-style router (top-k, then softmax) returning its outputs in ``order``."""

    def __init__(self, weight: torch.Tensor, top_k: int, order: tuple[str, str, str]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.top_k, self.order, self.num_experts = top_k, order, weight.shape[0]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = F.linear(h, self.weight).float()
        top, index = logits.topk(self.top_k, dim=-1)
        parts = {"logits": logits, "weights": torch.softmax(top, dim=-1), "index": index}
        return tuple(parts[name] for name in self.order)


@pytest.mark.parametrize("order", [("index", "weights", "logits"), ("logits", "weights", "index")])
def test_masked_top_k_router_routes_as_a_router_without_the_experts(order):
    torch.manual_seed(0)
    weight, h = torch.randn(6, 8), torch.randn(20, 8)
    router = _TopKRouter(weight, top_k=2, order=order)
    at = top_k_router_layout(router(h), 6)
    assert [k for k, _ in sorted(at.items(), key=lambda kv: kv[1])] == list(order)
    masked = ExpertMaskedLogits(router, removed=(1, 4), num_experts=6, normalize="top_k")(h)
    small = slice_router(_TopKRouter(weight, top_k=2, order=order), [0, 2, 3, 5])(h)
    kept = torch.tensor([0, 2, 3, 5])
    assert torch.equal(masked[at["index"]], kept[small[at["index"]]])  # same experts, original numbering
    torch.testing.assert_close(masked[at["weights"]], small[at["weights"]])
    assert torch.isinf(masked[at["logits"]][:, [1, 4]]).all()
