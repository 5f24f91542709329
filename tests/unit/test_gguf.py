"""cluster.gguf against gguf-py's GGUFReader (the independent reference), plus corrupt inputs."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from cluster.default_model import default_model_path
from cluster.errors import GGUFFormatError
from cluster.gguf import GGML_TYPE_NAMES, SUPPORTED_TYPES, open_gguf, type_block


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return default_model_path(progress=False)


@pytest.fixture(scope="session")
def gemma_reader(gemma_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gemma_path)


def write_small_gguf(path: Path, alignment: int | None = None) -> Path:
    """A small GGUF with every metadata value type and F32/F16/Q8_0/3-D tensors."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch="testarch")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -100)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -2_000_000_000)
    writer.add_float32("test.f32", 0.1)
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**62))
    writer.add_float64("test.f64", 1e-300)
    writer.add_bool("test.bool", True)
    writer.add_string("test.str", "héllo ✓ wörld")
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [1.5, -2.25])
    writer.add_array("test.strs", ["a", "", "ccc ✓", "<start_of_turn>"])
    writer.add_array("test.bools", [True, False, True])
    writer.add_tensor("tensor.f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("tensor.f16", rng.standard_normal((4, 8)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("tensor.q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("experts.f32", rng.standard_normal((2, 3, 4)).astype(np.float32))
    writer.add_tensor("tensor.last", rng.standard_normal((16,)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_matches_reader(path: Path, reader: gguf.GGUFReader) -> None:
    with open_gguf(path) as ours:
        reference_keys = [k for k in reader.fields if not k.startswith("GGUF.")]
        assert list(ours.metadata) == reference_keys
        for key in reference_keys:
            field = reader.fields[key]
            expected = field.contents()
            actual = ours.metadata[key]
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                if field.types[-1] == gguf.GGUFValueType.STRING:
                    assert actual == expected, key
                else:
                    assert isinstance(actual, np.ndarray), key
                    np.testing.assert_array_equal(actual, np.asarray(expected), err_msg=key)
            else:
                assert actual == expected, key
                assert type(actual) is type(expected), key
        assert ours.version == reader.fields["GGUF.version"].contents()
        assert ours.alignment == reader.alignment
        assert list(ours.tensors) == [t.name for t in reader.tensors]
        for reference in reader.tensors:
            info = ours.tensors[reference.name]
            assert info.ggml_type == int(reference.tensor_type)
            assert info.type_name == reference.tensor_type.name
            assert info.shape == tuple(int(d) for d in reversed(reference.shape))
            assert info.offset == reference.data_offset
            assert info.n_bytes == reference.n_bytes
            data = ours.tensor_data(reference.name)
            assert data.dtype == np.uint8 and data.shape == (info.n_bytes,)
            assert not data.flags.owndata  # a view into the mmap, not a copy
            assert np.array_equal(data, np.asarray(reference.data).view(np.uint8).reshape(-1))


def test_type_table_matches_gguf_py() -> None:
    for quant_type, (block_elements, block_bytes) in gguf.GGML_QUANT_SIZES.items():
        if int(quant_type) in GGML_TYPE_NAMES:
            assert type_block(int(quant_type)) == (block_elements, block_bytes)
            assert GGML_TYPE_NAMES[int(quant_type)] == quant_type.name
    assert {GGML_TYPE_NAMES[t] for t in SUPPORTED_TYPES} == {
        "F32", "F16", "BF16", "Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
    with pytest.raises(GGUFFormatError, match="unknown ggml type id 99"):
        type_block(99)


def test_gemma_matches_gguf_py(gemma_path: Path, gemma_reader: gguf.GGUFReader) -> None:
    assert_matches_reader(gemma_path, gemma_reader)
    with open_gguf(gemma_path) as ours:
        assert len(ours.metadata["tokenizer.ggml.tokens"]) == 262144
        assert ours.tensors["token_embd.weight"].shape == (262144, 640)  # [vocab, d_model]


@pytest.mark.parametrize("alignment", [None, 64])
def test_small_file_matches_gguf_py(tmp_path: Path, alignment: int | None) -> None:
    path = write_small_gguf(tmp_path / "small.gguf", alignment)
    assert_matches_reader(path, gguf.GGUFReader(path))
    with open_gguf(path) as ours:
        assert ours.tensors["experts.f32"].shape == (2, 3, 4)  # [n_expert, n_out, n_in]
        assert ours.tensors["tensor.q8"].shape == (2, 64)


def test_close_with_live_views(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "small.gguf")
    ours = open_gguf(path)
    view = ours.tensor_data("tensor.f32")
    expected = view.copy()
    ours.close()  # must not fail while a view is alive, and the view must stay valid
    assert np.array_equal(view, expected)
    with pytest.raises(ValueError, match="closed"):
        ours.tensor_data("tensor.f32")


# --- corrupt inputs ---------------------------------------------------------------------------


@pytest.fixture
def small_bytes(tmp_path: Path) -> bytes:
    return write_small_gguf(tmp_path / "source.gguf").read_bytes()


def corrupt(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(data)
    return path


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buffer = bytearray(data)
    struct.pack_into(fmt, buffer, offset, value)
    return bytes(buffer)


def tensor_record(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name` in the header."""
    return data.index(name.encode()) + len(name)


def open_error(path: Path) -> str:
    with pytest.raises(GGUFFormatError) as error:
        open_gguf(path)
    message = str(error.value)
    assert str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in open_error(tmp_path / "absent.gguf")


@pytest.mark.parametrize("head, words", [
    (b"", "empty"),
    (b"PK\x03\x04" + bytes(60), "zip"),
    (struct.pack("<Q", 120) + b'{"weight": {"dtype": "F32"}}' + bytes(100), "safetensors"),
    (b"<!DOCTYPE html><html>not found</html>", "HTML"),
    (b"version https://git-lfs.github.com/spec/v1\n", "LFS"),
    (b"\x00\x01\x02\x03garbage" * 4, "not a GGUF file"),
])
def test_not_gguf(tmp_path: Path, head: bytes, words: str) -> None:
    message = open_error(corrupt(tmp_path, head))
    assert words in message


@pytest.mark.parametrize("version", [1, 4, 3 << 24])
def test_unsupported_version(tmp_path: Path, small_bytes: bytes, version: int) -> None:
    message = open_error(corrupt(tmp_path, patch(small_bytes, 4, "<I", version)))
    assert f"version {version} is not supported" in message


@pytest.mark.parametrize("keep", [6, 20, 40, 200])
def test_truncated_header(tmp_path: Path, small_bytes: bytes, keep: int) -> None:
    message = open_error(corrupt(tmp_path, small_bytes[:keep]))
    assert "past the end" in message or "absurd" in message


def test_truncated_tensor_data(tmp_path: Path, small_bytes: bytes) -> None:
    message = open_error(corrupt(tmp_path, small_bytes[:-10]))
    assert f"file is truncated: expected {len(small_bytes)} bytes, has {len(small_bytes) - 10}" \
        in message
    assert "re-download" in message


def test_row_length_not_a_block_multiple(tmp_path: Path, small_bytes: bytes) -> None:
    ne0 = tensor_record(small_bytes, "tensor.q8") + 4  # after n_dims
    message = open_error(corrupt(tmp_path, patch(small_bytes, ne0, "<q", 48)))
    assert "not a multiple" in message and "tensor.q8" in message


def test_tensor_size_overlaps_next(tmp_path: Path, small_bytes: bytes) -> None:
    ne1 = tensor_record(small_bytes, "tensor.f32") + 4 + 8  # second dimension
    message = open_error(corrupt(tmp_path, patch(small_bytes, ne1, "<q", 50)))
    assert "inconsistent with its shape" in message and "tensor.f32" in message


def test_unknown_type_id(tmp_path: Path, small_bytes: bytes) -> None:
    type_field = tensor_record(small_bytes, "tensor.f16") + 4 + 2 * 8
    message = open_error(corrupt(tmp_path, patch(small_bytes, type_field, "<I", 99)))
    assert "unknown ggml type id 99" in message and "tensor.f16" in message


def test_unsupported_type_is_not_rejected_at_open(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(path, arch="testarch")
    writer.add_tensor("w", np.zeros((2, 136), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_XS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_gguf(path) as ours:
        assert ours.tensors["w"].type_name == "IQ4_XS"
        assert ours.tensors["w"].shape == (2, 256)


@pytest.mark.parametrize("field", ["tensor count", "kv count", "string length", "array length"])
def test_absurd_counts(tmp_path: Path, small_bytes: bytes, field: str) -> None:
    huge = 1 << 60
    if field == "tensor count":
        data = patch(small_bytes, 8, "<Q", huge)
    elif field == "kv count":
        data = patch(small_bytes, 16, "<Q", huge)
    elif field == "string length":
        key = small_bytes.index(b"test.str")
        data = patch(small_bytes, key + len(b"test.str") + 4, "<Q", huge)  # after value type
    else:
        key = small_bytes.index(b"test.strs")
        data = patch(small_bytes, key + len(b"test.strs") + 8, "<Q", huge)  # after both types
    message = open_error(corrupt(tmp_path, data))
    assert "absurd" in message or "past the end" in message


def test_duplicate_tensor_names(tmp_path: Path, small_bytes: bytes) -> None:
    # "tensor.f16" -> "tensor.f32": same length, so the rest of the header is unchanged.
    position = small_bytes.index(b"tensor.f16")
    data = small_bytes[:position] + b"tensor.f32" + small_bytes[position + len(b"tensor.f16"):]
    message = open_error(corrupt(tmp_path, data))
    assert "'tensor.f32' appears twice" in message


def _mapped_rss_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[-1] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def _large_file(tmp_path: Path) -> Path:
    """A GGUF of one 8 MiB float32 tensor: far more pages than parsing the header maps."""
    path = tmp_path / "large.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("big.weight", np.ones((2048, 1024), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_populate_maps_every_tensor_page(tmp_path: Path) -> None:
    path = _large_file(tmp_path)
    tensor_bytes = 2048 * 1024 * 4
    with open_gguf(path) as file:
        assert _mapped_rss_bytes(path) < tensor_bytes // 4  # only the header was read
        assert file.populate()
        assert _mapped_rss_bytes(path) >= tensor_bytes


def test_populate_skips_a_file_larger_than_available_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster import gguf as numoe_gguf  # noqa: PLC0415

    path = _large_file(tmp_path)
    monkeypatch.setattr(numoe_gguf, "_available_memory_bytes", lambda: 1 << 20)
    with open_gguf(path) as file:
        assert not file.populate()
        assert _mapped_rss_bytes(path) < 2048 * 1024
