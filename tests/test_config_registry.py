"""Config parsing (ours and mergekit's), parameter resolution, the registry and entry-point plugins."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from merge_harness.core.errors import ConfigError, MethodError
from merge_harness.core.registry import Registry
from merge_harness.merge.config import Condition, MergeConfig, load_merge_config
from merge_harness.merge.parameters import evaluate_setting, gradient_position


def test_our_format_and_mergekit_format_parse_to_the_same_method(tmp_path):
    ours = MergeConfig.model_validate({"method": "ties", "models": [{"model": "a"}]})
    theirs = MergeConfig.model_validate({"merge_method": "ties", "models": [{"model": "a"}]})
    assert ours.method == theirs.method == "ties"
    assert theirs.mergekit_compat and not ours.mergekit_compat


def test_unsupported_mergekit_keys_are_named(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("merge_method: slerp\nslices:\n  - sources: []\n")
    with pytest.raises(ConfigError, match=r"m\.yaml.*slices"):
        load_merge_config(path)


def test_errors_carry_file_line_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            method: ties
            models:
              - model: a
              - model: b
                parameters:
                  weight: {nested: true}
            """
        )
    )
    with pytest.raises(ConfigError, match=r"bad\.yaml:6: models\[1\]\.parameters\.weight"):
        load_merge_config(path)


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: ties\nmodels: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_merge_config(path)


def test_relative_model_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    path = tmp_path / "merge.yaml"
    path.write_text("method: task_arithmetic\nbase_model: models/base\nmodels:\n  - model: org/hub-id\n")
    config = load_merge_config(path)
    assert config.base_model == str(tmp_path / "models" / "base")
    assert config.models[0].model == "org/hub-id"  # not a local path: left for the hub resolver


def test_filters_pick_the_first_matching_condition():
    setting = [
        Condition(filter="self_attn", value=0.1),
        Condition(filter="mlp", value=0.2),
        Condition(value=0.3),
    ]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.2
    assert evaluate_setting(setting, "model.norm.weight", 0) == 0.3
    assert evaluate_setting([Condition(filter="mlp", value=1.0)], "lm_head.weight", 0) is None


def test_gradients_interpolate_over_layers():
    assert gradient_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert gradient_position("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert gradient_position("model.layers.1.mlp.up_proj.weight", 5) == 0.25
    assert gradient_position("model.embed_tokens.weight", 5) == 0.0
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)


def test_registry_refuses_duplicates_and_suggests_names():
    registry: Registry[int] = Registry("thing", MethodError)
    registry.register("task_arithmetic", 1)
    with pytest.raises(MethodError, match="registered twice"):
        registry.register("task_arithmetic", 2)
    with pytest.raises(MethodError, match="did you mean 'task_arithmetic'"):
        registry.get("task_arithmetc")


def write_plugin(root, module_body: str, name: str = "demo_plugin") -> None:
    """A real installed-distribution layout: a module plus a dist-info with entry_points.txt."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_body))
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[merge_harness.methods]\n{name} = {name}:register\n")


PLUGIN = """
    import torch
    from merge_harness.merges.base import MergeMethod

    def first_model(base, tensors, model_params, params, generator):
        return tensors[0].clone()

    def register(registry):
        registry.register("first_model", MergeMethod(
            name="first_model", description="take the first model", paper="-", equation="theta_1",
            merge_tensor=first_model))
"""


def test_entry_point_plugins_register_through_the_same_function(tmp_path, monkeypatch):
    from merge_harness.merge.methods import ENTRY_POINT_GROUP
    from merge_harness.merges.base import MergeMethod

    write_plugin(tmp_path, PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry: Registry[MergeMethod] = Registry("merge method", MethodError, ENTRY_POINT_GROUP)
    registry.load_entry_points()
    method = registry.get("first_model")
    out = method.merge_tensor(None, [torch.ones(2)], [], None, torch.Generator())
    assert torch.equal(out, torch.ones(2))
    sys.modules.pop("demo_plugin", None)


def test_a_broken_plugin_is_named(tmp_path, monkeypatch):
    from merge_harness.merge.methods import ENTRY_POINT_GROUP

    write_plugin(tmp_path, "def register(registry):\n    raise KeyError('oops')\n", name="broken_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry: Registry[object] = Registry("merge method", MethodError, ENTRY_POINT_GROUP)
    with pytest.raises(MethodError, match="plugin 'broken_plugin'"):
        registry.load_entry_points()
    sys.modules.pop("broken_plugin", None)


def test_the_shipped_plugin_example_registers(monkeypatch):
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "plugin"
    monkeypatch.syspath_prepend(str(example))
    from merge_harness_example_plugin import register

    registry: Registry[object] = Registry("merge method", MethodError)
    register(registry)
    method = registry.get("task_median")
    base = torch.zeros(3)
    finetunes = [torch.ones(3), 2 * torch.ones(3), 9 * torch.ones(3)]
    out = method.merge_tensor(base, finetunes, [], method.params(), torch.Generator())
    assert torch.allclose(out, torch.full((3,), 2.0))


def test_docs_methods_table_is_generated_from_the_registry():
    from pathlib import Path

    from merge_harness.cli.app import methods_markdown

    text = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert methods_markdown() in text, "regenerate with: merge-harness methods --markdown"
