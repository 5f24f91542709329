"""cluster.tokenizer against llama.cpp's tokenizer: llama_tokenize, token_to_piece, detokenize."""

from __future__ import annotations

import ctypes
import random
from pathlib import Path
from typing import Any

import pytest

from cluster.default_model import default_model_path
from cluster.gguf import open_gguf
from cluster.tokenizer import TOKEN_BYTE, Tokenizer
from tests.reference import llamacpp

CORPUS = [
    "", " ", "Hello world", " Hello world", "Hello  world  ", "The quick brown fox.",
    "café naïve façade résumé Ångström", "Привет, мир! Как дела?", "مرحبا بالعالم",
    "日本語のテキストと中文字符", "한국어 텍스트", "mixed ελληνικά עברית हिन्दी ไทย",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇺🇸 heart ❤️ ok", "Zalgo ẗ̴̡̛e̸x̷t̵", "\u00a0nbsp\u3000ideo",
    "1234567890 3.14159 1,000,000 007", "123456789012345678901234567890",
    "def f(x):\n\treturn x**2  # square\n\n\nclass A:\n    pass\n",
    "    indented\n        more", "a\t\tb\t\t\tc", "\r\n\r\nwindows\r\n",
    "if (a && b || !c) { x[i] = y->z; } // done", "don't I'll we've they're",
    "====----____....!!!???",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<bos>text</s><unused12><|endoftext|>", "<table><tr><td>x</td></tr></table>",
    "<0x0A> literal", "▁▁ visible ▁ spaces", "aaaaaaaaaaaaaaaaaaaa", "ab" * 40,
]
for _count in range(1, 6):
    for _char in (" ", "\t", "\n"):
        _run = _char * _count
        CORPUS += [_run, _run + "x", "x" + _run, "x" + _run + "y", _run + "x" + _run]

# Texts whose decode(encode(x)) is not x in SentencePiece vocabularies, in llama.cpp too:
# "<0x0A>" merges into the byte token for "\n", and a literal "▁" is SentencePiece's space.
SPM_NOT_ROUND_TRIP = {"<0x0A> literal", "▁▁ visible ▁ spaces"}


def gemma_path() -> Path:
    return default_model_path(progress=False)


VOCABS = {
    "gemma3": gemma_path,
    "qwen2": lambda: llamacpp.vocab_file("qwen2"),
    "qwen35": lambda: llamacpp.vocab_file("qwen35"),
    "llama-bpe": lambda: llamacpp.vocab_file("llama-bpe"),
    "llama-spm": lambda: llamacpp.vocab_file("llama-spm"),
}


class Reference:
    """llama.cpp's vocabulary for one GGUF, through the ctypes bindings."""

    def __init__(self, path: Path) -> None:
        self.llama_cpp = llamacpp.bindings()
        self.model = self.llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = self.model._model.vocab

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.model.tokenize(text.encode(), add_bos=add_special, special=parse_special)

    def piece(self, token_id: int) -> bytes:
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self.llama_cpp.llama_token_to_piece(self.vocab, token_id, buffer, size, 0, True)
            if n >= 0:
                return buffer.raw[:n]
            size = -n

    def detokenize(self, ids: list[int], remove_special: bool) -> bytes:
        array = (self.llama_cpp.llama_token * len(ids))(*ids)
        size = 64 + 64 * len(ids)
        buffer = ctypes.create_string_buffer(size)
        n = self.llama_cpp.llama_detokenize(self.vocab, array, len(ids), buffer, size,
                                            remove_special, not remove_special)
        assert n >= 0
        return buffer.raw[:n]


@pytest.fixture(scope="module", params=list(VOCABS))
def vocab(request: Any) -> tuple[str, Tokenizer, Reference, Path]:
    path = VOCABS[request.param]()
    if not path.exists():
        pytest.skip(f"{path} missing")
    with open_gguf(path) as gguf_file:
        tokenizer = Tokenizer.from_gguf(gguf_file)
    return request.param, tokenizer, Reference(path), path


def test_encode_matches_llamacpp(vocab: tuple[str, Tokenizer, Reference, Path]) -> None:
    name, tokenizer, reference, path = vocab
    texts = list(CORPUS)
    test_vectors = Path(str(path) + ".inp")  # llama.cpp's own tokenizer test inputs
    if test_vectors.exists():
        texts += test_vectors.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    mismatches = []
    for text in texts:
        for add_special in (True, False):
            for parse_special in (True, False):
                expected = reference.tokenize(text, add_special, parse_special)
                actual = tokenizer.encode(text, add_special, parse_special)
                if actual != expected:
                    mismatches.append((text, add_special, parse_special, expected, actual))
    assert not mismatches, f"{name}: {len(mismatches)} mismatches, first: {mismatches[:3]}"


def test_encode_random_text_matches_llamacpp(vocab: tuple[str, Tokenizer, Reference, Path]) -> None:
    name, tokenizer, reference, _ = vocab
    rng = random.Random(1234)
    alphabet = (list("aabcdeefghiijklmnoopqrsttuvwxyz  AEIOXZ0123456789.,;:!?'\"()[]{}<>/_-=+*")
                + list("\t\n\réüößçñ▁") + list("Привет日本語中文한국어")
                + ["😀", "👨‍👩‍👧", "\u200d"]
                + ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "</s>",
                   "<td>", "   ", "\n\n", "====", "ing", "tion", "1111", "ééé"])
    mismatches = []
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        add_special, parse_special = rng.random() < 0.5, rng.random() < 0.5
        expected = reference.tokenize(text, add_special, parse_special)
        if tokenizer.encode(text, add_special, parse_special) != expected:
            mismatches.append((text, add_special, parse_special))
    assert not mismatches, f"{name}: {len(mismatches)} mismatches, first: {mismatches[:3]}"


def test_special_ids_match_llamacpp(vocab: tuple[str, Tokenizer, Reference, Path]) -> None:
    _, tokenizer, reference, _ = vocab
    llama_cpp, handle = reference.llama_cpp, reference.vocab
    assert tokenizer.vocab_size == llama_cpp.llama_vocab_n_tokens(handle)
    assert tokenizer.bos_id == llama_cpp.llama_vocab_bos(handle)
    assert tokenizer.eos_id == llama_cpp.llama_vocab_eos(handle)
    assert tokenizer.add_bos == llama_cpp.llama_vocab_get_add_bos(handle)
    assert tokenizer.add_eos == llama_cpp.llama_vocab_get_add_eos(handle)
    eog = {i for i in range(tokenizer.vocab_size) if llama_cpp.llama_vocab_is_eog(handle, i)}
    assert tokenizer.end_of_generation_ids == eog


def test_pieces_match_llamacpp(vocab: tuple[str, Tokenizer, Reference, Path]) -> None:
    _, tokenizer, reference, _ = vocab
    rng = random.Random(7)
    n = tokenizer.vocab_size
    ids = rng.sample(range(n), 3000) + list(range(400)) + list(range(n - 300, n))
    mismatches = [(i, reference.piece(i), tokenizer.piece(i)) for i in ids
                  if reference.piece(i) != tokenizer.piece(i)]
    assert not mismatches, mismatches[:5]


def test_decode_matches_llamacpp_and_round_trips(
    vocab: tuple[str, Tokenizer, Reference, Path],
) -> None:
    name, tokenizer, reference, _ = vocab
    for text in CORPUS:
        ids = tokenizer.encode(text, add_special=True, parse_special=True)
        for skip_special in (False, True):
            expected = reference.detokenize(ids, remove_special=skip_special)
            assert tokenizer.decode(ids, skip_special) == expected.decode("utf-8", "replace")
        if name in ("llama-spm", "llama-bpe") or (
            tokenizer.model_type == "llama" and text in SPM_NOT_ROUND_TRIP
        ):
            # llama-spm prefixes a space after every special token; llama-bpe's decoder cleans
            # up spaces before punctuation (both as in llama.cpp, checked above).
            continue
        plain = tokenizer.encode(text, add_special=False, parse_special=True)
        assert tokenizer.decode(plain) == text
        with_bos = tokenizer.encode(text, add_special=True, parse_special=False)
        assert tokenizer.decode(with_bos, skip_special=True) == text


def test_stream_decoder_emits_complete_characters(
    vocab: tuple[str, Tokenizer, Reference, Path],
) -> None:
    _, tokenizer, _, _ = vocab
    text = "emoji 😀🎉 👨‍👩‍👧‍👦 日本語 Привет 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001fae8 end"
    ids = tokenizer.encode(text, add_special=False)
    decoder = tokenizer.stream_decoder()
    chunks = [decoder.feed(i) for i in ids] + [decoder.flush()]
    # The stream keeps every piece's text, including the space a SentencePiece vocab with
    # add_space_prefix put in front (in a generated continuation that space is content).
    assert "".join(chunks) == b"".join(tokenizer.piece(i) for i in ids).decode()
    assert "".join(chunks).removeprefix(" " if tokenizer.add_space_prefix else "") == text
    assert all("\ufffd" not in chunk for chunk in chunks)
    partial_pieces = [i for i in ids if not _is_complete_utf8(tokenizer.piece(i))]
    assert partial_pieces, "the text should exercise tokens that split a character"


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_gemma_uses_byte_fallback_for_unseen_characters() -> None:
    with open_gguf(gemma_path()) as gguf_file:
        tokenizer = Tokenizer.from_gguf(gguf_file)
    ids = tokenizer.encode("\U0001fae8", add_special=False)
    assert all(int(tokenizer.token_types[i]) == TOKEN_BYTE for i in ids)
    assert b"".join(tokenizer.piece(i) for i in ids) == "\U0001fae8".encode()
