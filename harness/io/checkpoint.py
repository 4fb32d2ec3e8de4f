"""Checkpoint IO: read Hugging Face model directories tensor by tensor, write them atomically.

Reading parses only safetensors headers up front (names, shapes, dtypes, and whether each file is
as long as its header promises), so a plan can be checked before any tensor is loaded. Tensors are
then read one at a time through memory maps. Writing streams each tensor straight to its place in a
pre-laid-out shard, so peak memory is one tensor, not one shard (see `ShardedWriter`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from merge_harness.core.atomic import LOCK_FILE, make_temp_dir, release
from merge_harness.core.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files copied next to merged weights so the output loads with `from_pretrained` as a whole model.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

DTYPE_NAMES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1  # absolute byte offset of the data in a safetensors file (-1: not one)

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data section "
                f"but only {data_size} bytes are present"
            )
        dtype = DTYPE_NAMES[entry["dtype"]]
        infos[name] = TensorInfo(name, tuple(entry["shape"]), dtype, path, data_start + begin)
    return infos


class Checkpoint:
    """A read-only model directory: its config and lazy, one-at-a-time tensor access."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self.tensors = tensors
        self._handles: dict[Path, BinaryIO] = {}
        self._open_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{path} is a file, not a model directory")
        if not path.is_dir():
            raise CheckpointError(f"{path}: model directory not found")
        return cls(path, read_config(path), index_tensors(path))

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Load one tensor, or the block `rows` of its first dimension, into its own memory.

        Safetensors data is read with plain file reads, not through a memory map: pages of a
        mapped file count towards the process's resident memory for as long as the map lives,
        so mapping every input would make peak memory the size of all models, not one tensor.
        """
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None
        if info.file.suffix == ".bin":
            tensor = _bin_state(info.file)[name]
            return tensor if rows is None else tensor[rows].clone()
        shape, offset, nbytes = info.shape, info.offset, info.nbytes
        if rows is not None:  # rows of a row-major tensor are one contiguous byte range
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start, stop, _ = rows.indices(shape[0])
            shape, offset = (stop - start, *shape[1:]), offset + start * row_bytes
            nbytes = (stop - start) * row_bytes
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        handle = self._handle(info.file)
        raw = torch.empty(nbytes, dtype=torch.uint8)  # torch's allocator aligns for SIMD kernels
        if read_at(handle, memoryview(raw.numpy()), offset) != nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return raw.view(info.dtype).reshape(shape)

    def _handle(self, file: Path) -> BinaryIO:
        with self._open_lock:  # the engine reads ahead on a second thread
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = self._handles[file] = file.open("rb", buffering=0)
                except OSError as exc:
                    raise CheckpointError(f"{file}: cannot open: {exc}") from exc
            return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def read_at(handle: BinaryIO, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset` of the file; returns the bytes read (fewer only at end of file).

    Positional reads (pread) leave the file position alone, so two threads may read one handle;
    the loop covers reads the kernel cuts short (Linux returns at most ~2 GiB per call).
    """
    done, size = 0, len(view)
    while done < size:
        if hasattr(os, "preadv"):
            count = os.preadv(handle.fileno(), [view[done:]], offset + done)
        else:  # Windows: no pread; one reader thread per handle keeps this safe enough
            handle.seek(offset + done)
            count = handle.readinto(view[done:])
        if not count:
            break
        done += count
    return done


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: missing config.json (not a Hugging Face model directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: invalid JSON: {exc}") from exc


def index_tensors(path: Path) -> dict[str, TensorInfo]:
    """Map every tensor name of a model directory to its file, for all supported layouts."""
    files = _weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        infos = read_safetensors_header(file) if file.suffix == ".safetensors" else _bin_infos(file)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} appears in two weight files")
            tensors[name] = info
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found")
    return tensors


def _weight_files(path: Path) -> list[Path]:
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_file = path / index_name
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_file}: invalid shard index: {exc}") from exc
            files = sorted({path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index_file}: shard files missing: {', '.join(missing)}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).exists():
            return [path / single]
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or shard index")


_BIN_CACHE: dict[Path, dict[str, torch.Tensor]] = {}


def _bin_state(file: Path) -> dict[str, torch.Tensor]:
    """Memory-map a PyTorch `.bin` file: tensors stay on disk until touched."""
    if file not in _BIN_CACHE:
        try:
            _BIN_CACHE[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot load PyTorch checkpoint: {exc}") from exc
    return _BIN_CACHE[file]


def _bin_infos(file: Path) -> dict[str, TensorInfo]:
    state = _bin_state(file)
    return {n: TensorInfo(n, tuple(t.shape), t.dtype, file) for n, t in state.items()}


# ----------------------------------------------------------------------------------------- writing


def plan_shards(infos: Iterable[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a lone big tensor excepted)."""
    shards: list[list[TensorInfo]] = [[]]
    used = 0
    for info in infos:
        if shards[-1] and used + info.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(info)
        used += info.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(shard: list[TensorInfo]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in shard:
        header[info.name] = {
            "dtype": SAFETENSORS_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to an 8-byte boundary
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes a model directory atomically: a hidden temp dir, renamed over `out_dir` on success.

    The layout (shard of each tensor, byte offsets) is fixed from the plan before any data exists,
    so each tensor's bytes are appended to its shard as soon as it is merged and then dropped.
    Tensors must arrive in plan order; anything else is a bug and raises.
    """

    def __init__(self, out_dir: Path, infos: list[TensorInfo], max_shard_bytes: int, force: bool):
        self.out_dir = Path(out_dir)
        self.force = force
        check_output_dir(self.out_dir, force)
        self.shards = plan_shards(infos, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        try:  # a hidden, locked dir; stale ones of killed merges in the same parent go first
            self.tmp_dir, self._lock_fd = make_temp_dir(self.out_dir)
        except OSError as exc:
            raise CheckpointError(f"{self.out_dir}: output directory is not writable: {exc}") from exc
        self._order: Iterator[tuple[int, TensorInfo]] = (
            (i, info) for i, shard in enumerate(self.shards) for info in shard
        )
        self._shard_index = -1
        self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, info = next(self._order)
        if info.name != name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(f"writer expected {info.name} {info.shape} {info.dtype}, got {name}")
        if shard_index != self._shard_index:
            self._open_shard(shard_index)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))

    def _open_shard(self, index: int) -> None:
        if self._handle:
            self._handle.close()
        self._shard_index = index
        self._handle = (self.tmp_dir / self.names[index]).open("wb")
        self._handle.write(_header_bytes(self.shards[index]))

    def commit(
        self,
        sidecar_source: Path | None,
        config: dict | None,
        extra_files: dict[str, str] | None = None,
        copy_tokenizer: bool = True,
    ) -> Path:
        """Finish the shards, add index/config/tokenizer files (and `extra_files`, name -> text,
        written last), and move into place."""
        if self._handle:
            self._handle.close()
        leftover = next(self._order, None)
        if leftover is not None:
            raise RuntimeError(f"writer committed before tensor {leftover[1].name} was written")
        if len(self.shards) > 1:
            self._write_index()
        if sidecar_source is not None:
            copy_sidecars(sidecar_source, self.tmp_dir, tokenizer=copy_tokenizer)
        if config is not None:
            (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (self.tmp_dir / name).write_text(text)
        (self.tmp_dir / LOCK_FILE).unlink()  # the fd keeps the lock until the rename is done
        replace_dir(self.tmp_dir, self.out_dir)
        release(self._lock_fd)
        self._lock_fd = None
        return self.out_dir

    def _write_index(self) -> None:
        weight_map = {info.name: name for name, shard in zip(self.names, self.shards) for info in shard}
        total = sum(info.nbytes for shard in self.shards for info in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.tmp_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle:
            self._handle.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        release(self._lock_fd)
        self._lock_fd = None


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty directory unless forced (finished results are never lost)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: output path exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CheckpointError(f"{out_dir}: output directory is not empty (use --force to replace)")


def check_not_an_input(out_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output that is, contains or lies inside an input model (`--force` or not).

    Real paths are compared, so a symlink to an input is caught too: replacing it would destroy
    the model being read.
    """
    out = Path(out_dir).resolve()
    for what, path in inputs.items():
        model = Path(path).resolve()
        if out == model:
            relation = "is"
        elif model.is_relative_to(out):
            relation = "contains"
        elif out.is_relative_to(model):
            relation = "lies inside"
        else:
            continue
        raise CheckpointError(
            f"{out_dir}: output directory {relation} the input model {what}; "
            "choose another output directory"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def copy_sidecars(source: Path, dest: Path, tokenizer: bool = True) -> None:
    for name in SIDECAR_FILES:
        if (source / name).exists() and (tokenizer or name not in TOKENIZER_FILES):
            shutil.copy2(source / name, dest / name)


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished temp dir to `out_dir`; an old `out_dir` is removed only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
