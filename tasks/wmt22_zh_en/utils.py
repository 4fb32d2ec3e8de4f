"""WMT22 zh->en: ALMA's prompt, and corpus-level sacreBLEU / chrF as lm-eval aggregations.

`process_results` passes each (reference, hypothesis) pair through; the aggregations score the
whole corpus at once, as BLEU and chrF are defined (an average of sentence scores is not BLEU).
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu

PAIR, SOURCE, TARGET = "zh-en", "zh", "en"
PROMPT = "Translate this from Chinese to English:\nChinese: {source}\nEnglish:"


def doc_to_text(doc: dict) -> str:
    return PROMPT.format(source=doc[PAIR][SOURCE])


def doc_to_target(doc: dict) -> str:
    return doc[PAIR][TARGET]


def process_results(doc: dict, results: list[str]) -> dict[str, tuple[str, str]]:
    pair = (doc_to_target(doc), results[0].strip())
    return {"bleu": pair, "chrf": pair}


def corpus_bleu(items: Sequence[tuple[str, str]]) -> float:
    references, hypotheses = zip(*items, strict=True)
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="13a").score


def corpus_chrf(items: Sequence[tuple[str, str]]) -> float:
    references, hypotheses = zip(*items, strict=True)
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score
