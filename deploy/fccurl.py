"""curl for the taskmode (FC 3.0) API: signs each request with ACS3-HMAC-SHA256, then sends it.

    python deploy/fccurl.py [-X METHOD] [-H 'name: value']...
                            [-d DATA | --data-binary @FILE | --data-raw DATA]
                            [-i] [-f] [--key ID:SECRET] [--print-curl] URL

The access key comes from `--key`, else TASKMODE_ACCESS_KEY_ID / TASKMODE_ACCESS_KEY_SECRET, else
the development key `make run` keeps in `$TASKMODE_DATA_DIR/dev-access-key` (default `.data`).
With a body and no content-type header, the content type is application/json when the body
parses as JSON and application/octet-stream otherwise (never curl's form encoding). `-d @FILE`
drops CR and LF like curl does; `--data-binary @FILE` sends the file as it is; `@-` reads stdin;
`--data-raw` never reads a file.

`--print-curl` prints an equivalent `curl` command line carrying the signed headers instead of
sending; the gateway accepts it for as long as its clock is within TASKMODE_GATEWAY_MAX_CLOCK_SKEW_S
(15 minutes by default) of the signing time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl, quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from shared.acs3 import sign_request  # noqa: E402

KEY_ID_VAR = "TASKMODE_ACCESS_KEY_ID"
KEY_SECRET_VAR = "TASKMODE_ACCESS_KEY_SECRET"
DEV_KEY_FILE = "dev-access-key"
SIGNATURE_VALID_S = 900  # the gateway's default TASKMODE_GATEWAY_MAX_CLOCK_SKEW_S
# Characters a path may carry unencoded (RFC 3986 pchar plus "/"); "%" keeps existing escapes.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
EXIT_HTTP_ERROR = 22  # curl's exit code for --fail on an HTTP status >= 400


class UsageError(Exception):
    """Bad arguments or unreadable input; reported in one line and exit code 2."""


@dataclass
class Body:
    data: bytes = b""
    given: bool = False  # a -d / --data-binary option was present (even if empty)
    file: str | None = None  # --data-binary @FILE: the file that can be named to curl as is


@dataclass
class Prepared:
    method: str
    url: str  # scheme://netloc + encoded path + canonical query: what is sent (and printed)
    headers: dict[str, str]
    body: Body
    signed_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fccurl", description="Send a signed request to the taskmode (FC 3.0) API, curl style."
    )
    parser.add_argument("url", help="e.g. http://127.0.0.1:9000/2023-03-30/functions")
    parser.add_argument("-X", "--request", dest="method", help="HTTP method (default: GET, or POST with a body)")
    parser.add_argument("-H", "--header", dest="headers", action="append", default=[], metavar="'NAME: VALUE'")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("-d", "--data", help="body; @FILE reads FILE without CR/LF, @- reads stdin")
    data.add_argument("--data-binary", metavar="DATA", help="body; @FILE reads FILE byte for byte, @- reads stdin")
    data.add_argument("--data-raw", metavar="DATA", help="body, taken literally (a leading @ is not a file name)")
    parser.add_argument("-i", "--include", action="store_true", help="print the status line and response headers")
    parser.add_argument("-f", "--fail", action="store_true", help=f"exit {EXIT_HTTP_ERROR} on an HTTP status >= 400")
    parser.add_argument("-s", "--silent", action="store_true", help="accepted for curl habits; no effect")
    parser.add_argument("--key", metavar="ID:SECRET", help=f"access key (default: ${KEY_ID_VAR} / ${KEY_SECRET_VAR})")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="seconds to wait for the response (default 60)")
    parser.add_argument(
        "--print-curl", action="store_true",
        help="print an equivalent signed curl command (valid for 15 minutes) instead of sending",
    )
    return parser


def _read_source(spec: str, *, binary: bool) -> Body:
    if not spec.startswith("@"):
        return Body(data=spec.encode("utf-8"), given=True)
    source = spec[1:]
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {source}: {err.strerror or err}") from err
    if binary:
        return Body(data=raw, given=True, file=None if source == "-" else source)
    return Body(data=raw.replace(b"\r", b"").replace(b"\n", b""), given=True)


def read_body(args: argparse.Namespace) -> Body:
    """The request body from -d / --data-binary / --data-raw (none: empty, not given)."""
    if args.data_binary is not None:
        return _read_source(args.data_binary, binary=True)
    if args.data is not None:
        return _read_source(args.data, binary=False)
    if args.data_raw is not None:
        return Body(data=args.data_raw.encode("utf-8"), given=True)
    return Body()


def parse_headers(lines: Sequence[str]) -> dict[str, str]:
    """`-H 'Name: value'` options as lowercase names (a later one replaces an earlier one)."""
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name):
            raise UsageError(f"invalid header {line!r}: expected 'Name: value'")
        headers[name.lower()] = value.strip()
    return headers


def _content_type(body: bytes) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "application/octet-stream"
    return "application/json"


def resolve_key(option: str | None, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(id, secret) from --key, the environment, or the key file `make run` writes."""
    env = os.environ if environ is None else environ
    if option:
        key_id, sep, secret = option.partition(":")
        if not sep or not key_id or not secret:
            raise UsageError("--key must look like ID:SECRET")
        return key_id, secret
    key_id, secret = env.get(KEY_ID_VAR, ""), env.get(KEY_SECRET_VAR, "")
    if key_id and secret:
        return key_id, secret
    if key_id or secret:
        raise UsageError(f"set both {KEY_ID_VAR} and {KEY_SECRET_VAR}")
    key_file = Path(env.get("TASKMODE_DATA_DIR") or ".data") / DEV_KEY_FILE
    if key_file.is_file():
        key_id, sep, secret = key_file.read_text().strip().split(",")[0].partition(":")
        if sep and key_id and secret:
            return key_id, secret
    raise UsageError(
        f"no access key: pass --key ID:SECRET or set {KEY_ID_VAR} and {KEY_SECRET_VAR} "
        "(`make run` prints them)"
    )


def prepare(args: argparse.Namespace, *, key_id: str, secret: str, now: datetime | None = None) -> Prepared:
    """Build and sign the request the arguments describe."""
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"URL must be http(s)://host[:port]/path, got {args.url!r}")
    if parts.fragment:
        raise UsageError("URL must not have a #fragment")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(pairs)
    if len(query) != len(pairs):
        raise UsageError("a query parameter appears twice; the FC API never repeats one")
    # Sent exactly as it is signed: the gateway decodes and re-encodes the query either way.
    query_text = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in pairs)
    body = read_body(args)
    method = (args.method or ("POST" if body.given else "GET")).upper()
    headers = {"host": parts.netloc, **parse_headers(args.headers)}
    if body.data and "content-type" not in headers:
        headers["content-type"] = _content_type(body.data)
    signed_at = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    headers.update(sign_request(
        method=method, path=path, query=query, headers=headers, body=body.data,
        access_key_id=key_id, access_key_secret=secret, now=signed_at,
    ))
    url = f"{parts.scheme}://{parts.netloc}{path}" + (f"?{query_text}" if query_text else "")
    return Prepared(method=method, url=url, headers=headers, body=body, signed_at=signed_at)


def curl_command(request: Prepared, *, include: bool = False, fail: bool = False) -> str:
    """The request as one `curl` command line (POSIX shell quoting)."""
    argv = ["curl", "-sS"]
    if include:
        argv.append("-i")
    if fail:
        argv.append("-f")
    if request.method != "GET" or request.body.given:
        argv += ["-X", request.method]
    argv.append(request.url)
    for name, value in request.headers.items():
        argv += ["-H", f"{name}: {value}"]
    if request.body.given:
        if request.body.file is not None:
            argv += ["--data-binary", f"@{request.body.file}"]
        elif request.body.data:
            try:
                text = request.body.data.decode("utf-8")
            except UnicodeDecodeError:
                text = "\0"
            if "\0" in text:
                raise UsageError("a binary body cannot go on a command line: use --data-binary @FILE")
            argv += ["--data-raw", text]  # --data-raw: a leading @ is not a file name
    return shlex.join(argv)


def send(request: Prepared, *, timeout_s: float) -> httpx.Response:
    # trust_env=False: a proxy from the environment would see (and could replay) the signed request.
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        return client.request(request.method, request.url, headers=request.headers, content=request.body.data)


def write_response(response: httpx.Response, *, include: bool, out: BinaryIO | None = None) -> None:
    """The body (after the status line and headers with `include`), as curl prints it."""
    stream = out if out is not None else sys.stdout.buffer
    if include:
        head = [f"{response.http_version} {response.status_code} {response.reason_phrase}"]
        head += [f"{name}: {value}" for name, value in response.headers.multi_items()]
        stream.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", errors="replace"))
    stream.write(response.content)
    if response.content and not response.content.endswith(b"\n") and stream.isatty():
        stream.write(b"\n")  # keep the shell prompt off the body's last line
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        key_id, secret = resolve_key(args.key)
        request = prepare(args, key_id=key_id, secret=secret)
        if args.print_curl:
            print(curl_command(request, include=args.include, fail=args.fail))
            until = request.signed_at + timedelta(seconds=SIGNATURE_VALID_S)
            print(f"# signed at {request.signed_at:%H:%M:%SZ}; valid once, until about {until:%H:%M:%SZ} "
                  "(the gateway's clock-skew window; a second run is refused as a replay)", file=sys.stderr)
            return 0
        response = send(request, timeout_s=args.timeout)
    except UsageError as err:
        print(f"fccurl: {err}", file=sys.stderr)
        return 2
    except httpx.TimeoutException as err:
        print(f"fccurl: timed out: {err}", file=sys.stderr)
        return 28  # curl's exit code for a timeout
    except httpx.HTTPError as err:
        print(f"fccurl: {type(err).__name__}: {err}", file=sys.stderr)
        return 7  # curl's exit code for a failed connection
    write_response(response, include=args.include)
    if args.fail and response.status_code >= 400:
        return EXIT_HTTP_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
