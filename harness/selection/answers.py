"""Token batches for diagnostics: prompt/response examples, with the answer tokens marked.

Examples come from a JSONL file (rows with `prompt`/`response`, or `text`) or an lm-eval task's
*train* split (`merge_harness.merge.calibration_data.load_examples`); N are drawn with `random.Random(seed)`
(`sample_examples`). They are rendered exactly as the fine-tunes were trained
(`merge_harness.train.prompts.encode`: template "chat", "fastchat" or "plain"), so `labels` is -100 on every
prompt token and padding, and the token ids elsewhere: the answer tokens.

Two scores of a model's answers, computed directly from its logits (no lm-eval, no generation):
- `log_likelihood`: mean over answer tokens of log p(token | prefix) (teacher forcing), nats;
- `exact_match`: fraction of examples whose every answer token is the greedy (argmax) prediction
  given the true prefix (teacher-forced exact match).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_harness.merge.calibration_data import load_examples, sample_examples
from merge_harness.selection.splits import held_out_part
from merge_harness.train.finetune import collate, encode_all
from merge_harness.train.prompts import IGNORE

METRICS = ("log_likelihood", "exact_match")


@dataclass(frozen=True)
class DataSettings:
    """How examples become batches: how many, drawn how, rendered how."""

    num_samples: int = 16  # examples per task (all rows when the source has fewer)
    seed: int = 0
    template: str = "chat"  # as the fine-tunes were trained: chat | fastchat | plain
    max_length: int = 256
    batch_size: int = 8  # examples per forward pass
    held_out_fraction: float | None = None  # draw from this held-out part of the source only


@dataclass(frozen=True)
class AnswerBatch:
    """One task's examples: input_ids, attention_mask, labels, each (N, L), right-padded."""

    source: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])

    def chunks(self, size: int) -> Iterator[AnswerBatch]:
        for start in range(0, self.num_examples, size):
            part = slice(start, start + size)
            yield AnswerBatch(self.source, self.input_ids[part], self.attention_mask[part], self.labels[part])


def answer_batch(source: str | Path, tokenizer, settings: DataSettings = DataSettings()) -> AnswerBatch:
    """N seeded examples of `source` (JSONL path or lm-eval task name, train split), tokenized."""
    examples = load_examples(str(source))
    if settings.held_out_fraction is not None:
        _, examples = held_out_part(examples, settings.held_out_fraction, settings.seed)
    drawn = sample_examples(examples, settings.num_samples, settings.seed, True, str(source))
    rows = encode_all(drawn, tokenizer, settings.template, settings.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = collate(rows, pad_id)
    return AnswerBatch(str(source), batch["input_ids"], batch["attention_mask"], batch["labels"])


def answer_positions(batch: AnswerBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, L-1) of logit positions that predict an answer token, their targets (n,))."""
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE
    return mask, targets[mask]


def answer_scores(logits: torch.Tensor, batch: AnswerBatch) -> dict[str, tuple[float, int]]:
    """Summed scores and counts on one batch: {metric: (sum, count)}; divide to get the mean.

    logits: (N, L, V) for the batch's input_ids.
    """
    mask, targets = answer_positions(batch)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, L-1, V)
    token_ll = log_probs[mask].gather(1, targets[:, None])[:, 0]  # (n,)
    correct = torch.zeros_like(mask)
    correct[mask] = log_probs[mask].argmax(-1) == targets
    solved = (correct | ~mask).all(dim=1) & mask.any(dim=1)  # every answer token right
    examples = int(mask.any(dim=1).sum())
    return {
        "log_likelihood": (float(token_ll.sum()), int(mask.sum())),
        "exact_match": (float(solved.sum()), examples),
    }
