"""The engine interface both engines implement (`serving.interface.Engine`), and what the server
promises around it: sampling options and seeds, streams that end on ``--request-timeout``,
failures that are reported instead of swallowed (store writes, unexpected exceptions)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from prefixtune import PrefixModel
from prefixtune.serving import (
    BASE_NAME,
    Engine,
    EngineClosed,
    EngineStats,
    Failed,
    Finished,
    Limits,
    PrefixStore,
    Request,
    Token,
    build_app,
    create_app,
    make_engine,
)
from prefixtune.serving import store as store_module
from prefixtune.serving.background import running
from prefixtune.serving.interface import end_request, new_counts
from test_serving import PROMPTS, TOKEN, prefix_files, prompt_ids, write_store
from tiny import tiny_model, tiny_tokenizer

ENGINE_NAMES = ("microbatch", "continuous")
LONG = PROMPTS[1]  # no prefix of the test store ends it early within 120 tokens
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Recorder:
    """An event sink that keeps what the engine sent, in order (any thread)."""

    def __init__(self) -> None:
        self.events: list = []

    def put(self, event) -> None:
        self.events.append(event)


def engine_over_tiny_llama(name: str) -> Engine:
    model = PrefixModel(tiny_model("llama"), name=None, tokenizer=tiny_tokenizer())
    return make_engine(model, model.tokenizer, engine=name).start()


def wait_until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# ---------------------------------------------------------------------- the interface itself
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_every_engine_implements_the_interface_and_reports_the_same_stats_fields(name):
    engine = engine_over_tiny_llama(name)
    try:
        assert isinstance(engine, Engine) and engine.name == name
        request = Request(prompt_ids(PROMPTS[0]), BASE_NAME, 5, channel=Recorder())
        completion = engine.submit(request).result(timeout=60)
        stats = engine.stats()
    finally:
        engine.close()
    events = request.channel.events
    assert [e for e in events if isinstance(e, Token)] == completion.tokens  # tokens, in order, then
    assert events[-1] == Finished(completion) and len(events) == len(completion.tokens) + 1  # one end
    assert completion.token_ids == [t.id for t in completion.tokens] and completion.finish_reason in ("stop", "length")
    fields = [f.name for f in dataclasses.fields(EngineStats)]
    assert list(stats.as_dict()) == fields and stats.engine == name and stats.healthy
    assert stats.requests == 1 and stats.generated_tokens == len(completion.tokens) and stats.batches >= 1
    assert stats.computed_tokens >= len(completion.tokens) and stats.errors == stats.cancelled == 0
    assert not engine.stats().healthy  # closed


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_cancel_ends_a_running_request_at_once_and_no_token_follows(name):
    engine = engine_over_tiny_llama(name)
    try:
        request = Request(prompt_ids(LONG), BASE_NAME, 120, channel=Recorder())
        engine.submit(request)
        wait_until(lambda: len(request.tokens) >= 2)
        engine.cancel(request)
        completion = request.future.result(timeout=1)  # ended by cancel itself, not later
        sent = list(request.channel.events)
        wait_until(lambda: engine.stats().running_rows == 0)
        time.sleep(0.1)
        stats = engine.stats()
    finally:
        engine.close()
    assert completion.finish_reason == "cancelled" and 2 <= len(completion.tokens) < 120
    assert sent[-1] == Finished(completion) and request.channel.events == sent  # nothing after the end
    assert stats.cancelled == 1 and stats.computed_tokens < 120  # the engine stopped computing it


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_cancel_with_an_error_fails_the_request_and_close_fails_what_is_left(name):
    engine = engine_over_tiny_llama(name)
    failed = Request(prompt_ids(LONG), BASE_NAME, 120, channel=Recorder())
    left = Request(prompt_ids(LONG), BASE_NAME, 120, channel=Recorder())
    try:
        engine.submit(failed)
        engine.submit(left)
        engine.cancel(failed, ValueError("the client sent garbage"))
        with pytest.raises(ValueError, match="garbage"):
            failed.future.result(timeout=1)
    finally:
        engine.close()
    with pytest.raises(EngineClosed):
        left.future.result(timeout=1)  # nothing is left hanging by close
    assert isinstance(failed.channel.events[-1], Failed) and isinstance(left.channel.events[-1], Failed)
    assert engine.stats().errors == 2
    with pytest.raises(EngineClosed):
        engine.submit(Request(prompt_ids(LONG), BASE_NAME, 3))


# ---------------------------------------------------------------------- sampling through the server
@pytest.fixture(scope="module", params=ENGINE_NAMES)
def served(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "store"
    write_store(folder)
    limits = Limits(max_prompt_tokens=64, max_tokens=400)
    app, engine, store = build_app(
        tiny_model("llama"), tiny_tokenizer(), folder, admin_token=TOKEN, limits=limits, engine=request.param
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine, store
    engine.close()


def texts(client: TestClient, **options) -> list[str]:
    body = {"model": "formal-blog", "prompt": LONG, "max_tokens": 16, **options}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return [choice["text"] for choice in response.json()["choices"]]


def test_top_p_keeps_only_the_head_of_the_distribution(served):
    client, _, _ = served
    greedy = texts(client)
    hot = texts(client, temperature=2.0, seed=3)
    assert hot != greedy  # sampling at this temperature leaves the greedy path ...
    assert texts(client, temperature=2.0, seed=3, top_p=1e-6) == greedy  # ... top_p this small keeps the top token


def test_seeds_repeat_and_different_seeds_differ(served):
    client, engine, _ = served
    first = texts(client, temperature=1.5, seed=11, n=2)
    assert texts(client, temperature=1.5, seed=11, n=2) == first  # the same seeds, the same texts
    assert first[0] != first[1]  # choice i uses seed + i: different seeds, different texts
    assert texts(client, temperature=1.5, seed=12) == [first[1]]  # seed + 1 is choice 1's seed


# ---------------------------------------------------------------------- streams and timeouts
def sse_events(response: httpx.Response) -> list:
    lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_a_stream_past_request_timeout_ends_with_a_504_event_and_done(tmp_path, name):
    write_store(tmp_path / "store")
    limits = Limits(max_tokens=400, request_timeout=0.2)
    app, engine, _ = build_app(tiny_model("llama"), tiny_tokenizer(), tmp_path / "store", limits=limits, engine=name)
    body = {"model": "formal-blog", "prompt": LONG, "max_tokens": 400, "stream": True}
    with running(app) as url:
        started = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            events = sse_events(response)
        seconds = time.monotonic() - started
        wait_until(lambda: engine.stats().running_rows == 0)
        stats = engine.stats()
    engine.close()
    assert response.status_code == 200 and events[-1] == "[DONE]"  # the stream is closed properly
    error = events[-2]["error"]
    assert error["code"] == 504 and "--request-timeout" in error["message"]
    assert all("choices" in e for e in events[:-2]) and seconds < 30  # no hang
    assert stats.cancelled == 1 and stats.generated_tokens < 400


# ---------------------------------------------------------------------- nothing swallowed
def test_a_delete_that_fails_answers_an_error_and_the_prefix_stays(served, monkeypatch, caplog):
    client, _, store = served
    before = texts(client)

    def refuse(source, target):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(store_module.os, "replace", refuse)
    with caplog.at_level(logging.ERROR, logger="prefixtune.serving.admin"):
        response = client.delete("/admin/prefixes/formal-blog", headers=AUTH)
    monkeypatch.undo()
    assert response.status_code == 500 and "Permission denied" in response.json()["error"]["message"]
    assert "formal-blog" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert texts(client) == before and (store.folder / "formal-blog").is_dir()
    assert "formal-blog" in PrefixStore(store.model, store.folder).names()  # after a restart too
    assert any(r.exc_info and "formal-blog" in r.getMessage() for r in caplog.records)


def test_a_replacement_that_fails_midway_leaves_the_old_prefix_served(served, monkeypatch, tmp_path):
    client, _, store = served
    before = texts(client)
    old_files = {p.name: p.read_bytes() for p in (store.folder / "formal-blog").iterdir()}
    real = os.replace

    def fail_moving_in(source, target):
        if os.path.basename(source).startswith(".upload-"):  # the old one is already aside
            raise OSError(28, "No space left on device")
        real(source, target)

    monkeypatch.setattr(store_module.os, "replace", fail_moving_in)
    response = client.put("/admin/prefixes/formal-blog", files=prefix_files(tmp_path), headers=AUTH)
    monkeypatch.undo()
    assert response.status_code == 500 and "No space left" in response.json()["error"]["message"]
    assert {p.name: p.read_bytes() for p in (store.folder / "formal-blog").iterdir()} == old_files
    assert texts(client) == before  # served from the old files, loaded again
    assert not [p for p in store.folder.iterdir() if p.name.startswith(".")]  # nothing left aside


def test_a_replacement_killed_between_its_moves_is_restored_at_start(tmp_path):
    write_store(tmp_path / "store")
    folder = tmp_path / "store"
    os.replace(folder / "formal-blog", folder / ".old-formal-blog-1a2b3c4d")  # the state a kill -9 leaves
    store = PrefixStore(PrefixModel(tiny_model("llama"), name=None, tokenizer=tiny_tokenizer()), folder)
    assert "formal-blog" in store.names() and store.snapshot("formal-blog") is not None


def test_an_unexpected_error_is_logged_with_its_traceback_and_answers_a_short_500(served, monkeypatch, caplog):
    client, engine, _ = served

    def broken(request):
        raise RuntimeError("the engine broke in an unforeseen way")

    monkeypatch.setattr(engine, "submit", broken)
    with caplog.at_level(logging.ERROR, logger="prefixtune.serving.server"):
        response = client.post("/v1/completions", json={"model": "formal-blog", "prompt": LONG, "max_tokens": 4})
    monkeypatch.undo()
    message = response.json()["error"]["message"]
    assert response.status_code == 500 and message.startswith("internal error (RuntimeError); request id cmpl-")
    assert "unforeseen" not in message  # the details go to the log, not to the client
    (record,) = [r for r in caplog.records if r.name == "prefixtune.serving.server"]
    assert record.exc_info[0] is RuntimeError and "unforeseen" in str(record.exc_info[1])
    assert message.rsplit(" ", 1)[1] in record.getMessage() and "'formal-blog'" in record.getMessage()
    assert client.get("/health").status_code == 200  # and the server goes on


def test_an_engine_logs_a_failed_micro_batch_with_its_traceback(monkeypatch, caplog):
    engine = engine_over_tiny_llama("microbatch")

    def explode(*args, **kwargs):
        raise RuntimeError("generate exploded")

    monkeypatch.setattr(engine.model.base_model, "generate", explode)
    try:
        with caplog.at_level(logging.ERROR, logger="prefixtune.serving.engine"):
            future = engine.submit(Request(prompt_ids(LONG), BASE_NAME, 3))
            with pytest.raises(RuntimeError, match="exploded"):
                future.result(timeout=60)
    finally:
        engine.close()
    assert any(r.exc_info and "exploded" in str(r.exc_info[1]) for r in caplog.records)


def test_the_stream_of_a_failed_request_ends_with_an_error_event(served, monkeypatch):
    client, engine, _ = served
    submit = engine.submit

    def failing(request):
        future = submit(request)
        engine.cancel(request, RuntimeError("row failed"))
        return future

    monkeypatch.setattr(engine, "submit", failing)
    body = {"model": "formal-blog", "prompt": LONG, "max_tokens": 8, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    monkeypatch.undo()
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == 500
    assert "row failed" in lines[-2]


# ---------------------------------------------------------------------- a third engine
class ScriptedEngine:
    """The smallest engine there is: it answers every request with the same words, on its own
    thread, through nothing but `interface.Engine` and the `Request` methods. The server serves it
    unchanged, which is what a new engine (vLLM's, say) relies on."""

    name = "scripted"
    supports_logprobs = True

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.counts = new_counts()
        self.started = False

    def start(self) -> ScriptedEngine:
        self.started = True
        return self

    def close(self) -> None:
        self.started = False

    def submit(self, request: Request):
        self.counts["requests"] += 1
        threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return request.future

    def _run(self, request: Request) -> None:
        for token_id in self.token_ids[: request.max_tokens]:
            request.emit(Token(token_id, logprob=-0.5, top=[(token_id, -0.5)]))
            self.counts["computed_tokens"] += 1
        end_request(request, "length" if request.max_tokens <= len(self.token_ids) else "stop", self.counts)

    def cancel(self, request: Request, error: Exception | None = None) -> None:
        end_request(request, error or "cancelled", self.counts)

    def stats(self) -> EngineStats:
        return EngineStats(engine=self.name, healthy=self.started, queue_depth=0, running_rows=0, **self.counts)

    def reset_prefix_cache(self) -> None:
        return None

    def exclusive(self):
        return contextlib.nullcontext()


def test_the_server_serves_any_engine_that_implements_the_interface(tmp_path):
    tokenizer = tiny_tokenizer()
    words = "the pub near the river serves cheap food".split()
    engine = ScriptedEngine(tokenizer.convert_tokens_to_ids(words)).start()
    assert isinstance(engine, Engine)
    write_store(tmp_path / "store")
    model = PrefixModel(tiny_model("llama"), name=None, tokenizer=tokenizer)
    store = PrefixStore(model, tmp_path / "store", exclusive=engine.exclusive)
    app = create_app(engine=engine, store=store, tokenizer=tokenizer, limits=Limits(max_tokens=32))
    with TestClient(app) as client:
        body = {"model": "formal-blog", "prompt": "cheap food", "max_tokens": 5, "logprobs": 1}
        plain = client.post("/v1/completions", json=body).json()
        whole = client.post("/v1/completions", json={"prompt": "cheap food", "max_tokens": 20, "n": 2}).json()
        with client.stream(
            "POST", "/v1/completions", json=body | {"stream": True, "stop": "cheap", "max_tokens": 20}
        ) as response:
            streamed = "".join(
                json.loads(line[6:])["choices"][0]["text"]
                for line in response.iter_lines()
                if line.startswith("data: {")
            )
        health = client.get("/health").json()
        metrics = client.get("/metrics").text
    assert plain["choices"][0]["text"] == "the pub near the river" and plain["choices"][0]["finish_reason"] == "length"
    assert plain["choices"][0]["logprobs"]["token_logprobs"] == [-0.5] * 5 and plain["usage"]["completion_tokens"] == 5
    assert [c["text"] for c in whole["choices"]] == [" ".join(words)] * 2
    assert [c["finish_reason"] for c in whole["choices"]] == ["stop"] * 2
    assert streamed == "the pub near the river serves "  # cut before the stop string
    assert health["engine"] == "scripted" and "prefixtune_computed_tokens_total" in metrics
