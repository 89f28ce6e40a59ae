"""The batching engine: requests with different prefixes, prompt lengths and lengths to generate
share one `generate()` call, one prefix per row.

Batching happens at micro-batch boundaries: a worker thread takes up to ``max_batch_size``
waiting requests that can share a decoding mode (greedy together; sampling with the same
temperature/top-p together; a seeded sampling request alone, so its seed means what it says),
generates for the longest ``max_tokens`` among them, and hands each request its own tokens,
cut at its own ``max_tokens`` or end-of-sequence. Requests arriving meanwhile join the next
micro-batch. Each row runs with the prefix snapshot its request was admitted with (keys/values,
and hybrid models' states), so later uploads, replacements or deletions never touch it. A
request cancelled while its micro-batch runs stops streaming at once; its row is marked done,
and the micro-batch ends early once all its rows are done. Because
left padding and per-row prefixes are exact (see `injection`), a greedy request gets the same
tokens as it would alone. ``mix_prefixes=False`` batches only requests of
the same prefix: the "one prefix at a time" baseline the load test compares against.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..data import pad_batch, padding_side
from ..model import PrefixModel
from ..names import BASE_NAME
from .interface import EngineClosed, EngineStats, end_request, new_counts
from .requests import Request, Token

logger = logging.getLogger(__name__)


class _RowStreamer(BaseStreamer, StoppingCriteria):
    """Routes each step's new tokens ``[B]`` to the rows' requests, and tells `generate` which
    rows are done (end of sequence, their own ``max_tokens``, or ended meanwhile by `cancel`)."""

    def __init__(self, requests: list[Request], eos_token_id: int | None, counts: dict[str, int]) -> None:
        self.requests = requests
        self.counts = counts
        self.eos = eos_token_id
        self.done = [False] * len(requests)
        self.stopped = [False] * len(requests)  # ended by end of sequence
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.counts["computed_tokens"] += len(self.requests)
        for row, token in enumerate(value.reshape(len(self.requests), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            request = self.requests[row]
            if token == self.eos:
                self.done[row] = self.stopped[row] = True
            elif not request.emit(Token(token)) or len(request.tokens) >= request.max_tokens:
                self.done[row] = True

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [d or r.ended for d, r in zip(self.done, self.requests, strict=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # [B]


class BatchingEngine:
    """The micro-batch engine (encoder-decoders, and the benchmark's baseline); implements
    `interface.Engine`. Differs from `ContinuousEngine`: no log-probabilities, and rows join only
    at micro-batch boundaries."""

    name = "microbatch"
    supports_logprobs = False

    def __init__(
        self,
        model: PrefixModel,
        tokenizer,
        *,
        max_batch_size: int = 16,
        mix_prefixes: bool = True,
        wait_seconds: float = 0.005,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lock = threading.RLock()  # held while generating; `exclusive` for others using the model
        self.max_batch_size = max_batch_size
        self.mix_prefixes = mix_prefixes
        self.wait_seconds = wait_seconds  # a moment for concurrent requests to arrive together
        self.encoder_decoder = model.base_model.config.is_encoder_decoder
        self.pending: list[Request] = []
        self.batch: list[Request] = []  # the micro-batch being generated
        self.condition = threading.Condition()
        self.counts = new_counts()
        self.running = False
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the interface
    def start(self) -> BatchingEngine:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="prefixtune-engine", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        with self.condition:
            self.running = False
            left, self.pending = [*self.pending, *self.batch], []
            self.condition.notify_all()
        for request in left:  # a running micro-batch then ends at its next step
            end_request(request, EngineClosed("the engine was closed before this request ended"), self.counts)
        if self.thread:
            self.thread.join(timeout=30)

    def submit(self, request: Request) -> Future:
        with self.condition:
            if not self.running:
                raise EngineClosed("the micro-batch engine is not running")
            self.pending.append(request)
            self.counts["requests"] += 1
            self.condition.notify()
        return request.future

    def cancel(self, request: Request, error: Exception | None = None) -> None:
        """End the request now (see `interface.Engine.cancel`); a running row is marked done, and
        its micro-batch ends early once all its rows are."""
        with self.condition:
            if request in self.pending:
                self.pending.remove(request)
        end_request(request, error or "cancelled", self.counts)

    def stats(self) -> EngineStats:
        healthy = self.running and self.thread is not None and self.thread.is_alive()
        return EngineStats(
            engine=self.name,
            healthy=healthy,
            queue_depth=len(self.pending),
            running_rows=len(self.batch),
            **self.counts,
        )

    def reset_prefix_cache(self) -> None:
        """None: every request computes its own prompt; no blocks are kept across requests."""
        return None

    def exclusive(self) -> threading.RLock:
        """Hold the model between micro-batches (to run it for something else)."""
        return self.lock

    # ------------------------------------------------------------------ the worker
    def _take_batch(self) -> list[Request]:
        with self.condition:
            while self.running and not self.pending:
                self.condition.wait()
            if not self.running:
                return []
        time.sleep(self.wait_seconds)
        with self.condition:
            if not self.pending:  # all cancelled meanwhile
                return []
            first = self.pending[0]
            same = [
                r for r in self.pending if r.mode() == first.mode() and (self.mix_prefixes or r.prefix == first.prefix)
            ][: self.max_batch_size]
            taken = {id(r) for r in same}
            self.pending = [r for r in self.pending if id(r) not in taken]
            self.batch = same
            return same

    def _loop(self) -> None:
        while self.running:
            batch = self._take_batch()
            if not batch:
                continue
            try:
                batch = self._servable(batch)
                if batch:
                    with self.lock:
                        self._run(batch)
            except Exception as error:  # one bad batch must not kill the server
                logger.exception("a micro-batch of %d rows failed; its requests fail, the engine goes on", len(batch))
                for request in batch:
                    end_request(request, error, self.counts)
            finally:
                self.batch = []

    def _servable(self, batch: list[Request]) -> list[Request]:
        """The rows with their prefix snapshot (for a request admitted without one, taken now from
        the model's own prefixes by name); a row whose prefix fails fails alone."""
        kept = []
        for request in batch:
            try:
                if request.prefix != BASE_NAME and request.prefix_inputs is None:
                    with self.lock, torch.no_grad():  # a hidden prefix runs the base
                        request.prefix_inputs = self.model.prefix_arguments.row(self.model.prefix(request.prefix))
                kept.append(request)
            except Exception as error:  # noqa: BLE001 - reported to that request only
                logger.exception("prefix %r of a request could not be prepared; that request fails", request.prefix)
                end_request(request, error, self.counts)
        return kept

    def _run(self, batch: list[Request]) -> None:
        side = padding_side(self.encoder_decoder)
        inputs = pad_batch([{"input_ids": r.prompt_ids} for r in batch], self.tokenizer.pad_token_id, side)
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        first = batch[0]
        options = {
            "max_new_tokens": max(r.max_tokens for r in batch),
            "num_beams": 1,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if first.temperature > 0:
            options |= {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
            if first.seed is not None:
                torch.manual_seed(first.seed)
        else:
            options["do_sample"] = False
        streamer = _RowStreamer(batch, self.tokenizer.eos_token_id, self.counts)
        prefixes = self.model.prefix_arguments.batch([r.prefix_inputs for r in batch])  # the admitted snapshots
        with torch.no_grad():
            self.model.base_model.generate(
                **inputs, **prefixes, streamer=streamer, stopping_criteria=StoppingCriteriaList([streamer]), **options
            )
        self.counts["batches"] += 1
        self.counts["batch_rows"] += len(batch)
        for request, stopped in zip(batch, streamer.stopped, strict=True):
            end_request(request, "stop" if stopped else "length", self.counts)
