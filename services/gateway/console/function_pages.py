"""Functions: the list, a function's overview, create/update from an uploaded zip, async config,
delete. Every change is an FC API call made as the signed-in key (`api_client`)."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import RedirectResponse

from services.gateway.console.api_client import ApiFailure, console_api
from services.gateway.console.common import CONSOLE_PREFIX, ConsoleRoute, render
from services.gateway.console.session import Session, current_session

router = APIRouter(prefix=CONSOLE_PREFIX, route_class=ConsoleRoute)

SessionDep = Annotated[Session, Depends(current_session)]
MAX_ZIP_BYTES: Final = 50 * 1024 * 1024
RUNTIMES: Final = ("python3.10", "python3.11", "python3.12", "python3", "custom.debian12", "custom")


def _function_url(name: str) -> str:
    return f"{CONSOLE_PREFIX}/functions/{name}"


async def _zip_field(upload: UploadFile | None) -> dict[str, str] | None:
    if upload is None or not upload.filename:
        return None
    data = await upload.read(MAX_ZIP_BYTES + 1)
    if len(data) > MAX_ZIP_BYTES:
        raise ApiFailure(status=400, code="EntityTooLarge", message="the code zip is larger than 50 MB")
    return {"zipFile": base64.b64encode(data).decode()}


def _function_spec(*, runtime: str, handler: str, timeout: str, memory: str, description: str,
                   command: str) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if runtime.strip():
        spec["runtime"] = runtime.strip()
    if handler.strip():
        spec["handler"] = handler.strip()
    for key, text in (("timeout", timeout), ("memorySize", memory)):
        if text.strip():
            if not text.strip().isdigit():
                raise ApiFailure(status=400, code="InvalidArgument", message=f"{key} must be a whole number")
            spec[key] = int(text)
    if description.strip():
        spec["description"] = description.strip()
    if command.strip():
        spec["customRuntimeConfig"] = {"command": command.split()}
    return spec


@router.get("/functions")
async def functions_page(request: Request, session: SessionDep) -> Response:
    async with console_api(request, session) as api:
        functions = await _all_functions(api)
    return render(request, "functions.html", session=session, functions=functions, runtimes=RUNTIMES, error=None)


async def _all_functions(api: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    token = ""
    while True:
        page = await api.json("GET", "/functions", query={"limit": "100", "nextToken": token})
        found.extend(page.get("functions", []))
        token = page.get("nextToken") or ""
        if not token:
            return found


@router.post("/functions")
async def create_function(
    request: Request,
    session: SessionDep,
    name: Annotated[str, Form(max_length=128)],
    runtime: Annotated[str, Form(max_length=64)] = "python3.10",
    handler: Annotated[str, Form(max_length=128)] = "index.handler",
    timeout: Annotated[str, Form(max_length=10)] = "",
    memory: Annotated[str, Form(max_length=10)] = "",
    description: Annotated[str, Form(max_length=256)] = "",
    command: Annotated[str, Form(max_length=1024)] = "",
    code: Annotated[UploadFile | None, File()] = None,
) -> Response:
    async with console_api(request, session) as api:
        try:
            spec = _function_spec(runtime=runtime, handler=handler, timeout=timeout, memory=memory,
                                  description=description, command=command)
            zipped = await _zip_field(code)
            if zipped is None:
                raise ApiFailure(status=400, code="InvalidArgument", message="choose a .zip file with the code")
            await api.call("POST", "/functions", json_body={"functionName": name.strip(), **spec, "code": zipped})
        except ApiFailure as failure:
            functions = await _all_functions(api)
            return render(request, "functions.html", status_code=failure.status, session=session,
                          functions=functions, runtimes=RUNTIMES, error=failure)
    return RedirectResponse(_function_url(name.strip()), status_code=303)


async def _overview(request: Request, session: Session, name: str, *, error: ApiFailure | None = None,
                    notice: str | None = None, status_code: int = 200) -> Response:
    async with console_api(request, session) as api:
        try:
            function = await api.json("GET", f"/functions/{name}")
        except ApiFailure as failure:
            return render(request, "error.html", status_code=failure.status, session=session, error=failure)
        try:
            async_config: dict[str, Any] | None = await api.json("GET", f"/functions/{name}/async-invoke-config")
        except ApiFailure:
            async_config = None  # never put: the defaults apply
    return render(request, "function.html", status_code=status_code, session=session, function=function,
                  async_config=async_config, runtimes=RUNTIMES, error=error, notice=notice, tab="overview")


@router.get("/functions/{name}")
async def function_page(request: Request, session: SessionDep, name: str) -> Response:
    return await _overview(request, session, name)


@router.post("/functions/{name}/update")
async def update_function(
    request: Request,
    session: SessionDep,
    name: str,
    runtime: Annotated[str, Form(max_length=64)] = "",
    handler: Annotated[str, Form(max_length=128)] = "",
    timeout: Annotated[str, Form(max_length=10)] = "",
    memory: Annotated[str, Form(max_length=10)] = "",
    description: Annotated[str, Form(max_length=256)] = "",
    command: Annotated[str, Form(max_length=1024)] = "",
    code: Annotated[UploadFile | None, File()] = None,
) -> Response:
    try:
        spec = _function_spec(runtime=runtime, handler=handler, timeout=timeout, memory=memory,
                              description=description, command=command)
        zipped = await _zip_field(code)
        if zipped is not None:
            spec["code"] = zipped
        async with console_api(request, session) as api:
            await api.call("PUT", f"/functions/{name}", json_body=spec)
    except ApiFailure as failure:
        return await _overview(request, session, name, error=failure, status_code=failure.status)
    return await _overview(request, session, name, notice="Function updated.")


@router.post("/functions/{name}/async-config")
async def put_async_config(
    request: Request,
    session: SessionDep,
    name: str,
    async_task: Annotated[str, Form()] = "",
    max_event_age: Annotated[str, Form(max_length=10)] = "",
    max_retries: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    body: dict[str, Any] = {"asyncTask": async_task == "on"}
    try:
        for key, text in (("maxAsyncEventAgeInSeconds", max_event_age), ("maxAsyncRetryAttempts", max_retries)):
            if text.strip():
                if not text.strip().isdigit():
                    raise ApiFailure(status=400, code="InvalidArgument", message=f"{key} must be a whole number")
                body[key] = int(text)
        async with console_api(request, session) as api:
            await api.call("PUT", f"/functions/{name}/async-invoke-config", json_body=body)
    except ApiFailure as failure:
        return await _overview(request, session, name, error=failure, status_code=failure.status)
    return await _overview(request, session, name, notice="Async invocation config saved.")


@router.post("/functions/{name}/delete")
async def delete_function(request: Request, session: SessionDep, name: str) -> Response:
    try:
        async with console_api(request, session) as api:
            await api.call("DELETE", f"/functions/{name}")
    except ApiFailure as failure:
        return await _overview(request, session, name, error=failure, status_code=failure.status)
    return RedirectResponse(f"{CONSOLE_PREFIX}/functions", status_code=303)
