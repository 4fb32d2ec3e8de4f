"""Toy -> English translation: the wmt22_zh_en prompt and scoring for the toy zoo's language pair."""

from __future__ import annotations

from merge_harness.tasks.wmt22_zh_en.utils import translation_prompt, translation_task

PROMPT = translation_prompt("Toy")
doc_to_text, doc_to_target, process_results = translation_task("toy-en", "Toy")
