"""The SLTA study's report (issue 18): `merge-harness study report`.

Reads a replicated experiment (`experiments/slta_study.yaml`, run with `merge-harness run`) from
its store and the study zoo it ran on, and writes under `out`:

- `table.md` / `table.csv`: every row's score per task, mean over seeds +- the 95% t interval
  (`merge_harness.reports.replicates`), what each seed chose (lambda, c), the per-seed points;
- `paired.md`: each SLTA row against task arithmetic at its held-out lambda (a section per
  searched TA row, i.e. per selection metric), per task, pooled over the seeds (paired
  bootstrap; Koehn's for BLEU);
- `scores.png/.svg`: the scores with their intervals and every seed's point;
- `coefficients_<row>.png/.svg`: SLTA's a_t per submodule per task, mean over seeds with the
  seeds' range, next to the held-out lambda;
- `residuals.md`: SPEC section 4's objective on held-out train rows, sum_t sum_x ||sum_k a_k
  D_k(x) - D_t(x)||^2 over the submodules, relative to sum ||D_t||^2 (1 = the pre-trained model,
  a = 0), for SLTA's solved coefficients and for every selected (and the oracle) lambda;
- `disentanglement.md` / `.csv`: seed 002's weight-disentanglement error xi of full against
  attention-only fine-tunes per task pair over the seeds, and their difference paired by seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from merge_harness.core.atomic import atomic_write_text
from merge_harness.diagnostics.disentanglement import disentanglement_table, model_answer_logits, self_change
from merge_harness.diagnostics.slta_report import finish_coefficient_axes
from merge_harness.diagnostics.space import load_space
from merge_harness.diagnostics.tables import markdown_table
from merge_harness.io.models import load_tokenizer
from merge_harness.reports.frame import AVERAGE
from merge_harness.reports.plots import save, submodule_order
from merge_harness.reports.replicates import (
    Replicates,
    interval_table,
    load_replicates,
    per_seed_table,
    pooled_paired_test,
    t_interval,
)
from merge_harness.selection.answers import DataSettings, answer_batch
from merge_harness.store.database import ResultStore

BASELINE = "TA (held-out lambda)"
DISENTANGLEMENT_ALPHAS = (0.0, 0.5, 1.0)
DISENTANGLEMENT_ROWS = 32  # held-out rows per task
GAP = "full - attn_only"
RESIDUAL_ROWS = 64  # held-out rows per task


def corpus_scores() -> dict[str, Callable[[list], float]]:
    """The corpus metrics' own aggregations (sacreBLEU), as the task YAMLs use them."""
    from merge_harness.tasks.wmt22_zh_en.utils import corpus_bleu, corpus_chrf

    return {"bleu": corpus_bleu, "chrf": corpus_chrf}


# ------------------------------------------------------------------------------- the tables


def method_rows(replicates: Replicates, method: str, chosen: str | None = None) -> list[str]:
    """The rows of `method` (in table order; `chosen`: only those whose parameters were chosen
    so, e.g. "held-out"), as named across seeds."""
    seed = replicates.seeds[0]
    rows = replicates.tables[seed].rows
    return [replicates.row_id(seed, label) for label in replicates.tables[seed].blocks[0].values.index
            if rows.at[label, "method"] == method and chosen in (None, rows.at[label, "chosen"])]


def slta_rows(replicates: Replicates) -> list[str]:
    return method_rows(replicates, "slta")


def baseline_rows(replicates: Replicates) -> list[str]:
    """The fair baselines: task arithmetic with lambda chosen on held-out rows (each metric)."""
    return method_rows(replicates, "task_arithmetic", "held-out")


def chosen_values(replicates: Replicates) -> dict[str, str]:
    """row -> the parameters each seed's search (or oracle) picked, 'lambda=0.45 / lambda=0.5'."""
    picked: dict[str, list[str]] = {}
    for seed, table in replicates.tables.items():
        for label in table.blocks[0].values.index:
            if table.rows.at[label, "chosen"] in ("held-out", "oracle"):
                text = str(table.rows.at[label, "params_text"]).split(" (")[0]
                picked.setdefault(replicates.row_id(seed, label), []).append(text)
    return {row: " / ".join(values) for row, values in picked.items()}


def study_table(replicates: Replicates) -> tuple[str, pd.DataFrame]:
    """The Markdown table (mean ± interval; the seeds' choices) and the per-seed CSV frame."""
    scores = replicates.scores()
    table = interval_table(scores)
    choices = chosen_values(replicates)
    table["chosen per seed"] = [choices.get(row, "") for row in table.index]
    seeds = ", ".join(map(str, replicates.seeds))
    text = (f"Scores in points, mean over seeds {seeds} ± the 95% Student-t interval "
            f"(n = {len(replicates.seeds)}). {AVERAGE} = mean over the tasks.\n\n"
            + markdown_table(table, "model"))
    return text, per_seed_table(scores)


def paired_table(store: ResultStore, replicates: Replicates, baseline: str = BASELINE) -> pd.DataFrame:
    """Each SLTA row against `baseline` per task, pooled over seeds: difference [95%], p."""
    first = replicates.tables[replicates.seeds[0]]
    columns = [c.title for c in first.columns]
    rows = {}
    for row in slta_rows(replicates):
        cells = {}
        for column in columns:
            test = pooled_paired_test(store, replicates, row, baseline, column, corpus_scores())
            cells[column] = "–" if test is None else (
                f"{test.difference:+.1f} [{test.low:+.1f}, {test.high:+.1f}], p = {test.p_value:.3g}"
                + (" *" if test.significant else ""))
        rows[row] = cells
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


ABLATION = re.compile(r"N=\d+|plain calibration")


def compared_rows(replicates: Replicates, scores: pd.DataFrame) -> list[str]:
    """The rows of the scores plot: the pre-trained model and every merge but the N / template
    ablations (the tables have those)."""
    finetunes = set(replicates.configs[replicates.seeds[0]]["finetunes"])
    return [row for row in dict.fromkeys(scores["row"])
            if row not in finetunes and not ABLATION.search(row)]


def scores_figure(scores: pd.DataFrame, rows: Sequence[str]) -> Figure:
    """Per task: a bar per row (mean over seeds), its 95% interval, and each seed's point."""
    columns = list(dict.fromkeys(scores["column"]))
    fig = Figure(figsize=(2.2 + 0.45 * len(rows) * len(columns) / 2, 4.2), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    colors = colormaps["tab20"].colors
    for r, row in enumerate(rows):
        means, halves, xs = [], [], []
        for c, column in enumerate(columns):
            values = scores[(scores["row"] == row) & (scores["column"] == column)]["value"].tolist()
            mean, half = t_interval(values)
            x = c + (r - (len(rows) - 1) / 2) * width
            means.append(mean)
            halves.append(0.0 if math.isnan(half) else half)
            xs.append(x)
            ax.scatter([x] * len(values), values, s=6, color="black", zorder=3)
        ax.bar(xs, means, width * 0.95, yerr=halves, capsize=2, label=row, color=colors[r % len(colors)])
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("points (mean over seeds, 95% interval; dots: seeds)")
    ax.legend(fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ coefficients


def coefficients_over_seeds(store: ResultStore, replicates: Replicates, row: str) -> pd.DataFrame:
    """seed, submodule, task, value of one SLTA row's solved coefficients in every seed."""
    frames = []
    for seed in replicates.seeds:
        label = replicates.label_of(seed, row)
        if label is None:
            continue
        results = replicates.results[seed]
        key = results.loc[results["label"] == label, "key"].iloc[0]
        frames.append(store.coefficients_frame(key).assign(seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def coefficients_figure(coefficients: pd.DataFrame, lambdas: Sequence[float], title: str) -> Figure:
    """a_t per submodule (layer order), a line per task (mean over seeds, band = seeds' range);
    the held-out lambda of task arithmetic dashed (its mean over seeds)."""
    layers = coefficients[coefficients["submodule"] != "non_layer"]
    order = sorted(layers["submodule"].unique(), key=submodule_order)
    fig = Figure(figsize=(max(5.0, 0.18 * len(order) + 2.5), 3.6), dpi=100)
    ax = fig.add_subplot()
    for task, rows in layers.groupby("task", sort=False):
        grid = rows.pivot_table(index="submodule", columns="seed", values="value").reindex(order)
        x = np.arange(len(order))
        ax.plot(x, grid.mean(axis=1).to_numpy(float), marker=".", label=str(task))
        ax.fill_between(x, grid.min(axis=1).to_numpy(float), grid.max(axis=1).to_numpy(float), alpha=0.2)
    if lambdas:
        ax.axhline(float(np.mean(lambdas)), color="black", linestyle="--",
                   label=f"TA held-out lambda (mean {np.mean(lambdas):.2f})")
    finish_coefficient_axes(ax, order, title, max_ticks=30)
    fig.tight_layout()
    return fig


def chosen_parameter(replicates: Replicates, row: str, parameter: str) -> dict[int, float]:
    """seed -> the value of `parameter` that `row` used (its search's choice or its grid point)."""
    found = {}
    for seed, table in replicates.tables.items():
        label = replicates.label_of(seed, row)
        if label is not None and parameter in (params := table.rows.at[label, "params"]):
            found[seed] = float(params[parameter])
    return found


# ------------------------------------------------------------------------------- residuals


def held_out_residuals(
    base: str | Path,
    finetunes: Mapping[str, str | Path],
    held_out: Mapping[str, str | Path],
    granularity: str,
    coefficient_sets: Mapping[str, Callable[[str], torch.Tensor]],
    num_samples: int = RESIDUAL_ROWS,
    template: str = "chat",
) -> dict[str, float]:
    """SPEC section 4's objective on held-out rows for each set of coefficients, relative to
    sum_t sum_x ||D_t(x)||^2. `coefficient_sets`: name -> (submodule name -> a (T,), the tasks
    in `finetunes` order)."""
    from merge_harness.merge.config import MergeConfig
    from merge_harness.merge.data_driven import calibration_features, method_params
    from merge_harness.merge.plan import build_plan
    from merge_harness.merges.slta import collect_equations

    config = MergeConfig(
        method="slta",
        base_model=str(base),
        models=[{"model": str(path), "calibration": {"source": str(held_out[task]), "template": template}}
                for task, path in finetunes.items()],
        parameters={"granularity": granularity, "num_samples": num_samples},
        calibration={"allow_fewer": True, "max_length": 256},
    )
    plan = build_plan(config)
    try:
        params = method_params(plan)
        systems = collect_equations(calibration_features(config, plan, params), params)
    finally:
        plan.close()
    target = sum(eq.target for eq in systems.values())
    return {name: sum(eq.residual(a_of(sub.name)) for sub, eq in systems.items()) / target
            for name, a_of in coefficient_sets.items()}


def stored_coefficients(coefficients: pd.DataFrame, tasks: Sequence[str]) -> Callable[[str], torch.Tensor]:
    """submodule name -> a (T,) from one seed's stored SLTA coefficients (a `model`-granularity
    row has one group for every submodule)."""
    grid = coefficients.pivot_table(index="submodule", columns="task", values="value")[list(tasks)]
    single = grid.index.tolist() == ["model"] or set(grid.index) == {"model", "non_layer"}

    def a_of(submodule: str) -> torch.Tensor:
        return torch.tensor(grid.loc["model" if single else submodule].to_numpy(float))

    return a_of


def uniform(value: float, count: int) -> Callable[[str], torch.Tensor]:
    return lambda _submodule: torch.full((count,), float(value), dtype=torch.float64)


# -------------------------------------------------------------------------- disentanglement


def disentanglement_over_seeds(
    zoos: Mapping[tuple[str, int], tuple[str | Path, Mapping[str, str | Path], Mapping[str, str | Path]]],
    alphas: Sequence[float] = DISENTANGLEMENT_ALPHAS,
    rows: int = DISENTANGLEMENT_ROWS,
    template: str = "chat",
) -> pd.DataFrame:
    """(variant, seed) -> (base, fine-tunes, held-out rows): mean xi over the grid per task pair,
    and xi / (2 x the pair's mean self-change), one row per (variant, seed, pair)."""
    records = []
    data = DataSettings(num_samples=rows, template=template)
    for (variant, seed), (base, finetunes, held_out) in zoos.items():
        tokenizer = load_tokenizer(base)
        space = load_space(base, finetunes)
        batches = {task: answer_batch(held_out[task], tokenizer, data) for task in finetunes}
        grid = disentanglement_table(space, batches, alphas, "prediction", data.batch_size)
        logits_of = model_answer_logits(space, batches, data.batch_size)
        change = {task: self_change(logits_of, task) for task in finetunes}
        for t1, t2 in combinations(finetunes, 2):
            pair = grid[(grid["task1"] == t1) & (grid["task2"] == t2)]
            xi = float(pair["xi"].mean())
            records.append({"variant": variant, "seed": seed, "pair": f"{t1}+{t2}", "xi": xi,
                            "relative": xi / (change[t1] + change[t2])})
        del space
    return pd.DataFrame.from_records(records)


def disentanglement_text(frame: pd.DataFrame, alphas: Sequence[float]) -> str:
    """Mean over seeds ± interval per pair and variant, and the full - attn_only gap paired by
    seed: the seeds are the independent replicates (the pairs share tasks, so they are not)."""
    lines = [f"Weight-disentanglement error xi (seed 002; dist = prediction error), mean over "
             f"a1, a2 in {{{', '.join(f'{a:g}' for a in alphas)}}} on held-out train rows; per "
             "variant the mean over seeds ± the 95% t interval; full - attn_only paired by seed. "
             "Relative = xi / (2 x the pair's mean self-change): interference per unit of what "
             "the task vectors do alone.\n"]
    for value in ("xi", "relative"):
        wide = frame.pivot_table(index=["pair", "seed"], columns="variant", values=value, sort=False)
        wide = wide[sorted(wide.columns, key=lambda v: (v != "full", v != "attn_only", v))]
        paired = {"full", "attn_only"} <= set(wide.columns)
        if paired:
            wide[GAP] = wide["full"] - wide["attn_only"]
        table = {
            pair: {c: _interval_text(group[c].dropna().tolist(), signed=c == GAP) for c in wide}
            for pair, group in wide.groupby(level="pair", sort=False)
        }
        shown = pd.DataFrame.from_dict(table, orient="index")
        lines.append(f"\n### {value}\n\n" + markdown_table(shown, "pair"))
        if paired:
            per_seed = wide[GAP].groupby(level="seed").mean().dropna()
            mean, half = t_interval(per_seed.tolist())
            verdict = "includes 0" if math.isnan(half) or abs(mean) <= half else "excludes 0"
            lines.append(f"\nfull - attn_only, the mean over pairs paired over the {len(per_seed)} seeds: "
                         f"{mean:+.4f} ± {half:.4f} (95% t interval) — {verdict}\n")
    return "".join(lines)


def _interval_text(values: Sequence[float], signed: bool) -> str:
    mean, half = t_interval(values)
    return f"{mean:+.4f} ± {half:.4f}" if signed else f"{mean:.4f} ± {half:.4f}"


# ----------------------------------------------------------------------------------- writing


def write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def row_granularity(replicates: Replicates, row: str) -> str | None:
    seed = replicates.seeds[0]
    label = replicates.label_of(seed, row)
    if label is None:
        return None
    return replicates.tables[seed].rows.at[label, "params"].get("granularity", "attn_mlp")


def residual_frame(store: ResultStore, replicates: Replicates,
                   num_samples: int = RESIDUAL_ROWS) -> pd.DataFrame:
    """seed, granularity, coefficients (row), relative residual on held-out rows: SLTA's rows at
    their own granularity, task arithmetic's held-out lambdas (each selection metric) and its
    oracle lambda at both."""
    records = []
    uniform_rows = [*baseline_rows(replicates), *method_rows(replicates, "task_arithmetic", "oracle")]
    lambdas = {row: chosen_parameter(replicates, row, "lambda") for row in uniform_rows}
    solved = {row: (row_granularity(replicates, row), coefficients_over_seeds(store, replicates, row))
              for row in slta_rows(replicates)}  # every seed's, read once
    for seed in replicates.seeds:
        finetunes = replicates.configs[seed]["finetunes"]
        tasks = list(finetunes)
        models = {task: ft["model"] for task, ft in finetunes.items()}
        held_out = {task: ft["held_out"] for task, ft in finetunes.items()}
        for granularity in ("layer", "attn_mlp"):
            sets: dict[str, Callable[[str], torch.Tensor]] = {}
            for row, chosen in lambdas.items():
                if seed in chosen:
                    sets[f"{row} = {chosen[seed]:g}"] = uniform(chosen[seed], len(tasks))
            for row, (own, coefficients) in solved.items():
                if (own == "attn_mlp") != (granularity == "attn_mlp") or coefficients.empty:
                    continue
                mine = coefficients[coefficients["seed"] == seed]
                if not mine.empty:
                    sets[row] = stored_coefficients(mine, [_coefficient_task(mine, t) for t in tasks])
            base = replicates.configs[seed]["base_model"]
            found = held_out_residuals(base, models, held_out, granularity, sets, num_samples)
            for name, value in found.items():
                records.append({"seed": seed, "granularity": granularity,
                                "coefficients": name.split(" = ")[0], "relative residual": value})
    return pd.DataFrame.from_records(records)


def _coefficient_task(coefficients: pd.DataFrame, task: str) -> str:
    """The coefficients' name for a fine-tune: its label, as the merge's task labels name it."""
    names = set(coefficients["task"])
    return task if task in names else next(n for n in names if Path(str(n)).name == task)


def residual_text(frame: pd.DataFrame) -> str:
    table = {}
    for (granularity, name), group in frame.groupby(["granularity", "coefficients"], sort=False):
        mean, half = t_interval(group["relative residual"].tolist())
        table[(granularity, name)] = f"{mean:.4f} ± {half:.4f}"
    index = pd.MultiIndex.from_tuples(table, names=["equations", "coefficients"])
    shown = pd.DataFrame({"relative residual (mean ± 95%)": list(table.values())}, index=index)
    shown.index = [f"{g}: {n}" for g, n in shown.index]
    return ("SPEC section 4 objective on held-out train rows (rows the fine-tunes and the "
            "calibration never saw), sum over submodules of sum_t sum_x ||sum_k a_k D_k(x) - D_t(x)||^2 "
            "divided by sum ||D_t(x)||^2 (1 = the pre-trained model, a = 0; lower = the merged "
            "submodules move as each fine-tune does on its own task). `layer` equations: decoder "
            "layers; `attn_mlp`: attention and MLP blocks.\n\n" + markdown_table(shown, "coefficients"))


def write_study_report(store: ResultStore, name: str, zoo_dir: Path | None, out: Path,
                       residuals: bool = True, disentanglement: bool = True) -> list[Path]:
    """Every file of the module docstring under `out`; `zoo_dir`: the study zoo's links (for
    the attention-only fine-tunes of the disentanglement table)."""
    from merge_harness.zoo.study import link_name

    out.mkdir(parents=True, exist_ok=True)
    replicates = load_replicates(store, name)
    text, per_seed = study_table(replicates)
    files = [write_text(out / "table.md", text)]
    per_seed.to_csv(out / "table.csv")
    files.append(out / "table.csv")
    sections = [f"\n### minus {row}\n\n" + markdown_table(paired_table(store, replicates, row), "row")
                for row in baseline_rows(replicates)]
    files.append(write_text(out / "paired.md", (
        "Each SLTA row minus task arithmetic at its held-out lambda (one section per selection "
        f"metric), per task, pooled over seeds {replicates.seeds}: the mean difference in points "
        "[its 95% bootstrap interval], two-sided p; * = p < 0.05. Exact match and pass@1: paired "
        "bootstrap over every seed's test documents; BLEU: Koehn's paired bootstrap resampling "
        "(corpus BLEU recomputed per resample, averaged over seeds).\n" + "".join(sections))))
    scores = replicates.scores()
    files += save(scores_figure(scores, compared_rows(replicates, scores)), out / "scores")[0]
    lambdas = list(chosen_parameter(replicates, BASELINE, "lambda").values())
    for row in slta_rows(replicates):
        if row_granularity(replicates, row) == "model":
            continue
        coefficients = coefficients_over_seeds(store, replicates, row)
        if not coefficients.empty:
            stem = "coefficients_" + re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")
            files += save(coefficients_figure(coefficients, lambdas, f"{row}: a_t per submodule"),
                          out / stem)[0]
    if residuals:
        frame = residual_frame(store, replicates)
        frame.to_csv(out / "residuals.csv", index=False)
        files += [out / "residuals.csv", write_text(out / "residuals.md", residual_text(frame))]
    if disentanglement and zoo_dir is not None:
        zoos = {}
        for variant in ("full", "attn_only"):
            for seed in replicates.seeds:
                root = zoo_dir / link_name(variant, seed)
                finetunes = replicates.configs[seed]["finetunes"]
                zoos[(variant, seed)] = (root / "base", {t: root / t for t in finetunes},
                                         {t: root / "data" / f"{t}_held_out.jsonl" for t in finetunes})
        frame = disentanglement_over_seeds(zoos)
        frame.to_csv(out / "disentanglement.csv", index=False)
        text = disentanglement_text(frame, DISENTANGLEMENT_ALPHAS)
        files += [out / "disentanglement.csv", write_text(out / "disentanglement.md", text)]
    return files
