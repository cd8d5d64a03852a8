"""Size-based rotation of the log files `make run` gives its children.

Each child writes to its log through a descriptor opened with O_APPEND, so the file can be
rotated under it the way logrotate's `copytruncate` does: copy the file to `<name>.1` (older
copies move up to `.2`, ... and the last one is dropped), then truncate it; the child's next
write lands at the start of the emptied file. Lines written between the copy and the truncation
are lost, which is the price of not restarting anything; with the default check every second
that is at most a second's worth of one service's output per rotation.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Final

DEFAULT_MAX_BYTES: Final = 50 * 1024 * 1024
DEFAULT_KEEP: Final = 5


def rotate_if_large(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> bool:
    """Rotate `path` if it has grown past `max_bytes`; True if it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    newest = path.with_name(f"{path.name}.1")
    with open(path, "rb") as source, open(newest, "wb") as copy:
        shutil.copyfileobj(source, copy, 1024 * 1024)
    os.truncate(path, 0)
    dropped = path.with_name(f"{path.name}.{keep + 1}")
    dropped.unlink(missing_ok=True)
    return True


def rotate_all(paths: Iterable[Path], *, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> list[Path]:
    """Rotate each of `paths` that is too large; the ones rotated."""
    return [path for path in paths if rotate_if_large(path, max_bytes=max_bytes, keep=keep)]
