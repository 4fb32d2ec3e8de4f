"""Merge configs: one pydantic schema that reads both our YAML and mergekit's.

mergekit users bring configs like::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: [{filter: self_attn, value: 0.5}, {value: 0.3}]}
    parameters: {normalize: true}
    dtype: bfloat16

and that is our format too (`method:` is accepted as a synonym of `merge_method:`). A parameter
value is a scalar, a gradient (a list of numbers interpolated over the layers), or a list of
`{filter, value}` conditions where the first condition whose filter is a substring of the tensor
name wins. Errors name the YAML file, line and field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import ConfigError
from harness.prompts import check_template

Scalar = bool | int | float | str


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: Scalar | list[Scalar]
    filter: str | None = None


Setting = Scalar | list[Scalar] | Condition | list[Condition]


class CalibrationSource(BaseModel):
    """One fine-tune's calibration data and how it is drawn (`calibration: PATH` is short for
    `calibration: {source: PATH}`).

    Unset fields fall back to the merge's `calibration:` settings (template, allow_fewer) and
    to the method's `num_samples` / `seed`; an unset template falls back to the one the
    fine-tune recorded in training (`harness.prompts.recorded_template`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="a JSONL file or an lm-eval task name (train split)")
    template: str | None = Field(None, description="chat | fastchat | plain | a format string")
    num_samples: int | None = Field(None, ge=1, description="examples drawn (default: the method's)")
    seed: int | None = Field(None, description="sampling seed (default: the method's)")
    allow_fewer: bool | None = Field(None, description="use all rows when fewer than num_samples")

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return known_template(value)


def known_template(value: str | None) -> str | None:
    """A field validator's view of `check_template`: its error as a ValueError (for the YAML line)."""
    try:
        return None if value is None else check_template(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)
    calibration: CalibrationSource | None = None  # this fine-tune's data (JSONL path or task name)


DType = Literal["float32", "float16", "bfloat16", "float64"]


class CalibrationSettings(BaseModel):
    """How calibration examples become token batches (model-level methods: slta, regmean, fisher).

    How many examples and which seed are method parameters (`num_samples`, `seed`); these are
    the settings shared by every method. `template` (`harness.prompts`): chat, fastchat, plain
    or a format string; unset, each fine-tune's calibration uses the template it was trained
    with (its own `calibration.template`, else the one it recorded), and a fine-tune that
    records none is an error: calibrating in another template than training's changes results.
    """

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(512, ge=2, description="tokens per example (longer ones are cut)")
    template: str | None = Field(None, description="chat | fastchat | plain | a format string")
    batch_size: int = Field(8, ge=1, description="examples per forward chunk")
    allow_fewer: bool = Field(False, description="use all rows when fewer than num_samples")

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return known_template(value)


class MergeConfig(BaseModel):
    """What to merge, how, and into which dtype. `method` params are checked by the plan."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str = Field(alias="merge_method")
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None
    seed: int = 0
    device: str = "cpu"
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    # True for configs in mergekit's own format: defaults then follow mergekit where they differ.
    mergekit_compat: bool = False

    @model_validator(mode="before")
    @classmethod
    def _accept_mergekit(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unsupported = sorted({"slices", "modules", "tokenizer", "chat_template"} & set(data))
        if unsupported:
            raise ValueError(
                f"mergekit keys {unsupported} are not supported; list whole models under `models:`"
            )
        if "method" in data and "merge_method" not in data:
            data = {**data, "merge_method": data["method"]}
            del data["method"]
        elif "merge_method" in data:
            data = {**data, "mergekit_compat": data.get("mergekit_compat", True)}
        return data

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype


# ---------------------------------------------------------------------------------- YAML loading


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
    """Turn pydantic's error into one line: file:line: field.path: message."""
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p[:1].isupper()))
    where = locate(source, lines, loc)
    field = format_loc(loc) or "(top level)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ConfigError(f"{where}: {field}: {first['msg']}{more}")


def parse_config(model: type[BaseModel], data: Any, source: str, lines: dict | None = None):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(source, exc, lines or {}) from None


def load_merge_config(path: str | Path) -> MergeConfig:
    data, lines = load_yaml(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a merge config must be a YAML mapping")
    config = parse_config(MergeConfig, data, str(path), lines)
    return resolve_relative_paths(config, Path(path).parent)


def relative_to(ref: str | None, root: Path) -> str | None:
    """A path written in a config file is relative to that file; anything else (a HF id) is kept."""
    if ref is None or Path(ref).is_absolute() or not (root / ref).exists():
        return ref
    return str(root / ref)


def calibration_relative_to(source: CalibrationSource | None, root: Path) -> CalibrationSource | None:
    if source is None:
        return None
    return source.model_copy(update={"source": relative_to(source.source, root)})


def resolve_relative_paths(config: MergeConfig, root: Path) -> MergeConfig:
    """Model and data paths in a config file are relative to that file, like mergekit's."""
    models = [
        entry.model_copy(
            update={
                "model": relative_to(entry.model, root),
                "calibration": calibration_relative_to(entry.calibration, root),
            }
        )
        for entry in config.models
    ]
    return config.model_copy(
        update={
            "base_model": relative_to(config.base_model, root),
            "models": models,
            "tokenizer_source": relative_to(config.tokenizer_source, root),
        }
    )
