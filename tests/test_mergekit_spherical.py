"""The spherical family beyond slerp (nuslerp, multislerp, karcher): agreement with mergekit and
hand-computed properties.

End to end, mergekit's `run_merge` and our engine merge the tiny Llama checkpoints of `tiny_zoo`
from the same mergekit-format config, and every tensor must agree to 1e-5 in float32. Then each
method's tensor function is checked on cases small enough to compute by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from merge_harness.core.errors import ConfigError
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_state_dict
from merge_harness.merge.plan import validate_config
from merge_harness.merges.slerp import karcher_mean
from tests.conftest import state_of
from tests.test_merge_math import run

pytest.importorskip("mergekit", reason="mergekit is the reference (extra 'dev')")
from tests.test_mergekit_agreement import run_mergekit  # noqa: E402

TOLERANCE = 1e-5
ROOT2 = math.sqrt(2)

# case -> (method, base, [(zoo model, its parameters)], method-wide parameters)
# base: "none" (no base_model), "given" (base_model only), "listed" (base_model, also under models:)
CASES = {
    "nuslerp": ("nuslerp", "given", [("ft0", {"weight": 1.0}), ("ft1", {"weight": 1.0})], {}),
    "nuslerp_no_base": ("nuslerp", "none", [("ft0", {"weight": 0.3}), ("ft1", {"weight": 0.7})], {}),
    "nuslerp_row_wise": (
        "nuslerp", "given", [("ft1", {"weight": 0.2}), ("ft2", {"weight": 0.8})],
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
    "nuslerp_per_row_no_base": (
        "nuslerp", "none", [("ft0", {"weight": 1.0}), ("ft2", {"weight": 3.0})], {"nuslerp_flatten": False},
    ),
    "nuslerp_gradient_filtered": (
        "nuslerp", "listed",
        [
            ("ft0", {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]}),
            ("ft1", {"weight": [0.1, 0.9]}),
        ],
        {},
    ),
    "nuslerp_weight_at_top": ("nuslerp", "given", [("ft0", {}), ("ft1", {})], {"weight": 0.5}),
    "multislerp": (
        "multislerp", "given", [(f"ft{i}", {"weight": w}) for i, w in enumerate((0.3, 0.5, 0.7))], {},
    ),
    "multislerp_no_base": ("multislerp", "none", [(f"ft{i}", {"weight": 1.0}) for i in range(3)], {}),
    "multislerp_two_no_base": (
        "multislerp", "none", [("ft0", {"weight": 0.4}), ("ft1", {"weight": 0.6})], {},
    ),
    "multislerp_unnormalized": (
        "multislerp", "listed", [(f"ft{i}", {"weight": 0.3}) for i in range(3)],
        {"normalize_weights": False, "eps": 1e-6},
    ),
    "multislerp_gradient_filtered": (
        "multislerp", "given",
        [
            ("ft0", {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}]}),
            ("ft1", {"weight": [0.5, 1.0]}),
            ("ft2", {"weight": 1.0}),
        ],
        {},
    ),
    "multislerp_one_model": ("multislerp", "given", [("ft0", {"weight": 0.5})], {}),
    "karcher": ("karcher", "none", [(f"ft{i}", {}) for i in range(3)], {}),
    "karcher_two": ("karcher", "none", [("ft0", {}), ("ft1", {})], {}),
    "karcher_with_base": ("karcher", "given", [("ft0", {}), ("ft1", {})], {}),
    "karcher_base_listed": ("karcher", "listed", [("ft1", {}), ("ft2", {})], {}),
    "karcher_no_steps": ("karcher", "given", [(f"ft{i}", {}) for i in range(3)], {"max_iter": 0}),
    "karcher_one_step": (
        "karcher", "none", [(f"ft{i}", {}) for i in range(3)], {"max_iter": 1, "tol": 1e-7},
    ),
    "karcher_filtered": (
        "karcher", "given", [(f"ft{i}", {}) for i in range(3)],
        {"max_iter": [{"filter": "self_attn", "value": 1}, {"value": 20}], "tol": 1e-6},
    ),
}


def mergekit_config(case: str, zoo) -> dict:
    method, base, models, parameters = CASES[case]
    entries = [{"model": str(zoo[name]), "parameters": params} for name, params in models]
    if base == "listed":
        entries = [{"model": str(zoo["base"])}, *entries]
    config = {"merge_method": method, "models": entries, "parameters": parameters, "dtype": "float32"}
    if base != "none":
        config["base_model"] = str(zoo["base"])
    return config


def max_abs_diffs(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.float32, name
    return {name: (ours[name] - expected).abs().max().item() for name, expected in theirs.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_mergekit(case, tiny_zoo, tmp_path):
    config = mergekit_config(case, tiny_zoo)
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = merge_state_dict(MergeConfig.model_validate(config)).state
    assert ours is not None
    diffs = max_abs_diffs(ours, theirs)
    worst = max(diffs, key=diffs.get)
    print(f"{case}: max abs diff {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] <= TOLERANCE, f"{case}: {worst} differs by {diffs[worst]}"
    # guard against a vacuous pass: the merge must have moved away from the base somewhere
    base = state_of(tiny_zoo["base"])
    assert any(not torch.equal(ours[n], base[n]) for n in ours)


def test_weight_is_required_and_nuslerp_takes_two_models():
    two = [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}]
    with pytest.raises(ConfigError, match=r"models\[1\]\.parameters\.weight"):
        validate_config(MergeConfig.model_validate({"merge_method": "nuslerp", "models": two}))
    three = [{"model": m, "parameters": {"weight": 1.0}} for m in "abc"]
    with pytest.raises(ConfigError, match="takes 2 non-base models, got 3"):
        validate_config(MergeConfig.model_validate({"merge_method": "nuslerp", "models": three}))
    one = [{"model": "a"}]
    assert validate_config(MergeConfig.model_validate({"merge_method": "karcher", "models": one}))


# ------------------------------------------------------------------------------------ nuslerp

T = torch.tensor


def weights(*values: float) -> list[dict]:
    return [{"weight": w} for w in values]


def test_nuslerp_of_orthogonal_vectors_keeps_their_lengths_in_the_mix():
    # t = 1/2, W = pi/2: sin(pi/4) (a + b)
    out = run("nuslerp", None, [T([1.0, 0.0]), T([0.0, 2.0])], model_params=weights(1.0, 1.0))
    assert torch.allclose(out, T([ROOT2 / 2, ROOT2]))


def test_nuslerp_per_row_slerps_each_row_and_lerps_parallel_rows():
    a, b = T([[1.0, 0.0], [1.0, 0.0]]), T([[3.0, 0.0], [0.0, 1.0]])
    out = run("nuslerp", None, [a, b], params={"nuslerp_flatten": False}, model_params=weights(1.0, 1.0))
    assert torch.allclose(out, T([[2.0, 0.0], [ROOT2 / 2, ROOT2 / 2]]))  # row 0 parallel: (a + b) / 2


def test_nuslerp_row_wise_is_per_row_on_the_transpose():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    row_wise = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    out = run("nuslerp", None, [a, b], params=row_wise, model_params=weights(0.3, 0.6))
    per_row = run("nuslerp", None, [a.T, b.T], params={"nuslerp_flatten": False},
                  model_params=weights(0.3, 0.6))
    assert torch.allclose(out, per_row.T, atol=1e-6)


def test_nuslerp_without_a_base_is_slerp_at_t_from_the_weights():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    out = run("nuslerp", None, [a, b], model_params=weights(0.75, 0.25))
    assert torch.allclose(out, run("slerp", a, [b], params={"t": 0.25}), atol=1e-5)


def test_nuslerp_endpoints_and_identical_models():
    base, a, b = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8)
    assert torch.allclose(run("nuslerp", base, [a, b], model_params=weights(1.0, 0.0)), a, atol=1e-5)
    assert torch.allclose(run("nuslerp", base, [a, b], model_params=weights(0.0, 2.0)), b, atol=1e-5)
    same = run("nuslerp", base, [a, a.clone()], model_params=weights(1.0, 1.0))
    assert torch.allclose(same, a, atol=1e-5)


# --------------------------------------------------------------------------------- multislerp


def test_multislerp_of_two_orthogonal_unit_vectors_is_their_midpoint_on_the_circle():
    out = run("multislerp", None, [T([1.0, 0.0]), T([0.0, 1.0])], model_params=weights(1.0, 1.0))
    assert torch.allclose(out, T([ROOT2 / 2, ROOT2 / 2]))


def test_multislerp_one_model_or_identical_models_give_that_model():
    base, a = torch.randn(8, 8), torch.randn(8, 8)
    assert torch.equal(run("multislerp", base, [a], model_params=weights(0.2)), a)
    for origin in (None, base):
        out = run("multislerp", origin, [a.clone() for _ in range(3)], model_params=weights(1.0, 1.0, 1.0))
        assert torch.allclose(out, a, atol=1e-5)


def test_multislerp_cancelling_directions():
    a = T([1.0, 0.0])
    # two models: the linear fallback w_0 a + w_1 (-a) = 0
    assert torch.allclose(run("multislerp", None, [a, -a], model_params=weights(1.0, 1.0)), T([0.0, 0.0]))
    with pytest.raises(ValueError, match="zero"):
        run("multislerp", None, [a, -a, a], model_params=weights(1.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="sum to 0"):
        run("multislerp", None, [a, T([0.0, 1.0])], model_params=weights(1.0, -1.0))


# ------------------------------------------------------------------------------------ karcher


def test_karcher_of_two_points_is_the_spherical_midpoint_at_their_mean_norm():
    out = run("karcher", None, [T([3.0, 0.0]), T([0.0, 1.0])])
    assert torch.allclose(out, T([ROOT2, ROOT2]))  # mean norm 2 times (1, 1)/sqrt(2)


def test_karcher_one_model_or_identical_models_give_that_model():
    a = torch.randn(8, 8)
    assert torch.equal(run("karcher", None, [a]), a)
    assert torch.allclose(run("karcher", None, [a.clone() for _ in range(3)]), a, atol=1e-5)


def test_karcher_counts_the_base_as_one_more_point():
    a, b, c = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(run("karcher", c, [a, b]), run("karcher", None, [a, b, c]), atol=1e-6)
    assert torch.equal(run("karcher", c, []), c)  # only the base: it is given back


def test_karcher_mean_converges_to_where_the_mean_log_map_vanishes():
    units = torch.nn.functional.normalize(torch.randn(3, 16, dtype=torch.float64), dim=-1)
    mean = karcher_mean(units, max_iter=200, tol=1e-12)
    cos_theta = (units @ mean).clamp(-1, 1)
    theta = torch.acos(cos_theta)
    logs = (theta / torch.sin(theta))[:, None] * (units - cos_theta[:, None] * mean)
    assert abs(mean.norm().item() - 1) < 1e-12
    assert logs.mean(dim=0).norm().item() < 1e-9


def test_karcher_without_steps_is_the_normalised_euclidean_mean():
    a, b, c = torch.randn(10), torch.randn(10), torch.randn(10)
    out = run("karcher", None, [a, b, c], params={"max_iter": 0})
    units = torch.stack([v / v.norm() for v in (a, b, c)])
    mean = units.mean(dim=0)
    expected = torch.stack([a.norm(), b.norm(), c.norm()]).mean() * mean / mean.norm()
    assert torch.allclose(out, expected, atol=1e-6)


def test_karcher_leaves_out_zero_points_but_counts_them_in_the_norm():
    out = run("karcher", None, [T([2.0, 0.0]), T([0.0, 0.0])])
    assert torch.allclose(out, T([1.0, 0.0]))  # direction of the only nonzero point, norm (2 + 0) / 2
    assert torch.equal(run("karcher", None, [T([0.0, 0.0]), T([0.0, 0.0])]), T([0.0, 0.0]))
