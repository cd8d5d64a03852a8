"""Does the zip contain the module the handler names? Checked at CreateFunction/UpdateFunction.

Without this a function whose handler points at a missing file is accepted and every one of its
tasks then fails with ModuleNotFoundError; a 400 that names the missing file is kinder.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import PurePosixPath

from shared.errors import InvalidArgument


def _members(archive: bytes) -> set[str]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return {str(PurePosixPath(name.removeprefix("./"))) for name in zf.namelist() if not name.endswith("/")}


def _python_candidates(module: str) -> list[str]:
    path = module.replace(".", "/")
    return [f"{path}.py", f"{path}/__init__.py", f"{path}.pyc"]


def _node_candidates(module: str) -> list[str]:
    return [f"{module}{ext}" for ext in (".js", ".mjs", ".cjs")] + [f"{module}/index.js"]


def check_handler_in_archive(*, runtime: str, handler: str, archive: bytes) -> None:
    """Refuse (400) a python or nodejs function whose handler module is not in `archive`."""
    if runtime.startswith("python3"):
        candidates = _python_candidates
    elif runtime.startswith("nodejs"):
        candidates = _node_candidates
    else:
        return  # a custom runtime's handler is the program's own business
    module, _, attribute = handler.rpartition(".")
    if not module or not attribute:
        raise InvalidArgument(f"invalid handler {handler!r}: expected '<module>.<function>', e.g. index.handler")
    members = _members(archive)
    wanted = candidates(module)
    if any(name in members for name in wanted):
        return
    if runtime.startswith("python3") and any(
        name.startswith(f"{module.replace('.', '/')}.") and name.endswith(".so") for name in members
    ):
        return  # an extension module
    raise InvalidArgument(
        f"handler {handler!r} names module {module!r}, but code.zipFile has none of "
        f"{', '.join(wanted)} (files must be at the top of the zip, not in a folder)"
    )
