"""Hand-computed cases and properties for every per-tensor method, independent of mergekit."""

from __future__ import annotations

import math

import pytest
import torch

from merge_harness.merge.methods import get_method
from merge_harness.merges.sparsify import (
    magprune_probabilities,
    rescale,
    sparsify_magnitude,
    sparsify_magprune,
    sparsify_outliers,
    sparsify_random,
)
from merge_harness.merges.task_vectors import disjoint_merge, elect_sign, task_vectors

T = torch.tensor


def run(method: str, base, tensors, params=None, model_params=None, seed=0):
    spec = get_method(method)
    params = spec.params.model_validate(params or {})
    per_model = model_params or [{} for _ in tensors]
    model_params = [spec.model_params.model_validate(p) for p in per_model]
    generator = torch.Generator().manual_seed(seed)
    return spec.merge_tensor(base, tensors, model_params, params, generator)


# ------------------------------------------------------------------------------- building blocks


def test_task_vectors_are_differences_stacked():
    base = T([1.0, 2.0])
    deltas = task_vectors(base, [T([2.0, 2.0]), T([0.0, 5.0])])
    assert torch.equal(deltas, T([[1.0, 0.0], [-1.0, 3.0]]))


def test_elect_sign_by_mass_and_by_count():
    deltas = T([[3.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 5.0, 2.0]])
    # column 0: mass +1 -> "+" ; votes 1 vs 2 -> "-"
    by_mass = elect_sign(deltas, "sum")
    by_count = elect_sign(deltas, "count")
    assert by_mass[:, 0].tolist() == [True, False, False]
    assert by_count[:, 0].tolist() == [False, True, True]
    # zeros never agree with the elected sign
    assert by_mass[:, 2].tolist() == [False, False, True]


def test_a_tied_sign_vote_elects_plus_as_mergekit_does():
    """mergekit's get_mask: majority_sign = +1 where sum >= 0 ("sum": mass; "count": signs)."""
    # column 0: mass 2 - 2 = 0 (a tie in mass), votes 1 - 1 = 0 (a tie in count) -> "+"
    # column 1: mass 1 - 3 = -2 -> "-", but votes 2 - 1 = +1 -> "+"
    # column 2: mass 0, votes 0 (all zero) -> "+", and zeros never agree
    deltas = T([[2.0, 0.5, 0.0], [-2.0, 0.5, 0.0], [0.0, -3.0, 0.0]])
    assert elect_sign(deltas, "sum").tolist() == [[True, False, False], [False, False, False],
                                                  [False, True, False]]
    assert elect_sign(deltas, "count").tolist() == [[True, True, False], [False, True, False],
                                                    [False, False, False]]
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    for method in ("sum", "count"):
        agrees = get_mask(deltas, method) & (deltas != 0)  # mergekit's mask, zeros aside
        assert torch.equal(elect_sign(deltas, method), agrees), method


def test_ties_merges_a_tied_entry_with_the_positive_side():
    base = T([1.0, 1.0])
    ft = [T([3.0, 0.0]), T([-1.0, 2.0])]  # tau: [2, -1], [-2, 1]: both entries tied in mass
    out = run("ties", base, ft, model_params=[{"weight": 1.0}, {"weight": 1.0}])
    # "+" elected in both columns: entry 0 keeps +2 (ft0), entry 1 keeps +1 (ft1); mean over 1 each
    assert out.tolist() == [3.0, 2.0]


def test_disjoint_merge_divides_by_agreeing_weights_only():
    weights = T([1.0, 3.0]).reshape(2, 1)
    weighted = T([[2.0, 1.0], [6.0, -3.0]])  # already multiplied by weights
    mask = T([[True, True], [True, False]])
    merged = disjoint_merge(weighted, weights, mask, normalize=True)
    assert torch.allclose(merged, T([(2.0 + 6.0) / 4.0, 1.0 / 1.0]))
    assert torch.allclose(disjoint_merge(weighted, weights, mask, normalize=False), T([8.0, 1.0]))


def test_disjoint_merge_keeps_zero_where_nobody_agrees():
    merged = disjoint_merge(T([[1.0]]), T([[1.0]]), T([[False]]), normalize=True)
    assert merged.tolist() == [0.0]


def test_sparsify_magnitude_keeps_top_fraction():
    tau = T([0.1, -5.0, 3.0, -0.2, 4.0, 0.0, 1.0, -2.0])
    kept = sparsify_magnitude(tau, 0.5)
    assert kept.tolist() == [0.0, -5.0, 3.0, 0.0, 4.0, 0.0, 0.0, -2.0]
    assert sparsify_magnitude(tau, 0.01).count_nonzero() == 1  # at least one survives
    assert torch.equal(sparsify_magnitude(tau, 1.0), tau)


def test_sparsify_random_keeps_density_fraction_and_is_seeded():
    tau = torch.ones(20_000)
    first = sparsify_random(tau, 0.3, torch.Generator().manual_seed(1))
    second = sparsify_random(tau, 0.3, torch.Generator().manual_seed(1))
    other = sparsify_random(tau, 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert abs(first.mean().item() - 0.3) < 0.02


def test_rescale_inverse_density_and_l1():
    original = T([1.0, -1.0, 2.0, -2.0])
    masked = T([1.0, 0.0, 0.0, -2.0])
    assert torch.allclose(rescale(masked, original, 0.5, "inverse_density"), masked * 2)
    assert torch.allclose(rescale(masked, original, 0.5, "l1"), masked * (6.0 / 3.0))


def test_sparsify_outliers_drops_largest_gamma_then_smallest():
    tau = T([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    kept = sparsify_outliers(tau, density=0.5, gamma=0.2)
    # drop the top 2 (9, 10) and the bottom 3 (1, 2, 3): keep 4..8
    assert kept.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]


def test_magprune_probabilities_rise_with_rank_and_average_density():
    tau = T([[0.1, -0.5, 0.3, 0.9, -0.2]])
    p = magprune_probabilities(tau, density=0.5, epsilon=0.2)
    order = tau.abs().argsort(dim=1)
    assert torch.all(p[0, order[0]].diff() > 0)
    assert math.isclose(p.min().item(), 0.3, abs_tol=1e-6)
    assert math.isclose(p.max().item(), 0.7, abs_tol=1e-6)
    assert math.isclose(p.mean().item(), 0.5, abs_tol=1e-6)
    kept = sparsify_magprune(torch.randn(50, 400), 0.4, 0.1, torch.Generator().manual_seed(0))
    assert abs((kept != 0).float().mean().item() - 0.4) < 0.02


# ------------------------------------------------------------------------------------- methods


def test_task_arithmetic_hand_case():
    base = T([1.0, 1.0])
    out = run(
        "task_arithmetic",
        base,
        [T([2.0, 1.0]), T([1.0, 3.0])],
        params={"lambda": 0.5},
        model_params=[{"weight": 1.0}, {"weight": 2.0}],
    )
    # delta = 1*[1,0] + 2*[0,2] = [1,4]; base + 0.5*delta
    assert torch.allclose(out, T([1.5, 3.0]))


def test_ties_hand_case():
    base = torch.zeros(4)
    ft = [T([3.0, -1.0, 0.5, 2.0]), T([-1.0, -2.0, 4.0, 1.0])]
    out = run("ties", base, ft, model_params=[{"density": 0.5}, {"density": 0.5}])
    # trim: ft0 keeps 3, 2 -> [3,0,0,2]; ft1 keeps -2, 4 -> [0,-2,4,0]
    # signs: +, -, +, + ; disjoint mean over agreeing entries
    assert torch.allclose(out, T([3.0, -2.0, 4.0, 2.0]))


def test_linear_weighted_average():
    out = run("linear", None, [T([0.0, 4.0]), T([2.0, 0.0])], model_params=[{"weight": 1}, {"weight": 3}])
    assert torch.allclose(out, T([1.5, 1.0]))
    raw = run("linear", None, [T([1.0]), T([1.0])], params={"normalize": False})
    assert torch.allclose(raw, T([2.0]))


def test_linear_zero_weights_cannot_normalize():
    with pytest.raises(ValueError, match="sum to 0"):
        run("linear", None, [T([1.0])], model_params=[{"weight": 0.0}])


def test_slerp_on_orthogonal_unit_vectors():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    out = run("slerp", a, [b], params={"t": 0.5})
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    assert torch.allclose(run("slerp", a, [b], params={"t": 0.0}), a, atol=1e-6)
    assert torch.allclose(run("slerp", a, [b], params={"t": 1.0}), b, atol=1e-6)


def test_slerp_parallel_vectors_fall_back_to_lerp():
    out = run("slerp", T([1.0, 1.0]), [T([3.0, 3.0])], params={"t": 0.25})
    assert torch.allclose(out, T([1.5, 1.5]))


def test_model_stock_hand_case():
    base = torch.zeros(2)
    # offsets [1,0] and [0,1]: cos = 0 -> t = 0 -> the base
    assert torch.allclose(run("model_stock", base, [T([1.0, 0.0]), T([0.0, 1.0])]), base)
    # identical offsets: cos = 1 -> t = k/(1+(k-1)) = 1 -> the average fine-tune
    same = run("model_stock", base, [T([2.0, 2.0]), T([2.0, 2.0])])
    assert torch.allclose(same, T([2.0, 2.0]))
    # cos = 0.5 with k = 2: t = 1/1.5 = 2/3 of the average
    u, v = T([1.0, 0.0]), T([0.5, math.sqrt(3) / 2])
    out = run("model_stock", base, [u, v])
    assert torch.allclose(out, (2 / 3) * (u + v) / 2, atol=1e-6)


def test_breadcrumbs_and_della_reduce_to_task_arithmetic_at_full_density():
    base = torch.randn(6, 5)
    ft = [base + torch.randn(6, 5) for _ in range(3)]
    expected = run("task_arithmetic", base, ft)
    assert torch.allclose(run("breadcrumbs", base, ft), expected, atol=1e-6)
    assert torch.allclose(run("della_linear", base, ft), expected, atol=1e-6)
    assert torch.allclose(run("dare_linear", base, ft), expected, atol=1e-6)


# ----------------------------------------------------------------------------------- properties

PER_TENSOR_TA_FAMILY = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]


@pytest.mark.parametrize("method", PER_TENSOR_TA_FAMILY)
def test_one_finetune_at_lambda_one_gives_that_finetune(method):
    base = torch.randn(8, 8)
    finetune = base + torch.randn(8, 8)
    out = run(method, base, [finetune], params={"lambda": 1.0})
    assert torch.allclose(out, finetune, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"])
def test_zero_weights_give_the_base(method):
    base = torch.randn(8, 8)
    ft = [base + torch.randn(8, 8) for _ in range(2)]
    out = run(method, base, ft, model_params=[{"weight": 0.0}, {"weight": 0.0}])
    assert torch.allclose(out, base)


@pytest.mark.parametrize("method", ["linear", "ties", "model_stock", "slerp", "della"])
def test_identical_finetunes_give_that_model(method):
    base = torch.randn(8, 8)
    finetune = base + torch.randn(8, 8)
    count = 1 if method == "slerp" else 2
    params = {"t": 1.0} if method == "slerp" else {}
    out = run(method, base, [finetune.clone() for _ in range(count)], params=params)
    assert torch.allclose(out, finetune, atol=1e-5)
