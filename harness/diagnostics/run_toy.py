"""Run every diagnostic on the toy zoo: `python -m harness.diagnostics.run_toy [--size toy]`.

1. the zoo (`harness.zoo.build_zoo`, cached) gives the base and the full fine-tunes; the same
   fine-tuning recipe with `trainable: attn_only` (and `mlp_only`) gives the other variants,
   cached next to the zoo;
2. held-out train data: `train_pairs(task, n + HELD_OUT, seed)` draws the zoo's n fine-tuning
   rows first (same seeded stream) and then HELD_OUT more, never seen in fine-tuning and never
   a test prompt; only those extra rows are used for selection and scoring;
3. linearity (calibration = the zoo's train rows, as SLTA), disentanglement (held-out rows),
   the lambda search (held-out rows) and SLTA's coefficients, written under `--out`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd

from harness.calibration import Example
from harness.diagnostics.data import DataSettings, answer_batch
from harness.diagnostics.disentanglement import disentanglement_report
from harness.diagnostics.linearity import linearity_report, linearity_summary
from harness.diagnostics.search import (
    SearchPoint,
    SearchSpec,
    held_out_score,
    search_coefficient,
    search_report,
)
from harness.diagnostics.slta_report import slta_report
from harness.diagnostics.tables import markdown_table
from harness.finetune import TrainingSettings, save_model, train
from harness.models import load_pretrained, load_tokenizer, torch_threads
from harness.toytasks import TASKS, train_pairs
from harness.zoo import SIZES, Zoo, build_zoo, write_pairs

HELD_OUT = 64
GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # disentanglement heatmaps
VARIANTS = ("full", "attn_only", "mlp_only")  # "full" is required (SLTA and lambda reference)


def zoo_spec(zoo: Zoo) -> dict:
    """The spec the zoo was built with (its zoo.json): sizes, seed and the fine-tuning recipe."""
    return json.loads((zoo.root / "zoo.json").read_text())["spec"]


def variant_finetunes(zoo: Zoo, trainable: str) -> dict[str, Path]:
    """The zoo's fine-tunes (`full`), or its fine-tuning recipe training only some tensors (cached)."""
    if trainable == "full":
        return dict(zoo.finetunes)
    spec = zoo_spec(zoo)
    root = zoo.root.parent / f"{zoo.root.name}-{trainable}"
    dirs = {task: root / task for task in TASKS}
    settings = TrainingSettings.model_validate(spec["finetune"]).model_copy(
        update={"trainable": trainable, "seed": spec["seed"]}
    )
    tokenizer = load_tokenizer(zoo.base)
    for task, out in dirs.items():
        if (out / "config.json").is_file():
            continue
        rows = [json.loads(line) for line in zoo.train_data[task].read_text().splitlines()]
        model = load_pretrained(zoo.base)
        train(model, tokenizer, [Example(r["prompt"], r["response"]) for r in rows], settings, False)
        save_model(model, tokenizer, out, {"trainable": trainable, "settings": settings.model_dump()})
    return dirs


def held_out_data(zoo: Zoo, out: Path) -> dict[str, Path]:
    """HELD_OUT train-distribution rows per task that the fine-tunes never saw."""
    spec = zoo_spec(zoo)
    count, pairs = spec["train_examples"], {}
    for task in TASKS:
        rows = train_pairs(task, count + HELD_OUT, spec["seed"])
        seen = [json.loads(line) for line in zoo.train_data[task].read_text().splitlines()]
        if rows[:count] != seen:
            raise RuntimeError(f"{task}: the zoo's train rows are not a prefix of train_pairs (zoo changed?)")
        pairs[task] = rows[count:]
    paths = write_pairs(out / "held_out", pairs)
    return {task: paths[task] for task in TASKS}


def own_scores(
    base: Path, variants: dict[str, dict[str, Path]], held_out: dict[str, Path], data
) -> pd.DataFrame:
    """Held-out mean answer log-likelihood of the base and of each fine-tune on its own task."""
    tokenizer = load_tokenizer(base)
    batches = {t: answer_batch(held_out[t], tokenizer, data) for t in TASKS}
    rows = {"base": {t: base for t in TASKS}} | variants
    return pd.DataFrame(
        {
            name: {t: held_out_score(load_pretrained(dirs[t]), batches[t], "log_likelihood") for t in TASKS}
            for name, dirs in rows.items()
        }
    ).T


def retained_gain(own: pd.DataFrame, merges: dict[str, tuple[str, SearchPoint]]) -> pd.DataFrame:
    """(LL_merge - LL_base) / (LL_fine-tune - LL_base) per task; merges: label -> (variant, point)."""
    rows = {}
    for label, (variant, point) in merges.items():
        base, tuned = own.loc["base"], own.loc[variant]
        gain = {t: (point.scores[t] - base[t]) / (tuned[t] - base[t]) for t in TASKS}
        rows[label] = {**gain, "mean": sum(gain.values()) / len(gain)}
    return pd.DataFrame(rows).T


def search_sections(
    zoo: Zoo, finetunes: dict, held_out: dict, out: Path, data: DataSettings, own: pd.DataFrame
) -> tuple[list, dict]:
    """Task arithmetic's lambda per variant, and SLTA's merges scored on the same held-out rows."""
    forbidden = list(zoo.test_data.values())
    searches = {
        v: search_report(zoo.base, dirs, held_out, out / f"search_{v}", SearchSpec(), data, forbidden)[0]
        for v, dirs in finetunes.items()
    }
    merges = {}
    for v, result in searches.items():
        for value in (result.chosen, 1.0):
            merges[f"task arithmetic, {v}, lambda = {value:g}"] = (
                v,
                next(p for p in result.curve if p.value == value),
            )
    for granularity in ("attn_mlp", "layer"):  # one "grid point": SLTA's merge, scored the same way
        spec = SearchSpec(
            method="slta",
            parameter="ridge",
            grid=(1e-8,),
            calibration=dict(zoo.train_data),
            fixed={"granularity": granularity, "num_samples": 30},
        )
        slta = search_coefficient(zoo.base, finetunes["full"], held_out, spec, data, forbidden)
        merges[f"slta ({granularity}), full"] = ("full", slta.curve[0])
    sections = ["## Lambda search (held-out train rows)\n"]
    sections += [
        f"- {v}: chosen lambda {r.chosen:g}, mean log-likelihood {r.best_score:.4f}"
        for v, r in searches.items()
    ]
    sections += [
        "\n## Gain retained by the merge: (LL_merge - LL_base) / (LL_fine-tune - LL_base)\n",
        markdown_table(retained_gain(own, merges), "merge"),
    ]
    return sections, searches


def run(zoo: Zoo, out: Path, variants: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    finetunes = {v: variant_finetunes(zoo, v) for v in variants}
    held_out = held_out_data(zoo, out)
    spec = zoo_spec(zoo)
    data = DataSettings(num_samples=16, seed=spec["seed"], template="chat", max_length=192)
    all_rows = replace(data, num_samples=HELD_OUT)
    own = own_scores(zoo.base, finetunes, held_out, all_rows)
    sections = [
        f"# Diagnostics on the {spec['size']} zoo ({zoo.root.name})\n",
        "## Held-out answer log-likelihood (nats/token), each model on each task\n",
        markdown_table(own, "model"),
    ]
    for variant, dirs in finetunes.items():
        frame, _ = linearity_report(zoo.base, dirs, zoo.train_data, out / f"linearity_{variant}", data=data)
        sections += [
            f"## Linearity, {variant} fine-tunes\n",
            markdown_table(linearity_summary(frame), "kind"),
        ]
    disentanglement_report(zoo.base, finetunes, held_out, out / "disentanglement", GRID, data)
    sections += ["## Disentanglement\n", (out / "disentanglement" / "disentanglement.md").read_text()]
    searched, searches = search_sections(zoo, finetunes, held_out, out, all_rows, own)
    sections += searched
    for granularity in ("attn_mlp", "layer"):
        slta_report(
            zoo.base,
            finetunes["full"],
            zoo.train_data,
            out / "slta",
            searches["full"].chosen,
            granularity,
            replace(data, num_samples=30),
        )
        sections += [
            f"## SLTA coefficients ({granularity})\n",
            (out / "slta" / f"slta_{granularity}.md").read_text(),
        ]
    (out / "summary.md").write_text("\n".join(sections))
    print(f"wrote {out}/summary.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="toy", choices=sorted(SIZES))
    parser.add_argument("--root", type=Path, default=Path("~/.cache/merge-harness/zoo").expanduser())
    parser.add_argument("--out", type=Path, default=Path("docs/results/diagnostics"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="full,attn_only,mlp_only")
    parser.add_argument("--zoo-dir", type=Path, help="an already built zoo directory (skips build_zoo)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models)")
    args = parser.parse_args(argv)
    if "full" not in args.variants.split(","):
        parser.error("--variants must include full (the reference for SLTA and the lambda search)")
    with torch_threads(args.threads):
        if args.zoo_dir:
            zoo = Zoo.at(args.zoo_dir.expanduser())
        else:
            zoo = build_zoo(args.root, size=args.size, seed=args.seed, show_progress=False)
        run(zoo, args.out, tuple(args.variants.split(",")))


if __name__ == "__main__":
    main()
