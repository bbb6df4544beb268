"""The GPU-orchestrator API (worker pools) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loom.serve.auth import require_admin, require_key
from loom.serve.errors import APIError
from loom.serve.schemas import PoolCreate, PoolSwap
from loom.serve.service import service_of

router = APIRouter()


def _pools(request: Request) -> Any:
    return request.app.state.pools


@router.get("/workers/pools", dependencies=[Depends(require_key)])
async def list_pools(request: Request) -> dict[str, Any]:
    return {"pools": _pools(request).describe()}


@router.post("/workers/pools", dependencies=[Depends(require_admin)], status_code=201)
async def create_pool(body: PoolCreate, request: Request) -> dict[str, Any]:
    service = service_of(request)
    _engine, registry = service.ready()
    if body.base is not None and body.base not in (registry.base_name, registry.base_ref):
        raise APIError(
            400,
            f"base {body.base!r}: this server serves {registry.base_ref}; start another "
            f"'loom serve --base {body.base}' for that base",
            param="base",
        )
    if bool(body.agent) == bool(body.adapter):
        raise APIError(400, "give exactly one of agent or adapter (with an optional base)", param="agent")
    pool = await asyncio.to_thread(_pools(request).create, body.agent or body.adapter, body.warm_size)
    return asdict(pool)


@router.post("/workers/pool/{pool_id}/swap", dependencies=[Depends(require_admin)])
async def swap_pool(pool_id: str, body: PoolSwap, request: Request) -> dict[str, Any]:
    return asdict(await asyncio.to_thread(_pools(request).swap, pool_id, body.version))


@router.delete("/workers/pool/{pool_id}", dependencies=[Depends(require_admin)])
async def delete_pool(pool_id: str, request: Request) -> dict[str, Any]:
    pool = await asyncio.to_thread(_pools(request).delete, pool_id)
    return {"id": pool.id, "deleted": True}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = service_of(request).metrics.registry
    # off the loop: collectors read engine state under locks (and a vLLM backend's last scrape)
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
