"""Weight disentanglement between pairs of tasks (Ortiz-Jimenez et al., NeurIPS 2023; Jin et al.,
ICLR 2025, seed 002: fine-tuning the attention modules only disentangles the task vectors better).

For tasks 1 and 2 and coefficients (a1, a2):

    xi(a1, a2) = sum_{t in {1,2}} E_{x in D_t} [ dist( f(x; theta_0 + a_t tau_t),
                                                       f(x; theta_0 + a1 tau1 + a2 tau2) ) ]

Task vectors are weight-disentangled when adding the other task's vector does not change the
model on this task's inputs: xi = 0 on the whole grid. `dist` (the `distance` argument):
- `prediction` (default, the paper's prediction error): over the answer tokens of x (teacher
  forcing, prompt and padding excluded), the fraction whose greedy next-token prediction
  differs between the two models; E_x = mean over all answer tokens of D_t's examples.
- `kl`: KL(p_single || p_merged) of the next-token distributions, mean over the same tokens (nats).
So xi lies in [0, 2] for `prediction`; xi(0, 0) = 0 always. On the edges the error is pure
interference: xi(a1, 0) compares the base with theta_0 + a1 tau1 on task 2's inputs.

The size of what is being disentangled differs between fine-tunes (a weaker fine-tune has a
smaller tau and interferes less for that reason alone), so the report also gives each task's
self-change dist(f(x; theta_0), f(x; theta_0 + tau_t)) on D_t, and mean xi / (2 x mean
self-change): interference relative to what the task vectors do on their own tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from merge_harness.diagnostics.space import TaskVectorSpace, load_space, logits
from merge_harness.diagnostics.tables import markdown_table
from merge_harness.io.models import load_tokenizer
from merge_harness.selection.answers import AnswerBatch, DataSettings, answer_batch, answer_positions

Distance = Literal["prediction", "kl"]
ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# coefficients {task: a} and a task -> next-token logits (n_answer_tokens, V) on that task's data
AnswerLogits = Callable[[Mapping[str, float], str], torch.Tensor]


def distance(single: torch.Tensor, merged: torch.Tensor, kind: Distance) -> float:
    """Mean over rows (answer tokens) of dist between two (n, V) logit arrays."""
    if kind == "prediction":
        return float((single.argmax(-1) != merged.argmax(-1)).double().mean())
    p_log, q_log = torch.log_softmax(single.double(), -1), torch.log_softmax(merged.double(), -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def disentanglement_grid(
    answer_logits: AnswerLogits,
    pair: tuple[str, str],
    alphas: Sequence[float] = ALPHAS,
    kind: Distance = "prediction",
) -> pd.DataFrame:
    """xi(a1, a2) on the grid alphas x alphas: columns a1, a2, xi, xi_<task1>, xi_<task2>."""
    first, second = pair
    with torch.no_grad():
        single = {(t, a): answer_logits({t: a}, t) for t in pair for a in alphas}
        rows = []
        for a1 in alphas:
            for a2 in alphas:
                both = {first: a1, second: a2}
                terms = {
                    t: distance(single[(t, both[t])], merged_logits(answer_logits, single, both, t), kind)
                    for t in pair
                }
                rows.append(
                    {
                        "a1": a1,
                        "a2": a2,
                        "xi": sum(terms.values()),
                        **{f"xi_{t}": v for t, v in terms.items()},
                    }
                )
    return pd.DataFrame(rows)


def merged_logits(
    answer_logits: AnswerLogits,
    single: Mapping[tuple[str, float], torch.Tensor],
    both: Mapping[str, float],
    task: str,
) -> torch.Tensor:
    """f(x; theta_0 + a1 tau1 + a2 tau2) on `task`'s data; on the grid's edges (the other task's
    a = 0) that is the single-task model already computed: on the grid (0, 0.5, 1) a pair needs
    18 forward passes instead of 24."""
    other = next(a for t, a in both.items() if t != task)
    return single[(task, both[task])] if other == 0 else answer_logits(both, task)


def model_answer_logits(
    space: TaskVectorSpace, batches: Mapping[str, AnswerBatch], batch_size: int = 8
) -> AnswerLogits:
    """The `answer_logits` of a language model: logits at the positions predicting answer tokens."""

    def answer_logits(coefficients: Mapping[str, float], task: str) -> torch.Tensor:
        params = space.point(coefficients)
        parts = []
        for chunk in batches[task].chunks(batch_size):
            mask, _ = answer_positions(chunk)
            parts.append(logits(space, params, chunk.input_ids, chunk.attention_mask)[:, :-1][mask])
        return torch.cat(parts)

    return answer_logits


def self_change(answer_logits: AnswerLogits, task: str, kind: Distance = "prediction") -> float:
    """dist(f(x; theta_0), f(x; theta_0 + tau_t)) over task t's answer tokens."""
    with torch.no_grad():
        return distance(answer_logits({task: 0.0}, task), answer_logits({task: 1.0}, task), kind)


def disentanglement_table(
    space: TaskVectorSpace,
    batches: Mapping[str, AnswerBatch],
    alphas: Sequence[float] = ALPHAS,
    kind: Distance = "prediction",
    batch_size: int = 8,
) -> pd.DataFrame:
    """Every pair of tasks: columns task1, task2, a1, a2, xi, xi_task1, xi_task2."""
    answer_logits = model_answer_logits(space, batches, batch_size)
    frames = []
    for pair in combinations(space.tasks, 2):
        grid = disentanglement_grid(answer_logits, pair, alphas, kind)
        grid = grid.rename(columns={f"xi_{pair[0]}": "xi_task1", f"xi_{pair[1]}": "xi_task2"})
        frames.append(grid.assign(task1=pair[0], task2=pair[1]))
    columns = ["task1", "task2", "a1", "a2", "xi", "xi_task1", "xi_task2"]
    return pd.concat(frames, ignore_index=True)[columns]


def disentanglement_figure(
    tables: Mapping[str, pd.DataFrame], title: str = "Weight disentanglement error"
) -> Figure:
    """Heatmaps of xi(a1, a2): a row per variant (e.g. full / attn_only), a column per task pair;
    one colour scale for all panels so that the variants compare at a glance."""
    pairs = list(dict.fromkeys(zip(*(next(iter(tables.values()))[c] for c in ("task1", "task2")))))
    vmax = max(float(t["xi"].max()) for t in tables.values()) or 1.0
    fig = Figure(figsize=(1.9 * len(pairs) + 1.0, 2.0 * len(tables) + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(len(tables), len(pairs), squeeze=False)
    image = None
    for row, (variant, table) in enumerate(tables.items()):
        for col, (t1, t2) in enumerate(pairs):
            ax = axes[row][col]
            grid = table[(table["task1"] == t1) & (table["task2"] == t2)].pivot(
                index="a1", columns="a2", values="xi"
            )
            image = ax.imshow(
                grid.to_numpy(float), origin="lower", cmap="magma", vmin=0, vmax=vmax, extent=_extent(grid)
            )
            mean = np.nanmean(grid.to_numpy(float))
            ax.set_title(f"{variant}: {t1} (y) + {t2} (x)\nmean xi {mean:.3f}", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, label="xi", shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return fig


def _extent(grid: pd.DataFrame) -> tuple[float, float, float, float]:
    def edges(values) -> tuple[float, float]:
        values = np.asarray(values, float)
        half = (values[1] - values[0]) / 2 if len(values) > 1 else 0.5
        return values[0] - half, values[-1] + half

    return (*edges(grid.columns), *edges(grid.index))


def disentanglement_summary(
    tables: Mapping[str, pd.DataFrame], effects: Mapping[str, Mapping[str, float]] | None = None
) -> pd.DataFrame:
    """Mean xi over the grid, per pair (rows) and variant (columns), plus the mean over pairs;
    with `effects` (variant -> task -> self-change), their mean and mean xi / (2 x that)."""
    summary = pd.DataFrame(
        {variant: table.groupby(["task1", "task2"])["xi"].mean() for variant, table in tables.items()}
    )
    summary.index = [f"{a}+{b}" for a, b in summary.index]
    summary.loc["mean"] = summary.mean()
    if effects:
        change = pd.Series({v: sum(e.values()) / len(e) for v, e in effects.items()})
        summary.loc["self-change (a = 1)"] = change
        summary.loc["mean / (2 x self-change)"] = summary.loc["mean"] / (2 * change)
    return summary


def disentanglement_report(
    base: str | Path,
    variants: Mapping[str, Mapping[str, str | Path]],
    data_sources: Mapping[str, str | Path],
    out_dir: str | Path,
    alphas: Sequence[float] = ALPHAS,
    data: DataSettings = DataSettings(),
    kind: Distance = "prediction",
) -> tuple[pd.DataFrame, list[Path]]:
    """`merge-harness analyze disentanglement`: xi for every task pair of every fine-tune variant.

    variants: {"full": {task: model dir}, "attn_only": {...}} (one variant is fine); all share
    `base`. data_sources: task -> JSONL / lm-eval task (train split) whose answers are scored.
    Returns the long table (a `variant` column added) and the files: CSV, summary Markdown,
    heatmaps (PNG + SVG).
    """
    from merge_harness.reports.plots import save

    tokenizer = load_tokenizer(base)
    tables, effects = {}, {}
    for variant, finetunes in variants.items():
        space = load_space(base, finetunes)
        batches = {task: answer_batch(data_sources[task], tokenizer, data) for task in finetunes}
        tables[variant] = disentanglement_table(space, batches, alphas, kind, data.batch_size)
        answer_logits = model_answer_logits(space, batches, data.batch_size)
        effects[variant] = {task: self_change(answer_logits, task, kind) for task in finetunes}
        del space
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.concat([t.assign(variant=v) for v, t in tables.items()], ignore_index=True)
    frame.to_csv(out / "disentanglement.csv", index=False)
    summary = disentanglement_summary(tables, effects)
    (out / "disentanglement.md").write_text(
        f"Mean disentanglement error xi over a1, a2 in {{{', '.join(f'{a:g}' for a in alphas)}}} "
        f"(dist = {kind}; 0 = disentangled)\n\n" + markdown_table(summary, "pair")
    )
    paths, _ = save(
        disentanglement_figure(tables, f"Weight disentanglement error xi (dist = {kind})"),
        out / "disentanglement",
    )
    return frame, [out / "disentanglement.csv", out / "disentanglement.md", *paths]
