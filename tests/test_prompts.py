"""One prompt-template module: calibration renders and tokenizes each example exactly as the
fine-tune's training did, in the template the fine-tune recorded; and the user's own token
batches are accepted (and refused when they hold no token)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from merge_harness.core.errors import ConfigError
from merge_harness.merge.calibration_data import (
    CalibrationRecipe,
    CalibrationSet,
    load_calibration,
    resolve_template,
)
from merge_harness.merge.config import CalibrationSettings, CalibrationSource
from merge_harness.train.finetune import collate, encode_all
from merge_harness.train.prompts import (
    IGNORE,
    RECORD_FILE,
    Example,
    check_template,
    encode,
    read_jsonl,
    recorded_template,
    training_record,
)
from tests.calibrated_zoo import make_zoo, merge_config, write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAIRS = [
    {"prompt": f"What is {a} plus {b}?\n", "response": f"\n    #### {a + b}"}
    for a in range(7)
    for b in range(3)
]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """The toy zoo's kind of tokenizer: byte-level BPE with the Vicuna chat template."""
    from merge_harness.zoo.toymodel import train_tokenizer

    corpus = [p["prompt"] + p["response"] for p in PAIRS] * 3
    return train_tokenizer(corpus, vocab_size=320)


TEMPLATES = ["chat", "chatml", "fastchat", "plain", "Q: {prompt}\nA:{response}{eos}"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_calibration_tokens_equal_the_training_tokens(tmp_path, bpe_tokenizer, template):
    """For the same example, the ids SLTA/RegMean/Fisher see are the ids fine-tuning trained on
    (prompt and answer tokenized apart, EOS and BOS where the template puts them)."""
    tokenizer = bpe_tokenizer
    if template == "chatml":
        tokenizer = bpe_tokenizer.__class__.from_pretrained(_saved(bpe_tokenizer, tmp_path))
        tokenizer.chat_template, template = CHATML, "chat"
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    recipe = CalibrationRecipe(str(data), template, num_samples=len(PAIRS), seed=0, allow_fewer=False,
                               max_length=256)
    calibration = load_calibration(recipe, tokenizer)
    examples = [Example(p["prompt"], p["response"]) for p in PAIRS]
    trained = collate(encode_all(examples, tokenizer, template, 256), pad_id=0)
    for row, text in enumerate(calibration.texts):
        index = next(i for i, e in enumerate(examples) if text.startswith(_prompt(e, tokenizer, template)))
        ids = calibration.input_ids[row][calibration.attention_mask[row].bool()].tolist()
        expected = trained["input_ids"][index][trained["attention_mask"][index].bool()].tolist()
        assert ids == expected == encode(examples[index], tokenizer, template, 256)[0]
        answer = [t for t in encode(examples[index], tokenizer, template, 256)[1] if t != IGNORE]
        assert ids[-len(answer):] == answer  # the answer is part of the calibration example


def _saved(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def _prompt(example: Example, tokenizer, template: str) -> str:
    from merge_harness.train.prompts import render

    return render(example, tokenizer, template)[0]


def test_text_rows_are_used_as_written(bpe_tokenizer):
    ids, labels = encode(Example("What is 1 plus 2?"), bpe_tokenizer, "chat", 64)
    assert ids == labels == bpe_tokenizer("What is 1 plus 2?")["input_ids"]


def test_template_precedence_entry_then_merge_then_record(tmp_path):
    model = tmp_path / "ft"
    model.mkdir()
    settings = CalibrationSettings()
    where = "finetunes.math.calibration"
    with pytest.raises(ConfigError, match=r"finetunes\.math\.calibration\.template: .*records no"):
        resolve_template(CalibrationSource(source="x.jsonl"), settings, model, where)
    (model / RECORD_FILE).write_text(json.dumps(training_record("fastchat", examples=3)))
    assert recorded_template(model) == "fastchat"
    assert resolve_template(CalibrationSource(source="x.jsonl"), settings, model, where) == "fastchat"
    plain = CalibrationSettings(template="plain")
    assert resolve_template(CalibrationSource(source="x.jsonl"), plain, model, where) == "plain"
    own = CalibrationSource(source="x.jsonl", template="chat")
    assert resolve_template(own, plain, model, where) == "chat"


def test_merge_harness_finetune_records_its_template(tmp_path, bpe_tokenizer):
    from merge_harness.train.finetune import FinetuneConfig, finetune
    from merge_harness.zoo.toymodel import tiny_llama

    base = tmp_path / "base"
    model = tiny_llama(bpe_tokenizer, hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate=32)
    model.save_pretrained(base)
    bpe_tokenizer.save_pretrained(base)
    data = write_jsonl(tmp_path / "math.jsonl", PAIRS[:4])
    config = FinetuneConfig(base_model=str(base), data=str(data), output_dir=str(tmp_path / "ft"),
                            template="fastchat", max_steps=1, batch_size=2, lr=1e-3, device="cpu")
    out = finetune(config, show_progress=False)
    assert recorded_template(out) == "fastchat"


def test_the_zoo_records_the_template_it_trained_with(ci_zoo):
    from merge_harness.zoo.demo import demo_experiment

    zoo, _ = ci_zoo
    assert zoo.template == "chat"
    assert all(recorded_template(path) == "chat" for path in zoo.finetunes.values())
    assert json.loads((zoo.root / "zoo.json").read_text())["template"] == "chat"
    experiment = demo_experiment(zoo)
    assert {ft.calibration.template for ft in experiment.finetunes.values()} == {"chat"}


def test_users_own_token_batches_give_the_same_merge(tmp_path):
    from merge_harness.merge.data_driven import calibration_sets, fine_tune_entries, method_params
    from merge_harness.merge.engine import merge_state_dict
    from merge_harness.merge.plan import build_plan

    zoo = make_zoo(tmp_path, tasks=("math", "translate"))
    config = merge_config(zoo, granularity="layer", num_samples=6)
    plan = build_plan(config)
    drawn = calibration_sets(plan, fine_tune_entries(config, plan), method_params(plan))
    own = [CalibrationSet.from_tokens(f"my-{i}", d.input_ids, d.attention_mask) for i, d in enumerate(drawn)]
    without_sources = config.model_copy(
        update={"models": [m.model_copy(update={"calibration": None}) for m in config.models]}
    )
    expected = merge_state_dict(config).state
    given = merge_state_dict(without_sources, calibration=own).state
    assert expected.keys() == given.keys()
    assert all(torch.equal(expected[name], given[name]) for name in expected)
    with pytest.raises(ConfigError, match="2 token batches given for 1 fine-tunes|token batches given"):
        merge_state_dict(without_sources.model_copy(update={"models": without_sources.models[:1]}),
                         calibration=own)


def test_a_task_without_tokens_is_an_error_not_a_zero_coefficient():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="mine: no non-padding token"):
        CalibrationSet.from_tokens("mine", ids, torch.zeros(2, 3))
    with pytest.raises(ConfigError, match=r"must both be \(examples, tokens\)"):
        CalibrationSet.from_tokens("mine", ids, torch.ones(2, 4))
    assert CalibrationSet.from_tokens("mine", ids).num_tokens == 6


def test_experiment_yaml_takes_calibration_settings_per_finetune(tmp_path):
    from merge_harness.run.experiment import load_experiment

    (tmp_path / "math.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    path = tmp_path / "e.yaml"
    path.write_text(textwrap.dedent("""\
        name: e
        base_model: /abs/base
        finetunes:
          math: {model: /abs/math, calibration: {source: math.jsonl, template: fastchat, num_samples: 8,
                                                  seed: 3, allow_fewer: true}}
          qa: {model: /abs/qa, calibration: gsm8k}
        tasks: [gsm8k]
        """))
    experiment = load_experiment(path)
    math = experiment.finetunes["math"].calibration
    assert (math.source, math.template, math.num_samples, math.seed, math.allow_fewer) == (
        str(tmp_path / "math.jsonl"), "fastchat", 8, 3, True)
    assert experiment.finetunes["qa"].calibration.source == "gsm8k"
    path.write_text(path.read_text().replace("template: fastchat", "template: vicuna"))
    with pytest.raises(ConfigError, match=r"e\.yaml:4: finetunes\.math\.calibration\.template: .*vicuna"):
        load_experiment(path)


def test_calibration_template_and_data_are_in_the_key_of_data_driven_merges_only(tmp_path):
    from merge_harness.run.experiment import Experiment, plan_jobs

    zoo = make_zoo(tmp_path, tasks=("math", "translate"))

    def keys(template: str) -> dict[str, str]:
        experiment = Experiment.model_validate({
            "name": "k", "base_model": str(zoo["base"]), "baselines": False,
            "finetunes": {t: {"model": str(zoo[t]), "calibration": {"source": str(zoo[f"{t}.jsonl"]),
                                                                    "template": template}}
                          for t in ("math", "translate")},
            "methods": [{"method": "slta"}, {"method": "task_arithmetic"}],
            "tasks": ["gsm8k_fixture"],
        })
        return {job.label: job.tasks[0].key for job in plan_jobs(experiment)}

    plain, fastchat = keys("plain"), keys("fastchat")
    assert plain["slta"] != fastchat["slta"]
    assert plain["task_arithmetic"] == fastchat["task_arithmetic"]  # it never reads calibration data
    zoo["math.jsonl"].write_text(zoo["math.jsonl"].read_text().replace("plus", "minus"))
    edited = keys("plain")
    assert edited["slta"] != plain["slta"] and edited["task_arithmetic"] == plain["task_arithmetic"]


def test_a_finetune_without_a_recorded_template_fails_at_planning(tmp_path):
    from merge_harness.run.experiment import Experiment, plan_jobs

    zoo = make_zoo(tmp_path, tasks=("math", "translate"))
    experiment = Experiment.model_validate({
        "name": "k", "base_model": str(zoo["base"]), "baselines": False,
        "finetunes": {t: {"model": str(zoo[t]), "calibration": str(zoo[f"{t}.jsonl"])}
                      for t in ("math", "translate")},
        "methods": [{"method": "regmean"}],
        "tasks": ["gsm8k_fixture"],
    })
    with pytest.raises(ConfigError, match=r"finetunes\.math\.calibration\.template: .*records no"):
        plan_jobs(experiment)
    assert plan_jobs(experiment, identify=False)  # --dry-run validation reads no model


@pytest.mark.parametrize("template", ["{prompt} {answer} {response}", "{prompt}{response}{0}",
                                      "{prompt {response}"])
def test_a_format_string_with_an_unknown_placeholder_is_refused_before_any_rendering(template):
    with pytest.raises(ConfigError, match="template"):
        check_template(template)


def test_a_finetune_template_error_names_the_yaml_line(tmp_path):
    from merge_harness.train.finetune import load_finetune_config

    path = tmp_path / "ft.yaml"
    path.write_text("base_model: b\ndata: d.jsonl\noutput_dir: out\ntemplate: '{prompt} {x} {response}'\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: template: .*unknown placeholder"):
        load_finetune_config(path)


@pytest.mark.parametrize("response", ["null", "true", "[1]"])
def test_a_row_whose_response_is_not_text_or_a_number_is_a_data_error(tmp_path, response):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "2+2", "response": 4}\n' + f'{{"prompt": "q", "response": {response}}}\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: a row needs"):
        read_jsonl(path)
