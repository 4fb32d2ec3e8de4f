"""What the reports know about tasks, metrics and methods: primary metric, scale, display names.

A task's primary metric is the one it declares (`merge_harness.tasks.primary_metric`: its YAML's
`metadata.primary_metric`, inherited by fixture and chat variants). Scores are stored in
lm-eval's units; reports show *points*: 0-1 metrics (acc, exact_match, pass@k, f1) times 100,
0-100 metrics (bleu, chrf) as they are. Check tolerances are in the same points.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from merge_harness.tasks import by_name_prefix
from merge_harness.tasks import primary_metric as declared_primary_metric

FALLBACK_METRICS = ("acc", "exact_match,strict-match", "exact_match", "pass@1", "f1", "bleu")

TASK_TITLES: dict[str, str] = {
    "gsm8k": "GSM8K",
    "winogrande": "Winogrande",
    "cosmos_qa": "Cosmos QA",
    "ropes": "ROPES",
    "humaneval": "HumanEval",
    "wmt22_zh_en": "WMT22 zh-en",
    "toy_math": "Toy math",
    "toy_code": "Toy code",
    "toy_translate": "Toy translate",
    "toy_qa": "Toy QA",
}
POINTS_AS_IS = {"bleu", "chrf", "ter", "comet"}  # already 0-100 (or unbounded): no x100
LOWER_IS_BETTER = {"ter", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}

METHOD_TITLES: dict[str, str] = {
    "linear": "Linear",
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES",
    "dare_linear": "DARE (linear)",
    "dare_ties": "DARE-TIES",
    "breadcrumbs": "Breadcrumbs",
    "breadcrumbs_ties": "Breadcrumbs-TIES",
    "della": "DELLA",
    "della_linear": "DELLA (linear)",
    "slerp": "SLERP",
    "model_stock": "Model Stock",
    "regmean": "RegMean",
    "fisher": "Fisher",
    "slta": "SLTA",
    "multislerp": "Multi-SLERP",
    "nuslerp": "NuSLERP",
    "karcher": "Karcher mean",
    "sce": "SCE",
    "ram": "RAM",
    "ramplus_tl": "RAM+ (TL)",
    "nearswap": "NearSwap",
    "arcee_fusion": "Arcee Fusion",
    "passthrough": "Passthrough",
}
GRANULARITY_TITLES = {"model": "model", "layer": "layer", "attn_mlp": "attn/MLP"}
KIND_ORDER = {"base": 0, "finetune": 1, "model": 2, "merge": 3}


def primary_metric(task: str, available: Iterable[str] = ()) -> str:
    """The metric a table shows for `task`: the one it declares; a task that declares none
    (or whose results lack it) falls back on what it reports."""
    available = sorted(set(available))
    metric = declared_primary_metric(task)
    if metric is not None and (not available or metric in available):
        return metric
    for candidate in FALLBACK_METRICS:
        if candidate in available:
            return candidate
    return metric or (available[0] if available else "acc")


def task_title(task: str) -> str:
    """'GSM8K' for gsm8k, 'GSM8K (fixture)' for gsm8k_fixture; unknown tasks keep their name."""
    title = by_name_prefix(task, TASK_TITLES)
    if title is None:
        return task
    return f"{title} (fixture)" if task.endswith("_fixture") else title


def metric_base(metric: str) -> str:
    """'exact_match' for 'exact_match,strict-match'."""
    return metric.split(",", 1)[0]


def points_per_unit(metric: str) -> float:
    """Multiply a stored value by this to get points: 100 for 0-1 metrics; 1 for BLEU, chrF and
    unbounded metrics (perplexities), which are shown as they are."""
    return 1.0 if metric_base(metric) in POINTS_AS_IS | LOWER_IS_BETTER else 100.0


def higher_is_better(metric: str) -> bool:
    return metric_base(metric) not in LOWER_IS_BETTER


def method_title(method: str, params: Mapping[str, Any]) -> str:
    """'SLTA (attn/MLP)' for slta with granularity attn_mlp; 'TIES' for ties."""
    title = METHOD_TITLES.get(method, method)
    granularity = params.get("granularity")
    if granularity is not None:
        title += f" ({GRANULARITY_TITLES.get(str(granularity), granularity)})"
    return title


def format_params(params: Mapping[str, Any], skip: Iterable[str] = ("granularity",)) -> str:
    """'density=0.5, lambda=1.0' (sorted, `skip` left out)."""
    skip = set(skip)
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items()) if k not in skip)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
