"""Bounded growth: code that no function uses is removed, from the object store and from disk."""

from __future__ import annotations

from urllib.parse import urlsplit

import nats
import pytest
from nats.js.errors import NotFoundError

from shared import natsauth, wire
from tests.fc_client import FcClient
from tests.integration_fixtures import StackFactory
from tests.test_lifecycle import make_function
from tests.test_recovery import wait_until

pytestmark = pytest.mark.timeout(180)


async def test_replaced_deleted_and_refused_code_is_collected(stack_with: StackFactory) -> None:
    stack, fc = stack_with({"TASKMODE_CODE_GC_EVERY_S": "1", "TASKMODE_CODE_GC_GRACE_S": "1",
                            "TASKMODE_EXECUTOR_CODE_GC_GRACE_S": "1"})
    credentials = stack.nats_credentials(natsauth.ADMIN)
    assert credentials is not None
    nc = await nats.connect(stack.nats_url, user=credentials[0], password=credentials[1])
    store = await nc.jetstream().object_store(wire.CODE_BUCKET)
    unpacked = stack.data_dir / "services" / "executor" / "code"

    async def stored() -> set[str]:
        try:
            return {str(info.name) for info in await store.list(ignore_deletes=True)}
        except NotFoundError:
            return set()

    try:
        created = await fc.create_function("kept", code={"index.py": "def handler(e, c):\n    return 'kept'\n"})
        assert created.status_code == 200, created.text
        await make_function(fc, "replaced")
        await fc.invoke_async("replaced", b"v1", task_id="on_v1")
        await fc.wait_for("replaced", "on_v1", {"Succeeded"})
        v1 = await code_key(fc, "replaced")
        assert (unpacked / v1).is_dir()
        source = "def handler(event, context):\n    return b'v2:' + event\n"
        updated = await fc.request("PUT", "/functions/replaced", json={"code": {"zipFile": _zip(source)}})
        assert updated.status_code == 200, updated.text
        v2 = await code_key(fc, "replaced")
        refused = await fc.create_function("kept", code={"index.py": "# other code\n"})
        assert refused.status_code == 409
        kept = await code_key(fc, "kept")
        await fc.invoke_async("replaced", b"x", task_id="on_v2")
        await fc.wait_for("replaced", "on_v2", {"Succeeded"})
        assert (await fc.request("DELETE", "/functions/replaced")).status_code == 204

        async def only_kept_code_left() -> bool:
            return await stored() == {kept} and not (unpacked / v1).exists() and not (unpacked / v2).exists()

        await wait_until(only_kept_code_left, deadline_s=90, what="unused code removed")
    finally:
        await nc.close()


async def code_key(fc: FcClient, function: str) -> str:
    """Where a function's zip is kept (object store key, unpacked directory name): the last part
    of GetFunctionCode's download path (codeChecksum is FC's CRC-64, not the key)."""
    url = (await fc.request("GET", f"/functions/{function}/code")).json()["url"]
    return str(urlsplit(url).path.rsplit("/", 1)[1])


def _zip(source: str) -> str:
    from tests.fc_client import zip_code

    return zip_code({"index.py": source})
