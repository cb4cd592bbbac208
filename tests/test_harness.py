"""lm-eval through HFLM on the bundled task slices (offline), with the reference's metric choice."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest

from hf_shedder.evaluation.harness import (
    DEFAULT_TASKS,
    EvalDependencyError,
    TaskError,
    TaskResults,
    choose_metric,
    evaluate_tasks,
    save_eval_results,
)
from tests._helpers_eval import neox_tiny, tokenizer

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def model_and_tok():  # noqa: ANN201
    return neox_tiny("mamba", num_layers=2), tokenizer()


@pytest.fixture(scope="module")
def all_tasks(model_and_tok) -> TaskResults:  # noqa: ANN001
    model, tok = model_and_tok
    return evaluate_tasks(model, tok, DEFAULT_TASKS, batch_size=8, max_length=256)


def test_every_task_returns_a_number(all_tasks: TaskResults) -> None:
    res = all_tasks
    assert res.data_source == "bundled"  # offline: the bundled configs and slices
    assert set(res.scores) == set(DEFAULT_TASKS)
    for task, value in res.scores.items():
        assert 0.0 <= value <= 1.0, task
        assert res.n_samples[task] >= 5
    assert res.metrics["arc_easy"] == "acc" and res.metrics["winogrande"] == "acc"
    assert res.metrics["lambada_openai"] == "acc"
    assert all(res.metrics[t] == "acc_norm" for t in ("hellaswag", "piqa", "arc_challenge", "openbookqa"))
    assert res.lambada_ppl is not None and math.isfinite(res.lambada_ppl) and res.lambada_ppl > 1
    assert res.average == pytest.approx(sum(res.scores.values()) / len(res.scores))
    for task, metric in res.metrics.items():  # the chosen number is lm-eval's own
        assert res.raw[task][f"{metric},none"] == res.scores[task]


def test_results_files(tmp_path, all_tasks: TaskResults) -> None:
    json_path, csv_path = save_eval_results(str(tmp_path), {"pruned": {"model": "m", "tasks": all_tasks.to_dict()}})
    back = TaskResults.from_dict(json.loads(open(json_path).read())["pruned"]["tasks"])
    assert back.scores == all_tasks.scores
    rows = list(csv.DictReader(open(csv_path)))
    assert rows[0]["label"] == "pruned" and float(rows[0]["acc_avg"]) == pytest.approx(100 * all_tasks.average, abs=0.01)
    assert set(DEFAULT_TASKS) <= set(rows[0])


def test_task_dir_reads_the_users_files(tmp_path, model_and_tok) -> None:  # noqa: ANN001
    model, tok = model_and_tok
    rows = [{"goal": "To boil water,", "sol1": "heat it in a kettle.", "sol2": "put it in the freezer.", "label": 0},
            {"goal": "To read at night,", "sol1": "switch off every lamp.", "sol2": "turn on a lamp.", "label": 1}]
    (tmp_path / "piqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = evaluate_tasks(model, tok, ["piqa"], task_dir=str(tmp_path), max_length=128)
    assert res.n_samples == {"piqa": 2} and res.data_source == str(tmp_path)
    with pytest.raises(TaskError, match="no data for hellaswag"):
        evaluate_tasks(model, tok, ["hellaswag"], task_dir=str(tmp_path))


def test_errors(monkeypatch, model_and_tok) -> None:  # noqa: ANN001
    model, tok = model_and_tok
    with pytest.raises(TaskError, match="unknown task.*mmlu"):
        evaluate_tasks(model, tok, ["mmlu"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(EvalDependencyError, match=r"pip install 'hf_shedder\[eval\]'"):
        evaluate_tasks(model, tok, ["piqa"])


def test_metric_choice_as_reference() -> None:
    both = {"acc,none": 0.3, "acc_norm,none": 0.4}
    assert choose_metric("arc_easy", both) == "acc"
    assert choose_metric("arc_challenge", both) == "acc_norm"
    assert choose_metric("winogrande", {"acc,none": 0.5}) == "acc"
