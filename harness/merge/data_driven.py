"""The engine for model-level methods (SLTA, RegMean, Fisher): calibration data in, weights out.

`merge_calibrated` does what `merge_harness.merge.engine` does for per-tensor methods, plus the model work:

1. the plan (headers, names, shapes, parameters) is checked before any tensor is read;
2. the tokenizer (tokenizer_source, else the base) must match every fine-tune's vocabulary;
3. each fine-tune's calibration set is drawn from its `calibration:` source (train split) in the
   template it was trained with, or given by the caller as token batches;
4. for SLTA and RegMean the base model (or, for methods without a base, the first fine-tune)
   is built in memory in float32 on `config.device` and dropped once its statistics stream
   ends; fine-tunes are read one layer at a time (SLTA, RegMean) or one whole model at a time
   (Fisher) by `merge_harness.merge.features.LayerwiseFeatures`;
5. the method's `merge_model(inputs, params)` returns float32 tensors (made lazily where the
   method can) and its coefficients; `calibrated_tensors` hands them on one at a time in plan
   order, cast to the output dtype and checked for NaN/inf, so a merge to disk or into a model
   never holds the whole merged state besides its destination.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from merge_harness.core.errors import ConfigError, MethodError
from merge_harness.core.progress import progress_bar
from merge_harness.io.checkpoint import Checkpoint
from merge_harness.io.models import build_model, load_tokenizer
from merge_harness.merge.calibration_data import (
    CalibrationRecipe,
    CalibrationSet,
    check_same_vocab,
    load_calibration,
    resolve_recipe,
)
from merge_harness.merge.config import MergeConfig, ModelEntry
from merge_harness.merge.features import LayerwiseFeatures
from merge_harness.merge.outcome import MergeOutcome
from merge_harness.merge.plan import MergePlan, build_plan
from merge_harness.merges.base import Params
from merge_harness.merges.model_level import CalibratedParams


def merge_calibrated(
    config: MergeConfig,
    *,
    show_progress: bool = False,
    plan: MergePlan | None = None,
    calibration: Sequence[CalibrationSet] | None = None,
) -> MergeOutcome:
    """Merge with a model-level method; the state dict stays in memory (on `config.device`).

    `calibration`: the caller's own token batches, one per fine-tune in config order (else each
    fine-tune's `calibration:` source is drawn and tokenized).
    """
    start = time.perf_counter()
    outcome, tensors = calibrated_tensors(
        config, show_progress=show_progress, plan=plan, calibration=calibration
    )
    outcome.state = dict(tensors)
    outcome.seconds = time.perf_counter() - start
    return outcome


def calibrated_tensors(
    config: MergeConfig,
    *,
    show_progress: bool = False,
    plan: MergePlan | None = None,
    calibration: Sequence[CalibrationSet] | None = None,
) -> tuple[MergeOutcome, Iterator[tuple[str, torch.Tensor]]]:
    """Calibrate and solve; the merged tensors follow one at a time, `finished_tensors`.

    The outcome (state None) holds the coefficients and forward passes; its `seconds` cover the
    calibration only, until the caller has taken the tensors.
    """
    start = time.perf_counter()
    plan = plan or build_plan(config)
    method = plan.method
    if method.merge_model is None:
        raise ConfigError(f"merge_method: {method.name!r} is a per-tensor method, not model-level")
    params = method_params(plan)
    reference = plan.base or plan.models[0]
    with progress_bar(_layer_count(reference), f"calibrating ({method.name})", show_progress) as advance:
        inputs = calibration_features(config, plan, params, calibration, advance)
        try:
            merged = method.merge_model(inputs, params)
        except (ValueError, RuntimeError) as exc:
            raise MethodError(f"{method.name} failed: {exc}") from exc
    outcome = MergeOutcome(
        None,
        None,
        time.perf_counter() - start,
        len(plan.tasks),
        merged.coefficients,
        model_config=plan.out_config,
        tokenizer_dir=plan.sidecar_source,
        forward_passes=inputs.forward_passes(),
    )
    return outcome, finished_tensors(plan, merged.state)


def calibration_features(
    config: MergeConfig,
    plan: MergePlan,
    params: Params,
    calibration: Sequence[CalibrationSet] | None = None,
    advance=lambda: None,
) -> LayerwiseFeatures:
    """What a model-level method receives (`CalibrationInputs`): each fine-tune's calibration set
    (drawn from its source, or the caller's token batches) and the models, read lazily."""
    entries = fine_tune_entries(config, plan, need_sources=calibration is None)
    given = calibration is not None
    data = given_sets(calibration, entries) if given else calibration_sets(plan, entries, params)
    reference = plan.base or plan.models[0]
    return LayerwiseFeatures(
        lambda: reference_model(reference, config.device),  # built only if a stream needs it
        plan.base,
        plan.models,
        data,
        task_labels(entries),
        [task.info.name for task in plan.tasks if task.params is not None],
        device=config.device,
        batch_size=config.calibration.batch_size,
        advance=advance,
    )


def method_params(plan: MergePlan) -> Params:
    """Model-level parameters apply to the whole model: filters and gradients are refused."""
    resolved = {task.params for task in plan.tasks if task.params is not None}
    if len(resolved) != 1:
        raise ConfigError(
            f"parameters: {plan.method.name!r} is a model-level method; its parameters must be "
            "plain values (no filters or gradients)"
        )
    return resolved.pop()


def fine_tune_entries(config: MergeConfig, plan: MergePlan, need_sources: bool = True) -> list[ModelEntry]:
    """The config entries of `plan.models`, same order; each must name its calibration data."""
    entries = [e for e in config.models if plan.base is None or e.model != config.base_model]
    if len(entries) != len(plan.models):
        raise ConfigError("models: could not match the fine-tunes to their config entries")
    for entry in entries:
        if need_sources and not entry.calibration:
            raise ConfigError(
                f"models[{config.models.index(entry)}].calibration: {plan.method.name!r} needs "
                f"calibration data for {entry.model} (a JSONL file or an lm-eval task name)"
            )
    return entries


def task_labels(entries: list[ModelEntry]) -> list[str]:
    """One label per fine-tune: its directory or hub name; repeated names get '#2', '#3'..."""
    labels: list[str] = []
    for entry in entries:
        label = Path(entry.model.rstrip("/")).name or entry.model
        count = sum(1 for existing in labels if existing.split("#")[0] == label)
        labels.append(label if count == 0 else f"{label}#{count + 1}")
    return labels


def calibration_recipes(
    config: MergeConfig, entries: list[ModelEntry], params: Params, model_dirs: Sequence[Path]
) -> list[CalibrationRecipe]:
    """Each fine-tune's resolved recipe (source, template, N, seed...); `entries` and
    `model_dirs` as `fine_tune_entries` and the plan's models give them, in the same order."""
    num_samples = params.num_samples if isinstance(params, CalibratedParams) else 30
    seed = params.seed if isinstance(params, CalibratedParams) else config.seed
    return [
        resolve_recipe(
            entry.calibration, config.calibration, num_samples, seed, directory,
            f"models[{config.models.index(entry)}].calibration",
        )
        for entry, directory in zip(entries, model_dirs)
    ]


def calibration_sets(plan: MergePlan, entries: list[ModelEntry], params: Params) -> list[CalibrationSet]:
    tokenizer = load_tokenizer(plan.sidecar_source)
    others = [m.path for m in ([plan.base] if plan.base else []) + plan.models]
    check_same_vocab(tokenizer, plan.sidecar_source, [p for p in others if p != plan.sidecar_source])
    recipes = calibration_recipes(plan.config, entries, params, [m.path for m in plan.models])
    return [load_calibration(recipe, tokenizer) for recipe in recipes]


def given_sets(calibration: Sequence[CalibrationSet], entries: list[ModelEntry]) -> list[CalibrationSet]:
    """The caller's token batches: one CalibrationSet per fine-tune."""
    sets = list(calibration)
    if len(sets) != len(entries):
        raise ConfigError(f"calibration: {len(sets)} token batches given for {len(entries)} fine-tunes")
    for index, item in enumerate(sets):
        if not isinstance(item, CalibrationSet):
            raise ConfigError(
                f"calibration[{index}]: expected a CalibrationSet (CalibrationSet.from_tokens(...)), "
                f"got {type(item).__name__}"
            )
    return sets


def reference_model(checkpoint: Checkpoint, device: str) -> torch.nn.Module:
    """A float32 transformers model of `checkpoint`, in memory on `device`."""
    state = {}
    for name, info in checkpoint.tensors.items():
        tensor = checkpoint.read(name)
        state[name] = tensor.to(device, torch.float32) if info.dtype.is_floating_point else tensor
    return build_model(checkpoint.config, state).to(device)


def finished_tensors(
    plan: MergePlan, merged: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Plan order, output dtypes, non-float tensors passed through, NaN/inf refused.

    Each tensor is taken out of `merged` (`pop`: a dict lets go of it, a `LazyState` makes it
    now and frees what it needed) just before it is handed on."""
    reference = plan.base or plan.models[0]
    name = plan.method.name
    for task in plan.tasks:
        tensor_name = task.info.name
        if task.params is None:
            yield tensor_name, reference.read(tensor_name)
            continue
        if tensor_name not in merged:
            raise MethodError(f"{name} returned no tensor {tensor_name!r}")
        try:
            tensor = merged.pop(tensor_name) if hasattr(merged, "pop") else merged[tensor_name]
        except (ValueError, RuntimeError) as exc:
            raise MethodError(f"{name} failed on tensor {tensor_name!r}: {exc}") from exc
        if not torch.isfinite(tensor).all():
            raise MethodError(f"{name} produced NaN/inf in tensor {tensor_name!r}")
        tensor = tensor.to(task.info.dtype)  # the float32 one goes now, not at the next tensor
        yield tensor_name, tensor


def _layer_count(checkpoint: Checkpoint) -> int:
    return int(checkpoint.config.get("num_hidden_layers", 0) or 0)
