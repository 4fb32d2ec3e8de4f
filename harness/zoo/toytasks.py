"""Four small synthetic tasks shaped like the SLTA paper's, for the offline toy zoo.

Each task has a generator of rows in its lm-eval fixture's schema and a rendering of a row as a
fine-tuning pair (prompt, response); the prompt is exactly the user turn the toy task YAML in
`tasks/toy/` shows the model, so a fine-tune is trained on what it is evaluated on.

| task          | shaped like | row schema                                      | scored by          |
|---------------|-------------|-------------------------------------------------|--------------------|
| toy_math      | GSM8K       | question, answer ("3 + 4 = 7\\n#### 7")         | exact match        |
| toy_code      | HumanEval   | task_id, prompt, entry_point, canonical_solution, test | pass@1 (sandbox) |
| toy_translate | WMT22 zh-en | {"toy-en": {"toy": source, "en": reference}}    | sacreBLEU, chrF    |
| toy_qa        | Cosmos QA   | id, context, question, answer0..3, label        | acc (log-lik)      |

toy_qa is commonsense inference like Cosmos QA's: an event in the context ("Mia wins the game.")
implies how someone feels ("proud"); the four choices are feelings.

The tasks share one small world (names, objects, the numbers 1-18) and one chat format, so that
their fine-tunes pull the same weights in different directions: after "ASSISTANT:" a story about
Anna's pens is to be summed (toy_math), translated (toy_translate) or read for how Anna feels
(toy_qa, whose contexts are the same sentences plus an event); every task copies names, numbers
or words from its prompt; the numbers of code docstrings are those of the word problems.
The "Toy" language is English with every word but names swapped through a fixed dictionary.

Everything is a pure function of its seed. The test rows are fixed files,
`tasks/fixtures/toy_*.jsonl` (written by `write_fixtures`, seed `FIXTURE_SEED`); train rows
never repeat a test prompt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from merge_harness.tasks.fixtures import FIXTURES_DIR
from merge_harness.tasks.toy.utils import PROMPT

TASKS = ("math", "code", "translate", "qa")
LMEVAL_TASKS = {task: f"toy_{task}" for task in TASKS}
FIXTURE_SEED = 20251126
FIXTURE_ROWS = 50

NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe")
OBJECTS = ("apples", "pears", "books", "pens", "cups", "balls", "hats", "eggs")
COLORS = ("red", "blue", "green", "big", "small")
# English -> Toy, one word each; names and punctuation stay as they are.
TOY_WORDS = {
    "has": "kavo",
    "have": "kavon",
    "buys": "meli",
    "gives": "dunar",
    "finds": "trosi",
    "to": "pa",
    "and": "el",
    "red": "ruja",
    "blue": "bela",
    "green": "vira",
    "big": "grano",
    "small": "pika",
    "apples": "pomi",
    "pears": "peri",
    "books": "libri",
    "pens": "stilo",
    "cups": "tazo",
    "balls": "bolo",
    "hats": "kapo",
    "eggs": "ovi",
    "1": "un",
    "2": "du",
    "3": "tri",
    "4": "kar",
    "5": "pen",
    "6": "ses",
    "7": "sep",
    "8": "ok",
    "9": "nau",
}
TRANSLATE_PROMPT = PROMPT  # the toy_translate task's (ALMA's prompt with "Toy" for "Chinese")
QA_PROMPT = "{context}\nQuestion: {question}"
QA_PREFIX = "Answer:"  # the answer turn starts with it (the toy_qa YAML's gen_prefix)


# ------------------------------------------------------------------------------ the shared world


def sentence(rng: random.Random) -> str:
    """One English sentence about the toy world."""
    name, other = rng.sample(NAMES, 2)
    count, obj = rng.randint(1, 9), rng.choice(OBJECTS)
    form = rng.randrange(5)
    if form == 0:
        return f"{name} has {count} {obj}."
    if form == 1:
        return f"{name} buys {count} {obj}."
    if form == 2:
        return f"{name} gives {count} {obj} to {other}."
    if form == 3:
        return f"{name} and {other} have {count} {obj}."
    return f"{name} finds {count} {rng.choice(COLORS)} {obj}."


def to_toy(english: str) -> str:
    """Word-by-word substitution into the Toy language (the sentence's final period kept)."""
    words = english.rstrip(".").split()
    return " ".join(TOY_WORDS.get(word, word) for word in words) + "."


# ------------------------------------------------------------------------------------ generators


def math_row(rng: random.Random) -> dict:
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    form = rng.randrange(3)
    if form == 0:
        story, op = f"{name} has {a} {obj} and buys {b} more.", "+"
    elif form == 1:
        a, b = max(a, b), min(a, b)
        story, op = f"{name} has {a} {obj} and gives {b} to {other}.", "-"
    else:
        story, op = f"{name} has {a} {obj}. {other} gives {name} {b} more.", "+"
    result = a + b if op == "+" else a - b
    question = f"{story} How many {obj} does {name} have now?"
    return {"question": question, "answer": f"{a} {op} {b} = {result}\n#### {result}"}


# (function-name stem, docstring, body, arity, reference); {a} {b} are argument names, {k} a digit.
CODE_FAMILIES: tuple[tuple[str, str, str, int, Callable[[int, int, int], int]], ...] = (
    ("total", "Return the sum of {a} and {b}.", "return {a} + {b}", 2, lambda x, y, k: x + y),
    ("difference", "Return {a} minus {b}.", "return {a} - {b}", 2, lambda x, y, k: x - y),
    ("product", "Return {a} times {b}.", "return {a} * {b}", 2, lambda x, y, k: x * y),
    ("larger", "Return the larger of {a} and {b}.", "return max({a}, {b})", 2, lambda x, y, k: max(x, y)),
    ("smaller", "Return the smaller of {a} and {b}.", "return min({a}, {b})", 2, lambda x, y, k: min(x, y)),
    ("plus", "Return {a} plus {k}.", "return {a} + {k}", 1, lambda x, y, k: x + k),
    ("minus", "Return {a} minus {k}.", "return {a} - {k}", 1, lambda x, y, k: x - k),
    ("times", "Return {a} times {k}.", "return {a} * {k}", 1, lambda x, y, k: x * k),
    ("same", "Return {a} unchanged.", "return {a}", 1, lambda x, y, k: x),
)
ARGUMENTS = ("a", "b", "x", "y", "n", "m", "count", "total", *OBJECTS)


def code_row(rng: random.Random) -> dict:
    stem, doc, body, arity, reference = rng.choice(CODE_FAMILIES)
    fields = dict(zip("ab", rng.sample(ARGUMENTS, 2)), k=rng.randint(1, 9))
    name = f"{stem}_{rng.choice(OBJECTS)}"
    signature = ", ".join([fields["a"], fields["b"]][:arity])
    calls = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(3)]
    asserts = "".join(
        f"    assert candidate({', '.join(map(str, (x, y)[:arity]))}) == {reference(x, y, fields['k'])}\n"
        for x, y in calls
    )
    return {
        "task_id": f"Toy/{name}",
        "prompt": f'def {name}({signature}):\n    """{doc.format(**fields)}"""\n',
        "entry_point": name,
        "canonical_solution": f"    {body.format(**fields)}\n",
        "test": f"\n\ndef check(candidate):\n{asserts}",
    }


def translate_row(rng: random.Random) -> dict:
    english = sentence(rng)
    return {"toy-en": {"toy": to_toy(english), "en": english}}


# Commonsense about the toy world (the kind of inference Cosmos QA asks for): event -> feeling.
EVENTS = (
    ("{name} eats all the eggs.", "full"),
    ("{name} runs for an hour.", "tired"),
    ("{name} loses the {obj}.", "sad"),
    ("{name} gets {count} new {obj} as a gift.", "happy"),
    ("It rains and {name} has no hat.", "wet"),
    ("{name} stays up all night.", "sleepy"),
    ("{name} forgets to eat lunch.", "hungry"),
    ("{name} wins the game.", "proud"),
)
FEELINGS = tuple(feeling for _, feeling in EVENTS)


def event(rng: random.Random) -> tuple[str, str, str]:
    """(name, sentence, feeling) of one random event."""
    text, feeling = rng.choice(EVENTS)
    name = rng.choice(NAMES)
    return name, text.format(name=name, obj=rng.choice(OBJECTS), count=rng.randint(2, 9)), feeling


def qa_row(rng: random.Random) -> dict:
    """A fact or two and an event; how does the person feel? Four feelings to choose from."""
    name, happening, feeling = event(rng)
    facts = [sentence(rng) for _ in range(rng.randint(1, 2))]
    facts.insert(rng.randrange(len(facts) + 1), happening)
    choices = [feeling, *rng.sample([f for f in FEELINGS if f != feeling], 3)]
    rng.shuffle(choices)
    row = {
        "id": f"toy-{rng.randrange(10**8):08d}",
        "context": " ".join(facts),
        "question": f"How does {name} feel now?",
    }
    row.update({f"answer{i}": choice for i, choice in enumerate(choices)})
    row["label"] = choices.index(feeling)
    return row


GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "math": math_row,
    "code": code_row,
    "translate": translate_row,
    "qa": qa_row,
}


# ---------------------------------------------------------------------- rows as fine-tuning pairs


def as_pair(task: str, row: dict) -> dict[str, str]:
    """The (prompt, response) a fine-tune learns from `row`: the user turn and the ideal answer.

    Code answers start on a new line so that `prompt + completion` is valid Python whatever the
    chat template puts between the turns (FastChat writes a space after "ASSISTANT:").
    """
    if task == "math":
        return {"prompt": row["question"], "response": row["answer"]}
    if task == "code":
        return {"prompt": row["prompt"], "response": "\n" + row["canonical_solution"].rstrip("\n")}
    if task == "translate":
        pair = row["toy-en"]
        return {"prompt": TRANSLATE_PROMPT.format(source=pair["toy"]), "response": pair["en"]}
    if task == "qa":
        answer = row[f"answer{row['label']}"]
        prompt = QA_PROMPT.format(context=row["context"], question=row["question"])
        return {"prompt": prompt, "response": f"{QA_PREFIX} {answer}"}
    raise ValueError(f"unknown toy task {task!r}; expected one of {', '.join(TASKS)}")


def unique_rows(task: str, rng: random.Random, count: int, exclude: set[str] = frozenset(),
                generate: Callable[[random.Random], dict] | None = None,
                pair: Callable[[str, dict], dict[str, str]] | None = None) -> list[dict]:
    """`count` rows whose prompts are all different and none of them in `exclude` (`generate`
    and `pair`: another suite's row generator and rendering; default this suite's)."""
    generate, pair = generate or GENERATORS[task], pair or as_pair
    rows, seen = [], set(exclude)
    for _ in range(count * 50):
        row = generate(rng)
        prompt = pair(task, row)["prompt"]
        if prompt not in seen:
            seen.add(prompt)
            rows.append(row)
            if len(rows) == count:
                return rows
    raise ValueError(f"{task}: could not draw {count} distinct rows")


def fixture_rows(task: str) -> list[dict]:
    """The fixed test split (what `tasks/fixtures/toy_<task>.jsonl` holds)."""
    return unique_rows(task, random.Random(f"{FIXTURE_SEED}-{task}"), FIXTURE_ROWS)


def train_pairs(task: str, count: int, seed: int, stream: str = "train") -> list[dict[str, str]]:
    """Fine-tuning (and calibration) pairs, disjoint from the test split; another `stream`
    name draws another sample (the base's pre-training mix uses "pretrain")."""
    exclude = {as_pair(task, row)["prompt"] for row in read_test_rows(task)}
    rows = unique_rows(task, random.Random(f"{seed}-{task}-{stream}"), count, exclude)
    return [as_pair(task, row) for row in rows]


# ----------------------------------------------------------------------- pre-training documents


def documents(count: int, seed: int) -> list[str]:
    """Plain text about the toy world: English and Toy prose, a Toy glossary, sums, Python.

    No document is in a task's question/answer format: the pre-trained base knows the words, the
    arithmetic and Python, but not the tasks.
    """
    rng = random.Random(f"{seed}-documents")
    glossary = list(TOY_WORDS.items())
    makers = (
        lambda: " ".join(sentence(rng) for _ in range(rng.randint(2, 4))),
        lambda: " ".join(to_toy(sentence(rng)) for _ in range(rng.randint(2, 4))),
        lambda: " ".join(f"{t} means {e}." for e, t in rng.sample(glossary, 4)),
        lambda: " ".join(_fact(rng) for _ in range(rng.randint(3, 6))),
        lambda: (lambda row: row["prompt"] + row["canonical_solution"])(code_row(rng)),
    )
    return [makers[index % len(makers)]() for index in range(count)]


def general_pairs(count: int, seed: int) -> list[dict[str, str]]:
    """Generic instructions about the toy world (repeat, add, look a word up): the chat skills a
    pre-trained "instruct" base has before any task fine-tuning. None is one of the four tasks."""
    rng = random.Random(f"{seed}-general")
    glossary = list(TOY_WORDS.items())
    pairs = []
    for index in range(count):
        kind = index % 3
        if kind == 0:
            text = sentence(rng)
            pairs.append({"prompt": f"Repeat: {text}", "response": text})
        elif kind == 1:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            pairs.append({"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}"})
        else:
            english, toy = rng.choice(glossary)
            pairs.append({"prompt": f"What does {toy} mean?", "response": english})
    return pairs


def _fact(rng: random.Random) -> str:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b}."
    return f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}."


# ------------------------------------------------------------------------------------ fixtures


def fixture_path(task: str) -> Path:
    return FIXTURES_DIR / f"{LMEVAL_TASKS[task]}.jsonl"


def fixture_text(task: str) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in fixture_rows(task))


def write_fixtures() -> list[Path]:
    """(Re)write `tasks/fixtures/toy_*.jsonl`; the content is a pure function of FIXTURE_SEED."""
    paths = []
    for task in TASKS:
        fixture_path(task).write_text(fixture_text(task), encoding="utf-8")
        paths.append(fixture_path(task))
    return paths


def read_test_rows(task: str) -> list[dict]:
    """The committed test rows; regenerated in memory when the file is missing."""
    path = fixture_path(task)
    text = path.read_text(encoding="utf-8") if path.is_file() else fixture_text(task)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


if __name__ == "__main__":  # python -m merge_harness.zoo.toytasks: refresh the committed fixture files
    for written in write_fixtures():
        print(written)
