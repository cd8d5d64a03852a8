"""Sending one destination record: to a webhook, a NATS subject, or a function (as a task)."""

from __future__ import annotations

import asyncio
import time

import httpx
from nats.aio.client import Client

from shared import wire
from shared.destinations import FunctionTarget, NatsTarget, Target, WebhookTarget, destination_task_id, sign_webhook
from shared.errors import TaskAlreadyExists, TaskmodeError
from shared.ports import EventLog, FunctionCatalog
from shared.submission import Admission, new_request_id, submit

# How long a NATS publish may take to reach the server.
NATS_FLUSH_TIMEOUT_S = 5


class DeliveryFailed(Exception):
    """This attempt did not deliver; `reason` says why (it goes into the delivery record)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def kind_of(target: Target) -> str:
    return {WebhookTarget: "webhook", NatsTarget: "nats", FunctionTarget: "function"}[type(target)]


class Senders:
    def __init__(self, *, http: httpx.AsyncClient, nc: Client, events: EventLog, catalog: FunctionCatalog,
                 secret: str, timeout_s: float) -> None:
        self._http = http
        self._timeout_s = timeout_s
        self._nc = nc
        self._events = events
        self._catalog = catalog
        self._secret = secret

    async def send(self, target: Target, record: bytes, *, function: str, task_id: str) -> None:
        """Deliver `record` for task `task_id` of `function`; `DeliveryFailed` when this attempt did not."""
        delivery_id = f"{function}/{task_id}"
        if isinstance(target, WebhookTarget):
            await self._post(target.url, record, delivery_id)
        elif isinstance(target, NatsTarget):
            try:
                await self._nc.publish(target.subject, record, headers={wire.HEADER_MSG_ID: delivery_id,
                                                                        wire.DELIVERY_ID_HEADER: delivery_id})
                await self._nc.flush(timeout=NATS_FLUSH_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - any bus trouble: try again later
                raise DeliveryFailed(f"publish to {target.subject} failed: {err!r}") from err
        else:
            await self._submit(target, record, function=function, task_id=task_id)

    async def _post(self, url: str, record: bytes, delivery_id: str) -> None:
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            wire.WEBHOOK_TIMESTAMP_HEADER: str(timestamp),
            wire.WEBHOOK_SIGNATURE_HEADER: sign_webhook(self._secret, timestamp=timestamp, body=record),
            wire.DELIVERY_ID_HEADER: delivery_id,
        }
        # One deadline for the whole attempt (httpx's timeout bounds each read, so a receiver
        # that trickles its answer would hold the attempt, and its partition's next deliveries,
        # for ever); only the status counts, the answer's body is never read.
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._http.stream("POST", url, content=record, headers=headers) as response:
                    status = response.status_code
        except TimeoutError as err:
            raise DeliveryFailed(f"POST {url} did not answer within {self._timeout_s:g} s") from err
        except httpx.HTTPError as err:
            raise DeliveryFailed(f"POST {url} failed: {type(err).__name__}: {err}") from err
        if not 200 <= status < 300:
            raise DeliveryFailed(f"POST {url} answered {status}")

    async def _submit(self, target: FunctionTarget, record: bytes, *, function: str, task_id: str) -> None:
        if await self._catalog.find_function(target.function) is None:
            raise DeliveryFailed(f"destination function {target.function} does not exist")
        admission = Admission(function=target.function, task_id=destination_task_id(function, task_id),
                              payload=record, request_id=new_request_id(), qualifier=target.qualifier)
        try:
            await submit(self._events, admission, await self._catalog.find_async_config(target.function))
        except TaskAlreadyExists:
            return  # an earlier attempt created it: delivered, once
        except TaskmodeError as err:
            raise DeliveryFailed(f"task for {target.function} not created: {err.message}") from err
