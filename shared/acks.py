"""Publishes that a JetStream stream acknowledges, without nats-py's per-request machinery.

nats-py's `js.publish` makes each one a request of its own: a token, header checks and
encoding, `wait_for`, and a PubAck built through json and a dataclass. On the hot paths (an
event append at each of a task's transitions, a nonce per signed request) that was most of a
publish's CPU in py-spy. Here a publish is one prepared command (`shared.bus.publish_prepared`)
and a future that one inbox subscription per connection settles.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shared.bus import publish_prepared
from shared.errors import ServiceUnavailable


class AckError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    """JetStream's answer to a publish (the fields we read)."""

    seq: int = 0
    error: AckError | None = None


decode_pub_ack: Final = msgspec.json.Decoder(PubAck).decode


def read_pub_ack(answer: Msg) -> PubAck:
    """The stream's acknowledgement; a status message (no stream listening) is NoRespondersError."""
    try:
        return decode_pub_ack(answer.data)
    except msgspec.DecodeError:
        if answer.headers and answer.headers.get("Status") == "503":
            raise NoRespondersError from None
        raise ServiceUnavailable("the stream answered a publish with something else") from None


def expected_seq_headers(expected_seq: int, subject: str) -> bytes:
    """A header block requiring `subject`'s last sequence to be `expected_seq` (0: nothing on it yet)."""
    return b"%s%d\r\n%s%s\r\n\r\n" % (_EXPECTED_SEQ, expected_seq, _EXPECTED_SEQ_SUBJECT, subject.encode())


_EXPECTED_SEQ: Final = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: "
_EXPECTED_SEQ_SUBJECT: Final = b"Nats-Expected-Last-Subject-Sequence-Subject: "


class AckInbox:
    """Answers to this connection's acknowledged publishes, on one inbox subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()
        self._sub: Subscription | None = None
        self._starting = asyncio.Lock()

    async def _start(self) -> None:
        async with self._starting:
            if self._sub is None:
                prefix = f"{self._nc.new_inbox()}."
                self._sub = await self._nc.subscribe(f"{prefix}*", cb=self._on_answer,
                                                     pending_msgs_limit=0, pending_bytes_limit=0)
                self._prefix = prefix

    async def _on_answer(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg)

    async def request(self, subject: str, data: bytes, headers: bytes, *, timeout_s: float) -> Msg:
        """Publish with a reply subject of ours; the answer, or NatsTimeoutError after `timeout_s`."""
        if self._sub is None:
            await self._start()
        loop = asyncio.get_running_loop()
        token = str(next(self._tokens))
        answer: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = answer
        timer = loop.call_later(timeout_s, _expire, answer)
        try:
            await publish_prepared(self._nc, subject, data, reply=f"{self._prefix}{token}", headers=headers)
            return await answer
        finally:
            timer.cancel()
            self._waiting.pop(token, None)


def _expire(answer: asyncio.Future[Msg]) -> None:
    if not answer.done():
        answer.set_exception(NatsTimeoutError())
