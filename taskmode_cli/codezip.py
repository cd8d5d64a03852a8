"""Function code for CreateFunction / UpdateFunction: a folder (zipped here) or a zip file."""

from __future__ import annotations

import base64
import io
import os
import zipfile
from pathlib import Path
from typing import Final

# Left out of a zipped folder: they never belong in function code and can be large.
SKIPPED_DIRS: Final = frozenset({".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", "node_modules"})


class CodeError(Exception):
    """The code path cannot be used; the message says why."""


def zip_folder(folder: Path) -> bytes:
    """The folder's files as a zip, paths relative to the folder, in a stable order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            for name in sorted(files):
                path = Path(root) / name
                if name.endswith(".pyc") or not path.is_file():
                    continue
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def code_zip(path: Path) -> bytes:
    """The zip for `path`: a folder is zipped, a `.zip` file is sent as it is."""
    if path.is_dir():
        data = zip_folder(path)
    elif path.is_file():
        data = path.read_bytes()
        if not zipfile.is_zipfile(io.BytesIO(data)):
            raise CodeError(f"{path} is not a zip file (give a folder to have it zipped)")
    else:
        raise CodeError(f"{path} does not exist")
    return data


def code_field(path: Path) -> dict[str, str]:
    """FC's `code` object for `path`: `{"zipFile": <base64 zip>}`."""
    return {"zipFile": base64.b64encode(code_zip(path)).decode()}
