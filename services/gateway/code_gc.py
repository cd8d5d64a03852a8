"""Garbage collection of code archives: the object store keeps only code some function uses.

A replaced or deleted function's code, and the code of a CreateFunction that was refused after
its archive was stored, are removed once no function references them and they are older than a
grace period. The grace covers the moment between storing a new function's archive and writing
its record (which is the order CreateFunction and UpdateFunction use), so a sweep never removes
code a record is about to point at. Every gateway sweeps; deleting twice is harmless.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from shared.ports import FunctionCatalog

log = logging.getLogger(__name__)


async def sweep_code(catalog: FunctionCatalog, *, grace_s: float, now: datetime | None = None) -> list[str]:
    """Delete unreferenced archives older than `grace_s`; returns the checksums deleted."""
    moment = now or datetime.now(timezone.utc)
    stored = await catalog.list_code()
    if not stored:
        return []
    # Referenced is read after the listing: an archive stored and referenced in between is
    # young, so the grace keeps it.
    referenced = await catalog.referenced_code()
    deleted = []
    for checksum, put_at in stored:
        if checksum in referenced or put_at is None or moment - put_at < timedelta(seconds=grace_s):
            continue
        await catalog.delete_code(checksum)
        deleted.append(checksum)
    if deleted:
        log.info("unreferenced code removed", extra={"count": len(deleted)})
    return deleted
