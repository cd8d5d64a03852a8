"""`taskmode triggers …`, `taskmode versions …` and `taskmode aliases …`: a function's triggers,
published versions and the aliases that name them (with an optional canary weight)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from taskmode_cli.output import print_json, print_record, print_table, stderr
from taskmode_cli.state import CliState, UsageProblem

triggers_app = typer.Typer(help="A function's triggers (nats, http, timer).", no_args_is_help=True)
versions_app = typer.Typer(help="Publish, list and delete a function's versions.", no_args_is_help=True)
aliases_app = typer.Typer(help="Aliases: names for versions, with an optional canary weight.", no_args_is_help=True)

TRIGGER_TYPES = ("nats", "http", "timer")

DescriptionOpt = Annotated[str | None, typer.Option(help="free text")]
QualifierOpt = Annotated[str | None, typer.Option("--qualifier", "-q", help="the version id or alias it fires on (default: LATEST)")]
ConfigOpt = Annotated[str | None, typer.Option("--config", "--trigger-config", help='triggerConfig as JSON text, e.g. \'{"subject": "orders", "enable": true}\'')]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask")]
WeightOpt = Annotated[list[str] | None, typer.Option(
    "--weight", help="additionalVersionWeight: VERSION=0.3 or JSON {\"2\": 0.3}; '{}' clears it")]


def _show(state: CliState, record: dict[str, Any], title: str) -> None:
    print_json(record) if state.json else print_record(record, title=title)


def _deleted(state: CliState, what: str, name: str) -> None:
    if state.json:
        print_json({"deleted": name})
    else:
        stderr.print(f"deleted {what} {name}")


def _trigger_config(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageProblem(f"--config takes a JSON object: {err}") from err
    if not isinstance(config, dict):
        raise UsageProblem("--config takes a JSON object")
    return config


def parse_weights(items: list[str] | None) -> dict[str, float] | None:
    """`--weight 2=0.3` (repeatable) or `--weight '{"2": 0.3}'` as additionalVersionWeight."""
    if not items:
        return None
    weights: dict[str, float] = {}
    for item in items:
        text = item.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise UsageProblem(f"--weight: not JSON: {err}") from err
            if not isinstance(parsed, dict):
                raise UsageProblem("--weight takes VERSION=WEIGHT or a JSON object")
            pairs = [(str(k), v) for k, v in parsed.items()]
        else:
            version, sep, value = text.partition("=")
            if not sep or not version.strip():
                raise UsageProblem(f"--weight takes VERSION=WEIGHT or a JSON object, got {item!r}")
            pairs = [(version.strip(), value.strip())]
        for version, value in pairs:
            try:
                weights[version] = float(value)
            except (TypeError, ValueError) as err:
                raise UsageProblem(f"--weight: {value!r} of version {version} is not a number") from err
    return weights


# --- triggers --------------------------------------------------------------------------------


def _trigger_row(trigger: dict[str, Any]) -> list[Any]:
    config = trigger.get("triggerConfig")
    return [trigger.get("triggerName", ""), trigger.get("triggerType", ""), trigger.get("qualifier") or "",
            trigger.get("status") or "", config if isinstance(config, str) else json.dumps(config, ensure_ascii=False),
            trigger.get("lastModifiedTime", "")]


@triggers_app.command("create")
def create_trigger(
    ctx: typer.Context, name: str, trigger: str,
    trigger_type: Annotated[str, typer.Option("--type", "--trigger-type", help="nats, http or timer")],
    config: ConfigOpt = None, qualifier: QualifierOpt = None, description: DescriptionOpt = None,
) -> None:
    """Create a trigger of a function."""
    state: CliState = ctx.obj
    if trigger_type not in TRIGGER_TYPES:
        raise UsageProblem(f"--type takes one of {', '.join(TRIGGER_TYPES)}, got {trigger_type!r}")
    spec: dict[str, Any] = {"triggerName": trigger, "triggerType": trigger_type}
    parsed = _trigger_config(config)
    if parsed is not None:
        spec["triggerConfig"] = json.dumps(parsed)  # FC's triggerConfig is a JSON string
    if qualifier:
        spec["qualifier"] = qualifier
    if description is not None:
        spec["description"] = description
    _show(state, state.api().create_trigger(name, spec), f"trigger {trigger} of {name}")


@triggers_app.command("get")
def get_trigger(ctx: typer.Context, name: str, trigger: str) -> None:
    """Show a trigger."""
    state: CliState = ctx.obj
    _show(state, state.api().get_trigger(name, trigger), f"trigger {trigger} of {name}")


@triggers_app.command("list")
def list_triggers(ctx: typer.Context, name: str) -> None:
    """List a function's triggers."""
    state: CliState = ctx.obj
    triggers = state.api().list_triggers(name)
    if state.json:
        print_json({"triggers": triggers})
        return
    print_table(("name", "type", "qualifier", "status", "config", "last modified"), [_trigger_row(t) for t in triggers])


@triggers_app.command("update")
def update_trigger(ctx: typer.Context, name: str, trigger: str, config: ConfigOpt = None,
                   qualifier: QualifierOpt = None, description: DescriptionOpt = None) -> None:
    """Change a trigger's config, qualifier or description; what is not given stays."""
    state: CliState = ctx.obj
    changes: dict[str, Any] = {}
    parsed = _trigger_config(config)
    if parsed is not None:
        changes["triggerConfig"] = json.dumps(parsed)
    if qualifier is not None:
        changes["qualifier"] = qualifier
    if description is not None:
        changes["description"] = description
    if not changes:
        raise UsageProblem("nothing to update: give --config, --qualifier or --description")
    _show(state, state.api().update_trigger(name, trigger, changes), f"trigger {trigger} of {name}")


@triggers_app.command("delete")
def delete_trigger(ctx: typer.Context, name: str, trigger: str, yes: YesOpt = False) -> None:
    """Delete a trigger."""
    state: CliState = ctx.obj
    if not yes and not typer.confirm(f"Delete trigger {trigger} of {name}?"):
        raise typer.Exit(1)
    state.api().delete_trigger(name, trigger)
    _deleted(state, "trigger", trigger)


# --- versions --------------------------------------------------------------------------------


@versions_app.command("publish")
def publish_version(ctx: typer.Context, name: str, description: DescriptionOpt = None) -> None:
    """Publish the function's current code and settings as a new, immutable version."""
    state: CliState = ctx.obj
    record = state.api().publish_version(name, description=description)
    _show(state, record, f"version {record.get('versionId', '')} of {name}")


@versions_app.command("list")
def list_versions(ctx: typer.Context, name: str) -> None:
    """List a function's versions, newest first."""
    state: CliState = ctx.obj
    versions = state.api().list_versions(name)
    if state.json:
        print_json({"versions": versions})
        return
    rows = [[v.get("versionId", ""), v.get("description", ""), v.get("createdTime", "")] for v in versions]
    print_table(("version", "description", "created"), rows)


@versions_app.command("delete")
def delete_version(ctx: typer.Context, name: str, version_id: str, yes: YesOpt = False) -> None:
    """Delete a version (refused while an alias names it)."""
    state: CliState = ctx.obj
    if not yes and not typer.confirm(f"Delete version {version_id} of {name}?"):
        raise typer.Exit(1)
    state.api().delete_version(name, version_id)
    _deleted(state, "version", version_id)


# --- aliases ---------------------------------------------------------------------------------


@aliases_app.command("create")
def create_alias(
    ctx: typer.Context, name: str, alias: str,
    version: Annotated[str, typer.Option("--version", help="the version id it names")],
    weight: WeightOpt = None, description: DescriptionOpt = None,
) -> None:
    """Create an alias naming a version (and, with --weight, a canary share for another)."""
    state: CliState = ctx.obj
    spec: dict[str, Any] = {"aliasName": alias, "versionId": version}
    weights = parse_weights(weight)
    if weights is not None:
        spec["additionalVersionWeight"] = weights
    if description is not None:
        spec["description"] = description
    _show(state, state.api().create_alias(name, spec), f"alias {alias} of {name}")


@aliases_app.command("get")
def get_alias(ctx: typer.Context, name: str, alias: str) -> None:
    """Show an alias."""
    state: CliState = ctx.obj
    _show(state, state.api().get_alias(name, alias), f"alias {alias} of {name}")


@aliases_app.command("list")
def list_aliases(ctx: typer.Context, name: str) -> None:
    """List a function's aliases."""
    state: CliState = ctx.obj
    aliases = state.api().list_aliases(name)
    if state.json:
        print_json({"aliases": aliases})
        return
    rows = [[a.get("aliasName", ""), a.get("versionId", ""),
             json.dumps(a.get("additionalVersionWeight") or {}), a.get("description", ""),
             a.get("lastModifiedTime", "")] for a in aliases]
    print_table(("alias", "version", "additional weight", "description", "last modified"), rows)


@aliases_app.command("update")
def update_alias(
    ctx: typer.Context, name: str, alias: str,
    version: Annotated[str | None, typer.Option("--version", help="the version id it names")] = None,
    weight: WeightOpt = None, description: DescriptionOpt = None,
) -> None:
    """Change an alias; what is not given stays (`--weight '{}'` ends a canary)."""
    state: CliState = ctx.obj
    changes: dict[str, Any] = {}
    if version is not None:
        changes["versionId"] = version
    weights = parse_weights(weight)
    if weights is not None:
        changes["additionalVersionWeight"] = weights
    if description is not None:
        changes["description"] = description
    if not changes:
        raise UsageProblem("nothing to update: give --version, --weight or --description")
    _show(state, state.api().update_alias(name, alias, changes), f"alias {alias} of {name}")


@aliases_app.command("delete")
def delete_alias(ctx: typer.Context, name: str, alias: str, yes: YesOpt = False) -> None:
    """Delete an alias."""
    state: CliState = ctx.obj
    if not yes and not typer.confirm(f"Delete alias {alias} of {name}?"):
        raise typer.Exit(1)
    state.api().delete_alias(name, alias)
    _deleted(state, "alias", alias)
