"""Tokenizer built from a GGUF vocabulary, with llama.cpp's llama_tokenize semantics.

llama.cpp is the reference: token ids must equal llama_tokenize(text, add_special, parse_special).
The work is split the way llama.cpp splits it:
  1. special-token partition (here, in Python): control / user-defined tokens are cut out of the
     text, longest token text first, exactly as llama.cpp's tokenizer_st_partition does;
  2. each remaining raw-text fragment goes through a Hugging Face `tokenizers` BPE model built
     programmatically from the GGUF vocabulary:
       * "llama" (SentencePiece, e.g. Gemma 3): spaces become "▁", merges are derived from the
         token scores (a pair merges when its concatenation is a token; higher score first),
         unknown characters fall back to <0xNN> byte tokens;
       * "gpt2" (byte-level BPE, e.g. Qwen, DeepSeek): the file's merges plus the pre-tokenizer
         regexes that llama.cpp uses for tokenizer.ggml.pre, applied one after the other.
  3. BOS/EOS are added per tokenizer.ggml.add_bos_token / add_eos_token (llama.cpp's defaults).
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

from cluster.errors import GGUFFormatError, UnsupportedArchitectureError
from cluster.gguf import GGUFFile

# tokenizer.ggml.token_type values (llama_token_type).
TOKEN_UNDEFINED, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL = 0, 1, 2, 3
TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 4, 5, 6

# Token texts llama.cpp promotes to control tokens and treats as end of generation
# (llama-vocab.cpp, "maintain a list of tokens that cause end-of-generation").
_END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
# Other texts llama.cpp auto-detects (EOT, EOM, fill-in-the-middle) and marks as control.
_CONTROL_LOOKING_TEXTS = _END_OF_GENERATION_TEXTS | frozenset({
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
    "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>",
    "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
    "<|middle|>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>",
    "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
})
# FIM pad / repo / file-separator tokens also end generation in llama.cpp.
_FIM_END_OF_GENERATION_TEXTS = frozenset({
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
    "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
})

# Pre-tokenizer regexes (the tokenizer.json originals; llama.cpp uses equivalent rewrites).
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def _no_whitespace(char_class: str) -> str:
    """A literal character class minus whitespace (Oniguruma class intersection).

    Before llama.cpp runs a regex without \\p{...} it replaces every non-ASCII whitespace
    character of the text by "\\v" (unicode.cpp, unicode_regex_split), so U+3000 and the like
    never match a literal range such as U+0800-U+4E00 there; tokenizers would match them.
    """
    return f"[{char_class}&&[^\\s]]"


# DeepSeek regexes, from llama.cpp's regex_exprs (= the tokenizer.json Split lists). Written
# with \u escapes: several characters (U+1F7D, U+212A Kelvin sign, ...) have canonical
# singleton decompositions, and any tool that NFC-normalises the source would silently change
# the ranges.
# DeepSeek LLM / V2 (LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM). Latin, Greek, Cyrillic, ... letters:
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a"
    "\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
    "\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943"
)
# ASCII and full-width punctuation, curly quotes, U+3000-U+3002 (ideographic space, 、 and 。).
_DEEPSEEK_PUNCTUATION = "!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002"
# CJK ideographs, U+0800-U+4E00 (which holds U+3000 and other spaces) and Hangul.
_DEEPSEEK_CJK_HANGUL = _no_whitespace("\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff")
_DEEPSEEK_LLM_REGEXES = (
    "[\r\n]",
    r"\s?" + _no_whitespace(_DEEPSEEK_LETTERS) + "+",
    r"\s?" + _no_whitespace(_DEEPSEEK_PUNCTUATION) + "+",
    r"\s+$",  # fragments hold no "\n" by now, so "$" is the fragment's end as in std::regex
    _DEEPSEEK_CJK_HANGUL + "+",
    r"\p{N}+",
)
# DeepSeek Coder (LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER).
_DEEPSEEK_CODER_REGEXES = (
    "[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK_HANGUL + "+", r"\p{N}",
)
# DeepSeek V3 / R1 (LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM): digits in groups of up to three, then
# CJK ideograph / kana runs, then a llama3-like split where ASCII punctuation may lead a word.
_DEEPSEEK_V3_REGEXES = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass(frozen=True)
class _PreTokenizer:
    # Applied in order, each splitting the fragments the previous one produced, keeping both
    # matches and the text between them (llama.cpp's regex_exprs, HF's Split "isolated").
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is not split (llama3)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent
    clean_spaces: bool = True  # decode drops spaces before punctuation (llama.cpp's default)


_QWEN2 = _PreTokenizer((_QWEN2_REGEX,), clean_spaces=False)
_LLAMA3 = _PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_GPT2 = _PreTokenizer((_GPT2_REGEX,))
# tokenizer.ggml.pre -> pre-tokenizer, following llama.cpp's llama_vocab::impl::load.
_PRE_TOKENIZERS = {
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2,
    "qwen35": _PreTokenizer((_QWEN35_REGEX,), clean_spaces=False),
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "gpt-2": _GPT2, "phi-2": _GPT2,
    "deepseek-llm": _PreTokenizer(_DEEPSEEK_LLM_REGEXES, clean_spaces=False),
    "deepseek-coder": _PreTokenizer(_DEEPSEEK_CODER_REGEXES, clean_spaces=False),
    "deepseek-v3": _PreTokenizer(_DEEPSEEK_V3_REGEXES, clean_spaces=False),
}
_ASCII_SPACE = " \t\n\v\f\r"  # C isspace(), used for lstrip/rstrip of special tokens
_SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: char -> byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


def _spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece/llama.cpp score-greedy merging.

    llama.cpp merges the adjacent pair whose concatenation is the highest-scoring token. So every
    way to split a token into two tokens is a merge, ranked by the merged token's score (ties by
    id, then by split point, which is as close to llama.cpp's leftmost-first rule as a static
    rank can get).
    """
    token_set = set(tokens)
    candidates: list[tuple[float, int, int, str, str]] = []
    for token_id, token in enumerate(tokens):
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in token_set and right in token_set:
                candidates.append((-float(scores[token_id]), token_id, split, left, right))
    candidates.sort()
    return [(left, right) for _, _, _, left, right in candidates]


def _clean_up_spaces(text: bytearray) -> bytearray:
    """llama.cpp's detokenize clean_spaces passes, ported literally (HF's clean_up_tokenization).

    1) " ?", " !", " .", " ," lose the space; 2) a lone apostrophe between spaces loses both
    spaces; 3) " 's", " 'm", " 're", " 've" lose the space.
    """
    space, apostrophe = ord(" "), ord("'")
    total1 = len(text)
    total = 1 if total1 else 0
    for i in range(1, total1):
        x = text[i]
        if text[i - 1] == space and x in b"?!.,":
            total -= 1
        text[total] = x
        total += 1
    total2, total = total, 1 if total else 0
    i = 1
    while i < total2:
        x = text[i]
        if x == apostrophe and i + 1 < total2 and text[i - 1] == space and text[i + 1] == space:
            total -= 1
            i += 1
            text[i] = 0
        text[total] = x
        total += 1
        i += 1
    total3, total = total, 1 if total else 0
    for i in range(1, total3):
        x = text[i]
        if text[i - 1] == space and x == apostrophe and i + 1 < total3:
            x1 = text[i + 1]
            if x1 in b"sm" or (i + 2 < total3 and text[i + 1 : i + 3] in (b"re", b"ve")):
                total -= 1
        text[total] = x
        total += 1
    del text[total:]
    return text


class StreamDecoder:
    """Turns a stream of token ids into text, emitting only complete UTF-8 characters.

    Meant for generated tokens: every piece is kept as is (no SentencePiece prefix-space
    stripping, no clean-up of spaces before punctuation), as llama.cpp's server streams them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.piece(token_id))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """llama.cpp-compatible tokenizer for "llama" (SentencePiece) and "gpt2" (byte BPE) vocabs."""

    def __init__(self, metadata: dict, source: str) -> None:
        self._source = source
        model_type = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if model_type is None or not isinstance(tokens, list) or not tokens:
            raise GGUFFormatError(
                f"{source}: no tokenizer vocabulary (tokenizer.ggml.model / tokens missing); "
                f"use a GGUF converted with its tokenizer by llama.cpp's convert_hf_to_gguf.py"
            )
        if model_type not in ("llama", "gpt2"):
            raise UnsupportedArchitectureError(
                f"{source}: tokenizer model {model_type!r} is not supported; numoe reads "
                f"'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies"
            )
        self.model_type: str = model_type
        self.tokens: list[str] = tokens
        self.vocab_size = len(tokens)
        token_types = metadata.get("tokenizer.ggml.token_type")
        if token_types is None:
            token_types = np.full(self.vocab_size, TOKEN_NORMAL, np.int32)
        self.token_types = np.asarray(token_types, np.int32).copy()  # [vocab]
        if len(self.token_types) < self.vocab_size:
            raise GGUFFormatError(f"{source}: tokenizer.ggml.token_type is shorter than the vocab")
        self._token_to_id = {text: token_id for token_id, text in enumerate(tokens)}

        is_spm = model_type == "llama"
        # llama.cpp's defaults per vocab type, overridden by the metadata when present.
        default_bos, default_eos = (1, 2) if is_spm else (11, 11)
        self.bos_id = self._special_id(metadata, "bos", default_bos)
        self.eos_id = self._special_id(metadata, "eos", default_eos)
        self.unk_id = self._special_id(metadata, "unknown", 0 if is_spm else None)
        self._pre_tokenizer = None if is_spm else self._find_pre_tokenizer(metadata)
        default_add_bos = is_spm or bool(self._pre_tokenizer and self._pre_tokenizer.add_bos)
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", is_spm))
        self._detect_special_tokens(metadata)

        if is_spm:
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None:
                scores = np.zeros(self.vocab_size, np.float32)
            self._fragment_tokenizer = self._build_spm(np.asarray(scores, np.float32))
        else:
            self._fragment_tokenizer = self._build_byte_bpe(metadata)
        special_ids = np.flatnonzero(
            np.isin(self.token_types, (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN))
        )
        # llama.cpp matches special tokens longest (UTF-8) text first.
        ordered = sorted(special_ids.tolist(), key=lambda i: -len(tokens[i].encode("utf-8")))
        self._special_rank = {token_id: rank for rank, token_id in enumerate(ordered)}
        # Grouped by their first two characters, so that encode() searches the text only for
        # the few groups whose prefix occurs (Gemma has 6k "<unusedN>"-style specials).
        self._specials_by_prefix: dict[str, list[int]] = {}
        for token_id in ordered:
            if tokens[token_id]:
                self._specials_by_prefix.setdefault(tokens[token_id][:2], []).append(token_id)
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """The tokenizer of a GGUF file, cached per path (building a 262k vocab takes seconds)."""
        stat = gguf.path.stat()
        return _cached_tokenizer(gguf.path.resolve(), stat.st_size, stat.st_mtime_ns, gguf)

    # -- construction -------------------------------------------------------------------------

    def _special_id(self, metadata: dict, name: str, default: int | None) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{name}_token_id", default)
        if value is None or not 0 <= int(value) < self.vocab_size:
            return default if default is not None and default < self.vocab_size else None
        return int(value)

    def _detect_special_tokens(self, metadata: dict) -> None:
        """Mirror llama.cpp: control-looking texts become control tokens; collect EOG ids."""
        eot_id = metadata.get("tokenizer.ggml.eot_token_id")
        eom_id = metadata.get("tokenizer.ggml.eom_token_id")
        end_ids = {i for i in (self.eos_id, eot_id, eom_id)
                   if i is not None and 0 <= i < self.vocab_size}
        for text in _CONTROL_LOOKING_TEXTS:
            token_id = self._token_to_id.get(text)
            if token_id is None:
                continue
            self.token_types[token_id] = TOKEN_CONTROL
            if text in _END_OF_GENERATION_TEXTS or text in _FIM_END_OF_GENERATION_TEXTS:
                end_ids.add(token_id)
        # gpt-oss / solar-open style vocabs: "<|end|>" ends a message, not the generation.
        texts = {self.tokens[i] for i in end_ids}
        if "<|end|>" in texts and (
            {"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts
        ):
            end_id = self._token_to_id["<|end|>"]
            end_ids.discard(end_id)
            self.token_types[end_id] = TOKEN_USER_DEFINED
        self.end_of_generation_ids: frozenset[int] = frozenset(int(i) for i in end_ids)

    def _build_spm(self, scores: np.ndarray) -> tokenizers.Tokenizer:
        vocab = dict(self._token_to_id)
        has_byte_tokens = "<0x00>" in vocab and "<0xFF>" in vocab
        unk = self.tokens[self.unk_id] if self.unk_id is not None else None
        model = models.BPE(vocab, _spm_merges(self.tokens, scores), unk_token=unk,
                           byte_fallback=has_byte_tokens, fuse_unk=False)
        return tokenizers.Tokenizer(model)

    def _find_pre_tokenizer(self, metadata: dict) -> _PreTokenizer:
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise UnsupportedArchitectureError(
                f"{self._source}: pre-tokenizer {pre!r} is not supported yet; supported: "
                f"{', '.join(sorted(_PRE_TOKENIZERS))}"
            )
        return _PRE_TOKENIZERS[pre]

    def _build_byte_bpe(self, metadata: dict) -> tokenizers.Tokenizer:
        assert self._pre_tokenizer is not None
        merges_text = metadata.get("tokenizer.ggml.merges")
        if not isinstance(merges_text, list):
            raise GGUFFormatError(
                f"{self._source}: byte-level BPE vocabulary without tokenizer.ggml.merges; "
                f"re-convert the model with llama.cpp's convert_hf_to_gguf.py"
            )
        merges = []
        for merge in merges_text:
            split = merge.find(" ", 1)  # llama.cpp splits at the first space after position 0
            merges.append((merge[:split], merge[split + 1 :]) if split > 0 else (merge, ""))
        vocab = dict(self._token_to_id)
        # tokenizers refuses merges whose parts or result are not tokens; llama.cpp would
        # byte-split such results anyway, so they never produce a token id.
        merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
        model = models.BPE(vocab, merges, fuse_unk=False,
                           ignore_merges=self._pre_tokenizer.ignore_merges)
        tokenizer = tokenizers.Tokenizer(model)
        splits = [
            pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False)
            for regex in self._pre_tokenizer.regexes
        ]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        return tokenizer

    # -- encoding -----------------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split text into raw fragments (str) and special token ids, like llama.cpp."""
        present = [
            token_id
            for prefix, group in self._specials_by_prefix.items() if prefix in text
            for token_id in group
            # control and unknown tokens are matched only with parse_special
            if (parse_special or self.token_types[token_id] == TOKEN_USER_DEFINED)
            and self.tokens[token_id] in text
        ]
        present.sort(key=self._special_rank.__getitem__)
        fragments: list[str | int] = [text]
        for token_id in present:
            special = self.tokens[token_id]
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or special not in fragment:
                    split.append(fragment)
                    continue
                pieces = fragment.split(special)
                for index, piece in enumerate(pieces):
                    if index:
                        split.append(token_id)
                    if piece:
                        split.append(piece)
            fragments = split
        return fragments

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids as llama.cpp's llama_tokenize(text, add_special, parse_special)."""
        fragments = self._partition(text, parse_special) if text else []
        output: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            output.append(self.bos_id)
        is_spm = self.model_type == "llama"
        previous_was_special = True
        raw_texts: list[str] = []
        layout: list[int] = []  # token id, or -1 for "the next encoded raw fragment"
        for fragment in fragments:
            if isinstance(fragment, int):
                layout.append(fragment)
                previous_was_special = True
                continue
            if is_spm:
                if self.add_space_prefix and previous_was_special:
                    fragment = " " + fragment
                fragment = fragment.replace(" ", _SPACE_MARK)
            raw_texts.append(fragment)
            layout.append(-1)
            previous_was_special = False
        encoded = iter(self._fragment_tokenizer.encode_batch(raw_texts, add_special_tokens=False)
                       if raw_texts else [])
        for item in layout:
            output.extend(next(encoded).ids if item < 0 else (item,))
        if add_special and self.add_eos and self.eos_id is not None:
            output.append(self.eos_id)
        return output

    # -- decoding -----------------------------------------------------------------------------

    def is_special(self, token_id: int) -> bool:
        """Control and unknown tokens: what llama.cpp hides unless asked to render specials."""
        return int(self.token_types[token_id]) in (TOKEN_CONTROL, TOKEN_UNKNOWN)

    def piece(self, token_id: int) -> bytes:
        """Raw bytes of one token, as llama_token_to_piece(..., special=True)."""
        cached = self._pieces.get(token_id)
        if cached is not None:
            return cached
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        text = self.tokens[token_id]
        token_type = int(self.token_types[token_id])
        if token_type in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            piece = text.encode("utf-8", "surrogateescape")
        elif token_type == TOKEN_BYTE:
            piece = bytes([int(text[3:5], 16)]) if len(text) == 6 else text.encode()
        elif token_type == TOKEN_NORMAL:
            if self.model_type == "llama":
                piece = text.replace(_SPACE_MARK, " ").encode("utf-8", "surrogateescape")
            else:
                alphabet = _byte_level_alphabet()
                piece = bytes(alphabet[char] for char in text if char in alphabet)
        else:
            piece = b""  # unused / undefined tokens render as nothing, as in llama.cpp
        self._pieces[token_id] = piece
        return piece

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ids, as llama_detokenize(remove_special=skip_special, unparse_special=not skip).

        skip_special drops control tokens, a leading BOS and a trailing EOS the encoder added.
        """
        ids = list(ids)
        strip_leading_space = self.model_type == "llama" and self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            ids = ids[1:]
            strip_leading_space = False  # llama.cpp keeps the space after a removed BOS
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        pieces = [b"" if skip_special and self.is_special(i) else self.piece(i) for i in ids]
        if strip_leading_space and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # the space the encoder prepended
        data = bytearray(b"".join(pieces))
        if self._pre_tokenizer is not None and self._pre_tokenizer.clean_spaces:
            data = _clean_up_spaces(data)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


_TOKENIZER_CACHE: dict[tuple[Path, int, int], Tokenizer] = {}
_TOKENIZER_CACHE_LOCK = threading.Lock()


def _cached_tokenizer(path: Path, size: int, mtime_ns: int, gguf: GGUFFile) -> Tokenizer:
    """One Tokenizer per (file, size, mtime): a rewritten file gets a fresh tokenizer."""
    key = (path, size, mtime_ns)
    with _TOKENIZER_CACHE_LOCK:
        tokenizer = _TOKENIZER_CACHE.get(key)
        if tokenizer is None:
            tokenizer = Tokenizer(gguf.metadata, str(gguf.path))
            _TOKENIZER_CACHE[key] = tokenizer
        return tokenizer
