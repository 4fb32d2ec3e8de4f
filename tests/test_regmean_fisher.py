"""RegMean against brute-force least squares, Fisher averaging by hand, and both end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_harness.merge.data_driven import merge_calibrated
from merge_harness.merges.fisher import fisher_average
from merge_harness.merges.regmean import regmean_linear, scale_off_diagonal
from tests.calibrated_zoo import make_zoo, merge_config
from tests.conftest import state_of

# ------------------------------------------------------------------------------------- RegMean


def test_regmean_equals_brute_force_least_squares_at_alpha_1():
    """min_W sum_t ||X_t W^T - X_t W_t^T||^2 solved by lstsq on the stacked problem."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 5, 4
    X = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in (7, 11, 9)]
    W = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in X]
    merged = regmean_linear(W, [x.T @ x for x in X], alpha=1.0)
    stacked_x = np.concatenate([x.numpy() for x in X])
    stacked_y = np.concatenate([(x @ w.T).numpy() for x, w in zip(X, W)])
    expected = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0].T
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_off_diagonal_scaling_by_hand():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert scale_off_diagonal(gram, 0.5).tolist() == [[4.0, 1.0], [1.0, 9.0]]
    # alpha = 0: diagonal Grams, so each input column is a weighted mean of the fine-tunes
    w1, w2 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    g1, g2 = torch.tensor([[9.0, 3.0], [3.0, 1.0]]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    merged = regmean_linear([w1, w2], [g1, g2], alpha=0.0)
    torch.testing.assert_close(merged, torch.tensor([[(9 * 2 + 1 * 0) / 10, (1 * 0 + 4 * 4) / 5]]))


def test_regmean_properties():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, generator=g)
    x = torch.randn(10, 4, generator=g)
    torch.testing.assert_close(regmean_linear([w], [x.T @ x], 0.9), w, atol=1e-5, rtol=1e-5)
    w2 = torch.randn(3, 4, generator=g)
    same = regmean_linear([w, w2], [x.T @ x, x.T @ x], 0.9)  # equal Grams: the plain mean
    torch.testing.assert_close(same, (w + w2) / 2, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- Fisher


def test_fisher_by_hand():
    a, b = torch.tensor([1.0, 10.0, 3.0]), torch.tensor([5.0, 20.0, 7.0])
    fa, fb = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 0.0])
    merged = fisher_average([a, b], [fa, fb], epsilon=0.0)
    # (3*1 + 1*5)/4 = 2; only b has Fisher -> 20; no Fisher anywhere -> plain mean 5
    assert merged.tolist() == [2.0, 20.0, 5.0]


def test_equal_fisher_is_the_plain_average():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(4, 3, generator=g) for _ in range(3)]
    fisher = torch.rand(4, 3, generator=g)
    merged = fisher_average(tensors, [fisher] * 3)
    torch.testing.assert_close(merged, torch.stack(tensors).mean(0))


# --------------------------------------------------------------------------- end to end, tiny Llama


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("regmean_zoo"), tasks=("math", "qa"))


def test_regmean_end_to_end(zoo):
    outcome = merge_calibrated(merge_config(zoo, "regmean", num_samples=6, alpha=0.9))
    fine_tunes = [state_of(zoo[t]) for t in ("math", "qa")]
    for name, tensor in outcome.state.items():
        mean = (fine_tunes[0][name] + fine_tunes[1][name]) / 2
        linear = ".layers." in name and name.endswith("proj.weight")
        if linear:  # closed form: close to, but not, the average
            assert not torch.allclose(tensor, mean, atol=1e-6)
            assert (tensor - mean).abs().max() < 0.1
        else:  # norms, embeddings, lm_head: the plain average
            torch.testing.assert_close(tensor, mean)
    assert outcome.forward_passes == {"math@math": 1.0, "qa@qa": 1.0}
    assert outcome.coefficients == []
    # independent: Grams of o_proj's inputs hooked in each fine-tune's own full forward
    name = "model.layers.1.self_attn.o_proj.weight"
    expected = regmean_linear([ft[name] for ft in fine_tunes], hooked_grams(zoo, name), alpha=0.9)
    torch.testing.assert_close(outcome.state[name], expected, atol=1e-5, rtol=1e-4)


def hooked_grams(zoo, name: str) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from merge_harness.merge.data_driven import calibration_sets, fine_tune_entries
    from merge_harness.merge.plan import build_plan
    from merge_harness.merges.regmean import RegMeanParams

    config = merge_config(zoo, "regmean", num_samples=6)
    plan = build_plan(config)
    data = calibration_sets(plan, fine_tune_entries(config, plan), RegMeanParams(num_samples=6))
    grams = []
    for task, d in zip(("math", "qa"), data):
        model = AutoModelForCausalLM.from_pretrained(zoo[task]).eval()
        module = model.get_submodule(name.removesuffix(".weight"))
        seen: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            model(input_ids=d.input_ids, attention_mask=d.attention_mask)
        handle.remove()
        x = seen[0][d.attention_mask.bool()].double()
        grams.append(x.T @ x)
    return grams


def test_regmean_of_identical_fine_tunes_is_that_fine_tune(tmp_path):
    twins = make_zoo(tmp_path, tasks=("math", "qa"), identical=True)
    outcome = merge_calibrated(merge_config(twins, "regmean", num_samples=4))
    expected = state_of(twins["math"])
    for name, tensor in outcome.state.items():
        torch.testing.assert_close(tensor, expected[name], atol=2e-5, rtol=1e-4)


def test_fisher_end_to_end_matches_hand_computed_fisher(zoo):
    from transformers import AutoModelForCausalLM

    from merge_harness.merge.data_driven import calibration_sets, fine_tune_entries
    from merge_harness.merge.plan import build_plan
    from merge_harness.merges.fisher import FisherParams

    config = merge_config(zoo, "fisher", num_samples=4)
    outcome = merge_calibrated(config)
    # independent: per-example squared gradients of the summed token log-likelihood
    plan = build_plan(config)
    data = calibration_sets(plan, fine_tune_entries(config, plan), FisherParams(num_samples=4))
    name = "model.layers.1.mlp.up_proj.weight"
    fishers = []
    for task, d in zip(("math", "qa"), data):
        model = AutoModelForCausalLM.from_pretrained(zoo[task]).eval()
        param = dict(model.named_parameters())[name]
        total = torch.zeros_like(param)
        for row in range(d.num_examples):
            ids = d.input_ids[row][d.attention_mask[row].bool()][None]
            out = model(input_ids=ids, labels=ids)  # mean NLL over n-1 predicted tokens
            model.zero_grad()
            (-(out.loss * (ids.shape[1] - 1))).backward()
            total += param.grad**2
        fishers.append(total / d.num_examples)
    tensors = [state_of(zoo[t])[name] for t in ("math", "qa")]
    expected = fisher_average(tensors, fishers, 1e-8)
    torch.testing.assert_close(outcome.state[name], expected, atol=1e-6, rtol=1e-5)
    assert outcome.forward_passes == {"math@math": 1.0, "qa@qa": 1.0}
