"""Calibration data: JSONL and lm-eval train splits, templates, seeded sampling, padding masks,
and the errors for empty/too-small sets, missing train splits and mismatched tokenizers."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import yaml

from merge_harness.core.errors import CheckpointError, ConfigError
from merge_harness.merge.calibration_data import (
    CalibrationRecipe,
    load_calibration,
    pad_rows,
    sample_examples,
    task_examples,
)
from merge_harness.merge.config import MergeConfig, load_merge_config
from merge_harness.tasks import TASKS_DIR
from merge_harness.train.prompts import Example, read_jsonl, render
from tests.calibrated_zoo import TASK_ROWS, WORDS, make_zoo, merge_config, word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def recipe(source, num_samples: int, seed: int, template: str = "plain", **fields) -> CalibrationRecipe:
    values = {"allow_fewer": False, "max_length": 512, **fields}
    return CalibrationRecipe(str(source), template, num_samples, seed, **values)


@pytest.fixture
def math_jsonl(tmp_path):
    return write_jsonl(tmp_path / "math.jsonl", [TASK_ROWS["math"](i) for i in range(20)])


# ------------------------------------------------------------------------------------- JSONL


def test_jsonl_rows_text_or_prompt_response(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"prompt": "what is", "response": 2}])
    assert read_jsonl(path) == [Example("hello world"), Example("what is", "2")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{oops\n', r"d\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n{"prompt": "no response"}\n', r"d\.jsonl:2: a row needs `text`"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_jsonl(path)


def test_sampling_is_seeded_and_never_repeats(math_jsonl, tokenizer):
    first = load_calibration(recipe(math_jsonl, 8, 3), tokenizer)
    again = load_calibration(recipe(math_jsonl, 8, 3), tokenizer)
    other = load_calibration(recipe(math_jsonl, 8, 4), tokenizer)
    assert first.texts == again.texts and first.texts != other.texts
    assert len(set(first.texts)) == 8 == first.num_examples
    assert all("####" in text for text in first.texts)  # the answer is part of the example


def test_empty_and_too_small_sets(tmp_path, math_jsonl, tokenizer, caplog):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty.jsonl: no examples"):
        load_calibration(recipe(empty, 4, 0), tokenizer)
    with pytest.raises(ConfigError, match="20 examples, but num_samples=30.*allow_fewer"):
        load_calibration(recipe(math_jsonl, 30, 0), tokenizer)
    with caplog.at_level(logging.WARNING, logger="merge_harness.merge.calibration_data"):
        fewer = load_calibration(recipe(math_jsonl, 30, 0, allow_fewer=True), tokenizer)
    assert fewer.num_examples == 20 and "using all 20 examples" in caplog.text
    with pytest.raises(ConfigError, match="calibration file not found"):
        load_calibration(recipe(tmp_path / "missing.jsonl", 4, 0), tokenizer)


def test_right_padding_is_masked_and_max_length_cuts(tmp_path, tokenizer):
    ids, mask = pad_rows([[5, 6], [5, 6, 7, 8]])
    assert ids.tolist() == [[5, 6, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    rows = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "one two three four five"}])
    data = load_calibration(recipe(rows, 2, 0, max_length=4), tokenizer)
    assert data.input_ids.shape == (2, 4) and sorted(data.attention_mask.sum(1).tolist()) == [2, 4]
    assert data.input_ids[0, 0].item() == tokenizer.bos_token_id  # `text` rows: as written, <s> first


# ---------------------------------------------------------------------------------- templates


def test_templates(tokenizer):
    example = Example("what is two", "four")
    assert render(example, tokenizer, "plain") == ("what is two", "what is twofour</s>")
    assert render(Example("Q:", "four", " "), tokenizer, "plain")[1] == "Q: four</s>"
    prompt, fastchat = render(example, tokenizer, "fastchat")
    assert fastchat == prompt + " four</s>" and prompt.endswith("USER: what is two ASSISTANT:")
    assert fastchat.startswith("<s>A chat between a curious user")
    assert render(example, tokenizer, "<{prompt}|{response}>") == ("<what is two|", "<what is two|four>")
    with pytest.raises(ConfigError, match="not chat, fastchat or plain"):
        render(example, tokenizer, "vicuna")


def test_chat_template_uses_the_tokenizer(tokenizer):
    tokenizer = word_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    prompt, text = render(Example("what is two", "four"), tokenizer, "chat")
    assert text == "user : what is two . assistant : four . "
    assert prompt == "user : what is two . assistant : "


# ------------------------------------------------------------------------- lm-eval train splits


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Offline lm-eval tasks over local JSON files: generative and multiple choice with a train
    split, and one without."""
    root = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"{a} plus {b}", "answer": str(a + b), "choices": ["red", "blue"], "label": a % 2}
            for a in range(6) for b in range(2)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "test.jsonl", [{"question": "test only", "answer": "x", "choices": ["a", "b"],
                                       "label": 0}])
    files = {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")}

    def task(name, splits, **fields):
        config = {
            "task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {s: files[s] for s in splits}},
            "test_split": "test", **fields,
            "metric_list": [{"metric": "exact_match" if "choice" not in str(fields) else "acc"}],
        }
        if "train" in splits:
            config["training_split"] = "train"
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))

    task("calib_gen", ["train", "test"], output_type="generate_until",
         doc_to_text="Q: {{question}}\nA:", doc_to_target="{{answer}}")
    task("calib_mc", ["train", "test"], output_type="multiple_choice",
         doc_to_text="Pick: {{question}}", doc_to_target="label", doc_to_choice="{{choices}}")
    task("calib_no_train", ["test"], output_type="generate_until",
         doc_to_text="Q: {{question}}", doc_to_target="{{answer}}")
    return root


def test_task_examples_come_from_the_train_split(task_dir, tokenizer):
    examples = task_examples("calib_gen", task_dir)
    assert len(examples) == 12 and examples[0] == Example("Q: 0 plus 0\nA:", "0", " ")
    assert all("test only" not in e.prompt for e in examples)
    choices = task_examples("calib_mc", task_dir)
    assert choices[0] == Example("Pick: 0 plus 0", "red", " ")  # label 0 -> its choice text
    data = load_calibration(recipe("calib_gen", 5, 1, max_length=16), tokenizer, include_path=task_dir)
    assert data.num_examples == 5 and all(t.startswith("Q: ") for t in data.texts)


def test_task_without_train_split_is_refused(task_dir):
    with pytest.raises(ConfigError, match="'calib_no_train' has no train split.*never uses"):
        task_examples("calib_no_train", task_dir)


def _repo_fixture_tasks_with_train_split() -> list[str]:
    names = []
    for path in sorted(TASKS_DIR.rglob("*fixture*.yaml")):
        text = path.read_text()
        if "training_split:" in text and "training_split: null" not in text:
            names.append(yaml.safe_load(text.replace("!function", ""))["task"])
    return names


def test_repo_fixture_task_with_a_train_split():
    """gsm8k_splits_fixture reads train and test rows from two files: calibration sees exactly
    the train rows, formatted by the task's prompt, and never a test question."""
    from merge_harness.evaluate.evaluator import local_catalog
    from merge_harness.tasks.fixtures import read_fixture

    names = _repo_fixture_tasks_with_train_split()
    assert "gsm8k_splits_fixture" in names
    train, test = read_fixture("gsm8k_train.jsonl"), read_fixture("gsm8k.jsonl")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    examples = task_examples("gsm8k_splits_fixture")
    assert len(examples) == len(train)
    assert [e.prompt for e in examples] == [f"Question: {r['question']}\nAnswer:" for r in train]
    assert [e.response for e in examples] == [r["answer"] for r in train]
    drawn = sample_examples(examples, 5, 0, False, "gsm8k_splits_fixture")
    assert len(drawn) == 5 and not any(r["question"] in e.prompt for e in drawn for r in test)
    # and lm-eval evaluates on the test rows only
    task = local_catalog().manager.load(["gsm8k_splits_fixture"])["tasks"]["gsm8k_splits_fixture"]
    assert [doc["question"] for doc in task.eval_docs] == [r["question"] for r in test]


# ------------------------------------------------------------------------- config and tokenizers


def test_config_accepts_calibration_fields_and_resolves_relative_paths(tmp_path):
    (tmp_path / "math.jsonl").write_text('{"text": "one"}\n')
    path = tmp_path / "merge.yaml"
    path.write_text(textwrap.dedent("""\
        method: slta
        base_model: /abs/base
        models:
          - {model: /abs/math, calibration: math.jsonl}
          - {model: /abs/qa, calibration: gsm8k}
        parameters: {granularity: layer, num_samples: 4}
        calibration: {max_length: 64, template: fastchat}
        """))
    config = load_merge_config(path)
    assert config.models[0].calibration.source == str(tmp_path / "math.jsonl")
    assert config.models[1].calibration.source == "gsm8k"  # a task name stays a name
    assert config.calibration.template == "fastchat" and config.calibration.max_length == 64
    with pytest.raises(ValueError, match="extra"):
        MergeConfig.model_validate({"method": "slta", "models": [{"model": "x"}],
                                    "calibration": {"num_sample": 3}})


def test_mismatched_tokenizer_vocab_is_a_checkpoint_error(tmp_path):
    from merge_harness.merge.data_driven import merge_calibrated

    zoo = make_zoo(tmp_path, tasks=("math", "qa"))
    word_tokenizer(words=WORDS[::-1]).save_pretrained(zoo["qa"])  # same tokens, other ids
    with pytest.raises(CheckpointError, match=r"qa: tokenizer vocabulary differs from .*base"):
        merge_calibrated(merge_config(zoo, num_samples=4))


def test_calibrated_merge_needs_calibration_for_every_fine_tune(tmp_path):
    from merge_harness.merge.data_driven import merge_calibrated

    zoo = make_zoo(tmp_path, tasks=("math", "qa"), rows=3)
    with pytest.raises(ConfigError, match=r"3 examples, but num_samples=30"):
        merge_calibrated(merge_config(zoo))  # default N = 30 > 3 rows
    assert Path(zoo["math.jsonl"]).exists()
