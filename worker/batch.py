"""Continuous batching: several sequences in one forward pass, each in its own KV-cache slot.

A runner keeps `n_slots` independent KV caches. A call to `forward_batch` takes chunks, each a
run of consecutive tokens of one sequence: a prefill chunk (several tokens) or a decode step
(one token), in any mix. A slot needs no explicit free: a chunk starting at position 0
overwrites its slot from the start (keys at later positions are never read, since a query at
p sees keys [0, p]), which is how a finished sequence's slot is given to a new request.

Batch invariance: a sequence's logits must not depend on what else shares the call. The plain
products choose a kernel by token count (native/src/gemm.h: the float GEMM from 4-12 tokens,
the 8-bit vec_dot or row x token tiles below), so forward_batch runs every token row through
the products a lone decode step takes (Backend.*_rows), prefill chunks included: each row's
result depends on that row alone, attention runs per chunk on its own slot, and the LM head
takes each chunk's last row. One pass per call, however decode steps and prompts mix.
`forward(ids, start)` (generation, perplexity, benchmarks) keeps the prompt GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.errors import NumoeError


@dataclass(frozen=True)
class SequenceChunk:
    slot: int  # KV-cache slot of the sequence, 0 <= slot < runner.n_slots
    start: int  # position of token_ids[0] in that sequence
    token_ids: tuple[int, ...]  # >= 1 tokens (a decode step: 1; a prefill chunk: several)


def check_chunks(chunks: Sequence[SequenceChunk], n_slots: int, n_ctx: int,
                 vocab_size: int | None = None) -> None:
    """Raise NumoeError naming the first bad chunk: no chunks, a slot out of range or used
    twice, no tokens, positions outside [0, n_ctx), token ids outside the vocabulary."""
    if len(chunks) == 0:
        raise NumoeError("forward_batch needs at least one sequence chunk")
    seen: set[int] = set()
    for i, chunk in enumerate(chunks):
        if not 0 <= chunk.slot < n_slots:
            raise NumoeError(f"chunk {i}: slot {chunk.slot} is outside [0, {n_slots}); start the "
                             f"runner with more slots (n_slots) or reuse a finished one")
        if chunk.slot in seen:
            raise NumoeError(f"chunk {i}: slot {chunk.slot} appears twice in one call; send one "
                             f"chunk per sequence per call")
        seen.add(chunk.slot)
        n_tokens = len(chunk.token_ids)
        if n_tokens == 0:
            raise NumoeError(f"chunk {i} (slot {chunk.slot}) has no tokens; send at least one")
        if chunk.start < 0 or chunk.start + n_tokens > n_ctx:
            raise NumoeError(f"chunk {i} (slot {chunk.slot}): positions [{chunk.start}, "
                             f"{chunk.start + n_tokens}) exceed the context of {n_ctx}; "
                             f"end the sequence or raise n_ctx")
        if vocab_size is not None:
            bad = [t for t in chunk.token_ids if not 0 <= t < vocab_size]
            if bad:
                raise NumoeError(f"chunk {i} (slot {chunk.slot}): token ids {bad[:5]} are "
                                 f"outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class Span:
    """One chunk of a ShardRunner.forward_batch call: rows [r0, r1) of the activations."""

    slot: int
    start: int  # position of row r0 in the slot's sequence
    r0: int
    r1: int


def chunk_spans(slots: Sequence[int], starts: Sequence[int], lengths: Sequence[int],
                n_tokens: int, n_slots: int, n_ctx: int, logits: str, rows: bool) -> list[Span]:
    """The chunks of one pass as row ranges, checked (ValueError names the bad one): with
    rows (the batch-invariant products), chunks of any lengths of distinct slots; without,
    one chunk."""
    if not len(slots) == len(starts) == len(lengths) >= 1:
        raise ValueError(f"forward_batch takes one slot, start and length per chunk, at least "
                         f"one chunk; got {len(slots)}, {len(starts)}, {len(lengths)}")
    if sum(lengths) != n_tokens:
        raise ValueError(f"the chunks' lengths sum to {sum(lengths)} but {n_tokens} tokens came")
    if len(lengths) > 1 and not rows:
        raise ValueError("several chunks in one pass need the batch-invariant products "
                         "(rows=True): the prompt GEMM would mix their tokens")
    if logits != "last" and (rows or len(lengths) > 1):
        raise ValueError("logits of every token need a pass of one chunk without rows")
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots {list(slots)} repeat; one chunk per sequence per pass")
    spans = []
    row = 0
    for slot, start, length in zip(slots, starts, lengths, strict=True):
        if not 0 <= slot < n_slots:
            raise ValueError(f"slot {slot} is outside [0, {n_slots})")
        if length < 1 or start < 0 or start + length > n_ctx:
            raise ValueError(f"positions [{start}, {start + length}) of slot {slot} exceed the "
                             f"context of {n_ctx}")
        spans.append(Span(int(slot), int(start), row, row + int(length)))
        row += int(length)
    return spans
