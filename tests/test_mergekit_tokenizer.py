"""Merging models with different vocabularies agrees with mergekit (`tokenizer_source:` /
`tokenizer: {source, tokens, pad_to_multiple_of}`), and `chat_template:` names resolve to
mergekit's bundled templates.

Tiny Llama checkpoints get their own small word-level tokenizers: the base's; one that inserts a
word (shifting ids) and adds a special token; one with the base's words in reverse order and
embedding rows padded beyond its vocabulary; one that lacks a word and adds three. mergekit's
`run_merge` and our `merge_to_disk` merge the same config; the output vocabularies must be
equal, config.json's vocab_size too, and every tensor must agree to 1e-5 in float32.

Where a model brings more than one new token, mergekit's ids of the new tokens follow Python's
set order and a Rust hash map's, which change from run to run (ours are in id order); there the
vocabularies are compared as sets and the embedding rows by token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from merge_harness.core.errors import ConfigError
from merge_harness.io.models import torch_threads
from merge_harness.merge import vocabulary
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_state_dict, merge_to_disk, row_blocks
from merge_harness.merge.plan import build_plan
from tests.conftest import TINY_LLAMA, state_of

mergekit = pytest.importorskip("mergekit", reason="mergekit is the reference (extra 'dev')")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "big", "red"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(autouse=True)
def one_thread_and_a_private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(vocabulary, "TOKENIZER_CACHE", tmp_path / "tokenizer-cache")
    with torch_threads(1):
        yield


def word_tokenizer(words: list[str], specials: tuple[str, ...] = ()):
    """A word-level fast tokenizer: <unk>, the words, <s>, </s>, then `specials` (added, special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    if specials:
        tokenizer.add_tokens(list(specials), special_tokens=True)
    return tokenizer


def write_model(path: Path, tokenizer, seed: int, base: Path | None = None, tied: bool = False,
                rows: int | None = None) -> Path:
    """A tiny Llama with `tokenizer`; with `base`, a 'fine-tune' of it: base + noise, each shared
    token's embedding rows starting from the base's rows of that token."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": rows or len(vocab), "tie_word_embeddings": tied})
    model = LlamaForCausalLM(config)
    if base is not None:
        base_state, base_vocab = state_of(base), AutoTokenizer.from_pretrained(base).get_vocab()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in VOCAB_TENSORS:
                    for token, index in vocab.items():
                        if token in base_vocab:
                            param[index] = base_state[name][base_vocab[token]]
                else:
                    param.copy_(base_state[name])
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_zoo(root: Path, tied: bool) -> dict[str, Path]:
    base = write_model(root / "base", word_tokenizer(WORDS), 0, tied=tied)
    shifted = [*WORDS[:3], "bird", *WORDS[3:]]
    lacking = [w for w in WORDS if w != "mat"] + ["fish", "bird", "sky"]
    zoo = {"base": base,
           "ft0": write_model(root / "ft0", word_tokenizer(shifted, ("<tool>",)), 1, base, tied),
           "ft1": write_model(root / "ft1", word_tokenizer(WORDS[::-1]), 2, base, tied, rows=16),
           "ft2": write_model(root / "ft2", word_tokenizer(lacking), 3, base, tied)}
    zoo["ext"] = root / "ext"  # a tokenizer only: the base's words and one no model has
    word_tokenizer([*WORDS, "xyz"]).save_pretrained(zoo["ext"])
    zoo["bare"] = root / "bare"  # weights without a tokenizer: taken to have the base's ids
    zoo["bare"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(zoo["ft2"] / name, zoo["bare"] / name)
    return zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    with torch_threads(1):
        return write_zoo(tmp_path_factory.mktemp("vocab_zoo"), tied=False)


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory) -> dict[str, Path]:
    with torch_threads(1):
        return write_zoo(tmp_path_factory.mktemp("tied_vocab_zoo"), tied=True)


def models(zoo, names, **parameters) -> list[dict]:
    return [{"model": str(zoo[n]), **({"parameters": parameters[n]} if n in parameters else {})}
            for n in names]


def case_config(case: str, zoo: dict[str, Path]) -> tuple[dict, bool]:
    """(mergekit-format config, whether mergekit's token ids are deterministic for it)."""
    base = {"base_model": str(zoo["base"]), "dtype": "float32"}
    two = models(zoo, ["ft0", "ft1"], ft0={"weight": 0.5}, ft1={"weight": 0.7})
    if case == "union_task_arithmetic":
        return {**base, "merge_method": "task_arithmetic", "models": two, "tokenizer_source": "union"}, True
    if case == "union_ties_tokens_pad":
        dense = models(zoo, ["ft0", "ft1"], ft0={"weight": 0.6, "density": 0.5},
                       ft1={"weight": 0.4, "density": 0.7})
        tokens = {
            "<new>": {"source": {"kind": "zero"}},
            "cat": {"source": str(zoo["ft0"]), "force": True},
            "<pad>": {"source": {"kind": "model_token", "model": str(zoo["base"]), "token": "dog"}},
            "red": {"source": {"kind": "model_token", "model": str(zoo["ft1"]), "token_id": 2},
                    "force": True},
            "bird": {"source": str(zoo["ft0"])},
        }
        tokenizer = {"source": "union", "tokens": tokens, "pad_to_multiple_of": 6}
        return {**base, "merge_method": "ties", "models": dense, "tokenizer": tokenizer}, True
    if case == "union_three_new_tokens":
        three = models(zoo, ["ft0", "ft2"], ft0={"weight": 0.5}, ft2={"weight": 0.8})
        return {**base, "merge_method": "task_arithmetic", "models": three, "tokenizer_source": "union",
                "parameters": {"lambda": 0.9}}, False
    if case == "base_ties":
        dense = models(zoo, ["ft0", "ft1", "ft2"], ft0={"weight": 0.5, "density": 0.5},
                       ft1={"weight": 0.3, "density": 0.5}, ft2={"weight": 0.4, "density": 0.6})
        return {**base, "merge_method": "ties", "models": dense, "tokenizer": {"source": "base"}}, True
    if case == "path_linear":
        linear = models(zoo, ["ft0", "ft1"], ft0={"weight": 1.0}, ft1={"weight": 3.0})
        return {"merge_method": "linear", "dtype": "float32", "models": linear,
                "tokenizer_source": str(zoo["ext"])}, True
    if case == "union_model_without_tokenizer":
        bare = models(zoo, ["ft0", "bare"], ft0={"weight": 0.5}, bare={"weight": 0.5})
        return {**base, "merge_method": "task_arithmetic", "models": bare, "tokenizer_source": "union"}, True
    if case == "slices_task_arithmetic":
        weights = {"base": {}, "ft0": {"parameters": {"weight": 0.5}}, "ft1": {"parameters": {"weight": 0.7}}}
        sources = [{"model": str(zoo[n]), "layer_range": [0, 2], **p} for n, p in weights.items()]
        return {**base, "merge_method": "task_arithmetic", "slices": [{"sources": sources}],
                "tokenizer_source": "union"}, True
    raise KeyError(case)


def run_mergekit(config: dict, out: Path) -> Path:
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(quiet=True, copy_tokenizer=True, write_model_card=False))
    return out


def vocab_of(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def worst_difference(ours: Path, theirs: Path) -> float:
    """Max abs difference over every tensor, rows of vocabulary tensors matched by token."""
    ours_vocab, theirs_vocab = vocab_of(ours), vocab_of(theirs)
    order = sorted(theirs_vocab, key=theirs_vocab.__getitem__)
    ours_state, theirs_state = state_of(ours), state_of(theirs)
    assert set(ours_state) == set(theirs_state)
    worst = 0.0
    for name, expected in theirs_state.items():
        got = ours_state[name]
        assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape, name
        if name in VOCAB_TENSORS:
            rows = [ours_vocab[t] for t in order] + list(range(len(order), got.shape[0]))
            got = got[rows]
        worst = max(worst, (got - expected).abs().max().item())
    return worst


CASES = ["union_task_arithmetic", "union_ties_tokens_pad", "union_three_new_tokens", "base_ties",
         "path_linear", "union_model_without_tokenizer", "slices_task_arithmetic"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", CASES)
def test_a_merge_of_different_vocabularies_agrees_with_mergekit(case, tied, zoo, tied_zoo, tmp_path):
    models_here = tied_zoo if tied else zoo
    config, deterministic = case_config(case, models_here)
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = merge_to_disk(MergeConfig.model_validate(config), tmp_path / "ours", show_progress=False).out_dir
    ours_vocab, theirs_vocab = vocab_of(ours), vocab_of(theirs)
    assert set(ours_vocab) == set(theirs_vocab)
    if deterministic:
        assert ours_vocab == theirs_vocab
    base_vocab = vocab_of(models_here["base"])
    assert all(ours_vocab[t] == theirs_vocab[t] for t in base_vocab if t in theirs_vocab)  # the base's stay
    sizes = [json.loads((d / "config.json").read_text())["vocab_size"] for d in (ours, theirs)]
    assert sizes[0] == sizes[1] == state_of(ours)["model.embed_tokens.weight"].shape[0]
    worst = worst_difference(ours, theirs)
    assert worst <= 1e-5, f"max abs diff {worst:.3g}"
    assert ("lm_head.weight" in state_of(ours)) is not tied


def test_the_rules_are_exercised_where_mergekit_has_them(zoo):
    """A union's plan: a token two fine-tunes bring is their mean in the base, one that one brings
    is its copy, one that a fine-tune lacks is the base's; embedding tensors are read whole."""
    config, _ = case_config("union_three_new_tokens", zoo)
    plan = build_plan(MergeConfig.model_validate(config))
    embed = next(t for t in plan.tasks if t.info.name == "model.embed_tokens.weight")
    tokens = plan.vocabulary.tokens
    by_model = {s.checkpoint.path.name: s.vocabulary for s in (embed.base, *embed.sources)}
    fills = {tokens[f.row]: f for f in by_model["base"].fills}
    assert {"bird", "fish", "sky", "<tool>"} <= set(fills)
    assert len(fills["bird"].sources) == 2  # in ft0 and ft2, not in the base: their mean
    assert [r.checkpoint.path.name for r in fills["fish"].sources] == ["ft2"]  # one donor
    (mat,) = [f for f in by_model["ft2"].fills if tokens[f.row] == "mat"]
    assert [r.checkpoint.path.name for r in mat.sources] == ["base"]  # the base has it
    assert row_blocks(plan, embed) == [None]
    assert plan.out_config["vocab_size"] == len(tokens)


def test_token_sources_in_a_config_file_are_relative_to_it(zoo, tmp_path):
    from merge_harness.merge.config import load_merge_config

    path = zoo["base"].parent / "merge.yml"
    path.write_text(json.dumps({
        "merge_method": "task_arithmetic", "base_model": "./base", "models": [{"model": "./ft0"}],
        "tokenizer": {"tokens": {
            "bird": {"source": "./ft0"},
            "<y>": {"source": {"kind": "model_token", "model": "./base", "token": "cat"}}}},
    }))
    plan = build_plan(load_merge_config(path))
    embed = next(t for t in plan.tasks if t.info.name == "model.embed_tokens.weight")
    tokens = plan.vocabulary.tokens
    fills = {tokens[f.row]: f.sources for f in embed.base.vocabulary.fills}
    assert [(r.checkpoint.path, r.row) for r in fills["<y>"]] == [(zoo["base"], vocab_of(zoo["base"])["cat"])]
    assert [(r.checkpoint.path, r.row) for r in fills["bird"]] == [(zoo["ft0"], vocab_of(zoo["ft0"])["bird"])]


def test_in_memory_merges_come_with_the_merged_tokenizer(zoo):
    config, _ = case_config("union_task_arithmetic", zoo)
    outcome = merge_state_dict(MergeConfig.model_validate(config))
    vocab = vocab_of(outcome.tokenizer_dir)
    rows = outcome.state["model.embed_tokens.weight"].shape[0]
    assert rows == len(vocab) == outcome.model_config["vocab_size"]
    assert outcome.tokenizer_dir.parent == vocabulary.TOKENIZER_CACHE
    again = merge_state_dict(MergeConfig.model_validate(config))
    assert again.tokenizer_dir == outcome.tokenizer_dir  # one cache entry per merged tokenizer


def test_a_tokenizer_source_of_identical_vocabularies_is_copied(zoo, tmp_path):
    """Every input has the base's tokenizer and rows: the output's is the base's, its files copied,
    and no tensor is laid out anew."""
    same = shutil.copytree(zoo["base"], tmp_path / "same")
    config = {"merge_method": "linear", "base_model": str(zoo["base"]), "tokenizer_source": "union",
              "models": [{"model": str(zoo["base"])}, {"model": str(same)}]}
    plan = build_plan(MergeConfig.model_validate(config))
    assert plan.sidecar_source == zoo["base"]
    assert all(s.vocabulary is None for t in plan.tasks for s in t.sources)


# ---------------------------------------------------------------------------------- chat templates


def test_named_chat_templates_are_mergekits_bundled_ones(zoo, tmp_path):
    import importlib.resources

    from mergekit._data import chat_templates

    from merge_harness.merge.output_files import bundled_chat_templates, resolve_chat_template

    theirs = {p.name.removesuffix(".jinja") for p in importlib.resources.files(chat_templates).iterdir()
              if p.name.endswith(".jinja")}
    assert set(bundled_chat_templates()) == theirs == {"alpaca", "chatml", "exaone", "llama3", "mistral"}
    for name in theirs:
        text = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
        config = MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": "m"}],
                                             "chat_template": name})
        assert resolve_chat_template(config) == text


def test_a_named_chat_template_renders_as_in_mergekits_output(zoo, tmp_path):
    from transformers import AutoTokenizer

    config, _ = case_config("union_task_arithmetic", zoo)
    config = {**config, "chat_template": "chatml"}
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = merge_to_disk(MergeConfig.model_validate(config), tmp_path / "ours", show_progress=False).out_dir
    chat = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"}]
    rendered = [AutoTokenizer.from_pretrained(d).apply_chat_template(chat, tokenize=False,
                                                                     add_generation_prompt=True)
                for d in (ours, theirs)]
    assert rendered[0] == rendered[1] and rendered[0].startswith("<|im_start|>user\nthe cat sat<|im_end|>")


# -------------------------------------------------------------------------------------- bad input


def refused(config: dict, out: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        merge_to_disk(MergeConfig.model_validate(config), out, show_progress=False)
    assert not out.exists()  # nothing half-written
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("bad, expected", [
    ({"chat_template": "chatlm"}, "chat_template: 'chatlm' is neither a bundled template (alpaca, chatml, "
     "exaone, llama3, mistral), `auto` nor a Jinja template (did you mean 'chatml'?)"),
    ({"tokenizer": {"tokens": {"zz": {"source": "./not-merged"}}}},
     "tokenizer.tokens['zz'].source: ./not-merged is not one of the merged models"),
    ({"tokenizer": {"tokens": {"zz": {"source": {"kind": "model_token", "model": "BASE", "token": "owl"}}}}},
     "tokenizer.tokens['zz'].source: BASE's tokenizer has no token 'owl'"),
    ({"tokenizer": {"tokens": {"zz": {"source": {"kind": "model_token", "model": "BASE", "token_id": 99}}}}},
     "tokenizer.tokens['zz'].source: token id 99 is out of range for BASE (12 rows)"),
    ({"tokenizer": {"tokens": {"zz": {}}}},
     "tokenizer.tokens['zz'].source: FT0 lacks it, so its rows need a source"),
    ({"tokenizer": {"tokens": {"bird": {"source": "BASE"}}}},
     "tokenizer.tokens['bird'].source: BASE has no token 'bird'"),
])
def test_bad_tokenizer_settings_are_refused_in_one_line_naming_the_field(bad, expected, zoo, tmp_path):
    config, _ = case_config("union_task_arithmetic", zoo)
    if "tokenizer" in bad:
        del config["tokenizer_source"]

    def named(text: str) -> str:
        return text.replace("BASE", str(zoo["base"])).replace("FT0", str(zoo["ft0"]))

    message = refused(json.loads(named(json.dumps({**config, **bad}))), tmp_path / "out")
    assert message.startswith(named(expected)), message


def test_a_union_without_any_tokenizer_and_a_model_level_method_are_refused(tiny_zoo, zoo, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
              "models": [{"model": str(tiny_zoo["ft0"])}], "tokenizer_source": "union"}
    assert "tokenizer_source: the base" in refused(config, tmp_path / "a")
    calibrated = {"merge_method": "regmean", "base_model": str(zoo["base"]), "tokenizer_source": "union",
                  "models": [{"model": str(zoo["ft0"]), "calibration": "x.jsonl"}]}
    with pytest.raises(ConfigError, match="tokenizer_source: the inputs' vocabularies differ .* 'regmean'"):
        build_plan(MergeConfig.model_validate(calibrated))


def test_without_a_tokenizer_source_different_vocabularies_say_how_to_merge_them(zoo):
    from merge_harness.core.errors import CheckpointError

    config, _ = case_config("union_task_arithmetic", zoo)
    del config["tokenizer_source"]
    with pytest.raises(CheckpointError, match=r"different vocabularies: set tokenizer_source: union"):
        build_plan(MergeConfig.model_validate(config))


def test_no_copy_tokenizer_still_writes_a_merged_vocabularys_tokenizer(zoo, tmp_path):
    config, _ = case_config("union_task_arithmetic", zoo)
    outcome = merge_to_disk(MergeConfig.model_validate(config), tmp_path / "ours", show_progress=False,
                            copy_tokenizer=False)
    assert (outcome.out_dir / "tokenizer.json").exists()  # the weights' new vocabulary needs it (mergekit)
    assert any("--no-copy-tokenizer" in note for note in outcome.notes)
    same = {"merge_method": "linear", "models": [{"model": str(zoo["base"]), "parameters": {"weight": 1.0}}]}
    plain = merge_to_disk(MergeConfig.model_validate(same), tmp_path / "plain", show_progress=False,
                          copy_tokenizer=False)
    assert not (plain.out_dir / "tokenizer.json").exists()
