"""Qualifiers: which configuration and code an invocation of `function` with `qualifier` gets.

`LATEST` is the function record itself; a version id is that version's snapshot; an alias is
its version, or, with `additionalVersionWeight`, the other version for that share of calls
(a canary). Aliases are resolved when a task runs, not when it is submitted, so repointing an
alias also redirects tasks that are still waiting.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from shared.catalog import FunctionRecord
from shared.errors import AliasNotFound, FunctionNotFound, InvalidArgument, VersionNotFound
from shared.ports import FunctionCatalog
from shared.wire import LATEST

VERSION_ID_RE: Final = re.compile(r"^[1-9][0-9]{0,9}$")
# FC's alias names: a letter first, no dots (they are KV key tokens here), not all digits.
ALIAS_NAME_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,127}$")


# A draw that no weight can claim: resolves an alias to its own version (for GetFunction).
MAIN_VERSION_DRAW: Final = 1.0


@dataclass(frozen=True)
class Resolved:
    qualifier: str  # as asked: LATEST, a version id or an alias
    version_id: str  # what serves it: LATEST or a version id
    function: FunctionRecord  # the configuration and code to run


def check_qualifier(qualifier: str | None) -> str:
    """The qualifier's canonical form (None or empty: LATEST); `InvalidArgument` for one that
    could name nothing."""
    if not qualifier or qualifier == LATEST:
        return LATEST
    if VERSION_ID_RE.fullmatch(qualifier) or ALIAS_NAME_RE.fullmatch(qualifier):
        return qualifier
    raise InvalidArgument(
        f"invalid qualifier {qualifier[:40]!r}: use LATEST, a version id or an alias name"
    )


def pick_version(main: str, weights: dict[str, float], draw: float) -> str:
    """The version an alias sends one call to, for a uniform `draw` in [0, 1)."""
    for version_id, weight in sorted(weights.items()):
        if draw < weight:
            return version_id
        draw -= weight
    return main


async def resolve(
    catalog: FunctionCatalog, function: str, qualifier: str, *, draw: Callable[[], float] = random.random
) -> Resolved:
    """What serves `function:qualifier` now; FunctionNotFound / VersionNotFound / AliasNotFound."""
    record = await catalog.find_function(function)
    if record is None:
        raise FunctionNotFound(f"function {function} does not exist")
    if qualifier == LATEST:
        return Resolved(LATEST, LATEST, record)
    versions = catalog.versions
    if versions is None:
        raise VersionNotFound(f"function {function} has no version {qualifier}")
    if VERSION_ID_RE.fullmatch(qualifier):
        version_id = qualifier
    else:
        alias = await versions.find_alias(function, qualifier)
        if alias is None:
            raise AliasNotFound(f"alias {qualifier} of function {function} does not exist")
        version_id = pick_version(alias.version_id, alias.additional_version_weight, draw())
    version = await versions.find_version(function, version_id)
    if version is None or version.function.function_id != record.function_id:
        raise VersionNotFound(f"version {version_id} of function {function} does not exist")
    return Resolved(qualifier, version_id, version.function)
