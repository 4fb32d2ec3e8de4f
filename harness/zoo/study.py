"""The SLTA study's zoo (issue 18): SmolLM2-135M-Instruct fully fine-tuned per study task, 3 seeds.

The paper's setting (Dai et al., ICLR 2025): one pre-trained model, *full* fine-tunes on Math,
Code and Translate, chat-formatted. Here: the real SmolLM2-135M-Instruct, the study suite
(`merge_harness.zoo.studytasks`), its own chat template (ChatML; the paper's FastChat template
is its Llama-2 fine-tunes' chat format, this is SmolLM2's), and for the disentanglement claim of
seed 002 (Jin et al., ICLR 2025) the same recipe fine-tuning the attention projections only.
Seeds change the data order and the initial optimizer state; every seed trains on the same rows
(`data_seed` 0), so the seeds measure the training's variance, not the data's.

`build_study_zoos` builds (or reuses, from the cache under `cache`) each (variant, seed) zoo and
gives it a stable name, `out/<variant>-seed<seed>` (a symlink), with its held-out train rows in
`<zoo>/data/<task>_held_out.jsonl`: rows of the same stream the fine-tunes never saw, for the
held-out searches, the residuals and the disentanglement error. `experiments/slta_study.yaml`
names the models by those paths.
"""

from __future__ import annotations

import os
from pathlib import Path

from merge_harness.core.errors import ConfigError
from merge_harness.zoo.zoos import (
    SIZES,
    SMOLLM2_FINETUNE,
    Zoo,
    build_smollm2_zoo,
    build_zoo,
    held_out_pairs,
    write_pairs,
)

VARIANTS = ("full", "attn_only")
SEEDS = (0, 1, 2)
STUDY_EXAMPLES = 240  # fine-tuning rows per task: 15 steps of 16 (one epoch)
HELD_OUT_ROWS = 64  # per task: the held-out searches and residuals
# As the attention-only SmolLM2 zoo, fully trained and without weight decay (the paper's FastChat
# recipe has none); a full step of 16 rows of ~60 tokens is ~6 s on the 2-core machine.
STUDY_FINETUNE = SMOLLM2_FINETUNE.model_copy(update={"trainable": "full", "micro_batch_size": 16,
                                                     "weight_decay": 0.0})


STUDY_SIZES = ("smollm2", "ci")  # ci: the toy zoo's tiny base, for the tests of the whole study
CI_EXAMPLES = 64


def study_zoo(cache: Path, variant: str, seed: int, size: str = "smollm2", show_progress: bool = True) -> Zoo:
    """The zoo of one variant and seed, built on the first call, with its held-out rows."""
    if size not in STUDY_SIZES:
        raise ConfigError(f"unknown study zoo size {size!r}; known: {', '.join(STUDY_SIZES)}")
    if size == "ci":
        base = build_zoo(cache, size="ci", show_progress=show_progress).base
        settings, examples = SIZES["ci"].finetune, CI_EXAMPLES
    else:
        base, settings, examples = None, STUDY_FINETUNE, STUDY_EXAMPLES
    zoo = build_smollm2_zoo(cache, base=base, suite="study", examples=examples, seed=seed, data_seed=0,
                            settings=settings.model_copy(update={"trainable": variant}),
                            show_progress=show_progress)
    if not all(held_out_path(zoo, task).is_file() for task in zoo.finetunes):
        write_pairs(zoo.root / "data", held_out_pairs(zoo, HELD_OUT_ROWS), "held_out")
    return zoo


def held_out_path(zoo: Zoo, task: str) -> Path:
    return zoo.root / "data" / f"{task}_held_out.jsonl"


def link_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def build_study_zoos(
    out: Path,
    cache: Path,
    variants: tuple[str, ...] = VARIANTS,
    seeds: tuple[int, ...] = SEEDS,
    size: str = "smollm2",
    show_progress: bool = True,
) -> dict[str, Zoo]:
    """Every (variant, seed) zoo, linked as `out/<variant>-seed<seed>`; name -> zoo."""
    out.mkdir(parents=True, exist_ok=True)
    zoos = {}
    for variant in variants:
        for seed in seeds:
            zoo = study_zoo(cache, variant, seed, size, show_progress)
            name = link_name(variant, seed)
            link = out / name
            if (link.is_symlink() or link.exists()) and link.resolve() != zoo.root.resolve():
                link.unlink()
            if not link.exists():
                tmp = out / f".{name}.link"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(zoo.root.resolve(), target_is_directory=True)
                os.replace(tmp, link)  # atomic: the name always points at a whole zoo
            zoos[name] = zoo
    return zoos
