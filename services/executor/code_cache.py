"""Unpacked function code on local disk, one directory per code checksum.

`sweep` removes the directories of code no function uses any more (replaced or deleted), once
they have gone unreferenced for a grace period, so the disk holds the current code only.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import shutil
import time
import uuid
import zipfile
from collections.abc import Collection
from pathlib import Path

from shared import codezip
from shared.catalog import FunctionRecord
from shared.ports import FunctionCatalog

log = logging.getLogger(__name__)


class CodeCache:
    def __init__(self, *, catalog: FunctionCatalog, root: Path) -> None:
        self._catalog = catalog
        self._root = root
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready: set[str] = set()  # checksums known unpacked: no disk check per task
        self._unreferenced_since: dict[str, float] = {}  # monotonic time a directory was first seen unused

    async def directory(self, function: FunctionRecord) -> Path:
        """The unpacked code of `function`, fetched from the object store the first time."""
        checksum = function.code_key
        target = self._root / checksum
        if checksum in self._ready:
            return target
        lock = self._locks.setdefault(checksum, asyncio.Lock())
        async with lock:
            if not target.exists():
                archive = await self._catalog.get_code(checksum)
                await asyncio.to_thread(_unpack, archive, target)
            self._ready.add(checksum)
        return target

    async def sweep(self, in_use: Collection[str], *, grace_s: float) -> list[str]:
        """Remove unpacked code whose checksum is not `in_use` and has not been for `grace_s`
        (and staging left by a crash); returns the checksums removed."""
        now = time.monotonic()
        removed: list[str] = []
        entries = list(self._root.iterdir()) if self._root.is_dir() else []
        for entry in entries:
            name = entry.name.lstrip(".").split(".", 1)[0]  # ".<checksum>.<uuid>" while staging
            if name in in_use or name in self._locks and self._locks[name].locked():
                self._unreferenced_since.pop(name, None)
                continue
            since = self._unreferenced_since.setdefault(entry.name, now)
            if now - since < grace_s:
                continue
            await asyncio.to_thread(shutil.rmtree, entry, True)
            self._unreferenced_since.pop(entry.name, None)
            self._ready.discard(name)
            removed.append(name)
        if removed:
            log.info("unused code directories removed", extra={"count": len(removed)})
        return removed


def _unpack(archive: bytes, target: Path) -> None:
    # Unpack beside the target and rename, so a crash never leaves a half-written directory.
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            codezip.extract(zf, staging, archive_bytes=len(archive))
        staging.rename(target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        # Another process sharing the directory (a second executor) unpacked it first: rename
        # onto a non-empty directory fails with ENOTEMPTY (EEXIST on some systems).
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
