"""The data-plane message contract: round trips, strict validation, and real ZeroMQ transport."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from cluster.protocol import (
    BFloat16Array,
    Error,
    Forward,
    Hidden,
    Load,
    Logits,
    MessageType,
    PartialSum,
    ProtocolError,
    Ready,
    ReduceSite,
    Shutdown,
    decode,
    encode,
)

RNG_SEED = 1234


def _array_of(value: object) -> np.ndarray:
    return value.bits if isinstance(value, BFloat16Array) else value


def assert_same_message(sent: object, received: object) -> None:
    assert type(received) is type(sent)
    for f in dataclasses.fields(sent):
        a, b = getattr(sent, f.name), getattr(received, f.name)
        if isinstance(a, (np.ndarray, BFloat16Array)):
            assert type(b) is type(a), f.name
            a, b = _array_of(a), _array_of(b)
            assert b.dtype == a.dtype.newbyteorder("="), f.name
            assert b.shape == a.shape, f.name
            np.testing.assert_array_equal(b, a, err_msg=f.name)
        else:
            assert type(b) is type(a) and b == a, f.name


def roundtrip(msg: object) -> object:
    # Through bytes, as a peer would see them after the network.
    frames = [bytes(frame) for frame in encode(msg)]
    return decode(frames)


def sample_messages() -> list[object]:
    rng = np.random.default_rng(RNG_SEED)
    hidden = rng.standard_normal((3, 64)).astype(np.float32)
    return [
        Load(worker_rank=1, model_path="/models/ä.gguf", plan_json='{"workers": 2}'),
        Ready(worker_rank=0, weight_bytes=123_456_789_012),
        Forward(
            step_id=7,
            token_ids=np.array([1, 2, 3], dtype=np.int32),
            positions=np.array([0, 1, 2], dtype=np.int32),
            sequence_ids=np.array([0, 0, 1], dtype=np.int64),
        ),
        PartialSum(step_id=7, layer_index=3, site=int(ReduceSite.FFN), sender_rank=1,
                   chunk_index=0, chunk_count=2, values=hidden),
        PartialSum(step_id=7, layer_index=3, site=int(ReduceSite.ATTENTION), sender_rank=0,
                   chunk_index=1, chunk_count=2, values=BFloat16Array.from_float32(hidden)),
        Logits(step_id=-1, sender_rank=0, logits=hidden.astype(np.float16)),
        Error(worker_rank=1, step_id=-1, message="out of memory on node 1"),
        Shutdown(reason=""),
        # Fields and types added for the cluster runner (pipeline stages, vocab slices).
        Forward(step_id=8, token_ids=np.array([4], dtype=np.int64),
                positions=np.array([3], dtype=np.int64), sequence_ids=np.zeros(1, np.int64),
                all_logits=1),
        Logits(step_id=8, sender_rank=3, logits=hidden[:1], vocab_start=75968),
        Hidden(step_id=8, sender_rank=2, all_logits=0, positions=np.arange(5, 8, dtype=np.int64),
               sequence_ids=np.zeros(3, np.int64), hidden=hidden),
    ]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg: object) -> None:
    frames = encode(msg)
    assert frames[0] == bytes([msg.TYPE])
    assert_same_message(msg, roundtrip(msg))


def test_sample_messages_cover_every_message_type() -> None:
    assert {m.TYPE for m in sample_messages()} == set(MessageType)


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_arrays_round_trip(shape: tuple[int, ...]) -> None:
    empty = np.zeros(shape, dtype=np.float32)
    msg = PartialSum(step_id=0, layer_index=0, site=0, sender_rank=0, chunk_index=0,
                     chunk_count=1, values=empty)
    assert_same_message(msg, roundtrip(msg))
    forward = Forward(step_id=0, token_ids=np.zeros(0, np.int32),
                      positions=np.zeros(0, np.int32), sequence_ids=np.zeros(0, np.int32))
    assert_same_message(forward, roundtrip(forward))


@pytest.mark.parametrize(
    "make_view",
    [lambda a: a[:, ::2], lambda a: a.T, lambda a: a[::-1, 1:5]],
    ids=["strided", "transposed", "reversed"],
)
def test_non_contiguous_arrays_round_trip(make_view) -> None:
    base = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    view = make_view(base)
    assert not view.flags.c_contiguous
    msg = Logits(step_id=1, sender_rank=0, logits=view)
    received = roundtrip(msg)
    assert received.logits.flags.c_contiguous
    np.testing.assert_array_equal(received.logits, view)


def test_big_endian_array_arrives_with_its_values() -> None:
    values = np.arange(6, dtype=">f4").reshape(2, 3)
    received = roundtrip(Logits(step_id=0, sender_rank=0, logits=values))
    np.testing.assert_array_equal(received.logits, values.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "float32", BFloat16Array])
def test_activation_dtypes_round_trip(dtype: object) -> None:
    values = np.random.default_rng(RNG_SEED).standard_normal((4, 33)).astype(np.float32)
    payload = BFloat16Array.from_float32(values) if dtype is BFloat16Array else values.astype(dtype)
    msg = PartialSum(step_id=2, layer_index=1, site=1, sender_rank=1, chunk_index=0,
                     chunk_count=1, values=payload)
    frames = encode(msg)
    assert msgpack.unpackb(frames[1])["arrays"]["values"]["dtype"] == (
        "bfloat16" if dtype is BFloat16Array else dtype
    )
    assert_same_message(msg, roundtrip(msg))


def test_bfloat16_rounding_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(RNG_SEED)
    values = np.concatenate([
        rng.standard_normal(1000).astype(np.float32) * 1e3,
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.4e38, 1.00390625, 1.01171875], np.float32),
    ])
    ours = BFloat16Array.from_float32(values).bits
    as_torch_bf16 = torch.from_numpy(values).to(torch.bfloat16)
    reference = as_torch_bf16.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, reference)
    # Widening back is exact: torch's bf16 -> f32 gives the same floats.
    widened = torch.from_numpy(ours.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(BFloat16Array(ours).to_float32(), widened)
    nan = BFloat16Array.from_float32(np.array([np.nan], np.float32)).to_float32()
    assert np.isnan(nan).all()


def test_large_array_round_trips_without_copy_on_encode() -> None:
    values = np.random.default_rng(RNG_SEED).standard_normal((512, 2048)).astype(np.float32)
    msg = Logits(step_id=3, sender_rank=1, logits=values)  # 4 MiB
    frames = encode(msg)
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.uint8), values)
    assert_same_message(msg, decode(frames))


# --- malformed input --------------------------------------------------------------------------


def _valid_forward_frames() -> list[bytes]:
    msg = Forward(step_id=1, token_ids=np.arange(4, dtype=np.int32),
                  positions=np.arange(4, dtype=np.int32),
                  sequence_ids=np.zeros(4, dtype=np.int32))
    return [bytes(frame) for frame in encode(msg)]


def _with_header(edit) -> list[bytes]:
    frames = _valid_forward_frames()
    header = msgpack.unpackb(frames[1])
    edit(header)
    frames[1] = msgpack.packb(header)
    return frames


def _set_token_ids(key: str, value: object):
    def edit(header: dict) -> None:
        header["arrays"]["token_ids"][key] = value
    return edit


MALFORMED = {
    "too few frames": ([b"\x03"], "expected at least 2"),
    "unknown type byte": ([b"\x63", b"\x80"], "unknown message type byte 99"),
    "long type frame": ([b"\x03\x03", b"\x80"], "type frame has 2 bytes"),
    "not msgpack": ([b"\x03", b"\xc1"], "not valid msgpack"),
    "truncated msgpack": ([b"\x03", msgpack.packb({"version": 1})[:-1]], "not valid msgpack"),
    "extra bytes after msgpack": ([b"\x03", msgpack.packb({}) + b"\x00"], "not valid msgpack"),
    "ext type": ([b"\x03", msgpack.packb(msgpack.ExtType(5, b"x"))], "extension"),
    "header not a map": ([b"\x03", msgpack.packb([1, 2])], "must be a map"),
    "non-string map key": ([b"\x03", msgpack.packb({1: 2})], "not valid msgpack"),
    "missing header key": (_with_header(lambda h: h.pop("fields")), "exactly keys"),
    "wrong version": (_with_header(lambda h: h.update(version=2)), "protocol version"),
    "missing field": (_with_header(lambda h: h["fields"].pop("step_id")), "header fields"),
    "extra field": (_with_header(lambda h: h["fields"].update(x=1)), "header fields"),
    "field wrong type": (_with_header(lambda h: h["fields"].update(step_id="1")),
                         "'step_id' must be int"),
    "bool as int": (_with_header(lambda h: h["fields"].update(step_id=True)),
                    "'step_id' must be int"),
    "missing array": (_with_header(lambda h: h["arrays"].pop("positions")), "header arrays"),
    "object dtype": (_with_header(_set_token_ids("dtype", "object")), "not allowed"),
    "unknown dtype": (_with_header(_set_token_ids("dtype", "complex64")), "not allowed"),
    "disallowed field dtype": (_with_header(_set_token_ids("dtype", "uint32")),
                               "allowed: int32, int64"),
    "negative dim": (_with_header(_set_token_ids("shape", [-4])), "negative dimension"),
    "shape not ints": (_with_header(_set_token_ids("shape", [4.0])), "list of integers"),
    "too many dims": (_with_header(_set_token_ids("shape", [1] * 70)), "at most 32"),
    "huge zero-sized shape": (_with_header(_set_token_ids("shape", [0, 2**63])),
                              "frame has 16 bytes"),
    "frame index out of range": (_with_header(_set_token_ids("frame", 9)), "frame index 9"),
    "frame claimed twice": (_with_header(_set_token_ids("frame", 1)), "claimed by two arrays"),
    "byte length mismatch": (_with_header(_set_token_ids("shape", [5])),
                             "frame has 16 bytes but dtype int32 with shape [5] needs 20"),
    "wrong rank": (_with_header(_set_token_ids("shape", [2, 2])), "must have 1 dimension"),
    "descriptor keys": (_with_header(lambda h: h["arrays"]["token_ids"].pop("frame")),
                        "exactly keys dtype, shape, frame"),
    "frame count mismatch": (_valid_forward_frames()[:-1], "frame count mismatch"),
    "extra frame": (_valid_forward_frames() + [b""], "frame count mismatch"),
    "length mismatch between arrays": (
        _with_header(lambda h: None)[:2] + [b"\0" * 16, b"\0" * 16, b"\0" * 12],
        "frame has 12 bytes",
    ),
    "non-buffer frame": ([b"\x03", 42], "not a bytes-like object"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_input_raises_protocol_error(case: str) -> None:
    frames, words = MALFORMED[case]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert words in str(info.value)


def test_message_size_limit() -> None:
    frames = _valid_forward_frames()
    decode(frames, max_message_bytes=sum(len(f) for f in frames))
    with pytest.raises(ProtocolError, match="above the limit"):
        decode(frames, max_message_bytes=sum(len(f) for f in frames) - 1)


def test_semantic_checks_on_decode() -> None:
    msg = PartialSum(step_id=0, layer_index=0, site=0, sender_rank=0, chunk_index=0,
                     chunk_count=1, values=np.zeros(2, np.float32))
    frames = [bytes(f) for f in encode(msg)]
    header = msgpack.unpackb(frames[1])
    header["fields"]["chunk_index"] = 1
    with pytest.raises(ProtocolError, match="chunk_index 1 is outside"):
        decode([frames[0], msgpack.packb(header), frames[2]])
    header["fields"].update(chunk_index=0, site=5)
    with pytest.raises(ProtocolError, match="not a ReduceSite"):
        decode([frames[0], msgpack.packb(header), frames[2]])


def test_encode_refuses_messages_that_break_the_contract() -> None:
    with pytest.raises(ProtocolError, match="dtype object"):
        encode(Logits(step_id=0, sender_rank=0, logits=np.array([[None]], dtype=object)))
    with pytest.raises(ProtocolError, match="differ in length"):
        encode(Forward(step_id=0, token_ids=np.zeros(2, np.int32),
                       positions=np.zeros(3, np.int32), sequence_ids=np.zeros(2, np.int32)))
    with pytest.raises(ProtocolError, match="must be int"):
        encode(Ready(worker_rank=0, weight_bytes=1.5))
    with pytest.raises(ProtocolError, match="does not fit in int64"):
        encode(Ready(worker_rank=0, weight_bytes=2**64))
    with pytest.raises(ProtocolError, match="not a protocol message"):
        encode(object())


def test_random_bytes_only_ever_raise_protocol_error() -> None:
    rng = np.random.default_rng(RNG_SEED)
    valid = [[bytes(f) for f in encode(m)] for m in sample_messages()]
    for trial in range(3000):
        if trial % 2:
            # Random frames from scratch.
            frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(rng.integers(0, 5))]
        else:
            # A valid message with a few bytes of one frame flipped: exercises deeper paths.
            frames = list(valid[trial // 2 % len(valid)])
            target = int(rng.integers(0, len(frames)))
            corrupted = bytearray(frames[target])
            for _ in range(int(rng.integers(1, 4))):
                if corrupted:
                    corrupted[int(rng.integers(0, len(corrupted)))] = int(rng.integers(0, 256))
            frames[target] = bytes(corrupted)
        try:
            decode(frames)
        except ProtocolError:
            pass


# --- real ZeroMQ transport --------------------------------------------------------------------


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _socket_pair(context: zmq.Context, address: str) -> tuple[zmq.Socket, zmq.Socket]:
    server = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    for sock in (server, client):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)  # a broken test fails with zmq.Again, never hangs
        sock.setsockopt(zmq.SNDTIMEO, 5000)
    if address.endswith(":*"):
        server.bind(address)
        address = server.getsockopt_string(zmq.LAST_ENDPOINT)
    else:
        server.bind(address)
    client.connect(address)
    return server, client


def _exchange_over(context: zmq.Context, address: str) -> None:
    server, client = _socket_pair(context, address)
    for msg in sample_messages():
        client.send_multipart(encode(msg), copy=False)
        identity, *frames = server.recv_multipart(copy=False)
        received = decode(frames)
        assert_same_message(msg, received)
        # Reply path (worker -> coordinator direction) with a large array.
        reply = Logits(step_id=9, sender_rank=0,
                       logits=np.arange(256 * 1024, dtype=np.float32).reshape(256, 1024))
        server.send_multipart([identity.bytes, *encode(reply)], copy=False)
        assert_same_message(reply, decode(client.recv_multipart(copy=False)))


def test_zeromq_round_trip_over_ipc(zmq_context: zmq.Context, tmp_path: Path) -> None:
    _exchange_over(zmq_context, f"ipc://{tmp_path / 'data.sock'}")


def test_zeromq_round_trip_over_tcp(zmq_context: zmq.Context) -> None:
    _exchange_over(zmq_context, "tcp://127.0.0.1:*")


# --- cluster additions: HIDDEN, FORWARD.all_logits, LOGITS.vocab_start --------------------------


def test_added_fields_default_for_older_call_sites() -> None:
    forward = Forward(step_id=0, token_ids=np.zeros(2, np.int32), positions=np.arange(2),
                      sequence_ids=np.zeros(2, np.int32))
    logits = Logits(step_id=0, sender_rank=0, logits=np.zeros((1, 4), np.float32))
    assert roundtrip(forward).all_logits == 0
    assert roundtrip(logits).vocab_start == 0


def test_hidden_keeps_bf16_and_its_values() -> None:
    rng = np.random.default_rng(RNG_SEED)
    values = rng.standard_normal((2, 16)).astype(np.float32)
    msg = Hidden(step_id=1, sender_rank=0, all_logits=1, positions=np.arange(2),
                 sequence_ids=np.zeros(2, np.int64), hidden=BFloat16Array.from_float32(values))
    received = roundtrip(msg)
    assert isinstance(received.hidden, BFloat16Array)
    np.testing.assert_array_equal(received.hidden.to_float32(), msg.hidden.to_float32())


def test_cluster_additions_are_checked() -> None:
    hidden = np.zeros((3, 8), np.float32)
    with pytest.raises(ProtocolError, match="HIDDEN arrays differ in length"):
        encode(Hidden(step_id=0, sender_rank=0, all_logits=0, positions=np.arange(2),
                      sequence_ids=np.zeros(2, np.int64), hidden=hidden))
    with pytest.raises(ProtocolError, match="'all_logits' is 2; it is a flag"):
        encode(Hidden(step_id=0, sender_rank=0, all_logits=2, positions=np.arange(3),
                      sequence_ids=np.zeros(3, np.int64), hidden=hidden))
    with pytest.raises(ProtocolError, match="'all_logits' is -1"):
        encode(Forward(step_id=0, token_ids=np.zeros(1, np.int32), positions=np.zeros(1, np.int32),
                       sequence_ids=np.zeros(1, np.int32), all_logits=-1))
    with pytest.raises(ProtocolError, match="vocab_start -5 must be >= 0"):
        encode(Logits(step_id=0, sender_rank=0, logits=hidden, vocab_start=-5))
    with pytest.raises(ProtocolError, match="'hidden' has dtype int32"):
        encode(Hidden(step_id=0, sender_rank=0, all_logits=0, positions=np.arange(3),
                      sequence_ids=np.zeros(3, np.int64), hidden=hidden.astype(np.int32)))


def test_decode_checks_a_hidden_length_mismatch_from_the_wire() -> None:
    msg = Hidden(step_id=0, sender_rank=0, all_logits=0, positions=np.arange(3),
                 sequence_ids=np.zeros(3, np.int64), hidden=np.zeros((3, 4), np.float32))
    frames = [bytes(frame) for frame in encode(msg)]
    header = msgpack.unpackb(frames[1])
    header["arrays"]["hidden"]["shape"] = [2, 6]  # same byte count, one row fewer
    frames[1] = msgpack.packb(header)
    with pytest.raises(ProtocolError, match="HIDDEN arrays differ in length"):
        decode(frames)
