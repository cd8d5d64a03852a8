"""What an instance needs to know about a function, built from its catalog record.

Both the task runner and the synchronous invoker start instances from a `FunctionSpec`; this is
the one place that derives it.
"""

from __future__ import annotations

from services.executor.code_cache import CodeCache
from services.executor.instance import FunctionSpec
from shared.catalog import FunctionRecord


async def function_spec(function: FunctionRecord, code: CodeCache) -> FunctionSpec:
    """What an instance needs to know about `function`, with its code unpacked locally."""
    custom = function.custom_runtime_config
    return FunctionSpec(
        name=function.function_name,
        runtime=function.runtime,
        handler=function.handler,
        timeout_s=float(function.timeout),
        code_dir=await code.directory(function),
        code_checksum=function.code_checksum,
        memory_mb=function.memory_size,
        environment=dict(function.environment_variables),
        custom_command=[*custom.command, *custom.args] if custom else [],
        custom_port=custom.port if custom else 9000,
        disk_mb=function.disk_size,
        internet_access=function.internet_access,
    )
