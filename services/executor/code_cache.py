"""Unpacked function code on local disk, one directory per code checksum."""

from __future__ import annotations

import asyncio
import io
import shutil
import uuid
import zipfile
from pathlib import Path

from shared import codezip
from shared.catalog import FunctionRecord
from shared.ports import FunctionCatalog


class CodeCache:
    def __init__(self, *, catalog: FunctionCatalog, root: Path) -> None:
        self._catalog = catalog
        self._root = root
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready: set[str] = set()  # checksums known unpacked: no disk check per task

    async def directory(self, function: FunctionRecord) -> Path:
        """The unpacked code of `function`, fetched from the object store the first time."""
        checksum = function.code_checksum
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


def _unpack(archive: bytes, target: Path) -> None:
    # Unpack beside the target and rename, so a crash never leaves a half-written directory.
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            codezip.extract(zf, staging, archive_bytes=len(archive))
        staging.rename(target)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
