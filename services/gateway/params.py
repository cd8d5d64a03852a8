"""Path, query and header parameters: checking and parsing, with no I/O.

Every check raises a typed `TaskmodeError` (mostly `InvalidArgument`) whose message names the
offending parameter, so routes validate everything before writing anything.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import Final

from shared.errors import InvalidArgument, InvalidNextToken
# The task-id, delay and payload rules are admission's (shared by every way a task arrives).
from shared.submission import (
    MAX_ASYNC_PAYLOAD_BYTES as MAX_ASYNC_PAYLOAD_BYTES,
    MAX_DELAY_S as MAX_DELAY_S,
    TASK_ID_RE as TASK_ID_RE,
    check_payload_size as check_payload_size,
    check_task_id as check_task_id,
    choose_task_id as choose_task_id,
    new_task_id as new_task_id,
    due_time as due_time,
    parse_delay as parse_delay,
    parse_execution_time as parse_execution_time,
    task_id_from_request_id as task_id_from_request_id,
)
from shared.transitions import STATUS_ALIASES, Status, parse_status
from shared.qualifiers import check_qualifier as _check_qualifier
from shared.wire import FC_INVOCATION_TYPE_HEADER, FC_LOG_TYPE_HEADER
from shared.wire import LATEST as wire_latest

FUNCTION_NAME_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")
RUNTIME_RE: Final = re.compile(r"^(python3(\.\d+)?|nodejs(18|20)|custom(\.debian(10|11|12))?)$")

MAX_SYNC_PAYLOAD_BYTES: Final = 32 * 1024 * 1024
DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 100
LATEST: Final = wire_latest


# --- names and identifiers ---------------------------------------------------------------------


def check_function_name(name: str) -> str:
    if not FUNCTION_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid function name {name[:80]!r}: it must match {FUNCTION_NAME_RE.pattern}"
        )
    return name




def check_runtime(runtime: str) -> str:
    if runtime == "custom-container":
        raise InvalidArgument(
            "runtime custom-container is not supported here: taskmode runs no container engine; "
            "use custom with customRuntimeConfig.command instead"
        )
    if not RUNTIME_RE.fullmatch(runtime):
        raise InvalidArgument(
            f"unsupported runtime {runtime[:40]!r}: use python3, python3.<minor>, nodejs18, nodejs20, custom, "
            "custom.debian10, custom.debian11 or custom.debian12"
        )
    return runtime


def check_qualifier(qualifier: str | None) -> str:
    """The qualifier's canonical form (None or empty: LATEST); whether it exists is the catalog's
    business (`shared.qualifiers.resolve`)."""
    return _check_qualifier(qualifier)








# --- invocation headers -----------------------------------------------------------------------


def parse_invocation_type(value: str | None) -> str:
    """`Sync` (default) or `Async`, case-insensitively."""
    if value is None or not value.strip():
        return "Sync"
    normalized = value.strip().lower()
    if normalized == "sync":
        return "Sync"
    if normalized == "async":
        return "Async"
    raise InvalidArgument(f"invalid {FC_INVOCATION_TYPE_HEADER} {value[:40]!r}: use Sync or Async")


def parse_log_type(value: str | None) -> bool:
    """x-fc-log-type: `None` (default) or `Tail`; returns whether the log tail is wanted."""
    if value is None or not value.strip() or value.strip().lower() == "none":
        return False
    if value.strip().lower() == "tail":
        return True
    raise InvalidArgument(f"invalid {FC_LOG_TYPE_HEADER} {value[:40]!r}: use None or Tail")






# --- query parameters -------------------------------------------------------------------------


def parse_bool(name: str, value: str | None, *, default: bool) -> bool:
    """A boolean query value; the Python SDK sends `True`/`False`, so case is ignored."""
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise InvalidArgument(f"invalid {name} {value[:40]!r}: use true or false")


_PLAIN_INTEGER = re.compile(r"-?[0-9]{1,18}")


def parse_int(name: str, value: str | None, *, default: int | None, lo: int, hi: int) -> int | None:
    if value is None or value == "":
        return default
    # Plain ASCII digits only: int() would also take "1_0", " 5" and non-ASCII digits.
    if not _PLAIN_INTEGER.fullmatch(value):
        raise InvalidArgument(f"invalid {name} {value[:40]!r}: an integer is required")
    number = int(value)
    if not lo <= number <= hi:
        raise InvalidArgument(f"{name} {number} is out of range [{lo}, {hi}]")
    return number


def parse_limit(value: str | None) -> int:
    limit = parse_int("limit", value, default=DEFAULT_LIMIT, lo=1, hi=MAX_LIMIT)
    assert limit is not None
    return limit


def parse_time_ms(name: str, value: str | None) -> int | None:
    return parse_int(name, value, default=None, lo=0, hi=2**53)


def parse_sort_order(value: str | None) -> bool:
    """sortOrderByTime: `asc` (default) or `desc`; returns whether the order is descending."""
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("asc", "desc"):
        return lowered == "desc"
    raise InvalidArgument(f"invalid sortOrderByTime {value[:40]!r}: use asc or desc")


def parse_status_filter(value: str | None) -> Status | None:
    if value is None or value == "":
        return None
    try:
        return parse_status(value)
    except ValueError as err:
        names = ", ".join([*(s.value for s in Status), *STATUS_ALIASES])
        raise InvalidArgument(f"invalid status {value[:40]!r}: use one of {names}") from err


# --- pagination over sorted names (functions, async configs) ----------------------------------


def encode_token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def decode_token(token: str | None, *, pattern: re.Pattern[str] = FUNCTION_NAME_RE) -> str | None:
    """The name a nextToken continues after (None: from the start); `pattern` is what such a
    name looks like."""
    if not token:
        return None
    try:
        name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as err:
        raise InvalidNextToken("nextToken is not valid") from err
    if not pattern.fullmatch(name):
        raise InvalidNextToken("nextToken is not valid")
    return name


def paginate(names: list[str], *, after: str | None, limit: int) -> tuple[list[str], str]:
    """One page of sorted `names` after `after`, and the token for the next page ("" at the end)."""
    remaining = [n for n in names if after is None or n > after]
    page = remaining[:limit]
    token = encode_token(page[-1]) if len(remaining) > limit else ""
    return page, token


def encode_version_token(after: int) -> str:
    return encode_token(f"v{after}")


def decode_version_token(token: str | None) -> int | None:
    """The version id a ListFunctionVersions nextToken continues after (None: from the start)."""
    name = decode_token(token)
    if name is None:
        return None
    if not re.fullmatch(r"v[1-9][0-9]{0,9}", name):
        raise InvalidNextToken("nextToken is not valid")
    return int(name[1:])


# --- times ------------------------------------------------------------------------------------


def format_time(epoch_s: float | None = None) -> str:
    """FC's timestamp form, e.g. `2023-05-01T08:15:27Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if epoch_s is None else epoch_s))
