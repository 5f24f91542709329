"""GGUF reader: metadata and a tensor index over a read-only mmap; tensor bytes are never copied.

Layout (little-endian, versions 2 and 3):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets are relative to here)
Strings are u64 length + UTF-8 bytes. Every length and count is checked against the file size
before anything is allocated, so a corrupt file fails fast with a GGUFFormatError instead of
allocating gigabytes or reading garbage.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from cluster.errors import GGUFFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml type id -> (name, elements per block, bytes per block); mirrors ggml.h / ggml-common.h.
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

GGML_TYPE_NAMES: dict[int, str] = {type_id: spec[0] for type_id, spec in _GGML_TYPES.items()}
# Types numoe has kernels for: F32, F16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16.
SUPPORTED_TYPES: frozenset[int] = frozenset({0, 1, 2, 6, 8, 12, 13, 14, 30})


def type_block(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type; GGUFFormatError for unknown ids."""
    spec = _GGML_TYPES.get(ggml_type)
    if spec is None:
        raise GGUFFormatError(
            f"unknown ggml type id {ggml_type}: the file was written by a newer llama.cpp/gguf "
            f"than numoe knows, or it is corrupt; known types: "
            f"{', '.join(GGML_TYPE_NAMES.values())}"
        )
    return spec[1], spec[2]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order (reversed GGUF ne): a weight is [n_out, n_in]
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type{self.ggml_type}")


# GGUF metadata value types: id -> (struct format, numpy dtype) for the fixed-size ones.
_VALUE_UINT8, _VALUE_INT8, _VALUE_UINT16, _VALUE_INT16 = 0, 1, 2, 3
_VALUE_UINT32, _VALUE_INT32, _VALUE_FLOAT32, _VALUE_BOOL = 4, 5, 6, 7
_VALUE_STRING, _VALUE_ARRAY, _VALUE_UINT64, _VALUE_INT64, _VALUE_FLOAT64 = 8, 9, 10, 11, 12
_SCALAR_FORMATS: dict[int, tuple[str, np.dtype]] = {
    _VALUE_UINT8: ("<B", np.dtype("<u1")),
    _VALUE_INT8: ("<b", np.dtype("<i1")),
    _VALUE_UINT16: ("<H", np.dtype("<u2")),
    _VALUE_INT16: ("<h", np.dtype("<i2")),
    _VALUE_UINT32: ("<I", np.dtype("<u4")),
    _VALUE_INT32: ("<i", np.dtype("<i4")),
    _VALUE_FLOAT32: ("<f", np.dtype("<f4")),
    _VALUE_BOOL: ("<?", np.dtype("?")),
    _VALUE_UINT64: ("<Q", np.dtype("<u8")),
    _VALUE_INT64: ("<q", np.dtype("<i8")),
    _VALUE_FLOAT64: ("<d", np.dtype("<f8")),
}
_MAX_ARRAY_NESTING = 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _describe_foreign_file(head: bytes) -> str:
    """A guess at what a non-GGUF file is, from its first bytes, for the error message."""
    if not head:
        return "the file is empty"
    if head[:4] == b"PK\x03\x04":
        return "it looks like a zip archive (a PyTorch .bin/.pth checkpoint?)"
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "it looks like a Python pickle (a PyTorch checkpoint?)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32:
        return "it looks like a safetensors file"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"algg", b"GGML", b"GGJT"):
        return "it looks like a legacy GGML/GGJT file (convert it with llama.cpp's tools)"
    if head.lower().lstrip().startswith((b"<!doctype", b"<html")):
        return "it looks like an HTML page (a failed download?)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model (run `git lfs pull`)"
    return f"its first bytes are {head[:8]!r}"


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; errors name the file and the field."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.position = 0
        self.path = path

    def fail(self, problem: str) -> GGUFFormatError:
        return GGUFFormatError(
            f"{self.path}: {problem}; the file is truncated or corrupt: "
            f"re-download or re-convert it"
        )

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes < 0 or self.position + n_bytes > self.size:
            raise self.fail(
                f"{what} at byte {self.position} needs {n_bytes} bytes, runs past the end of "
                f"the file ({self.size} bytes)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buffer, self.position)
        self.position += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buffer, self.position)
        self.position += 8
        return value

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        self.need(length, what)
        raw = self.buffer[self.position : self.position + length]
        self.position += length
        return _decode_utf8(raw)

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count, refused when even minimal items could not fit in the rest of the file."""
        value = self.u64(what)
        remaining = self.size - self.position
        if value * min_item_bytes > remaining:
            raise self.fail(
                f"{what} is {value}, but only {remaining} bytes remain (absurd count)"
            )
        return value


def _decode_utf8(raw: bytes) -> str:
    # Token texts are UTF-8 in every converter; surrogateescape keeps a stray invalid byte
    # round-trippable instead of refusing the whole vocabulary.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="surrogateescape")


def _read_string_array(cursor: _Cursor, count: int, what: str) -> list[str]:
    buffer, position, size = cursor.buffer, cursor.position, cursor.size
    unpack_length = _U64.unpack_from
    strings: list[str] = [""] * count
    for index in range(count):
        if position + 8 > size:
            cursor.position = position
            cursor.need(8, f"{what}[{index}] length")
        (length,) = unpack_length(buffer, position)
        position += 8
        end = position + length
        if end > size:
            cursor.position = position
            cursor.need(length, f"{what}[{index}]")
        raw = buffer[position:end]
        try:
            strings[index] = raw.decode("utf-8")
        except UnicodeDecodeError:
            strings[index] = raw.decode("utf-8", errors="surrogateescape")
        position = end
    cursor.position = position
    return strings


def _read_value(cursor: _Cursor, value_type: int, what: str, depth: int = 0) -> Any:
    if value_type in _SCALAR_FORMATS:
        fmt, dtype = _SCALAR_FORMATS[value_type]
        cursor.need(dtype.itemsize, what)
        (value,) = struct.unpack_from(fmt, cursor.buffer, cursor.position)
        cursor.position += dtype.itemsize
        return value
    if value_type == _VALUE_STRING:
        return cursor.string(what)
    if value_type == _VALUE_ARRAY:
        if depth >= _MAX_ARRAY_NESTING:
            raise cursor.fail(f"{what} nests arrays deeper than {_MAX_ARRAY_NESTING} levels")
        item_type = cursor.u32(f"item type of {what}")
        if item_type in _SCALAR_FORMATS:
            dtype = _SCALAR_FORMATS[item_type][1]
            count = cursor.count(f"length of array {what}", dtype.itemsize)
            n_bytes = count * dtype.itemsize
            # A copy, so that the metadata outlives the mmap and close() is not blocked.
            array = np.frombuffer(cursor.buffer, dtype, count, cursor.position).copy()
            cursor.position += n_bytes
            return array
        if item_type == _VALUE_STRING:
            count = cursor.count(f"length of array {what}", 8)
            return _read_string_array(cursor, count, what)
        if item_type == _VALUE_ARRAY:
            count = cursor.count(f"length of array {what}", 12)
            return [
                _read_value(cursor, _VALUE_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)
            ]
        raise cursor.fail(f"{what} has unknown array item type {item_type}")
    raise cursor.fail(f"{what} has unknown value type {value_type}")


class GGUFFile:
    """An open GGUF file: `metadata`, `tensors` (in file order) and zero-copy tensor bytes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        if not self.path.exists():
            raise GGUFFormatError(
                f"{self.path}: no such file; check the path (or run without a model path to use "
                f"the embedded default model)"
            )
        if not self.path.is_file():
            raise GGUFFormatError(f"{self.path}: not a regular file; pass the path of a .gguf file")
        with open(self.path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            if file_size == 0:
                raise GGUFFormatError(f"{self.path}: the file is empty; re-download it")
            self._mmap = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(self._mmap)
        except BaseException:
            self.close()
            raise

    def _parse(self, buffer: mmap.mmap) -> None:
        cursor = _Cursor(buffer, self.path)
        head = bytes(buffer[:64])
        if head[:4] != GGUF_MAGIC:
            raise GGUFFormatError(
                f"{self.path}: not a GGUF file ({_describe_foreign_file(head)}); numoe loads "
                f"GGUF models: convert with llama.cpp's convert_hf_to_gguf.py or download a .gguf"
            )
        cursor.position = 4
        self.version = cursor.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = ("it looks big-endian, which numoe cannot read"
                    if self.version & 0xFFFF == 0 else "re-convert it with a current llama.cpp")
            raise GGUFFormatError(
                f"{self.path}: GGUF version {self.version} is not supported (numoe reads "
                f"versions {SUPPORTED_VERSIONS}); {hint}"
            )
        n_tensors = cursor.count("tensor count", 24)  # name len 8 + n_dims 4 + type 4 + offset 8
        n_kv = cursor.count("metadata key/value count", 13)  # key len 8 + type 4 + 1 byte

        self.metadata: dict[str, Any] = {}
        for index in range(n_kv):
            key = cursor.string(f"metadata key #{index}")
            value_type = cursor.u32(f"type of metadata key {key!r}")
            if key in self.metadata:
                raise cursor.fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = _read_value(cursor, value_type, f"metadata {key!r}")

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment is {alignment!r}, not a power of two")
        self.alignment = alignment

        raw_infos: list[tuple[str, int, tuple[int, ...], int]] = []
        for index in range(n_tensors):
            name = cursor.string(f"name of tensor #{index}")
            n_dims = cursor.u32(f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            cursor.need(8 * n_dims, f"shape of tensor {name!r}")
            ne = struct.unpack_from(f"<{n_dims}q", buffer, cursor.position)
            cursor.position += 8 * n_dims
            ggml_type = cursor.u32(f"type of tensor {name!r}")
            relative_offset = cursor.u64(f"data offset of tensor {name!r}")
            raw_infos.append((name, ggml_type, tuple(ne), relative_offset))

        data_start = -(-cursor.position // alignment) * alignment
        self.data_offset = data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, ne, relative_offset in raw_infos:
            self.tensors[name] = self._tensor_info(
                cursor, name, ggml_type, ne, data_start + relative_offset
            )
        self._check_tensor_extents(cursor)

    def _tensor_info(
        self, cursor: _Cursor, name: str, ggml_type: int, ne: tuple[int, ...], offset: int
    ) -> TensorInfo:
        if name in self.tensors:
            raise cursor.fail(f"tensor name {name!r} appears twice")
        if any(dim < 0 for dim in ne):
            raise cursor.fail(f"tensor {name!r} has a negative dimension in shape {ne}")
        try:
            block_elements, block_bytes = type_block(ggml_type)
        except GGUFFormatError as error:
            raise GGUFFormatError(f"{self.path}: tensor {name!r}: {error}") from None
        type_name = GGML_TYPE_NAMES[ggml_type]
        if ne and ne[0] % block_elements:
            raise cursor.fail(
                f"tensor {name!r} ({type_name}) has row length {ne[0]}, not a multiple of the "
                f"{block_elements}-element block: its byte size is inconsistent with its shape"
            )
        n_elements = 1
        for dim in ne:
            n_elements *= dim
        n_bytes = n_elements // block_elements * block_bytes
        if (offset - self.data_offset) % self.alignment:
            raise cursor.fail(
                f"tensor {name!r} data offset {offset - self.data_offset} is not a multiple "
                f"of the alignment {self.alignment}"
            )
        return TensorInfo(name, ggml_type, tuple(reversed(ne)), offset, n_bytes)

    def _check_tensor_extents(self, cursor: _Cursor) -> None:
        by_offset = sorted(self.tensors.values(), key=lambda info: info.offset)
        for before, after in zip(by_offset, by_offset[1:], strict=False):
            if before.offset + before.n_bytes > after.offset:
                raise cursor.fail(
                    f"tensor {before.name!r} ({before.type_name}, shape {list(before.shape)}) "
                    f"needs {before.n_bytes} bytes, which overlap tensor {after.name!r}: "
                    f"its byte size is inconsistent with its shape and type"
                )
        if by_offset:
            last = max(by_offset, key=lambda info: info.offset + info.n_bytes)
            expected = last.offset + last.n_bytes
            if expected > cursor.size:
                raise GGUFFormatError(
                    f"{self.path}: file is truncated: expected {expected} bytes, has "
                    f"{cursor.size} (tensor {last.name!r} ends past the end); re-download it"
                )

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name`: a uint8 view into the mmap, no copy."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if self._mmap is None:
            raise ValueError(f"{self.path}: the file is closed")
        return np.frombuffer(self._mmap, np.uint8, info.n_bytes, info.offset)

    def populate(self) -> bool:
        """Map every tensor page into this process now, as llama.cpp's loader does
        (MAP_POPULATE), instead of one page fault storm per expert on the first tokens that
        route to it (measured: one 8-expert MoE call 11 ms with cold mappings, 0.9 ms after).
        Reads the file from disk if it is not cached. Skipped (False) when the tensor data is
        larger than the memory available now: populating would only evict itself."""
        if self._mmap is None:
            raise ValueError(f"{self.path}: the file is closed")
        if not self.tensors:
            return True
        first = min(info.offset for info in self.tensors.values())
        end = max(info.offset + info.n_bytes for info in self.tensors.values())
        if end - first > _available_memory_bytes():
            return False
        page = mmap.PAGESIZE
        start = first // page * page
        try:  # Linux >= 5.14: the kernel fills the page tables in one call
            self._mmap.madvise(_MADV_POPULATE_READ, start, end - start)
        except (OSError, ValueError):
            # Older kernels: touch one byte per page (fault-around maps its neighbours too).
            int(np.frombuffer(self._mmap, np.uint8, end - start, start)[::page].sum())
        return True

    def close(self) -> None:
        if self._mmap is None:
            return
        try:
            self._mmap.close()
        except BufferError:
            # Views from tensor_data() are still alive; the mapping is released with them.
            pass
        self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")


_MADV_POPULATE_READ = 22  # linux/mman.h; not in Python 3.11's mmap module


def _available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes); unlimited where there is no such file."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and index a GGUF file; raises GGUFFormatError naming the problem and the fix."""
    return GGUFFile(path)
