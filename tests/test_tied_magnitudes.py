"""Tied magnitudes: every magnitude cut keeps exactly mergekit's count, and mergekit's entries.

Real task vectors have ties: theta_t - theta_0 in float32 is a multiple of ulp(theta_0), and in
bfloat16 a handful of exponents and 8-bit mantissas cover a whole tensor. A threshold rule
(|tau| >= k-th largest) then keeps every entry tied with the cut. mergekit sorts and keeps exactly
k; we select in O(n) and sort only when a tie straddles a cut, with mergekit's own sort call, so
the kept set is mergekit's (module docstring of `merge_harness.merges.sparsify`).

Checked here: hand cases; exactly k and mergekit's set on heavily tied tensors; whole per-tensor
merges against mergekit's `merge_group` with the same seed (the random methods draw the same
masks); and end to end against mergekit's `run_merge` on float32 checkpoints whose task vectors are
ulp-quantized (fine-tune = base + 0.02 std N(0, 1)) and on bfloat16 checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_state_dict
from merge_harness.merges.sparsify import sparsify_magnitude, sparsify_magprune, sparsify_outliers
from tests.conftest import TINY_LLAMA, state_of
from tests.test_merge_math import run

mergekit = pytest.importorskip("mergekit", reason="mergekit is the reference (extra 'dev')")
from mergekit import sparsify as mk  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.registry import get as mergekit_method  # noqa: E402

from tests.test_mergekit_agreement import run_mergekit  # noqa: E402

T = torch.tensor


def tied(shape, seed: int, levels: int = 20) -> torch.Tensor:
    """Magnitudes from 1..levels (times 1e-3), random signs: most entries share their magnitude."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(1, levels + 1, shape, generator=g).float() * 1e-3
    return torch.where(torch.rand(shape, generator=g) < 0.5, -magnitude, magnitude)


def straddles(tau: torch.Tensor, k: int) -> bool:
    """Would the threshold rule keep more than k? (a tie straddles the k-th largest)"""
    flat = tau.abs().reshape(-1).numpy()
    return int((flat >= np.partition(flat, flat.size - k)[flat.size - k]).sum()) > k


# ------------------------------------------------------------------------------- hand cases


def test_hand_tied_case_keeps_exactly_k():
    tau = T([0.5, -1.0, 1.0, 0.25, -1.0, 1.0, 0.5, 1.0])  # |tau| = 1 five times
    kept = sparsify_magnitude(tau, 0.5)  # k = int(0.5 * 8) = 4
    # A threshold kept all five 1s. mergekit's argsort (torch sorts under 17 entries by
    # insertion, so ties come lowest index first here) keeps indices 1, 2, 4, 5 and drops 7.
    assert kept.tolist() == [0.0, -1.0, 1.0, 0.0, -1.0, 1.0, 0.0, 0.0]
    assert torch.equal(kept, mk.magnitude(tau, 0.5))


def test_hand_tied_breadcrumbs_case_cuts_ties_at_both_ends():
    tau = T([1.0, 1.0, 1.0, 2.0, -2.0, 2.0, 3.0, -3.0, 3.0, 3.0])
    kept = sparsify_outliers(tau, density=0.4, gamma=0.2)
    # keep = 4, n_top = 2, n_bottom = 10 - 4 - 2 = 4: ascending ranks 4..7 of the (here stable)
    # sort, i.e. indices 4, 5 (two of the three 2s) and 6, 7 (two of the four 3s)
    assert kept.tolist() == [0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 3.0, -3.0, 0.0, 0.0]
    assert torch.equal(kept, mk.magnitude_outliers(tau, 0.4, gamma=0.2))


@pytest.mark.parametrize("seed", range(6))
def test_replayed_sort_window_is_torchs_sorted_set(seed):
    """`window_indices` replays only the partitions of torch's CPU sort that decide a window."""
    from merge_harness.merges.introsort import window_indices

    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 40, (20_000 + seed * 777,), generator=g).float()
    for descending in (True, False):
        order = torch.sort(values, descending=descending).indices
        keys = (-values if descending else values).numpy().copy()
        start, stop = (0, 9_000) if descending else (3_000, 15_000)
        chosen = window_indices(keys, start, stop)
        assert chosen is not None
        assert set(chosen.tolist()) == set(order[start:stop].tolist())


# ------------------------------------------------------------- heavily tied tensors, vs mergekit

TIED_INPUTS = {
    "levels": lambda: tied((300, 200), seed=0),
    "bf16": lambda: (
        (torch.randn(300, 200, generator=torch.Generator().manual_seed(1)) * 0.01).bfloat16().float()
    ),
    "1d": lambda: tied((576,), seed=2, levels=6),
}


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("inputs", sorted(TIED_INPUTS))
def test_magnitude_keeps_mergekits_k_entries(inputs, density):
    tau = TIED_INPUTS[inputs]()
    k = max(1, int(density * tau.numel()))
    assert straddles(tau, k)  # the case the threshold rule got wrong
    ours = sparsify_magnitude(tau, density)
    assert int((ours != 0).sum()) == k
    assert torch.equal(ours, mk.magnitude(tau, density))


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.05), (0.6, 0.1), (0.9, 0.2), (0.3, 0.0)])
@pytest.mark.parametrize("inputs", sorted(TIED_INPUTS))
def test_breadcrumbs_keeps_mergekits_entries(inputs, density, gamma):
    tau = TIED_INPUTS[inputs]()
    ours = sparsify_outliers(tau, density, gamma)
    assert int((ours != 0).sum()) == int(density * tau.numel())
    assert torch.equal(ours, mk.magnitude_outliers(tau, density, gamma=gamma))


@pytest.mark.parametrize("inputs", sorted(TIED_INPUTS))
def test_della_ranks_and_masks_match_mergekit(inputs):
    tau = TIED_INPUTS[inputs]()
    torch.manual_seed(11)
    theirs = mk.della_magprune(tau, density=0.5, epsilon=0.2)
    assert torch.equal(sparsify_magprune(tau, 0.5, 0.2, torch.Generator().manual_seed(11)), theirs)


# --------------------------------------------------- one tensor through the whole method, vs mergekit

PER_TENSOR = {
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.4},
    "dare_linear": {"density": 0.4},
    "breadcrumbs": {"density": 0.6, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
    "della": {"density": 0.4, "epsilon": 0.15},
    "della_linear": {"density": 0.4, "epsilon": 0.15},
}


def mergekit_merge_tensor(method: str, base, finetunes, weights, per_model: dict) -> torch.Tensor:
    """mergekit's own merge of one tensor (its `merge_group`), with its defaults for the rest."""
    spec = mergekit_method(method)
    shared = {p.name: p.default for p in spec.spec.parameters if p.name not in ("weight", *per_model)}
    per = {key: dict.fromkeys(range(1, 4), value) for key, value in per_model.items()}
    per["weight"] = dict(enumerate(weights, 1))  # entry 0 is the base
    group = TensorGroup.from_tensors([base, *finetunes], base_index=0)
    return spec.merge_group(group, **shared, **per)


@pytest.mark.parametrize("method", sorted(PER_TENSOR))
def test_one_tensor_merge_matches_mergekit_on_bf16_values(method):
    """bf16-valued (heavily tied) inputs, float32 math in both; same seed, so the same masks."""
    g = torch.Generator().manual_seed(4)
    base = (torch.randn(64, 96, generator=g) * 0.02).bfloat16()
    finetunes = [(base.float() + 0.02 * 0.02 * torch.randn(64, 96, generator=g)).bfloat16() for _ in range(3)]
    base, finetunes = base.float(), [f.float() for f in finetunes]
    weights = [0.3, 0.5, 0.7]
    torch.manual_seed(9)
    theirs = mergekit_merge_tensor(method, base, finetunes, weights, PER_TENSOR[method])
    ours = run(
        method,
        base,
        finetunes,
        params={"rescale_norm": "l1"},
        model_params=[{"weight": w, **PER_TENSOR[method]} for w in weights],
        seed=9,
    )
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert not torch.equal(ours, base)


# ------------------------------------------------------------------- end to end, vs run_merge


def write_tied_zoo(root, dtype: torch.dtype) -> dict:
    """A base (norms 1 + 0.1 N(0, 1)) and three fine-tunes = base + 0.02 std(tensor) N(0, 1),
    each computed in float32 (or bf16) so that theta_t - theta_0 is quantized by theta_0's ulp."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(**{**TINY_LLAMA, "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128})
    ).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape))
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.save_pretrained(root / "base")
    zoo = {"base": root / "base"}
    for index in range(3):
        g = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                b = base[name]
                param.copy_(b + 0.02 * b.float().std() * torch.randn(b.shape, generator=g).to(dtype))
        model.save_pretrained(root / f"ft{index}")
        zoo[f"ft{index}"] = root / f"ft{index}"
    return zoo


@pytest.fixture(scope="module")
def tied_zoos(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tied")
    return {
        kind: write_tied_zoo(root / kind, dtype)
        for kind, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }


E2E = {
    # density 0.3: with these seeds one float32 tie straddles the cut in an entry whose sign is
    # elected, so the threshold rule was 4.1e-4 off mergekit here (in bf16: 2.0e-3)
    "ties": ({}, {"density": 0.3}),
    "ties_rescaled": ({"rescale": True, "normalize": False}, {"density": 0.4}),
    "breadcrumbs": ({}, {"density": 0.6, "gamma": 0.1}),
    "breadcrumbs_ties": ({"lambda": 0.9}, {"density": 0.5, "gamma": 0.05}),
    "dare_ties": ({}, {"density": 1.0}),  # its masks are random: the deterministic path here
    "della": ({}, {"density": 1.0, "epsilon": 0.1}),
}


def count_straddles(zoo: dict, density: float) -> int:
    base = state_of(zoo["base"])
    count = 0
    for index in range(3):
        for name, tensor in state_of(zoo[f"ft{index}"]).items():
            tau = tensor.float() - base[name].float()
            count += straddles(tau, max(1, int(density * tau.numel())))
    return count


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(E2E))
def test_tied_checkpoints_merge_as_mergekit(case, kind, tied_zoos, tmp_path):
    """float32 math in both (mergekit upcasts to `dtype`), output in the checkpoints' dtype:
    float32 agrees to 1e-5, bfloat16 exactly."""
    zoo = tied_zoos[kind]
    params, per_model = E2E[case]
    if case == "ties":  # the threshold rule would have kept extra entries somewhere
        assert count_straddles(zoo, per_model["density"]) >= 1
    config = {
        "merge_method": case.removesuffix("_rescaled"),
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo[f"ft{i}"]), "parameters": {"weight": w, **per_model}}
            for i, w in enumerate([0.3, 0.5, 0.7])
        ],
        "parameters": params,
        "dtype": "float32",
        "out_dtype": kind,
    }
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = merge_state_dict(MergeConfig.model_validate(config)).state
    assert ours is not None and set(ours) == set(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == getattr(torch, kind)
        diff = (ours[name].float() - expected.float()).abs().max().item()
        assert diff <= (1e-5 if kind == "float32" else 0.0), f"{case}/{kind}: {name} differs by {diff}"
