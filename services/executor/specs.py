"""What an instance needs to know about a function, built from its catalog record.

Both the task runner and the synchronous invoker start instances from a `FunctionSpec`; this is
the one place that derives it.
"""

from __future__ import annotations

from services.executor.code_cache import CodeCache
from services.executor.instance import FunctionSpec
from shared.catalog import FunctionRecord


async def function_spec(function: FunctionRecord, code: CodeCache, *, version: str = "LATEST") -> FunctionSpec:
    """What an instance needs to know about `function` (as of `version`), with its code unpacked locally."""
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
        version=version,
        custom_port=custom.port if custom else 9000,
        disk_mb=function.disk_size,
        # FC's default is on: only an explicit false cuts the network.
        internet_access=function.settings.internet_access is not False,
        instance_concurrency=function.instance_concurrency,
    )

