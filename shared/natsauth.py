"""Who may do what on the bus: one NATS user per service role, with the subjects it needs.

NATS checks every publish and subscription against these permissions, so a service (or anyone
holding its password) can only write the transitions its role makes and read what it consumes:
the executor cannot append `Enqueued`, the projection cannot append anything, and only the
gateway can change the catalog. Function instances get no credentials at all.

JetStream is driven through subjects too (`$JS.API.*` requests, `$KV.*` / `$O.*` writes,
`$JS.ACK.*` acknowledgements), so each role lists the API calls it makes on each stream. Every
role gets its own inbox prefix (`_INBOX.<role>`), so no role can read replies meant for another.

`render_authorization` writes the `authorization` block of a nats-server config: with real
passwords for `make run` and the tests (`shared/devstack.py`), or with `$VARIABLE` references
that nats-server takes from its environment (deploy/nats-server.conf, for docker compose).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shared import wire
from shared.transitions import Status

GATEWAY: Final = "gateway"
SCHEDULER: Final = "scheduler"
EXECUTOR: Final = "executor"
PROJECTION: Final = "projection"
# Everything, for an operator's tools (the `nats` CLI, benchmarks, tests); no service uses it.
ADMIN: Final = "admin"
ROLES: Final = (GATEWAY, SCHEDULER, EXECUTOR, PROJECTION, ADMIN)

# Which transitions each role appends (the status token of the event subject).
APPENDS: Final[Mapping[str, tuple[Status, ...]]] = {
    GATEWAY: (Status.ENQUEUED, Status.PROCESSED, Status.STOPPING, Status.STOPPED),
    SCHEDULER: (Status.PROCESSED, Status.EXPIRED, Status.INVALID),
    EXECUTOR: (Status.RUNNING, Status.SUCCEEDED, Status.FAILED, Status.RETRYING, Status.STOPPED, Status.INVALID),
    PROJECTION: (),
    ADMIN: (),
}

_EVENTS_STREAM: Final = wire.EVENT_STREAM
_FUNCTIONS: Final = f"KV_{wire.FUNCTIONS_BUCKET}"
_CONFIGS: Final = f"KV_{wire.ASYNC_CONFIG_BUCKET}"
_LEASES: Final = f"KV_{wire.LEASES_BUCKET}"
_CODE: Final = f"OBJ_{wire.CODE_BUCKET}"
_NONCES: Final = f"KV_{wire.NONCES_BUCKET}"


def inbox_prefix(role: str) -> str:
    """The inbox prefix a role's connection uses (and the only inboxes it may subscribe to)."""
    return f"_INBOX.{role}"


def _stream_api(stream: str, *, create: bool = False, read: bool = False, consume: bool = False,
                purge: bool = False, delete_consumers: bool = False) -> list[str]:
    api = [f"$JS.API.STREAM.INFO.{stream}"]
    if create:
        api += [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"]
    if read:
        api += [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}"]
    if consume:
        api += [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>", f"$JS.API.CONSUMER.INFO.{stream}.>",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>", f"$JS.API.CONSUMER.DELETE.{stream}.>",
                f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]
    if delete_consumers and not consume:
        api += [f"$JS.API.CONSUMER.DELETE.{stream}.>"]
    if purge:
        api += [f"$JS.API.STREAM.PURGE.{stream}"]
    return api


def _catalog_read() -> list[str]:
    # A watched mirror of each bucket (ordered consumers), lookups of a single key, and the code.
    return [*_stream_api(_FUNCTIONS, create=True, read=True, consume=True),
            *_stream_api(_CONFIGS, create=True, read=True, consume=True),
            *_stream_api(_CODE, create=True, read=True, consume=True)]


def _leases() -> list[str]:
    return [*_stream_api(_LEASES, create=True, read=True, consume=True), f"$KV.{wire.LEASES_BUCKET}.>"]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer requests it received (the executor's sync replies)


def permissions(role: str) -> Permissions:
    """What `role` may publish and subscribe to."""
    appends = [wire.status_subjects(status) for status in APPENDS[role]]
    # STREAM.NAMES: nats-py looks a stream up by subject before some subscriptions (object gets).
    common_publish = ["$JS.API.INFO", "$JS.API.STREAM.NAMES", *_stream_api(_EVENTS_STREAM, create=True, read=True)]
    inbox = [f"{inbox_prefix(role)}.>"]
    if role == GATEWAY:
        return Permissions(
            publish=(*common_publish, *appends, *_catalog_read(),
                     f"$KV.{wire.FUNCTIONS_BUCKET}.>", f"$KV.{wire.ASYNC_CONFIG_BUCKET}.>",
                     f"$O.{wire.CODE_BUCKET}.>", *_stream_api(_CODE, purge=True),
                     *_stream_api(_NONCES, create=True, read=True), f"$KV.{wire.NONCES_BUCKET}.>",
                     f"{wire.SYNC_INVOKE_PREFIX}.>"),
            subscribe=tuple(inbox),
        )
    if role == SCHEDULER:
        return Permissions(
            publish=(*common_publish, *appends, *_stream_api(_EVENTS_STREAM, consume=True), *_catalog_read(),
                     *_leases()),
            subscribe=tuple(inbox),
        )
    if role == EXECUTOR:
        return Permissions(
            publish=(*common_publish, *appends, *_stream_api(_EVENTS_STREAM, consume=True), *_catalog_read()),
            subscribe=(*inbox, wire.status_subjects(Status.STOPPING), f"{wire.SYNC_INVOKE_PREFIX}.*"),
            allow_responses=True,
        )
    if role == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",))
    if role == PROJECTION:
        return Permissions(
            publish=(*common_publish, *_stream_api(_EVENTS_STREAM, consume=True), *_leases()),
            subscribe=tuple(inbox),
        )
    raise ValueError(f"unknown role {role!r}")


def password_variable(role: str) -> str:
    """The environment variable that carries `role`'s password in docker compose."""
    return f"NATS_{role.upper()}_PASSWORD"


def render_authorization(passwords: Mapping[str, str] | None = None) -> str:
    """The `authorization { users = [...] }` block of a nats-server config.

    With `passwords`, they are written in (the file must then be private); without, each role's
    password is a `$NATS_<ROLE>_PASSWORD` reference that nats-server resolves from its environment.
    """
    users = []
    for role in ROLES:
        perms = permissions(role)
        password = json.dumps(passwords[role]) if passwords is not None else f"${password_variable(role)}"
        allow = {"publish": {"allow": list(perms.publish)}, "subscribe": {"allow": list(perms.subscribe)}}
        if perms.allow_responses:
            allow["allow_responses"] = {"max": 1}  # type: ignore[dict-item]
        users.append(f"    {{user: {json.dumps(role)}, password: {password}, permissions: {json.dumps(allow)}}}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def new_passwords() -> dict[str, str]:
    """A fresh random password per role."""
    return {role: secrets.token_urlsafe(24) for role in ROLES}


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only, never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.new")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as file:
        file.write(text)
    staging.replace(path)


def load_or_create_passwords(secrets_dir: Path) -> dict[str, str]:
    """The roles' passwords kept in `secrets_dir` (one 0600 file per role), generated on first use."""
    passwords: dict[str, str] = {}
    fresh = new_passwords()
    for role in ROLES:
        path = password_file(secrets_dir, role)
        if not path.exists():
            write_private(path, fresh[role] + "\n")
        passwords[role] = path.read_text().strip()
    return passwords


def password_file(secrets_dir: Path, role: str) -> Path:
    return secrets_dir / f"nats-{role}.password"
