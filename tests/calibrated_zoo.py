"""Test helpers for calibrated merges: a tiny word-level tokenizer and a zoo with calibration data.

The tiny Llama of conftest.py has a 96-token vocabulary; a word-level tokenizer over a small
fixed vocabulary fits it and is a real `tokenizers` tokenizer (saved as tokenizer.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import state_of, write_llama

WORDS = (
    "the", "a", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "plus", "minus", "times", "is", "what", "how", "many", "apples", "pears", "cats", "dogs",
    "question", "answer", "translate", "hello", "world", "good", "morning", "cat", "dog", "red",
    "blue", "green", "house", "car", "tree", "sun", "moon", "book", "pen", "cup", "sky", "sea",
    "river", "hill", "bird", "fish", "food", "milk", "tea",
)
SPECIALS = ["[UNK]", "[PAD]", "<s>", "</s>"]
PUNCT = list("?.:#,!")


def word_tokenizer(words: tuple[str, ...] = WORDS):
    """WordLevel over `words` + punctuation + digits (< 96 tokens), BOS added, unknown -> [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *PUNCT, *"0123456789", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


TASK_ROWS = {
    "math": lambda i: {"prompt": f"question: what is {i % 10} plus {i % 7}? answer:",
                       "response": f" #### {i % 10 + i % 7}"},
    "qa": lambda i: {"text": f"how many {WORDS[20 + i % 8]} ? "
                     + " ".join(WORDS[28 + j + i % 5] for j in range(1 + i % 4)) + " ."},
    "translate": lambda i: {"prompt": f"translate: {WORDS[30 + i % 20]} {WORDS[40 + i % 12]}",
                            "response": f" {WORDS[45 - i % 10]} {WORDS[i % 19]}"},
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_zoo(root: Path, tasks=("math", "qa", "translate"), noise: float = 0.02, rows: int = 12,
             identical: bool = False, **overrides) -> dict[str, Path]:
    """{'base', <task>..., '<task>.jsonl'...}: a base, one fine-tune per task, its train data."""
    tokenizer = word_tokenizer()
    zoo = {"base": write_llama(root / "base", seed=0, **overrides)}
    tokenizer.save_pretrained(zoo["base"])
    base_state = state_of(zoo["base"])
    for index, task in enumerate(tasks):
        seed = 1 if identical else index + 1
        zoo[task] = write_llama(root / task, seed=seed, base=base_state, noise=noise, **overrides)
        tokenizer.save_pretrained(zoo[task])
        zoo[f"{task}.jsonl"] = write_jsonl(root / f"{task}.jsonl", [TASK_ROWS[task](i) for i in range(rows)])
    return zoo


def merge_config(zoo: dict[str, Path], method: str = "slta", tasks=None, **parameters):
    from merge_harness.merge.config import MergeConfig

    tasks = tasks or [k for k in zoo if k != "base" and not k.endswith(".jsonl")]
    calibration = {"template": "plain", **parameters.pop("calibration", {"max_length": 32, "batch_size": 4})}
    return MergeConfig(
        method=method,
        base_model=str(zoo["base"]),
        models=[{"model": str(zoo[t]), "calibration": str(zoo[f"{t}.jsonl"])} for t in tasks],
        parameters=parameters,
        calibration=calibration,
    )
