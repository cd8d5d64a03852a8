"""What services need from the event store, the catalog and the task read model, as protocols.

Services take these as parameter types instead of the concrete classes (`EventStore`,
`Catalog`, `TaskStore`), so a handler states the operations it relies on and a test can hand
in a small fake that mypy checks structurally. The concrete classes satisfy them as they are;
nothing needs to inherit from a protocol.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from shared.catalog import AsyncConfigRecord, FunctionRecord
from shared.events import TaskEvent
from shared.eventstore import StoredEvent
from shared.taskstore import TaskPage, TaskQuery
from shared.taskview import TaskDocument
from shared.transitions import Status
from shared.versions import Versions
from shared.wire import LATEST


class EventLog(Protocol):
    """The task event stream: conditional appends and reads by task (see `shared.eventstore`)."""

    async def append(self, event: TaskEvent, *, expected_seq: int) -> int:
        """Append if the task's last event is at `expected_seq`; its stream sequence."""
        ...

    @property
    def partitions(self) -> int:
        """How many partitions tasks are split into."""
        ...

    async def last(self, function: str, task_id: str) -> StoredEvent | None:
        """The task's latest event."""
        ...

    async def last_with_status(self, function: str, task_id: str, status: Status) -> StoredEvent | None:
        """The task's latest event of one status."""
        ...

    async def history(self, function: str, task_id: str) -> list[StoredEvent]:
        """Every retained event of the task, in order."""
        ...


class FunctionCatalog(Protocol):
    """Functions, their async configs and code archives (see `shared.catalog`)."""

    @property
    def versions(self) -> Versions | None:
        """Versions and aliases (None only for a catalog opened without them)."""
        ...

    async def put_code(self, checksum: str, archive: bytes) -> None: ...

    async def get_code(self, checksum: str) -> bytes: ...

    async def list_code(self) -> list[tuple[str, datetime | None]]: ...

    async def delete_code(self, checksum: str) -> None: ...

    async def referenced_code(self) -> set[str]: ...

    async def create_function(self, record: FunctionRecord) -> None: ...

    async def get_function_versioned(self, name: str) -> tuple[FunctionRecord, int]: ...

    async def get_function(self, name: str) -> FunctionRecord: ...

    async def find_function(self, name: str) -> FunctionRecord | None: ...

    def cached_function(self, name: str) -> FunctionRecord | None: ...

    async def replace_function(self, record: FunctionRecord, *, revision: int) -> None: ...

    async def delete_function(self, name: str) -> None: ...

    async def list_functions(self) -> list[FunctionRecord]: ...

    async def put_async_config(self, name: str, record: AsyncConfigRecord) -> None: ...

    async def find_async_config(self, name: str, qualifier: str = LATEST) -> AsyncConfigRecord | None: ...

    async def get_async_config(self, name: str, qualifier: str = LATEST) -> AsyncConfigRecord: ...

    async def delete_async_config(self, name: str, qualifier: str = LATEST) -> None: ...

    async def list_async_configs(self) -> list[tuple[str, AsyncConfigRecord]]: ...

    async def list_async_configs_of(self, name: str) -> list[tuple[str, AsyncConfigRecord]]: ...


class TaskReadModel(Protocol):
    """The task documents the projection writes and the gateway reads (see `shared.taskstore`)."""

    async def reachable(self, *, timeout_s: float = 1.0) -> bool:
        """Whether the store answers now (for readiness probes)."""
        ...

    async def unfinished(self, partition: int, *, partitions: int) -> list[dict[str, Any]]:
        """The tasks of one partition not yet in a final status."""
        ...

    async def count_with_status(self, function: str, status: str) -> int:
        """How many of `function`'s tasks are in `status` now."""
        ...

    async def load_many(self, ids: Iterable[str]) -> dict[str, TaskDocument]:
        """Whole stored documents by `_id`; absent ids are left out."""
        ...

    def believed_reachable(self) -> bool:
        """Whether the store is believed up (without a round trip)."""
        ...

    async def save_many(self, docs: Sequence[TaskDocument], *, new: Collection[str] = ()) -> None:
        """Replace (or insert) whole documents; those with an `_id` in `new` are believed not stored yet."""
        ...

    def check_query(self, query: TaskQuery) -> None:
        """Raise InvalidNextToken for a token `list_tasks` would refuse, without reading anything."""
        ...

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        """One page of a function's tasks in FC `AsyncTask` shape."""
        ...
