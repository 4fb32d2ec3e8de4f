"""Agreement with mergekit at full size: SmolLM2-135M-shaped checkpoints with tied magnitudes.

The base is `LlamaForCausalLM(SMOLLM2_135M)` with random weights (norms 1 + 0.1 N(0, 1)); each of
three fine-tunes is base + 0.02 std(tensor) N(0, 1) per tensor, computed and stored in float32
or in bfloat16, so theta_t - theta_0 is quantized by theta_0's ulp and equal |tau| straddle the
magnitude cuts in most large tensors (the case `merges/introsort.py` replays). Both engines read
the same mergekit-format config; the merged safetensors are compared tensor by tensor.

Random methods (dare_ties, della) are compared end to end at density 1 (their masks then keep
everything, so the rest of the routine -- rescale, sign election, disjoint merge -- is compared
deterministically); their per-tensor masks with a shared seed are compared against mergekit's
`merge_group` in `tests/test_tied_magnitudes.py`.

    .venv/bin/pytest benchmarks/test_agreement_135m.py -m slow -q -s     # ~10 min here

Figures go to `benchmarks/results/agreement_135m.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import CACHE_DIR, SMOLLM2_135M, warm_page_cache

pytestmark = pytest.mark.slow
mergekit = pytest.importorskip("mergekit", reason="mergekit is the reference (extra 'dev')")

ZOO_VERSION = "smollm2-135m-tied-v1"
RESULTS = Path(__file__).parent / "results" / "agreement_135m.json"
WEIGHTS = (0.3, 0.5, 0.7)
CASES = {  # method -> (merge parameters, per-model parameters besides the weight)
    "task_arithmetic": ({"lambda": 1.0}, {}),
    "ties": ({}, {"density": 0.5}),
    "dare_ties": ({}, {"density": 1.0}),
    "breadcrumbs_ties": ({}, {"density": 0.5, "gamma": 0.05}),
    "della": ({}, {"density": 1.0, "epsilon": 0.1}),
}
# float32 math in both engines (mergekit upcasts to `dtype`), output in the checkpoints' dtype
TOLERANCE = {"float32": 1e-5, "bfloat16": 2.0**-7}  # bf16: at most one rounding step near 1
_FIGURES: dict[str, dict] = {}


def _write_zoo(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    zoo = {"base": root / "base", **{f"ft{i}": root / f"ft{i}" for i in range(3)}}
    if (root / ".complete").exists():
        return zoo
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape))
    model.to(dtype).save_pretrained(zoo["base"])
    del model
    base = load_file(zoo["base"] / "model.safetensors")
    for index in range(3):
        generator = torch.Generator().manual_seed(index + 1)
        state = {
            name: b + 0.02 * b.float().std() * torch.randn(b.shape, generator=generator).to(dtype)
            for name, b in base.items()
        }
        zoo[f"ft{index}"].mkdir(parents=True)
        save_file(state, zoo[f"ft{index}"] / "model.safetensors", metadata={"format": "pt"})
        shutil.copy2(zoo["base"] / "config.json", zoo[f"ft{index}"] / "config.json")
    (root / ".complete").write_text(ZOO_VERSION + "\n")
    return zoo


@pytest.fixture(scope="module")
def tied_zoos() -> dict[str, dict[str, Path]]:
    zoos = {
        kind: _write_zoo(CACHE_DIR / ZOO_VERSION / kind, dtype)
        for kind, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }
    yield zoos
    if _FIGURES:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(_FIGURES, indent=2) + "\n")


def _config(method: str, zoo: dict[str, Path], dtype: str) -> dict:
    params, per_model = CASES[method]
    models = [
        {"model": str(zoo[f"ft{i}"]), "parameters": {"weight": w, **per_model}} for i, w in enumerate(WEIGHTS)
    ]
    return {"merge_method": method, "base_model": str(zoo["base"]), "models": models,
            "parameters": params, "dtype": "float32", "out_dtype": dtype}


def _max_abs_diff(ours: Path, theirs: Path) -> tuple[float, str, int]:
    """(largest |ours - mergekit| of any entry, its tensor, number of differing entries)."""
    from safetensors.torch import load_file

    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    worst, where, differing = 0.0, "", 0
    for name in a:
        diff = (a[name].double() - b[name].double()).abs()
        differing += int((diff > 0).sum())
        if float(diff.max()) >= worst:
            worst, where = float(diff.max()), name
    return worst, where, differing


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", list(CASES))
def test_135m_agrees_with_mergekit(method, kind, tied_zoos, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from merge_harness.merge.config import MergeConfig
    from merge_harness.merge.engine import merge_to_disk

    zoo = tied_zoos[kind]
    warm_page_cache(list(zoo.values()))
    config = _config(method, zoo, kind)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"), options)
    merge_to_disk(MergeConfig.model_validate(config), tmp_path / "ours", show_progress=False,
                  copy_tokenizer=False, write_model_card=False)
    worst, where, differing = _max_abs_diff(tmp_path / "ours", tmp_path / "mergekit")
    _FIGURES[f"{method}/{kind}"] = {"max_abs_diff": worst, "tensor": where, "differing_entries": differing,
                                    "config": {k: v for k, v in config.items() if k != "models"}
                                    | {"per_model": CASES[method][1]}}
    print(f"\n{method} {kind}: max |ours - mergekit| = {worst:.3g} in {where} ({differing} entries differ)")
    assert worst <= TOLERANCE[kind]
