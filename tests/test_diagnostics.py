"""Diagnostics: linearity score, weight disentanglement, coefficient search and its data guard."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.func import functional_call

from merge_harness.core.errors import ConfigError
from merge_harness.diagnostics.disentanglement import disentanglement_grid, disentanglement_report, distance
from merge_harness.diagnostics.linearity import (
    LinearityAccumulator,
    linearity_report,
    linearity_table,
    nonlinearity_score,
)
from merge_harness.diagnostics.run_zoo import ZooDiagnostics, run_zoo_diagnostics
from merge_harness.diagnostics.slta_report import slta_report
from merge_harness.diagnostics.space import TaskVectorSpace, load_space
from merge_harness.io.models import torch_threads
from merge_harness.selection.answers import DataSettings, answer_batch, answer_scores
from merge_harness.selection.grid import DEFAULT_GRID
from merge_harness.selection.search import SearchSpec, grid_search, held_out_score, search_coefficient
from merge_harness.selection.splits import check_selection_data, held_out_part, refusal_reason
from merge_harness.tasks.fixtures import FIXTURES_DIR
from tests.calibrated_zoo import make_zoo
from tests.conftest import state_of

TASKS = ("math", "translate")
DATA = DataSettings(num_samples=6, template="plain", max_length=32, batch_size=6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only spins against the other jobs on a busy machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return make_zoo(tmp_path_factory.mktemp("diag_zoo"), tasks=TASKS, noise=0.05, rows=12)


def finetunes(zoo) -> dict[str, Path]:
    return {task: zoo[task] for task in TASKS}


def train_data(zoo) -> dict[str, Path]:
    return {task: zoo[f"{task}.jsonl"] for task in TASKS}


# ------------------------------------------------------------------------------------ linearity


def test_linear_module_has_zero_nonlinearity():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5, bias=True).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    tau_w, tau_b = 10 * torch.randn_like(weight), 10 * torch.randn_like(bias)

    def f(a):
        return functional_call(layer, {"weight": weight + a * tau_w, "bias": bias + a * tau_b}, (x,))

    scores = nonlinearity_score(f, (0.25, 0.5, 0.75))
    assert max(scores.values()) < 1e-6


def test_nonlinear_module_scores_large_and_small_tau_scores_small():
    torch.manual_seed(0)
    x, weight = torch.randn(20, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    tau = torch.randn_like(weight)

    def f(scale):
        return lambda a: torch.exp(2 * torch.tanh(x @ (weight + a * scale * tau).T))

    assert min(nonlinearity_score(f(5.0)).values()) > 0.1
    assert max(nonlinearity_score(f(1e-5)).values()) < 1e-3  # a smooth f is linear near theta_0
    quadratic = nonlinearity_score(lambda a: (weight + a * tau) ** 2, (0.5,))  # a(1-a)|tau^2| / |D|
    expected = 0.25 * (tau**2).norm() / ((weight + tau) ** 2 - weight**2).norm()
    assert quadratic[0.5] == pytest.approx(float(expected), rel=1e-9)


def test_accumulating_chunks_equals_one_pass():
    torch.manual_seed(1)
    outputs = {a: torch.randn(6, 3) for a in (0.0, 0.5, 1.0)}
    whole, parts = LinearityAccumulator((0.5,)), LinearityAccumulator((0.5,))
    whole.add(outputs)
    for rows in (slice(0, 2), slice(2, 6)):
        parts.add({a: v[rows] for a, v in outputs.items()})
    assert parts.scores()[0.5] == pytest.approx(whole.scores()[0.5], rel=1e-12)
    assert math.isnan(LinearityAccumulator((0.5,)).scores()[0.5])  # no change: undefined


def test_linearity_report_on_tiny_llama(zoo, tmp_path):
    frame, paths = linearity_report(
        zoo["base"], finetunes(zoo), train_data(zoo), tmp_path, (0.25, 0.5, 0.75), DATA
    )
    layers = 2
    assert len(frame) == len(TASKS) * (3 * layers + 1) * 3
    assert set(frame["kind"]) == {"layer", "attn", "mlp", "model"}
    assert frame["score"].map(math.isfinite).all() and (frame["score"] > 0).all()
    assert set(frame[frame["kind"] == "mlp"]["submodule"]) == {"layers.0.mlp", "layers.1.mlp"}
    assert {p.suffix for p in paths} == {".csv", ".md", ".png", ".svg"} and all(
        p.stat().st_size for p in paths
    )
    assert "| model |" in (tmp_path / "linearity.md").read_text()


def test_tiny_task_vectors_are_nearly_linear(zoo):
    space = load_space(zoo["base"], finetunes(zoo))
    for tau in space.taus.values():
        for name in tau:
            tau[name] = tau[name] * 1e-3
    from merge_harness.io.models import load_tokenizer

    batch = answer_batch(zoo["math.jsonl"], load_tokenizer(zoo["base"]), DATA)
    frame = linearity_table(space, {"math": batch}, (0.5,))
    assert frame["score"].max() < 0.01


# ------------------------------------------------------------------------------ disentanglement


class TwoHeads(torch.nn.Module):
    """A shared trunk and one output head per task; task t's inputs only ever reach head t."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(6, 6)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 7), torch.nn.Linear(6, 7)])

    def forward(self, x, head: int):
        return self.heads[head](torch.tanh(self.trunk(x)))


def two_head_space(touch: str) -> tuple[TaskVectorSpace, dict]:
    torch.manual_seed(0)
    model = TwoHeads()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    taus = {}
    for index, task in enumerate(("one", "two")):
        taus[task] = {n: torch.zeros_like(p) for n, p in base.items()}
        name = f"heads.{index}.weight" if touch == "own_head" else "trunk.weight"
        taus[task][name] = 3 * torch.randn_like(base[name])
    inputs = {"one": torch.randn(40, 6), "two": torch.randn(40, 6)}
    return TaskVectorSpace(model, base, taus), inputs


def two_head_logits(space: TaskVectorSpace, inputs: dict):
    def answer_logits(coefficients, task):
        head = 0 if task == "one" else 1
        return functional_call(space.model, space.point(coefficients), (inputs[task], head))

    return answer_logits


@pytest.mark.parametrize("kind", ["prediction", "kl"])
def test_disjoint_task_vectors_are_disentangled(kind):
    space, inputs = two_head_space("own_head")
    grid = disentanglement_grid(two_head_logits(space, inputs), ("one", "two"), (0.0, 0.5, 1.0), kind)
    assert len(grid) == 9 and grid["xi"].abs().max() < 1e-9


@pytest.mark.parametrize("kind", ["prediction", "kl"])
def test_interfering_task_vectors_are_not(kind):
    space, inputs = two_head_space("shared_trunk")
    grid = disentanglement_grid(two_head_logits(space, inputs), ("one", "two"), (0.0, 0.5, 1.0), kind)
    assert grid.loc[(grid.a1 == 0) & (grid.a2 == 0), "xi"].item() == 0
    assert grid.loc[(grid.a1 == 1) & (grid.a2 == 1), "xi"].item() > 0.05
    assert (grid["xi"] >= 0).all()


def test_the_grid_reuses_single_task_logits_on_its_edges_and_matches_the_definition():
    """Where the other task's a = 0 the merged model is the single-task one: no forward pass for
    it; every xi still equals the definition evaluated directly."""
    space, inputs = two_head_space("shared_trunk")
    direct = two_head_logits(space, inputs)
    calls = []

    def counted(coefficients, task):
        calls.append((dict(coefficients), task))
        return direct(coefficients, task)

    alphas = (0.0, 0.5, 1.0)
    grid = disentanglement_grid(counted, ("one", "two"), alphas, "kl")
    assert len(calls) == 2 * len(alphas) + 2 * (len(alphas) ** 2 - len(alphas))
    for row in grid.itertuples():
        both = {"one": row.a1, "two": row.a2}
        expected = sum(distance(direct({t: both[t]}, t), direct(both, t), "kl") for t in both)
        assert row.xi == pytest.approx(expected, abs=1e-12)


def test_disentanglement_report_compares_variants(zoo, tmp_path):
    variants = {"full": finetunes(zoo), "attn_only": finetunes(zoo)}
    frame, paths = disentanglement_report(zoo["base"], variants, train_data(zoo), tmp_path, (0.0, 1.0), DATA)
    assert len(frame) == 2 * 4 and set(frame["variant"]) == {"full", "attn_only"}
    assert frame.loc[(frame.a1 == 0) & (frame.a2 == 0), "xi"].eq(0).all()
    assert frame["xi"].between(0, 2).all()
    assert {p.suffix for p in paths} == {".csv", ".md", ".png", ".svg"}


# ------------------------------------------------------------------------- search and its guard

_OPENED: list[str] | None = None
_HOOKED = False


@contextmanager
def recording_opens():
    """Every path Python opens (builtins.open, io.open, os.open) while the block runs."""
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only when asked
        _HOOKED = True
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(str(Path(os.fsdecode(args[0])).resolve()))


def test_default_grid_is_the_papers():
    assert DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0 and len(DEFAULT_GRID) == 21
    assert DEFAULT_GRID[7] == 0.35


def test_grid_search_picks_the_best_mean_smallest_on_ties():
    chosen, curve = grid_search(lambda v: {"a": -abs(v - 0.3), "b": -abs(v - 0.3)}, DEFAULT_GRID)
    assert chosen == 0.3 and len(curve) == 21
    assert grid_search(lambda v: {"a": 1.0}, (0.5, 0.1, 0.9))[0] == 0.1


@pytest.mark.parametrize(
    "source",
    [
        FIXTURES_DIR / "toy_math.jsonl",
        FIXTURES_DIR / "gsm8k.jsonl",
        "data/test.jsonl",
        "gsm8k_test.jsonl",
        "splits/math-test-v2.json",
        "data/test/math.jsonl",
        "tests/golden/rows.jsonl",
        "gsm8k_test",
        "toy_math:test",
        "toy_math",
        "gsm8k_fixture",
    ],
)
def test_guard_refuses_test_data(source):
    assert refusal_reason(source) is not None
    with pytest.raises(ConfigError, match="refusing to select"):
        check_selection_data([source])


def test_guard_accepts_train_data_and_refuses_forbidden(zoo, tmp_path):
    check_selection_data([*train_data(zoo).values(), "gsm8k", "data/math_train.jsonl", "latest.jsonl"])
    held = tmp_path / "held_out.jsonl"  # tmp_path itself is named after the test: test_guard_...
    check_selection_data([held])
    with pytest.raises(ConfigError, match="forbidden"):
        check_selection_data([held], forbidden=[held])


def test_held_out_part_is_seeded_and_disjoint():
    rest, held = held_out_part(list(range(50)), 0.1, seed=3)
    assert len(held) == 5 and not set(rest) & set(held) and sorted(rest + held) == list(range(50))
    assert held_out_part(list(range(50)), 0.1, seed=3)[1] == held
    with pytest.raises(ConfigError):
        held_out_part([1, 2], 1.5, seed=0)


def test_search_refuses_test_data_before_opening_it(zoo):
    held_out = {"math": zoo["math.jsonl"], "translate": FIXTURES_DIR / "toy_translate.jsonl"}
    with recording_opens() as opened, pytest.raises(ConfigError, match="refusing to select"):
        search_coefficient(zoo["base"], finetunes(zoo), held_out, SearchSpec(grid=(0.0, 1.0)), DATA)
    assert not any(str(FIXTURES_DIR.resolve()) in path for path in opened)
    assert str(zoo["math.jsonl"].resolve()) not in opened  # refused before any data is read


def test_search_reads_only_held_out_train_data(zoo, tmp_path):
    # the zoo's rows, split: fine-tune data vs a held-out part; a decoy "test" file next to them
    held_out = {}
    for task in TASKS:
        rows = zoo[f"{task}.jsonl"].read_text().splitlines(keepends=True)
        held_out[task] = tmp_path / f"{task}_heldout.jsonl"
        held_out[task].write_text("".join(held_out_part(rows, 0.5, seed=0)[1]))
        (tmp_path / f"{task}_test.jsonl").write_text("".join(rows))
    with recording_opens() as opened:
        result = search_coefficient(
            zoo["base"], finetunes(zoo), held_out, SearchSpec(grid=(0.0, 0.5, 1.0)), DATA
        )
    data_files = {p for p in opened if p.endswith(".jsonl")}
    assert data_files == {str(p.resolve()) for p in held_out.values()}
    assert not any(str(FIXTURES_DIR.resolve()) in p or refusal_reason(p) for p in data_files)
    assert result.chosen in (0.0, 0.5, 1.0) and [p.value for p in result.curve] == [0.0, 0.5, 1.0]
    assert result.best_score == max(p.mean for p in result.curve)
    json.dumps(result.to_record())  # storable as is
    # lambda = 0 is the base model itself
    from merge_harness.io.models import load_pretrained, load_tokenizer

    batch = answer_batch(held_out["math"], load_tokenizer(zoo["base"]), DATA)
    base_score = held_out_score(load_pretrained(zoo["base"]), batch, "log_likelihood")
    assert result.curve[0].scores["math"] == pytest.approx(base_score, abs=1e-5)


def test_answer_scores_count_only_answer_tokens(zoo):
    from merge_harness.io.models import load_tokenizer

    batch = answer_batch(zoo["math.jsonl"], load_tokenizer(zoo["base"]), DATA)
    perfect = torch.full((*batch.input_ids.shape, 96), -1e4)
    perfect[:, :-1].scatter_(2, batch.input_ids[:, 1:, None], 0.0)  # predicts every next token
    scores = answer_scores(perfect, batch)
    assert scores["exact_match"] == (batch.num_examples, batch.num_examples)
    assert scores["log_likelihood"][0] == pytest.approx(0.0, abs=1e-3)
    assert scores["log_likelihood"][1] == int((batch.labels[:, 1:] != -100).sum()) > 0


def test_slta_report_against_best_lambda(zoo, tmp_path):
    frame, paths = slta_report(
        zoo["base"], finetunes(zoo), train_data(zoo), tmp_path, best_lambda=0.4, data=DATA
    )
    layer_rows = frame[frame["submodule"].astype(str) != "non_layer"]
    assert len(layer_rows) == 2 * 2 * len(TASKS)  # 2 layers x (attn, mlp) x tasks
    assert set(frame["task"]) == set(TASKS)
    assert {p.suffix for p in paths} == {".csv", ".md", ".png", ".svg"}
    assert "mean - best lambda" in (tmp_path / "slta_attn_mlp.md").read_text()


# ------------------------------------------------------------------------------ the zoo runner


@pytest.mark.slow
def test_zoo_diagnostics_write_every_analysis_and_the_summary(ci_zoo, tmp_path):
    zoo, _ = ci_zoo
    plan = ZooDiagnostics(
        variants=("full", "attn_only"),
        held_out=16,
        linearity_samples=4,
        slta_samples=8,
        disentanglement_grid=(0.0, 1.0),
        disentanglement_samples=4,
        lambda_grid=(0.0, 0.5, 1.0),
        max_length=96,
    )
    summary = run_zoo_diagnostics(zoo, tmp_path, plan, log=lambda message: None)
    text = summary.read_text()
    for heading in ("Linearity, full", "Linearity, attn_only", "Disentanglement", "Lambda search", "SLTA"):
        assert f"## {heading}" in text, heading
    own = pd.read_csv(tmp_path / "search_full" / "search.csv")
    assert set(own["value"]) == {0.0, 0.5, 1.0}
    for variant in ("full", "attn_only"):
        assert (tmp_path / f"linearity_{variant}" / "linearity.csv").is_file()
    assert (tmp_path / "slta" / "slta_layer.csv").is_file()
    # the held-out rows continue the zoo's train stream: none of them was fine-tuned on
    seen = {json.loads(line)["prompt"] for line in zoo.train_data["math"].read_text().splitlines()}
    select, score = (
        [json.loads(line)["prompt"] for line in (tmp_path / "held_out" / f"math_{part}.jsonl").open()]
        for part in ("select", "score")
    )
    assert len(select) == len(score) == 8 and not seen & set(select + score)
    assert not set(select) & set(score)  # lambda is chosen on one half and scored on the other
    # the attention-only variant was trained with the zoo's recipe and only its attention moved
    attn_only = state_of(zoo.root.parent / f"{zoo.root.name}-attn_only" / "math")
    base = state_of(zoo.base)
    changed = {name for name in base if not torch.equal(base[name], attn_only[name])}
    assert changed and all("self_attn" in name for name in changed)


def test_zoo_diagnostics_refuse_variants_without_the_zoos_own(ci_zoo, tmp_path):
    zoo, _ = ci_zoo
    with pytest.raises(ConfigError, match="must include the zoo's own"):
        run_zoo_diagnostics(zoo, tmp_path, ZooDiagnostics(variants=("attn_only",)))
    with pytest.raises(ConfigError, match="unknown fine-tune variants"):
        run_zoo_diagnostics(zoo, tmp_path, ZooDiagnostics(variants=("full", "lora")))
