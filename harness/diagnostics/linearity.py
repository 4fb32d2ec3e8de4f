"""How linear in its weights is a submodule, compared with the whole model? (SLTA's premise.)

Dai et al. (ICLR 2025) argue that a decoder layer, an attention block or an MLP block is much
closer to linear in its weights around theta_0 than the whole model is, and merge per submodule
because of it. This module measures that, per task t (tau_t = theta_t - theta_0) and scale a:

    D(x)     = f(x; theta_0 + tau_t) - f(x; theta_0)                   (the fine-tune's change)
    r_a(x)   = f(x; theta_0 + a tau_t) - [f(x; theta_0) + a D(x)]       (miss of the linear guess)
    NL_t(a)  = sqrt(sum_x ||r_a(x)||^2) / sqrt(sum_x ||D(x)||^2)

sums over the non-padding tokens x of task t's examples (prompt and answer) and all output
dimensions, accumulated in float64. NL = 0 exactly when f is linear along tau_t (on that data);
a quadratic f gives NL(a) = a(1-a) * c, largest at a = 0.5. NL is NaN when D = 0.

Functions f (the `kind` column):
- `layer`: decoder layer i (its output; the residual cancels in r_a and D);
- `attn`: input_layernorm + self_attn on the layer input, without the residual;
- `mlp`: post_attention_layernorm + mlp on h + attn_0(h), without the residual;
  (`merge_harness.merge.features.attention_block` / `mlp_block`, as SLTA's `attn_mlp` granularity);
- `model`: the whole model's logits (every parameter moves, embeddings and lm_head included).
Submodule inputs are the *pre-trained* model's inputs at that layer (SLTA's Algorithm 1: the
examples travel through theta_0's layers only); only submodule i's weights move.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.func import functional_call

from merge_harness.diagnostics.space import TaskVectorSpace, load_space, logits
from merge_harness.diagnostics.tables import markdown_table
from merge_harness.io.models import load_tokenizer
from merge_harness.merge.features import attention_block, decoder_layers, layer_inputs, mlp_block
from merge_harness.selection.answers import AnswerBatch, DataSettings, answer_batch

ALPHAS = (0.25, 0.5, 0.75)
KINDS = ("layer", "attn", "mlp", "model")
COLUMNS = ["task", "kind", "layer", "submodule", "alpha", "score"]


class LinearityAccumulator:
    """Sums of ||r_a||^2 and ||D||^2 over chunks of data, for one function f and one tau."""

    def __init__(self, alphas: Sequence[float]):
        self.alphas = tuple(alphas)
        self.residual = dict.fromkeys(self.alphas, 0.0)
        self.change = 0.0

    def add(self, outputs: Mapping[float, torch.Tensor]) -> None:
        """outputs[a] = f(x; theta_0 + a tau) on one chunk (any shape), for 0, 1 and every alpha."""
        f0, f1 = outputs[0.0].double(), outputs[1.0].double()
        delta = f1 - f0
        self.change += float((delta**2).sum())
        for a in self.alphas:
            self.residual[a] += float(((outputs[a].double() - f0 - a * delta) ** 2).sum())

    def scores(self) -> dict[float, float]:
        if self.change == 0:
            return dict.fromkeys(self.alphas, math.nan)
        return {a: math.sqrt(self.residual[a] / self.change) for a in self.alphas}


def nonlinearity_score(
    f: Callable[[float], torch.Tensor], alphas: Sequence[float] = ALPHAS
) -> dict[float, float]:
    """NL(a) for every alpha, f(a) = the outputs at theta_0 + a tau (one chunk of data)."""
    accumulator = LinearityAccumulator(alphas)
    with torch.no_grad():
        accumulator.add({a: f(a) for a in {0.0, 1.0, *accumulator.alphas}})
    return accumulator.scores()


def _layer_out(layer, params, hidden, kwargs) -> torch.Tensor:
    out = functional_call(layer, params, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def task_linearity(
    space: TaskVectorSpace,
    task: str,
    batch: AnswerBatch,
    alphas: Sequence[float] = ALPHAS,
    batch_size: int = 8,
) -> list[dict]:
    """Rows (task, kind, layer, submodule, alpha, score) of every submodule and the whole model."""
    prefix, layers = decoder_layers(space.model)
    points = (0.0, 1.0, *alphas)
    acc = {(i, kind): LinearityAccumulator(alphas) for i in range(len(layers)) for kind in KINDS[:3]}
    acc[(-1, "model")] = LinearityAccumulator(alphas)
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            valid = chunk.attention_mask.bool()
            acc[(-1, "model")].add(  # parameters are built per chunk: one extra model in memory at a time
                {
                    a: logits(space, space.point({task: a}), chunk.input_ids, chunk.attention_mask)[valid]
                    for a in points
                }
            )
            hidden, kwargs = layer_inputs(space.model, layers[0], chunk.input_ids, chunk.attention_mask)
            for i, layer in enumerate(layers):
                params = {a: space.layer_params(f"{prefix}.{i}.", {task: a}) for a in points}
                attn = {a: attention_block(layer, params[a], hidden, kwargs) for a in points}
                middle = hidden + attn[0.0]
                mlp = {a: mlp_block(layer, params[a], middle) for a in points}
                out = {a: _layer_out(layer, params[a], hidden, kwargs) for a in points}
                for kind, outputs in (("layer", out), ("attn", attn), ("mlp", mlp)):
                    acc[(i, kind)].add({a: value[valid] for a, value in outputs.items()})
                hidden = out[0.0]  # the pre-trained layer's output feeds the next layer
    rows = []
    for (i, kind), accumulator in acc.items():
        name = (
            "model"
            if kind == "model"
            else f"layers.{i}" + {"layer": "", "attn": ".self_attn", "mlp": ".mlp"}[kind]
        )
        for a, score in accumulator.scores().items():
            rows.append(
                {
                    "task": task,
                    "kind": kind,
                    "layer": i if i >= 0 else None,
                    "submodule": name,
                    "alpha": a,
                    "score": score,
                }
            )
    return rows


def linearity_table(
    space: TaskVectorSpace,
    batches: Mapping[str, AnswerBatch],
    alphas: Sequence[float] = ALPHAS,
    batch_size: int = 8,
) -> pd.DataFrame:
    """One row per (task, submodule, alpha): columns task, kind, layer, submodule, alpha, score."""
    rows = [
        row
        for task, batch in batches.items()
        for row in task_linearity(space, task, batch, alphas, batch_size)
    ]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def linearity_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean NL over alphas: rows = kind (layer/attn/mlp averaged over layers, model), cols = task."""
    per_kind = frame.groupby(["kind", "task"])["score"].mean().unstack("task")
    per_kind = per_kind.reindex([k for k in KINDS if k in per_kind.index])
    per_kind["mean"] = per_kind.mean(axis=1)
    return per_kind


def linearity_markdown(frame: pd.DataFrame) -> str:
    """Per-submodule table (mean NL over the alphas), then the per-kind summary, as Markdown."""
    detail = frame.groupby(["submodule", "task"], sort=False)["score"].mean().unstack("task")
    alphas = ", ".join(f"{a:g}" for a in sorted(frame["alpha"].unique()))
    return (
        f"Non-linearity NL (mean over a in {{{alphas}}}; 0 = linear in the weights)\n\n"
        + markdown_table(linearity_summary(frame), "kind")
        + "\n"
        + markdown_table(detail, "submodule")
    )


def linearity_figure(frame: pd.DataFrame, title: str = "Non-linearity in the weights") -> Figure:
    """NL (mean over alphas) per layer: one panel per task, a line per kind, the model dashed."""
    tasks = list(dict.fromkeys(frame["task"]))
    fig = Figure(figsize=(3.2 * len(tasks) + 0.6, 3.2), dpi=100)
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    for ax, task in zip(axes, tasks):
        rows = frame[frame["task"] == task]
        for kind, marker in (("layer", "o"), ("attn", "s"), ("mlp", "^")):
            line = rows[rows["kind"] == kind].groupby("layer")["score"].mean()
            ax.plot(line.index.astype(int), line.to_numpy(float), marker=marker, label=kind)
        model = rows[rows["kind"] == "model"]["score"].mean()
        ax.axhline(model, color="black", linestyle="--", label="whole model")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(int(i) for i in rows["layer"].dropna().unique()))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("NL (mean over a)")
    axes[-1].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def linearity_report(
    base: str | Path,
    finetunes: Mapping[str, str | Path],
    calibration: Mapping[str, str | Path],
    out_dir: str | Path,
    alphas: Sequence[float] = ALPHAS,
    data: DataSettings = DataSettings(),
) -> tuple[pd.DataFrame, list[Path]]:
    """`merge-harness analyze linearity`: the table (also CSV + Markdown) and the plot (PNG+SVG)."""
    from merge_harness.reports.plots import save

    space = load_space(base, finetunes)
    tokenizer = load_tokenizer(base)
    batches = {task: answer_batch(calibration[task], tokenizer, data) for task in finetunes}
    frame = linearity_table(space, batches, alphas, data.batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "linearity.csv", index=False)
    (out / "linearity.md").write_text(linearity_markdown(frame))
    paths, _ = save(linearity_figure(frame), out / "linearity")
    return frame, [out / "linearity.csv", out / "linearity.md", *paths]
