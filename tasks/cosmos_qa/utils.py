"""Cosmos QA: the four candidate answers, in label order."""

from __future__ import annotations


def doc_to_choice(doc: dict) -> list[str]:
    return [doc[f"answer{index}"] for index in range(4)]
