"""The vLLM backend's CPU-testable parts; the GPU path runs where vllm imports (see docs/gpu.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge_harness.core.errors import EvaluationError
from merge_harness.evaluate.vllm_backend import VllmOptions, staged_model, vllm_available, vllm_lm


def test_staged_copy_is_loadable_identical_and_removed(chat_zoo):
    from transformers import AutoModelForCausalLM

    from merge_harness.io.models import load_pretrained, load_tokenizer

    model = load_pretrained(chat_zoo["math"])
    tokenizer = load_tokenizer(chat_zoo["math"])
    with staged_model(model, tokenizer) as (directory, seconds):
        assert seconds > 0 and (directory / "config.json").exists()
        assert str(directory).startswith("/dev/shm") or not Path("/dev/shm").is_dir()
        reloaded = AutoModelForCausalLM.from_pretrained(directory)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, reloaded.state_dict()[name])
    assert not directory.exists()


@pytest.mark.skipif(vllm_available(), reason="vllm is installed: the error path cannot happen")
def test_missing_vllm_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="pip install 'merge-harness\\[vllm\\]'"):
        vllm_lm(tmp_path, VllmOptions(), batch_size=1, seed=0)


@pytest.mark.skipif(not (vllm_available() and torch.cuda.is_available()), reason="needs vllm and a GPU")
def test_vllm_and_hf_backends_agree_on_loglikelihood_tasks(chat_zoo):
    from merge_harness.evaluate.evaluator import EvalSettings, evaluate
    from merge_harness.io.models import load_pretrained

    model = load_pretrained(chat_zoo["math"])
    hf = evaluate(model, chat_zoo["math"], ["cosmos_qa_fixture"], EvalSettings(limit=4, device="cuda"))
    vllm = evaluate(model, chat_zoo["math"], ["cosmos_qa_fixture"], EvalSettings(limit=4, backend="vllm"))
    assert hf.value("cosmos_qa_fixture", "acc") == vllm.value("cosmos_qa_fixture", "acc")
