"""Destinations of an async config: where a task's result record goes when the task ends.

`destinationConfig.onSuccess.destination` / `onFailure.destination` is one of
- a function: `acs:fc:<region>:<account>:functions/<name>[/<qualifier>]` (the record becomes a
  task of that function, its id derived from the source task's, so it is created once);
- a webhook: a plain `http://` or `https://` URL (the record is POSTed as JSON and signed, see
  `sign_webhook`);
- a NATS subject: `nats:<subject>` (published with `Nats-Msg-Id`, so a JetStream stream that
  captures the subject drops a repeat).

The record has the FC/Lambda destination shape: timestamp, requestContext{requestId,
functionArn, condition, approximateInvokeCount}, requestPayload, responseContext{statusCode,
functionError}, responsePayload.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import msgspec

from shared.errors import InvalidArgument
from shared.events import AnyTaskEvent, TaskEnqueued, TaskExpired, TaskFailed, TaskSucceeded
from shared.triggers import check_publish_subject

_FUNCTION_ARN: Final = re.compile(r"^acs:fc:([^:]*):([^:]*):functions/([a-zA-Z_][a-zA-Z0-9_-]{0,63})(?:/([A-Za-z0-9_.-]{1,128}))?$")
NATS_SCHEME: Final = "nats:"
MAX_URL_CHARS: Final = 2048
# What a webhook signature covers: "<timestamp>.<body>", HMAC-SHA256 with the deployment's secret.
SIGNATURE_VERSION: Final = "v1"


class Condition(enum.StrEnum):
    """Why the record was sent (Lambda's names)."""

    SUCCESS = "Success"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    EVENT_AGE_EXCEEDED = "EventAgeExceeded"


@dataclass(frozen=True)
class FunctionTarget:
    function: str
    qualifier: str


@dataclass(frozen=True)
class WebhookTarget:
    url: str


@dataclass(frozen=True)
class NatsTarget:
    subject: str


Target = FunctionTarget | WebhookTarget | NatsTarget


def parse_destination(text: str, *, region: str, account_id: str) -> Target:
    """The target a destination string names; `InvalidArgument` when it names none."""
    if text.startswith("acs:"):
        match = _FUNCTION_ARN.fullmatch(text)
        if match is None:
            raise InvalidArgument(f"destination {text[:120]!r}: a function is acs:fc:<region>:<account>:functions/<name>")
        if (match.group(1), match.group(2)) != (region, account_id):
            raise InvalidArgument(f"destination {text[:120]!r}: only functions of region {region}, "
                                  f"account {account_id} exist here")
        return FunctionTarget(function=match.group(3), qualifier=match.group(4) or "LATEST")
    if text.startswith(NATS_SCHEME):
        try:
            return NatsTarget(subject=check_publish_subject(text[len(NATS_SCHEME):]))
        except InvalidArgument as err:
            raise InvalidArgument(f"destination {text[:120]!r}: {err.message}") from err
    parts = urlsplit(text)
    if parts.scheme in ("http", "https") and parts.hostname and len(text) <= MAX_URL_CHARS and " " not in text:
        return WebhookTarget(url=text)
    raise InvalidArgument(
        f"destination {text[:120]!r} is not a function ARN (acs:fc:...:functions/<name>), "
        "an http(s):// URL or nats:<subject>"
    )


def condition_of(event: AnyTaskEvent) -> Condition | None:
    """The destination condition a final event fires, or None (Stopped and Invalid fire none)."""
    if isinstance(event, TaskSucceeded):
        return Condition.SUCCESS
    if isinstance(event, TaskFailed):
        return Condition.RETRIES_EXHAUSTED
    if isinstance(event, TaskExpired):
        return Condition.EVENT_AGE_EXCEEDED
    return None


class _RequestContext(msgspec.Struct, rename="camel"):
    request_id: str
    function_arn: str
    condition: str
    approximate_invoke_count: int


class _ResponseContext(msgspec.Struct, rename="camel"):
    status_code: int
    function_error: str


class DestinationRecord(msgspec.Struct, rename="camel"):
    timestamp: str
    request_context: _RequestContext
    request_payload: str
    response_context: _ResponseContext
    response_payload: str


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def destination_record(*, final: AnyTaskEvent, enqueued: TaskEnqueued | None, function_arn: str,
                       condition: Condition) -> bytes:
    """The FC/Lambda-shaped record of a finished task, as JSON."""
    attempt = int(getattr(final, "attempt", 0))
    if isinstance(final, TaskSucceeded):
        response = _ResponseContext(status_code=200, function_error="")
        payload = _text(final.result)
        invocations = attempt + 1
    elif isinstance(final, TaskFailed):
        response = _ResponseContext(status_code=200, function_error="UnhandledInvocationError")
        payload = msgspec.json.encode({"errorMessage": final.error}).decode()
        invocations = attempt + 1
    else:  # never ran: no response at all
        response = _ResponseContext(status_code=0, function_error="")
        payload = ""
        invocations = 0
    arn = function_arn
    if enqueued is not None and enqueued.qualifier and enqueued.qualifier != "LATEST":
        arn = f"{function_arn}/{enqueued.qualifier}"
    record = DestinationRecord(
        timestamp=dt.datetime.fromtimestamp(final.at_ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds"),
        request_context=_RequestContext(request_id=enqueued.request_id if enqueued else "", function_arn=arn,
                                        condition=str(condition), approximate_invoke_count=invocations),
        request_payload=_text(enqueued.payload) if enqueued else "",
        response_context=response,
        response_payload=payload,
    )
    return msgspec.json.encode(record)


def sign_webhook(secret: str, *, timestamp: int, body: bytes) -> str:
    """The `x-taskmode-signature` value: `v1=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_webhook(secret: str, *, timestamp: str, body: bytes, signature: str, now_s: float,
                   tolerance_s: float = 300) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent (no replays)."""
    if not timestamp.isdigit() or abs(now_s - int(timestamp)) > tolerance_s:
        return False
    expected = sign_webhook(secret, timestamp=int(timestamp), body=body)
    return hmac.compare_digest(expected, signature)


def destination_task_id(function: str, task_id: str) -> str:
    """The id of the task a function destination gets for one source task: derived, so a repeat
    delivery is refused as a duplicate. The source id stays readable; the hash tells apart
    tasks of the same id from different functions."""
    digest = hashlib.sha256(f"{function}/{task_id}".encode()).hexdigest()[:12]
    return f"{task_id[:114]}-{digest}"
