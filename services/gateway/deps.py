"""What routes read from the app: the shared resources, settings, metrics and the request body.

Each accessor is a plain function of the request (for code that already holds one) and an
`Annotated` dependency for route parameters (`resources: ResourcesDep`), so nothing is a
module-level global. The dependencies are coroutines: FastAPI would run plain functions in its
thread pool, which costs more than the lookup itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from nats.aio.client import Client

from services.gateway.metrics import GatewayMetrics
from services.gateway.nonces import MemoryNonces, NonceLog
from services.gateway.settings import GatewaySettings
from shared.flowconfig import FlowConfigs, InstanceRegistry
from shared.ports import EventLog, FunctionCatalog, TaskReadModel
from shared.triggers import TriggerCatalog


@dataclass(frozen=True)
class Resources:
    """What the routes use, opened by the app's lifespan (or handed in by a test)."""

    nc: Client
    catalog: FunctionCatalog
    events: EventLog
    tasks: TaskReadModel
    triggers: TriggerCatalog | None = None  # None only for tests that exercise no trigger route
    nonces: NonceLog = field(default_factory=MemoryNonces)  # signature nonces seen (replay protection)
    # Flow control (concurrency and scaling configs, live instances); None only in tests that
    # exercise other routes with fakes.
    flow: FlowConfigs | None = None
    instances: InstanceRegistry | None = None


def resources_of(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


def settings_of(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


def metrics_of(request: Request) -> GatewayMetrics:
    metrics: GatewayMetrics = request.app.state.metrics
    return metrics


def body_of(request: Request) -> bytes:
    """The request body `auth.guard_request` read."""
    body: bytes = getattr(request.state, "body", b"")
    return body


async def _resources(request: Request) -> Resources:
    return resources_of(request)


async def _settings(request: Request) -> GatewaySettings:
    return settings_of(request)


async def _metrics(request: Request) -> GatewayMetrics:
    return metrics_of(request)


async def _body(request: Request) -> bytes:
    return body_of(request)


ResourcesDep = Annotated[Resources, Depends(_resources)]
SettingsDep = Annotated[GatewaySettings, Depends(_settings)]
MetricsDep = Annotated[GatewayMetrics, Depends(_metrics)]
BodyDep = Annotated[bytes, Depends(_body)]
