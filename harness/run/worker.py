"""One model job, wherever it runs: build the model (merging in memory, after a held-out search
when the job asks for one), evaluate it on its pending tasks, and hand each result to a sink.

Executors call `run_model_job` (the local executor in-process, Ray in a worker); it never touches
the store, so it can run on any host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from merge_harness.core.allocator import peak_rss_mb, reset_peak_rss
from merge_harness.core.results import JobResult
from merge_harness.merge.config import MergeConfig
from merge_harness.run.experiment import ModelJob, TaskJob

ResultSink = Callable[[JobResult], None]


def searched_merge(job: ModelJob) -> tuple[MergeConfig | None, dict | None]:
    """The merge to build and, for a `search:` job, what the held-out search chose (else None)."""
    if job.merge is None or job.search is None:
        return job.merge, None
    from merge_harness.selection.answers import DataSettings
    from merge_harness.selection.search import SearchSpec, search_coefficient

    search, merge = job.search, job.merge
    settings = search.settings
    finetunes = {entry.model: entry.model for entry in merge.models if entry.model in search.held_out}
    spec = SearchSpec(
        method=merge.method,
        parameter=settings.parameter,
        grid=settings.grid,
        metric=settings.metric,
        calibration={m: s for m, s in search.calibration.items() if m in finetunes},
    )

    def at(value: float) -> MergeConfig:  # the job's own merge, the searched parameter replaced
        return merge.model_copy(update={"parameters": {**merge.parameters, settings.parameter: value}})

    data = DataSettings(
        num_samples=settings.num_samples,
        seed=settings.seed,
        template=search.template,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        held_out_fraction=None if search.whole_sources else settings.held_out_fraction,
    )
    result = search_coefficient(merge.base_model, finetunes, search.held_out, spec, data, config_at=at)
    selected = {"by": "held-out", "parameter": settings.parameter, "value": result.chosen,
                "metric": settings.metric, "score": result.best_score}
    return at(result.chosen), selected


class ModelCache:
    """One model object reused by a run's merge jobs: each merge is written into its parameters
    in place (`merge_into`) instead of into a fresh state dict and model per job.

    It holds the model of the last merged layout (the merged config.json: architecture, sizes,
    dtype); a merge with another layout, or by a model-level method (SLTA, RegMean, Fisher: their
    calibration holds the base model, or a fine-tune's network and two sums, while a held model
    would sit idle), builds a new model, which replaces it.
    The executor that runs jobs one after another in a process owns one for the run.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._model = None
        self._engine = None  # the run's vLLM engine, made by the first vLLM evaluation

    def vllm_engine(self):
        """The run's vLLM engine: one for all its models, their weights swapped in place."""
        if self._engine is None:
            from merge_harness.evaluate.vllm_backend import VllmEngine

            self._engine = VllmEngine()
        return self._engine

    def close(self) -> None:
        """Shut the vLLM engine down and drop the kept model."""
        if self._engine is not None:
            self._engine.close()
        self._engine = self._key = self._model = None

    def merged_model(self, merge: MergeConfig):
        """(model, merge outcome) for `merge`, reusing the held model where its layout fits."""
        from merge_harness.io.models import build_model, model_tensors
        from merge_harness.merge.engine import layout_mismatch, merge_into, merge_state_dict
        from merge_harness.merge.plan import build_plan

        plan = build_plan(merge)
        key = json.dumps(plan.out_config, sort_keys=True)
        # A model-level method's tensors come one at a time, but only after its calibration,
        # which holds the base model (SLTA, RegMean) or a fine-tune's network, its Fisher and
        # two sums: a held model would add one model to that peak, so it is freed instead.
        if self._model is not None and key == self._key and plan.method.streaming:
            tensors = model_tensors(self._model)
            if layout_mismatch(plan, tensors) is None:  # e.g. an evaluation cast it: build anew
                return self._model, merge_into(plan, tensors)
        self._key = self._model = None  # the old model's memory is free before the new merge
        outcome = merge_state_dict(merge, plan=plan)  # the plan built above, not a second one
        model = build_model(outcome.model_config, outcome.state)
        outcome.state = None  # the model owns the tensors now
        self._key, self._model = key, model
        return model, outcome


def load_job_model(job: ModelJob, merge: MergeConfig | None = None, models: ModelCache | None = None):
    """(model, tokenizer, merge outcome or None): merges in memory (into `models`' model where
    it fits), other models from their directory."""
    from merge_harness.io.models import load_pretrained, load_tokenizer, resolve_model

    merge = merge or job.merge
    if merge is not None:
        model, outcome = (models or ModelCache()).merged_model(merge)
        return model, load_tokenizer(outcome.tokenizer_dir), outcome
    path = resolve_model(job.model_ref)
    return load_pretrained(path), load_tokenizer(path), None


def run_model_job(
    job: ModelJob,
    pending: Sequence[TaskJob],
    experiment: str,
    sink: ResultSink,
    models: ModelCache | None = None,
) -> None:
    """Build one model and evaluate it on its pending tasks, handing each result to `sink`.

    `models`: the run's model to merge into (jobs run one after another); None builds a fresh one.
    """
    from merge_harness.evaluate.evaluator import evaluate
    from merge_harness.merges.model_level import statistics_reuse

    reset_peak_rss()  # the recorded peak is this job's: building the model and evaluating it
    start = time.perf_counter()
    with statistics_reuse():  # a search's calibration statistics serve its final merge too
        merge, selected = searched_merge(job)
        model, tokenizer, outcome = load_job_model(job, merge, models)
    build_seconds = time.perf_counter() - start
    coefficients = outcome.coefficients if outcome else []
    for task in pending:
        engine = models.vllm_engine() if models is not None and task.settings.backend == "vllm" else None
        report = evaluate(model, tokenizer, [task.task], task.settings, engine=engine)
        timings = {"build": build_seconds, "evaluate": report.seconds}
        if report.setup_seconds:
            timings["backend_setup"] = report.setup_seconds
        if outcome is not None:
            timings["merge"] = outcome.seconds
        sink(
            JobResult(
                key=task.key,
                experiment=experiment,
                model_label=job.label,
                spec={**task.spec, "selected": selected} if selected else task.spec,
                scores=list(report.scores),
                coefficients=list(coefficients),
                timings=timings,
                versions=dict(report.versions),
                peak_rss_mb=peak_rss_mb(),
                samples_log=report.samples,
            )
        )
