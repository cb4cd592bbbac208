import json

import pytest

from hf_shedder.arch import reference_keys
from hf_shedder.errors import PlanError
from hf_shedder.units import Plan, Unit


def test_unit_normalises_and_validates():
    assert Unit("ssm_heads", 2, (3, 1)).indices == (1, 3)
    with pytest.raises(PlanError, match="twice"):
        Unit("ssm_heads", 2, (1, 1))
    with pytest.raises(PlanError, match=">= 0"):
        Unit("block", -1)
    with pytest.raises(PlanError, match="integer"):
        Unit("block", "3")


def test_plan_json_round_trip(tmp_path):
    plan = Plan([Unit("ssm", 3), Unit("block", 1), Unit("ssm_heads", 2, (0, 5))], "mamba2", 8)
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "hf_shedder.plan/1"


def test_reference_files_read_and_write(tmp_path):
    (tmp_path / "ref.json").write_text(json.dumps({"pruned_mamba_block_idx": [5, 2, 9]}))
    plan = Plan.load(tmp_path / "ref.json", family="mamba", num_layers=12)
    assert [u.layer for u in plan] == [5, 2, 9] and plan.kinds() == {"block"}
    assert plan.to_reference() == {"pruned_mamba_block_idx": [5, 2, 9]}
    ssm = Plan.from_dict({"pruned_ssm_idx": [7, 1]})
    assert ssm.to_reference() == {"pruned_ssm_idx": [7, 1]}
    with pytest.raises(PlanError, match="reference format"):
        Plan([Unit("ssm_heads", 0, (1,))]).to_reference()


def test_family_reference_keys_come_from_the_adapter():
    keys = reference_keys("hymba")  # the reference's Hymba tool names block and MLP units its own way
    plan = Plan.from_dict({"pruned_hymba_block_idx": [3, 1], "pruned_moe_idx": [2]}, "hymba", 6, keys)
    assert plan.units == [Unit("block", 3), Unit("block", 1), Unit("mlp", 2)]
    assert plan.to_reference(keys) == {"pruned_hymba_block_idx": [3, 1], "pruned_moe_idx": [2]}
    assert Plan.from_dict({"pruned_mamba_block_idx": [4]}, reference_keys=keys).units == [Unit("block", 4)]
    assert reference_keys("mamba2") == reference_keys(None) == {"pruned_mamba_block_idx": "block", "pruned_ssm_idx": "ssm"}
    with pytest.raises(PlanError, match="not a pruning plan"):  # not a key of the generic reference tool
        Plan.from_dict({"pruned_hymba_block_idx": [3]})
    with pytest.raises(PlanError, match="reference format"):
        Plan([Unit("mlp", 2)]).to_reference()


def test_bad_plan_files(tmp_path):
    with pytest.raises(PlanError, match="duplicate"):
        Plan([Unit("block", 1), Unit("block", 1)])
    with pytest.raises(PlanError, match="not a pruning plan"):
        Plan.from_dict({"layers": [1]})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="list of layer indices"):
        Plan.from_dict({"pruned_ssm_idx": "3"})
