"""The data-plane message contract: every message the coordinator and workers exchange over ZeroMQ.

Wire format (one ZeroMQ multipart message):

    frame 0      one byte: the MessageType value
    frame 1      msgpack map (the header):
                   {"version": PROTOCOL_VERSION,
                    "fields": {scalar field name: int | str, ...},
                    "arrays": {array field name: {"dtype": str, "shape": [int, ...],
                                                  "frame": int}, ...}}
    frame 2 + i  raw little-endian C-order bytes of the array whose "frame" is i

Arrays travel as raw frames (zero-copy on send for C-contiguous arrays); scalars travel in the
header. Nothing is pickled: msgpack is unpacked with raw=False, strict_map_key=True and an
ext_hook that refuses every extension type. decode() validates everything it reads and raises
ProtocolError, so a corrupt or hostile peer cannot crash a worker with anything else.

bfloat16: numpy has no bf16 dtype, so a bf16 array is a BFloat16Array wrapping its raw uint16
bits (the top 16 bits of the float32). It is sent with dtype name "bfloat16" and decodes back to a
BFloat16Array, so bf16 never silently turns into uint16 or float32.

Decoded arrays are read-only views of the received frames (no copy); copy them to write.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import msgpack
import numpy as np

from cluster.errors import NumoeError

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB: far above any activation or logits message
BFLOAT16 = "bfloat16"
_MAX_DIMS = 32

# Plain numeric dtypes only: object, string, void and structured dtypes are never accepted.
_PLAIN_DTYPES = frozenset(
    ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
     "float16", "float32", "float64"]
)
_INDEX_DTYPES = ("int32", "int64")
_ACTIVATION_DTYPES = ("float32", "float16", BFLOAT16)


class ProtocolError(NumoeError):
    """A data-plane message is malformed, or a message object violates the contract."""


class MessageType(IntEnum):
    """Frame 0 of every message. Values are the wire encoding: never renumber, only append."""

    LOAD = 1  # coordinator -> worker: load your slice of the model described by the plan
    READY = 2  # worker -> coordinator: weights are resident, ready for FORWARD
    FORWARD = 3  # coordinator -> workers: token ids, positions, sequence ids of one step
    PARTIAL_SUM = 4  # worker -> worker: one chunk of a partial sum to all-reduce
    LOGITS = 5  # worker -> coordinator: logits of one step
    ERROR = 6  # worker -> coordinator: a step or a load failed
    SHUTDOWN = 7  # coordinator -> worker: exit the serve loop
    HIDDEN = 8  # worker of pipeline stage s -> worker of stage s + 1: hidden states of one step


class ReduceSite(IntEnum):
    """Which block's output a PARTIAL_SUM belongs to (two all-reduces per layer)."""

    ATTENTION = 0
    FFN = 1  # dense FFN or MoE block


@dataclass(frozen=True, eq=False)
class BFloat16Array:
    """A bfloat16 array stored as its raw uint16 bits (numpy has no bfloat16 dtype)."""

    bits: np.ndarray  # uint16, any shape

    def __post_init__(self) -> None:
        if not isinstance(self.bits, np.ndarray) or self.bits.dtype != np.uint16:
            raise ProtocolError("BFloat16Array.bits must be a numpy uint16 array of raw bf16 bits")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    @classmethod
    def from_float32(cls, values: np.ndarray) -> BFloat16Array:
        """Round float32 to bfloat16 (round to nearest, ties to even; NaN stays NaN)."""
        as_float = np.ascontiguousarray(values, dtype=np.float32)
        as_bits = as_float.view(np.uint32)
        rounding_bias = ((as_bits >> 16) & 1) + np.uint32(0x7FFF)
        rounded = ((as_bits + rounding_bias) >> 16).astype(np.uint16)
        # Rounding could carry a NaN's payload into infinity; keep NaNs quiet NaNs instead.
        is_nan = np.isnan(as_float)
        rounded[is_nan] = ((as_bits[is_nan] >> 16) | 0x0040).astype(np.uint16)
        return cls(rounded)

    def to_float32(self) -> np.ndarray:
        """Exact widening: bf16 bits become the top half of a float32."""
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


ArrayField = np.ndarray | BFloat16Array


def _array_field(dtypes: Sequence[str], ndim: int | None = None) -> Any:
    """A dataclass field holding an array, with the dtypes (and rank) the contract allows."""
    return field(metadata={"dtypes": tuple(dtypes), "ndim": ndim})


@dataclass(frozen=True, eq=False)
class Load:
    TYPE: ClassVar[MessageType] = MessageType.LOAD
    worker_rank: int
    model_path: str
    plan_json: str  # the frozen placement plan, as JSON


@dataclass(frozen=True, eq=False)
class Ready:
    TYPE: ClassVar[MessageType] = MessageType.READY
    worker_rank: int
    weight_bytes: int  # bytes of weights this worker holds in node-local memory


@dataclass(frozen=True, eq=False)
class Forward:
    """One step: token t of sequence sequence_ids[t] sits at position positions[t]."""

    TYPE: ClassVar[MessageType] = MessageType.FORWARD
    step_id: int
    token_ids: np.ndarray = _array_field(_INDEX_DTYPES, ndim=1)  # [T]
    positions: np.ndarray = _array_field(_INDEX_DTYPES, ndim=1)  # [T]
    sequence_ids: np.ndarray = _array_field(_INDEX_DTYPES, ndim=1)  # [T]
    # Added after version 1's first fields (defaults keep older call sites valid):
    all_logits: int = 0  # 1: the last stage returns logits of every token; 0: of the last one
    # 1: continuous batching's batch-invariant products (every token row computed as it would
    # be alone, worker/batch.py); the logits are those of each sequence's last token.
    rows_alone: int = 0

    def _check(self) -> None:
        lengths = {self.token_ids.shape[0], self.positions.shape[0], self.sequence_ids.shape[0]}
        if len(lengths) != 1:
            raise ProtocolError(
                f"FORWARD arrays differ in length: token_ids {self.token_ids.shape}, positions "
                f"{self.positions.shape}, sequence_ids {self.sequence_ids.shape}; send one "
                f"position and one sequence id per token"
            )
        _check_flag("FORWARD", "all_logits", self.all_logits)
        _check_flag("FORWARD", "rows_alone", self.rows_alone)


@dataclass(frozen=True, eq=False)
class PartialSum:
    """Chunk chunk_index of chunk_count of sender_rank's partial sum for one reduce site."""

    TYPE: ClassVar[MessageType] = MessageType.PARTIAL_SUM
    step_id: int
    layer_index: int
    site: int  # a ReduceSite value
    sender_rank: int
    chunk_index: int
    chunk_count: int
    values: ArrayField = _array_field(_ACTIVATION_DTYPES)  # [T, chunk of hidden] or [chunk]

    def _check(self) -> None:
        if self.site not in ReduceSite.__members__.values():
            raise ProtocolError(
                f"PARTIAL_SUM site {self.site} is not a ReduceSite; use one of "
                f"{[int(s) for s in ReduceSite]}"
            )
        if not 0 <= self.chunk_index < self.chunk_count:
            raise ProtocolError(
                f"PARTIAL_SUM chunk_index {self.chunk_index} is outside [0, chunk_count="
                f"{self.chunk_count})"
            )


@dataclass(frozen=True, eq=False)
class Logits:
    TYPE: ClassVar[MessageType] = MessageType.LOGITS
    step_id: int
    sender_rank: int
    logits: ArrayField = _array_field(_ACTIVATION_DTYPES, ndim=2)  # [T, vocab slice]
    # Added after version 1's first fields: where the slice starts in the full vocabulary (the
    # last stage's workers each send the logits of their own vocab range).
    vocab_start: int = 0

    def _check(self) -> None:
        if self.vocab_start < 0:
            raise ProtocolError(f"LOGITS vocab_start {self.vocab_start} must be >= 0")


@dataclass(frozen=True, eq=False)
class Error:
    TYPE: ClassVar[MessageType] = MessageType.ERROR
    worker_rank: int
    step_id: int  # -1 when the failure is not tied to a step (e.g. during LOAD)
    message: str


@dataclass(frozen=True, eq=False)
class Shutdown:
    TYPE: ClassVar[MessageType] = MessageType.SHUTDOWN
    reason: str


@dataclass(frozen=True, eq=False)
class Hidden:
    """One step's hidden states, sent from a pipeline stage to the next one (the previous
    stage's output after its last layer); token t sits at positions[t] of sequence_ids[t]."""

    TYPE: ClassVar[MessageType] = MessageType.HIDDEN
    step_id: int
    sender_rank: int
    all_logits: int  # as in the step's FORWARD, passed along to the last stage
    positions: np.ndarray = _array_field(_INDEX_DTYPES, ndim=1)  # [T]
    sequence_ids: np.ndarray = _array_field(_INDEX_DTYPES, ndim=1)  # [T]
    hidden: ArrayField = _array_field(_ACTIVATION_DTYPES, ndim=2)  # [T, H]
    rows_alone: int = 0  # as in the step's FORWARD

    def _check(self) -> None:
        lengths = {self.positions.shape[0], self.sequence_ids.shape[0], self.hidden.shape[0]}
        if len(lengths) != 1:
            raise ProtocolError(
                f"HIDDEN arrays differ in length: positions {self.positions.shape}, "
                f"sequence_ids {self.sequence_ids.shape}, hidden {self.hidden.shape}; send one "
                f"position, one sequence id and one hidden row per token"
            )
        _check_flag("HIDDEN", "all_logits", self.all_logits)
        _check_flag("HIDDEN", "rows_alone", self.rows_alone)


def _check_flag(name: str, field_name: str, value: int) -> None:
    if value not in (0, 1):
        raise ProtocolError(f"{name} field {field_name!r} is {value}; it is a flag, 0 or 1")


Message = Load | Ready | Forward | PartialSum | Logits | Error | Shutdown | Hidden
MESSAGE_CLASSES: dict[MessageType, type] = {
    cls.TYPE: cls for cls in (Load, Ready, Forward, PartialSum, Logits, Error, Shutdown, Hidden)
}


@dataclass(frozen=True)
class _Schema:
    scalars: dict[str, type]  # field name -> int or str
    arrays: dict[str, tuple[tuple[str, ...], int | None]]  # field name -> (dtypes, ndim)


def _build_schema(cls: type) -> _Schema:
    hints = typing.get_type_hints(cls)
    scalars: dict[str, type] = {}
    arrays: dict[str, tuple[tuple[str, ...], int | None]] = {}
    for f in dataclasses.fields(cls):
        if "dtypes" in f.metadata:
            arrays[f.name] = (f.metadata["dtypes"], f.metadata["ndim"])
        else:
            assert hints[f.name] in (int, str), f"{cls.__name__}.{f.name}: unsupported type"
            scalars[f.name] = hints[f.name]
    return _Schema(scalars, arrays)


_SCHEMAS: dict[type, _Schema] = {cls: _build_schema(cls) for cls in MESSAGE_CLASSES.values()}


def _dtype_name(array: ArrayField) -> str:
    return BFLOAT16 if isinstance(array, BFloat16Array) else array.dtype.name


def _validate(msg: Any) -> None:
    """Check a message object against its schema (used on encode and after decode)."""
    cls = type(msg)
    name = cls.TYPE.name
    schema = _SCHEMAS[cls]
    for field_name, expected in schema.scalars.items():
        value = getattr(msg, field_name)
        if type(value) is not expected:  # `type is` so True is not taken for an int
            raise ProtocolError(
                f"{name} field {field_name!r} must be {expected.__name__}, got "
                f"{type(value).__name__}"
            )
        if expected is int and not -(2**63) <= value < 2**63:
            raise ProtocolError(f"{name} field {field_name!r} = {value} does not fit in int64")
    for field_name, (dtypes, ndim) in schema.arrays.items():
        array = getattr(msg, field_name)
        if not isinstance(array, (np.ndarray, BFloat16Array)):
            raise ProtocolError(
                f"{name} field {field_name!r} must be a numpy array, got {type(array).__name__}"
            )
        dtype = _dtype_name(array)
        if dtype not in dtypes:
            raise ProtocolError(
                f"{name} field {field_name!r} has dtype {dtype}; allowed: {', '.join(dtypes)}"
            )
        if ndim is not None and len(array.shape) != ndim:
            raise ProtocolError(
                f"{name} field {field_name!r} must have {ndim} dimension(s), got shape "
                f"{array.shape}"
            )
    check = getattr(msg, "_check", None)
    if check is not None:
        check()


def _raw_frame(array: np.ndarray) -> memoryview:
    """A zero-copy byte view of the array (copied only when not C-contiguous little-endian)."""
    little_endian = array.dtype.newbyteorder("<")
    contiguous = np.ascontiguousarray(array, dtype=little_endian)
    # reshape(-1).view(uint8) rather than memoryview.cast, which refuses zero-sized shapes.
    return memoryview(contiguous.reshape(-1).view(np.uint8))


def encode(msg: Message) -> list[bytes | memoryview]:
    """Message -> multipart frames for zmq send_multipart(frames, copy=False)."""
    if type(msg) not in _SCHEMAS:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: not a protocol message class")
    _validate(msg)
    schema = _SCHEMAS[type(msg)]
    scalars = {name: getattr(msg, name) for name in schema.scalars}
    array_headers: dict[str, dict[str, Any]] = {}
    array_frames: list[memoryview] = []
    for frame_index, field_name in enumerate(schema.arrays):
        array = getattr(msg, field_name)
        raw = array.bits if isinstance(array, BFloat16Array) else array
        array_headers[field_name] = {
            "dtype": _dtype_name(array), "shape": list(raw.shape), "frame": frame_index,
        }
        array_frames.append(_raw_frame(raw))
    header = msgpack.packb(
        {"version": PROTOCOL_VERSION, "fields": scalars, "arrays": array_headers}, use_bin_type=True
    )
    return [bytes([msg.TYPE]), header, *array_frames]


def _refuse_ext(code: int, data: bytes) -> None:
    raise ProtocolError(f"header contains msgpack extension type {code}; extensions are refused")


def _as_bytes_view(frame: Any, position: int) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError as exc:
        raise ProtocolError(
            f"frame {position} is a {type(frame).__name__}, not a bytes-like object"
        ) from exc
    if not view.c_contiguous:
        raise ProtocolError(f"frame {position} is not a contiguous buffer")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _require_map(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"header {what} must be a map, got {type(value).__name__}")
    return value


def _decode_array(
    name: str, field_name: str, descriptor: Any, frames: list[memoryview], used: set[int]
) -> ArrayField:
    where = f"{name} array {field_name!r}"
    descriptor = _require_map(descriptor, f"entry for {where}")
    if set(descriptor) != {"dtype", "shape", "frame"}:
        raise ProtocolError(
            f"{where}: header entry must have exactly keys dtype, shape, frame; got "
            f"{sorted(map(str, descriptor))}"
        )
    dtype, shape, frame_index = descriptor["dtype"], descriptor["shape"], descriptor["frame"]
    if not isinstance(dtype, str) or (dtype not in _PLAIN_DTYPES and dtype != BFLOAT16):
        raise ProtocolError(
            f"{where}: dtype {dtype!r} is not allowed; allowed: "
            f"{', '.join(sorted(_PLAIN_DTYPES))}, {BFLOAT16}"
        )
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise ProtocolError(f"{where}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"{where}: shape {shape} has a negative dimension")
    if len(shape) > _MAX_DIMS:
        raise ProtocolError(f"{where}: shape has {len(shape)} dimensions; at most {_MAX_DIMS}")
    if type(frame_index) is not int or not 0 <= frame_index < len(frames):
        raise ProtocolError(
            f"{where}: frame index {frame_index!r} is outside the {len(frames)} array frame(s)"
        )
    if frame_index in used:
        raise ProtocolError(f"{where}: frame {frame_index} is claimed by two arrays")
    used.add(frame_index)
    storage = np.dtype("<u2" if dtype == BFLOAT16 else dtype).newbyteorder("<")
    frame = frames[frame_index]
    expected_bytes = storage.itemsize * math.prod(shape)
    if frame.nbytes != expected_bytes:
        raise ProtocolError(
            f"{where}: frame has {frame.nbytes} bytes but dtype {dtype} with shape {shape} "
            f"needs {expected_bytes}"
        )
    try:
        array = np.frombuffer(frame, dtype=storage).reshape(shape)
    except ValueError as exc:  # e.g. a zero-sized shape with a dimension numpy cannot index
        raise ProtocolError(f"{where}: shape {shape} is not a valid numpy shape: {exc}") from exc
    return BFloat16Array(array) if dtype == BFLOAT16 else array


def decode(
    frames: Sequence[Any], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Message:
    """Multipart frames (bytes, memoryviews or zmq.Frame) -> message object, strictly validated.

    Raises ProtocolError, and nothing else, for any malformed input.
    """
    if not isinstance(frames, Sequence) or len(frames) < 2:
        count = len(frames) if isinstance(frames, Sequence) else "no"
        raise ProtocolError(
            f"message has {count} frame(s); expected at least 2 (type byte, header)"
        )
    views = [_as_bytes_view(frame, position) for position, frame in enumerate(frames)]
    total_bytes = sum(view.nbytes for view in views)
    if total_bytes > max_message_bytes:
        raise ProtocolError(
            f"message is {total_bytes} bytes, above the limit of {max_message_bytes}; raise "
            f"max_message_bytes if such messages are expected"
        )
    if views[0].nbytes != 1:
        raise ProtocolError(f"type frame has {views[0].nbytes} bytes; expected exactly 1")
    type_byte = views[0][0]
    if type_byte not in MessageType.__members__.values():
        raise ProtocolError(
            f"unknown message type byte {type_byte}; known: "
            f"{', '.join(f'{t.name}={t.value}' for t in MessageType)}"
        )
    message_type = MessageType(type_byte)
    name = message_type.name
    try:
        header = msgpack.unpackb(
            views[1], raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise ProtocolError(f"{name} header is not valid msgpack: {exc}") from exc
    header = _require_map(header, "")
    if set(header) != {"version", "fields", "arrays"}:
        raise ProtocolError(
            f"{name} header must have exactly keys version, fields, arrays; got "
            f"{sorted(map(str, header))}"
        )
    if header["version"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{name} header has protocol version {header['version']!r}, this build speaks "
            f"{PROTOCOL_VERSION}; run the same numoe version on every host"
        )
    cls = MESSAGE_CLASSES[message_type]
    schema = _SCHEMAS[cls]
    scalars = _require_map(header["fields"], "fields")
    array_descriptors = _require_map(header["arrays"], "arrays")
    if set(scalars) != set(schema.scalars):
        raise ProtocolError(
            f"{name} header fields are {sorted(map(str, scalars))}; expected "
            f"{sorted(schema.scalars)}"
        )
    if set(array_descriptors) != set(schema.arrays):
        raise ProtocolError(
            f"{name} header arrays are {sorted(map(str, array_descriptors))}; expected "
            f"{sorted(schema.arrays)}"
        )
    array_frames = views[2:]
    if len(array_frames) != len(schema.arrays):
        raise ProtocolError(
            f"{name} frame count mismatch: {len(array_frames)} array frame(s), expected "
            f"{len(schema.arrays)}"
        )
    used: set[int] = set()
    arrays = {
        field_name: _decode_array(name, field_name, descriptor, array_frames, used)
        for field_name, descriptor in array_descriptors.items()
    }
    msg = cls(**scalars, **arrays)
    _validate(msg)
    return msg
