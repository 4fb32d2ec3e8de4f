"""vLLM against HF on the SmolLM2 zoo: generation throughput and agreement of scores, one engine.

Run on a machine with CUDA and vllm (`pip install -e '.[vllm]'`), from the repository root:

    python -m benchmarks.vllm_check --zoo ~/.cache/merge-harness/zoo/smollm2-<hash> --out "$OUT"
    python -m benchmarks.vllm_check --build-zoo ~/.cache/merge-harness/zoo --out "$OUT"  # builds it first

Models: the zoo's base, its fine-tunes, and task-arithmetic and TIES merges of them made in
memory, all SmolLM2-135M-Instruct-shaped (Llama, 9 heads / 3 key-value heads, tied embeddings).
Each is evaluated on the zoo's generation tasks (toy_math, toy_code, toy_translate, toy_qa: chat
template, greedy) with lm-eval's HF backend on CUDA and with the vLLM backend through ONE engine
(`VllmEngine`): built for the first model, its weights swapped in place for every later one.
Both backends run in `--dtype` (default bfloat16). `vllm_check.json` holds:

- `runs`: per (model, backend, task): seconds evaluating (setup apart), setup seconds (vLLM: the
  engine build, or the swap), examples, generated tokens (the answers re-tokenized with the
  model's tokenizer), tokens/s, examples/s, scores;
- `agreement`: per (model, task): vLLM minus HF per metric, the share of examples whose filtered
  answer is identical, and of those whose whole generation is;
- `totals` per backend (evaluation and setup seconds, tokens/s, examples/s), and the engine's
  builds and swaps (expected: 1 build).

It is written after every model, so a timeout keeps what finished. Without CUDA or vllm the
script stops at once and says which is missing. `--backends hf --device cpu --limit 2 --models
base` runs the HF half on a CPU (a dry run of the plumbing).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from merge_harness.evaluate.evaluator import EvalSettings, evaluate
from merge_harness.evaluate.vllm_backend import VllmEngine, VllmOptions, vllm_available
from merge_harness.zoo.zoos import Zoo

MERGES = {"task_arithmetic": {"lambda": 0.5}, "ties": {"density": 0.5, "lambda": 1.0}}


def missing_requirements(backends: list[str], device: str) -> list[str]:
    """What this machine lacks for the requested run, in words."""
    missing = []
    if (device.startswith("cuda") or "vllm" in backends) and not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    if "vllm" in backends and not vllm_available():
        missing.append("vllm (pip install -e '.[vllm]')")
    return missing


def load_zoo(root: Path) -> Zoo:
    record = json.loads((root / "zoo.json").read_text())
    return Zoo.at(root, tuple(record["tasks"]), template=record.get("template", "chat"))


def zoo_models(zoo: Zoo, names: list[str] | None) -> Iterator[tuple[str, object, object]]:
    """(label, model, tokenizer) one at a time, on the CPU: base, fine-tunes, then merges."""
    from merge_harness.io.models import build_model, load_pretrained, load_tokenizer
    from merge_harness.merge.config import MergeConfig
    from merge_harness.merge.engine import merge_state_dict

    tokenizer = load_tokenizer(zoo.base)
    for label, path in {"base": zoo.base, **zoo.finetunes}.items():
        if names is None or label in names:
            yield label, load_pretrained(path), tokenizer
    for method, parameters in MERGES.items():
        if names is None or method in names:
            config = MergeConfig.model_validate({
                "method": method, "base_model": str(zoo.base), "parameters": parameters,
                "models": [{"model": str(path)} for path in zoo.finetunes.values()],
            })
            outcome = merge_state_dict(config)
            yield method, build_model(outcome.model_config, outcome.state), tokenizer


def generated_tokens(samples: list[dict], tokenizer) -> tuple[int, int]:
    """(examples, tokens the model generated): one record per document (lm-eval logs one per filter)."""
    answers = {sample["doc_id"]: sample["responses"] for sample in samples}
    texts = [text for response in answers.values() for text in flatten(response)]
    return len(answers), sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts)


def flatten(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [text for item in value for text in flatten(item)] if isinstance(value, list) else []


def run_one(model, tokenizer, task: str, backend: str, args, engine: VllmEngine | None) -> dict:
    settings = EvalSettings(
        backend=backend, device=args.device if backend == "hf" else "cpu", apply_chat_template=True,
        batch_size=args.hf_batch_size if backend == "hf" else "auto", limit=args.limit, log_samples=True,
    )
    builds = engine.builds if engine else 0
    report = evaluate(model, tokenizer, [task], settings, engine=engine)
    if backend == "hf" and args.device.startswith("cuda"):
        model.to("cpu")  # evaluate moved it; the vLLM engine reads the weights from the CPU
        torch.cuda.empty_cache()
    seconds = report.seconds - report.setup_seconds
    samples = report.samples or []
    examples, tokens = generated_tokens(samples, tokenizer)
    return {
        "backend": backend, "task": task, "eval_s": round(seconds, 3),
        "setup_s": round(report.setup_seconds, 3),
        "setup": ("build" if engine.builds > builds else "swap") if engine else None,
        "examples": examples, "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1), "examples_per_s": round(examples / seconds, 2),
        "scores": {score.metric: score.value for score in report.scores},
        "answers": {(s["doc_id"], s["filter"]): (str(s["filtered"]), str(s["responses"])) for s in samples},
    }


def agreement(hf: dict, vllm: dict) -> dict:
    """vLLM minus HF per metric, and how many answers are the same."""
    keys = sorted(hf["answers"].keys() & vllm["answers"].keys())

    def same(part: int) -> float:  # 0: the filtered answer, 1: the whole generation
        return sum(hf["answers"][k][part] == vllm["answers"][k][part] for k in keys) / max(len(keys), 1)

    return {
        "score_diff": {m: round(vllm["scores"][m] - value, 6)
                       for m, value in hf["scores"].items() if m in vllm["scores"]},
        "same_filtered_answers": round(same(0), 4),
        "same_generations": round(same(1), 4),
        "compared": len(keys),
    }


def totals(runs: list[dict], backend: str) -> dict:
    mine = [run for run in runs if run["backend"] == backend]
    seconds = sum(run["eval_s"] for run in mine)
    tokens, examples = sum(run["generated_tokens"] for run in mine), sum(run["examples"] for run in mine)
    return {"eval_s": round(seconds, 2), "setup_s": round(sum(run["setup_s"] for run in mine), 2),
            "generated_tokens": tokens, "examples": examples,
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "examples_per_s": round(examples / seconds, 2) if seconds else None}


def environment(args) -> dict:
    import lm_eval

    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "lm_eval": lm_eval.__version__,
              "dtype": args.dtype, "limit": args.limit, "hf_batch_size": args.hf_batch_size,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()}
    if vllm_available():
        import vllm

        record["vllm"] = vllm.__version__
    return record


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--zoo", type=Path, help="a built SmolLM2 zoo (a folder with zoo.json)")
    where.add_argument("--build-zoo", type=Path, help="build the SmolLM2 zoo under this root first")
    parser.add_argument("--out", type=Path, default=Path("vllm-check"))
    parser.add_argument("--tasks", help="comma-separated lm-eval tasks (default: the zoo's)")
    parser.add_argument("--models", help="comma-separated: base, the fine-tunes, task_arithmetic, ties")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--device", default="cuda", help="the HF backend's device")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="vLLM's share of the GPU (HF runs beside it)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if missing := missing_requirements(backends, args.device):
        sys.exit(f"vllm_check: this machine lacks {' and '.join(missing)}; nothing was run")
    if args.build_zoo:
        from merge_harness.zoo.zoos import build_smollm2_zoo

        zoo = build_smollm2_zoo(args.build_zoo.expanduser(), show_progress=False)
    else:
        zoo = load_zoo(args.zoo.expanduser().resolve())
    tasks = args.tasks.split(",") if args.tasks else list(zoo.tasks.values())
    options = VllmOptions(gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype)
    engine = VllmEngine(options) if "vllm" in backends else None  # HF shares the GPU: a smaller share
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict = {**environment(args), "tasks": tasks, "runs": [], "agreement": []}
    started = time.perf_counter()
    try:
        for label, model, tokenizer in zoo_models(zoo, args.models.split(",") if args.models else None):
            model = model.to(getattr(torch, args.dtype))
            by_backend = {}
            for backend in backends:
                for task in tasks:
                    run = run_one(model, tokenizer, task, backend, args, engine)
                    by_backend[backend, task] = run
                    kept = {k: v for k, v in run.items() if k != "answers"}
                    record["runs"].append({"model": label, **kept})
                    print(json.dumps(record["runs"][-1]), flush=True)
            for task in tasks if set(backends) >= {"hf", "vllm"} else []:
                row = agreement(by_backend["hf", task], by_backend["vllm", task])
                record["agreement"].append({"model": label, "task": task, **row})
            _save(record, args.out, backends, engine, started)
    finally:
        if engine is not None:
            engine.close()
    print(json.dumps({k: record[k] for k in ("totals", "engine") if k in record}, indent=2))


def _save(record: dict, out: Path, backends: list[str], engine: VllmEngine | None, started: float) -> None:
    record["totals"] = {backend: totals(record["runs"], backend) for backend in backends}
    record["wall_s"] = round(time.perf_counter() - started, 1)
    if engine is not None:
        record["engine"] = {"builds": engine.builds, "swaps": engine.swaps, "route": engine.route}
    (out / "vllm_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":  # vLLM starts its engine process with spawn once CUDA is initialised
    main()
