"""Replay protection: a signed request is accepted once, by its (access key, nonce).

A signature stays valid while `x-acs-date` is within the clock-skew window of the gateway's
clock, so without this a captured request could be sent again for as long (and unsigned headers,
such as the `x-fc-*` ones the SDK does not sign, added to it). Every nonce is remembered for
twice the skew window, which covers a request's whole validity whenever it is first seen.

`KvNonces` keeps them in a JetStream KV bucket whose entries expire with that window, so a replay
is refused by every gateway behind a load balancer, and across restarts; `MemoryNonces` keeps
them in this process (tests, or a single gateway that opts out of the bus round trip).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from shared import wire
from shared.acks import AckInbox, expected_seq_headers, read_pub_ack
from shared.errors import ServiceUnavailable


class NonceLog(Protocol):
    async def first_use(self, access_key_id: str, nonce: str) -> bool:
        """Record the nonce; False if it was seen before (a replay)."""
        ...


def _key(access_key_id: str, nonce: str) -> str:
    # KV keys allow only a few characters; a client's nonce may hold anything.
    return hashlib.sha256(f"{access_key_id}\0{nonce}".encode()).hexdigest()[:48]


class KvNonces:
    """Nonces as keys of the bucket: a key can be created once (an expected last sequence of 0).

    The create is one acknowledged publish of our own (`shared.acks`) rather than nats-py's
    `KeyValue.create`: one is made for every signed request.
    """

    def __init__(self, kv: KeyValue, acks: AckInbox, *, timeout_s: float = 5.0) -> None:
        self._kv = kv
        self._acks = acks
        self._timeout_s = timeout_s

    @classmethod
    async def open(cls, js: JetStreamContext, *, remember_s: int, replicas: int = 1) -> KvNonces:
        try:
            kv = await js.key_value(wire.NONCES_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=wire.NONCES_BUCKET, history=1, ttl=remember_s, storage=StorageType.FILE, replicas=replicas))
        return cls(kv, AckInbox(js._nc))

    async def first_use(self, access_key_id: str, nonce: str) -> bool:
        subject = f"$KV.{wire.NONCES_BUCKET}.{_key(access_key_id, nonce)}"
        try:
            ack = read_pub_ack(await self._acks.request(subject, b"", expected_seq_headers(0, subject),
                                                        timeout_s=self._timeout_s))
        except (NatsError, asyncio.TimeoutError, ServiceUnavailable) as err:
            raise ServiceUnavailable("the bus did not record the request's nonce; try again") from err
        if ack.error is None:
            return True
        if ack.error.err_code == wire.JS_ERR_WRONG_LAST_SEQUENCE:
            return False
        raise ServiceUnavailable(f"the bus did not record the request's nonce: {ack.error.description}")


class MemoryNonces:
    """Nonces of this process only, each kept `remember_s`, at most `capacity` at once (the oldest
    go first when full, which only shortens how long they are remembered)."""

    def __init__(self, *, remember_s: float = 1800.0, capacity: int = 1_000_000) -> None:
        self._remember_s = remember_s
        self._capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    async def first_use(self, access_key_id: str, nonce: str) -> bool:
        now = time.monotonic()
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now and len(self._seen) < self._capacity:
                break
            del self._seen[oldest]
        key = _key(access_key_id, nonce)
        if key in self._seen:
            return False
        self._seen[key] = now + self._remember_s
        return True
