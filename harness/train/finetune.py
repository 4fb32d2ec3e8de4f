"""Supervised fine-tuning of a causal LM on prompt/response pairs, as the merging papers do it.

- **Format**: each pair is one conversation, user = prompt, assistant = response, rendered and
  tokenized by `merge_harness.train.prompts` (`template`: chat, fastchat, plain or a format string), the one
  module calibration uses too, so data-driven merges see the training tokens exactly. The
  template is recorded in the fine-tune's `finetune.json`.
- **Loss** on the answer tokens only: every token whose text starts inside the rendered prompt
  (system text, user turn, "ASSISTANT:") is labelled -100; the loss is the mean over the answer
  tokens of the whole optimizer batch, however it is split into micro-batches.
- **What trains** (`trainable`): `full`; `attn_only` (the q/k/v/o projections of self-attention,
  Jin et al., ICLR 2025, seed 002); `mlp_only` (gate/up/down). Every other tensor stays
  bit-identical: it gets no gradient and is not in the optimizer.
- **Optimizer**: AdamW (no decay on norms and biases), linear warm-up then cosine (or linear or
  constant) decay, gradient clipping, gradient accumulation (`batch_size` examples per step,
  `micro_batch_size` per forward), a seed for initial state and data order.

Presets hold the papers' settings; any field set in the config overrides the preset's:
- `slta` (Dai et al., ICLR 2025): 3 epochs, batch 128, lr 2e-5, full fine-tuning. Unstated in the
  paper, taken from FastChat's training recipe: cosine, 3% warm-up, no weight decay.
- `attn_only_paper` (Jin et al., ICLR 2025): 2000 iterations, batch 128, lr 1e-5, 200 warm-up
  steps, cosine, AdamW; weight decay 0.1 from the protocol it follows (Ilharco et al., 2023).
- `toy`: the CPU demo's tiny models (short runs at a high learning rate).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_harness.core.config_files import load_config_file, output_relative_to, relative_to
from merge_harness.core.errors import ConfigError
from merge_harness.core.progress import progress_bar
from merge_harness.io.checkpoint import replace_dir
from merge_harness.train.prompts import IGNORE, Example, encode, known_template, read_jsonl, training_record

Trainable = Literal["full", "attn_only", "mlp_only"]
TRAINABLE_PATTERNS = {
    "full": re.compile(r""),
    "attn_only": re.compile(r"\.self_attn\.(q|k|v|o)_proj\."),
    "mlp_only": re.compile(r"\.mlp\.(gate|up|down)_proj\."),
}
PresetName = Literal["slta", "attn_only_paper", "toy"]
PRESETS: dict[str, dict[str, object]] = {
    "slta": dict(
        trainable="full",
        epochs=3,
        batch_size=128,
        lr=2e-5,
        schedule="cosine",
        warmup_ratio=0.03,
        weight_decay=0.0,
    ),
    "attn_only_paper": dict(
        trainable="attn_only",
        max_steps=2000,
        batch_size=128,
        lr=1e-5,
        schedule="cosine",
        warmup_steps=200,
        weight_decay=0.1,
    ),
    "toy": dict(  # what the toy zoo's fine-tunes use (merge_harness.zoo.zoos.SIZES["toy"])
        trainable="full",
        max_steps=120,
        batch_size=32,
        lr=6e-4,
        schedule="cosine",
        warmup_steps=10,
        weight_decay=0.0,
        max_length=160,
    ),
}
# Fields that say the same thing; setting one in a config drops the preset's other.
ALTERNATIVES = ({"epochs", "max_steps"}, {"warmup_steps", "warmup_ratio"})


class TrainingSettings(BaseModel):
    """How to train: what a preset fixes and a config may override."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trainable: Trainable = "full"
    template: str = Field("chat", description="chat | fastchat | plain | a format string (train/prompts.py)")
    epochs: float | None = Field(None, gt=0, description="passes over the data (or max_steps)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (or epochs)")
    batch_size: int = Field(128, ge=1, description="examples per optimizer step")
    micro_batch_size: int | None = Field(None, ge=1, description="examples per forward pass")
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description="wins over warmup_ratio")
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_length: int = Field(512, ge=2, description="tokens per example (longer ones are cut)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0

    _known_template = field_validator("template")(known_template)

    @model_validator(mode="after")
    def _check(self) -> TrainingSettings:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set epochs or max_steps, not both")
        return self

    def total_steps(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil((self.epochs or 1.0) * num_examples / self.batch_size))

    def warmup(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * total)


class FinetuneConfig(TrainingSettings):
    """A fine-tuning run: `merge-harness finetune CONFIG`. Relative paths are the file's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(description="model directory or Hugging Face id")
    data: str = Field(description="JSONL with prompt/response rows")
    output_dir: str
    preset: PresetName | None = None
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:1...")

    def settings(self) -> TrainingSettings:
        """The preset's values under the ones this config sets explicitly."""
        explicit = self.model_dump(include=self.model_fields_set & set(TrainingSettings.model_fields))
        preset = dict(PRESETS[self.preset]) if self.preset else {}
        for group in ALTERNATIVES:
            if group & set(explicit):
                for name in group:
                    preset.pop(name, None)
        return TrainingSettings.model_validate({**preset, **explicit})


def preset_settings(name: str, **overrides) -> TrainingSettings:
    if name not in PRESETS:
        raise ConfigError(f"unknown fine-tuning preset {name!r}; known: {', '.join(PRESETS)}")
    return TrainingSettings.model_validate({**PRESETS[name], **overrides})


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Parse and validate a YAML file; errors say file:line: field: problem."""
    path = Path(path)
    config, _ = load_config_file(path, FinetuneConfig, "a fine-tuning config")
    config.settings()  # preset + overrides must make sense together
    root = path.parent
    return config.model_copy(
        update={
            "base_model": relative_to(config.base_model, root),
            "data": relative_to(config.data, root),
            "output_dir": output_relative_to(config.output_dir, root),
        }
    )


# ----------------------------------------------------------------------------------- encoding


def encode_all(examples: Sequence[Example], tokenizer, template: str, max_length: int) -> list:
    rows = [encode(example, tokenizer, template, max_length) for example in examples]
    kept = [row for row in rows if any(label != IGNORE for label in row[1])]
    if not kept:
        raise ConfigError(f"no example has an answer token within max_length={max_length}")
    return kept


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (B, L)."""
    length = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "labels": torch.full((len(rows), length), IGNORE, dtype=torch.long),
    }
    for row, (ids, labels) in enumerate(rows):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
    return batch


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of a batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]  # (B, L-1, V), (B, L-1)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


# ------------------------------------------------------------------------------------- training


def select_trainable(model, trainable: Trainable) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the chosen parameters; return the (name, parameter) that train."""
    pattern = TRAINABLE_PATTERNS[trainable]
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(bool(pattern.search(name)))
        if param.requires_grad:
            chosen.append((name, param))
    if not chosen:
        raise ConfigError(
            f"trainable={trainable}: no parameter of {type(model).__name__} matches "
            f"{pattern.pattern!r} (Llama-style module names expected)"
        )
    return chosen


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], settings: TrainingSettings, total: int):
    from transformers import get_scheduler

    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n)]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)
    name = "constant_with_warmup" if settings.schedule == "constant" else settings.schedule
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=settings.warmup(total), num_training_steps=total
    )
    return optimizer, scheduler


def batches(num_rows: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of row indices: a fresh seeded shuffle each epoch, epochs run together."""
    epoch, pending = 0, []
    while True:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
        pending.extend(order.tolist())
        epoch += 1
        while len(pending) >= batch_size or (pending and num_rows < batch_size):
            yield pending[:batch_size]
            pending = pending[batch_size:]


def train(
    model,
    tokenizer,
    examples: Sequence[Example],
    settings: TrainingSettings,
    show_progress: bool = True,
    description: str = "fine-tuning",
) -> list[float]:
    """Train `model` in place on its current device; the mean answer-token loss of each step.

    The progress bar shows each step's loss and the learning rate it trained at.
    """
    torch.manual_seed(settings.seed)
    rows = encode_all(examples, tokenizer, settings.template, settings.max_length)
    named = select_trainable(model, settings.trainable)
    total = settings.total_steps(len(rows))
    optimizer, scheduler = make_optimizer(named, settings, total)
    micro = settings.micro_batch_size or settings.batch_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    with progress_bar(total, description, show_progress) as advance:
        for _, indices in zip(range(total), batches(len(rows), settings.batch_size, settings.seed)):
            chunk = [rows[i] for i in indices]
            answer_tokens = sum(sum(label != IGNORE for label in labels[1:]) for _, labels in chunk)
            step_loss = 0.0
            for start in range(0, len(chunk), micro):
                batch = {k: v.to(device) for k, v in collate(chunk[start : start + micro], pad_id).items()}
                loss = token_losses(model, batch) / answer_tokens
                loss.backward()
                step_loss += loss.item()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], settings.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step trains at
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            advance(f"loss {step_loss:.4f}  lr {lr:.2e}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return losses


@torch.no_grad()
def answer_loss(
    model,
    tokenizer,
    examples: Sequence[Example],
    template: str = "chat",
    max_length: int = 512,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy per answer token (nats): a cheap score of how well a model answers."""
    rows = encode_all(examples, tokenizer, template, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        total += token_losses(model, batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / count


# ------------------------------------------------------------------------------- runs and files


def read_pairs(path: str | Path) -> list[Example]:
    """prompt/response rows of a JSONL file (errors name the file and line)."""
    examples = read_jsonl(Path(path))
    if any(example.response is None for example in examples):
        raise ConfigError(f"{path}: fine-tuning data needs `prompt` and `response` in every row")
    return examples


def save_model(model, tokenizer, out_dir: str | Path, record: dict | None = None) -> Path:
    """Write safetensors + tokenizer (+ finetune.json) to a temp dir, then move it into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-finetune"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if record is not None:
            (tmp / "finetune.json").write_text(json.dumps(record, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def finetune(config: FinetuneConfig, show_progress: bool = True) -> Path:
    """Load the base, train on the data, save the fine-tune; returns the output directory."""
    from merge_harness.io.models import load_pretrained, load_tokenizer, resolve_model

    settings = config.settings()
    examples = read_pairs(config.data)
    base = resolve_model(config.base_model)
    tokenizer, model = load_tokenizer(base), load_pretrained(base)
    model.to(resolve_device(config.device))
    losses = train(
        model,
        tokenizer,
        examples,
        settings,
        show_progress,
        description=f"fine-tuning {Path(config.output_dir).name}",
    )
    record = training_record(
        settings.template,
        base_model=config.base_model,
        data=config.data,
        preset=config.preset,
        settings=settings.model_dump(),
        examples=len(examples),
        losses=losses,
    )
    return save_model(model.cpu(), tokenizer, config.output_dir, record)


def finetune_from_config(path: str | Path, show_progress: bool = True) -> Path:
    """`merge-harness finetune CONFIG`: the fine-tuned model's directory."""
    return finetune(load_finetune_config(path), show_progress)
