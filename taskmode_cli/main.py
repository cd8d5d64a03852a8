"""`taskmode`: the command line for a taskmode (FC 3.0 task mode) endpoint.

Exit codes: 0 success; 1 the thing asked about did not succeed (a task ended other than
Succeeded, a synchronous call's handler raised); 2 bad usage; 3 the API answered with an FC
error (its code and message are printed); 4 the endpoint could not be reached.
"""

from __future__ import annotations

import sys
from typing import Annotated, Final

import httpx
import typer
from rich.text import Text

from taskmode_cli import functions_cmd, resources_cmd, tasks_cmd
from taskmode_cli.api import ApiError
from taskmode_cli.codezip import CodeError
from taskmode_cli.output import OutputFormat, stderr
from taskmode_cli.profile import (
    DEFAULT_ENDPOINT,
    ProfileError,
    config_path,
    read_config,
    write_config,
)
from taskmode_cli.state import CliState, UsageProblem

EXIT_API_ERROR: Final = 3
EXIT_UNREACHABLE: Final = 4

app = typer.Typer(
    name="taskmode",
    help="Manage functions and follow async tasks on a taskmode endpoint (FC 3.0 API).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(functions_cmd.functions_app, name="functions")
app.add_typer(functions_cmd.config_app, name="config")
app.add_typer(tasks_cmd.tasks_app, name="tasks")
app.add_typer(resources_cmd.triggers_app, name="triggers")
app.add_typer(resources_cmd.versions_app, name="versions")
app.add_typer(resources_cmd.aliases_app, name="aliases")
app.command("invoke")(tasks_cmd.invoke)


@app.callback()
def main_options(
    ctx: typer.Context,
    endpoint: Annotated[str | None, typer.Option(help=f"API endpoint (env TASKMODE_ENDPOINT; default {DEFAULT_ENDPOINT})")] = None,
    access_key_id: Annotated[str | None, typer.Option(help="access key id (env TASKMODE_ACCESS_KEY_ID)")] = None,
    access_key_secret: Annotated[str | None, typer.Option(help="access key secret (env TASKMODE_ACCESS_KEY_SECRET)")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts")] = OutputFormat.table,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 60.0,
) -> None:
    ctx.obj = CliState(
        endpoint=endpoint, access_key_id=access_key_id, access_key_secret=access_key_secret,
        output=output, timeout_s=timeout,
    )


@app.command()
def configure(
    ctx: typer.Context,
    endpoint: Annotated[str | None, typer.Option("--set-endpoint", help="endpoint to store")] = None,
    access_key_id: Annotated[str | None, typer.Option("--set-access-key-id", help="access key id to store")] = None,
    access_key_secret: Annotated[str | None, typer.Option("--set-access-key-secret", help="secret to store (prompted, hidden, when not given)")] = None,
) -> None:
    """Store the endpoint and access key in the config file (owner-only permissions)."""
    state: CliState = ctx.obj
    path = config_path()
    stored = read_config(path)
    chosen = {
        "endpoint": endpoint or state.endpoint or typer.prompt("Endpoint", default=stored.get("endpoint", DEFAULT_ENDPOINT)),
        "access_key_id": access_key_id or state.access_key_id or typer.prompt("Access key id", default=stored.get("access_key_id", "")),
    }
    secret = access_key_secret or state.access_key_secret
    if not secret:
        secret = typer.prompt("Access key secret (empty: keep the stored one)", default="", hide_input=True,
                              show_default=False) or stored.get("access_key_secret", "")
    chosen["access_key_secret"] = secret
    write_config(path, chosen)
    stderr.print(f"saved to {path}")


OUTPUT_OPTIONS: Final = ("--output", "-o")


def hoist_output_option(argv: list[str]) -> list[str]:
    """Move `--output X` / `-o X` / `--output=X` to the front, so it works after a subcommand too
    (`taskmode tasks list fn -o json`), where Click would only accept it before."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in OUTPUT_OPTIONS and index + 1 < len(argv):
            front += [arg, argv[index + 1]]
            index += 2
            continue
        if arg.startswith("--output="):
            front.append(arg)
        else:
            rest.append(arg)
        index += 1
    return front + rest


def main() -> None:
    """Console-script entry: run the app, turning known failures into a message and an exit code."""
    try:
        app(args=hoist_output_option(sys.argv[1:]), prog_name="taskmode")
    except ApiError as err:
        where = f" (request id {err.request_id})" if err.request_id else ""
        stderr.print(Text.assemble(("Error ", "bold red"), f"{err.code}: {err.message}{where}"))
        sys.exit(EXIT_API_ERROR)
    except (ProfileError, CodeError, UsageProblem) as err:
        stderr.print(Text.assemble(("Error ", "bold red"), str(err)))
        sys.exit(2)
    except (httpx.TransportError, ConnectionError) as err:
        stderr.print(Text.assemble(("Error ", "bold red"), f"cannot reach the endpoint: {err or type(err).__name__}"))
        sys.exit(EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
