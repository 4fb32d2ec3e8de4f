"""sce, ram, ramplus_tl, nearswap, arcee_fusion: hand cases, properties, and agreement with mergekit.

End to end, mergekit's `run_merge` and our engine merge the tiny Llama checkpoints of `tiny_zoo`
from the same mergekit-format config, and every tensor must agree to 1e-5 in float32 (defaults,
non-default parameters, filters and gradients, 2 and 3 models where the method allows them).
SCE's Select is a top-k, so it also runs on checkpoints whose task vectors are quantized (float32
and bfloat16 storage, `tests.test_tied_magnitudes.write_tied_zoo`), where variances tie at the cut.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_harness.core.errors import ConfigError
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_state_dict
from merge_harness.merge.plan import validate_config
from merge_harness.merges.arcee_fusion import importance, upper_fence
from merge_harness.merges.sce import sce_weights, select_by_variance
from merge_harness.merges.sparsify import window_mask
from tests.conftest import state_of
from tests.test_merge_math import run

mergekit = pytest.importorskip("mergekit", reason="mergekit is the reference (extra 'dev')")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.registry import get as mergekit_method  # noqa: E402
from mergekit.merge_methods.sce import sce_mask  # noqa: E402

from tests.test_mergekit_agreement import run_mergekit  # noqa: E402
from tests.test_tied_magnitudes import tied, write_tied_zoo  # noqa: E402

T = torch.tensor


def mergekit_merge_tensor(
    method: str, base: torch.Tensor, others: list[torch.Tensor], **params
) -> torch.Tensor:
    """mergekit's own merge of one tensor (its `merge_group`), with its defaults for the rest."""
    spec = mergekit_method(method)
    defaults = {p.name: p.default for p in spec.spec.parameters if not p.required}
    group = TensorGroup.from_tensors([base, *others], base_index=0)
    return spec.merge_group(group, **{**defaults, **params})


# ------------------------------------------------------------------------------------- nearswap


def test_nearswap_swaps_entries_within_t_and_moves_the_rest_by_t():
    base = T([0.0, 0.0, 0.0, 1.0, 2.0])
    other = T([0.005, -0.02, 0.1, 1.0, 1.99])
    out = run("nearswap", base, [other], params={"t": 0.01})
    # |d| <= t: taken whole (0.005, 0, -0.01); |d| > t: moved toward `other` by exactly t
    assert torch.allclose(out, T([0.005, -0.01, 0.01, 1.0, 1.99]), atol=1e-7)


def test_nearswap_is_the_base_plus_the_clipped_task_vector():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=g)
    other = base + 0.05 * torch.randn(16, 12, generator=g)
    for t in (0.0, 0.01, 0.04):
        expected = base + (other - base).clamp(-t, t)
        assert torch.allclose(run("nearswap", base, [other], params={"t": t}), expected, atol=1e-6)
    assert torch.equal(run("nearswap", base, [other], params={"t": 0.0}), base)
    assert torch.allclose(run("nearswap", base, [other], params={"t": 10.0}), other, atol=1e-6)


def test_nearswap_needs_t_and_exactly_one_other_model():
    config = {"merge_method": "nearswap", "base_model": "b", "models": [{"model": "x"}]}
    with pytest.raises(ConfigError, match=r"parameters\.t: "):
        validate_config(MergeConfig.model_validate(config))
    with pytest.raises(ConfigError, match="takes 1 non-base models, got 2"):
        validate_config(
            MergeConfig.model_validate(
                {**config, "models": [{"model": "x"}, {"model": "y"}], "parameters": {"t": 0.1}}
            )
        )


# ------------------------------------------------------------------------------------------ SCE


def test_sce_hand_case():
    # w = mean(tau^2) normalized: (5/3, 10/3) -> (1/3, 2/3); elected signs (+, -, +):
    # entry 0 both agree (1/3 * 1 + 2/3 * 3) / 1; entry 1 only tau_1 (-2); entry 2 nobody (0)
    base = T([1.0, 1.0, 1.0])
    out = run("sce", base, [base + T([1.0, -2.0, 0.0]), base + T([3.0, 1.0, 0.0])])
    assert torch.allclose(out, base + T([7 / 3, -2.0, 0.0]))


def test_sce_selects_exactly_the_top_k_variance_entries_counted_in_float32():
    g = torch.Generator().manual_seed(1)
    deltas = torch.randn(3, 100, generator=g)
    deltas[:, 90:] = 0.5  # ten entries every model moves alike: variance 0, not counted
    variance = deltas.var(dim=0, correction=0)
    mask = select_by_variance(deltas, 0.7)
    # k = int(float32(90) * float32(0.7)) = 63, where double arithmetic gives int(62.99...) = 62
    assert int(mask.sum()) == 63
    assert set(mask.nonzero().flatten().tolist()) == set(variance.topk(63).indices.tolist())
    assert torch.equal(mask, sce_mask(deltas, 0.7).bool())
    # the merge keeps theta_0 wherever Select dropped the entry
    base = torch.zeros(100)
    out = run("sce", base, list(deltas), params={"select_topk": 0.7})
    assert torch.equal(out[~mask], base[~mask]) and bool((out[mask] != 0).any())


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.9])
def test_sce_select_on_tied_variances_keeps_mergekits_entries(fraction):
    deltas = torch.stack([tied((120, 80), seed=s, levels=4) for s in range(3)])
    variance = deltas.var(dim=0, correction=0)
    k = int(np.float32(int(torch.count_nonzero(variance))) * np.float32(fraction))
    assert window_mask(variance, variance.numel() - k, k) is None  # a tie straddles the cut
    ours = select_by_variance(deltas, fraction)
    assert int(ours.sum()) == k
    assert torch.equal(ours, sce_mask(deltas, fraction).bool())


def test_sce_weights_fall_back_to_uniform_when_every_task_vector_is_tiny():
    assert torch.allclose(sce_weights(torch.full((4, 10), 1e-4)), torch.full((4,), 0.25))
    assert torch.allclose(sce_weights(torch.stack([torch.ones(5), 2 * torch.ones(5)])), T([0.2, 0.8]))


def test_sce_with_one_model():
    base = torch.randn(6, 5)
    finetune = base + torch.randn(6, 5)
    assert torch.allclose(run("sce", base, [finetune]), finetune, atol=1e-6)
    # nothing varies across one model, so Select keeps nothing (as mergekit)
    assert torch.equal(run("sce", base, [finetune], params={"select_topk": 0.5}), base)


def test_sce_rejects_fractions_outside_zero_one():
    config = {"merge_method": "sce", "base_model": "b", "models": [{"model": "x"}]}
    with pytest.raises(ConfigError, match="select_topk"):
        validate_config(MergeConfig.model_validate({**config, "parameters": {"select_topk": 1.5}}))


# ------------------------------------------------------------------------------------ RAM, RAM+


def test_ram_hand_case():
    base = torch.zeros(4)
    tau_1, tau_2 = T([0.5, 0.0, 0.2, 1e-6]), T([0.3, 0.4, -0.2, 0.0])
    # contributors (|tau| > 1e-5): 2, 1, 2, 0 -> shared entries averaged, unique kept, 1e-6 ignored
    assert torch.allclose(run("ram", base, [tau_1, tau_2]), T([0.4, 0.4, 0.0, 0.0]))
    # epsilon 0.25: only 0.5, 0.3 and 0.4 count: entry 0 shared, entry 1 unique, entry 2 dropped
    assert torch.allclose(run("ram", base, [tau_1, tau_2], params={"epsilon": 0.25}), T([0.4, 0.4, 0, 0]))


def test_ramplus_scales_unique_updates_by_the_shared_to_unique_ratio():
    base = torch.zeros(4)
    tau_1, tau_2 = T([0.5, 0.0, 0.2, 1e-6]), T([0.3, 0.4, -0.2, 0.0])
    # model 2: 2 shared, 1 unique -> rho = 2; lambda = 1 + r * min(rho, alpha)
    default = run("ramplus_tl", base, [tau_1, tau_2])  # r 0.1, alpha 0.2: lambda 1.02
    assert torch.allclose(default, T([0.4, 0.4 * 1.02, 0.0, 0.0]))
    wide = run("ramplus_tl", base, [tau_1, tau_2], params={"r": 0.5, "alpha": 5.0})  # lambda 2
    assert torch.allclose(wide, T([0.4, 0.8, 0.0, 0.0]))
    assert torch.allclose(
        run("ramplus_tl", base, [tau_1, tau_2], params={"r": 0.0}), run("ram", base, [tau_1, tau_2])
    )


def test_ramplus_with_epsilon_zero_and_an_unchanged_model_is_finite():
    """The deviation: mergekit's 0/0 for a model without updates makes the whole tensor NaN."""
    base = torch.zeros(3)
    finetunes = [T([0.5, 0.0, 0.2]), torch.zeros(3)]
    ours = run("ramplus_tl", base, finetunes, params={"epsilon": 0.0})
    assert torch.allclose(ours, T([0.5, 0.0, 0.2]))  # model 1 alone: rho = 0, lambda = 1
    assert torch.isnan(mergekit_merge_tensor("ramplus_tl", base, finetunes, epsilon=0.0)).all()
    positive = mergekit_merge_tensor("ramplus_tl", base, finetunes, epsilon=1e-5)
    assert torch.allclose(run("ramplus_tl", base, finetunes), positive)


# ---------------------------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_upper_fence_uses_lower_order_statistics():
    # n = 9: ranks 2, 4, 6 -> Q1 = 2, Q2 = 4, Q3 = 6; fence 4 + 1.5 * 4 = 10
    assert upper_fence(torch.arange(9.0), torch.Generator()).item() == 10.0
    scores = torch.rand(37, 11, generator=torch.Generator().manual_seed(2))
    q1, q2, q3 = (torch.quantile(scores, q, interpolation="lower") for q in (0.25, 0.5, 0.75))
    assert upper_fence(scores, torch.Generator()).item() == (q2 + 1.5 * (q3 - q1)).item()


def test_arcee_fusion_takes_the_update_exactly_where_importance_reaches_the_fence():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    other = base + 0.05 * torch.randn(40, 30, generator=g)
    other[5] += 2.0 * torch.randn(30, generator=g)  # one row changes its softmax a lot
    scores = importance(base, other)
    q1, q2, q3 = (torch.quantile(scores, q, interpolation="lower") for q in (0.25, 0.5, 0.75))
    keep = scores >= q2 + 1.5 * (q3 - q1)
    out = run("arcee_fusion", base, [other])
    assert torch.allclose(out, torch.where(keep, other, base), atol=1e-6)
    assert 0 < int(keep.sum()) < keep.numel() and bool(keep[5].all())


def test_arcee_fusion_ignores_a_shift_that_leaves_the_softmax_unchanged():
    base = torch.randn(4, 8)
    other = base + 0.3  # each row shifted by a constant: the same softmax, KL 0
    other[0] = base[0] + torch.randn(8)
    out = run("arcee_fusion", base, [other])
    assert torch.equal(out[1:], base[1:]) and not torch.equal(out[0], base[0])


def test_arcee_fusion_samples_large_tensors_from_the_seeded_generator():
    """Over 1,000,000 entries the quantiles come from a sample: with the same seed as mergekit's
    global generator we draw the same one; another seed gives another, but nearby, fence."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1100, 1000, generator=g)
    other = base + 0.02 * torch.randn(1100, 1000, generator=g)
    torch.manual_seed(5)
    theirs = mergekit_merge_tensor("arcee_fusion", base, [other])
    assert torch.equal(run("arcee_fusion", base, [other], seed=5), theirs)
    scores = importance(base, other)
    fences = [upper_fence(scores, torch.Generator().manual_seed(s)).item() for s in (5, 6)]
    assert fences[0] != fences[1] and abs(fences[0] - fences[1]) < 0.01 * fences[0]


# ----------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl"])
def test_identical_finetunes_give_that_model(method):
    base = torch.randn(8, 8)
    finetune = base + torch.randn(8, 8)
    for count in (1, 3):
        out = run(method, base, [finetune.clone() for _ in range(count)])
        assert torch.allclose(out, finetune, atol=1e-6)


@pytest.mark.parametrize(("method", "params"), [("nearswap", {"t": 0.5}), ("arcee_fusion", {})])
def test_a_finetune_equal_to_the_base_gives_the_base(method, params):
    base = torch.randn(8, 8)
    assert torch.equal(run(method, base, [base.clone()], params=params), base)


# ------------------------------------------------------------------------ end to end, vs run_merge

# case: (method, parameters, fine-tunes used, whether the base is listed under `models:` too)
CASES = {
    "sce": ("sce", {}, [0, 1, 2], False),
    "sce_topk": ("sce", {"select_topk": 0.3}, [0, 1, 2], False),
    "sce_topk_two_models": ("sce", {"select_topk": 0.5}, [1, 2], False),
    "sce_topk_filtered": (
        "sce",
        {"select_topk": [{"filter": "self_attn", "value": 0.2}, {"value": 0.8}]},
        [0, 1, 2],
        False,
    ),
    "sce_topk_gradient": ("sce", {"select_topk": [0.1, 0.9]}, [0, 1, 2], True),
    "sce_one_model": ("sce", {}, [0], False),
    "ram": ("ram", {}, [0, 1, 2], False),
    "ram_epsilon": ("ram", {"epsilon": 0.02}, [0, 1, 2], False),
    "ram_epsilon_two_models": ("ram", {"epsilon": 0.03}, [0, 2], False),
    "ram_epsilon_gradient": ("ram", {"epsilon": [0.0, 0.04]}, [0, 1, 2], False),
    "ramplus_tl": ("ramplus_tl", {}, [0, 1, 2], False),
    "ramplus_tl_sparse": ("ramplus_tl", {"epsilon": 0.03}, [0, 1, 2], False),  # rho capped at alpha
    "ramplus_tl_params": ("ramplus_tl", {"epsilon": 0.03, "r": 0.5, "alpha": 0.9}, [0, 1, 2], False),
    "ramplus_tl_two_models": ("ramplus_tl", {"epsilon": 0.025, "r": 0.3, "alpha": 0.5}, [0, 1], False),
    "ramplus_tl_filtered": (
        "ramplus_tl",
        {"epsilon": 0.03, "r": [{"filter": "mlp", "value": 1.0}, {"value": 0.2}], "alpha": 2.0},
        [0, 1, 2],
        False,
    ),
    "nearswap": ("nearswap", {"t": 0.01}, [0], False),
    "nearswap_base_listed": ("nearswap", {"t": 0.03}, [1], True),
    "nearswap_gradient": ("nearswap", {"t": [0.0, 0.05]}, [2], False),
    "nearswap_filtered": (
        "nearswap",
        {"t": [{"filter": "self_attn", "value": 0.03}, {"value": 0.001}]},
        [0],
        False,
    ),
    "arcee_fusion": ("arcee_fusion", {}, [0], False),
    "arcee_fusion_base_listed": ("arcee_fusion", {}, [2], True),
}


def mergekit_config(case: str, zoo) -> dict:
    method, params, finetunes, base_listed = CASES[case]
    models = [{"model": str(zoo[f"ft{i}"])} for i in finetunes]
    if base_listed:
        models = [{"model": str(zoo["base"])}, *models]
    return {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": models,
        "parameters": params,
        "dtype": "float32",
    }


def max_differences(config: dict, out) -> dict[str, float]:
    """Merge with mergekit and with our engine; each tensor's max |ours - mergekit|, float32 both."""
    theirs = run_mergekit(config, out)
    ours = merge_state_dict(MergeConfig.model_validate(config)).state
    assert ours is not None and set(ours) == set(theirs)
    differences = {}
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.float32
        differences[name] = (ours[name] - expected).abs().max().item()
    return differences


@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_mergekit(case, tiny_zoo, tmp_path):
    config = mergekit_config(case, tiny_zoo)
    differences = max_differences(config, tmp_path / "mergekit")
    worst = max(differences, key=differences.get)
    print(f"{case}: max abs diff {differences[worst]:.3g} ({worst})")
    assert differences[worst] <= 1e-5, f"{case}: {worst} differs by {differences[worst]}"
    # guard against a vacuous pass: the merge must have moved away from the base somewhere
    base = state_of(tiny_zoo["base"])
    merged = state_of(tmp_path / "mergekit")
    assert any(not torch.equal(merged[n], base[n]) for n in merged)


@pytest.fixture(scope="module")
def tied_zoos(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tied_sce")
    return {kind: write_tied_zoo(root / kind, getattr(torch, kind)) for kind in ("float32", "bfloat16")}


def count_variance_straddles(zoo: dict, fraction: float) -> int:
    """Tensors whose variance of the three task vectors ties across SCE's top-k cut."""
    base = state_of(zoo["base"])
    finetunes = [state_of(zoo[f"ft{i}"]) for i in range(3)]
    count = 0
    for name, theta_0 in base.items():
        deltas = torch.stack([ft[name].float() - theta_0.float() for ft in finetunes])
        variance = deltas.var(dim=0, correction=0)
        k = int(np.float32(int(torch.count_nonzero(variance))) * np.float32(fraction))
        count += k > 0 and window_mask(variance, variance.numel() - k, k) is None
    return count


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_sce_on_tied_checkpoints_agrees_with_mergekit(kind, fraction, tied_zoos, tmp_path):
    """Quantized task vectors: float32 storage ties at ulp(theta_0), bfloat16 at 8 mantissa bits;
    float32 math and output in both."""
    zoo = tied_zoos[kind]
    straddles = count_variance_straddles(zoo, fraction)
    if kind == "bfloat16":
        assert straddles >= 1  # the case where the kept set depends on topk's tie order
    config = {
        "merge_method": "sce",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[f"ft{i}"])} for i in range(3)],
        "parameters": {"select_topk": fraction},
        "dtype": "float32",
    }
    differences = max_differences(config, tmp_path / "mergekit")
    worst = max(differences, key=differences.get)
    print(
        f"sce tied {kind} select_topk={fraction}: {straddles} straddling tensors, "
        f"max abs diff {differences[worst]:.3g} ({worst})"
    )
    assert differences[worst] <= 1e-5, f"{worst} differs by {differences[worst]}"
