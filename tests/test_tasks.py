"""The task YAMLs load through lm-eval's TaskManager, and their prompt/metric code is right."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from merge_harness.core.errors import EvaluationError
from merge_harness.evaluate.evaluator import default_catalog
from merge_harness.tasks import TASKS_DIR
from merge_harness.tasks.cosmos_qa import utils as cosmos_qa
from merge_harness.tasks.fixtures import load_fixture, read_fixture
from merge_harness.tasks.humaneval_sandboxed import utils as humaneval
from merge_harness.tasks.ropes import utils as ropes
from merge_harness.tasks.wmt22_zh_en import utils as wmt

# fixture task -> (metrics it declares, evaluated split's row count)
FIXTURE_TASKS = {
    "gsm8k_fixture": ({"exact_match"}, 8),
    "gsm8k_chat_fixture": ({"exact_match"}, 8),
    "winogrande_fixture": ({"acc"}, 8),
    "cosmos_qa_fixture": ({"acc", "acc_norm"}, 6),
    "ropes_fixture": ({"exact_match", "f1"}, 8),
    "wmt22_zh_en_fixture": ({"bleu", "chrf"}, 8),
    "humaneval_sandboxed_fixture": ({"pass@1", "sandbox_errors", "timeouts"}, 6),
    "humaneval_sandboxed_pass10_fixture": ({"pass@1", "pass@10", "sandbox_errors", "timeouts"}, 6),
}
REAL_TASKS = [
    "gsm8k_chat",
    "cosmos_qa",
    "ropes",
    "wmt22_zh_en",
    "humaneval_sandboxed",
    "humaneval_sandboxed_pass10",
]


@pytest.fixture(scope="module")
def manager():
    return default_catalog().manager


def load_task(manager, name: str):
    return manager.load([name])["tasks"][name]


def test_every_task_is_indexed_with_its_builtins(manager):
    names = set(manager.all_tasks)
    assert set(FIXTURE_TASKS) | set(REAL_TASKS) | {"gsm8k", "winogrande"} <= names


@pytest.mark.parametrize("name", sorted(FIXTURE_TASKS))
def test_fixture_task_loads_with_docs_targets_and_metrics(manager, name):
    metrics, rows = FIXTURE_TASKS[name]
    task = load_task(manager, name)
    docs = list(task.eval_docs)
    assert len(docs) == rows
    assert set(task.aggregation()) == metrics
    for doc in docs:
        text, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            gold = text if isinstance(text, int) else target  # winogrande: the context varies
            assert 0 <= gold < len(choices) and all(isinstance(c, str) and c for c in choices)
        else:
            assert isinstance(text, str) and text and isinstance(target, str) and target


def test_real_variant_keeps_the_hf_dataset_and_fixture_differs_only_in_data(manager):
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in ["cosmos_qa", "ropes", "wmt22_zh_en", "humaneval_sandboxed", "gsm8k_chat"]:
        real = load_yaml(manager.task_index[name].yaml_path, resolve_func=False)
        fixture = load_yaml(manager.task_index[f"{name}_fixture"].yaml_path, resolve_func=False)
        data_keys = {"task", "custom_dataset", "dataset_kwargs", "training_split", "fewshot_split"}
        assert {k: v for k, v in real.items() if k not in data_keys} == {
            k: v for k, v in fixture.items() if k not in data_keys
        }
    assert (
        load_yaml(manager.task_index["ropes"].yaml_path, resolve_func=False)["dataset_path"]
        == "allenai/ropes"
    )


def test_gsm8k_variants_score_exactly_like_the_builtin(manager):
    from lm_eval.tasks._yaml_loader import load_yaml

    builtin = load_yaml(manager.task_index["gsm8k"].yaml_path, resolve_func=False)
    fixture = load_yaml(manager.task_index["gsm8k_fixture"].yaml_path, resolve_func=False)
    chat = load_yaml(manager.task_index["gsm8k_chat"].yaml_path, resolve_func=False)
    shared = ["output_type", "doc_to_target", "metric_list", "filter_list", "repeats"]
    for key in shared:
        assert fixture[key] == builtin[key] == chat[key], key
    for key in ["doc_to_text", "num_fewshot", "generation_kwargs"]:
        assert fixture[key] == builtin[key], key
    ours = {k: v for k, v in fixture["metadata"].items() if k != "primary_metric"}  # our declaration
    assert ours == builtin["metadata"]
    assert chat["num_fewshot"] == 0 and chat["doc_to_text"] == "{{question}}"


def test_winogrande_fixture_uses_the_builtin_prompt_functions(manager):
    from lm_eval.tasks.winogrande import preprocess_winogrande

    task = load_task(manager, "winogrande_fixture")
    doc = next(iter(task.eval_docs))
    assert task.doc_to_text(doc) == preprocess_winogrande.doc_to_text(doc) == 0
    assert task.doc_to_choice(doc) == preprocess_winogrande.doc_to_choice(doc)
    assert task.doc_to_target(doc) == "is too large."


@pytest.mark.parametrize(
    ("filter_name", "response"),
    [("strict-match", "She has 42 - 30 = 12 muffins.\n#### 12"), ("flexible-extract", "So 42 - 30 is 12.")],
)
def test_gsm8k_filters_extract_the_answer_and_exact_match_scores_it(manager, filter_name, response):
    task = load_task(manager, "gsm8k_fixture")
    doc = next(iter(task.eval_docs))  # answer: "... #### 12"
    pipeline = {ensemble.name: ensemble for ensemble in task._filters}[filter_name]
    responses = [[response]]
    for step in pipeline.filters:
        responses = list(step().apply(responses, [doc]))
    assert task.process_results(doc, responses) == {"exact_match": 1.0}
    assert task.process_results(doc, ["13"]) == {"exact_match": 0.0}


def test_cosmos_qa_choices_follow_label_order():
    doc = read_fixture("cosmos_qa.jsonl")[0]
    assert cosmos_qa.doc_to_choice(doc)[doc["label"]] == "It was raining."


@pytest.mark.parametrize(
    ("prediction", "gold", "em", "f1"),
    [
        ("The black car.", "black car", 1.0, 1.0),
        ("black truck", "the black car", 0.0, 0.5),
        ("Bob", "Jim", 0.0, 0.0),
        ("", "", 1.0, 1.0),
        ("a", "cup X", 0.0, 0.0),  # only an article: normalises to nothing
        ("cup X and cup Y", "cup X", 0.0, 2 * (2 / 5) * 1.0 / (2 / 5 + 1.0)),
    ],
)
def test_ropes_exact_match_and_token_f1_on_hand_cases(prediction, gold, em, f1):
    assert ropes.exact_match(prediction, gold) == em
    assert ropes.token_f1(prediction, gold) == pytest.approx(f1)


def test_ropes_takes_the_best_gold_answer():
    doc = {"answers": {"text": ["cup X", "X"]}}
    assert ropes.process_results(doc, [" X\n"]) == {"exact_match": 1.0, "f1": 1.0}
    assert ropes.normalize_answer("  The  Cat,  sat! ") == "cat sat"


def test_wmt_prompt_and_corpus_metrics_use_real_sacrebleu():
    doc = read_fixture("wmt22_zh_en.jsonl")[0]
    assert (
        wmt.doc_to_text(doc) == "Translate this from Chinese to English:\nChinese: 我爱机器翻译。\nEnglish:"
    )
    reference = wmt.doc_to_target(doc)
    same = [wmt.process_results(doc, [f" {reference}"])["bleu"]] * 3
    assert wmt.corpus_bleu(same) == pytest.approx(100.0)
    assert wmt.corpus_chrf(same) == pytest.approx(100.0)
    different = [(reference, "Cats sleep all day long.")] * 3
    assert wmt.corpus_bleu(different) < 5.0 and 0.0 <= wmt.corpus_chrf(different) < 30.0
    partial = [(reference, "I love translation.")]
    assert 0.0 < wmt.corpus_bleu(partial + same) < 100.0


def test_pass_at_k_estimator_on_hand_cases():
    assert humaneval.pass_at_k(10, 0, 1) == 0.0
    assert humaneval.pass_at_k(10, 10, 10) == 1.0
    assert humaneval.pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert humaneval.pass_at_k(10, 3, 10) == 1.0
    assert humaneval.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    with pytest.raises(EvaluationError, match="pass@10 needs at least 10"):
        humaneval.pass_at_k(5, 1, 10)


def test_humaneval_fixture_canonical_solutions_pass_in_the_sandbox():
    problems = read_fixture("humaneval.jsonl")
    for problem in problems:
        assert humaneval.pass_at_1(problem, [problem["canonical_solution"]])["pass@1"] == 1.0, problem[
            "task_id"
        ]
    assert humaneval.pass_at_1(problems[0], ["    return None\n"])["pass@1"] == 0.0


def test_humaneval_pass10_counts_every_sample():
    problem = read_fixture("humaneval.jsonl")[-1]  # add(x, y)
    samples = [problem["canonical_solution"]] + ["    return x - y\n"] * 9
    scores = humaneval.pass_at_1_and_10(problem, [samples])
    assert scores == {"pass@1": pytest.approx(0.1), "pass@10": 1.0, "sandbox_errors": 0, "timeouts": 0}


def test_real_humaneval_has_the_164_packaged_problems():
    test = humaneval.load_humaneval()["test"]
    assert len(test) == 164 and set(test.column_names) >= {"task_id", "prompt", "test", "entry_point"}


def test_fixture_loader_names_a_missing_file():
    with pytest.raises(EvaluationError, match=r"nope\.jsonl not found"):
        load_fixture("nope.jsonl")
    assert len(load_fixture("ropes.jsonl", split="validation")["validation"]) == 8


def test_tasks_dir_is_the_package_folder():
    assert Path(__file__).parents[1] / "tasks" == TASKS_DIR
    fixtures = {p.name for p in (TASKS_DIR / "fixtures").glob("*.jsonl")}
    assert fixtures >= {
        "cosmos_qa.jsonl",
        "gsm8k.jsonl",
        "humaneval.jsonl",
        "ropes.jsonl",
        "winogrande.jsonl",
        "wmt22_zh_en.jsonl",
    }


def test_every_task_file_is_shipped_as_package_data():
    """pyproject ships tasks/**/*.yaml, *.jsonl and *.py; anything else would vanish from a wheel."""
    files = [p for p in TASKS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files and all(p.suffix in {".yaml", ".jsonl", ".py"} for p in files)


def test_every_task_of_ours_declares_a_primary_metric_it_reports(manager):
    from merge_harness.tasks import declared_primary_metrics

    declared = declared_primary_metrics()
    ours = [name for name, entry in manager.task_index.items()
            if entry.yaml_path and str(TASKS_DIR) in str(entry.yaml_path) and entry.kind.name == "TASK"]
    assert ours and sorted(n for n in ours if n not in declared) == []
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in ours:
        config = load_yaml(manager.task_index[name].yaml_path, resolve_func=False)  # includes merged
        metrics = [m["metric"] for m in config["metric_list"]]
        assert declared[name].split(",")[0] in metrics, name
