"""The toy zoo: a base model and one fine-tune per toy task, built offline and deterministically.

`build_zoo` trains a byte-level BPE tokenizer and a tiny Llama from scratch. The base is
"pre-trained" on a mixture: plain text about the toy world (English and Toy prose, a glossary,
sums, whole Python functions), generic chat instructions (repeat, add, look a word up) and a few
examples of each task in the chat format, so that it knows the words, the format and a little of
each task, as a pre-trained instruct model would. Each fine-tune then trains the whole model
on its task's synthetic pairs with the tokenizer's chat template (FastChat's Vicuna v1.1), loss
on the answers only. The four tasks share words, numbers and the answer turn, so the fine-tunes
conflict: the plain average of their weights keeps only a small part of what each one learned,
and task arithmetic at its held-out lambda about two thirds (normalized gain, "toy" size).

Every step is seeded and runs on one CPU thread, so the same size and seed give bit-identical
weights on the same library versions. The result lives in `root/<size>-<hash of the zoo spec>/`,
written into a temp dir and renamed at the end; a later call with the same spec returns the
cached zoo at once.

Layout of a zoo directory::

    base/            the pre-trained model (safetensors, tokenizer with chat template)
    math/ code/ translate/ qa/       its fine-tunes
    data/<task>_train.jsonl          prompt/response pairs (fine-tuning and SLTA calibration)
    zoo.json                         the spec, the per-step losses, the task names, the template

Each fine-tune records the prompt template it was trained with (`template` in zoo.json and in
its own `finetune.json`), so that calibration renders its data the same way.

The test rows are `tasks/fixtures/toy_<task>.jsonl`, read by the lm-eval tasks `toy_<task>`
(`tasks/toy/`), which are meant to run with `apply_chat_template: true`.
`build_smollm2_zoo` fine-tunes the real SmolLM2-135M-Instruct (attention only) on the same tasks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from merge_harness.core.atomic import atomic_write_text
from merge_harness.core.errors import ConfigError
from merge_harness.io.checkpoint import replace_dir
from merge_harness.io.models import torch_threads
from merge_harness.train.finetune import TrainingSettings, save_model, train
from merge_harness.train.prompts import FASTCHAT_SYSTEM, Example, render, training_record
from merge_harness.zoo import studytasks, toytasks
from merge_harness.zoo.toytasks import (
    LMEVAL_TASKS,
    TASKS,
    documents,
    fixture_path,
    general_pairs,
    train_pairs,
)

ZOO_VERSION = 2  # bump when anything that changes the weights changes
# 2: the "toy" size retuned (issue #17): hidden 128 x 2 layers (was 96 x 4), 900 pre-training
# steps (was 300) on 20 examples per task (was 100), fine-tunes at lr 6e-4 for 120 steps (was 2e-3,
# 150). Task arithmetic now keeps about two thirds of each fine-tune's gain, not almost nothing.

# 2: prompt and answer tokenized apart (`finetune.encode`); SmolLM2's BPE had joined the two at
# the boundary, so its code fine-tune never learnt the newline and indent its answers start with.
# The toy tokenizer never joined them: its zoos are unchanged (checked bit for bit).
SMOLLM2_ZOO_VERSION = 2


@dataclass(frozen=True)
class ZooSize:
    """Model shape, data amounts and training settings of one zoo size."""

    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    documents: int  # pre-training texts
    general: int  # pre-training chat pairs (generic instructions, not the tasks)
    task_pretrain: int  # pre-training chat pairs of each task (the base has seen a little)
    train_examples: int  # fine-tuning pairs per task
    pretrain: TrainingSettings
    finetune: TrainingSettings


def _settings(**values) -> TrainingSettings:
    return TrainingSettings(schedule="cosine", max_length=160, **values)


SIZES = {
    # For tests: builds in seconds; the fine-tunes are clearly better than the base on answer loss.
    "ci": ZooSize(
        vocab_size=400,
        hidden_size=32,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=64,
        documents=400,
        general=200,
        task_pretrain=20,
        train_examples=200,
        pretrain=_settings(template="plain", max_steps=40, batch_size=16, lr=1e-2, warmup_steps=4),
        finetune=_settings(max_steps=30, batch_size=16, lr=5e-3, warmup_steps=3),
    ),
    # For the demo: fine-tunes that solve their own task, small moves from a base that already
    # copies names and numbers from its prompt, so task arithmetic keeps a good part of each one
    # (wide and shallow: task vectors interfere less). ~100 s of one CPU core to build.
    "toy": ZooSize(
        vocab_size=640,
        hidden_size=128,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=256,
        documents=3000,
        general=1500,
        task_pretrain=20,  # the base has seen each task, and is still weak at it
        train_examples=1000,
        pretrain=_settings(template="plain", max_steps=900, batch_size=32, lr=3e-3, warmup_steps=40),
        finetune=_settings(max_steps=120, batch_size=32, lr=6e-4, warmup_steps=10),  # = preset "toy"
    ),
}


@dataclass(frozen=True)
class TaskSuite:
    """A set of synthetic tasks: their train-pair stream, lm-eval names and test fixtures."""

    name: str
    tasks: tuple[str, ...]
    lmeval_tasks: dict[str, str]
    train_pairs: Callable[..., list[dict[str, str]]]  # (task, count, seed, stream="train")
    fixture_path: Callable[[str], Path]


SUITES = {
    "toy": TaskSuite("toy", TASKS, LMEVAL_TASKS, toytasks.train_pairs, toytasks.fixture_path),
    "study": TaskSuite(
        "study", studytasks.TASKS, studytasks.LMEVAL_TASKS, studytasks.train_pairs, studytasks.fixture_path
    ),
}


def task_suite(name: str) -> TaskSuite:
    if name not in SUITES:
        raise ConfigError(f"unknown task suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]


@dataclass(frozen=True)
class Zoo:
    """Where a built zoo's models and data are."""

    root: Path
    base: Path
    finetunes: dict[str, Path]  # task -> fine-tuned model dir
    train_data: dict[str, Path]  # task -> prompt/response JSONL
    tasks: dict[str, str]  # task -> lm-eval task name
    test_data: dict[str, Path] = field(default_factory=dict)  # task -> lm-eval fixture JSONL
    template: str = "chat"  # the prompt template the fine-tunes were trained with
    suite: str = "toy"  # the task suite (SUITES) its data comes from

    @classmethod
    def at(cls, root: Path, tasks: tuple[str, ...] | None = None, template: str = "chat",
           suite: str = "toy") -> Zoo:
        found = task_suite(suite)
        tasks = found.tasks if tasks is None else tasks
        return cls(
            root=root,
            base=root / "base",
            finetunes={task: root / task for task in tasks},
            train_data={task: root / "data" / f"{task}_train.jsonl" for task in tasks},
            tasks={task: found.lmeval_tasks[task] for task in tasks},
            test_data={task: found.fixture_path(task) for task in tasks},
            template=template,
            suite=suite,
        )


def zoo_spec(size: str, seed: int) -> dict:
    if size not in SIZES:
        raise ConfigError(f"unknown zoo size {size!r}; known: {', '.join(SIZES)}")
    shape = SIZES[size]
    spec = {name: getattr(shape, name) for name in shape.__dataclass_fields__}
    spec.update(pretrain=shape.pretrain.model_dump(), finetune=shape.finetune.model_dump())
    fixtures = hashlib.sha256(b"".join(fixture_path(t).read_bytes() for t in TASKS)).hexdigest()
    return {"version": ZOO_VERSION, "size": size, "seed": seed, "fixtures": fixtures[:16], **spec}


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_zoo(root: str | Path, *, size: str = "toy", seed: int = 0, show_progress: bool = True) -> Zoo:
    """The zoo for (size, seed) under `root`: built on the first call, reused after that."""
    spec = zoo_spec(size, seed)
    out = Path(root).expanduser() / f"{size}-{spec_hash(spec)}"
    template = SIZES[size].finetune.template
    if (out / "zoo.json").is_file():
        return Zoo.at(out, template=template)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-build"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch_threads(1):  # weights independent of the core count
            record = _build(tmp, SIZES[size], seed, show_progress)
        (tmp / "zoo.json").write_text(json.dumps({"spec": spec, "template": template, **record}, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Zoo.at(out, template=template)


def _build(out: Path, shape: ZooSize, seed: int, show_progress: bool) -> dict:
    started = time.perf_counter()
    pairs = {task: train_pairs(task, shape.train_examples, seed) for task in TASKS}
    write_pairs(out / "data", pairs)
    base, tokenizer, losses = pretrain_base(shape, seed, pairs, show_progress)
    save_model(base, tokenizer, out / "base")
    for task in TASKS:
        model = copy.deepcopy(base)
        examples = [Example(p["prompt"], p["response"]) for p in pairs[task]]
        settings = shape.finetune.model_copy(update={"seed": seed})
        losses[task] = train(model, tokenizer, examples, settings, show_progress, f"fine-tuning toy {task}")
        record = training_record(settings.template, settings=settings.model_dump())
        save_model(model, tokenizer, out / task, record)
    return {"tasks": LMEVAL_TASKS, "losses": losses, "seconds": time.perf_counter() - started}


def pretrain_base(shape: ZooSize, seed: int, pairs: dict[str, list[dict]], show_progress: bool):
    """Tokenizer and tiny Llama trained from scratch on the plain-text + generic-chat mix."""
    from merge_harness.zoo.toymodel import tiny_llama, train_tokenizer

    texts, general = documents(shape.documents, seed), general_pairs(shape.general, seed)
    tokenizer = train_tokenizer(_tokenizer_corpus(texts, {**pairs, "general": general}), shape.vocab_size)
    base = tiny_llama(
        tokenizer, shape.hidden_size, shape.layers, shape.heads, shape.kv_heads, shape.intermediate, seed=seed
    )
    seen = [p for task in TASKS for p in train_pairs(task, shape.task_pretrain, seed, "pretrain")]
    corpus = [Example("", text) for text in texts] + [_as_plain(p, tokenizer) for p in general + seen]
    settings = shape.pretrain.model_copy(update={"seed": seed})
    losses = {"base": train(base, tokenizer, corpus, settings, show_progress, "pre-training toy base")}
    return base, tokenizer, losses


def _as_plain(pair: dict, tokenizer) -> Example:
    """A chat pair rendered with the chat template, for the plain-text pre-training mix."""
    prompt, full = render(Example(pair["prompt"], pair["response"]), tokenizer, "chat")
    return Example(prompt, full[len(prompt) :].removesuffix(tokenizer.eos_token))


def _tokenizer_corpus(texts: list[str], pairs: dict[str, list[dict]]) -> list[str]:
    chats = [
        f"{FASTCHAT_SYSTEM} USER: {p['prompt']} ASSISTANT: {p['response']}"
        for rows in pairs.values()
        for p in rows
    ]
    return texts + chats


def held_out_pairs(zoo: Zoo, count: int) -> dict[str, list[dict]]:
    """`count` train-distribution rows per task that the fine-tunes never saw: the rows that
    follow the zoo's own in the same seeded stream (`train_pairs(task, n + count, data seed)`)."""
    spec = json.loads((zoo.root / "zoo.json").read_text())["spec"]
    seen = spec["train_examples"] if "train_examples" in spec else spec["examples"]  # toy | smollm2
    seed = spec.get("data_seed", spec["seed"])
    draw = task_suite(zoo.suite).train_pairs
    pairs = {}
    for task, path in zoo.train_data.items():
        rows = draw(task, seen + count, seed)
        own = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows[:seen] != own:
            raise ConfigError(f"{path}: the zoo's train rows are not a prefix of train_pairs (zoo changed?)")
        pairs[task] = rows[seen:]
    return pairs


def write_pairs(folder: Path, pairs: dict[str, list[dict]], suffix: str = "train") -> dict[str, Path]:
    """`folder/<task>_<suffix>.jsonl` per task, one prompt/response row a line."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, rows in pairs.items():
        paths[task] = folder / f"{task}_{suffix}.jsonl"
        atomic_write_text(paths[task], "".join(json.dumps(row) + "\n" for row in rows))
    return paths


# ------------------------------------------------------------------------------ SmolLM2 zoo


SMOLLM2_FINETUNE = TrainingSettings(
    trainable="attn_only",
    template="chat",
    epochs=1,
    batch_size=16,
    micro_batch_size=8,
    lr=1e-4,
    warmup_ratio=0.1,
    schedule="cosine",
    weight_decay=0.1,
    max_length=256,
)


def build_smollm2_zoo(
    root: str | Path,
    *,
    base: str | Path | None = None,
    tasks: tuple[str, ...] | None = None,
    examples: int = 300,
    seed: int = 0,
    settings: TrainingSettings | None = None,
    suite: str = "toy",
    data_seed: int | None = None,
    show_progress: bool = True,
) -> Zoo:
    """SmolLM2-135M-Instruct fine-tuned (attention only by default, its own chat template) per
    task of `suite` (default: all its tasks).

    `seed` sets the training (data order, any new parameters); `data_seed` (default: `seed`)
    which train rows are drawn, so seeds can share one data set. `base`: the converted float32
    model (default: `convert_smollm2()`'s cache, made once); the zoo's `base/` is a symlink to it.
    Fine-tunes run on CUDA when present. A killed build resumes: finished fine-tunes are kept.
    """
    import torch

    from merge_harness.io.models import load_pretrained, load_tokenizer
    from merge_harness.zoo.smollm2 import convert_smollm2

    found = task_suite(suite)
    tasks = found.tasks if tasks is None else tasks
    settings = (settings or SMOLLM2_FINETUNE).model_copy(update={"seed": seed})
    base = Path(base) if base else convert_smollm2()
    spec = {
        "version": SMOLLM2_ZOO_VERSION,
        "base": str(base.resolve()),
        "tasks": list(tasks),
        "examples": examples,
        "seed": seed,
        "settings": settings.model_dump(),
        # written only when not the defaults, so that older zoos keep their hashes
        **({"suite": suite} if suite != "toy" else {}),
        **({"data_seed": data_seed} if data_seed is not None else {}),
    }
    root = Path(root).expanduser()
    out = root / f"smollm2-{'' if suite == 'toy' else suite + '-'}{spec_hash(spec)}"
    zoo = Zoo.at(out, tasks, template=settings.template, suite=suite)
    if (out / "zoo.json").is_file():
        return zoo
    out.mkdir(parents=True, exist_ok=True)
    if not zoo.base.exists():
        zoo.base.symlink_to(base.resolve(), target_is_directory=True)
    rows_seed = seed if data_seed is None else data_seed
    pairs = {task: found.train_pairs(task, examples, rows_seed) for task in tasks}
    write_pairs(out / "data", pairs)
    tokenizer, losses = load_tokenizer(base), {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for task in tasks:
        done = zoo.finetunes[task] / "finetune.json"
        if done.is_file():  # finished before the build was killed
            losses[task] = json.loads(done.read_text()).get("losses", [])
            continue
        model = load_pretrained(base).to(device)
        rows = [Example(p["prompt"], p["response"]) for p in pairs[task]]
        losses[task] = train(model, tokenizer, rows, settings, show_progress, f"fine-tuning SmolLM2 {task}")
        record = training_record(settings.template, settings=settings.model_dump(), losses=losses[task])
        save_model(model.cpu(), tokenizer, zoo.finetunes[task], record)
        del model
    record = {"spec": spec, "template": settings.template, "tasks": zoo.tasks, "losses": losses}
    atomic_write_text(out / "zoo.json", json.dumps(record, indent=2))
    return zoo
