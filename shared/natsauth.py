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
that nats-server takes from its environment (deploy/nats/cluster.conf, which docker compose and
Kubernetes run: their env file and secrets fill the variables).
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
TRIGGERS: Final = "triggers"
DELIVERER: Final = "deliverer"
# The applications around taskmode: they publish to `nats` triggers' subjects (and wait for the
# answer) and subscribe to `nats:` destinations; anything outside the system's own subjects.
PUBLISHER: Final = "publisher"
# Everything, for an operator's tools (the `nats` CLI, benchmarks, tests); no service uses it.
ADMIN: Final = "admin"
ROLES: Final = (GATEWAY, SCHEDULER, EXECUTOR, PROJECTION, TRIGGERS, DELIVERER, PUBLISHER, ADMIN)
SERVICE_ROLES: Final = (GATEWAY, SCHEDULER, EXECUTOR, PROJECTION, TRIGGERS, DELIVERER)

# Which transitions each role appends (the status token of the event subject). Triggers and the
# deliverer (a destination that is a function) only create tasks, through shared.submission.
APPENDS: Final[Mapping[str, tuple[Status, ...]]] = {
    GATEWAY: (Status.ENQUEUED, Status.STOPPING, Status.STOPPED),
    SCHEDULER: (Status.PROCESSED, Status.EXPIRED, Status.INVALID),
    EXECUTOR: (Status.RUNNING, Status.SUCCEEDED, Status.FAILED, Status.RETRYING, Status.STOPPED, Status.INVALID),
    PROJECTION: (),
    TRIGGERS: (Status.ENQUEUED,),
    DELIVERER: (Status.ENQUEUED,),
    PUBLISHER: (),
    ADMIN: (),
}

_EVENTS_STREAM: Final = wire.EVENT_STREAM
_LOGS_STREAM: Final = wire.LOGS_STREAM
_FUNCTIONS: Final = f"KV_{wire.FUNCTIONS_BUCKET}"
_CONFIGS: Final = f"KV_{wire.ASYNC_CONFIG_BUCKET}"
_VERSIONS: Final = f"KV_{wire.VERSIONS_BUCKET}"
_TRIGGERS: Final = f"KV_{wire.TRIGGERS_BUCKET}"
_LEASES: Final = f"KV_{wire.LEASES_BUCKET}"
_CODE: Final = f"OBJ_{wire.CODE_BUCKET}"
_NONCES: Final = f"KV_{wire.NONCES_BUCKET}"
_CONCURRENCY: Final = f"KV_{wire.CONCURRENCY_CONFIG_BUCKET}"
_SCALING: Final = f"KV_{wire.SCALING_CONFIG_BUCKET}"
_INSTANCES: Final = f"KV_{wire.INSTANCES_BUCKET}"
_RUNNING: Final = f"KV_{wire.RUNNING_BUCKET}"

# What a user may name as a `nats` trigger's subject or a `nats:` destination is any subject
# outside these roots (shared.triggers.RESERVED_SUBJECT_ROOTS, checked when it is named); the
# roles that touch user subjects are also denied them by the server, as a second line.
_SYSTEM_SUBJECTS: Final = ("taskmode.>", "$JS.>", "$KV.>", "$O.>", "$SYS.>")


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


def _bucket_read(stream: str) -> list[str]:
    # A watched mirror (an ordered consumer), lookups of a single key; created when missing.
    return _stream_api(stream, create=True, read=True, consume=True)


def _catalog_read() -> list[str]:
    # Every service opens the whole catalog (shared.catalog.Catalog.open): functions, async
    # configs, code, and the published versions.
    return [*_bucket_read(_FUNCTIONS), *_bucket_read(_CONFIGS), *_bucket_read(_CODE), *_bucket_read(_VERSIONS)]


def _function_queues() -> list[str]:
    # Per-function consumers (shared/function_queues.py): listed to find a deleted function's
    # leftover queue; created, read and deleted like any consumer of the event stream.
    return [*_stream_api(_EVENTS_STREAM, consume=True), f"$JS.API.CONSUMER.LIST.{_EVENTS_STREAM}"]


def _flow_read() -> list[str]:
    # Concurrency and scaling configs (shared.flowconfig.FlowConfigs): watched mirrors.
    return [*_bucket_read(_CONCURRENCY), *_bucket_read(_SCALING)]


def _leases() -> list[str]:
    return [*_bucket_read(_LEASES), f"$KV.{wire.LEASES_BUCKET}.>"]


def _other_inboxes(role: str) -> list[str]:
    return [f"{inbox_prefix(other)}.>" for other in (*SERVICE_ROLES, PUBLISHER) if other != role]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer requests it received (sync replies, trigger replies)
    publish_deny: tuple[str, ...] = ()  # taken out of `publish` (nats-server: deny wins)
    subscribe_deny: tuple[str, ...] = ()


def permissions(role: str) -> Permissions:
    """What `role` may publish and subscribe to."""
    appends = [wire.status_subjects(status) for status in APPENDS[role]]
    # STREAM.NAMES: nats-py looks a stream up by subject before some subscriptions (object gets).
    common_publish = ["$JS.API.INFO", "$JS.API.STREAM.NAMES", *_stream_api(_EVENTS_STREAM, create=True, read=True)]
    inbox = [f"{inbox_prefix(role)}.>"]
    if role == GATEWAY:
        return Permissions(
            publish=(*common_publish, *appends, *_catalog_read(), *_bucket_read(_TRIGGERS),
                     f"$KV.{wire.FUNCTIONS_BUCKET}.>", f"$KV.{wire.ASYNC_CONFIG_BUCKET}.>",
                     f"$KV.{wire.VERSIONS_BUCKET}.>", f"$KV.{wire.TRIGGERS_BUCKET}.>",
                     f"$O.{wire.CODE_BUCKET}.>", *_stream_api(_CODE, purge=True),
                     *_stream_api(_NONCES, create=True, read=True), f"$KV.{wire.NONCES_BUCKET}.>",
                     # Flow control: writes the configs, reads the instances the executors report.
                     *_flow_read(), f"$KV.{wire.CONCURRENCY_CONFIG_BUCKET}.>", f"$KV.{wire.SCALING_CONFIG_BUCKET}.>",
                     *_bucket_read(_INSTANCES),
                     # The watch API and the console follow tasks with ordered consumers.
                     *_stream_api(_EVENTS_STREAM, consume=True),
                     # Per-invocation logs (GetAsyncTask's, the console's): read only.
                     *_stream_api(_LOGS_STREAM, read=True),
                     f"{wire.SYNC_INVOKE_PREFIX}.>"),
            subscribe=tuple(inbox),
        )
    if role == SCHEDULER:
        return Permissions(
            publish=(*common_publish, *appends, *_stream_api(_EVENTS_STREAM, consume=True), *_catalog_read(),
                     *_leases(), *_flow_read(), *_function_queues(),
                     # Delayed tasks: files their schedules (shared/delays.py).
                     wire.SCHEDULE_SUBJECTS_ALL),
            subscribe=tuple(inbox),
        )
    if role == EXECUTOR:
        return Permissions(
            publish=(*common_publish, *appends, *_stream_api(_EVENTS_STREAM, consume=True), *_catalog_read(),
                     # Flow control: reads the configs, reports its live instances (ListInstances).
                     *_flow_read(), *_bucket_read(_INSTANCES), f"$KV.{wire.INSTANCES_BUCKET}.>", *_function_queues(),
                     # reservedConcurrency across executors: the running slots (services/executor/slots.py).
                     *_bucket_read(_RUNNING), f"$KV.{wire.RUNNING_BUCKET}.>",
                     # Each attempt's log: the executor keeps the logs stream and writes it.
                     *_stream_api(_LOGS_STREAM, create=True), f"{wire.LOGS_SUBJECT_PREFIX}.>"),
            subscribe=(*inbox, wire.status_subjects(Status.STOPPING), f"{wire.SYNC_INVOKE_PREFIX}.*"),
            allow_responses=True,
        )
    if role == PROJECTION:
        return Permissions(
            publish=(*common_publish, *_stream_api(_EVENTS_STREAM, consume=True), *_leases()),
            subscribe=tuple(inbox),
        )
    if role == TRIGGERS:
        # Subscribes to the subjects users name for their `nats` triggers (in queue groups) and
        # answers their publishers; creates tasks (pipelined appends on the Enqueued subjects,
        # acknowledged to its own inbox).
        return Permissions(
            publish=(*common_publish, *appends, *_catalog_read(), *_bucket_read(_TRIGGERS), *_leases()),
            subscribe=(*inbox, ">"),
            allow_responses=True,
            subscribe_deny=(*_SYSTEM_SUBJECTS, *_other_inboxes(role)),
        )
    if role == DELIVERER:
        # Consumes final events, appends delivery records, creates tasks (a function as the
        # destination), and publishes to the subjects users name as `nats:` destinations: those
        # are any subject, so what it must not touch is denied instead (deny wins over allow).
        internal = [wire.status_subjects(status) for status in Status if status not in APPENDS[role]]
        return Permissions(
            publish=(">",),
            subscribe=tuple(inbox),
            publish_deny=(*internal, wire.SCHEDULE_SUBJECTS_ALL, wire.DUE_SUBJECTS_ALL,
                          f"{wire.LOGS_SUBJECT_PREFIX}.>", f"{wire.SYNC_INVOKE_PREFIX}.>",
                          *(f"$KV.{bucket}.>" for bucket in (wire.FUNCTIONS_BUCKET, wire.ASYNC_CONFIG_BUCKET,
                                                             wire.VERSIONS_BUCKET, wire.TRIGGERS_BUCKET,
                                                             wire.NONCES_BUCKET, wire.CONCURRENCY_CONFIG_BUCKET,
                                                             wire.SCALING_CONFIG_BUCKET, wire.INSTANCES_BUCKET,
                                                             wire.RUNNING_BUCKET)),
                          "$O.>", "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>",
                          "$JS.API.STREAM.MSG.DELETE.>", "$SYS.>", "_INBOX.>"),
        )
    if role == PUBLISHER:
        outside = (*_SYSTEM_SUBJECTS, *_other_inboxes(role))
        return Permissions(publish=(">",), subscribe=(">",), publish_deny=outside, subscribe_deny=outside)
    if role == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",))
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
        allow: dict[str, object] = {"publish": {"allow": list(perms.publish)},
                                    "subscribe": {"allow": list(perms.subscribe)}}
        if perms.publish_deny:
            allow["publish"] = {"allow": list(perms.publish), "deny": list(perms.publish_deny)}
        if perms.subscribe_deny:
            allow["subscribe"] = {"allow": list(perms.subscribe), "deny": list(perms.subscribe_deny)}
        if perms.allow_responses:
            allow["allow_responses"] = {"max": 1}
        users.append(f"    {{user: {json.dumps(role)}, password: {password}, permissions: {json.dumps(allow)}}}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def new_password() -> str:
    """A random password that nats-server's config reads as a plain string wherever it appears,
    also through a `$VARIABLE`: a value that starts with a digit is read as a number there (and
    refused), so it starts with letters, and holds nothing but letters and digits."""
    return "pw" + secrets.token_hex(24)


def new_passwords() -> dict[str, str]:
    """A fresh random password per role."""
    return {role: new_password() for role in ROLES}


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only, never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.new")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as file:
        file.write(text)
    staging.replace(path)


def store_passwords(secrets_dir: Path, passwords: Mapping[str, str]) -> None:
    """Keep the given roles' passwords in `secrets_dir` (one 0600 file per role)."""
    for role, password in passwords.items():
        write_private(password_file(secrets_dir, role), password + "\n")


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
