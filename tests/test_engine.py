"""Checkpoint IO and the streaming engine: outputs, sharding, dtypes, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_harness.core.errors import CheckpointError, ConfigError, MethodError
from merge_harness.io.checkpoint import Checkpoint, read_safetensors_header
from merge_harness.io.models import torch_threads
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_model, merge_state_dict, merge_to_disk, tensor_generator
from tests.conftest import state_of, write_llama


def ties_config(zoo, **extra) -> MergeConfig:
    models = [{"model": str(zoo[f"ft{i}"]), "parameters": {"density": 0.5}} for i in range(3)]
    return MergeConfig.model_validate(
        {"method": "ties", "base_model": str(zoo["base"]), "models": models, **extra}
    )


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------- output


def test_disk_output_equals_in_memory_state_and_loads_in_transformers(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    config = ties_config(tiny_zoo)
    outcome = merge_to_disk(config, tmp_path / "out", show_progress=False)
    on_disk = state_of(outcome.out_dir)
    in_memory = merge_state_dict(config).state
    assert set(on_disk) == set(in_memory)
    assert all(torch.equal(on_disk[n], in_memory[n]) for n in on_disk)
    loaded = AutoModelForCausalLM.from_pretrained(outcome.out_dir)
    built, tokenizer_dir = merge_model(config)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(loaded(ids).logits, built(ids).logits)
    assert tokenizer_dir == Path(tiny_zoo["base"])
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_sharded_output_has_index_and_respects_shard_size(tiny_zoo, tmp_path):
    out = merge_to_disk(
        ties_config(tiny_zoo), tmp_path / "out", max_shard_bytes=40_000, show_progress=False
    ).out_dir
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        tensors = load_file(shard)  # the reference reader accepts our streamed layout
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000 or len(tensors) == 1
    reopened = Checkpoint.open(out)
    assert set(reopened.tensors) == set(state_of(tiny_zoo["base"]))


def test_output_dtype_is_written_and_recorded_in_config(tiny_zoo, tmp_path):
    out = merge_to_disk(
        ties_config(tiny_zoo, out_dtype="bfloat16"), tmp_path / "out", show_progress=False
    ).out_dir
    assert {t.dtype for t in state_of(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bin_checkpoints_are_read_lazily(tiny_zoo, tmp_path):
    bin_dir = tmp_path / "bin_ft"
    bin_dir.mkdir()
    shutil.copy(tiny_zoo["ft0"] / "config.json", bin_dir)
    torch.save(state_of(tiny_zoo["ft0"]), bin_dir / "pytorch_model.bin")
    config = MergeConfig.model_validate(
        {
            "method": "task_arithmetic",
            "base_model": str(tiny_zoo["base"]),
            "models": [{"model": str(bin_dir)}],
        }
    )
    merged = merge_state_dict(config).state
    expected = state_of(tiny_zoo["ft0"])
    assert all(torch.allclose(merged[n], expected[n], atol=1e-6) for n in expected)


def test_random_methods_are_seeded_per_tensor_name():
    first = torch.rand(5, generator=tensor_generator(3, "a.weight"))
    again = torch.rand(5, generator=tensor_generator(3, "a.weight"))
    other_name = torch.rand(5, generator=tensor_generator(3, "b.weight"))
    other_seed = torch.rand(5, generator=tensor_generator(4, "a.weight"))
    assert torch.equal(first, again)
    assert not torch.equal(first, other_name) and not torch.equal(first, other_seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dare_ties", "della", "ties", "task_arithmetic"])
def test_a_merge_on_cuda_equals_the_cpu_merge(tiny_zoo, method):
    data = {
        "method": method,
        "base_model": str(tiny_zoo["base"]),
        "models": [{"model": str(tiny_zoo[f"ft{i}"])} for i in range(3)],
        "parameters": {"density": 0.5} if method != "task_arithmetic" else {},
    }
    on_cpu = merge_state_dict(MergeConfig.model_validate(data)).state
    on_cuda = merge_state_dict(MergeConfig.model_validate({**data, "device": "cuda"})).state
    for name, tensor in on_cpu.items():
        torch.testing.assert_close(on_cuda[name].cpu(), tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_dare_results_do_not_depend_on_other_tensors(tiny_zoo):
    models = [{"model": str(tiny_zoo["ft0"]), "parameters": {"density": 0.3}}]
    full = {"method": "dare_ties", "base_model": str(tiny_zoo["base"]), "models": models, "seed": 11}
    first = merge_state_dict(MergeConfig.model_validate(full)).state
    second = merge_state_dict(MergeConfig.model_validate(full)).state
    assert all(torch.equal(first[n], second[n]) for n in first)
    reseeded = merge_state_dict(MergeConfig.model_validate({**full, "seed": 12})).state
    assert any(not torch.equal(first[n], reseeded[n]) for n in first)


# ------------------------------------------------------------------------------------- bad input


def test_shape_mismatch_names_tensor_and_files(tiny_zoo, tmp_path):
    wide = write_llama(tmp_path / "wide", seed=5, intermediate_size=48)
    config = MergeConfig.model_validate(
        {"method": "ties", "base_model": str(tiny_zoo["base"]), "models": [{"model": str(wide)}]}
    )
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        merge_state_dict(config)


def test_missing_tensor_is_named(tiny_zoo, tmp_path):
    broken = copy_model(tiny_zoo["ft0"], tmp_path / "broken")
    state = load_file(broken / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    config = MergeConfig.model_validate(
        {"method": "task_arithmetic", "base_model": str(tiny_zoo["base"]), "models": [{"model": str(broken)}]}
    )
    with pytest.raises(CheckpointError, match=r"broken: tensor 'model\.norm\.weight' is missing"):
        merge_state_dict(config)


def test_different_architectures_are_refused(tiny_zoo, tmp_path):
    other = copy_model(tiny_zoo["ft0"], tmp_path / "other")
    config_file = other / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["MistralForCausalLM"]
    config_file.write_text(json.dumps(config))
    merge = MergeConfig.model_validate(
        {"method": "ties", "base_model": str(tiny_zoo["base"]), "models": [{"model": str(other)}]}
    )
    with pytest.raises(CheckpointError, match="architecture MistralForCausalLM differs"):
        merge_state_dict(merge)


def test_truncated_safetensors_file_is_detected_before_merging(tiny_zoo, tmp_path):
    truncated = copy_model(tiny_zoo["ft1"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file"):
        read_safetensors_header(weights)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 12)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        read_safetensors_header(garbage)


def test_nan_in_checkpoint_is_named(tiny_zoo, tmp_path):
    poisoned = copy_model(tiny_zoo["ft2"], tmp_path / "poisoned")
    state = load_file(poisoned / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    config = MergeConfig.model_validate(
        {"method": "linear", "models": [{"model": str(tiny_zoo["ft0"])}, {"model": str(poisoned)}]}
    )
    with pytest.raises(
        CheckpointError,
        match=r"poisoned/model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' contains NaN",
    ):
        merge_to_disk(config, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_unknown_method_suggests_the_close_name(tiny_zoo):
    config = MergeConfig.model_validate(
        {"method": "tie", "base_model": str(tiny_zoo["base"]), "models": [{"model": str(tiny_zoo["ft0"])}]}
    )
    with pytest.raises(MethodError, match="did you mean 'ties'"):
        merge_state_dict(config)


def test_out_of_range_parameter_names_the_field(tiny_zoo):
    config = MergeConfig.model_validate(
        {
            "method": "ties",
            "base_model": str(tiny_zoo["base"]),
            "models": [
                {"model": str(tiny_zoo["ft0"])},
                {"model": str(tiny_zoo["ft1"]), "parameters": {"density": 1.5}},
            ],
        }
    )
    with pytest.raises(
        ConfigError, match=r"models\[1\]\.parameters\.density: Input should be less than or equal to 1"
    ):
        merge_state_dict(config)


def test_unknown_parameter_is_refused(tiny_zoo):
    config = MergeConfig.model_validate(
        {
            "method": "ties",
            "base_model": str(tiny_zoo["base"]),
            "models": [{"model": str(tiny_zoo["ft0"])}],
            "parameters": {"lamda": 2},
        }
    )
    with pytest.raises(ConfigError, match=r"parameters\.lamda: Extra inputs are not permitted"):
        merge_state_dict(config)


def test_existing_output_is_refused_unless_forced(tiny_zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("finished result")
    with pytest.raises(CheckpointError, match="not empty"):
        merge_to_disk(ties_config(tiny_zoo), out, show_progress=False)
    assert (out / "precious.txt").read_text() == "finished result"
    merge_to_disk(ties_config(tiny_zoo), out, force=True, show_progress=False)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()


def test_unwritable_output_is_reported(tiny_zoo, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should go")
    with pytest.raises(CheckpointError, match="not writable|not a directory"):
        merge_to_disk(ties_config(tiny_zoo), blocker / "out", show_progress=False)


def test_reads_ahead_on_a_second_thread_with_the_same_result(tiny_zoo, monkeypatch):
    import threading

    import merge_harness.merge.engine as engine

    threads = []
    real = engine.read_inputs

    def recording(plan, task, device="cpu", rows=None):
        threads.append(threading.current_thread().name)
        return real(plan, task, device, rows)

    plan = engine.build_plan(ties_config(tiny_zoo))
    serial = {t.info.name: engine.merge_inputs(plan, t, real(plan, t)) for t in plan.tasks}
    monkeypatch.setattr(engine, "read_inputs", recording)
    overlapped = merge_state_dict(ties_config(tiny_zoo)).state
    assert any(name.startswith("merge-reader") for name in threads)
    assert len(threads) == len(serial)  # every tensor read exactly once
    for name, tensor in serial.items():
        assert torch.equal(overlapped[name], tensor), name


def test_elementwise_methods_merge_large_tensors_in_row_blocks_with_the_same_result(tiny_zoo, monkeypatch):
    import merge_harness.merge.engine as engine

    weights = (0.3, 0.5, 0.7)
    models = [{"model": str(tiny_zoo[f"ft{i}"]), "parameters": {"weight": w}} for i, w in enumerate(weights)]
    config = MergeConfig.model_validate(
        {"method": "task_arithmetic", "base_model": str(tiny_zoo["base"]), "models": models,
         "parameters": {"lambda": 0.8}}
    )
    whole = merge_state_dict(config).state
    monkeypatch.setattr(engine, "BLOCK_BYTES", 256)  # every matrix in blocks of a few rows
    plan = engine.build_plan(config)
    assert any(len(engine.row_blocks(plan, task)) > 2 for task in plan.tasks)
    blocked = merge_state_dict(config).state
    assert whole.keys() == blocked.keys()
    for name, tensor in whole.items():
        assert torch.equal(blocked[name], tensor), name


def test_read_at_completes_reads_the_kernel_cuts_short(tmp_path, monkeypatch):
    import os

    from merge_harness.io.checkpoint import read_at

    payload = bytes(range(256)) * 40
    (tmp_path / "blob").write_bytes(payload)
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: real(fd, [buffers[0][:7]], offset))
    view = memoryview(bytearray(1000))
    with (tmp_path / "blob").open("rb", buffering=0) as handle:
        assert read_at(handle, view, 100) == 1000
        assert bytes(view) == payload[100:1100]
        assert read_at(handle, memoryview(bytearray(100)), len(payload) - 10) == 10  # end of file


def test_failure_mid_merge_leaves_nothing_behind(tiny_zoo, tmp_path, monkeypatch):
    import merge_harness.merge.engine as engine

    calls = {"n": 0}
    real = engine.merge_inputs

    def failing(plan, task, inputs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MethodError("simulated failure")
        return real(plan, task, inputs)

    monkeypatch.setattr(engine, "merge_inputs", failing)
    with pytest.raises(MethodError):
        merge_to_disk(ties_config(tiny_zoo), tmp_path / "out", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_model_directory(tiny_zoo, tmp_path):
    config = MergeConfig.model_validate(
        {"method": "ties", "base_model": str(tiny_zoo["base"]), "models": [{"model": str(tmp_path / "nope")}]}
    )
    with pytest.raises(CheckpointError, match="nope: model directory not found"):
        merge_state_dict(config)


def test_offline_hub_id_fails_fast_with_a_clear_message(tiny_zoo):
    config = MergeConfig.model_validate(
        {"method": "ties", "base_model": str(tiny_zoo["base"]), "models": [{"model": "no-org/no-such-model"}]}
    )
    with pytest.raises(CheckpointError, match="no-org/no-such-model: not a local directory"):
        merge_state_dict(config)


# ------------------------------------------------------------------------------------------- CLI


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "merge_harness", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_merges_a_mergekit_yaml(tiny_zoo, tmp_path):
    yaml_file = tmp_path / "merge.yaml"
    yaml_file.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tiny_zoo['base']}\nmodels:\n"
        f"  - model: {tiny_zoo['ft0']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tiny_zoo['ft1']}\n    parameters: {{weight: 0.5}}\ndtype: float16\n"
    )
    result = cli("merge", str(yaml_file), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert {t.dtype for t in state_of(tmp_path / "out").values()} == {torch.float16}


def test_global_threads_option_applies_and_is_validated(tiny_zoo, tmp_path):
    yaml_file = tmp_path / "merge.yaml"
    yaml_file.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_zoo['ft0']}\n")
    assert cli("--threads", "1", "merge", str(yaml_file), str(tmp_path / "out"), "--quiet").returncode == 0
    refused = cli("--threads", "0", "merge", str(yaml_file), str(tmp_path / "out2"))
    assert refused.returncode == 2 and "--threads" in refused.stderr
    assert not (tmp_path / "out2").exists()


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 1"), torch_threads(0):
        pass


def test_cli_bad_input_is_one_line_with_exit_code_2(tiny_zoo, tmp_path):
    yaml_file = tmp_path / "merge.yaml"
    yaml_file.write_text(
        f"merge_method: ties\nbase_model: {tiny_zoo['base']}\nmodels:\n"
        f"  - model: {tiny_zoo['ft0']}\n    parameters:\n      density: -0.5\n"
    )
    result = cli("merge", str(yaml_file), str(tmp_path / "out"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "models[0].parameters.density" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_methods_lists_every_builtin_with_parameters():
    result = cli("methods")
    assert result.returncode == 0
    for name in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "model_stock"):
        assert name in result.stdout
    assert "density" in result.stdout
