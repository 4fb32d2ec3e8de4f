"""What a merge writes next to its weights besides config.json, as mergekit does.

- The merge config it was made from: `mergekit_config.yml` for configs in mergekit's format
  (mergekit reads it back), `merge_config.yml` for ours (`method:`; merge-harness reads it back).
- A Hugging Face model card, README.md, with the metadata HF uses for merged models: `base_model`
  (the merged models on the Hub), `tags: [merge, merge-harness]`, `library_name: transformers`.
- The chat template the config asks for (`chat_template:`: Jinja, a bundled name such as
  `chatml`, or `auto`), in tokenizer_config.json and chat_template.jinja.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from pathlib import Path

import yaml

from merge_harness.core.errors import ConfigError
from merge_harness.io.models import resolve_model
from merge_harness.merge.config import MergeConfig

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CARD = """---
{{ metadata }}---
# {{ name }}

This is a merge of pre-trained language models made with
[merge-harness](https://github.com/merge-harness/merge-harness).

## Merge details

This model was merged with the `{{ method }}` method{% if base %}, using {{ base }} as the base{% endif %}.

The following models were merged:
{% for model in models %}
- {{ model }}
{%- endfor %}

## Configuration

```yaml
{{ config_yaml }}```
"""


def is_hub_id(ref: str) -> bool:
    """`org/name` that is not a directory here: how a model is named on the Hugging Face Hub."""
    return bool(HUB_ID.match(ref)) and not Path(ref).exists()


def config_file(config: MergeConfig) -> tuple[str, str]:
    """(file name, YAML) of the config, in the format it was written in."""
    data = config.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude={"mergekit_compat"})
    if not config.mergekit_compat:
        data = {"method": data.pop("merge_method"), **data}
        return "merge_config.yml", yaml.safe_dump(data, sort_keys=False)
    return "mergekit_config.yml", yaml.safe_dump(data, sort_keys=False)


def model_card(config: MergeConfig, config_yaml: str, name: str) -> str:
    """README.md: HF's model-card metadata for a merge, then what was merged and how."""
    refs = config.referenced_models()
    base = None if config.method == "slerp" else config.base_model  # slerp's base is a merged model
    metadata = {"base_model": [r for r in refs if is_hub_id(r)], "tags": ["merge", "merge-harness"],
                "library_name": "transformers"}
    if not metadata["base_model"]:
        del metadata["base_model"]
    models = [_link(r) for r in refs if r != base]
    import jinja2  # here, not at the top: the import is ~20 ms of every merge's start-up

    card = jinja2.Template(CARD, keep_trailing_newline=True)
    return card.render(metadata=yaml.safe_dump(metadata, sort_keys=False), name=name, method=config.method,
                       base=_link(base) if base else None, models=models, config_yaml=config_yaml)


def _link(ref: str) -> str:
    return f"[{ref}](https://huggingface.co/{ref})" if is_hub_id(ref) else ref


def chat_template_files(config: MergeConfig, sidecar_source: Path) -> dict[str, str]:
    """The files that carry `chat_template:` (none when the config sets none): the template in
    tokenizer_config.json and in chat_template.jinja (which transformers prefers when present).

    `sidecar_source` is where the output's tokenizer comes from (a model's directory, or the
    merged vocabulary's, `merge_harness.merge.vocabulary`).
    """
    template = resolve_chat_template(config)
    if template is None:
        return {}
    path = sidecar_source / "tokenizer_config.json"
    settings = json.loads(path.read_text()) if path.exists() else {}
    return {"tokenizer_config.json": json.dumps({**settings, "chat_template": template}, indent=2) + "\n",
            "chat_template.jinja": template}


CHAT_TEMPLATES = Path(__file__).parent / "chat_templates"  # mergekit 0.1.5's bundled templates, by name


def bundled_chat_templates() -> list[str]:
    return sorted(path.stem for path in CHAT_TEMPLATES.glob("*.jinja"))


def resolve_chat_template(config: MergeConfig) -> str | None:
    """The template `chat_template:` names: a Jinja template as written, a bundled template by
    name (chatml, llama3, alpaca, mistral, exaone: mergekit's), or `auto`, the template most of
    the inputs have. None when the config sets none."""
    template = config.chat_template
    if template is None:
        return None
    if template == "auto":
        templates = (_chat_template(Path(resolve_model(ref))) for ref in config.referenced_models())
        found = Counter(t for t in templates if t)
        if not found:
            raise ConfigError("chat_template: auto, but none of the merged models has a chat template")
        return found.most_common(1)[0][0]
    if "{{" in template or "{%" in template:
        return template
    names = bundled_chat_templates()
    if template in names:
        return (CHAT_TEMPLATES / f"{template}.jinja").read_text()
    close = difflib.get_close_matches(template, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"chat_template: {template!r} is neither a bundled template ({', '.join(names)}), "
                      f"`auto` nor a Jinja template{hint}")


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    path = model_dir / "tokenizer_config.json"
    template = json.loads(path.read_text()).get("chat_template") if path.exists() else None
    return template if isinstance(template, str) else None
