"""The one module that talks to lm-evaluation-harness: a loaded model in, `Score`s out.

The model is wrapped in memory (`HFLM(pretrained=model)`), never written to disk. lm-eval's
response cache is keyed on the request only, not on the model, so it is never used
(`use_cache=None`): a merged model must not be answered from another model's cache.
Each task runs in its own `simple_evaluate` call with the seeds set afresh, so a task's numbers
do not depend on which tasks ran before it, and a failure names the task it happened in.

Metric names: lm-eval reports "metric,filter" (e.g. "exact_match,strict-match", "acc,none").
A `Score.metric` is that key with a ",none" filter dropped: "acc", "pass@1", "bleu", but
"exact_match,strict-match" and "exact_match,flexible-extract" where the task defines filters.
`lmeval_key(metric)` turns it back into lm-eval's key.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from merge_harness.core.errors import EvaluationError, HarnessError
from merge_harness.core.results import JobResult, Score
from merge_harness.tasks import TASKS_DIR

if TYPE_CHECKING:
    from merge_harness.evaluate.vllm_backend import VllmEngine

NO_FILTER = "none"


class EvalSettings(BaseModel):
    """How lm-eval runs; part of every result's key, so two settings never share a result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int | float | None = Field(None, gt=0, description="examples per task (<1: a fraction)")
    num_fewshot: int | None = Field(None, ge=0, description="override the tasks' few-shot counts")
    batch_size: int | str = Field(1, description="an int, or 'auto' (lm-eval finds the largest)")
    apply_chat_template: bool | None = Field(
        None, description="None: as the task declares (metadata.apply_chat_template), else off"
    )
    fewshot_as_multiturn: bool = Field(False, description="few-shot examples as chat turns")
    gen_kwargs: dict[str, Any] | None = Field(None, description="override generation kwargs")
    seed: int = 1234
    log_samples: bool = False
    device: str = "cpu"
    bootstrap_iters: int = Field(1000, description="for stderrs lm-eval bootstraps (e.g. BLEU)")
    backend: Literal["hf", "vllm"] = Field("hf", description="hf (in memory) or vllm (GPU, extra)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM only: GPUs per model")


@dataclass
class EvaluationReport:
    """What one model scored on some tasks, with what it takes to reproduce the numbers."""

    scores: list[Score]
    versions: dict[str, str]  # "lm_eval", "<task>.version", "<task>.config" (sha256 prefix)
    seconds: float  # all of it, the backend's set-up included
    samples: list[dict[str, Any]] | None = None  # one record per (task, doc, filter)
    setup_seconds: float = 0.0  # wrapping the model for the backend (vLLM: starting the engine)

    def value(self, task: str, metric: str) -> float:
        for score in self.scores:
            if score.task == task and score.metric == metric:
                return score.value
        known = sorted({(s.task, s.metric) for s in self.scores})
        raise EvaluationError(f"no score for {task!r} / {metric!r} (have: {known})")


class TaskCatalog:
    """lm-eval's task index over our YAML folders plus (by default) lm-eval's built-in tasks."""

    def __init__(self, include_paths: Sequence[Path] = (TASKS_DIR,), include_defaults: bool = True):
        self.include_paths = [Path(p) for p in include_paths]
        self.include_defaults = include_defaults

    @functools.cached_property
    def manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(
            include_path=[str(p) for p in self.include_paths], include_defaults=self.include_defaults
        )

    @property
    def names(self) -> list[str]:
        return self.manager.all_tasks

    def custom_names(self) -> list[str]:
        """The tasks defined in our folders (not lm-eval's built-ins)."""
        roots = [p.resolve() for p in self.include_paths]
        index = self.manager.task_index
        return sorted(
            name
            for name, entry in index.items()
            if entry.yaml_path and any(root in Path(entry.yaml_path).resolve().parents for root in roots)
        )

    def check(self, names: Sequence[str]) -> None:
        """Unknown task names fail before any model work, with close matches suggested."""
        known = set(self.names)
        unknown = [name for name in names if name not in known]
        if not names:
            raise EvaluationError("no tasks to evaluate")
        if unknown:
            raise EvaluationError("; ".join(self._unknown_message(name) for name in unknown))

    def declares_chat_template(self, name: str) -> bool:
        """Whether the task's YAML says `metadata: {apply_chat_template: true}` (a chat task)."""
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = self.manager.task_index.get(name)
        if entry is None or not entry.yaml_path:
            return False
        metadata = load_yaml(entry.yaml_path, resolve_func=False).get("metadata")
        return isinstance(metadata, dict) and metadata.get("apply_chat_template") is True

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        ours = ", ".join(self.custom_names())
        return f"unknown task {name!r}{hint} (harness tasks: {ours}; `lm-eval ls tasks` lists lm-eval's)"


@functools.cache
def default_catalog() -> TaskCatalog:
    """Indexing lm-eval's ~15k task YAMLs takes seconds: do it once per process."""
    return TaskCatalog()


@functools.cache
def local_catalog() -> TaskCatalog:
    """Only our task folders: indexed in well under a second."""
    return TaskCatalog(include_defaults=False)


def catalog_for(names: Sequence[str]) -> TaskCatalog:
    """Our own catalog when it has every task (fast start-up), else lm-eval's full index."""
    local = local_catalog()
    return local if names and set(names) <= set(local.names) else default_catalog()


def check_tasks(names: Sequence[str], catalog: TaskCatalog | None = None) -> None:
    (catalog or catalog_for(names)).check(names)


def chat_template_for(name: str, settings: EvalSettings, catalog: TaskCatalog | None = None) -> bool:
    """The setting as given, else what the task declares (chat tasks get the template)."""
    if settings.apply_chat_template is not None:
        return settings.apply_chat_template
    return (catalog or catalog_for([name])).declares_chat_template(name)


def chat_template_warnings(
    names: Sequence[str], settings: EvalSettings, catalog: TaskCatalog | None = None
) -> list[str]:
    """One warning per chat task that the settings explicitly run without the chat template."""
    if settings.apply_chat_template is not False:
        return []
    catalog = catalog or catalog_for(names)
    return [
        f"task {name!r} is a chat task (its YAML sets metadata.apply_chat_template: true) but runs "
        "without the chat template: its scores will be far below the model's"
        for name in names
        if catalog.declares_chat_template(name)
    ]


def check_backend(backend: str = "hf") -> None:
    """Fail fast, before any expensive work, when lm-eval's model class cannot be imported.

    lm-eval's HF model imports `accelerate` (which lm-eval does not declare); vLLM is an extra.
    """
    from merge_harness.core.extras import missing_package_error

    try:
        if backend == "vllm":
            import vllm  # noqa: F401
        else:
            import lm_eval.models.huggingface  # noqa: F401
    except ImportError as exc:
        raise missing_package_error(exc, f"evaluation with lm-eval's {backend!r} backend") from exc


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    settings: EvalSettings,
    catalog: TaskCatalog | None = None,
    engine: VllmEngine | None = None,
) -> EvaluationReport:
    """Evaluate an in-memory transformers model on lm-eval tasks.

    `tokenizer` is a tokenizer or the directory to load it from (as `merge_model` returns);
    the model is moved to `settings.device` in place. Unknown tasks fail before any model work.
    `engine`: the run's vLLM engine to swap the model into (backend "vllm"; default: a fresh one
    for this call, shut down after it).
    """
    import lm_eval

    catalog = catalog or catalog_for(tasks)
    catalog.check(tasks)
    start = time.perf_counter()
    scores: list[Score] = []
    versions = {"lm_eval": lm_eval.__version__, **_library_versions()}
    samples: list[dict[str, Any]] | None = [] if settings.log_samples else None
    with _wrapped_model(model, tokenizer, settings, engine) as (lm, setup_seconds):
        for name in tasks:
            results = _run_task(lm, name, settings, catalog)
            scores += parse_scores(results)
            versions.update(task_versions(results))
            if samples is not None:
                samples += sample_records(results)
    return EvaluationReport(scores, versions, time.perf_counter() - start, samples, setup_seconds)


@contextlib.contextmanager
def _wrapped_model(
    model: Any, tokenizer: Any, settings: EvalSettings, engine: VllmEngine | None = None
) -> Iterator[tuple[Any, float]]:
    """lm-eval's model object for the chosen backend, and the seconds its setup took.

    "hf" wraps the in-memory model (no disk); "vllm" puts the model into the run's engine (built
    once from a RAM-backed copy, later models' weights swapped in place; see
    merge_harness.evaluate.vllm_backend), or into a fresh engine for this call.
    """
    if isinstance(tokenizer, (str, Path)):
        from merge_harness.io.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if settings.backend == "vllm":
        from merge_harness.evaluate.vllm_backend import VllmEngine, VllmOptions

        options = VllmOptions(tensor_parallel_size=settings.tensor_parallel_size)
        own = engine is None  # no engine of a run: one for this evaluation, shut down after it
        engine = VllmEngine() if own else engine
        try:
            yield engine.lm_for(model, tokenizer, options, settings.batch_size, settings.seed)
        finally:
            if own:
                engine.close()
        return
    from lm_eval.models.huggingface import HFLM

    model = model.to(settings.device).eval()
    yield HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size), 0.0


def _run_task(lm: Any, name: str, settings: EvalSettings, catalog: TaskCatalog) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    try:
        results = simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=catalog.manager,
            use_cache=None,  # never: lm-eval's cache does not key on the model
            limit=settings.limit,
            num_fewshot=settings.num_fewshot,
            apply_chat_template=chat_template_for(name, settings, catalog),
            fewshot_as_multiturn=settings.fewshot_as_multiturn,
            gen_kwargs=dict(settings.gen_kwargs) if settings.gen_kwargs else None,
            log_samples=settings.log_samples,
            bootstrap_iters=settings.bootstrap_iters,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
    except HarnessError as exc:
        raise EvaluationError(f"task {name!r}: {exc}") from exc
    except ConnectionError as exc:  # datasets' answer to a data set missing from the HF cache
        fixture = f"{name}_fixture"
        hint = f", or run {fixture!r} on its offline fixture" if fixture in catalog.names else ""
        raise EvaluationError(
            f"task {name!r}: its data set cannot be loaded ({_first_line(exc)}); "
            f"download it into the HF cache while online{hint}"
        ) from exc
    except Exception as exc:
        raise EvaluationError(
            f"task {name!r}: lm-eval failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if not results or not results.get("results"):
        raise EvaluationError(f"task {name!r}: lm-eval returned no results")
    return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def metric_name(lmeval_key: str) -> str:
    """'acc,none' -> 'acc'; 'exact_match,strict-match' stays as it is."""
    metric, _, filter_name = lmeval_key.partition(",")
    return metric if filter_name in ("", NO_FILTER) else lmeval_key


def lmeval_key(metric: str) -> str:
    """The inverse of `metric_name`."""
    return metric if "," in metric else f"{metric},{NO_FILTER}"


def parse_scores(results: Mapping[str, Any]) -> list[Score]:
    """Every metric of every task in an lm-eval results dict; stderr None where lm-eval has none."""
    scores = []
    for task, metrics in results["results"].items():
        count = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            # metrics are "metric,filter"; "alias" and "sample_len" are bookkeeping, not metrics
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            scores.append(Score(task, metric_name(key), float(value), stderr, count))
    return scores


def task_versions(results: Mapping[str, Any]) -> dict[str, str]:
    """Each task's declared version and a hash of its full config (prompts, metrics, code)."""
    versions = {}
    for task, config in results.get("configs", {}).items():
        versions[f"{task}.version"] = str(results.get("versions", {}).get(task))
        versions[f"{task}.config"] = config_hash(config)
    return versions


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the config lm-eval ran (functions as their source), minus where it was read from."""
    config = dict(config)
    metadata = {k: v for k, v in (config.pop("metadata", None) or {}).items() if k != "config_source"}
    payload = json.dumps({**config, "metadata": metadata}, sort_keys=True, default=_stable_repr)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _stable_repr(value: Any) -> str:
    qualname = getattr(value, "__qualname__", None)  # a callable lm-eval did not serialise
    return f"{getattr(value, '__module__', '')}.{qualname}" if qualname else str(value)


def _library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def sample_records(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's per-sample log, flattened and made JSON-safe for the store."""
    records = []
    for task, samples in (results.get("samples") or {}).items():
        for sample in samples:
            records.append(
                {
                    "task": task,
                    "doc_id": sample["doc_id"],
                    "filter": sample["filter"],
                    "prompt": _json_safe(sample["arguments"][0][0]),
                    "target": _json_safe(sample["target"]),
                    "responses": _json_safe(sample["resps"]),
                    "filtered": _json_safe(sample["filtered_resps"]),
                    "metrics": {m: _json_safe(sample.get(m)) for m in sample["metrics"]},
                }
            )
    return records


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # numpy's float64 is a float subclass: make it a plain float
        return float(value)
    if hasattr(value, "item"):  # other numpy / torch scalars
        return value.item()
    return str(value)


def lmeval_results_json(results: Sequence[JobResult], config: Mapping[str, Any]) -> dict[str, Any]:
    """Stored results in the shape of lm-eval's results JSON (what `lm_eval --output_path` writes):
    "results" per task with lm-eval's "metric,filter" keys and stderrs ("N/A" where none),
    "versions", "n-samples" and "config" (how the model was run)."""
    payload: dict[str, Any] = {"results": {}, "versions": {}, "n-samples": {}, "config": dict(config)}
    for result in results:
        for score in result.scores:
            metrics = payload["results"].setdefault(score.task, {"name": score.task, "alias": score.task})
            metric, _, filter_name = lmeval_key(score.metric).partition(",")
            metrics[f"{metric},{filter_name}"] = score.value
            metrics[f"{metric}_stderr,{filter_name}"] = "N/A" if score.stderr is None else score.stderr
            if score.samples is not None:
                metrics["sample_len"] = score.samples
                payload["n-samples"][score.task] = {"effective": score.samples}
        for name, value in result.versions.items():
            if name.endswith(".version"):
                payload["versions"][name.removesuffix(".version")] = _version_value(value)
        payload["lm_eval_version"] = result.versions.get("lm_eval")
    payload["date"] = time.time()
    return payload


def _version_value(text: str) -> Any:
    """lm-eval writes task versions as the YAML gave them (1.0, not "1.0")."""
    try:
        return float(text)
    except ValueError:
        return text


def write_lmeval_json(payload: Mapping[str, Any], output_path: Path, model_name: str) -> Path:
    """Write where lm-eval would: `X.json` -> `X_<date>.json`, else `X/<model>/results_<date>.json`."""
    from lm_eval.utils import sanitize_model_name

    stamp = datetime.now().isoformat().replace(":", "-")
    if output_path.suffix == ".json":
        target = output_path.with_name(f"{output_path.stem}_{stamp}.json")
    else:
        target = output_path / sanitize_model_name(model_name) / f"results_{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return target
