"""`prefixtune serve --engine vllm`: the real server (a subprocess on 127.0.0.1) through the official
`openai` client. Greedy float32 answers equal `PrefixModel.generate` of each request alone (mixed
prefixes of different lengths and a request without a prefix, in one batch); replacing and deleting
prefixes under load fails or changes no admitted request; a hung-up stream is aborted in vLLM; bad
prefixes get a 4xx and the server stays up; bad set-ups get a clear error.

The server tests need vLLM (`bash scripts/setup.sh --vllm`, then run with `.venv-vllm/bin/python -m
pytest`); in the default environment they are skipped and only the "vLLM missing" error is checked.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.cli import app
from prefixtune.data import PromptFormatter
from prefixtune.serving.background import free_port, wait_healthy
from prefixtune.vllm import KV_FOLDER, content_hash, write_kv
from prefixtune.vllm.kv_folder import KVFolder
from serving_load import assert_admitted_kept_their_version, change_prefixes_under_load, hang_up_streams, metric
from tiny import SPECIAL, VOCAB, tiny_tokenizer, vllm_llama

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: bash scripts/setup.sh --vllm, then .venv-vllm")
SRC = Path(__file__).resolve().parents[1] / "src"
TOKEN = "s3cret"
PREFIXES = {  # three lengths and all three parameterizations (hidden and mlp are compiled to keys/values)
    "short-kv": PrefixConfig(prefix_length=3, init_std=1.0),
    "long-hidden": PrefixConfig(prefix_length=12, parameterization="hidden", init_std=1.0),
    "mid-mlp": PrefixConfig(prefix_length=6, parameterization="mlp", init_std=1.0, mlp_hidden_size=16),
}
PROMPTS = ["the restaurant near the river", "cheap food", "a pub in the city centre with family friendly"]
LONG = PROMPTS[1]
MAX_MODEL_LEN = 160


def vllm_tiny_model(seed: int = 0):
    """The served model: a tiny random Llama vLLM's CPU attention runs, over the tiny tokenizer's words."""
    special = {"pad_token_id": SPECIAL["pad"], "eos_token_id": SPECIAL["eos"], "bos_token_id": SPECIAL["eos"]}
    return vllm_llama(seed, vocab_size=VOCAB, max_position_embeddings=MAX_MODEL_LEN, initializer_range=0.3, **special)


def save_model_folder(folder: Path) -> Path:
    model = vllm_tiny_model()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_prefix(folder: Path, name: str, config: PrefixConfig, seed: int) -> None:
    torch.manual_seed(seed)
    PrefixModel(vllm_tiny_model(), config, name=name, tokenizer=tiny_tokenizer()).save_prefix(folder / name)


def write_foreign_prefix(folder: Path) -> None:
    """A prefix trained on another base (other sizes and weights: its fingerprint differs)."""
    torch.manual_seed(3)
    other = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    PrefixModel(other, PrefixConfig(prefix_length=3), name="foreign").save_prefix(folder)


def serve_command(model: Path, store: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "prefixtune",
        "serve",
        "--engine",
        "vllm",
        "--model",
        str(model),
        "--prefix-store",
        str(store),
        "--port",
        str(port),
        "--admin-token",
        TOKEN,
        "--max-batch-size",
        "8",
        "--max-prompt-tokens",
        "64",
        "--max-tokens",
        "120",
        "--vllm-kv-cache-gb",
        "0.25",
        "--max-queue",
        "16",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        *extra,
    ]


def environment() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model = save_model_folder(root / "model")
    store = root / "store"
    for index, (name, config) in enumerate(PREFIXES.items()):
        write_prefix(store, name, config, 100 + index)
    write_foreign_prefix(store / "foreign")  # bad prefixes the server must refuse on request (it lists them now)
    write_prefix(store, "too-long", PrefixConfig(prefix_length=MAX_MODEL_LEN, init_std=1.0), 4)
    stale = write_kv(store / KV_FOLDER, torch.ones(2, 2, 1, 3, 32))  # a compiled prefix a killed server left
    port = free_port()
    process = subprocess.Popen(serve_command(model, store, port), env=environment())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=600)
        assert not (store / KV_FOLDER / f"{stale}.safetensors").exists()  # removed at start-up
        yield url, store, process
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert KVFolder(store / KV_FOLDER).files() == []  # removed at shutdown


def reference(store: Path, name: str) -> PrefixModel:
    """The base with `name` loaded from the store's files (what the server serves), in this process."""
    model = PrefixModel(vllm_tiny_model(), name=None, tokenizer=tiny_tokenizer())
    if name != "base":
        model.load_prefix(store / name, name=name)
    return model


def alone(store: Path, prompt: str, name: str, max_tokens: int) -> str:
    """`PrefixModel.generate` of the request by itself (greedy, float32), decoded as the server does."""
    model = reference(store, name)
    ids = PromptFormatter(tiny_tokenizer()).prompt_ids(prompt)
    output = model.generate(
        input_ids=torch.tensor([ids]),
        prefix=["" if name == "base" else name],
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=SPECIAL["eos"],
        pad_token_id=SPECIAL["pad"],
    )[0, len(ids) :].tolist()
    output = output[: output.index(SPECIAL["eos"])] if SPECIAL["eos"] in output else output
    return tiny_tokenizer().decode(output, skip_special_tokens=True)


def served_hash(store: Path, name: str) -> str:
    """The content hash (compiled file name) of the store's prefix `name` as the server compiles it."""
    model = reference(store, name)
    with torch.no_grad():
        return content_hash(model.prefix_arguments.row(model.prefixes[name])["prefix_key_values"])


def client(url: str):
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def watch_rows(url: str, seen: list[float], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient() as http:
        while not stop.is_set():
            text = (await http.get(f"{url}/metrics")).text
            seen += [float(line.split()[1]) for line in text.splitlines() if line.startswith("prefixtune_running_rows")]
            await asyncio.sleep(0.02)


@needs_vllm
@pytest.mark.slow
def test_mixed_prefixes_of_different_lengths_and_no_prefix_in_one_batch_equal_prefix_model_generate(live):
    url, store, _ = live
    jobs = [(p, n, 20 + 13 * i % 40) for i, (p, n) in enumerate((p, n) for p in PROMPTS for n in ["base", *PREFIXES])]

    async def ask_all() -> tuple[list[str], list[float]]:
        openai_client, seen, stop = client(url), [], asyncio.Event()
        watcher = asyncio.ensure_future(watch_rows(url, seen, stop))
        calls = [openai_client.completions.create(model=n, prompt=p, max_tokens=m) for p, n, m in jobs]
        answers = await asyncio.gather(*calls)
        stop.set()
        await watcher
        return [a.choices[0].text for a in answers], seen

    texts, rows = asyncio.run(ask_all())
    for (prompt, name, max_tokens), text in zip(jobs, texts, strict=True):
        assert text == alone(store, prompt, name, max_tokens), (prompt, name)
    assert max(rows) >= 4  # they really ran together: several rows in vLLM's running batch at once
    assert len({text for (p, _, _), text in zip(jobs, texts, strict=True) if p == PROMPTS[0]}) > 1  # prefixes act


@needs_vllm
@pytest.mark.slow
def test_streaming_and_logprobs_through_the_openai_client(live):
    url, store, _ = live

    async def stream() -> tuple[str, list]:
        chunks = await client(url).completions.create(
            model="long-hidden", prompt=PROMPTS[0], max_tokens=30, stream=True, logprobs=2
        )
        text, logprobs = "", []
        async for chunk in chunks:
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs:
                logprobs += chunk.choices[0].logprobs.token_logprobs
        return text, logprobs

    text, logprobs = asyncio.run(stream())
    assert text == alone(store, PROMPTS[0], "long-hidden", 30)
    assert logprobs and all(lp <= 0 for lp in logprobs)


def prefix_files(folder: Path, name: str, seed: int, length: int = 4) -> dict:
    write_prefix(folder, name, PrefixConfig(prefix_length=length, init_std=1.0), seed)
    return {
        "weights": ("prefix.safetensors", (folder / name / "prefix.safetensors").read_bytes()),
        "config": ("prefix_config.json", (folder / name / "prefix_config.json").read_bytes()),
    }


@needs_vllm
@pytest.mark.slow
def test_replace_and_delete_under_load_never_fail_or_change_admitted_requests(live, tmp_path):
    url, store, _ = live
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for name, seed in (("victim", 7), ("swapped", 8)):
        answer = httpx.put(f"{url}/admin/prefixes/{name}", files=prefix_files(tmp_path, name, seed), headers=auth)
        assert answer.is_success, answer.text
    expected = {name: alone(store, LONG, name, 60) for name in ("victim", "swapped", "short-kv")}
    gone = {served_hash(store, name) for name in ("victim", "swapped")}  # their files once nothing holds them

    answers = change_prefixes_under_load(
        url,
        ["victim", "swapped", "short-kv"],
        {"prompt": LONG, "max_tokens": 60},
        lambda: metric(url, "prefixtune_running_rows"),
        auth,
        prefix_files(tmp_path / "new", "swapped", seed=9, length=6),
    )
    assert_admitted_kept_their_version(url, answers, expected, deleted="victim")
    body = {"model": "swapped", "prompt": LONG, "max_tokens": 60}
    replaced = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    assert replaced == alone(store, LONG, "swapped", 60) != expected["swapped"]  # new requests: the new version
    files = KVFolder(store / KV_FOLDER)
    deadline = time.time() + 30  # the last handlers let go of their snapshots just after answering
    while gone & {p.stem for p in files.files()} and time.time() < deadline:
        time.sleep(0.2)
    assert not gone & {p.stem for p in files.files()}  # deleted / replaced versions' files are removed
    assert served_hash(store, "swapped") in {p.stem for p in files.files()}  # the version served now is there


@needs_vllm
@pytest.mark.slow
def test_resetting_vllms_prefix_cache_keeps_answers_the_same(live):
    url, store, _ = live
    body = {"model": "mid-mlp", "prompt": PROMPTS[2], "max_tokens": 12}
    before = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    assert httpx.post(f"{url}/admin/prefix-cache/reset").status_code == 401
    answer = httpx.post(f"{url}/admin/prefix-cache/reset", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.json() == {"reset": True}
    after = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    assert after == before == alone(store, PROMPTS[2], "mid-mlp", 12)  # the prefix loaded again by the connector


@needs_vllm
@pytest.mark.slow
def test_a_hung_up_stream_is_aborted_in_vllm(live):
    url, _, _ = live
    before = metric(url, "prefixtune_computed_tokens")
    cancelled = metric(url, 'prefixtune_cancellations_total{reason="disconnect"}')

    body = {"model": "mid-mlp", "prompt": LONG, "max_tokens": 120}
    hang_up_streams(
        url, body, 6, lambda: bool(metric(url, "prefixtune_running_rows") or metric(url, "prefixtune_queue_depth"))
    )
    assert metric(url, "prefixtune_running_rows") == 0 and metric(url, "prefixtune_queue_depth") == 0
    assert metric(url, 'prefixtune_cancellations_total{reason="disconnect"}') - cancelled == 6
    assert metric(url, "prefixtune_computed_tokens") - before < 6 * 120 / 2  # aborted, not run to the end


@needs_vllm
@pytest.mark.slow
def test_overload_beyond_max_queue_gets_429_with_retry_after_and_every_admitted_request_finishes(live):
    url, _, _ = live  # --max-queue 16 (serve_command)

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": "short-kv", "prompt": LONG, "max_tokens": 30}
            return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=body) for _ in range(48)))

    answers = asyncio.run(flood())
    codes = sorted({a.status_code for a in answers})
    assert codes == [200, 429], codes
    assert all(a.headers["Retry-After"] == "1" for a in answers if a.status_code == 429)
    assert len({a.json()["choices"][0]["text"] for a in answers if a.status_code == 200}) == 1  # all alike
    assert metric(url, "prefixtune_rejections_total") >= sum(a.status_code == 429 for a in answers)
    assert httpx.get(f"{url}/health").status_code == 200


@needs_vllm
@pytest.mark.slow
def test_bad_prefixes_get_a_4xx_with_the_reason_and_the_server_stays_up(live, tmp_path):
    url, store, _ = live
    wrong = httpx.post(f"{url}/v1/completions", json={"model": "foreign", "prompt": LONG, "max_tokens": 2})
    assert wrong.status_code == 400 and "different base model" in wrong.json()["error"]["message"]
    write_foreign_prefix(tmp_path / "upload")
    files = {
        "weights": ("prefix.safetensors", (tmp_path / "upload" / "prefix.safetensors").read_bytes()),
        "config": ("prefix_config.json", (tmp_path / "upload" / "prefix_config.json").read_bytes()),
    }
    upload = httpx.put(f"{url}/admin/prefixes/foreign2", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
    assert upload.status_code == 400 and "different base model" in upload.json()["error"]["message"]
    body = {"model": "too-long", "prompt": LONG, "max_tokens": 2}
    long = httpx.post(f"{url}/v1/completions", json=body)
    message = long.json()["error"]["message"]
    assert long.status_code == 400 and f"window of {MAX_MODEL_LEN} tokens" in message and "too-long" in message
    fine = httpx.post(f"{url}/v1/completions", json={"model": "short-kv", "prompt": LONG, "max_tokens": 5})
    assert fine.status_code == 200 and httpx.get(f"{url}/health").json()["engine"] == "vllm"


@needs_vllm
@pytest.mark.slow
def test_a_model_vllm_cannot_load_is_a_clear_error(tmp_path):
    save_model_folder(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())  # save_pretrained writes its own class
    config["architectures"] = ["NoSuchArchitectureForCausalLM"]  # transformers loads it by model_type; vLLM cannot
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    command = serve_command(tmp_path / "model", tmp_path / "store", free_port())
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "vLLM cannot serve model" in output and "NoSuchArchitectureForCausalLM" in output


@pytest.mark.skipif(HAS_VLLM, reason="checks the error where vLLM is missing")
def test_engine_vllm_without_vllm_names_the_setup_command_and_the_executable(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--engine", "vllm", "--prefix-store", str(tmp_path)])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "bash scripts/setup.sh --vllm" in message and ".venv-vllm/bin/prefixtune" in message
