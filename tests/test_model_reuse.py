"""One model per run: merge jobs write into one model object in place, with identical results."""

from __future__ import annotations

import json

import pytest
import torch

from merge_harness.core.errors import MethodError
from merge_harness.io.models import model_tensors
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import layout_mismatch, merge_into, merge_state_dict
from merge_harness.merge.plan import build_plan
from merge_harness.run.driver import LocalExecutor
from merge_harness.run.experiment import load_experiment
from merge_harness.run.runner import run_experiment
from merge_harness.run.worker import ModelCache
from merge_harness.store.database import ResultStore
from tests.conftest import write_experiment

METHODS = """\
  - method: task_arithmetic
    grid: {lambda: [0.5, 1.0]}
  - method: ties
    parameters: {density: 0.5}
  - method: slta
    parameters: {granularity: layer, num_samples: 4}
"""


def merge_of(zoo, method: str, **parameters) -> MergeConfig:
    return MergeConfig.model_validate({
        "method": method,
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["math"])}, {"model": str(zoo["qa"])}],
        "parameters": parameters,
    })


def test_merge_into_overwrites_the_model_in_place_with_the_state_dict_merge(chat_zoo):
    cache = ModelCache()
    first, _ = cache.merged_model(merge_of(chat_zoo, "task_arithmetic", **{"lambda": 0.5}))
    storages = {name: t.data_ptr() for name, t in model_tensors(first).items()}
    config = merge_of(chat_zoo, "ties", density=0.5)
    second, outcome = cache.merged_model(config)
    assert second is first  # the same object, its tensors where they were
    assert {name: t.data_ptr() for name, t in model_tensors(second).items()} == storages
    expected = merge_state_dict(config).state
    tensors = model_tensors(second)
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    assert outcome.tensors == len(expected) and outcome.tokenizer_dir == chat_zoo["base"]


def test_a_model_of_another_layout_is_rebuilt_not_written_into(chat_zoo):
    cache = ModelCache()
    first, _ = cache.merged_model(merge_of(chat_zoo, "task_arithmetic", **{"lambda": 0.5}))
    as_bf16 = merge_of(chat_zoo, "task_arithmetic", **{"lambda": 0.5})
    as_bf16 = as_bf16.model_copy(update={"out_dtype": "bfloat16"})
    second, _ = cache.merged_model(as_bf16)
    assert second is not first and next(second.parameters()).dtype == torch.bfloat16
    first.to(torch.float16)  # a model changed behind the cache's back (e.g. cast) is not reused
    third, _ = cache.merged_model(merge_of(chat_zoo, "linear"))
    assert third is not second and next(third.parameters()).dtype == torch.float32


def test_merge_into_refuses_a_target_that_does_not_fit(chat_zoo):
    config = merge_of(chat_zoo, "task_arithmetic")
    plan = build_plan(config)
    tensors = dict(merge_state_dict(config).state)
    name = next(iter(tensors))
    tensors[name] = tensors[name].double()
    assert name in layout_mismatch(plan, tensors)
    with pytest.raises(MethodError, match="cannot merge into the given model: tensor"):
        merge_into(plan, tensors)
    del tensors[name]
    assert "missing" in layout_mismatch(plan, tensors)


def test_a_run_reusing_one_model_records_the_same_scores_as_fresh_models(chat_zoo, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = ({"prompt": f"what is {a} plus 2?", "response": f"#### {a + 2}"} for a in range(8))
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scores = {}
    for reuse in (True, False):
        store_path = tmp_path / f"reuse-{reuse}.sqlite"
        path = write_experiment(tmp_path / f"e-{reuse}.yaml", chat_zoo, store_path, METHODS)
        calibration = f"{{calibration: {{source: {pairs}, template: plain}}, model:"
        path.write_text(path.read_text().replace("{model:", calibration))
        experiment = load_experiment(path).model_copy(update={"baselines": False})
        with ResultStore(store_path) as store:
            executor = LocalExecutor(reuse_models=reuse)
            summary = run_experiment(experiment, store, executor, show_progress=False)
            assert summary.failed == []
            frame = store.results_frame(experiment.name)
        scores[reuse] = frame.set_index(["label", "task", "metric"])["value"].sort_index()
    assert len(scores[True]) >= 12 and scores[True].equals(scores[False])


def test_a_run_has_one_vllm_engine_and_closing_the_run_drops_it_and_the_model(chat_zoo):
    cache = ModelCache()
    engine = cache.vllm_engine()
    assert cache.vllm_engine() is engine  # every job of the run swaps into the same engine
    first, _ = cache.merged_model(merge_of(chat_zoo, "linear"))
    cache.close()
    assert cache.vllm_engine() is not engine
    second, _ = cache.merged_model(merge_of(chat_zoo, "linear"))
    assert second is not first  # the kept model went with the run
