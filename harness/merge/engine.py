"""The expensive half of a merge: stream tensors through the method, to disk or into memory.

Per-tensor methods run one output tensor at a time: read that tensor from each input, merge in
float32 on the chosen device, cast to the output dtype, hand it to a sink (the shard writer or a
state dict) and drop it. Peak memory is therefore about one tensor per input model, whatever the
model size; elementwise methods (task arithmetic, linear) read and merge a large tensor a block
of rows at a time, so theirs is about one output tensor plus a few blocks. Random methods draw
from a CPU generator seeded by (seed, tensor name), so results do not depend on the order or the
subset of tensors merged, nor on the device.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_harness.core.errors import CheckpointError, MethodError
from merge_harness.core.progress import progress_bar
from merge_harness.io.checkpoint import ShardedWriter, check_not_an_input, check_output_dir
from merge_harness.io.models import build_model
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.outcome import MergeOutcome
from merge_harness.merge.output_files import chat_template_files, config_file, model_card
from merge_harness.merge.plan import MergePlan, TensorSource, TensorTask, build_plan

DEFAULT_SHARD_BYTES = 2 * 1024**3


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by the tensor's name: same name and seed, same draws on any device."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


@dataclass
class TensorInputs:
    """What one output tensor (or a block of its rows) is made from, read from the checkpoints."""

    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    passthrough: torch.Tensor | None = None  # set for tensors copied unchanged from the base


def read_inputs(
    plan: MergePlan, task: TensorTask, device: str = "cpu", rows: slice | None = None
) -> TensorInputs:
    """Read one output tensor's inputs (only `rows` of each, if given), NaN/inf-checked, on `device`."""
    if task.params is None:  # integer buffers and the like pass through unchanged
        source = task.base or task.sources[0]
        return TensorInputs(None, [], source.checkpoint.read(source.name))
    base = _read_checked(task.base, device, rows) if task.base else None
    return TensorInputs(base, [_read_checked(source, device, rows) for source in task.sources])


def merge_inputs(plan: MergePlan, task: TensorTask, inputs: TensorInputs) -> torch.Tensor:
    """Merge one output tensor; bad inputs and bad outputs are named with the tensor."""
    if inputs.passthrough is not None:
        return inputs.passthrough
    name = task.info.name
    generator = tensor_generator(plan.config.seed, name)
    try:
        merged = plan.method.merge_tensor(
            inputs.base, inputs.tensors, task.model_params, task.params, generator
        )
    except (ValueError, RuntimeError) as exc:
        raise MethodError(f"{plan.method.name} failed on tensor {name!r}: {exc}") from exc
    if not all_finite(merged):
        raise MethodError(f"{plan.method.name} produced NaN/inf in tensor {name!r}")
    return merged.to(task.info.dtype)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf: a one-pass sum finds any (NaN and inf propagate), and only a non-finite
    sum (possibly an overflow of huge finite values) pays for the exact element-wise check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _read_checked(source: TensorSource, device: str, rows: slice | None = None) -> torch.Tensor:
    tensor = source.read(rows).to(device)  # in the output vocabulary, for a vocabulary-mapped source
    if not all_finite(tensor):
        raise CheckpointError(f"{source.file}: tensor {source.name!r} contains NaN or inf")
    return tensor


# An elementwise method merges a tensor larger than this per input in blocks of about this size:
# the inputs of a block stay in the CPU's cache and peak memory is the output plus a few blocks.
BLOCK_BYTES = 4 * 1024**2
# Read-ahead may always hold this much besides the piece being merged (two blocks, say).
READ_AHEAD_BYTES = 64 * 1024**2


def row_blocks(plan: MergePlan, task: TensorTask) -> list[slice | None]:
    """The pieces `task` is merged in: [None] (whole), or blocks of rows for elementwise methods.

    Blocks hold a multiple of 64 entries, so every entry goes through the same vectorised kernel
    path as when the tensor is merged whole (bit-identical results). Tensors laid out in a new
    vocabulary are read whole (their rows come from anywhere in the inputs)."""
    shape = task.info.shape
    sources = (*([task.base] if task.base else []), *task.sources)
    if (not plan.method.elementwise or task.params is None or len(shape) == 0
            or any(s.vocabulary is not None for s in sources)
            or any(s.checkpoint.tensors[s.name].file.suffix != ".safetensors" for s in sources)):
        return [None]
    row_entries = max(1, task.info.nbytes // task.info.dtype.itemsize // max(shape[0], 1))
    row_bytes = max(s.checkpoint.tensors[s.name].nbytes for s in sources) // max(shape[0], 1)
    step = 64 // math.gcd(row_entries, 64)  # rows per 64-entry multiple
    rows = max(step, BLOCK_BYTES // max(row_bytes, 1) // step * step)
    if rows >= shape[0]:
        return [None]
    return [slice(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def piece_bytes(plan: MergePlan, task: TensorTask, rows: slice | None) -> int:
    """Bytes `read_inputs` holds for one piece of `task`: one tensor (or block) per input."""
    whole = task.info.nbytes * (len(task.sources) + (task.base is not None))
    if rows is None:
        return whole
    return whole * (rows.stop - rows.start) // task.info.shape[0]


def iter_merged(plan: MergePlan, device: str, show_progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged tensors in plan order, reading the next piece's inputs while this one merges.

    A piece is a whole tensor or, for elementwise methods, a block of its rows (`row_blocks`),
    merged into the output tensor in place. File reads release the GIL, so a reader thread
    overlaps IO with the arithmetic. It reads ahead only while the inputs of both pieces fit in
    what the largest piece needs anyway (or in READ_AHEAD_BYTES), so the peak memory of a merge
    is about that of a strictly serial one.
    """
    pieces = [(task, rows) for task in plan.tasks for rows in row_blocks(plan, task)]
    sizes = [piece_bytes(plan, task, rows) for task, rows in pieces]
    budget = max([READ_AHEAD_BYTES, *sizes])
    with (
        progress_bar(len(plan.tasks), f"merging ({plan.method.name})", show_progress) as advance,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-reader") as reader,
    ):
        ahead: Future[TensorInputs] | None = None
        output: torch.Tensor | None = None
        for index, (task, rows) in enumerate(pieces):
            inputs = ahead.result() if ahead is not None else read_inputs(plan, task, device, rows)
            ahead = None
            if index + 1 < len(pieces) and sizes[index] + sizes[index + 1] <= budget:
                next_task, next_rows = pieces[index + 1]
                ahead = reader.submit(read_inputs, plan, next_task, device, next_rows)
            merged = merge_inputs(plan, task, inputs)  # on error, leaving the block waits for the read
            del inputs
            if rows is not None:
                if rows.start == 0:
                    output = torch.empty(task.info.shape, dtype=merged.dtype, device=merged.device)
                output[rows] = merged
                if rows.stop < task.info.shape[0]:
                    continue
                merged, output = output, None
            yield task.info.name, merged
            advance()


def merged_tensors(
    plan: MergePlan, show_progress: bool = False, calibration: Sequence | None = None
) -> tuple[MergeOutcome, Iterator[tuple[str, torch.Tensor]]]:
    """The plan's merged tensors, one at a time in plan order, and the merge's outcome so far.

    Per-tensor methods merge each tensor as it is taken (`iter_merged`). Model-level methods
    (calibration data, whole-model statistics: see merge_harness.merge.data_driven) calibrate and
    solve now, and their outcome holds the coefficients and forward passes; `calibration`: their
    token batches, as in `merge_state_dict`.
    """
    if plan.method.streaming:
        outcome = MergeOutcome(None, None, 0.0, len(plan.tasks), [], plan.out_config, plan.sidecar_source)
        return outcome, iter_merged(plan, plan.config.device, show_progress)
    from merge_harness.merge.data_driven import calibrated_tensors

    return calibrated_tensors(plan.config, show_progress=show_progress, plan=plan, calibration=calibration)


def _write_coefficients(plan: MergePlan, outcome: MergeOutcome, out_dir: Path) -> None:
    """Solved coefficients (e.g. SLTA's) next to the weights, as `<method>_coefficients.json`."""
    if not outcome.coefficients:
        return
    record = {
        "method": plan.method.name,
        "coefficients": [vars(c) for c in outcome.coefficients],
        "forward_passes": outcome.forward_passes,
    }
    path = Path(out_dir) / f"{plan.method.name}_coefficients.json"
    path.write_text(json.dumps(record, indent=2) + "\n")


def merge_to_disk(
    config: MergeConfig,
    out_dir: Path,
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    show_progress: bool = True,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    allow_crimes: bool = False,
) -> MergeOutcome:
    """Merge into a HF model directory; nothing is left at `out_dir` unless the merge finished.

    Next to the weights: config.json, the tokenizer (unless `copy_tokenizer` is off), the merge
    config and a model card (`merge_harness.merge.output_files`; the card unless
    `write_model_card` is off). `allow_crimes`: merge models of different architectures whose
    tensors still match by name and shape (mergekit's option).
    """
    start = time.perf_counter()
    plan = build_plan(config, allow_crimes=allow_crimes)
    check_not_an_input(Path(out_dir), plan.inputs())
    check_output_dir(Path(out_dir), force)  # before calibration, which may take minutes
    extra_files = _files_beside_weights(plan, Path(out_dir).name, write_model_card)
    notes = list(plan.notes)
    if not copy_tokenizer and plan.remaps_vocabulary:  # mergekit writes it in this case too
        copy_tokenizer = True
        notes.append("--no-copy-tokenizer: the tokenizer is written anyway (the embeddings are laid out "
                     "in its new vocabulary)")
    calibrated, merged = merged_tensors(plan, show_progress)  # each tensor made as the writer takes it
    writer = ShardedWriter(Path(out_dir), [t.info for t in plan.tasks], max_shard_bytes, force)
    try:
        write_behind(merged, writer)
        writer.commit(plan.sidecar_source, plan.out_config, extra_files, copy_tokenizer)
    except BaseException:
        writer.abort()
        raise
    outcome = MergeOutcome(None, Path(out_dir), time.perf_counter() - start, len(plan.tasks))
    outcome.notes = notes
    if not plan.method.streaming:
        outcome.coefficients = calibrated.coefficients
        outcome.forward_passes = calibrated.forward_passes
        _write_coefficients(plan, outcome, Path(out_dir))
    return outcome


def write_behind(merged: Iterator[tuple[str, torch.Tensor]], writer: ShardedWriter) -> None:
    """Write each merged tensor on a second thread while the next one merges (one write in flight:
    at most one finished tensor waits besides the one being merged). File writes release the GIL."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer") as thread:
        pending: Future[None] | None = None
        try:
            for name, tensor in merged:
                if pending is not None:
                    pending.result()
                pending = thread.submit(writer.write, name, tensor)
        finally:
            if pending is not None:
                pending.result()


def _files_beside_weights(plan: MergePlan, name: str, write_model_card: bool) -> dict[str, str]:
    config_name, config_yaml = config_file(plan.config)
    files = {config_name: config_yaml}
    if write_model_card:
        files["README.md"] = model_card(plan.config, config_yaml, name)
    return {**files, **chat_template_files(plan.config, plan.sidecar_source)}


def merge_state_dict(
    config: MergeConfig,
    *,
    show_progress: bool = False,
    calibration: Sequence | None = None,
    plan: MergePlan | None = None,
) -> MergeOutcome:
    """Merge into memory: a {name: tensor} state dict, with no disk round trip.

    `calibration`: for model-level methods, your own token batches instead of the configured
    sources, one `merge_harness.merge.calibration_data.CalibrationSet` per fine-tune in config order.
    `plan`: the config's plan, where the caller has built it already.
    """
    start = time.perf_counter()
    plan = plan or build_plan(config)
    outcome, merged = merged_tensors(plan, show_progress, calibration)
    outcome.state = dict(merged)
    outcome.seconds = time.perf_counter() - start
    return outcome


def merge_into(
    plan: MergePlan, tensors: Mapping[str, torch.Tensor], *, show_progress: bool = False
) -> MergeOutcome:
    """Merge straight into existing tensors (a reused model's parameters), one tensor at a time.

    `tensors` must be exactly the plan's outputs, same names, shapes and dtypes (a model built
    from an earlier merge with the same `plan.out_config` is); each is overwritten in place, so
    a merge allocates one tensor at a time instead of a whole state dict.
    """
    start = time.perf_counter()
    misfit = layout_mismatch(plan, tensors)
    if misfit:
        raise MethodError(f"cannot merge into the given model: {misfit}")
    outcome, merged = merged_tensors(plan, show_progress)
    for name, tensor in merged:
        tensors[name].copy_(tensor)
    outcome.seconds = time.perf_counter() - start
    return outcome


def layout_mismatch(plan: MergePlan, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What differs between `tensors` and the plan's outputs (names, shapes, dtypes), or None."""
    names = [task.info.name for task in plan.tasks]
    if set(names) != set(tensors):
        extra, missing = sorted(set(tensors) - set(names)), sorted(set(names) - set(tensors))
        return f"tensors {missing[:3]} missing, {extra[:3]} not merged"
    for task in plan.tasks:
        target = tensors[task.info.name]
        if tuple(target.shape) != tuple(task.info.shape) or target.dtype != task.info.dtype:
            return (f"tensor {task.info.name!r} is {tuple(target.shape)} {target.dtype}, "
                    f"the merge makes {tuple(task.info.shape)} {task.info.dtype}")
    return None


def merge_model(
    config: MergeConfig, *, show_progress: bool = False, calibration: Sequence | None = None
) -> tuple[object, Path]:
    """Merge into a loaded transformers model, ready for lm-eval without a disk round trip.

    Returns the model and the directory its tokenizer files come from (`tokenizer_source`,
    else the base model). `calibration` as in `merge_state_dict`.
    """
    outcome = merge_state_dict(config, show_progress=show_progress, calibration=calibration)
    return build_model(outcome.model_config, outcome.state), outcome.tokenizer_dir
