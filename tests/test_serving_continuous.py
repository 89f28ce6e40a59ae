"""The continuous-batching engine and the server around it, against the real server on loopback:
exactness under mixed prefixes, short-first scheduling, snapshot isolation, cancellation,
backpressure, timeouts, metrics, and the OpenAI surface through the official `openai` client."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
import torch

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.serving import BASE_NAME, ContinuousEngine, Limits, PrefixStore, Request, build_app, continuous
from prefixtune.serving.background import running
from serving_load import assert_admitted_kept_their_version, change_prefixes_under_load, hang_up_streams, metric
from test_serving import PREFIXES, PROMPTS, TOKEN, alone, prefix_files, prompt_ids, reference_model, write_store
from tiny import needs_smollm2, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live") / "store"
    write_store(folder)
    reference = reference_model(folder)
    limits = Limits(max_prompt_tokens=64, max_tokens=120, max_queue=64)
    app, engine, store = build_app(
        tiny_model("llama"), tiny_tokenizer(), folder, admin_token=TOKEN, limits=limits, max_batch_size=8
    )
    with running(app) as url:
        yield url, engine, store, reference, app
    engine.close()


LONG = PROMPTS[1]  # a prompt no prefix of the store ends early (no end of sequence within 120 tokens)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.slow
def test_mixed_prefix_continuous_batching_with_chunked_prefill_equals_each_request_alone(tmp_path):
    write_store(tmp_path / "store")
    reference = reference_model(tmp_path / "store")
    model = reference_model(tmp_path / "store")
    engine = ContinuousEngine(model, model.tokenizer, max_batch_size=6, max_batch_tokens=8).start()
    store = PrefixStore(model, tmp_path / "store", exclusive=engine.exclusive)  # prefixes load while it runs
    jobs = [(p, n, 3 + 5 * i % 17) for i, (p, n) in enumerate((p, n) for p in PROMPTS for n in [BASE_NAME, *PREFIXES])]
    requests = [Request(prompt_ids(p), n, m, prefix_inputs=store.snapshot(n)) for p, n, m in jobs]
    results = [engine.submit(request) for request in requests]
    results = [future.result(timeout=120) for future in results]
    engine.close()
    for (prompt, name, max_tokens), result in zip(jobs, results, strict=True):
        assert result.token_ids == alone(reference, prompt, name, max_tokens), (prompt, name)
    assert len({tuple(r.token_ids) for (p, _, _), r in zip(jobs, results, strict=True) if p == PROMPTS[0]}) > 1


@pytest.mark.slow
def test_an_exception_in_one_row_fails_that_request_alone(tmp_path, monkeypatch):
    write_store(tmp_path / "store")
    reference = reference_model(tmp_path / "store")
    model = reference_model(tmp_path / "store")
    store = PrefixStore(model, tmp_path / "store")
    snapshots = {name: store.snapshot(name) for name in PREFIXES}
    real = continuous._sample_row

    def poisoned(logits, temperature, top_p, generator):
        if temperature == 0.5:
            raise RuntimeError("poisoned row")
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(continuous, "_sample_row", poisoned)
    engine = ContinuousEngine(model, model.tokenizer, max_batch_size=8).start()
    bad = Request(prompt_ids(LONG), "formal-blog", 30, temperature=0.5, prefix_inputs=snapshots["formal-blog"])
    good = [Request(prompt_ids(LONG), name, 30, prefix_inputs=snapshots[name]) for name in PREFIXES]
    futures = [engine.submit(request) for request in [bad, *good]]
    with pytest.raises(RuntimeError, match="poisoned row"):
        futures[0].result(timeout=60)
    results = [future.result(timeout=60) for future in futures[1:]]
    engine.close()
    for name, result in zip(PREFIXES, results, strict=True):
        assert result.token_ids == alone(reference, LONG, name, 30) and result.finish_reason == "length"


def test_a_short_request_sent_while_a_long_one_decodes_finishes_first(live):
    url, engine, *_ = live
    order: list[str] = []

    def ask(label: str, max_tokens: int) -> None:
        body = {"model": "formal-blog", "prompt": LONG, "max_tokens": max_tokens}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        order.append(f"{label}:{answer['usage']['completion_tokens']}")

    long = threading.Thread(target=ask, args=("long", 120))
    long.start()
    while engine.stats().running_rows == 0:  # the long one is decoding
        time.sleep(0.01)
    ask("short", 2)
    long.join(timeout=120)
    assert order[0] == "short:2" and order[1].startswith("long:")
    assert int(order[1].split(":")[1]) > 20  # it really was long (no early end of sequence)


def test_deleting_and_replacing_prefixes_under_load_fails_no_admitted_request(live, tmp_path):
    url, engine, store, reference, _ = live
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for name in ("victim", "swapped"):
        assert httpx.put(f"{url}/admin/prefixes/{name}", files=prefix_files(tmp_path, name), headers=auth).is_success
    expected = {name: alone_served(store, reference, name) for name in ("victim", "swapped", "recipe-mlp")}

    answers = change_prefixes_under_load(
        url,
        ["victim", "swapped", "recipe-mlp"],
        {"prompt": PROMPTS[0], "max_tokens": 40},
        lambda: engine.stats().running_rows,
        auth,
        prefix_files(tmp_path, "replacement", prefix_length=6),
    )
    assert_admitted_kept_their_version(url, answers, expected, deleted="victim")
    swapped = httpx.post(f"{url}/v1/completions", json={"model": "swapped", "prompt": PROMPTS[0], "max_tokens": 40})
    assert swapped.json()["choices"][0]["text"] != expected["swapped"]


def alone_served(store: PrefixStore, reference, name: str) -> str:
    """What `name` answers alone (greedy, 40 tokens), computed on the reference copy of the base."""
    if name in reference.prefixes:
        reference.delete_prefix(name)
    reference.load_prefix(store.folder / name, name=name)  # the same file the store serves
    return tiny_tokenizer().decode(alone(reference, PROMPTS[0], name, 40), skip_special_tokens=True)


def test_hung_up_streams_stop_costing_tokens(live):
    url, engine, *_ = live
    before = engine.stats().computed_tokens
    cancelled = metric(url, 'prefixtune_cancellations_total{reason="disconnect"}')

    hang_up_streams(
        url, {"model": "twitter-wit", "prompt": PROMPTS[1], "max_tokens": 120}, 8, lambda: bool(engine.live)
    )
    assert not engine.live  # all removed from the batch
    assert metric(url, 'prefixtune_cancellations_total{reason="disconnect"}') - cancelled == 8
    assert engine.stats().computed_tokens - before < 8 * 120 / 2  # far fewer than the 960 asked for


def test_a_non_streaming_client_that_hangs_up_is_cancelled_too(live):
    url, engine, *_ = live
    cancelled = metric(url, 'prefixtune_cancellations_total{reason="disconnect"}')
    body = {"model": "recipe-mlp", "prompt": LONG, "max_tokens": 120}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.02))
    deadline = time.time() + 30
    while engine.live and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.live
    assert metric(url, 'prefixtune_cancellations_total{reason="disconnect"}') == cancelled + 1


@pytest.mark.slow
def test_overload_beyond_max_queue_gets_429_with_retry_after_and_the_server_stays_healthy(tmp_path):
    write_store(tmp_path / "store")
    limits = Limits(max_tokens=60, max_queue=2)
    app, engine, _ = build_app(
        tiny_model("llama"), tiny_tokenizer(), tmp_path / "store", limits=limits, max_batch_size=1
    )

    async def flood(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": "formal-blog", "prompt": PROMPTS[0], "max_tokens": 60}
            return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=body) for _ in range(10)))

    with running(app) as url:
        answers = asyncio.run(flood(url))
        healthy = httpx.get(f"{url}/health")
        rejected = metric(url, "prefixtune_rejections_total")
    engine.close()
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 429} and codes.count(429) == rejected >= 5
    assert all(a.headers["Retry-After"] == "1" and "busy" in a.text for a in answers if a.status_code == 429)
    assert healthy.status_code == 200 and healthy.json()["engine"] == "continuous"


@pytest.mark.slow
def test_request_timeout_cancels_and_answers_504(tmp_path):
    write_store(tmp_path / "store")
    limits = Limits(max_tokens=120, request_timeout=0.05)
    app, engine, _ = build_app(tiny_model("llama"), tiny_tokenizer(), tmp_path / "store", limits=limits)
    with running(app) as url:
        body = {"model": "formal-blog", "prompt": PROMPTS[0], "max_tokens": 120}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        timeouts = metric(url, 'prefixtune_cancellations_total{reason="timeout"}')
    engine.close()
    assert answer.status_code == 504 and "--request-timeout" in answer.json()["error"]["message"]
    assert timeouts == 1


def test_a_loop_that_cannot_build_its_cache_fails_start_with_the_reason(tmp_path, monkeypatch):
    """transformers sizes the paged cache against the memory it sees (on CPU: RAM, capped to the NUMA
    node) and its loop dies if it does not fit; the engine must say so at start, not serve nothing."""

    def too_big(self):
        raise MemoryError("Memory footprint 3576859648 is more than available memory 3007202918")

    monkeypatch.setattr(continuous.continuous_api.ContinuousBatchingManager, "_create_batch_processor", too_big)
    model = PrefixModel(tiny_model("llama"), name=None, tokenizer=tiny_tokenizer())
    with pytest.raises(RuntimeError, match="loop failed to start: Memory footprint 3576859648 is more than"):
        ContinuousEngine(model, model.tokenizer, max_batch_size=2).start()
    assert model.base_model.config._attn_implementation != continuous.PAGED_ATTENTION  # restored by close()


def test_a_request_to_an_engine_whose_loop_died_gets_503_naming_why_not_silence(tmp_path):
    write_store(tmp_path / "store")
    app, engine, _ = build_app(tiny_model("llama"), tiny_tokenizer(), tmp_path / "store")
    with running(app) as url:
        engine.manager.background_thread_status.record_fatal_error(RuntimeError("the loop crashed"))
        engine.manager.stop(block=True, timeout=30)
        answer = httpx.post(f"{url}/v1/completions", json={"model": "formal-blog", "prompt": PROMPTS[0]}, timeout=60)
        health = httpx.get(f"{url}/health", timeout=60)
    engine.close()
    assert answer.status_code == 503 and "loop has stopped: the loop crashed" in answer.json()["error"]["message"]
    assert health.status_code == 503


def test_openai_client_stop_n_seed_usage_finish_reason_and_list_prompts(live):
    url, engine, store, reference, _ = live
    api = client(url)
    full = api.completions.create(model="recipe-mlp", prompt=LONG, max_tokens=12)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens == len(prompt_ids(LONG))
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    stop = text.split()[3]
    cut = api.completions.create(model="recipe-mlp", prompt=LONG, max_tokens=12, stop=[stop, "zzz"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model="recipe-mlp", prompt=LONG, max_tokens=12, stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.choices[0].text

    many = api.completions.create(model="base", prompt=PROMPTS[:2], max_tokens=4, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: n copies
    assert many.choices[2].text == api.completions.create(model="base", prompt=PROMPTS[1], max_tokens=4).choices[0].text

    sampled = [
        api.completions.create(model="base", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=2)
        for _ in range(2)
    ]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # the seed repeats
    assert sampled[0].choices[0].text != sampled[0].choices[1].text  # choice i uses seed + i

    chat = api.chat.completions.create(
        model="formal-blog", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    same = api.completions.create(model="formal-blog", prompt=PROMPTS[1], max_tokens=5)
    assert chat.choices[0].message.content == same.choices[0].text  # one prompt format for both endpoints


def test_openai_client_streams_usage_when_asked_with_stream_options(live):
    url, *_ = live
    api = client(url)
    whole = api.completions.create(model="recipe-mlp", prompt=PROMPTS[:2], max_tokens=6, n=2)
    chunks = list(
        api.completions.create(
            model="recipe-mlp",
            prompt=PROMPTS[:2],
            max_tokens=6,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    chat = list(
        api.chat.completions.create(
            model="formal-blog",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 5
    plain = list(api.completions.create(model="base", prompt=PROMPTS[0], max_tokens=3, stream=True))
    assert all(chunk.usage is None for chunk in plain)  # not asked: no usage chunk
    with pytest.raises(openai.BadRequestError, match="stream_options needs stream"):
        api.completions.create(model="base", prompt=PROMPTS[0], max_tokens=3, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match=r"stream_options\.include_tokens"):
        api.completions.create(
            model="base", prompt=PROMPTS[0], max_tokens=3, stream=True, stream_options={"include_tokens": 1}
        )


def test_openai_client_logprobs_and_top_logprobs(live):
    url, *_ = live
    api = client(url)
    plain = api.completions.create(model="twitter-wit", prompt=PROMPTS[2], max_tokens=5, logprobs=3)
    logprobs = plain.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp)  # greedy picks the most likely
        assert top[token] == pytest.approx(lp)
    chat = api.chat.completions.create(
        model="twitter-wit",
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == logprobs.tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)


@pytest.mark.parametrize(
    ("kwargs", "status", "named"),
    [
        ({"presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"extra_body": {"best_of": 2, "echo": True}}, 400, "best_of"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "nope"}, 404, "unknown model/prefix"),
    ],
)
def test_openai_client_gets_a_4xx_naming_what_is_not_supported(live, kwargs, status, named):
    url, *_ = live
    arguments = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 2} | kwargs
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).completions.create(**arguments)
    assert caught.value.status_code == status and named in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", "NaN"), ("top_p", "Infinity"), ("temperature", "-Infinity")]
)
def test_non_finite_numbers_get_a_4xx_naming_the_field(live, field, value):
    url, *_ = live
    raw = f'{{"model": "base", "prompt": "cheap", "max_tokens": 2, "{field}": {value}}}'  # JSON as Python writes it
    answer = httpx.post(f"{url}/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and field in answer.text


@needs_smollm2
@pytest.mark.slow
def test_smollm2_continuous_batching_equals_prefix_model_generate_alone():
    """The one real-model check: activation-initialised prefixes on SmolLM2-135M, mixed in one run
    with chunked prefill, token-identical to `PrefixModel.generate` alone."""
    reference_base, tokenizer = load_base_model("smollm2-135m", dtype="float32")
    served_base, _ = load_base_model("smollm2-135m", dtype="float32")
    styles = {"french": "Always answer in French.", "pirate": "You are a pirate. Talk like a pirate, matey!"}
    models = [PrefixModel(base, name=None, tokenizer=tokenizer) for base in (reference_base, served_base)]
    for model in models:
        for name, text in styles.items():
            model.add_prefix(name, PrefixConfig(prefix_length=None, init="activations", init_text=text))
    reference, served = models
    prompts = ["The best way to learn to cook is", "Tell me about the ocean."]
    jobs = [(p, n) for p in prompts for n in ("", *styles)]
    with torch.no_grad():
        snapshots = {n: served.prefix_arguments.row(served.prefix(n)) if n else None for _, n in jobs}
    engine = ContinuousEngine(served, tokenizer, max_batch_size=6, max_batch_tokens=16).start()
    ids = {p: tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts}
    futures = [engine.submit(Request(ids[p], n or BASE_NAME, 12, prefix_inputs=snapshots[n])) for p, n in jobs]
    results = [future.result(timeout=300).token_ids for future in futures]
    engine.close()
    for (prompt, name), got in zip(jobs, results, strict=True):
        out = reference.generate(
            input_ids=torch.tensor([ids[prompt]]), prefix=[name], max_new_tokens=12, do_sample=False
        )[0, len(ids[prompt]) :].tolist()
        want = out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        assert got == want, (prompt, name)


def test_metrics_count_requests_latencies_and_engine_state_in_prometheus_format(live):
    url, *_ = live
    before = metric(url, "prefixtune_time_to_first_token_seconds_count")
    body = {"model": "twitter-wit", "prompt": LONG, "max_tokens": 5}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    assert metric(url, "prefixtune_time_to_first_token_seconds_count") == before + 1
    assert metric(url, "prefixtune_time_per_output_token_seconds_count") >= 1
    assert metric(url, 'prefixtune_requests_total{outcome="ok",prefix="twitter-wit"}') >= 1
    text = httpx.get(f"{url}/metrics").text
    for name in ("prefixtune_queue_depth 0.0", "prefixtune_running_rows 0.0", "# TYPE prefixtune_computed_tokens"):
        assert name in text


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("deepseek_v3", "different head sizes"),
        ("mistral", "sliding-window"),
        ("roberta", "its own positions"),
        ("bart", "its own positions"),
        ("gpt_oss", "does not support sdpa"),  # attention sinks, here with every layer full attention
    ],
)
def test_continuous_engine_refuses_models_it_is_not_exact_for_and_auto_picks_microbatch(model_type, reason):
    from architecture_walk import build
    from prefixtune import UnsupportedModelError
    from prefixtune.serving import make_engine

    base = build(model_type, **({"layer_types": ["full_attention"] * 2} if model_type == "gpt_oss" else {}))
    if model_type == "mistral":
        base.config.sliding_window = 3
    model = PrefixModel(base, name=None)
    with pytest.raises(UnsupportedModelError, match=f"not exact here: .*{reason}"):
        ContinuousEngine(model, tiny_tokenizer())
    assert make_engine(model, tiny_tokenizer(), engine="auto").name == "microbatch"
    assert make_engine(PrefixModel(tiny_model("llama"), name=None), tiny_tokenizer(), engine="auto").name == (
        "continuous"
    )


def test_paged_attention_equals_transformers_dense_mask_attention_per_request():
    """Per-request spans (a fresh prompt, a prefill chunk after earlier tokens, decode rows) give what
    transformers' own sdpa gives with its dense block mask over all rows' keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prefixtune.serving.paged_attention import paged_sdpa

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    spans = [(5, 5), (3, 9), (1, 12), (1, 1), (4, 4)]  # (new queries, keys incl. cached) per request
    queries, keys = sum(q for q, _ in spans), sum(k for _, k in spans)
    query, key, value = torch.randn(1, 6, queries, 8), torch.randn(1, 2, keys, 8), torch.randn(1, 2, keys, 8)
    dense = torch.zeros(queries, keys, dtype=torch.bool)  # transformers' CB mask: each row its own keys, causal
    cu_q, cu_k = [0], [0]
    for q, k in spans:
        block = torch.ones(q, k, dtype=torch.bool).tril(k - q)
        dense[cu_q[-1] : cu_q[-1] + q, cu_k[-1] : cu_k[-1] + k] = block
        cu_q.append(cu_q[-1] + q)
        cu_k.append(cu_k[-1] + k)
    expected, _ = sdpa_attention_forward(module, query, key, value, dense[None, None], is_causal=False)
    got, _ = paged_sdpa(
        module, query, key, value, None, cu_seq_lens_q=torch.tensor(cu_q), cu_seq_lens_k=torch.tensor(cu_k)
    )
    assert got.shape == expected.shape == (1, queries, 6, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_continuous_engine_runs_the_base_on_per_request_paged_attention_and_restores_it(tmp_path):
    from prefixtune.serving.paged_attention import PAGED_ATTENTION

    model = PrefixModel(tiny_model("llama"), name=None, tokenizer=tiny_tokenizer())
    before = model.base_model.config._attn_implementation
    engine = ContinuousEngine(model, model.tokenizer, max_batch_size=2).start()
    try:
        assert model.base_model.config._attn_implementation == PAGED_ATTENTION
        assert engine.submit(Request(prompt_ids(PROMPTS[0]), BASE_NAME, 3)).result(timeout=60).token_ids
    finally:
        engine.close()
    assert model.base_model.config._attn_implementation == before


@pytest.mark.slow
def test_loading_a_prefix_pauses_the_continuous_engine_only_if_it_runs_the_base(tmp_path):
    """kv and mlp prefixes give their keys/values from their own parameters: loading them while the
    engine decodes does not stop it (a 1,000-prefix store loads on first use, under load); a hidden
    prefix runs the base's key/value path once, in a pause between two steps. Served keys/values
    equal the reference's either way."""
    write_store(tmp_path / "store")
    reference = reference_model(tmp_path / "store")
    model = PrefixModel(tiny_model("llama"), name=None, tokenizer=tiny_tokenizer())
    engine = ContinuousEngine(model, model.tokenizer, max_batch_size=4).start()
    store = PrefixStore(model, tmp_path / "store", exclusive=engine.exclusive)
    pauses = []
    pause = engine.manager.pause
    engine.manager.pause = lambda *a, **k: pauses.append(1) or pause(*a, **k)
    try:
        for name in PREFIXES:
            before = len(pauses)
            served = store.snapshot(name)
            expected = reference.prefix_inputs(name, 1)["prefix_key_values"][0]
            torch.testing.assert_close(served["prefix_key_values"], expected, rtol=0, atol=0)
            assert len(pauses) - before == (1 if PREFIXES[name].parameterization == "hidden" else 0), name
    finally:
        engine.close()
