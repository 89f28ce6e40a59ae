"""Shared by the engines' server tests: a Prometheus metric's value, streams that hang up, replacing and
deleting prefixes while requests of them run, and the check that every admitted request kept the version it
was admitted with."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import httpx


def metric(url: str, name: str) -> float:
    """The sum of the server's Prometheus samples whose name (with labels) starts with `name`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def hang_up_streams(url: str, body: dict, count: int, busy: Callable[[], bool]) -> None:
    """`count` streamed requests of `body` at once, each hanging up after its first chunk; returns once
    `busy()` is false (the engine dropped them) or 30 s have passed."""

    def hang_up() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=60) as response:
            next(response.iter_lines())  # the first chunk, then hang up

    threads = [threading.Thread(target=hang_up) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    deadline = time.time() + 30
    while busy() and time.time() < deadline:
        time.sleep(0.05)


def change_prefixes_under_load(
    url: str, names: Sequence[str], body: dict, running_rows: Callable[[], float], auth: dict, replacement: dict
) -> list[httpx.Response]:
    """Send `body` for each prefix of `names` three times; once `running_rows()` reaches 3, delete ``names[0]``
    and replace ``names[1]`` with the upload `replacement` (multipart files) at once; the 9 answers in order."""

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            calls = [http.post(f"{url}/v1/completions", json=body | {"model": name}) for name in list(names) * 3]
            tasks = [asyncio.ensure_future(call) for call in calls]
            while running_rows() < 3:
                await asyncio.sleep(0.01)
            changes = [
                http.delete(f"{url}/admin/prefixes/{names[0]}", headers=auth),
                http.put(f"{url}/admin/prefixes/{names[1]}", files=replacement, headers=auth),
            ]
            assert all(r.is_success for r in await asyncio.gather(*changes))
            return await asyncio.gather(*tasks)

    return asyncio.run(load())


def assert_admitted_kept_their_version(url: str, answers: list[httpx.Response], expected: dict, deleted: str) -> None:
    """Every answer succeeded with its prefix's text from before the changes (`expected` by prefix name),
    and the deleted prefix is gone for new requests."""
    assert [a.status_code for a in answers] == [200] * len(answers)
    for answer in answers:
        assert answer.json()["choices"][0]["text"] == expected[answer.json()["model"]]
    after = httpx.post(f"{url}/v1/completions", json={"model": deleted, "prompt": "a", "max_tokens": 2})
    assert after.status_code == 404
