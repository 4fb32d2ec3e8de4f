"""mergekit's own example configs (tests/mergekit_examples/) merge here as they do in mergekit.

Each config's model names map to tiny 8-layer Llama checkpoints written here, and its layer
ranges (13B models, 40 layers) scale to 8 layers. Then mergekit's `run_merge` and our engine
merge the same config:
- with `dtype: float32`, every tensor agrees to 1e-5 and the output config (layer count of a
  frankenmerge included) is mergekit's;
- with the config's own dtype (float16 / bfloat16), mergekit computes in that dtype while we
  compute in float32 and round once (a documented deviation, docs/methods.md), so our tensors
  equal mergekit's float32 result rounded to that dtype, to one unit in the last place.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_state_dict
from tests.conftest import state_of, write_llama

mergekit = pytest.importorskip("mergekit", reason="mergekit is the reference (extra 'dev')")
from tests.test_mergekit_agreement import run_mergekit  # noqa: E402

EXAMPLES = sorted((Path(__file__).parent / "mergekit_examples").glob("*.yml"))
LAYERS, EXAMPLE_LAYERS = 8, 40
MODELS = {  # the examples' model ids -> our checkpoints
    "TheBloke/Llama-2-13B-fp16": "base",
    "mistralai/Mistral-7B-v0.1": "base",
    "psmathur/orca_mini_v3_13b": "ft0",
    "mistralai/Mistral-7B-Instruct-v0.2": "ft0",
    "model_a": "ft0",
    "garage-bAInd/Platypus2-13B": "ft1",
    "BioMistral/BioMistral-7B": "ft1",
    "model_b": "ft1",
    "WizardLM/WizardLM-13B-V1.2": "ft2",
    "WizardLM/WizardMath-13B-V1.0": "ft2",
}
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 0.0}


@pytest.fixture(scope="module")
def deep_zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deep_zoo")
    base = write_llama(root / "base", seed=0, num_hidden_layers=LAYERS)
    zoo = {"base": base}
    for index in range(3):
        zoo[f"ft{index}"] = write_llama(root / f"ft{index}", seed=index + 1, base=state_of(base),
                                        num_hidden_layers=LAYERS)
    return zoo


def on_tiny_models(example: Path, zoo: dict[str, Path]) -> dict:
    """The example with our checkpoints for its models and its layer ranges scaled to ours."""
    config = yaml.safe_load(example.read_text())

    def rewrite(node):
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            if "layer_range" in out:
                out["layer_range"] = [round(v * LAYERS / EXAMPLE_LAYERS) for v in node["layer_range"]]
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return str(zoo[MODELS[node]]) if isinstance(node, str) and node in MODELS else node

    return rewrite(config)


def ours(config: dict):
    return merge_state_dict(MergeConfig.model_validate(config))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_a_mergekit_example_merges_as_mergekit_merges_it(example, deep_zoo, tmp_path):
    config = {**on_tiny_models(example, deep_zoo), "dtype": "float32"}
    theirs = run_mergekit(config, tmp_path / "mergekit")
    outcome = ours(config)
    assert set(outcome.state) == set(theirs)
    worst = max((outcome.state[n] - theirs[n]).abs().max().item() for n in theirs)
    assert worst <= 1e-5, f"max abs diff {worst:.3g}"
    written = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert outcome.model_config["num_hidden_layers"] == written["num_hidden_layers"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_in_the_example_dtype_we_round_mergekit_float32_result_once(example, deep_zoo, tmp_path):
    config = on_tiny_models(example, deep_zoo)
    dtype = getattr(torch, config["dtype"])
    theirs32 = run_mergekit({**config, "dtype": "float32"}, tmp_path / "mergekit")
    state = ours(config).state
    for name, expected in theirs32.items():
        assert state[name].dtype == dtype
        rounded = expected.to(dtype).float()
        allowed = EPS[dtype] * rounded.abs() + 1e-6  # one unit in the last place of `dtype`
        assert ((state[name].float() - rounded).abs() <= allowed).all(), name


def test_a_passthrough_frankenmerge_stacks_the_layers_it_names(deep_zoo):
    """orcamini-platy-44layer on 8 layers: ft0 layers 0-4, then ft1 layers 4-7: 9 layers."""
    config = on_tiny_models(next(e for e in EXAMPLES if "44layer" in e.stem), deep_zoo)
    outcome = ours({**config, "dtype": "float32"})
    first, second = state_of(deep_zoo["ft0"]), state_of(deep_zoo["ft1"])
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert outcome.model_config["num_hidden_layers"] == 9
    for out_layer, (source, in_layer) in enumerate([*((first, i) for i in range(5)),
                                                     *((second, i) for i in range(4, 8))]):
        assert torch.equal(outcome.state[name.format(out_layer)], source[name.format(in_layer)])
    assert torch.equal(outcome.state["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(outcome.state["lm_head.weight"], second["lm_head.weight"])


def test_a_layer_repeated_in_two_slices_is_copied_into_both(deep_zoo):
    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(deep_zoo["ft0"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(deep_zoo["ft0"]), "layer_range": [2, 4]}]},
    ]}
    outcome = ours(config)
    name = "model.layers.{}.mlp.down_proj.weight"
    assert outcome.model_config["num_hidden_layers"] == 5
    assert torch.equal(outcome.state[name.format(2)], outcome.state[name.format(3)])


def test_source_parameters_beat_slice_parameters_beat_merge_parameters(deep_zoo, tmp_path):
    """mergekit's precedence, and a filter that matches nothing falls through to the next level."""
    zoo = deep_zoo
    config = {
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "dtype": "float32",
        "parameters": {"weight": 0.1, "lambda": 0.9},
        "slices": [{
            "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]},
            "sources": [
                {"model": str(zoo["base"]), "layer_range": [0, 8]},
                {"model": str(zoo["ft0"]), "layer_range": [0, 8], "parameters": {"weight": 0.7}},
                {"model": str(zoo["ft1"]), "layer_range": [0, 8],
                 "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}]}},
            ],
        }],
    }
    theirs = run_mergekit(config, tmp_path / "mergekit")
    state = ours(config).state
    assert max((state[n] - theirs[n]).abs().max().item() for n in theirs) <= 1e-5


def test_a_slice_whose_sources_differ_in_depth_is_refused_with_its_field():
    with pytest.raises(ValueError, match="same number of layers"):
        MergeConfig.model_validate({"merge_method": "slerp", "slices": [{"sources": [
            {"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 5]}]}]})


# ------------------------------------------------------------------------ mergekit-yaml habits


def cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "merge_harness", "merge", *args], capture_output=True,
                          text=True, timeout=300)


def example_yaml(deep_zoo, tmp_path: Path, stem: str, **changes) -> Path:
    config = {**on_tiny_models(next(e for e in EXAMPLES if e.stem == stem), deep_zoo), **changes}
    path = tmp_path / f"{stem}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_output_carries_the_config_and_a_model_card_as_mergekit_writes_them(deep_zoo, tmp_path):
    config = example_yaml(deep_zoo, tmp_path, "ties")
    done = cli(str(config), str(tmp_path / "out"), "--quiet")
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    given = yaml.safe_load(config.read_text())
    assert MergeConfig.model_validate(written) == MergeConfig.model_validate(given)
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["tags"] == ["merge", "merge-harness"] and front["library_name"] == "transformers"
    assert "`ties` method" in card and str(deep_zoo["base"]) in card and str(deep_zoo["ft2"]) in card
    assert "note: parameters.int8_mask: no effect" in done.stderr  # accepted, and said so


def test_mergekit_yaml_options_are_accepted_or_refused_in_one_line(deep_zoo, tmp_path):
    config = example_yaml(deep_zoo, tmp_path, "linear")
    done = cli(str(config), str(tmp_path / "a"), "--quiet", "--out-shard-size", "1K", "--lazy-unpickle",
               "--random-seed", "3", "--no-copy-tokenizer", "--no-write-model-card", "--allow-crimes")
    assert done.returncode == 0, done.stderr
    assert "--lazy-unpickle: accepted, no effect" in done.stderr
    assert len(list((tmp_path / "a").glob("*.safetensors"))) > 1  # 1K-byte shards: many files
    assert not (tmp_path / "a" / "README.md").exists()
    refused = cli(str(config), str(tmp_path / "b"), "--trust-remote-code")
    assert refused.returncode == 2 and not (tmp_path / "b").exists()
    assert refused.stderr.strip().splitlines() == [
        "error: --trust-remote-code: not supported by merge-harness (remote code is never run)"]


def test_a_union_of_one_tokenizer_is_that_tokenizer_and_of_two_their_union(chat_zoo, tmp_path, monkeypatch):
    """(tests/test_mergekit_tokenizer.py compares unions of different vocabularies with mergekit's.)"""
    from transformers import AutoTokenizer

    from merge_harness.merge import vocabulary
    from merge_harness.zoo.toymodel import train_tokenizer

    monkeypatch.setattr(vocabulary, "TOKENIZER_CACHE", tmp_path / "cache")
    other = tmp_path / "other"
    import shutil

    shutil.copytree(chat_zoo["qa"], other)
    train_tokenizer(["entirely different words here"] * 20, vocab_size=120).save_pretrained(other)
    base = {"merge_method": "task_arithmetic", "base_model": str(chat_zoo["base"]),
            "tokenizer_source": "union"}
    same = {**base, "models": [{"model": str(chat_zoo["math"])}, {"model": str(chat_zoo["qa"])}]}
    assert ours(same).tokenizer_dir == chat_zoo["base"]
    union = ours({**base, "models": [{"model": str(chat_zoo["math"])}, {"model": str(other)}]})
    vocabs = [set(AutoTokenizer.from_pretrained(d).get_vocab()) for d in (chat_zoo["base"], other)]
    assert set(AutoTokenizer.from_pretrained(union.tokenizer_dir).get_vocab()) == vocabs[0] | vocabs[1]
    assert union.state["model.embed_tokens.weight"].shape[0] == len(vocabs[0] | vocabs[1])


def test_chat_template_auto_takes_the_inputs_template_and_jinja_is_written_as_given(chat_zoo, tmp_path):
    from transformers import AutoTokenizer

    models = [{"model": str(chat_zoo["math"])}, {"model": str(chat_zoo["qa"])}]
    for template in ("auto", "{% for m in messages %}{{ m['content'] }}{% endfor %}"):
        path = tmp_path / "merge.yml"
        path.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, "chat_template": template,
                                        "parameters": {"weight": 1.0}}))
        out = tmp_path / f"out-{len(template)}"
        done = cli(str(path), str(out), "--quiet")
        assert done.returncode == 0, done.stderr
        expected = template
        if template == "auto":
            expected = AutoTokenizer.from_pretrained(chat_zoo["math"]).chat_template
        assert AutoTokenizer.from_pretrained(out).chat_template == expected
