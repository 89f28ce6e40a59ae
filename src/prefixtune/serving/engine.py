"""The batching engine: requests with different prefixes, prompt lengths and lengths to generate
share one `generate()` call, one prefix per row.

Batching happens at micro-batch boundaries: a worker thread takes up to ``max_batch_size``
waiting requests that can share a decoding mode (greedy together; sampling with the same
temperature/top-p together; a seeded sampling request alone, so its seed means what it says),
generates for the longest ``max_tokens`` among them, and hands each request its own tokens,
cut at its own ``max_tokens`` or end-of-sequence. Requests arriving meanwhile join the next
micro-batch. Each row runs with the prefix snapshot its request was admitted with (keys/values,
and hybrid models' states), so later uploads, replacements or deletions never touch it. Because
left padding and per-row prefixes are exact (see `injection`), a greedy request gets the same
tokens as it would alone. ``mix_prefixes=False`` batches only requests of
the same prefix: the "one prefix at a time" baseline the load test compares against.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import torch
from transformers.generation.streamers import BaseStreamer

from ..data import pad_batch, padding_side
from ..model import PrefixModel
from ..names import BASE_NAME
from .requests import Completion, Request, Token
from .store import PrefixStore


class _RowStreamer(BaseStreamer):
    """Routes each step's new tokens ``[B]`` to the rows' own queues and notes where rows end."""

    def __init__(self, requests: list[Request], eos_token_id: int | None, stats: dict[str, int]) -> None:
        self.requests = requests
        self.stats = stats
        self.eos = eos_token_id
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.done = [False] * len(requests)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.stats["computed_tokens"] += len(self.requests)
        for row, token in enumerate(value.reshape(len(self.requests), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            request = self.requests[row]
            if token == self.eos:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            if request.channel is not None:
                request.channel.put(Token(token))
            if len(self.tokens[row]) >= request.max_tokens:
                self.done[row] = True

    def end(self) -> None:
        pass


class BatchingEngine:
    """The micro-batch engine (encoder-decoders, and the benchmark's baseline). Differs from
    `ContinuousEngine`: no log-probabilities, and a request can be cancelled only before its
    micro-batch starts."""

    name = "microbatch"
    supports_logprobs = False

    def __init__(
        self,
        model: PrefixModel,
        tokenizer,
        store: PrefixStore | None = None,
        max_batch_size: int = 16,
        mix_prefixes: bool = True,
        wait_seconds: float = 0.005,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.lock = threading.RLock()  # held while generating; `exclusive` for others using the model
        self.max_batch_size = max_batch_size
        self.mix_prefixes = mix_prefixes
        self.wait_seconds = wait_seconds  # a moment for concurrent requests to arrive together
        self.encoder_decoder = model.base_model.config.is_encoder_decoder
        self.pending: list[Request] = []
        self.condition = threading.Condition()
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "generated_tokens": 0, "computed_tokens": 0, "errors": 0}
        self.running = False
        self.running_batch = 0
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> BatchingEngine:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="prefixtune-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.condition:
            self.running = False
            self.condition.notify_all()
        if self.thread:
            self.thread.join(timeout=30)

    def submit(self, request: Request) -> Future:
        with self.condition:
            self.pending.append(request)
            self.stats["requests"] += 1
            self.condition.notify()
        return request.future

    def generate(self, request: Request, timeout: float | None = None) -> Completion:
        return self.submit(request).result(timeout)

    def cancel(self, request: Request) -> None:
        """Drop the request if its micro-batch has not started (a started one runs to its end)."""
        with self.condition:
            if request in self.pending:
                self.pending.remove(request)
                self._end(request, Completion([], "cancelled"))

    def exclusive(self) -> threading.RLock:
        """Hold the model between micro-batches (to run it for something else)."""
        return self.lock

    @property
    def healthy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def computed_tokens(self) -> int:
        return self.stats["computed_tokens"]

    def queue_depth(self) -> int:
        return len(self.pending)

    def running_rows(self) -> int:
        return self.running_batch

    @staticmethod
    def _end(request: Request, result: Completion | Exception) -> None:
        if request.channel is not None:
            request.channel.put(None)
        if request.future.done():
            return
        if isinstance(result, Exception):
            request.future.set_exception(result)
        else:
            request.future.set_result(result)

    # ------------------------------------------------------------------ the worker
    def _take_batch(self) -> list[Request]:
        with self.condition:
            while self.running and not self.pending:
                self.condition.wait()
            if not self.running:
                return []
        time.sleep(self.wait_seconds)
        with self.condition:
            first = self.pending[0]
            same = [
                r for r in self.pending if r.mode() == first.mode() and (self.mix_prefixes or r.prefix == first.prefix)
            ][: self.max_batch_size]
            taken = {id(r) for r in same}
            self.pending = [r for r in self.pending if id(r) not in taken]
            return same

    def _loop(self) -> None:
        while self.running:
            batch = self._take_batch()
            if not batch:
                continue
            self.running_batch = len(batch)
            try:
                batch = self._servable(batch)  # before the lock: the store takes its own lock, then this one
                with self.lock:
                    completions = self._run(batch) if batch else []
            except Exception as error:  # one bad batch must not kill the server
                self.stats["errors"] += len(batch)
                for request in batch:
                    self._end(request, error)
                continue
            finally:
                self.running_batch = 0
            for request, completion in zip(batch, completions, strict=True):
                self._end(request, completion)

    def _servable(self, batch: list[Request]) -> list[Request]:
        """The rows with their prefix snapshot (taken now from the store, or from the model by name,
        for requests admitted without one); a row whose prefix fails fails alone."""
        kept = []
        for request in batch:
            try:
                if request.prefix != BASE_NAME and request.prefix_inputs is None:
                    request.prefix_inputs = self._snapshot(request.prefix)
                kept.append(request)
            except Exception as error:  # noqa: BLE001 - reported to that request only
                self.stats["errors"] += 1
                self._end(request, error)
        return kept

    def _snapshot(self, name: str):
        if self.store is not None:
            return self.store.snapshot(name)
        with self.lock, torch.no_grad():  # a hidden prefix runs the base
            return self.model.prefix_arguments.row(self.model.prefix(name))

    def _run(self, batch: list[Request]) -> list[Completion]:
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
        streamer = _RowStreamer(batch, self.tokenizer.eos_token_id, self.stats)
        prefixes = self.model.prefix_arguments.batch([r.prefix_inputs for r in batch])  # the admitted snapshots
        with torch.no_grad():
            self.model.base_model.generate(**inputs, **prefixes, streamer=streamer, **options)
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        completions = []
        for request, tokens, done in zip(batch, streamer.tokens, streamer.done, strict=True):
            self.stats["generated_tokens"] += len(tokens)
            stopped = done and len(tokens) < request.max_tokens
            completions.append(Completion(tokens, "stop" if stopped else "length", [Token(t) for t in tokens]))
        return completions
