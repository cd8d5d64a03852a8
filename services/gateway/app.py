"""The gateway's FastAPI app: routers, error handling, metrics, and the resources' lifetime.

`create_app(settings)` opens NATS and MongoDB in its lifespan (closing them in reverse order on
shutdown); a test may hand in ready `resources` instead, which the app then neither opens nor
closes. Nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import start_http_server

from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.flowconfig import FlowConfigs, InstanceRegistry
from shared.service import background, periodically
from shared.taskstore import TaskStore
from shared.triggers import TriggerCatalog
from services.gateway import (
    aliases,
    async_configs,
    flow_control,
    function_code,
    functions,
    http_triggers,
    invocations,
    openapi,
    task_logs,
    tasks,
    triggers,
    versions,
    watch,
)
from services.gateway.auth import guard_request
from services.gateway.code_gc import sweep_code
from services.gateway.console import build_router as build_console_router
from services.gateway.context import RequestContextMiddleware, install_exception_handlers
from services.gateway.deps import Resources
from services.gateway.errors import json_response
from services.gateway.fast_path import AsyncSubmissionFastPath
from services.gateway.metrics import GatewayMetrics
from services.gateway.nonces import KvNonces
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

async def open_resources(settings: GatewaySettings, stack: AsyncExitStack) -> Resources:
    """Connect to NATS (ensuring the event stream and catalog buckets) and MongoDB.

    Each close is registered on `stack` as soon as its resource is open, so a failure halfway
    still closes what was opened, in reverse order.
    """
    bus = await open_bus(settings.common, stack, name=wire.GATEWAY_CLIENT_NAME)
    catalog = await open_catalog(bus, stack)
    log.info("nats ready", extra={"stream": wire.EVENT_STREAM})
    triggers = await TriggerCatalog.open(bus.js)
    await triggers.watch()
    stack.push_async_callback(triggers.close)
    flow_configs = await FlowConfigs.open(bus.js, replicas=settings.common.stream_replicas)
    await flow_configs.watch()
    stack.push_async_callback(flow_configs.close)
    instances = await InstanceRegistry.open(bus.js, replicas=settings.common.stream_replicas)
    nonces = await KvNonces.open(bus.js, remember_s=2 * settings.max_clock_skew_s,
                                 replicas=settings.common.stream_replicas)
    task_store = await TaskStore.connect(settings.common.mongodb_url)
    stack.push_async_callback(task_store.close)
    return Resources(nc=bus.nc, catalog=catalog, events=bus.events, tasks=task_store, triggers=triggers,
                     nonces=nonces, flow=flow_configs, instances=instances)


def _serve_metrics_port(metrics: GatewayMetrics, settings: GatewaySettings, stack: AsyncExitStack) -> None:
    """Also expose the registry on its own port when TASKMODE_GATEWAY_METRICS_PORT asks for one."""
    port = settings.common.metrics_port
    if not port:
        return
    server, thread = start_http_server(port, addr=settings.host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    stack.callback(stop)
    log.info("metrics port open", extra={"port": port})


def create_app(
    settings: GatewaySettings, *, resources: Resources | None = None, metrics: GatewayMetrics | None = None
) -> FastAPI:
    """The gateway app; with `resources` given, the lifespan uses them as they are."""
    gateway_metrics = metrics or GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.resources = resources if resources is not None else await open_resources(settings, stack)
            _serve_metrics_port(gateway_metrics, settings, stack)
            if resources is None and settings.code_gc_every_s > 0:
                catalog = app.state.resources.catalog
                stopped = asyncio.Event()
                stack.callback(stopped.set)

                async def collect_code() -> None:
                    await sweep_code(catalog, grace_s=settings.code_gc_grace_s)

                background(stack, periodically(collect_code, every_s=settings.code_gc_every_s, stop=stopped,
                                               what="code garbage collection"))
            log.info(
                "gateway ready",
                extra={"host": settings.host, "port": settings.port, "auth_disabled": settings.auth_disabled},
            )
            yield
            log.info("gateway shutting down")

    # No trailing-slash redirects: a redirected signed request would not verify anyway.
    app = FastAPI(lifespan=lifespan, openapi_url="/openapi.json", docs_url=None, redoc_url=None, redirect_slashes=False)
    openapi.install(app)
    app.state.settings = settings
    app.state.metrics = gateway_metrics
    if resources is not None:  # usable at once, even by a test transport that skips the lifespan
        app.state.resources = resources
    install_exception_handlers(app)
    # Added first, so it runs inside the request context (request id, timing, 500s).
    app.add_middleware(AsyncSubmissionFastPath, state=app.state)
    app.add_middleware(RequestContextMiddleware, observe=gateway_metrics.observe_request)

    api = APIRouter(prefix=f"/{wire.API_VERSION}", dependencies=[Depends(guard_request)])
    for module in (functions, async_configs, invocations, tasks, watch):
        api.include_router(module.router)
    api.include_router(triggers.router)
    for module in (versions, aliases, function_code, task_logs, flow_control):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(build_console_router())
    # HTTP triggers sit outside the signed API: each trigger's authType decides (http_triggers.py).
    app.include_router(http_triggers.router)
    # Signed, expiring download links of GetFunctionCode (function_code.py).
    app.include_router(function_code.downloads)

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        opened: Resources | None = getattr(request.app.state, "resources", None)
        if opened is None or not opened.nc.is_connected:
            return json_response({"status": "unavailable"}, status_code=503)
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        opened: Resources | None = getattr(request.app.state, "resources", None)
        checks = {"nats": opened is not None and opened.nc.is_connected,
                  "mongodb": opened is not None and await opened.tasks.reachable()}
        ready = all(checks.values())
        return json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(gateway_metrics.render(), media_type=gateway_metrics.content_type)

    return app
