"""cluster.tokenizer against llama.cpp's tokenizer: llama_tokenize, token_to_piece, detokenize."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

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
    # Digit grouping, CJK / kana / Hangul runs, full-width forms and punctuation runs, which the
    # DeepSeek pre-tokenizers split on; ideographic and other non-ASCII spaces inside them.
    "1234567 12 123 1234 x1234567y 3.1415926", "中文测试 日本語テキスト ひらがな カタカナ 한국어",
    "中文，测试。\u3000全角\u3000\u3000、空格", "Ｆｕｌｌ\u3000ｗｉｄｔｈ！？（１２３）",
    "...!!!???,,,;;; --- ((([[[{{{ }}}]]]))) \"quoted\" 'single' “curly” ‘q’",
    "line1\nline2\n\nline3\r\n\r\n\n  \n\t\n end  \n", "trailing spaces   ",
    ".hidden ,comma !bang $dollar @at #hash", "x\u2003\u2003y\u00a0z\u202fw\u0085v",
    "\u0390\u1fd3 \u2126\u03a9 \u212a K \u1f7d\u03ce µ \u00b5 ſ ﬁ", "٣٤٥ ²³ ½ Ⅻ 𝟙𝟚",
    # llama.cpp never lets U+3000 match DeepSeek's literal ranges that contain it.
    "  \u3000", "\u2003\u2003\u3000中", "x\u2003\u2003\u3000、y", "\u3000  \u3000",
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


def with_pre_tokenizer(source: Path, pre: str, path: Path) -> Path:
    """A copy of a vocab-only GGUF whose tokenizer.ggml.pre is `pre`.

    llama.cpp picks its regex list from that string alone, so llama.cpp tokenizing the copy is
    the reference for `pre` (used for DeepSeek-V3, which has no vocab file in llama.cpp).
    """
    reader = GGUFReader(source)
    writer = GGUFWriter(path, str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main_type = field.types[0]
        sub_type = field.types[1] if main_type == GGUFValueType.ARRAY else None
        value = pre if key == "tokenizer.ggml.pre" else field.contents()
        writer.add_key_value(key, value, main_type, sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


# name -> vocab GGUF path, given a scratch directory.
VOCABS: dict[str, Callable[[Path], Path]] = {
    "gemma3": lambda _: gemma_path(),
    "qwen2": lambda _: llamacpp.vocab_file("qwen2"),
    "qwen35": lambda _: llamacpp.vocab_file("qwen35"),
    "llama-bpe": lambda _: llamacpp.vocab_file("llama-bpe"),
    "llama-spm": lambda _: llamacpp.vocab_file("llama-spm"),
    "deepseek-llm": lambda _: llamacpp.vocab_file("deepseek-llm"),
    "deepseek-coder": lambda _: llamacpp.vocab_file("deepseek-coder"),
    "deepseek-v3": lambda directory: with_pre_tokenizer(
        llamacpp.vocab_file("deepseek-llm"), "deepseek-v3", directory / "deepseek-v3.gguf"
    ),
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
def vocab(
    request: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Tokenizer, Reference, Path]:
    if request.param == "deepseek-v3" and not llamacpp.vocab_file("deepseek-llm").exists():
        pytest.skip(f"{llamacpp.vocab_file('deepseek-llm')} missing")
    path = VOCABS[request.param](tmp_path_factory.mktemp(request.param))
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
                + list("\t\n\réüößçñ▁") + list("Привет日本語中文한국어ひカ、。，！１Ｚ")
                + ["\u3000", "\u2003", "\u00a0", "\u212a", "\u1fd3", "٣", "½"]
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


def test_deepseek_v3_splits_differently_from_deepseek_llm(tmp_path: Path) -> None:
    """The deepseek-v3 copy is a real test of its regexes: same vocab, other pre-tokenization."""
    source = llamacpp.vocab_file("deepseek-llm")
    if not source.exists():
        pytest.skip(f"{source} missing")
    copy = with_pre_tokenizer(source, "deepseek-v3", tmp_path / "deepseek-v3.gguf")
    # deepseek-llm's "\s?" lets a tab lead punctuation, deepseek-v3's " ?" only a space.
    text = "1234567 日本語テキスト\n\t\t(x)"
    tokenizers = {}
    for path in (source, copy):
        with open_gguf(path) as gguf_file:
            tokenizers[path] = Tokenizer(gguf_file.metadata, str(path))
        assert tokenizers[path].encode(text) == Reference(path).tokenize(text, True, True)
    assert tokenizers[source].encode(text) != tokenizers[copy].encode(text)
