"""Fine-tuning: which parameters train, answer-only loss, presets, config errors, saved output."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch

from merge_harness.core.errors import ConfigError
from merge_harness.io.models import torch_threads
from merge_harness.merge.calibration_data import Example
from merge_harness.train.finetune import (
    IGNORE,
    FinetuneConfig,
    TrainingSettings,
    collate,
    encode,
    finetune_from_config,
    load_finetune_config,
    make_optimizer,
    preset_settings,
    token_losses,
    train,
)
from merge_harness.zoo.toymodel import FASTCHAT_SYSTEM, tiny_llama, train_tokenizer
from tests.conftest import state_of

PAIRS = [
    {"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}"}
    for a in range(1, 8)
    for b in range(1, 5)
]
EXAMPLES = [Example(p["prompt"], p["response"]) for p in PAIRS]
ATTN = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.o_proj.")
MLP = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread (and much faster on a busy machine)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"{FASTCHAT_SYSTEM} USER: {p['prompt']} ASSISTANT: {p['response']}" for p in PAIRS]
    return train_tokenizer(corpus * 3, vocab_size=320)


def small_model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=0)


def quick(**overrides) -> TrainingSettings:
    values = dict(max_steps=2, batch_size=8, lr=1e-2, warmup_steps=0, max_length=96)
    return TrainingSettings(**{**values, **overrides})


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


# ------------------------------------------------------------------------------ what trains


@pytest.mark.parametrize(("trainable", "marks"), [("attn_only", ATTN), ("mlp_only", MLP)])
def test_partial_finetuning_changes_only_its_parameters(tokenizer, trainable, marks):
    model = small_model(tokenizer)
    before = copy.deepcopy(model.state_dict())
    train(model, tokenizer, EXAMPLES, quick(trainable=trainable), show_progress=False)
    after = model.state_dict()
    expected = {name for name in before if any(mark in name for mark in marks)}
    assert len(expected) == 2 * len(marks)  # every such projection of both layers
    assert changed(before, after) == expected  # all of them moved, everything else bit-identical


def test_full_finetuning_changes_attention_and_mlp(tokenizer):
    model = small_model(tokenizer)
    before = copy.deepcopy(model.state_dict())
    train(model, tokenizer, EXAMPLES, quick(trainable="full"), show_progress=False)
    moved = changed(before, model.state_dict())
    assert any(".self_attn." in name for name in moved) and any(".mlp." in name for name in moved)
    assert "model.embed_tokens.weight" in moved and "lm_head.weight" in moved


def test_loss_decreases_on_a_toy_task(tokenizer):
    model = small_model(tokenizer)
    losses = train(
        model, tokenizer, EXAMPLES, quick(max_steps=30, lr=5e-3, warmup_steps=3), show_progress=False
    )
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]


def test_gradient_accumulation_matches_one_big_batch(tokenizer):
    models = [small_model(tokenizer), small_model(tokenizer)]
    for model, micro in zip(models, (None, 3)):
        train(model, tokenizer, EXAMPLES[:8], quick(max_steps=1, micro_batch_size=micro), show_progress=False)
    one, split = models[0].state_dict(), models[1].state_dict()
    assert max((one[n] - split[n]).abs().max().item() for n in one) < 1e-5


# ------------------------------------------------------------------------ answer-only labels


@pytest.mark.parametrize("template", ["chat", "fastchat"])
def test_prompt_tokens_are_masked_and_only_answer_tokens_count(tokenizer, template):
    example = EXAMPLES[5]
    ids, labels = encode(example, tokenizer, template, max_length=128)
    answer = [label for label in labels if label != IGNORE]
    assert labels[: len(labels) - len(answer)] == [IGNORE] * (len(labels) - len(answer))
    assert tokenizer.decode(answer) == f" {example.response}</s>"
    assert "ASSISTANT" in tokenizer.decode(ids[: len(ids) - len(answer)])

    # the loss is the cross-entropy of exactly those tokens, whatever the prompt's logits say
    model = small_model(tokenizer)
    batch = collate([(ids, labels)], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    start = len(ids) - len(answer) - 1
    manual = torch.nn.functional.cross_entropy(logits[start:], torch.tensor(answer), reduction="sum")
    assert torch.allclose(token_losses(model, batch), manual, atol=1e-5)


def test_collate_pads_labels_with_ignore(tokenizer):
    rows = [encode(e, tokenizer, "chat", 128) for e in EXAMPLES[:2] + [Example("hi", "a")]]
    batch = collate(rows, tokenizer.pad_token_id)
    short = len(rows[2][0])
    assert (batch["labels"][2, short:] == IGNORE).all() and (batch["attention_mask"][2, short:] == 0).all()


# ----------------------------------------------------------------------------- presets, config


def test_presets_carry_the_papers_values():
    slta = preset_settings("slta")
    assert (slta.epochs, slta.batch_size, slta.lr, slta.trainable) == (3, 128, 2e-5, "full")
    paper = preset_settings("attn_only_paper")
    assert (paper.max_steps, paper.batch_size, paper.lr, paper.warmup_steps, paper.schedule) == (
        2000,
        128,
        1e-5,
        200,
        "cosine",
    )
    assert paper.trainable == "attn_only" and paper.epochs is None


def test_config_fields_override_the_preset():
    config = FinetuneConfig(
        base_model="b", data="d.jsonl", output_dir="o", preset="attn_only_paper", lr=3e-5, epochs=2
    )
    settings = config.settings()
    assert (settings.lr, settings.epochs, settings.max_steps) == (3e-5, 2, None)
    assert (settings.batch_size, settings.warmup_steps, settings.trainable) == (128, 200, "attn_only")


def test_cosine_schedule_warms_up_then_decays():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    settings = TrainingSettings(max_steps=20, lr=1.0, warmup_steps=5)
    optimizer, scheduler = make_optimizer([("w", param)], settings, total=20)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in zip(rates[5:], rates[6:])) and rates[-1] < 0.02


def write_config(path, body: str):
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("base_model: b\ndata: d.jsonl\noutput_dir: o\nlr: -1\n", "ft.yaml:4: lr:"),
        (
            "base_model: b\ndata: d.jsonl\noutput_dir: o\npreset: slta\nlearning_rate: 1\n",
            "ft.yaml:5: learning_rate:",
        ),
        ("base_model: b\ndata: d.jsonl\noutput_dir: o\ntrainable: attention\n", "ft.yaml:4: trainable:"),
        ("base_model: b\noutput_dir: o\n", "ft.yaml:1: data:"),
    ],
)
def test_bad_config_names_file_line_and_field(tmp_path, body, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_finetune_config(write_config(tmp_path / "ft.yaml", body))


def test_finetune_from_config_writes_a_loadable_model(tmp_path, tokenizer):
    base = small_model(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    config = write_config(
        tmp_path / "ft.yaml",
        """\
        base_model: base
        data: train.jsonl
        output_dir: out/attn
        preset: attn_only_paper
        max_steps: 2
        batch_size: 8
        lr: 0.01
        warmup_steps: 0
        device: cpu
    """,
    )
    out = finetune_from_config(config, show_progress=False)
    assert out == tmp_path / "out" / "attn" and not list(out.parent.glob(".*tmp*"))
    before, after = state_of(tmp_path / "base"), state_of(out)
    assert changed(before, after) == {n for n in before if any(m in n for m in ATTN)}
    record = json.loads((out / "finetune.json").read_text())
    assert record["settings"]["trainable"] == "attn_only" and len(record["losses"]) == 2
    assert (out / "tokenizer.json").is_file()


def test_prompt_and_answer_are_tokenized_apart_so_no_token_straddles_them():
    corpus = ['def f(a):\n    """Add one."""\n\n    return a + 1\n'] * 200
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    example = Example('def g(b):\n    """Add one."""\n', "\n    return b + 1")
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    joined = tokenizer(example.prompt + example.response, add_special_tokens=False)["input_ids"]
    assert len(joined) < len(prompt_ids) + len(answer_ids)  # this BPE joins "\n" + "\n    ": the case

    ids, labels = encode(example, tokenizer, "plain", max_length=128)
    assert ids[: len(prompt_ids)] == prompt_ids  # exactly what generation continues from
    assert labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    answer = [token for token in labels if token != IGNORE]
    assert tokenizer.decode(answer) == example.response + tokenizer.eos_token  # newline and indent learnt
    truncated, truncated_labels = encode(example, tokenizer, "plain", max_length=len(prompt_ids) + 1)
    assert len(truncated) == len(truncated_labels) == len(prompt_ids) + 1
