"""Toy -> English translation: the wmt22_zh_en prompt and scoring for the toy zoo's language pair."""

from __future__ import annotations

PAIR, SOURCE, TARGET = "toy-en", "toy", "en"
PROMPT = "Translate this from Toy to English:\nToy: {source}\nEnglish:"


def doc_to_text(doc: dict) -> str:
    return PROMPT.format(source=doc[PAIR][SOURCE])


def doc_to_target(doc: dict) -> str:
    return doc[PAIR][TARGET]


def process_results(doc: dict, results: list[str]) -> dict[str, tuple[str, str]]:
    pair = (doc_to_target(doc), results[0].strip())
    return {"bleu": pair, "chrf": pair}
