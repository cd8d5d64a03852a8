"""The web console at /console: server-rendered pages (Jinja2 + htmx), live streams, charts.

`build_router()` is included by the gateway app; its lifespan (run inside the app's, once NATS
and MongoDB are open) puts the console's state on the app and closes it at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from services.gateway.deps import Resources
from services.gateway.console import auth_pages, function_pages, live, task_pages
from services.gateway.console.common import ConsoleState
from services.gateway.console.monitoring import MetricsSampler
from services.gateway.console.render import build_environment
from services.gateway.console.session import SignInThrottle
from services.gateway.console.settings import ConsoleSettings
from services.gateway.metrics import GatewayMetrics
from shared.transitions import Status


def _backlog_counter(app: FastAPI) -> Callable[[str], Awaitable[int]]:
    """Counts a function's Enqueued tasks in the read model (the scheduler's backlog is global)."""

    async def count(function: str) -> int:
        resources: Resources = app.state.resources
        return await resources.tasks.count_with_status(function, Status.ENQUEUED)

    return count


def build_router(settings: ConsoleSettings | None = None) -> APIRouter:
    """The console's routes; `settings` default to the TASKMODE_CONSOLE_* environment."""
    chosen = settings if settings is not None else ConsoleSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics: GatewayMetrics = app.state.metrics
        sampler = MetricsSampler(urls=chosen.metrics_urls, own_metrics=metrics.render,
                                 count_backlog=_backlog_counter(app), every_s=chosen.sample_every_s)
        app.state.console = ConsoleState(settings=chosen, templates=build_environment(), sampler=sampler,
                                         throttle=SignInThrottle())
        try:
            yield
        finally:
            await sampler.close()

    router = APIRouter(lifespan=lifespan)
    # live before the task pages: its paths are more specific.
    for module in (auth_pages, function_pages, live, task_pages):
        router.include_router(module.router)
    return router
