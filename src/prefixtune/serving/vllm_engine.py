"""The vLLM engine: vLLM's `AsyncLLM` (V1) behind the serving engine interface, each request with its
own prefix.

How it differs from the two in-process engines: the model runs inside vLLM (its paged KV cache,
scheduler, kernels and parallelism, the engine core in a subprocess), not on transformers' code
paths. The prefix reaches vLLM through `prefixtune.vllm`'s KV connector: a request of prefix length P
is sent as P placeholder token ids before its prompt, with ``cache_salt`` = the prefix's content
hash; the connector writes the prefix keys/values into those P slots instead of computing them,
so the text starts at position P as in `PrefixModel`. vLLM's own prefix caching keeps a popular
prefix's blocks hot, and the salt keeps two prefixes apart.

* Admission snapshots: a request is submitted with the snapshot the store gave it at admission, whose
  keys/values go to the connector's content-addressed folder under their hash (written once, never
  overwritten): a replaced prefix is a new file under a new hash and salt, the old file stays until the
  last request admitted with it ends, so those keep reading their own version and new ones get the new
  one. Files are removed at start-up (a stopped server's) and shutdown (`prefixtune.vllm.kv_folder`).
* The base model is held once, by vLLM: the engine releases the front end's copy of every weight but
  the input embeddings (`prefixtune.vllm.front_base`); the first `hidden` prefix, which runs the base's
  own layers to compile its keys/values, loads them again (once) under `exclusive`.
* `AsyncLLM` runs on this engine's own event loop thread: `submit` / `cancel` may be called from any
  thread, tokens reach the request's channel as they are generated (``RequestOutputKind.DELTA``).
* `cancel` aborts the request in `AsyncLLM` (its blocks are freed at the next step).
* Queue depth, running rows and computed tokens come from vLLM's own scheduler and iteration stats
  (a `StatLoggerBase` it calls after every step).
* Stop strings, ``n`` and seeds per choice stay the server's (it sends one engine request per choice
  and cuts at stop strings on the decoded text), so every engine answers alike.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..injection import UnsupportedModelError
from ..loading import ModelLoadError
from ..model import PrefixModel
from ..vllm.kv_folder import KVFolder
from .interface import EngineClosed, EngineStats, RequestRejected, end_request, new_counts
from .requests import Request, Token

logger = logging.getLogger(__name__)
START_TIMEOUT = 600.0  # seconds for vLLM to load the model and profile its cache


class VLLMUnavailable(ModelLoadError):
    """``--engine vllm`` in an environment without vLLM (the model cannot be served here)."""


class ModelNotServable(ModelLoadError):
    """vLLM could not load or start the model (the message carries vLLM's reason)."""


def require_vllm() -> None:
    """Raise `VLLMUnavailable` naming the set-up command and the executable that has vLLM."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailable(
            f"--engine vllm needs vLLM, which is not installed for {sys.executable}: run "
            "`bash scripts/setup.sh --vllm` (a second environment, .venv-vllm: vLLM pins another transformers), "
            "then serve with `.venv-vllm/bin/prefixtune serve --engine vllm ...`"
        )


@dataclass
class VLLMSettings:
    """vLLM's model, parallelism, memory and batch settings (`prefixtune serve --engine vllm`)."""

    model: str  # a folder vLLM can load (`prefixtune.vllm.model_path`)
    kv_folder: str  # the connector's compiled prefixes (`prefixtune.vllm.KV_FOLDER` in the store)
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    kv_cache_gb: float | None = None  # vLLM's KV cache size (kv_cache_memory_bytes); None: vLLM's default
    gpu_memory_utilization: float | None = None  # GPU only: the fraction of GPU memory vLLM may take
    max_num_seqs: int = 16  # rows decoded together
    max_model_len: int | None = None  # placeholders + prompt + generated tokens, at most
    max_num_batched_tokens: int | None = None  # tokens per step (chunked prefill)
    enforce_eager: bool = True  # no graph capture/compilation: start-up in seconds
    release_base: bool = True  # the front end keeps the base's embeddings only (`prefixtune.vllm.front_base`)

    def engine_args(self, connector_args: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs

        options: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_num_seqs": self.max_num_seqs,
            "enable_prefix_caching": True,  # keeps a popular prefix's blocks (salted by its hash)
            "enforce_eager": self.enforce_eager,
            "disable_log_stats": True,  # no default loggers; ours below still gets the stats
            **connector_args,
        }
        if self.kv_cache_gb is not None:
            options["kv_cache_memory_bytes"] = int(self.kv_cache_gb * 1024**3)
        if self.gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        if self.max_num_batched_tokens is not None:
            options["max_num_batched_tokens"] = self.max_num_batched_tokens
        return AsyncEngineArgs(**options)


def _stat_logger_class():
    """A `StatLoggerBase` (defined when vLLM is importable) that keeps the last scheduler stats and
    adds up computed tokens: prompt tokens vLLM prefilled itself plus generated tokens."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class VLLMStatLogger(StatLoggerBase):
        def __init__(self, vllm_config=None, engine_index: int = 0) -> None:
            self.running = 0
            self.waiting = 0
            self.computed_tokens = 0
            self.steps = 0  # engine steps that produced outputs
            self.step_rows = 0  # rows over those steps
            self.kv_cache_usage = 0.0

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                self.running = scheduler_stats.num_running_reqs
                self.waiting = scheduler_stats.num_waiting_reqs
                self.kv_cache_usage = scheduler_stats.kv_cache_usage
            if iteration_stats is not None:
                computed = iteration_stats.prompt_token_stats.computed
                self.computed_tokens += computed + iteration_stats.num_generation_tokens
                self.steps += 1
                self.step_rows += self.running

        def log_engine_initialized(self) -> None:
            pass

    return VLLMStatLogger


class VLLMEngine:
    """Serves `Request`s through vLLM's `AsyncLLM` with a prefix per request (see module doc)."""

    name = "vllm"
    supports_logprobs = True

    def __init__(self, model: PrefixModel, tokenizer, settings: VLLMSettings) -> None:
        require_vllm()
        from ..vllm import vllm_refusal

        refusal = vllm_refusal(model)
        if refusal:
            raise UnsupportedModelError(f"the vLLM engine cannot serve this model with prefixes: {refusal}")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.base_loads = 0  # times the front end loaded the base's weights again (for a `hidden` prefix)
        if settings.release_base:  # vLLM holds the model; the store needs its embeddings and fingerprint only
            from ..vllm.front_base import release_weights

            released = release_weights(model)
            logger.info("vLLM front end: released %.1f MiB of base weights vLLM holds", released / 2**20)
        self.kv = KVFolder(settings.kv_folder)  # the compiled prefix files, each kept while a snapshot of it lives
        self.eos = tokenizer.eos_token_id
        self.lock = threading.RLock()  # guards the counters and the requests not ended
        self.base_lock = threading.Lock()  # `exclusive`: the store's use of the front end's base
        self.ids = itertools.count()
        self.tasks: dict[str, asyncio.Task] = {}  # request id -> its serving task (engine loop only)
        self.unended: dict[str, Request] = {}  # submitted, not yet ended (any thread)
        self.counts = new_counts()  # batches, batch_rows and computed_tokens come from vLLM's stats
        self.loop = asyncio.new_event_loop()
        self.thread: threading.Thread | None = None
        self.llm = None
        self.vllm_stats = _stat_logger_class()()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> VLLMEngine:
        if removed := self.kv.clear():  # nothing admitted yet: any file there is a stopped server's
            logger.info("removed %d stale compiled prefixes from %s", removed, self.kv.folder)
        self.thread = threading.Thread(target=self.loop.run_forever, name="prefixtune-vllm", daemon=True)
        self.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._build(), self.loop).result(START_TIMEOUT)
        except Exception as error:
            self.close()
            raise ModelNotServable(f"vLLM cannot serve model {self.settings.model!r}: {error}") from error
        return self

    async def _build(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        from ..vllm import kv_transfer_config

        args = self.settings.engine_args({"kv_transfer_config": kv_transfer_config(self.settings.kv_folder)})
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[lambda config, index: self.vllm_stats])

    def close(self) -> None:
        """Fail every request not yet ended, shut vLLM's engine core down, stop the loop. Idempotent."""
        for request in list(self.unended.values()):
            self.cancel(request, EngineClosed("the vLLM engine was closed"))
        llm, self.llm = self.llm, None
        if self.thread is not None and self.thread.is_alive():
            if llm is not None:
                asyncio.run_coroutine_threadsafe(_shutdown(llm), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
        self.kv.clear()  # vLLM reads none of them now

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The in-process base model for the store (a `hidden` prefix computes its keys/values once):
        its weights are loaded again the first time (`front_base.restore_weights`). vLLM never runs it,
        so serving goes on meanwhile."""
        from ..vllm.front_base import restore_weights, weights_released

        with self.base_lock:  # not `lock`: requests are admitted and counted meanwhile
            if weights_released(self.model):
                logger.info("loading the base's weights in the front end to compile a hidden prefix")
                restore_weights(self.model, self.settings.model, self.settings.dtype)
                self.base_loads += 1
            yield

    def stats(self) -> EngineStats:
        """Rows and computed tokens as vLLM's scheduler reports them after each step; queue depth:
        requests not ended and not running (including those on their way into vLLM)."""
        with self.lock:
            counts, unended = dict(self.counts), len(self.unended)
        seen = self.vllm_stats
        running = min(seen.running, unended)  # vLLM's last report may predate the last requests' end
        vllm_counts = {"batches": seen.steps, "batch_rows": seen.step_rows, "computed_tokens": seen.computed_tokens}
        return EngineStats(
            engine=self.name,
            healthy=self.llm is not None and not self.llm.errored and bool(self.thread and self.thread.is_alive()),
            queue_depth=max(unended - running, 0),
            running_rows=running,
            **(counts | vllm_counts),
        )

    def reset_prefix_cache(self) -> bool:
        """Empty vLLM's prefix cache (prompt blocks and prefixes' salted blocks; a prefix is loaded again by the
        connector on its next request); False when vLLM could not, with requests running."""
        if self.llm is None:
            raise RuntimeError("the vLLM engine is not running (start() it first)")
        return asyncio.run_coroutine_threadsafe(self.llm.reset_prefix_cache(), self.loop).result(60)

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> Future:
        """Admit `request` (`RequestRejected` if its prefix, prompt and output do not fit vLLM's window)."""
        if self.llm is None:
            raise RuntimeError("the vLLM engine is not running (start() it first)")
        prompt = self._prompt(request)
        request.engine_id = f"prefixtune-{next(self.ids)}"
        with self.lock:
            self.unended[request.engine_id] = request
            self.counts["requests"] += 1
        self.loop.call_soon_threadsafe(self._start_task, request, prompt)
        return request.future

    def cancel(self, request: Request, error: Exception | None = None) -> None:
        """End the request now (cancelled, or failed with `error`) and abort it in `AsyncLLM`."""
        with self.lock:
            if self.unended.pop(request.engine_id or "", None) is None:
                return  # ended already, or never admitted
            end_request(request, error or "cancelled", self.counts)
            request.prefix_inputs = None  # ended: its snapshot (and so its compiled file) may go
        if self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._cancel_task, request.engine_id)

    def _prompt(self, request: Request):
        """The request as vLLM runs it (`prefixtune.vllm.prompts.admitted_prompt`): P placeholder ids + its prompt,
        ``cache_salt`` and the connector's parameters; the admitted snapshot's keys/values are written once
        to the connector's content-addressed folder and removed when no snapshot of them is left."""
        from ..vllm.prompts import VLLMPrefixError, admitted_prompt

        window = self.llm.model_config.max_model_len
        try:
            return admitted_prompt(
                self.kv, request.prefix_inputs, request.prompt_ids, request.max_tokens, window, request.prefix
            )
        except VLLMPrefixError as error:
            raise RequestRejected(str(error)) from error

    def _start_task(self, request: Request, prompt) -> None:
        if request.engine_id in self.unended:  # not cancelled on its way here
            self.tasks[request.engine_id] = self.loop.create_task(self._serve(request, prompt))

    def _cancel_task(self, request_id: str) -> None:
        task = self.tasks.get(request_id)
        if task is not None:
            task.cancel()  # its generate() aborts the request in AsyncLLM

    async def _serve(self, request: Request, prompt) -> None:
        request_id, llm = request.engine_id, self.llm
        try:
            reason = "length"
            params = self._sampling(request, prompt.extra_args())
            async for output in llm.generate(prompt.prompt(), params, request_id):
                choice = output.outputs[0]
                for index, token_id in enumerate(choice.token_ids):
                    if token_id == self.eos:
                        reason = "stop"
                        break
                    request.emit(_token(token_id, choice.logprobs, index, request.logprobs))
                reason = "stop" if choice.finish_reason == "stop" else reason
            self._end(request, reason)
        except asyncio.CancelledError:
            await llm.abort(request_id)  # generate() has aborted it too; abort is idempotent
        except Exception as error:  # noqa: BLE001 - this request fails, the engine goes on
            logger.exception("vLLM request %s (prefix %r) failed", request_id, request.prefix)
            self.cancel(request, error)
        finally:
            self.tasks.pop(request_id, None)

    def _end(self, request: Request, reason: str) -> None:
        with self.lock:
            if self.unended.pop(request.engine_id, None) is not None:  # else: cancelled meanwhile
                end_request(request, reason, self.counts)
                request.prefix_inputs = None  # ended: its snapshot (and so its compiled file) may go

    def _sampling(self, request: Request, extra_args: dict[str, Any] | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1,  # the server sends one engine request per choice (seed + i each)
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p if request.temperature > 0 else 1.0,
            seed=request.seed,
            logprobs=request.logprobs,
            stop_token_ids=[self.eos] if self.eos is not None else None,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,  # the server decodes (and matches stop strings) itself
            extra_args=extra_args,  # the connector's kv_transfer_params: which prefix, how long
        )


async def _shutdown(llm) -> None:
    llm.shutdown()


def _token(token_id: int, logprobs, index: int, wanted: int | None) -> Token:
    """A generated token with its log-probability and top `wanted` alternatives (vLLM's
    ``{token id: Logprob}`` per position: the top k and the chosen one)."""
    token = Token(int(token_id))
    if wanted is None or logprobs is None:
        return token
    entries = logprobs[index]
    token.logprob = float(entries[token_id].logprob)
    if wanted:
        ranked = sorted(entries.items(), key=lambda item: item[1].rank)[:wanted]
        token.top = [(int(i), float(entry.logprob)) for i, entry in ranked]
    return token
