"""The admin routes: ``PUT /admin/prefixes/{name}`` (multipart ``weights`` + ``config``) and
``DELETE /admin/prefixes/{name}``, behind ``Authorization: Bearer <token>`` (disabled: 403, when
the server was started without a token). A bad upload answers 400 naming the problem; a store that
could not change its folder answers 500 and keeps the prefix as it was. ``POST /admin/prefix-cache/reset``
empties the vLLM engine's prefix cache (benchmarks start each phase cold; other engines keep none: 400)."""

from __future__ import annotations

import asyncio
import logging
import secrets

from fastapi import APIRouter, File, Header, HTTPException, UploadFile

from .context import Served, ServedDep
from .store import StoreError, StoreWriteError, UnknownPrefix

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/admin/prefixes")
cache_router = APIRouter(prefix="/admin/prefix-cache")


def authorize(server: Served, authorization: str | None) -> None:
    if server.admin_token is None:
        raise HTTPException(403, "admin endpoints are disabled: start the server with an admin token")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), server.admin_token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def read_limited(server: Served, upload: UploadFile, what: str) -> bytes:
    limit = server.limits.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{what} is larger than the upload limit of {limit} bytes")
    return data


def _write_failed(action: str, name: str, error: StoreWriteError) -> HTTPException:
    logger.error("%s of prefix %r failed; the prefix is unchanged", action, name, exc_info=error)
    return HTTPException(500, str(error))


@router.put("/{name}")
async def upload_prefix(
    name: str,
    server: ServedDep,
    weights: UploadFile = File(...),
    config: UploadFile = File(...),
    authorization: str | None = Header(None),
):
    authorize(server, authorization)
    weights_bytes = await read_limited(server, weights, "weights")
    config_bytes = await read_limited(server, config, "config")
    try:
        await asyncio.to_thread(server.store.upload, name, weights_bytes, config_bytes)
    except StoreError as error:
        raise HTTPException(400, str(error)) from error
    except StoreWriteError as error:
        raise _write_failed("upload", name, error) from error
    return {"uploaded": name, "prefixes": server.store.names()}


@router.delete("/{name}")
async def delete_prefix(name: str, server: ServedDep, authorization: str | None = Header(None)):
    authorize(server, authorization)
    try:
        await asyncio.to_thread(server.store.delete, name)
    except StoreError as error:
        raise HTTPException(400, str(error)) from error
    except UnknownPrefix as error:
        raise HTTPException(404, str(error.args[0])) from error
    except StoreWriteError as error:
        raise _write_failed("delete", name, error) from error
    return {"deleted": name, "prefixes": server.store.names()}


@cache_router.post("/reset")
async def reset_prefix_cache(server: ServedDep, authorization: str | None = Header(None)):
    authorize(server, authorization)
    done = await asyncio.to_thread(server.engine.reset_prefix_cache)
    if done is None:
        raise HTTPException(400, f"the {server.engine.name} engine keeps no prefix cache across requests")
    if not done:
        raise HTTPException(409, "vLLM did not reset its prefix cache (requests are running): retry when idle")
    return {"reset": True}
