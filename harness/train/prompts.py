"""Prompt templates: how a prompt/response pair becomes text and tokens, for training and calibration.

Data-driven merges (SLTA, RegMean, Fisher) must see each task's examples exactly as its fine-tune
saw them in training (SPEC §4), so fine-tuning and calibration both go through `encode` here:
same text, same tokens, token for token.

Templates:
- `chat`: the tokenizer's own chat template (user = prompt, assistant = response). The toy
  tokenizer's is FastChat's Vicuna v1.1, SmolLM2's is ChatML.
- `fastchat`: FastChat's Vicuna v1.1 conversation, built in (the SLTA paper's fine-tunes used it):
  "<s>SYSTEM USER: {prompt} ASSISTANT: {response}</s>".
- `plain`: prompt + separator + response + EOS (pre-training text, base models).
- a format string with `{prompt}` and `{response}` (and optionally `{bos}`, `{eos}`): everything
  before `{response}` is the prompt.

A `merge-harness finetune` run (and every zoo) records its template in the fine-tune's
`finetune.json`; `recorded_template` reads it back so calibration can default to it.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from merge_harness.core.errors import ConfigError

FASTCHAT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
BUILTIN_TEMPLATES = ("chat", "fastchat", "plain")
IGNORE = -100  # the label of a token that carries no loss (prompt tokens)
RECORD_FILE = "finetune.json"


@dataclass(frozen=True)
class Example:
    """A prompt and its answer, or (response None) a finished text used as written."""

    prompt: str
    response: str | None = None
    separator: str = ""  # what `plain` puts between prompt and response (lm-eval's delimiter)


FORMAT_FIELDS = ("prompt", "response", "bos", "eos")


def check_template(template: str) -> str:
    """A built-in name or a format string with {prompt} and {response} (and optionally {bos},
    {eos}); else a ConfigError."""
    if template in BUILTIN_TEMPLATES:
        return template
    if "{prompt}" not in template or "{response}" not in template:
        raise ConfigError(
            f"template {template!r} is not chat, fastchat or plain, and not a format string "
            "with {prompt} and {response}"
        )
    if template.index("{prompt}") > template.index("{response}"):
        raise ConfigError(f"template {template!r}: {{prompt}} must come before {{response}}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    if unknown := sorted(fields - set(FORMAT_FIELDS)):
        raise ConfigError(f"template {template!r}: unknown placeholder(s) {unknown} "
                          f"(known: {', '.join(FORMAT_FIELDS)})")
    return template


def known_template(value: str | None) -> str | None:
    """A pydantic validator's view of `check_template`: its error as a ValueError, so that
    the config loader names the YAML file, line and field."""
    try:
        return None if value is None else check_template(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def render(example: Example, tokenizer, template: str) -> tuple[str, str]:
    """(prompt text, full text): the full text starts with the prompt text, the answer follows."""
    response = example.response or ""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if template == "plain":
        return example.prompt, example.prompt + example.separator + response + eos
    if template == "fastchat":
        prompt = f"{bos}{FASTCHAT_SYSTEM} USER: {example.prompt} ASSISTANT:"
        return prompt, f"{prompt} {response}{eos}"
    if template == "chat":
        return _render_chat(example.prompt, response, tokenizer)
    pattern = check_template(template)
    values = {"prompt": example.prompt, "response": response, "bos": bos, "eos": eos}
    return pattern[: pattern.index("{response}")].format(**values), pattern.format(**values)


def _render_chat(prompt_text: str, response: str, tokenizer) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("template 'chat': the tokenizer has no chat template (use 'fastchat')")
    user = [{"role": "user", "content": prompt_text}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError(
            "the tokenizer's chat template does not render the prompt as a prefix "
            "of the conversation; use template 'fastchat'"
        )
    return prompt, full


def encode(example: Example, tokenizer, template: str, max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE on the prompt), the prompt and the answer tokenized apart.

    Tokenizing the whole conversation at once would let a token straddle the boundary (SmolLM2's
    BPE joins the prompt's final newline and the answer's leading newline and indent into one
    token); that token would be masked as prompt, so the model never learns to emit what starts
    its answer, while at inference the prompt is tokenized alone and generation starts at the
    boundary. Apart, training sees exactly the tokens that generation continues from.
    A finished text (response None) is tokenized as written, special tokens included, and
    every token is a label.
    """
    if example.response is None:
        ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])[:max_length]
        return ids, list(ids)
    prompt, full = render(example, tokenizer, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + list(answer_ids))[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + list(answer_ids))[:max_length]
    return ids, labels


def recorded_template(model_dir: str | Path) -> str | None:
    """The template a merge-harness fine-tune was trained with, or None if it records none."""
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable fine-tuning record: {exc}") from None
    template = record.get("template") or record.get("settings", {}).get("template")
    return template if isinstance(template, str) else None


def training_record(template: str, **extra: object) -> dict[str, object]:
    """What a fine-tune records next to its weights (`finetune.json`)."""
    return {"template": check_template(template), **extra}


def read_jsonl(path: Path) -> list[Example]:
    """Rows with `text`, or with `prompt` and `response`; errors name the file and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read data file: {exc}") from exc
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
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and _is_answer(row.get("response")):
            examples.append(Example(row["prompt"], str(row["response"])))
        else:
            raise ConfigError(
                f"{path}:{number}: a row needs `text`, or `prompt` and `response` (a string or number)"
            )
    return examples


def _is_answer(value: object) -> bool:
    """A response is text or a number (`#### 42` data often stores 42); null or true is a data error."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)
