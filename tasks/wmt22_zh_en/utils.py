"""WMT22 zh->en: ALMA's prompt, and corpus-level sacreBLEU / chrF as lm-eval aggregations.

`process_results` passes each (reference, hypothesis) pair through; the aggregations score the
whole corpus at once, as BLEU and chrF are defined (an average of sentence scores is not BLEU).
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def translation_prompt(source_name: str, target_name: str = "English") -> str:
    """ALMA's prompt, with a `{source}` field."""
    return f"Translate this from {source_name} to {target_name}:\n{source_name}: {{source}}\n{target_name}:"


def translation_task(pair: str, source_name: str, target_name: str = "English"):
    """(doc_to_text, doc_to_target, process_results) for docs shaped {pair: {src: .., tgt: ..}}."""
    source, target = pair.split("-")
    prompt = translation_prompt(source_name, target_name)

    def doc_to_text(doc: dict) -> str:
        return prompt.format(source=doc[pair][source])

    def doc_to_target(doc: dict) -> str:
        return doc[pair][target]

    def process_results(doc: dict, results: list[str]) -> dict[str, tuple[str, str]]:
        references_and_hypothesis = (doc_to_target(doc), results[0].strip())
        return {"bleu": references_and_hypothesis, "chrf": references_and_hypothesis}

    return doc_to_text, doc_to_target, process_results


doc_to_text, doc_to_target, process_results = translation_task("zh-en", "Chinese")


def corpus_bleu(items: Sequence[tuple[str, str]]) -> float:
    references, hypotheses = zip(*items, strict=True)
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="13a").score


def corpus_chrf(items: Sequence[tuple[str, str]]) -> float:
    references, hypotheses = zip(*items, strict=True)
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score
