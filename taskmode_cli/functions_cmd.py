"""`taskmode functions …` and `taskmode config …` (the async-invoke config of a function).

Triggers, versions and aliases are in `resources_cmd.py`; further per-function resources
(concurrency, pause/resume) follow the same shape: a Typer sub-app, a few calls in `api.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from taskmode_cli.codezip import code_field
from taskmode_cli.output import print_json, print_record, print_table, stderr
from taskmode_cli.state import CliState, UsageProblem

functions_app = typer.Typer(help="Create, change, inspect and delete functions.", no_args_is_help=True)
config_app = typer.Typer(help="A function's async-invoke config (task mode, retries, event age).", no_args_is_help=True)

CodeOpt = Annotated[Path | None, typer.Option("--code", help="a folder (zipped for you) or a .zip file")]
RuntimeOpt = Annotated[str | None, typer.Option(help="python3.10, python3, custom, custom.debian12, …")]
HandlerOpt = Annotated[str | None, typer.Option(help="e.g. index.handler")]
TimeoutOpt = Annotated[int | None, typer.Option("--timeout", help="seconds an invocation may run (1-86400)")]
MemoryOpt = Annotated[int | None, typer.Option("--memory", help="memory size in MB (stored, not enforced)")]
DescriptionOpt = Annotated[str | None, typer.Option(help="free text")]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE, repeatable")]
CommandOpt = Annotated[str | None, typer.Option("--command", help="custom runtime: the command line to start")]


def _environment(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageProblem(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _spec(*, code: Path | None, runtime: str | None, handler: str | None, timeout: int | None,
          memory: int | None, description: str | None, env: list[str] | None, command: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "runtime": runtime, "handler": handler, "timeout": timeout, "memorySize": memory,
        "description": description, "environmentVariables": _environment(env),
        "customRuntimeConfig": {"command": command.split()} if command else None,
    }
    if code is not None:
        spec["code"] = code_field(code)
    return {k: v for k, v in spec.items() if v is not None}


def _show_function(state: CliState, record: dict[str, Any]) -> None:
    if state.json:
        print_json(record)
    else:
        print_record(record, title=f"function {record.get('functionName', '')}")


@functions_app.command("list")
def list_functions(ctx: typer.Context, prefix: Annotated[str | None, typer.Option(help="only names starting so")] = None) -> None:
    """List functions."""
    state: CliState = ctx.obj
    functions = state.api().list_functions(prefix=prefix)
    if state.json:
        print_json({"functions": functions})
        return
    rows = [[f["functionName"], f.get("runtime", ""), f.get("handler", ""), f.get("timeout", ""),
             f.get("memorySize", ""), f.get("lastModifiedTime", "")] for f in functions]
    print_table(("name", "runtime", "handler", "timeout s", "memory MB", "last modified"), rows)


@functions_app.command("get")
def get_function(ctx: typer.Context, name: str) -> None:
    """Show a function."""
    state: CliState = ctx.obj
    _show_function(state, state.api().get_function(name))


@functions_app.command("create")
def create_function(
    ctx: typer.Context, name: str, code: CodeOpt = None, runtime: RuntimeOpt = "python3.10",
    handler: HandlerOpt = "index.handler", timeout: TimeoutOpt = None, memory: MemoryOpt = None,
    description: DescriptionOpt = None, env: EnvOpt = None, command: CommandOpt = None,
) -> None:
    """Create a function from a folder or a zip."""
    state: CliState = ctx.obj
    if code is None:
        raise UsageProblem("--code is required: a folder or a .zip file")
    spec = _spec(code=code, runtime=runtime, handler=handler, timeout=timeout, memory=memory,
                 description=description, env=env, command=command)
    _show_function(state, state.api().create_function({"functionName": name, **spec}))


@functions_app.command("update")
def update_function(
    ctx: typer.Context, name: str, code: CodeOpt = None, runtime: RuntimeOpt = None, handler: HandlerOpt = None,
    timeout: TimeoutOpt = None, memory: MemoryOpt = None, description: DescriptionOpt = None,
    env: EnvOpt = None, command: CommandOpt = None,
) -> None:
    """Change a function: new code and/or settings; what is not given stays."""
    state: CliState = ctx.obj
    spec = _spec(code=code, runtime=runtime, handler=handler, timeout=timeout, memory=memory,
                 description=description, env=env, command=command)
    if not spec:
        raise UsageProblem("nothing to update: give --code or a setting")
    _show_function(state, state.api().update_function(name, spec))


@functions_app.command("delete")
def delete_function(ctx: typer.Context, name: str,
                    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False) -> None:
    """Delete a function (its pending tasks become Invalid)."""
    state: CliState = ctx.obj
    if not yes and not typer.confirm(f"Delete function {name}? Its pending tasks become Invalid."):
        raise typer.Exit(1)
    state.api().delete_function(name)
    if state.json:
        print_json({"deleted": name})
    else:
        stderr.print(f"deleted {name}")


@config_app.command("put")
def put_config(
    ctx: typer.Context, name: str,
    async_task: Annotated[bool, typer.Option("--async-task/--no-async-task", help="task mode")] = True,
    max_event_age: Annotated[int | None, typer.Option("--max-event-age", help="seconds a task may wait to start (1-604800)")] = None,
    max_retries: Annotated[int | None, typer.Option("--max-retries", help="retries after a failed attempt (0-8)")] = None,
) -> None:
    """Put (replace) the async-invoke config; omitted values take their defaults."""
    state: CliState = ctx.obj
    body: dict[str, Any] = {"asyncTask": async_task}
    if max_event_age is not None:
        body["maxAsyncEventAgeInSeconds"] = max_event_age
    if max_retries is not None:
        body["maxAsyncRetryAttempts"] = max_retries
    record = state.api().put_async_config(name, body)
    print_json(record) if state.json else print_record(record, title=f"async config of {name}")


@config_app.command("get")
def get_config(ctx: typer.Context, name: str) -> None:
    """Show the async-invoke config."""
    state: CliState = ctx.obj
    record = state.api().get_async_config(name)
    print_json(record) if state.json else print_record(record, title=f"async config of {name}")
