"""Every diagnostic on a zoo: `merge-harness analyze zoo [--zoo toy|smollm2]`.

1. the zoo (`merge_harness.zoo.zoos`, cached) gives the base and its fine-tunes (the "reference" variant:
   `full` for the toy zoo, `attn_only` for SmolLM2); the same fine-tuning recipe with another
   `trainable:` gives the other variants, cached next to the zoo;
2. held-out train data (`merge_harness.zoo.zoos.held_out_pairs`): rows of the fine-tuning distribution
   never seen in fine-tuning and never a test prompt, split in two disjoint halves: the lambda
   search selects on the first, and every score (own scores, disentanglement, retained gain)
   is taken on the second, so no value is scored on the rows it was chosen on;
3. linearity (calibration = the zoo's train rows, as SLTA), disentanglement (held-out rows),
   the lambda search (held-out rows) and SLTA's coefficients (reference variant), written
   under `out` with a `summary.md`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from merge_harness.core.errors import ConfigError
from merge_harness.diagnostics.disentanglement import disentanglement_report
from merge_harness.diagnostics.linearity import linearity_report, linearity_summary
from merge_harness.diagnostics.search_report import search_report
from merge_harness.diagnostics.slta_report import slta_report
from merge_harness.diagnostics.tables import markdown_table
from merge_harness.io.models import load_pretrained, load_tokenizer
from merge_harness.selection.answers import DataSettings, answer_batch
from merge_harness.selection.grid import DEFAULT_GRID
from merge_harness.selection.search import SearchPoint, SearchSpec, held_out_score, search_coefficient
from merge_harness.train.finetune import TrainingSettings, read_pairs, save_model, train
from merge_harness.zoo.zoos import Zoo, held_out_pairs, write_pairs

VARIANTS = ("full", "attn_only", "mlp_only")


@dataclass(frozen=True)
class ZooDiagnostics:
    """How much of each analysis to run: the toy zoo affords more than SmolLM2 on a CPU."""

    variants: tuple[str, ...] = VARIANTS
    held_out: int = 64  # held-out train rows per task (disentanglement, search, scores)
    linearity_samples: int = 16  # calibration rows per task for the linearity score
    slta_samples: int = 30  # calibration rows per task for SLTA
    disentanglement_grid: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    disentanglement_samples: int = 16
    lambda_grid: tuple[float, ...] = DEFAULT_GRID
    max_length: int = 192


DIAGNOSTICS_PER_ZOO = {
    "toy": ZooDiagnostics(),
    # 30 layers of 576: each variant is four fine-tunes of 135M parameters (about 25 min of one
    # CPU core), so no MLP-only variant; every grid point is a forward pass of every row, so
    # fewer rows and coarser grids (about 20 min on two cores once the fine-tunes are cached)
    "smollm2": ZooDiagnostics(
        variants=("attn_only", "full"),
        held_out=16,
        linearity_samples=8,
        slta_samples=16,
        disentanglement_grid=(0.0, 0.5, 1.0),
        disentanglement_samples=4,
        lambda_grid=(0.0, 0.25, 0.5, 0.75, 1.0),
        max_length=256,
    ),
}


@dataclass(frozen=True)
class ZooRecipe:
    """What the zoo's fine-tunes were trained on and how (read back from its zoo.json)."""

    train_examples: int
    seed: int
    finetune: TrainingSettings

    @classmethod
    def of(cls, zoo: Zoo) -> ZooRecipe:
        spec = json.loads((zoo.root / "zoo.json").read_text())["spec"]
        if "train_examples" in spec:  # merge_harness.zoo.zoos.build_zoo
            count, settings = spec["train_examples"], spec["finetune"]
        else:  # merge_harness.zoo.zoos.build_smollm2_zoo
            count, settings = spec["examples"], spec["settings"]
        finetune = TrainingSettings.model_validate(settings).model_copy(update={"seed": spec["seed"]})
        return cls(train_examples=count, seed=spec["seed"], finetune=finetune)

    @property
    def reference(self) -> str:
        """The variant the zoo itself holds: SLTA and the lambda search run on it."""
        return self.finetune.trainable


def variant_finetunes(zoo: Zoo, recipe: ZooRecipe, trainable: str) -> dict[str, Path]:
    """The zoo's fine-tunes, or its fine-tuning recipe training other tensors (cached next to it)."""
    if trainable == recipe.reference:
        return dict(zoo.finetunes)
    root = zoo.root.parent / f"{zoo.root.name}-{trainable}"
    dirs = {task: root / task for task in zoo.finetunes}
    settings = recipe.finetune.model_copy(update={"trainable": trainable})
    tokenizer = load_tokenizer(zoo.base)
    for task, out in dirs.items():
        if (out / "config.json").is_file():
            continue
        model = load_pretrained(zoo.base)
        train(model, tokenizer, read_pairs(zoo.train_data[task]), settings, False)
        save_model(model, tokenizer, out, {"trainable": trainable, "settings": settings.model_dump()})
    return dirs


def held_out_data(zoo: Zoo, count: int, out: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(selection rows, scoring rows): `count` rows per task the fine-tunes never saw, split in
    two disjoint halves, so that a value chosen on the first is scored on the second."""
    pairs = held_out_pairs(zoo, count)
    half = {task: len(rows) // 2 for task, rows in pairs.items()}
    select = write_pairs(out / "held_out", {t: rows[: half[t]] for t, rows in pairs.items()}, "select")
    score = write_pairs(out / "held_out", {t: rows[half[t] :] for t, rows in pairs.items()}, "score")
    return select, score


def own_scores(
    base: Path, variants: dict[str, dict[str, Path]], held_out: dict[str, Path], data: DataSettings
) -> pd.DataFrame:
    """Held-out mean answer log-likelihood of the base and of each fine-tune on its own task."""
    tokenizer = load_tokenizer(base)
    batches = {t: answer_batch(path, tokenizer, data) for t, path in held_out.items()}
    rows = {"base": {t: base for t in held_out}} | variants
    scores = {
        name: {
            t: held_out_score(load_pretrained(dirs[t]), batch, "log_likelihood")
            for t, batch in batches.items()
        }
        for name, dirs in rows.items()
    }
    return pd.DataFrame(scores).T


def retained_gain(own: pd.DataFrame, merges: dict[str, tuple[str, SearchPoint]]) -> pd.DataFrame:
    """(LL_merge - LL_base) / (LL_fine-tune - LL_base) per task; merges: label -> (variant, point)."""
    rows = {}
    for label, (variant, point) in merges.items():
        base, tuned = own.loc["base"], own.loc[variant]
        gain = {t: (point.scores[t] - base[t]) / (tuned[t] - base[t]) for t in own.columns}
        rows[label] = {**gain, "mean": sum(gain.values()) / len(gain)}
    return pd.DataFrame(rows).T


def search_sections(
    zoo: Zoo,
    finetunes: dict,
    held_out: tuple[dict, dict],
    out: Path,
    data: DataSettings,
    own: pd.DataFrame,
    settings: ZooDiagnostics,
    reference: str,
) -> tuple[list, dict]:
    """Task arithmetic's lambda per variant, chosen on the selection rows; every merge (the
    chosen lambda, lambda 1 and SLTA's) scored on the disjoint scoring rows."""
    forbidden = list(zoo.test_data.values())
    select, score = held_out
    searches = {
        v: search_report(
            zoo.base, dirs, select, out / f"search_{v}", SearchSpec(grid=settings.lambda_grid), data,
            forbidden,
        )[0]
        for v, dirs in finetunes.items()
    }

    def scored(variant: str, spec: SearchSpec) -> SearchPoint:
        return search_coefficient(zoo.base, finetunes[variant], score, spec, data, forbidden).curve[0]

    merges = {}
    for v, result in searches.items():
        for value in dict.fromkeys((result.chosen, 1.0)):
            merges[f"task arithmetic, {v}, lambda = {value:g}"] = (v, scored(v, SearchSpec(grid=(value,))))
    for granularity in ("attn_mlp", "layer"):  # one "grid point": SLTA's merge, scored the same way
        spec = SearchSpec(
            method="slta",
            parameter="ridge",
            grid=(1e-8,),
            calibration=dict(zoo.train_data),
            fixed={"granularity": granularity, "num_samples": settings.slta_samples},
        )
        merges[f"slta ({granularity}), {reference}"] = (reference, scored(reference, spec))
    sections = ["## Lambda search (selection half of the held-out train rows)\n"]
    sections += [
        f"- {v}: chosen lambda {r.chosen:g}, mean log-likelihood {r.best_score:.4f}"
        for v, r in searches.items()
    ]
    sections += [
        "\n## Gain retained by the merge, on the scoring half: "
        "(LL_merge - LL_base) / (LL_fine-tune - LL_base)\n",
        markdown_table(retained_gain(own, merges), "merge"),
    ]
    return sections, searches


def run_zoo_diagnostics(zoo: Zoo, out: Path, settings: ZooDiagnostics, log=print) -> Path:
    """Every analysis on `zoo` into `out`; returns the path of the `summary.md` tying them together."""
    recipe = ZooRecipe.of(zoo)
    reference = recipe.reference
    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown fine-tune variants {unknown} (known: {', '.join(VARIANTS)})")
    if reference not in settings.variants:
        raise ConfigError(f"variants {list(settings.variants)} must include the zoo's own ({reference!r})")
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - clock:6.0f} s] {message}")

    finetunes = {}
    for variant in settings.variants:
        step(f"fine-tunes: {variant}")
        finetunes[variant] = variant_finetunes(zoo, recipe, variant)
    held_out = held_out_data(zoo, settings.held_out, out)
    score_rows = held_out[1]
    data = DataSettings(
        num_samples=settings.linearity_samples, seed=recipe.seed, template="chat",
        max_length=settings.max_length,
    )
    all_rows = replace(data, num_samples=settings.held_out)
    step("held-out scores of every model")
    own = own_scores(zoo.base, finetunes, score_rows, all_rows)
    sections = [
        f"# Diagnostics on the zoo {zoo.root.name}\n",
        "## Held-out answer log-likelihood (nats/token), each model on each task\n",
        markdown_table(own, "model"),
    ]
    for variant, dirs in finetunes.items():
        step(f"linearity: {variant}")
        frame, _ = linearity_report(zoo.base, dirs, zoo.train_data, out / f"linearity_{variant}", data=data)
        sections += [
            f"## Linearity, {variant} fine-tunes\n",
            markdown_table(linearity_summary(frame), "kind"),
        ]
    step("disentanglement")
    disentanglement_report(
        zoo.base,
        finetunes,
        score_rows,
        out / "disentanglement",
        settings.disentanglement_grid,
        replace(data, num_samples=settings.disentanglement_samples),
    )
    sections += ["## Disentanglement\n", (out / "disentanglement" / "disentanglement.md").read_text()]
    step("lambda search and SLTA merges")
    searched, searches = search_sections(zoo, finetunes, held_out, out, all_rows, own, settings, reference)
    sections += searched
    for granularity in ("attn_mlp", "layer"):
        step(f"SLTA coefficients: {granularity}")
        slta_report(
            zoo.base,
            finetunes[reference],
            zoo.train_data,
            out / "slta",
            searches[reference].chosen,
            granularity,
            replace(data, num_samples=settings.slta_samples),
        )
        sections += [
            f"## SLTA coefficients ({granularity}, {reference} fine-tunes)\n",
            (out / "slta" / f"slta_{granularity}.md").read_text(),
        ]
    summary = out / "summary.md"
    summary.write_text("\n".join(sections))
    step(f"wrote {summary}")
    return summary
