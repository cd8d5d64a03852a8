"""Reading an object-store object chunk by chunk, each chunk one bounded request.

nats-py's `ObjectStore.get` streams the chunks through an ordered push consumer and waits for
each one without a deadline. Under load a delivery that never came left a dispatch waiting
forever for its function's code: the task stayed Processed and the executor logged nothing.
Here every chunk is a stream get by subject (`next_by_subj`), a request with a timeout, so a
slow or absent bus surfaces as an error the caller can retry.
"""

from __future__ import annotations

import base64
import hashlib

from nats.js import JetStreamContext
from nats.js.api import ObjectInfo

DIGEST_PREFIX = "SHA-256="


class CorruptObject(Exception):
    """The chunks read do not add up to the object described by its meta (size or digest)."""


async def read_object(js: JetStreamContext, info: ObjectInfo) -> bytes:
    """The whole content of the object `info` describes."""
    if not info.size:
        return b""
    stream = f"OBJ_{info.bucket}"
    subject = f"$O.{info.bucket}.C.{info.nuid}"
    digest = hashlib.sha256()
    parts: list[bytes] = []
    next_seq = 1
    for _ in range(int(info.chunks or 0)):
        chunk = await js.get_msg(stream, seq=next_seq, subject=subject, next=True)
        data = chunk.data or b""
        parts.append(data)
        digest.update(data)
        next_seq = int(chunk.seq or 0) + 1
    content = b"".join(parts)
    expected = (info.digest or "")
    if expected.upper().startswith(DIGEST_PREFIX):
        expected = expected[len(DIGEST_PREFIX):]
    if len(content) != info.size or (expected and base64.urlsafe_b64decode(expected) != digest.digest()):
        raise CorruptObject(f"object {info.name} read as {len(content)} bytes, not the {info.size} stored")
    return content
