"""Calibration data for model-level merges: N seeded *train* examples per fine-tune, tokenized.

Each fine-tune (= task t) names its data in the merge config (`models[i].calibration`):

- a JSONL file: rows with `text` (used as written), or `prompt` + `response` (joined by the
  template the fine-tune was trained with);
- an lm-eval task name, looked up in this repository's `tasks/` first, then lm-eval's built-ins:
  examples come from the task's *train* split only (`training_docs()`), formatted as
  doc_to_text + target_delimiter + doc_to_target; a task without a train split is an error,
  never a silent fall back to its test split.

Templates (`calibration.template`): "plain" (prompt + response), "fastchat" (the Vicuna v1.1
conversation FastChat fine-tunes use, as in the SLTA paper), "chat" (the tokenizer's own chat
template), or a format string with `{prompt}` and `{response}`. The answer is always included.
Sampling is seeded: the same source, N and seed give the same examples in the same order.
Sequences are right-padded; `attention_mask` is 1 on real tokens, 0 on padding.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import CalibrationSettings
from harness.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

REPO_TASKS = Path(__file__).resolve().parent.parent / "tasks"
FASTCHAT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = {
    "plain": "{prompt}{response}",
    "fastchat": FASTCHAT_SYSTEM + " USER: {prompt} ASSISTANT: {response}{eos}",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Example:
    """One calibration example: a prompt and its answer, or (prompt only) a finished text."""

    prompt: str
    response: str | None = None
    separator: str = ""  # what "plain" puts between prompt and response (lm-eval's delimiter)


@dataclass(frozen=True)
class CalibrationSet:
    """One task's tokenized calibration examples: input_ids, attention_mask (N, L)."""

    source: str
    texts: tuple[str, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


# ------------------------------------------------------------------------------------- sources


def read_jsonl(path: Path) -> list[Example]:
    """Rows with `text`, or with `prompt` and `response`; errors name the file and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read calibration file: {exc}") from exc
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: invalid JSON: {exc}") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            examples.append(Example(row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and "response" in row:
            examples.append(Example(row["prompt"], str(row["response"])))
        else:
            raise ConfigError(f"{path}:{number}: a row needs `text`, or `prompt` and `response`")
    return examples


def task_examples(name: str, include_path: Path | None = None) -> Sequence[Example]:
    """The train split of an lm-eval task, as (doc_to_text, doc_to_target) examples."""
    task = _load_task(name, include_path or REPO_TASKS)
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


def format_example(example: Example, template: str, tokenizer) -> str:
    if example.response is None:
        return example.prompt
    if template == "chat":
        messages = [
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.response},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if template == "plain":
        return example.prompt + example.separator + example.response
    pattern = TEMPLATES.get(template, template)
    if "{prompt}" not in pattern or "{response}" not in pattern:
        raise ConfigError(
            f"calibration.template: {template!r} is not plain/fastchat/chat and not a format "
            "string with {prompt} and {response}"
        )
    eos = getattr(tokenizer, "eos_token", None) or ""
    return pattern.format(prompt=example.prompt, response=example.response, eos=eos)


def tokenize(
    texts: Sequence[str], tokenizer, max_length: int, add_special_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask (N, L), L = the longest (<= max_length)."""
    encoded = tokenizer(
        list(texts), truncation=True, max_length=max_length, add_special_tokens=add_special_tokens
    )["input_ids"]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ConfigError(f"calibration example {index} tokenizes to no tokens: {texts[index]!r}")
    length = max(len(ids) for ids in encoded)
    input_ids = torch.zeros(len(encoded), length, dtype=torch.long)  # pad id is irrelevant: masked
    mask = torch.zeros(len(encoded), length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def load_calibration(
    source: str,
    tokenizer,
    num_samples: int,
    seed: int,
    settings: CalibrationSettings | None = None,
    include_path: Path | None = None,
) -> CalibrationSet:
    """Draw, format and tokenize one fine-tune's calibration examples."""
    settings = settings or CalibrationSettings()
    examples = sample_examples(
        load_examples(source, include_path), num_samples, seed, settings.allow_fewer, source
    )
    texts = tuple(format_example(e, settings.template, tokenizer) for e in examples)
    ids, mask = tokenize(texts, tokenizer, settings.max_length, settings.template != "chat")
    return CalibrationSet(source, texts, ids, mask)


def check_same_vocab(tokenizer, reference: Path, model_dirs: Sequence[Path]) -> None:
    """Every model that ships a tokenizer must map tokens to the same ids as `reference`'s."""
    from harness.models import load_tokenizer

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
