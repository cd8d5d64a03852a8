"""What a code zip must pass before it is accepted: the executor must be able to unpack it."""

from __future__ import annotations

import zipfile
from pathlib import PurePosixPath

from shared.errors import InvalidArgument


def check_archive(archive: zipfile.ZipFile) -> None:
    """Refuse an archive whose members are corrupt or cannot all be unpacked side by side.

    Checked here, at CreateFunction/UpdateFunction, so that a bad upload is a 400 rather than
    every later task of the function ending Invalid.
    """
    corrupt = archive.testzip()
    if corrupt is not None:
        raise InvalidArgument(f"code.zipFile member {corrupt!r} is corrupt (CRC mismatch)")
    files = {info.filename.rstrip("/") for info in archive.infolist() if not info.is_dir()}
    for name in files:
        for parent in PurePosixPath(name).parents:
            if str(parent) in files:
                raise InvalidArgument(f"code.zipFile has {str(parent)!r} both as a file and as a folder")
