"""GPU check (issue: scale-out): merge two SmolLM2-135M fine-tunes on CUDA, evaluate with HF and vLLM.

Run on a machine with a GPU (the `device` tool's lent H100/H200), from the repository root:

    pip install -e '.[vllm,smollm2]' && python benchmarks/gpu_check.py --out "$OUT"

It writes `gpu_check.json`: merge time on CUDA, per-backend wall time and throughput (generated
examples per second on the same slice), and whether the two backends' scores agree. Record the
figures in docs/performance.md with the card that produced them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from harness.config import MergeConfig
from harness.engine import merge_model
from harness.evaluation import EvalSettings, evaluate
from harness.smollm2 import convert_smollm2

TASKS = ["gsm8k_fixture", "humaneval_sandboxed_fixture"]


def perturbed_copy(source: Path, target: Path, seed: int, scale: float = 0.002) -> Path:
    """A stand-in 'fine-tune': the base with small seeded noise on attention projections."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target.exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "self_attn" in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def timed_eval(model, tokenizer_dir, settings: EvalSettings) -> dict:
    start = time.perf_counter()
    report = evaluate(model, tokenizer_dir, TASKS, settings)
    seconds = time.perf_counter() - start
    counted = ("exact_match,strict-match", "pass@1")
    examples = sum(s.samples or 0 for s in report.scores if s.metric in counted)
    return {
        "seconds": seconds,
        "examples_per_second": examples / seconds if seconds else None,
        "scores": {f"{s.task} {s.metric}": s.value for s in report.scores},
        "task_seconds": report.task_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--limit", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = convert_smollm2(args.out / "smollm2")
    finetunes = [perturbed_copy(base, args.out / f"ft{i}", seed=i) for i in (1, 2)]
    config = MergeConfig.model_validate(
        {
            "method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(p)} for p in finetunes],
            "parameters": {"lambda": 0.5},
            "device": "cuda",
        }
    )
    start = time.perf_counter()
    model, tokenizer_dir = merge_model(config)
    merge_seconds = time.perf_counter() - start
    common = {"limit": args.limit, "gen_kwargs": {"max_gen_toks": 128}, "batch_size": 8}
    hf = timed_eval(model, tokenizer_dir, EvalSettings(device="cuda", **common))
    vllm = timed_eval(model.cpu(), tokenizer_dir, EvalSettings(backend="vllm", **common))
    agree = {k: (hf["scores"][k], vllm["scores"].get(k)) for k in hf["scores"]}
    record = {
        "device": torch.cuda.get_device_name(0),
        "merge_seconds_cuda": merge_seconds,
        "hf": hf,
        "vllm": vllm,
        "speedup_vllm_over_hf": hf["seconds"] / vllm["seconds"],
        "scores_hf_vs_vllm": agree,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
