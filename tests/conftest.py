"""Shared fixtures: real servers on loopback, one fresh database per test.

`MONGODB_URL` switches every MongoDB-backed test from the embedded nx-27017 server to a real
MongoDB, so the same contract tests run against both.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from shared.devstack import start_mongo_wire
from shared.taskstore import TaskStore


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`MONGODB_URL` if set, else an embedded MongoDB-wire server for the whole session."""
    external = os.environ.get("MONGODB_URL")
    if external:
        yield external
        return
    server = start_mongo_wire(tmp_path_factory.mktemp("mongo"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def task_store(mongo_url: str) -> AsyncIterator[TaskStore]:
    """A TaskStore on a database of its own (indexes ensured), dropped after the test."""
    database = f"taskmode_test_{uuid.uuid4().hex}"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    store = TaskStore(client, database=database)  # the store owns the client from here on
    try:
        await store.ensure_indexes()
        yield store
    finally:
        try:
            await client.drop_database(database)
        finally:
            await store.close()

pytest_plugins = ["tests.integration_fixtures"]
