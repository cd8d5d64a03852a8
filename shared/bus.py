"""The bus, as every service uses it: a bounded first connect, and one consumer policy.

The policy: each message is decoded, handled, and then gets exactly one verdict: ack, nak with a
delay, or term. A handler returns its verdict; an unexpected exception is logged with its
traceback and becomes a delayed nak, so a message is never left to its ack-wait timeout and an
error never ends a service silently. Only a deleted consumer ends a service (`ConsumerGone`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    NoServersError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError

from shared.events import AnyTaskEvent, decode_event

log = logging.getLogger(__name__)

# A message whose handler failed unexpectedly comes back after this long.
RETRY_AFTER_ERROR_S: Final = 1.0


# The bus is slow or away for now: worth trying again later, never a verdict on the task.
# (nats-py's and asyncio's timeouts are OSErrors: catch these before any OSError.)
BUS_TROUBLE: Final = (
    NatsTimeoutError, asyncio.TimeoutError, ConnectionClosedError, ConnectionReconnectingError, NoRespondersError,
    NoServersError, StaleConnectionError, ServiceUnavailableError,
)


class BusUnreachable(ConnectionError):
    """NATS could not be reached at start within the allowed attempts."""


async def connect(
    url: str,
    *,
    name: str,
    attempts: int = 30,
    delay_s: float = 0.5,
    stop: asyncio.Event | None = None,
    user_credentials: tuple[str, str] | None = None,
) -> Client:
    """Connect to `url`: `attempts` tries `delay_s` apart (stopped early by `stop`), then give up.

    The first connect is ours to bound: nats-py would retry it forever when reconnects are
    unlimited, so reconnecting is switched on only once a connection exists, from then on forever.
    """
    user, password = user_credentials or (None, None)
    # Replies to a user's requests arrive under an inbox prefix only that user may subscribe to.
    inbox = f"_INBOX.{user}" if user else "_INBOX"

    async def quiet(err: Exception) -> None:
        log.warning("nats connection trouble", extra={"url": url, "error": repr(err)})

    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            # nats-py's server selection loops until max_reconnect_attempts is exceeded, even
            # with reconnects off: 1 makes each of our attempts a single try (plus one retry).
            nc = await nats.connect(
                url, name=name, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
                connect_timeout=2, error_cb=quiet, user=user, password=password, inbox_prefix=inbox,
            )
        except Exception as err:  # noqa: BLE001 - every connect failure is retried the same way
            last = err
            log.warning("nats connect failed", extra={"url": url, "attempt": attempt, "of": attempts,
                                                      "error": repr(err)})
            if stop is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
                if stop.is_set():
                    break
            else:
                await asyncio.sleep(delay_s)
            continue
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 0.5
        return nc
    raise BusUnreachable(f"could not connect to NATS at {url} after {attempts} attempts: {last!r}") from last


# --- verdicts -------------------------------------------------------------------------------


class Ack:
    """Done with the message."""


@dataclass(frozen=True)
class Nak:
    """Deliver the message again after `delay_s`."""

    delay_s: float


@dataclass(frozen=True)
class Term:
    """Never deliver the message again."""

    reason: str


Verdict = Ack | Nak | Term
ACK: Final = Ack()

MessageHandler = Callable[[Msg], Awaitable[Verdict]]
EventHandler = Callable[[AnyTaskEvent, Msg], Awaitable[Verdict]]


async def apply_verdict(msg: Msg, verdict: Verdict) -> None:
    if isinstance(verdict, Ack):
        await msg.ack()
    elif isinstance(verdict, Nak):
        await msg.nak(delay=verdict.delay_s if verdict.delay_s > 0 else None)
    else:
        log.warning("message terminated", extra={"subject": msg.subject, "reason": verdict.reason})
        await msg.term()


async def settle(msg: Msg, handler: MessageHandler) -> None:
    """Run `handler` on `msg` and give the message exactly one verdict (see the module doc)."""
    try:
        verdict = await handler(msg)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the policy: log, then deliver again shortly
        log.exception("message handler failed; redelivering", extra={"subject": msg.subject})
        verdict = Nak(RETRY_AFTER_ERROR_S)
    try:
        await apply_verdict(msg, verdict)
    except Exception as err:  # noqa: BLE001 - the bus is away: the ack wait redelivers it
        log.warning("could not settle message", extra={"subject": msg.subject, "error": repr(err)})


def decoded(handler: EventHandler) -> MessageHandler:
    """A message handler that decodes the task event first; an undecodable message is termed."""

    async def handle(msg: Msg) -> Verdict:
        try:
            event = decode_event(msg.data)
        except msgspec.DecodeError:
            return Term("undecodable event")
        return await handler(event, msg)

    return handle


# --- consumers ------------------------------------------------------------------------------


async def ensure_consumer(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subjects: list[str],
    ack_wait_s: float,
    max_ack_pending: int,
    ack_policy: AckPolicy = AckPolicy.EXPLICIT,
) -> None:
    """Create or update a durable pull consumer that starts from the beginning of the stream.

    `max_deliver` is unlimited because handlers park not-yet-ready work with a delayed nak.
    """
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=ack_policy,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subjects=filter_subjects,
    )
    await js.add_consumer(stream, config)


class ConsumerGone(Exception):
    """The durable consumer was deleted (e.g. to rebuild the read model): the service restarts."""


async def fetch(
    js: JetStreamContext,
    sub: JetStreamContext.PullSubscription,
    *,
    stream: str,
    durable: str,
    batch: int,
    wait_s: float,
) -> list[Msg]:
    """Up to `batch` messages, or none after `wait_s`; rides out a bus that is briefly away.

    Only a deleted consumer ends the service (`ConsumerGone`); any other failure (the server
    restarting, a lost connection) is logged and answered with an empty batch after a pause.
    """
    try:
        return await sub.fetch(batch, timeout=wait_s)
    except (NatsTimeoutError, asyncio.TimeoutError):
        return []
    except Exception as err:  # noqa: BLE001 - classified below
        try:
            await js.consumer_info(stream, durable)
        except NotFoundError as gone:
            raise ConsumerGone(f"consumer {durable} no longer exists") from gone
        except Exception:  # noqa: BLE001 - the server itself is unreachable: wait for it
            pass
        log.warning("fetch failed; retrying", extra={"durable": durable, "error": repr(err)})
        await asyncio.sleep(wait_s)
        return []


# Messages already waiting are taken at once; this is only how long a busy loop lingers for more.
_DRAIN_WAIT_S: Final = 0.002


@dataclass(frozen=True)
class Batching:
    """How a consumer loop gathers messages.

    Idle, a message is handled the moment it arrives. Busy (more than `busy_rate` messages
    a second lately), the loop pauses `gather_s` before the next fetch, so that more events of
    the same tasks arrive together and are written once; a lone task's few events still go
    through within milliseconds.
    """

    size: int = 256
    wait_s: float = 0.5  # an idle loop's long poll for its next message
    gather_s: float = 0.0
    busy_rate: float = 50.0


async def consume(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    stop: asyncio.Event,
    on_message: MessageHandler | None = None,
    on_batch: Callable[[list[Msg]], Awaitable[None]] | None = None,
    batching: Batching = Batching(),
) -> None:
    """Fetch from a durable pull consumer until `stop`, settling every message by the policy.

    `on_message` settles each message of a batch concurrently; `on_batch` takes a whole batch
    (for a consumer with AckPolicy.ALL): if it returns, the last message is acked, which acks
    them all; if it raises, the same batch is handed to it again after a pause, until it
    succeeds or `stop` is set, so nothing newer is acknowledged ahead of it.
    """
    if (on_message is None) == (on_batch is None):
        raise ValueError("give exactly one of on_message and on_batch")
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    idle = True
    loop = asyncio.get_running_loop()
    rate, rate_at = 0.0, loop.time()  # messages a second lately (decaying over about a second)
    try:
        while not stop.is_set():
            # Idle: wait for one message and handle it at once. Busy: take what is there,
            # lingering at most _DRAIN_WAIT_S (never a long pull for a whole batch, which the
            # server holds until it is full or expires); an empty answer makes the loop idle.
            if idle:
                msgs = await fetch(js, sub, stream=stream, durable=durable, batch=1, wait_s=batching.wait_s)
            else:
                msgs = await fetch(js, sub, stream=stream, durable=durable,
                                   batch=batching.size, wait_s=_DRAIN_WAIT_S)
            idle = not msgs
            if not msgs:
                continue
            if on_message is not None:
                await asyncio.gather(*(settle(msg, on_message) for msg in msgs))
            else:
                assert on_batch is not None
                await _settle_batch(msgs, on_batch, stop)
            now = loop.time()
            rate = rate * math.exp(rate_at - now) + len(msgs)
            rate_at = now
            if batching.gather_s > 0 and rate > batching.busy_rate and len(msgs) < batching.size:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), batching.gather_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _settle_batch(msgs: list[Msg], on_batch: Callable[[list[Msg]], Awaitable[None]],
                        stop: asyncio.Event) -> None:
    # A failed batch is retried here, whole and in order, rather than nak'd: on an AckPolicy.ALL
    # consumer the ack of any later batch would acknowledge a nak'd one unprocessed.
    while True:
        try:
            await on_batch(msgs)
            break
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the policy: log, then try the same batch again shortly
            log.exception("batch handler failed; retrying it", extra={"count": len(msgs), "first": msgs[0].subject})
        for msg in msgs:  # still ours: no redelivery elsewhere while we retry
            with contextlib.suppress(Exception):
                await msg.in_progress()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), RETRY_AFTER_ERROR_S)
        if stop.is_set():  # the next owner gets the batch again once its ack wait runs out
            return
    try:
        await msgs[-1].ack_sync()
    except Exception as err:  # noqa: BLE001 - the ack wait redelivers the batch; folds are idempotent
        log.warning("could not ack batch", extra={"count": len(msgs), "error": repr(err)})


def header_block(headers: dict[str, str]) -> bytes:
    """A NATS header block (`NATS/1.0`, one `Name: value` line each, a blank line) for `publish_prepared`."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


async def publish_prepared(nc: Client, subject: str, data: bytes, *, reply: str = "", headers: bytes = b"") -> None:
    """`nc.publish` for the hot paths that publish thousands of messages a second.

    The same protocol command, built in one step from a header block made beforehand
    (`header_block`) instead of nats-py's per-header checks and encoding. The subjects must be
    valid already (ours, or a reply subject as the server delivered it). While the connection
    is down it falls back to `nc.publish`, which buffers or refuses as configured.
    """
    if not nc.is_connected:
        await nc.publish(subject, data, reply=reply, headers=_parse_block(headers) if headers else None)
        return
    if headers:
        size = len(headers)
        command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply.encode(), size, size + len(data),
                                                    headers, data)
    else:
        command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(data), data)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def _parse_block(block: bytes) -> dict[str, str]:
    lines = block.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)
