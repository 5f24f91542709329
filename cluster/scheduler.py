"""Continuous batching: one engine thread runs `schedule -> execute -> update` over many requests.

    scheduler = Scheduler(runner, tokenizer, n_ctx, SchedulerConfig(max_num_seqs=8))
    scheduler.start()
    handle = scheduler.submit(GenerationRequest(prompt_ids, 64, (SamplingParams(0),)), loop)
    output = await handle.outputs.get()   # SequenceOutput deltas, the last has finish_reason

Each sequence owns one of the runner's KV-cache slots from admission to finish. A step is
one runner call holding a decode step of every decoding sequence and the next prompt chunks of
sequences still prefilling, as many as fit in max_num_batched_tokens (the first one always,
so a prompt is never starved). The runner computes every token row as it would be alone
(worker/batch.py), and prompts are cut at fixed multiples of max_num_batched_tokens, so a
sequence's logits never depend on what else is running. A burst of requests is prefilled in
one step instead of one step each, and a long prompt delays decoding by one chunk per step
instead of stalling it.

Requests arrive from the asyncio thread (`submit`, `cancel`); outputs go back through
`loop.call_soon_threadsafe` into each request's asyncio.Queue. The engine thread sleeps on a
condition variable when idle: no polling.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cluster.engine import PENALTY_LAST_N
from cluster.errors import NumoeError
from cluster.metrics import ServingStats
from cluster.sampling import Sampler, SamplingParams
from cluster.tokenizer import StreamDecoder, Tokenizer
from worker.batch import SequenceChunk


class BatchRunner(Protocol):
    """What the scheduler needs of a forward pass (worker/batch.py's contract)."""

    n_slots: int

    def forward_batch(self, chunks: Sequence[SequenceChunk]) -> np.ndarray:
        """Last-token logits per chunk: float32 [len(chunks), vocab]."""
        ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8  # KV-cache slots: sequences decoding or prefilling at once
    max_num_batched_tokens: int = 512  # prefill chunk size in tokens
    max_queued_requests: int = 64  # requests waiting for a slot; beyond that, refused


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: tuple[SamplingParams, ...]  # one per sequence: n = len(sampling)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = off; k = the sampled token's logprob and the top k


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SequenceOutput:
    """What one sequence produced since its last output."""

    index: int  # which of the request's n sequences
    text: str  # new text (held back while it could still become a stop string)
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]  # one per token id when logprobs were asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    completion_tokens: int = 0  # tokens generated so far, end-of-generation token included
    error: str | None = None


class QueueFullError(NumoeError):
    """No free slot and the waiting queue is at --max-queued-requests."""


class RequestHandle:
    """The asyncio side of one request: read `outputs`, call `cancel()` when the client goes."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 scheduler: Scheduler) -> None:
        self.request = request
        self.outputs: asyncio.Queue[SequenceOutput] = asyncio.Queue()
        self._loop = loop
        self._scheduler = scheduler
        self.cancelled = False

    def cancel(self) -> None:
        self._scheduler.cancel(self)

    def _put(self, output: SequenceOutput) -> None:
        try:
            self._loop.call_soon_threadsafe(self.outputs.put_nowait, output)
        except RuntimeError:  # the event loop closed (server shutting down): nobody listens
            pass


@dataclass(eq=False)  # identity: queues remove this very sequence
class _Sequence:
    handle: RequestHandle
    index: int
    sampler: Sampler
    decoder: StreamDecoder
    arrived_s: float
    slot: int = -1
    n_computed: int = 0  # tokens in this slot's KV cache
    generated: list[int] = field(default_factory=list)
    text: str = ""  # all text decoded so far (cut at a stop string)
    emitted_chars: int = 0
    last_token_s: float = 0.0
    finish_reason: str | None = None

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.handle.request.prompt_ids


class Scheduler:
    """Owns the runner: only the engine thread calls it once `start()` has run."""

    def __init__(self, runner: BatchRunner | object, tokenizer: Tokenizer, n_ctx: int,
                 config: SchedulerConfig, stats: ServingStats | None = None) -> None:
        if not hasattr(runner, "forward_batch"):
            raise NumoeError(f"{type(runner).__name__} cannot run several sequences at once "
                             "(no forward_batch); serve with the single-process engine")
        n_slots = int(getattr(runner, "n_slots", 1))
        if config.max_num_seqs > n_slots:
            raise NumoeError(f"--max-num-seqs {config.max_num_seqs} exceeds the runner's "
                             f"{n_slots} KV-cache slots; build the engine with n_slots >= it")
        if config.max_num_batched_tokens < 1:
            raise NumoeError("--max-num-batched-tokens must be at least 1")
        self.runner: BatchRunner = runner  # type: ignore[assignment]  # checked just above
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.config = config
        self.stats = stats if stats is not None else ServingStats()
        self.lock = threading.Lock()  # guards the queues below, `stats` and handle flags
        self._wake = threading.Condition(self.lock)
        self._free_slots = list(range(config.max_num_seqs))
        self._waiting: deque[_Sequence] = deque()  # admitted to the queue, no slot yet
        self._prefilling: deque[_Sequence] = deque()  # has a slot, prompt not fully computed
        self._decoding: list[_Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._stop_ids = tokenizer.end_of_generation_ids

    # --- the asyncio side -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="numoe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest,
               loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue a request; raises QueueFullError when it can neither start now nor wait."""
        handle = RequestHandle(request, loop, self)
        arrived = time.monotonic()
        with self.lock:
            if not self.alive:
                raise NumoeError("the engine thread is not running")
            n = len(request.sampling)
            starts_now = len(self._free_slots) - len(self._waiting) >= n
            queued_requests = len({id(seq.handle) for seq in self._waiting})
            if not starts_now and queued_requests >= self.config.max_queued_requests:
                raise QueueFullError(
                    f"the server is busy: {self.config.max_num_seqs} sequences running and "
                    f"{queued_requests} requests queued (--max-queued-requests); retry later")
            for index, params in enumerate(request.sampling):
                self._waiting.append(_Sequence(handle, index, Sampler(params),
                                               self.tokenizer.stream_decoder(), arrived))
            self._update_gauges()
            self._wake.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self.lock:
            handle.cancelled = True
            self._wake.notify()

    # --- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    self._drop_cancelled()
                    self._admit()
                    step = self._schedule()
                    if step is None:
                        if self._stopping:
                            return
                        self._wake.wait()
                        continue
                sequences, chunks = step
                logits = self.runner.forward_batch(chunks)  # [len(chunks), vocab]
                self._update(sequences, chunks, logits)
        except BaseException as error:  # the server reports it at /health and to every client
            self.error = error
            with self.lock:
                for seq in [*self._waiting, *self._prefilling, *self._decoding]:
                    seq.handle._put(SequenceOutput(seq.index, "", (), (), "error",
                                                   len(seq.generated), error=repr(error)))
                self._waiting.clear()
                self._prefilling.clear()
                self._decoding.clear()
            if not isinstance(error, NumoeError):
                raise  # a bug: let the thread print its traceback
            # A known failure (e.g. a cluster worker died): /health and every client have it.

    def _drop_cancelled(self) -> None:
        for queue in (self._waiting, self._prefilling):
            for seq in [s for s in queue if s.handle.cancelled]:
                queue.remove(seq)
                self._finish(seq, "abort", emit=False)
        for seq in [s for s in self._decoding if s.handle.cancelled]:
            self._decoding.remove(seq)
            self._finish(seq, "abort", emit=False)

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = self._free_slots.pop()
            self.stats.request_queue_time_seconds.append(now - seq.arrived_s)
            self._prefilling.append(seq)

    def _schedule(self) -> tuple[list[_Sequence], list[SequenceChunk]] | None:
        """(sequences, their chunks) of the next step, or None when idle: a decode step of
        every decoding sequence, then prompt chunks while the token budget lasts."""
        sequences = list(self._decoding)
        chunks = [SequenceChunk(s.slot, s.n_computed, (s.generated[-1],)) for s in sequences]
        budget = self.config.max_num_batched_tokens - len(chunks)
        size = self.config.max_num_batched_tokens
        for i, seq in enumerate(self._prefilling):
            # Chunks end at multiples of the chunk size whatever else is running.
            end = min((seq.n_computed // size + 1) * size, len(seq.prompt))
            n_tokens = end - seq.n_computed
            if i > 0 and n_tokens > budget:
                break
            sequences.append(seq)
            chunks.append(SequenceChunk(seq.slot, seq.n_computed,
                                        tuple(seq.prompt[seq.n_computed:end])))
            budget -= n_tokens
        return (sequences, chunks) if chunks else None

    def _update(self, sequences: list[_Sequence], chunks: list[SequenceChunk],
                logits: np.ndarray) -> None:
        """Advance every sequence of the step; those whose prompt is done sample a token from
        their row of logits [len(chunks), vocab]."""
        now = time.monotonic()
        prompt_tokens = 0
        sampling: list[tuple[_Sequence, np.ndarray]] = []  # decode steps, then done prompts
        prompts_done: list[tuple[_Sequence, np.ndarray]] = []
        for seq, chunk, row in zip(sequences, chunks, logits, strict=True):
            prefill = seq.n_computed < len(seq.prompt)
            seq.n_computed += len(chunk.token_ids)
            if not prefill:
                sampling.append((seq, row))
            else:
                prompt_tokens += len(chunk.token_ids)
                if seq.n_computed == len(seq.prompt):
                    prompts_done.append((seq, row))
        with self.lock:
            self.stats.prompt_tokens_total += prompt_tokens
            for seq, row in prompts_done:
                self._prefilling.remove(seq)
                if seq.handle.cancelled:
                    self._finish(seq, "abort", emit=False)
                else:
                    sampling.append((seq, row))
        for seq, row in sampling:
            self._next_token(seq, row, now)
        with self.lock:
            self._decoding += [s for s, _ in prompts_done if s.finish_reason is None]
            self._decoding = [s for s in self._decoding if s.finish_reason is None]
            self._update_gauges()

    def _next_token(self, seq: _Sequence, logits: np.ndarray, now: float) -> None:
        """Sample, decode, check stops, emit: logits [vocab] of the position after the
        sequence's last computed token."""
        request = seq.handle.request
        history = [*seq.prompt[-PENALTY_LAST_N:], *seq.generated][-PENALTY_LAST_N:]
        token_id = seq.sampler.sample(logits, history)
        logprobs = () if request.logprobs is None else (
            _logprobs(logits, token_id, request.logprobs),)
        seq.generated.append(token_id)
        with self.lock:
            self.stats.generation_tokens_total += 1
            if len(seq.generated) == 1:
                self.stats.time_to_first_token_seconds.append(now - seq.arrived_s)
            else:
                self.stats.inter_token_latency_seconds.append(now - seq.last_token_s)
        seq.last_token_s = now

        reason = None
        if token_id in self._stop_ids:
            reason = "stop"
            seq.text += seq.decoder.flush()
        else:
            previous_len = len(seq.text)
            seq.text += seq.decoder.feed(token_id)
            if _cut_at_stop(seq, previous_len):
                reason = "stop"
            elif (len(seq.generated) >= request.max_tokens
                  or seq.n_computed + 1 >= self.n_ctx):
                reason = "length"
                seq.text += seq.decoder.flush()
        if reason is not None:
            seq.finish_reason = reason
        hold = 0 if reason is not None else max((len(s) for s in request.stop), default=1) - 1
        safe = max(seq.emitted_chars, len(seq.text) - hold)
        delta = seq.text[seq.emitted_chars:safe]
        seq.emitted_chars = safe
        if reason is None:
            seq.handle._put(SequenceOutput(seq.index, delta, (token_id,), logprobs, None,
                                           len(seq.generated)))
        else:
            with self.lock:
                self._finish(seq, reason, emit=True, delta=delta, token_ids=(token_id,),
                             logprobs=logprobs)

    def _finish(self, seq: _Sequence, reason: str, emit: bool, delta: str = "",
                token_ids: tuple[int, ...] = (), logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        """Free the slot and count the request (call with the lock held)."""
        seq.finish_reason = reason
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1
        self.stats.request_success_total[reason] = \
            self.stats.request_success_total.get(reason, 0) + 1
        self.stats.e2e_request_latency_seconds.append(time.monotonic() - seq.arrived_s)
        if emit:
            seq.handle._put(SequenceOutput(seq.index, delta, token_ids, logprobs, reason,
                                           len(seq.generated)))

    def _update_gauges(self) -> None:
        s = self.stats
        s.num_requests_running = len(self._prefilling) + len(self._decoding)
        s.num_requests_waiting = len(self._waiting)
        used = sum(seq.n_computed for seq in [*self._prefilling, *self._decoding])
        s.kv_cache_usage = used / (self.config.max_num_seqs * self.n_ctx)


def _cut_at_stop(seq: _Sequence, previous_len: int) -> bool:
    """Cut seq.text before the first stop string that ends in the new text; True if cut."""
    stops = seq.handle.request.stop
    if not stops:
        return False
    search_from = max(0, previous_len - max(len(s) for s in stops) + 1)
    hits = [i for i in (seq.text.find(s, search_from) for s in stops) if i >= 0]
    if not hits:
        return False
    seq.text = seq.text[:min(hits)]
    return True


def _logprobs(logits: np.ndarray, token_id: int, top_k: int) -> TokenLogprob:
    """Log-probabilities of the model's raw distribution (before penalties and filters, as
    vLLM reports them). logits: [vocab]."""
    values = logits.astype(np.float64)  # [vocab]
    peak = values.max()
    log_total = peak + np.log(np.exp(values - peak).sum())
    top: tuple[tuple[int, float], ...] = ()
    if top_k > 0:
        ids = np.argpartition(-values, top_k - 1)[:top_k]  # [k] unordered
        ids = ids[np.argsort(-values[ids], kind="stable")]
        top = tuple((int(i), float(values[i] - log_total)) for i in ids)
    return TokenLogprob(token_id, float(values[token_id] - log_total), top)
