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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_harness.core.config_files import load_config_file, relative_to
from merge_harness.train.prompts import known_template

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
    fine-tune recorded in training (`merge_harness.train.prompts.recorded_template`).
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


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)
    calibration: CalibrationSource | None = None  # this fine-tune's data (JSONL path or task name)


DType = Literal["float32", "float16", "bfloat16", "float64"]


class SliceSource(BaseModel):
    """One model's layers `[start, end)` feeding an output slice (mergekit's input slice)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ordered(self) -> SliceSource:
        start, end = self.layer_range
        if not 0 <= start < end:
            raise ValueError(
                f"layer_range must be [start, end) with 0 <= start < end, got {list(self.layer_range)}"
            )
        return self


class OutputSlice(BaseModel):
    """Consecutive output layers, each merged from the same offset of every source's range.

    Parameters resolve source, then slice, then merge-wide (mergekit's precedence).
    `residual_weight` is accepted (mergekit's schema has it) but mergekit ignores it, so do we,
    and the plan says so.
    """

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    residual_weight: float | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                f"every source of a slice must span the same number of layers, got {sorted(lengths)}"
            )
        return self

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


class ZeroEmbedding(BaseModel):
    """`{kind: zero}`: the token's embedding rows are zeros."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """`{kind: model_token, model: M, token: T}` (or `token_id: I`): the rows of token T (id I)
    of model M's own vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of `token` and `token_id`")
        return self


class TokenEmbedding(BaseModel):
    """One entry of `tokenizer.tokens`: the token is added to the output vocabulary, and
    `source` gives its rows in every input that lacks it (every input, with `force`).
    `source`: a merged model (its rows of the token), `{kind: zero}` or `{kind: model_token}`;
    unset, the token takes mergekit's default rules (`merge_harness.merge.vocabulary`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary and the embeddings of its tokens."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("union", description="union | base | a model (its vocabulary)")
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1, description="round the vocabulary size up")


class CalibrationSettings(BaseModel):
    """How calibration examples become token batches (model-level methods: slta, regmean, fisher).

    How many examples and which seed are method parameters (`num_samples`, `seed`); these are
    the settings shared by every method. `template` (`merge_harness.train.prompts`): chat, fastchat, plain
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
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None  # union | base | a model directory or HF id
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None  # a Jinja template, a bundled name (chatml, ...) or "auto"
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
        if "modules" in data:
            raise ValueError("mergekit's `modules:` (per-module merges of multimodal models) is not "
                             "supported; use `models:` or `slices:`")
        if "method" in data and "merge_method" not in data:
            data = {**data, "merge_method": data["method"]}
            del data["method"]
        elif "merge_method" in data:
            data = {**data, "mergekit_compat": data.get("mergekit_compat", True)}
        return data

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give the inputs as `models:` or as `slices:` (one of them, not both)")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give `tokenizer_source:` or `tokenizer: {source: ...}`, not both")
        return self

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    @property
    def tokenizer_choice(self) -> str | None:
        """union | base | a model reference | None (the base's, else the first model's)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model the merge reads, base first, each once, in config order."""
        refs = [self.base_model] if self.base_model else []
        refs += [entry.model for entry in self.models]
        refs += [s.model for piece in self.slices or () for s in piece.sources]
        refs += [piece.base_model for piece in self.slices or () if piece.base_model]
        return list(dict.fromkeys(refs))


def load_merge_config(path: str | Path) -> MergeConfig:
    config, _ = load_config_file(path, MergeConfig, "a merge config")
    return resolve_relative_paths(config, Path(path).parent)


def calibration_relative_to(source: CalibrationSource | None, root: Path) -> CalibrationSource | None:
    if source is None:
        return None
    return source.model_copy(update={"source": relative_to(source.source, root)})


TOKENIZER_KEYWORDS = ("union", "base")


def resolve_relative_paths(config: MergeConfig, root: Path) -> MergeConfig:
    """Model and data paths in a config file are relative to that file, like mergekit's
    (`union` and `base` as a tokenizer source are keywords, never paths)."""

    def model_path(ref: str | None) -> str | None:
        return ref if ref in TOKENIZER_KEYWORDS else relative_to(ref, root)

    models = [
        entry.model_copy(
            update={
                "model": relative_to(entry.model, root),
                "calibration": calibration_relative_to(entry.calibration, root),
            }
        )
        for entry in config.models
    ]
    slices = [
        piece.model_copy(update={
            "base_model": relative_to(piece.base_model, root),
            "sources": [s.model_copy(update={"model": relative_to(s.model, root)}) for s in piece.sources],
        })
        for piece in config.slices or ()
    ]
    tokenizer = config.tokenizer
    if tokenizer is not None:
        tokens = tokenizer.tokens and {t: _embedding_relative(e, root) for t, e in tokenizer.tokens.items()}
        tokenizer = tokenizer.model_copy(update={"source": model_path(tokenizer.source), "tokens": tokens})
    return config.model_copy(
        update={
            "base_model": relative_to(config.base_model, root),
            "models": models,
            "slices": slices or None,
            "tokenizer_source": model_path(config.tokenizer_source),
            "tokenizer": tokenizer,
        }
    )


def _embedding_relative(entry: TokenEmbedding, root: Path) -> TokenEmbedding:
    source = entry.source
    if isinstance(source, str):
        source = relative_to(source, root)
    elif isinstance(source, ModelTokenEmbedding):
        source = source.model_copy(update={"model": relative_to(source.model, root)})
    return entry.model_copy(update={"source": source})
