"""Calibration data for model-level merges: N seeded *train* examples per fine-tune, tokenized.

Each fine-tune (= task t) names its data in the merge config (`models[i].calibration`):

- a JSONL file: rows with `text` (used as written), or `prompt` + `response`;
- an lm-eval task name, looked up in this repository's `tasks/` first, then lm-eval's built-ins:
  examples come from the task's *train* split only (`training_docs()`), as doc_to_text,
  target_delimiter, doc_to_target; a task without a train split is an error, never a silent
  fall back to its test split.

Examples are rendered and tokenized by `merge_harness.train.prompts.encode`, the function fine-tuning
uses, in the template the fine-tune was trained with (`resolve_recipe`), so each task's
calibration tokens are its training tokens. Sampling is seeded: the same source, N and seed give
the same examples in the same order. Sequences are right-padded; `attention_mask` is 1 on real
tokens, 0 on padding. Users can also hand their own token batches (`CalibrationSet.from_tokens`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_harness.core.errors import CheckpointError, ConfigError
from merge_harness.merge.config import CalibrationSettings, CalibrationSource
from merge_harness.tasks import TASKS_DIR
from merge_harness.train.prompts import Example, encode, read_jsonl, recorded_template, render

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class CalibrationSet:
    """One task's tokenized calibration examples: input_ids, attention_mask (N, L)."""

    source: str
    texts: tuple[str, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ConfigError(
                f"calibration {self.source}: input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must both be (examples, tokens)"
            )
        if int(self.attention_mask.sum()) == 0:
            raise ConfigError(
                f"calibration {self.source}: no non-padding token (attention_mask is all 0); a task "
                "without calibration tokens would get a meaningless coefficient"
            )

    @classmethod
    def from_tokens(
        cls, source: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> CalibrationSet:
        """A user's own token batch (N, L); no mask means every position is a real token."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
        return cls(source, (), ids, mask)

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class CalibrationRecipe:
    """Everything that decides one fine-tune's calibration tokens, resolved (no defaults left)."""

    source: str
    template: str
    num_samples: int
    seed: int
    allow_fewer: bool
    max_length: int


def resolve_recipe(
    entry: CalibrationSource,
    settings: CalibrationSettings,
    num_samples: int,
    seed: int,
    model_dir: Path | None,
    where: str,
) -> CalibrationRecipe:
    """The entry's own values, else the merge's settings and the method's N and seed."""
    return CalibrationRecipe(
        source=entry.source,
        template=resolve_template(entry, settings, model_dir, where),
        num_samples=entry.num_samples or num_samples,
        seed=entry.seed if entry.seed is not None else seed,
        allow_fewer=entry.allow_fewer if entry.allow_fewer is not None else settings.allow_fewer,
        max_length=settings.max_length,
    )


def resolve_template(
    entry: CalibrationSource, settings: CalibrationSettings, model_dir: Path | None, where: str
) -> str:
    """The entry's template, else the merge's, else the one the fine-tune recorded in training;
    none of them is an error (a guessed template silently changes the merge)."""
    template = entry.template or settings.template or (recorded_template(model_dir) if model_dir else None)
    if template is None:
        raise ConfigError(
            f"{where}.template: the fine-tune {model_dir or ''} records no training template; set "
            "calibration.template to the one it was trained with (chat, fastchat, plain or a format string)"
        )
    return template


# ------------------------------------------------------------------------------------- sources


def task_examples(name: str, include_path: Path | None = None) -> Sequence[Example]:
    """The train split of an lm-eval task, as (doc_to_text, doc_to_target) examples."""
    task = _load_task(name, include_path or TASKS_DIR)
    if not task.has_training_docs():
        raise ConfigError(
            f"calibration task {name!r} has no train split (set `training_split` in its YAML, or "
            "give a JSONL file); calibration never uses a task's test split"
        )
    return TaskExamples(task)


class TaskExamples(Sequence[Example]):
    """A task's train docs as examples, formatted on access (only the N drawn are rendered)."""

    def __init__(self, task):
        self.task = task
        docs = task.training_docs()
        self.docs = docs if hasattr(docs, "__getitem__") and hasattr(docs, "__len__") else list(docs)
        self.delimiter = getattr(task.config, "target_delimiter", " ") or ""

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _task_example(self.task, self.docs[index], self.delimiter)


def _load_task(name: str, include_path: Path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if name not in manager.all_subtasks:  # not ours: index lm-eval's built-ins too (slower)
        manager = TaskManager(include_path=str(include_path))
    if name not in manager.all_subtasks:
        raise ConfigError(
            f"calibration {name!r}: neither a JSONL file nor an lm-eval task (looked in "
            f"{include_path} and lm-eval's built-in tasks)"
        )
    try:
        return manager.load([name])["tasks"][name]
    except Exception as exc:
        raise ConfigError(f"calibration task {name!r} cannot be loaded: {exc}") from exc


def _task_example(task, doc, delimiter: str) -> Example:
    prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
    if isinstance(prompt, int) or isinstance(target, int):  # index into the choices
        choices = task.doc_to_choice(doc)
        prompt = choices[prompt] if isinstance(prompt, int) else prompt
        target = choices[target] if isinstance(target, int) else target
    if isinstance(target, list):
        target = target[0]
    return Example(str(prompt), str(target), delimiter)


def load_examples(source: str, include_path: Path | None = None) -> Sequence[Example]:
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{source}: calibration file not found")
        return read_jsonl(path)
    return task_examples(source, include_path)


def sample_examples(
    examples: Sequence[Example], num_samples: int, seed: int, allow_fewer: bool, source: str
) -> list[Example]:
    """N examples drawn without replacement with `random.Random(seed)`."""
    if not examples:
        raise ConfigError(f"calibration {source}: no examples")
    if len(examples) < num_samples:
        if not allow_fewer:
            raise ConfigError(
                f"calibration {source}: {len(examples)} examples, but num_samples={num_samples} "
                "were requested (lower num_samples or set calibration.allow_fewer: true)"
            )
        logger.warning("calibration %s: using all %d examples (< %d)", source, len(examples), num_samples)
        num_samples = len(examples)
    indices = random.Random(seed).sample(range(len(examples)), num_samples)
    return [examples[i] for i in indices]


# -------------------------------------------------------------------------------- tokenization


def pad_rows(rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask (N, L), L = the longest row."""
    length = max(len(ids) for ids in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)  # pad id is irrelevant: masked
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def load_calibration(
    recipe: CalibrationRecipe, tokenizer, include_path: Path | None = None
) -> CalibrationSet:
    """Draw one fine-tune's examples and tokenize them exactly as its training did."""
    examples = sample_examples(
        load_examples(recipe.source, include_path),
        recipe.num_samples,
        recipe.seed,
        recipe.allow_fewer,
        recipe.source,
    )
    rows = [encode(example, tokenizer, recipe.template, recipe.max_length)[0] for example in examples]
    for index, ids in enumerate(rows):
        if not ids:
            raise ConfigError(f"calibration {recipe.source}: example {index} tokenizes to no tokens")
    texts = tuple(
        e.prompt if e.response is None else render(e, tokenizer, recipe.template)[1] for e in examples
    )
    return CalibrationSet(recipe.source, texts, *pad_rows(rows))


def check_same_vocab(tokenizer, reference: Path, model_dirs: Sequence[Path]) -> None:
    """Every model that ships a tokenizer must map tokens to the same ids as `reference`'s."""
    from merge_harness.io.models import load_tokenizer

    vocab = tokenizer.get_vocab()
    for directory in model_dirs:
        if not any((Path(directory) / name).exists() for name in TOKENIZER_FILES):
            continue
        other = load_tokenizer(directory).get_vocab()
        if other == vocab:
            continue
        differ = sorted(set(vocab.items()) ^ set(other.items()))
        raise CheckpointError(
            f"{directory}: tokenizer vocabulary differs from {reference}'s ({len(other)} vs "
            f"{len(vocab)} tokens; e.g. {differ[0][0]!r}); the fine-tunes must share one tokenizer"
        )
