"""ACS3-HMAC-SHA256 request signatures, byte-compatible with the official Alibaba Cloud SDK.

Mirrors `alibabacloud_tea_openapi.utils.Utils.get_authorization` (tea-openapi 0.4.x): the SDK signs
*every* header it sets, names them in `SignedHeaders`, and hashes the body into
`x-acs-content-sha256`. The server side re-derives the canonical request from what arrived on the
wire, which differs from what the SDK signed in one place: the query string is sent with
`urlencode` (space -> `+`) but signed with `quote(v, safe='~')` (space -> `%20`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from secrets import token_hex
from urllib.parse import parse_qsl, quote

from shared.errors import (
    InvalidAccessKeyID,
    MissingRequiredHeader,
    RequestTimeTooSkewed,
    SignatureNotMatch,
)

ALGORITHM = "ACS3-HMAC-SHA256"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Without these two in SignedHeaders a captured request could be replayed with a fresh date or a
# different body (the body hash header itself would be unsigned); the SDK always signs both.
_MUST_BE_SIGNED = ("x-acs-content-sha256", "x-acs-date")


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256, the form used for both the payload hash and the string to sign."""
    return hashlib.sha256(data).hexdigest()


def group_headers(headers: Mapping[str, str]) -> dict[str, list[str]]:
    """Lowercase header names and collect every (trimmed) value per name.

    Multi-dicts such as Starlette `Headers` yield a repeated name several times from `.items()`, as
    does a dict whose keys differ only in case; the SDK keeps all such values and comma-joins them.
    """
    grouped: dict[str, list[str]] = {}
    for name, value in headers.items():
        grouped.setdefault(name.lower(), []).append(value.strip())
    return grouped


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Canonical query: pairs sorted, keys verbatim (the SDK does not encode them), values encoded
    with `quote(v, safe='~')` so space is `%20` and `/` is `%2F`; a blank value gives `k=`."""
    return "&".join(f"{k}={quote(v, safe='~')}" for k, v in sorted(pairs))


def canonical_request(
    *,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, Sequence[str]],
    signed_headers: Sequence[str],
    hashed_payload: str,
) -> str:
    """Build the canonical request the signature covers.

    `headers` comes from `group_headers`; only `signed_headers` are used, in that order, repeated
    values sorted and comma-joined as the SDK does. The header block ends with a newline, so an
    empty line precedes the signed-header list.
    """
    header_block = "".join(f"{name}:{','.join(sorted(headers[name]))}\n" for name in signed_headers)
    parts = [method, path or "/", canonical_query(query), header_block, ";".join(signed_headers)]
    return "\n".join([*parts, hashed_payload])


def string_to_sign(canonical: str) -> str:
    """The string the HMAC is computed over: algorithm name, newline, hex hash of the request."""
    return f"{ALGORITHM}\n{sha256_hex(canonical.encode('utf-8'))}"


def compute_signature(secret: str, to_sign: str) -> str:
    """Hex HMAC-SHA256 of `to_sign` keyed with the access key secret."""
    return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _utc(moment: datetime) -> datetime:
    # astimezone() would read a naive datetime as *local* time; callers mean UTC.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def sign_request(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    access_key_id: str,
    access_key_secret: str,
    now: datetime | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Sign a request like the SDK does and return the headers the caller must add.

    All of `headers` is signed, plus the returned `x-acs-content-sha256` (always recomputed from
    `body`) and `x-acs-date` / `x-acs-signature-nonce` when absent (`now` and `nonce` pin them for
    tests). `path` is already percent-encoded; `query` values are decoded, and the HTTP client may
    encode them any way that decodes back. Headers the client adds later stay unsigned, which the
    verifier tolerates.
    """
    grouped = {k: v for k, v in group_headers(headers).items() if k != "x-acs-content-sha256"}
    added: dict[str, str] = {}
    if "x-acs-date" not in grouped:
        added["x-acs-date"] = _utc(now or datetime.now(timezone.utc)).strftime(DATE_FORMAT)
    if "x-acs-signature-nonce" not in grouped:
        added["x-acs-signature-nonce"] = nonce or token_hex(16)
    added["x-acs-content-sha256"] = sha256_hex(body)
    for name, value in added.items():
        grouped[name] = [value]
    signed = sorted(grouped)
    canonical = canonical_request(
        method=method.upper(), path=path, query=query.items(), headers=grouped,
        signed_headers=signed, hashed_payload=added["x-acs-content-sha256"],
    )
    signature = compute_signature(access_key_secret, string_to_sign(canonical))
    added["Authorization"] = (
        f"{ALGORITHM} Credential={access_key_id},"
        f"SignedHeaders={';'.join(signed)},Signature={signature}"
    )
    return added


def _parse_authorization(value: str) -> tuple[str, list[str], str]:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise InvalidAccessKeyID(
            f"Unsupported signature algorithm {algorithm!r} in Authorization; expected {ALGORITHM}."
        )
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, val = part.strip().partition("=")
        if sep:
            fields[key.strip()] = val.strip()
    credential = fields.get("Credential", "")
    signed = [h.strip().lower() for h in fields.get("SignedHeaders", "").split(";")]
    signature = fields.get("Signature", "")
    if not credential or not signature or not all(signed):
        raise InvalidAccessKeyID(
            "Malformed Authorization header; expected "
            f"'{ALGORITHM} Credential=<AccessKeyId>,SignedHeaders=<h1;h2>,Signature=<hex>'."
        )
    return credential, signed, signature


def _parse_date(value: str) -> datetime | None:
    # ISO 8601 first: the SDK's form (DATE_FORMAT) is one, and fromisoformat reads it several
    # times faster than strptime (once per signed request). Non-SDK clients may send fractional
    # seconds or an explicit offset; naive times are refused because their zone is a guess.
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:  # DATE_FORMAT also takes fields without their leading zeros
            return datetime.strptime(value, DATE_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            return None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo is not None else None


@dataclass(frozen=True)
class VerifiedHeaders:
    """What a request's signed headers established, before its body is read."""

    access_key_id: str
    content_sha256: str  # the body hash the signature covers; the body must still match it
    signed_headers: tuple[str, ...]
    date: datetime
    nonce: str  # "" when absent


def verify_signature(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    secrets: Mapping[str, str],
    now: datetime,
    max_skew_s: int = 900,
) -> VerifiedHeaders:
    """Check a request's ACS3-HMAC-SHA256 signature from its headers alone.

    The signature covers the claimed body hash (`x-acs-content-sha256`), not the body, so it can
    be checked before a byte of the body is read; `check_body` then compares the body's hash with
    the claim. `raw_path` is the percent-encoded path as received; `raw_query` may use any encoding
    (it is decoded and re-encoded canonically). Header names are case-insensitive and only those
    in `SignedHeaders` count. Raises `InvalidAccessKeyID` (missing, malformed or unknown
    credential), `RequestTimeTooSkewed` (`x-acs-date` missing, unparseable or over `max_skew_s`
    from `now`; a naive `now` is UTC), `MissingRequiredHeader` (no `x-acs-content-sha256`) and
    `SignatureNotMatch` (the message carries the server's canonical request and string to sign,
    as Alibaba does, so clients can diff them).
    """
    grouped = group_headers(headers)
    authorization = grouped.get("authorization")
    if not authorization:
        raise InvalidAccessKeyID("Missing Authorization header; the request must be signed.")
    access_key_id, signed, given = _parse_authorization(",".join(authorization))
    secret = secrets.get(access_key_id)
    if secret is None:
        raise InvalidAccessKeyID(f"The AccessKeyId {access_key_id!r} does not exist.")

    date_value = ",".join(grouped.get("x-acs-date", []))
    date = _parse_date(date_value) if date_value else None
    server_now = _utc(now)
    if date is None:
        raise RequestTimeTooSkewed(
            f"x-acs-date {date_value!r} is missing or not in {DATE_FORMAT} (UTC) format."
        )
    if abs(server_now - date) > timedelta(seconds=max_skew_s):
        raise RequestTimeTooSkewed(
            f"x-acs-date {date_value} differs from server time "
            f"{server_now.strftime(DATE_FORMAT)} by more than {max_skew_s} seconds."
        )

    if "x-acs-content-sha256" not in grouped:
        raise MissingRequiredHeader("Missing required header x-acs-content-sha256.")
    unsigned = [h for h in _MUST_BE_SIGNED if h not in signed]
    if unsigned:
        raise SignatureNotMatch(f"SignedHeaders must include {', '.join(unsigned)}.")
    absent = [h for h in signed if h not in grouped]
    if absent:
        raise SignatureNotMatch(f"Signed header(s) {', '.join(absent)} not present in the request.")
    claimed = ",".join(grouped["x-acs-content-sha256"])

    query = parse_qsl(raw_query, keep_blank_values=True)
    canonical = canonical_request(
        method=method, path=raw_path, query=query, headers=grouped,
        signed_headers=signed, hashed_payload=claimed,
    )
    to_sign = string_to_sign(canonical)
    expected = compute_signature(secret, to_sign)
    if not hmac.compare_digest(expected.encode(), given.lower().encode("utf-8", "replace")):
        raise SignatureNotMatch(
            "The request signature does not match. Check your AccessKeySecret and signing method. "
            f"Server string to sign is: {to_sign!r}; canonical request is: {canonical!r}"
        )
    nonce = ",".join(grouped.get("x-acs-signature-nonce", []))
    return VerifiedHeaders(access_key_id=access_key_id, content_sha256=claimed, signed_headers=tuple(signed),
                           date=date, nonce=nonce)


def check_body(verified: VerifiedHeaders, body_sha256: str) -> None:
    """Raise `SignatureNotMatch` unless the body's hex SHA-256 is the one the signature covers."""
    check_body_hash(verified.content_sha256, body_sha256)


def check_body_hash(claimed: str, body_sha256: str) -> None:
    """Raise `SignatureNotMatch` unless `body_sha256` (hex) is the `claimed` x-acs-content-sha256."""
    if not hmac.compare_digest(claimed.lower().encode("utf-8", "replace"), body_sha256.encode()):
        raise SignatureNotMatch(
            f"x-acs-content-sha256 {claimed!r} does not match the body's SHA-256 {body_sha256}."
        )


def verify_request(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Mapping[str, str],
    now: datetime,
    max_skew_s: int = 900,
) -> str:
    """`verify_signature` and `check_body` for a request whose body is at hand; the access key id."""
    verified = verify_signature(method=method, raw_path=raw_path, raw_query=raw_query, headers=headers,
                                secrets=secrets, now=now, max_skew_s=max_skew_s)
    check_body(verified, sha256_hex(body))
    return verified.access_key_id
