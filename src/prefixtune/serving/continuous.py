"""The continuous-batching engine: transformers' `ContinuousBatchingManager` with a prefix per request.

How it differs from transformers' engine (nothing is forked; three small subclasses):

* `PrefixScheduler` (FIFO, registered in ``SCHEDULER_MAPPING`` as ``"prefixtune"``): before a
  request's first prefill it writes the request's own prefix keys/values ``[layers, 2, kv_heads,
  P, head_dim]`` into the request's paged cache blocks and starts its positions at P. The prefix
  owns positions ``0..P-1`` exactly as in `PrefixModel`, so the text attends to it like to any
  earlier token. Block sharing is off: two requests never share a block, so prefixes never mix.
* `PerRequestSampling` (the batch's `ModelRunner`): samples each row by its own request's options:
  greedy is a plain argmax (token-identical to ``PrefixModel.generate``), sampling uses the
  request's own temperature, top-p and seeded generator, and log-probabilities are recorded per row.
* `PrefixBatchingManager`: builds the two above, forces synchronous batching and keeps serving
  after one failed step (the batch's rows fail, nothing else).

Iteration-level batching and chunked prefill are transformers': every step decodes all running
rows and spends the rest of ``max_batch_tokens`` on prefill chunks, so a long prompt never stalls
decoding and a new request joins at the next step. While the engine runs, the base model runs on
`paged_attention.PAGED_ATTENTION`: per-request ``sdpa`` over each request's own cache span (the prefix
arrives through the cache, not through prefixtune's attention hook), instead of transformers'
dense mask over all rows' keys.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import continuous_api
from transformers.generation.continuous_batching.model_runner import ModelRunner
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestState, RequestStatus
from transformers.generation.continuous_batching.scheduler import FIFOScheduler

from ..injection import UnsupportedModelError, model_kind
from ..injection.positions import counts_own_positions, first_position
from ..model import PrefixModel
from ..prefix_arguments import KEY_VALUES
from ..transformers_private import (
    add_result_handler,
    allocator_layers,
    attn_implementation,
    batch_requests,
    clear_batch_requests,
    prefill_offset,
    register_scheduler,
    set_prefill_offset,
    supports_sdpa,
)
from .interface import EngineClosed, EngineStats, end_request, new_counts
from .paged_attention import PAGED_ATTENTION
from .requests import Request, Token

logger = logging.getLogger(__name__)
SCHEDULER_NAME = "prefixtune"


@dataclass
class _Live:
    """The engine's view of one admitted request (touched only by the generation thread once admitted)."""

    request: Request
    generator: torch.Generator | None
    tokens: list[Token]  # one per sampled token, aligned with the request's generated tokens
    sent: int = 0  # generated tokens already emitted
    error: Exception | None = None  # this row failed (in our per-row code): it ends with this error


class PrefixScheduler(FIFOScheduler):
    """FIFO scheduling that gives each request its prefix before its first prefill (see module doc)."""

    live: dict[str, _Live]  # set by the engine right after construction

    def _get_waiting_candidates(self) -> list[RequestState]:
        room = max(self.max_requests_per_batch - len(self.active_requests), 0)
        ready = []
        for state in super()._get_waiting_candidates()[:room]:
            if prefill_offset(state) == 0 and not self._write_prefix(state):
                break  # no cache left for this prefix: keep FIFO order, try again next step
            ready.append(state)
        return ready

    def _write_prefix(self, state: RequestState) -> bool:
        live = self.live.get(state.request_id)
        inputs = None if live is None else live.request.prefix_inputs
        if inputs is None:
            return True
        key_values = inputs[KEY_VALUES].detach()  # [layers, 2, kv_heads, P, head_dim]
        length = key_values.shape[3]
        if not self.cache.can_store_request_tokens(state, length):  # allocates the blocks when it fits
            return False
        empty = torch.empty(0, dtype=torch.long, device=self.cache.device)
        for allocator, layers in allocator_layers(self.cache):
            write = torch.tensor(allocator.get_write_indices(state.request_id, 0, length), device=self.cache.device)
            for layer in layers:
                keys, values = (key_values[layer, i].transpose(0, 1).to(self.cache.dtype) for i in (0, 1))
                allocator.update(keys, values, layer, empty, write)  # [P, kv_heads, head_dim] each
        set_prefill_offset(state, length)
        return True


register_scheduler(SCHEDULER_NAME, PrefixScheduler)


class PerRequestSampling(ModelRunner):
    """Samples each row with its own request's options (see module doc)."""

    live: dict[str, _Live]
    stats: dict[str, int]  # the engine's; "computed_tokens" counts every sampled token

    def _sample(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        states = [f.state for f in batch_requests(self.inputs_and_outputs) if f.has_new_token]
        logits = scores[0, : len(states)]  # [rows, vocab]
        chosen = logits.argmax(dim=-1)
        for row, state in enumerate(states):
            live = self.live.get(state.request_id)
            if live is None:
                continue
            try:
                live.tokens.append(_row_token(logits[row], live))
            except Exception as error:  # noqa: BLE001 - this row fails alone, at its delivery
                live.error = error
                live.tokens.append(Token(int(chosen[row])))
                continue
            chosen[row] = live.tokens[-1].id
        self.stats["computed_tokens"] += len(states)
        self.stats["batches"] += 1
        self.stats["batch_rows"] += len(states)
        output_ids[0, : len(states)].copy_(chosen)


def _row_token(logits: torch.Tensor, live: _Live) -> Token:
    """The row's token by its request's options ``[vocab]`` -> Token (with log-probabilities if asked)."""
    request = live.request
    token_id = int(logits.argmax())
    if request.temperature > 0:
        token_id = _sample_row(logits, request.temperature, request.top_p, live.generator)
    token = Token(token_id)
    if request.logprobs is not None:
        logprobs = torch.log_softmax(logits, dim=-1)
        token.logprob = float(logprobs[token_id])
        if request.logprobs:
            top = logprobs.topk(request.logprobs)
            token.top = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return token


def _sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > top_p  # keep the smallest head whose mass reaches top_p
        probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class PrefixBatchingManager(continuous_api.ContinuousBatchingManager):
    """transformers' manager with the prefix scheduler, per-request sampling, per-request attention
    and survival of failed steps."""

    live: dict[str, _Live]
    stats: dict[str, int]

    def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True) -> None:
        """Keep the engine's `PAGED_ATTENTION` (transformers would move the model to its dense-mask
        ``sdpa`` or a flash kernel)."""
        if attn_implementation(model) != PAGED_ATTENTION:
            raise RuntimeError(f"the continuous engine runs the base on {PAGED_ATTENTION}")

    def _create_batch_processor(self):
        processor = super()._create_batch_processor()
        processor.scheduler.live = self.live
        # The processor builds its ModelRunner inline (no hook to pass a class), so the one method
        # that differs is swapped in by subclass: same state, per-request `_sample`.
        processor.model_runner.__class__ = PerRequestSampling
        processor.model_runner.live = self.live
        processor.model_runner.stats = self.stats
        return processor

    def _generation_step(self) -> None:
        try:
            super()._generation_step()
        except Exception as error:  # noqa: BLE001 - fail this step's rows, keep serving the others
            logger.exception("a generation step failed; its rows fail, the engine goes on")
            processor = self.batch_processor
            for future_state in batch_requests(processor.inputs_and_outputs):
                state = future_state.state
                processor.scheduler.finish_request(state.request_id)
                processor.output_router.fail_and_deliver(state, error)
            clear_batch_requests(processor.inputs_and_outputs)
            raise _SkippedStep from error

    def _generation_loop_body(self, batch_processor, bootstrapping: bool) -> bool:
        try:
            return super()._generation_loop_body(batch_processor, bootstrapping)
        except _SkippedStep:
            return True


class _SkippedStep(Exception):
    """A step failed and its rows were failed; the loop skips its update and goes on."""


class _Inline:
    """Stands in for an event loop in transformers' output router: results are handled right away
    on the generation thread (our handler only hands tokens to thread-safe channels)."""

    @staticmethod
    def call_soon_threadsafe(callback, *args) -> None:
        callback(*args)


def continuous_refusal(model: PrefixModel) -> str | None:
    """Why the continuous engine cannot serve `model` exactly (None: it can). It writes a prefix into
    the paged cache as plain keys/values at positions 0..P-1 and runs the base on per-request ``sdpa``, so
    it is exact only where `PrefixModel` needs nothing more: not for encoder-decoders, latent
    attention (keys and values of different head sizes), layers of different key/value shapes or
    reusing another layer's keys/values (Gemma 4), sliding-window or chunked layers (the
    prefix is windowed like its tokens), or models whose positions do not start at 0 for the first
    cache slot (BART-family decoders, RoBERTa's ``padding_idx`` offset), nor models that cannot run
    on ``sdpa`` at all (attention sinks: transformers refuses them there), nor for hybrid models
    (their linear-attention layers take the prefix as an initial state, which a paged cache of keys
    and values has no place for)."""
    base, geometry = model.base_model, model.geometry
    kind = model_kind(base)
    if base.config.is_encoder_decoder:
        return f"{kind} is an encoder-decoder"
    if not supports_sdpa(base):
        return f"{kind} does not support sdpa attention (e.g. attention sinks), which the engine runs per request"
    if geometry.state_layers:
        return (
            f"{kind} has {geometry.state_layers} linear-attention layers, whose prefix is an initial state "
            "(the paged cache holds keys/values only)"
        )
    if geometry.key_head_dim != geometry.value_head_dim:
        return f"{kind} has keys and values of different head sizes (latent attention)"
    if geometry.layer_shapes:
        return f"{kind} has layers of different key/value heads or head sizes (the paged cache holds one shape)"
    if geometry.reusing_layers:
        return f"{kind} has layers that reuse an earlier layer's keys/values (KV sharing)"
    if any(getattr(m, "prefixtune_window", None) or getattr(m, "prefixtune_chunk", None) for m in base.modules()):
        return f"{kind} has sliding-window or chunked attention layers"
    if counts_own_positions(base.get_decoder()) or first_position(base) != 0:
        return f"{kind} computes its own positions"
    return None


class ContinuousEngine:
    """Serves `Request`s through `PrefixBatchingManager`; implements `interface.Engine`."""

    name = "continuous"
    supports_logprobs = True

    def __init__(
        self,
        model: PrefixModel,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_batch_tokens: int = 256,
        max_sequence_tokens: int = 2048,
        page_size: int = 32,
    ) -> None:
        base = model.base_model
        refusal = continuous_refusal(model)
        if refusal:
            raise UnsupportedModelError(
                f"the continuous-batching engine is not exact here: {refusal}; use --engine microbatch (or auto)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.live: dict[str, _Live] = {}
        self.lock = threading.Lock()
        self.exclusive_lock = threading.RLock()
        self.counter = 0
        self.counts = new_counts()
        blocks = -(-max_batch_size * max_sequence_tokens // page_size) + 2  # every row at full length, + slack
        self.cb_config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=blocks,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_batch_size,
            allow_block_sharing=False,  # a block must never be shared by requests of different prefixes
            use_async_batching=False,  # the sampler reads the batch it samples for
            use_cuda_graph=False,
            scheduler_type=SCHEDULER_NAME,
            auto_switch_to_flash=False,
            safety_margin=0.0,
        )
        eos = tokenizer.eos_token_id
        self.generation_config = GenerationConfig(
            do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
        )
        self.manager: PrefixBatchingManager | None = None
        self.original_attention = attn_implementation(base)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ContinuousEngine:
        base = self.model.base_model
        base.set_attn_implementation(PAGED_ATTENTION)  # the prefix comes through the cache, not the prefix hook
        self.manager = PrefixBatchingManager(base, self.generation_config, self.cb_config)
        self.manager.live = self.live
        self.manager.stats = self.counts
        rng = torch.get_rng_state()
        self.manager.start()
        deadline = time.monotonic() + 60
        while self.manager.batch_processor is None and self.manager.is_running():  # it seeds torch once built
            if time.monotonic() > deadline:
                raise RuntimeError("the continuous-batching loop did not start within 60 s")
            time.sleep(0.005)
        torch.set_rng_state(rng)  # the process's random numbers stay the caller's
        if self.manager.batch_processor is None:  # the loop died building its cache: say why, now
            error = self._loop_error()
            self.close()
            raise RuntimeError(f"the continuous-batching loop failed to start: {error}") from error
        return self

    def _loop_error(self) -> Exception | None:
        """The error that ended the generation loop, as transformers recorded it (None if it has not)."""
        return self.manager.background_thread_status.fatal_error if self.manager is not None else None

    def close(self) -> None:
        for request_id in list(self.live):  # first, so the loop does not finish them while it stops
            live = self.live.pop(request_id, None)
            if live is not None:
                end_request(live.request, EngineClosed("the engine was closed before this request ended"), self.counts)
        if self.manager is not None:
            self.manager.stop(block=True, timeout=30)
            self.manager = None
        self.model.base_model.set_attn_implementation(self.original_attention)

    def _running(self) -> bool:
        return self.manager is not None and self.manager.is_running()

    def reset_prefix_cache(self) -> None:
        """None: every request computes its own prompt; no blocks are kept across requests."""
        return None

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The model with prefixtune's own attention, for work outside the engine that runs it
        (a `hidden` prefix computes its keys/values through the attention layers): the loop pauses
        between two steps meanwhile, keeping its requests and cache."""
        with self.exclusive_lock:
            with self.manager.pause() if self._running() else nullcontext():
                self.model.base_model.set_attn_implementation(self.original_attention)
                try:
                    yield
                finally:
                    if self.manager is not None:
                        self.model.base_model.set_attn_implementation(PAGED_ATTENTION)

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> Future:
        if self.manager is None:
            raise EngineClosed("the continuous engine is not running")
        if not self.manager.is_running():  # transformers would log the request as dropped, never answer it
            raise EngineClosed(f"the continuous engine's loop has stopped: {self._loop_error()}")
        with self.lock:
            request_id = f"r{self.counter}"
            self.counter += 1
            self.counts["requests"] += 1
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        request.engine_id = request_id
        self.live[request_id] = _Live(request, generator, [])
        add_result_handler(self.manager.output_router, request_id, self._deliver, _Inline)
        self.manager.add_request(
            request.prompt_ids,
            request_id=request_id,
            max_new_tokens=request.max_tokens,
            streaming=True,  # every step's tokens reach the channel (stop strings, streams, disconnects)
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return request.future

    def cancel(self, request: Request, error: Exception | None = None) -> None:
        """End the request now (see `interface.Engine.cancel`); transformers removes it at the next
        step and frees its blocks."""
        live = self.live.pop(request.engine_id, None) if request.engine_id is not None else None
        if live is None:  # ended already, or not ours
            return
        if self.manager is not None:
            self.manager.cancel_request(request.engine_id)
        end_request(request, error or "cancelled", self.counts)

    def stats(self) -> EngineStats:
        processor = self.manager.batch_processor if self.manager else None
        running = len(processor.scheduler.active_requests) if processor is not None else 0
        return EngineStats(
            engine=self.name,
            healthy=self._running(),
            queue_depth=max(len(self.live) - running, 0),
            running_rows=running,
            **self.counts,
        )

    # ------------------------------------------------------------------ results (generation thread)
    def _deliver(self, output: GenerationOutput) -> None:
        live = self.live.get(output.request_id)
        if live is None:  # cancelled meanwhile
            return
        if live.error is not None:
            logger.error(
                "request %s (prefix %r): its row failed", output.request_id, live.request.prefix, exc_info=live.error
            )
            self.cancel(live.request, live.error)
            return
        eos = self.tokenizer.eos_token_id
        generated = output.generated_tokens
        for index in range(live.sent, len(generated)):
            if generated[index] == eos:
                break
            token = live.tokens[index] if index < len(live.tokens) else Token(generated[index])
            live.request.emit(token)
            live.sent = index + 1
        if not output.is_finished():
            return
        self.live.pop(output.request_id, None)
        if output.status == RequestStatus.FAILED:
            logger.error(
                "request %s (prefix %r) failed in the engine: %s", output.request_id, live.request.prefix, output.error
            )
            end_request(live.request, RuntimeError(output.error or "generation failed"), self.counts)
            return
        stopped = bool(generated) and generated[-1] == eos
        end_request(live.request, "stop" if stopped else "length", self.counts)
