"""Code archives: the limits a function's zip must keep, checked where it is accepted and where it
is unpacked, so that neither the gateway nor the executor can be made to inflate a bomb.

FC allows 500 MB of unzipped code; taskmode takes the same figure (`MAX_UNZIPPED_BYTES`), plus
a cap on the compression ratio of large archives (a zip bomb is thousands to one; real code is
rarely above 20) and on the number of members. The sizes a zip declares are checked first, which
costs nothing; unpacking then counts the bytes it actually writes, so a member that lies about
its size is caught too (zipfile stops at the declared size and the CRC check fails).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Final

from shared.errors import InvalidArgument

MAX_UNZIPPED_BYTES: Final = 500 * 1024 * 1024
MAX_MEMBERS: Final = 20_000
MAX_RATIO: Final = 100  # uncompressed / compressed, over the whole archive...
RATIO_APPLIES_ABOVE_BYTES: Final = 16 * 1024 * 1024  # ...once it inflates past this much
_CHUNK: Final = 1024 * 1024


def check_declared(archive: zipfile.ZipFile, *, archive_bytes: int) -> None:
    """Refuse an archive whose declared contents break the limits (no decompression)."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise InvalidArgument(f"code.zipFile has {len(members)} members; at most {MAX_MEMBERS} are allowed")
    total = sum(info.file_size for info in members)
    if total > MAX_UNZIPPED_BYTES:
        raise InvalidArgument(
            f"code.zipFile unpacks to {total} bytes; at most {MAX_UNZIPPED_BYTES} bytes are allowed")
    if total > RATIO_APPLIES_ABOVE_BYTES and total > MAX_RATIO * max(archive_bytes, 1):
        raise InvalidArgument(
            f"code.zipFile unpacks to {total} bytes from {archive_bytes}: more than {MAX_RATIO} times its size")
    for info in members:
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts:
            raise InvalidArgument(f"code.zipFile member {info.filename!r} points outside the archive")


def check_members(archive: zipfile.ZipFile) -> None:
    """Refuse corrupt members and names that cannot all be unpacked side by side (decompresses)."""
    corrupt = archive.testzip()
    if corrupt is not None:
        raise InvalidArgument(f"code.zipFile member {corrupt!r} is corrupt (CRC mismatch)")
    files = {info.filename.rstrip("/") for info in archive.infolist() if not info.is_dir()}
    for name in files:
        for parent in PurePosixPath(name).parents:
            if str(parent) in files:
                raise InvalidArgument(f"code.zipFile has {str(parent)!r} both as a file and as a folder")


def extract(archive: zipfile.ZipFile, target: Path, *, archive_bytes: int) -> None:
    """Unpack into `target` (which must exist), within the limits, readable by any user.

    Modes are set explicitly (directories 0755, files 0644, or 0755 when the zip marks them
    executable), whatever the umask: the sandboxed instance reads the code as another uid.
    """
    check_declared(archive, archive_bytes=archive_bytes)
    written = 0
    root = target.resolve()
    for info in archive.infolist():
        destination = (root / info.filename).resolve()
        if destination != root and root not in destination.parents:
            raise InvalidArgument(f"code.zipFile member {info.filename!r} points outside the archive")
        if info.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, open(destination, "wb") as sink:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > MAX_UNZIPPED_BYTES:
                    raise InvalidArgument(f"code.zipFile unpacks to more than {MAX_UNZIPPED_BYTES} bytes")
                sink.write(chunk)
        executable = (info.external_attr >> 16) & 0o111
        os.chmod(destination, 0o755 if executable else 0o644)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.chmod(directory, 0o755)
