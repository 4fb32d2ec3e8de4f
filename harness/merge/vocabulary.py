"""The output vocabulary of a merge, and every input's embedding rows laid out in it (mergekit's
`tokenizer_source:` / `tokenizer: {source, tokens, pad_to_multiple_of}`).

The output tokenizer, for each source:
- `base`: the base model's (else the first model's), cut to its config's `vocab_size`;
- a model: that model's tokenizer;
- `union`: the base's, then every token of the other inputs it lacks: first their ordinary
  tokens, model by model (config order) in the order of their ids, then their added (special)
  tokens, the first model's settings of each winning;
then each `tokenizer.tokens` key it lacks, appended; `pad_to_multiple_of` rounds the number of
rows up. Token ids of an input beyond its config's `vocab_size` count as absent from it.

Embedding-like tensors (rows indexed by token id: embed_tokens, lm_head, ...) of every input are
laid out in that vocabulary before the merge method sees them: a `RowMap` per input, which the
engine applies as it reads the tensor (`read_vocabulary_tensor`). Output row t of an input is its
own row of token t if it has it (and t is not `force`d); else, the same for every such input:
  1. the `tokenizer.tokens` entry's source: a model's row of t, zeros (`{kind: zero}`), or a
     model's row of another token (`{kind: model_token}`);
  2. else, when one input has t: that input's row; when none has it: zeros; when the base has
     it: the base's row; else the mean of the rows of the inputs that have it.
Padding rows take the mean of that input's rows of the vocabulary. These are mergekit 0.1.5's
rules (`mergekit/tokenizer/build.py`, `embed.py`); the deviations are in docs/methods.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from merge_harness.core.atomic import LOCK_FILE, make_temp_dir, release
from merge_harness.core.errors import CheckpointError, ConfigError
from merge_harness.io.checkpoint import Checkpoint
from merge_harness.io.models import resolve_model
from merge_harness.merge.config import MergeConfig, ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding

# Merged vocabularies are written here once, by content: `tokenizer_dir` of a plan that made one.
TOKENIZER_CACHE = Path("~/.cache/merge-harness/tokenizers")

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Tensors indexed by token id along their first axis, as mergekit 0.1.5's architecture files
# mark them (`vocabulary_axis: 0`).
VOCABULARY_TENSORS = frozenset({
    "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", "embed_tokens.weight",
    "model.language_model.embed_tokens.weight", "model.tok_embeddings.weight", "output.weight",
    "transformer.wte.weight", "transformer.embd.wte.weight", "transformer.word_embeddings.weight",
    "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight",
    "gpt_neox.embed_in.weight", "embed_out.weight", "backbone.embeddings.weight", "shared.weight",
    "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embeddings.word_embeddings.weight",
    "bert.embeddings.word_embeddings.weight", "roberta.embeddings.word_embeddings.weight",
    "distilbert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
    "cls.predictions.bias", "lm_head.decoder.weight", "lm_head.linear.weight", "lm_head.linear.bias",
    "vocab_projector.weight", "vocab_projector.bias",
})


def is_vocabulary_tensor(name: str) -> bool:
    return name in VOCABULARY_TENSORS


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    """`vocab_size` of a config.json (of its `text_config` for multimodal models)."""
    for scope in (config, config.get("text_config") or {}):
        if isinstance(scope, Mapping) and isinstance(scope.get("vocab_size"), int):
            return scope["vocab_size"]
    return None


def with_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        return {**config, "text_config": {**text, "vocab_size": size}}
    return {**config, "vocab_size": size}


@dataclass(frozen=True, eq=False)
class OutputVocabulary:
    """The output tokenizer and where each token sits in every input."""

    tokenizer_dir: Path  # its files: a model's directory when unchanged, else the cache's
    tokens: tuple[str, ...]  # output id -> token
    size: int  # rows of every vocabulary tensor (len(tokens), or more with padding)
    rows: Mapping[str, tuple[int, ...]]  # model ref -> its id of each output token, -1 where absent
    vocabularies: Mapping[str, Mapping[str, int]]  # model ref -> its tokenizer's vocabulary
    settings: Mapping[str, TokenEmbedding]  # `tokenizer.tokens`
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class RowRef:
    """Row `row` of tensor `name` of a checkpoint."""

    checkpoint: Checkpoint
    name: str
    row: int


@dataclass(frozen=True, eq=False)
class RowFill:
    """Output row `row` made from other rows: their mean (one row: a copy; none: zeros)."""

    row: int
    sources: tuple[RowRef, ...]


@dataclass(frozen=True, eq=False)
class RowMap:
    """One input's vocabulary tensor in the output vocabulary: output row i is its own row
    `rows[i]`, or `fills`' row i where `rows[i]` is -1; rows from len(rows) to `size` pad."""

    rows: tuple[int, ...]
    fills: tuple[RowFill, ...]
    size: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Member:
    """One input of a vocabulary tensor, as the fill rules see it: model ref, checkpoint, name."""

    ref: str
    checkpoint: Checkpoint
    name: str


# ------------------------------------------------------------------------------ the vocabulary


@dataclass
class _Input:
    """One model's tokenizer as the build reads it (`tokenizer` None: it has none, the base's
    vocabulary stands in, as mergekit assumes)."""

    ref: str
    tokenizer: Any
    vocab: dict[str, int]
    size: int


def plan_vocabulary(config: MergeConfig, checkpoints: Mapping[str, Checkpoint]) -> OutputVocabulary | None:
    """The output vocabulary for `config`'s tokenizer source (None without one). `checkpoints`:
    every referenced model, base first. Writes the merged tokenizer to the cache if it is new."""
    choice = config.tokenizer_choice
    if choice is None:
        return None
    where = "tokenizer.source" if config.tokenizer is not None else "tokenizer_source"
    settings = dict((config.tokenizer.tokens if config.tokenizer else None) or {})
    refs = list(checkpoints)
    base_ref = config.base_model or refs[0]
    inputs, notes = _read_inputs(checkpoints, base_ref, where)
    _check_token_settings(settings, inputs)
    out, source_dir = _output_tokenizer(choice, inputs, checkpoints[base_ref].path, where)
    changed = _add(out, list(settings)) or source_dir is None
    vocab = out.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ConfigError(f"{where}: the output tokenizer's ids are not 0..{len(tokens) - 1} (it has gaps)")
    multiple = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
    size = -(-len(tokens) // multiple) * multiple if multiple else len(tokens)
    rows = {item.ref: tuple(_row(item, token) for token in tokens) for item in inputs.values()}
    directory = save_tokenizer(out, TOKENIZER_CACHE) if changed else source_dir
    return OutputVocabulary(directory, tuple(tokens), size, rows,
                            {r: i.vocab for r, i in inputs.items()}, settings, tuple(notes))


def _row(item: _Input, token: str) -> int:
    index = item.vocab.get(token, -1)
    return index if index < item.size else -1


def _read_inputs(checkpoints: Mapping[str, Checkpoint], base_ref: str, where: str):
    """Every model's tokenizer, the base's cut to its vocab_size; a model without one takes the
    base's vocabulary (with a note)."""
    notes = []
    base_tokenizer = tokenizer_of(checkpoints[base_ref].path)
    if base_tokenizer is None:
        raise ConfigError(f"{where}: the base {base_ref} has no tokenizer to build the output vocabulary on")
    base_size = config_vocab_size(checkpoints[base_ref].config) or len(base_tokenizer.get_vocab())
    base_tokenizer = strip_tokenizer(base_tokenizer, base_size, f"{where}: {base_ref}")
    inputs = {base_ref: _Input(base_ref, base_tokenizer, base_tokenizer.get_vocab(), base_size)}
    for ref, checkpoint in checkpoints.items():
        if ref == base_ref:
            continue
        tokenizer = tokenizer_of(checkpoint.path)
        if tokenizer is None:
            notes.append(f"{where}: {ref} has no tokenizer; its token ids are taken as the base's")
        vocab = tokenizer.get_vocab() if tokenizer is not None else inputs[base_ref].vocab
        size = config_vocab_size(checkpoint.config) or len(vocab)
        inputs[ref] = _Input(ref, tokenizer, vocab, size)
    return inputs, notes


def _output_tokenizer(choice: str, inputs: dict[str, _Input], base_dir: Path, where: str):
    """(tokenizer, the directory whose files it equals, or None when it is new)."""
    base = next(iter(inputs.values()))
    if choice not in ("union", "base"):
        directory = Path(resolve_model(choice))
        tokenizer = tokenizer_of(directory)
        if tokenizer is None:
            raise ConfigError(f"{where}: {choice} has no tokenizer")
        return tokenizer, directory
    fresh = tokenizer_of(base_dir)  # a copy to extend, the base's own stays as it was read
    original = fresh.backend_tokenizer.to_str()
    out = strip_tokenizer(fresh, base.size, where)
    if choice == "union":
        ordinary, added = _union_tokens(base, [i for i in inputs.values() if i is not base])
        for token in [*ordinary, *added]:
            out.add_tokens(token)
    unchanged = out.backend_tokenizer.to_str() == original
    return out, base_dir if unchanged else None


def _union_tokens(base: _Input, others: list[_Input]) -> tuple[list[str], list[Any]]:
    """Tokens the union appends to the base's: ordinary tokens new to it (models in order, each
    in id order), then every input's added tokens (the first settings of each)."""
    added: dict[str, Any] = {}
    for item in (base, *others):
        for index, info in (item.tokenizer.added_tokens_decoder.items() if item.tokenizer else ()):
            if index < item.size:
                added.setdefault(info.content, info)
    ordinary: dict[str, None] = {}
    for item in others:
        for token, index in sorted(item.vocab.items(), key=lambda pair: pair[1]):
            if index < item.size and token not in base.vocab and token not in added:
                ordinary.setdefault(token)
    return list(ordinary), list(added.values())


def _add(tokenizer, tokens: Sequence[str]) -> bool:
    """Append the tokens it lacks; whether it changed."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    for token in missing:
        tokenizer.add_tokens(token)
    return bool(missing)


def _check_token_settings(settings: Mapping[str, TokenEmbedding], inputs: Mapping[str, _Input]) -> None:
    for token, entry in settings.items():
        source = entry.source
        model = source.model if isinstance(source, ModelTokenEmbedding) else source
        if not isinstance(model, str):
            continue
        field = f"tokenizer.tokens[{token!r}].source"
        ref = find_model(model, list(inputs))
        if ref is None:
            raise ConfigError(f"{field}: {model} is not one of the merged models ({', '.join(inputs)})")
        wanted = source.token if isinstance(source, ModelTokenEmbedding) else None
        if wanted is not None and wanted not in inputs[ref].vocab:
            raise ConfigError(f"{field}: {model}'s tokenizer has no token {wanted!r}")


def find_model(model: str, refs: Sequence[str]) -> str | None:
    """The ref among `refs` that names `model` (the same string, or the same directory)."""
    if model in refs:
        return model
    path = Path(model).expanduser()
    if path.is_dir():
        return next((r for r in refs if Path(r).expanduser().is_dir()
                     and Path(r).expanduser().resolve() == path.resolve()), None)
    return None


def tokenizer_of(directory: Path):
    """A model directory's fast tokenizer, None when it has no vocabulary files."""
    if not any((Path(directory) / name).exists() for name in VOCABULARY_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as exc:
        raise CheckpointError(f"{directory}: cannot load tokenizer: {exc}".splitlines()[0]) from exc


def strip_tokenizer(tokenizer, size: int, where: str):
    """The tokenizer without the tokens whose ids are `size` or more (ids the model has no
    embedding rows for). Only BPE vocabularies can be cut."""
    extra = {token for token, index in tokenizer.get_vocab().items() if index >= size}
    if not extra:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ConfigError(f"{where}: its tokenizer has {len(extra)} token(s) beyond vocab_size {size}, "
                          f"and a {data['model']['type']} vocabulary cannot be cut (only BPE)")
    from tokenizers import Tokenizer

    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in extra}
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not extra.intersection(m.split(" ") if isinstance(m, str) else m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))  # transformers has no public setter
    return tokenizer


def save_tokenizer(tokenizer, cache: Path) -> Path:
    """Write the tokenizer into `cache`/<digest of its files> (once: a finished directory is
    reused, a half-written one is never seen) and return that directory."""
    cache = Path(cache).expanduser()
    try:
        tmp, lock = make_temp_dir(cache / "build")
    except OSError as exc:
        raise CheckpointError(f"{cache}: cannot write the merged tokenizer: {exc}") from exc
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / LOCK_FILE).unlink()
        digest = hashlib.sha256()
        for path in sorted(tmp.iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        target = cache / digest.hexdigest()[:24]
        if not target.exists():
            with contextlib.suppress(OSError):  # another merge wrote the same tokenizer first
                tmp.rename(target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release(lock)


# --------------------------------------------------------------------- rows of one tensor


@dataclass(frozen=True)
class TensorRows:
    """Every input's `RowMap` for one vocabulary tensor (None: its rows already are the output's),
    and the tokens no input has (their rows are zeros)."""

    maps: tuple[RowMap | None, ...]
    zeros: tuple[str, ...]


def vocabulary_rows(vocab: OutputVocabulary, members: Sequence[Member], base_ref: str | None) -> TensorRows:
    """How each of `members` (the tensor's inputs, the base among them when it is one) is laid out
    in the output vocabulary, with the fill rules of the module docstring."""
    infos = [m.checkpoint.tensors[m.name] for m in members]
    dtype = infos[0].dtype
    for info in infos[1:]:
        dtype = torch.promote_types(dtype, info.dtype)
    own = [vocab.rows[m.ref] for m in members]
    for member, rows, info in zip(members, own, infos):
        if max(rows, default=-1) >= info.shape[0]:
            raise CheckpointError(f"{info.file}: tensor {member.name!r} has {info.shape[0]} rows, but its "
                                  f"tokenizer has ids up to {max(rows)}")
    fills: dict[int, RowFill] = {}
    forced: set[int] = set()
    zeros = []
    for index, token in enumerate(vocab.tokens):
        entry = vocab.settings.get(token)
        if entry is not None and entry.force:
            forced.add(index)
        elif all(rows[index] >= 0 for rows in own):
            continue
        sources = _fill(vocab, members, own, index, base_ref)
        if not sources and entry is None:
            zeros.append(token)
        fills[index] = RowFill(index, sources)
    maps = []
    for rows, info in zip(own, infos):
        if not forced and vocab.size == len(rows) == info.shape[0] and rows == tuple(range(len(rows))):
            maps.append(None)
            continue
        laid = tuple(-1 if i in forced else row for i, row in enumerate(rows))
        maps.append(RowMap(laid, tuple(fills[i] for i, row in enumerate(laid) if row < 0), vocab.size, dtype))
    return TensorRows(tuple(maps), tuple(zeros))


def lay_out(vocab: OutputVocabulary, task: Any, members: Sequence[Member], base_ref: str | None,
            notes: list[str]) -> Any:
    """A plan's TensorTask with every input laid out in the output vocabulary (mergekit's
    PermutedVocabulary): shape (vocabulary rows, ...), each source with its `RowMap` as
    `vocabulary`. A note for tokens that no input has joins `notes`."""
    laid = vocabulary_rows(vocab, members, base_ref)
    if laid.zeros:
        shown = ", ".join(repr(t) for t in laid.zeros[:5]) + (", ..." if len(laid.zeros) > 5 else "")
        notes.append(f"tokenizer: {len(laid.zeros)} token(s) are in no input ({shown}); their embedding "
                     "rows are zeros")
    layout = {member.checkpoint: rows for member, rows in zip(members, laid.maps)}

    def laid_out(source):
        return None if source is None else replace(source, vocabulary=layout[source.checkpoint])

    info = replace(task.info, shape=(vocab.size, *task.info.shape[1:]))
    return replace(task, info=info, base=laid_out(task.base), sources=tuple(map(laid_out, task.sources)))


def _fill(vocab: OutputVocabulary, members: Sequence[Member], own: list[tuple[int, ...]], index: int,
          base_ref: str | None) -> tuple[RowRef, ...]:
    token = vocab.tokens[index]
    entry = vocab.settings.get(token)
    if entry is not None:
        return _configured(vocab, members, own, index, entry)
    holders = [(m.ref, RowRef(m.checkpoint, m.name, rows[index]))
               for m, rows in zip(members, own) if rows[index] >= 0]
    base = [ref for model, ref in holders if model == base_ref]
    return tuple(base) if len(holders) > 1 and base else tuple(ref for _, ref in holders)


def _configured(vocab: OutputVocabulary, members: Sequence[Member], own: list[tuple[int, ...]], index: int,
                entry: TokenEmbedding) -> tuple[RowRef, ...]:
    """The rows a `tokenizer.tokens` entry names for token `index`."""
    token = vocab.tokens[index]
    field = f"tokenizer.tokens[{token!r}].source"
    source = entry.source
    if isinstance(source, ZeroEmbedding):
        return ()
    if source is None:
        lacking = [m.ref for m, rows in zip(members, own) if rows[index] < 0]
        why = f"{lacking[0]} lacks it" if lacking and not entry.force else "it is forced"
        raise ConfigError(f"{field}: {why}, so its rows need a source (a model, {{kind: zero}} or "
                          "{kind: model_token, ...})")
    model = source.model if isinstance(source, ModelTokenEmbedding) else source
    ref = find_model(model, [m.ref for m in members])
    if ref is None:
        raise ConfigError(f"{field}: {model} is not an input of tensor {members[0].name!r} "
                          f"({', '.join(m.ref for m in members)})")
    position = [m.ref for m in members].index(ref)
    member = members[position]
    if isinstance(source, ModelTokenEmbedding):
        row = source.token_id if source.token_id is not None else vocab.vocabularies[ref][source.token]
        rows_there = member.checkpoint.tensors[member.name].shape[0]
        if row >= rows_there:
            raise ConfigError(f"{field}: token id {row} is out of range for {model} ({rows_there} rows)")
        return (RowRef(member.checkpoint, member.name, row),)
    if own[position][index] < 0:
        raise ConfigError(f"{field}: {model} has no token {token!r} (take another of its tokens with "
                          "{kind: model_token, model: ..., token: ...})")
    return (RowRef(member.checkpoint, member.name, own[position][index]),)


# ----------------------------------------------------------------------------- the read path


def read_vocabulary_tensor(checkpoint: Checkpoint, name: str, layout: RowMap,
                           rows: slice | None = None) -> torch.Tensor:
    """Tensor `name` of `checkpoint` in the output vocabulary: (layout.size, *rest), in
    `layout.dtype` (the inputs' common dtype). Read whole: `rows` must be None."""
    if rows is not None:
        raise ValueError(f"tensor {name!r} is laid out in a new vocabulary: it is read whole, not by rows")
    own = checkpoint.read(name)
    out = torch.zeros((layout.size, *own.shape[1:]), dtype=layout.dtype)
    index = torch.tensor(layout.rows, dtype=torch.long)
    kept = (index >= 0).nonzero().squeeze(1)
    out[kept] = own[index[kept]].to(layout.dtype)
    donors = _donor_rows(layout.fills, checkpoint, name, own)
    for fill in layout.fills:
        total = torch.zeros(own.shape[1:], dtype=layout.dtype)
        for ref in fill.sources:  # summed in order, then divided: mergekit's arithmetic
            total = total + donors[(id(ref.checkpoint), ref.name, ref.row)].to(layout.dtype)
        out[fill.row] = total / len(fill.sources) if fill.sources else total
    if layout.size > len(layout.rows):
        out[len(layout.rows):] = torch.mean(out[: len(layout.rows)], dim=0)
    return out


def _donor_rows(fills: Sequence[RowFill], checkpoint: Checkpoint, name: str,
                own: torch.Tensor) -> dict[tuple[int, str, int], torch.Tensor]:
    """Every row the fills read, each read once: from `own` when it is this tensor, from a whole
    read of a donor that gives many rows, else row by row."""
    wanted: dict[tuple[int, str], tuple[RowRef, set[int]]] = {}
    for fill in fills:
        for ref in fill.sources:
            wanted.setdefault((id(ref.checkpoint), ref.name), (ref, set()))[1].add(ref.row)
    found = {}
    for (key, tensor_name), (ref, rows) in wanted.items():
        if ref.checkpoint is checkpoint and tensor_name == name:
            whole = own
        elif len(rows) * 16 > ref.checkpoint.tensors[tensor_name].shape[0]:
            whole = ref.checkpoint.read(tensor_name)
        else:
            whole = None
        for row in rows:
            found[(key, tensor_name, row)] = (whole[row] if whole is not None
                                              else ref.checkpoint.read(tensor_name, slice(row, row + 1))[0])
    return found
