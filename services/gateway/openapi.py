"""The OpenAPI document the gateway serves at /openapi.json, with the request bodies it reads.

Routes read their bodies raw (the signature covers the exact bytes) and decode them with msgspec,
so FastAPI cannot see them; `request_body` declares one on a route (`openapi_extra`) and
`install` adds the msgspec structs' JSON Schemas to the document's components. Clients and the
API fuzzing test (tests/test_api_fuzz.py) read this document.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.gateway.schemas import CreateFunctionInput, PutAsyncInvokeConfigInput, UpdateFunctionInput
from shared import wire

_REF: Final = "#/components/schemas/{name}"
_BODIES: Final = (CreateFunctionInput, UpdateFunctionInput, PutAsyncInvokeConfigInput)


def request_body(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `struct` (one of the structs in `_BODIES`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(name=struct.__name__)}}}}}


def invocation() -> dict[str, Any]:
    """`openapi_extra` of InvokeFunction: raw bytes in, and FC's invocation headers."""
    def header(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "header", "required": False, "schema": schema}

    return {
        "requestBody": {"required": False, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "parameters": [
            header(wire.FC_INVOCATION_TYPE_HEADER, {"type": "string", "enum": ["Sync", "Async"]}),
            header(wire.FC_TASK_ID_HEADER, {"type": "string", "maxLength": 140}),
            header(wire.FC_DELAY_HEADER, {"type": "string", "maxLength": 8}),
        ],
    }


def install(app: FastAPI) -> None:
    """Serve an OpenAPI document that also describes the msgspec request bodies."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title="taskmode (Function Compute 3.0 API)", version=wire.API_VERSION, routes=app.routes)
            _, components = msgspec.json.schema_components(_BODIES, ref_template=_REF)
            spec.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
