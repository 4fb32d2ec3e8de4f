"""The one way config files are read: YAML with the line of every field, validated by a pydantic
model, errors as one line naming file:line and field path, paths relative to the file.

Merge configs, experiments, fine-tuning configs and paper specs all load through
`load_config_file`, so every config error reads the same and every relative path means the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from merge_harness.core.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)




def load_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML and remember the line of every mapping key / list item for error messages."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from exc
    lines: dict[tuple, int] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node | None, loc: tuple, lines: dict[tuple, int]) -> None:
    if node is None:
        return
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            lines[child] = key.start_mark.line + 1
            _collect_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, (*loc, index), lines)


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def locate(source: str, lines: dict[tuple, int], loc: tuple) -> str:
    """'file:line' of the field at `loc` (or of its nearest parent the YAML holds), else 'file'."""
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    return f"{source}:{line}" if line else source


def validation_error(source: str, exc: ValidationError, lines: dict[tuple, int]) -> ConfigError:
    """Turn pydantic's errors into one line: file:line: field.path: message, every error listed
    (separated by '; '), so one fix-and-rerun cycle fixes them all."""
    parts = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p[:1].isupper()))
        parts.append(f"{locate(source, lines, loc)}: {format_loc(loc) or '(top level)'}: {error['msg']}")
    return ConfigError("; ".join(dict.fromkeys(parts)))


def parse_config(model: type[BaseModel], data: Any, source: str, lines: dict | None = None):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(source, exc, lines or {}) from None


def load_config_file(path: str | Path, model: type[Model], what: str) -> tuple[Model, dict[tuple, int]]:
    """Read and validate a YAML mapping (`what`: "a merge config", for the error); the line map
    comes back so later checks can still name file:line."""
    data, lines = load_yaml(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a YAML mapping")
    return parse_config(model, data, str(path), lines), lines


def relative_to(ref: str | None, root: Path) -> str | None:
    """A path written in a config file is relative to that file; anything else (a HF id) is kept."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path) if path.exists() else ref
    return str(root / path) if (root / path).exists() else ref


def output_relative_to(ref: str | None, root: Path) -> str | None:
    """An output path written in a config file (a directory to write, a store) is relative to
    that file too; it need not exist yet."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    return str(path if path.is_absolute() else root / path)
