"""Structural rules of the codebase: services share only `shared/`, every transition goes
through the one table, and wire names are not spelled out in the services."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from shared.transitions import STATUS_ALIASES, Status

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["gateway", "scheduler", "executor", "projection", "triggers", "deliverer"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_only_shared_and_itself(service: str) -> None:
    offenders = []
    for path in (ROOT / "services" / service).rglob("*.py"):
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "services" and (len(parts) < 2 or parts[1] != service):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == []


def test_shared_imports_no_service() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / "shared").rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] == "services"
    ]
    assert offenders == []


def test_no_service_spells_the_event_subjects_or_stream() -> None:
    literals = ("taskmode.events", "TASKMODE_EVENTS", "Nats-Expected-Last-Subject-Sequence")
    offenders = [
        f"{path.relative_to(ROOT)} contains {literal!r}"
        for path in (ROOT / "services").rglob("*.py")
        for literal in literals
        if literal in path.read_text()
    ]
    assert offenders == []


def test_events_are_only_built_through_the_transition_check() -> None:
    """Services create follow-up events with `follow`, which consults the table; only the
    gateway creates a task's first event directly."""
    offenders = []
    constructors = {"TaskProcessed", "TaskStarted", "TaskSucceeded", "TaskFailed", "TaskRetrying",
                    "TaskStopping", "TaskStopped", "TaskExpired", "TaskInvalid"}
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in constructors:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} builds {node.func.id} directly")
    assert offenders == []


def _string_constants(path: Path) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_no_service_spells_an_fc_header_or_a_nats_name() -> None:
    """`x-fc-*` headers, client and durable names live in shared/wire.py only."""
    offenders = [
        f"{path.relative_to(ROOT)}:{lineno} spells {value!r}"
        for path in (ROOT / "services").rglob("*.py")
        for lineno, value in _string_constants(path)
        if re.fullmatch(r"x-fc-[a-z-]+|taskmode-[a-z-]+", value)
    ]
    assert offenders == []


def test_statuses_are_spelled_only_in_the_transition_table() -> None:
    names = {str(status) for status in Status} | set(STATUS_ALIASES)
    offenders = [
        f"{path.relative_to(ROOT)}:{lineno} spells {value!r}"
        for root in ("services", "shared")
        for path in (ROOT / root).rglob("*.py")
        if path != ROOT / "shared" / "transitions.py"
        for lineno, value in _string_constants(path)
        if value in names
    ]
    assert offenders == []
