"""What the sandbox costs an instance: cold start (start + first invocation) and a warm call,
sandboxed and not, for a no-op Python handler and a Python custom runtime.

`.venv/bin/python -m bench.sandbox_start [--n 10]`. Figures, not assertions. Every sample is a new
code version, so a Python start here includes its template's (see `bench.flow_control --cold` for
starts forked from a warm template).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from services.executor.instance import FunctionSpec, InvokeContext
from services.executor.pool import InstancePool, new_sandbox
from services.executor.sandbox import SandboxSettings

SERVER = '''
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
'''


async def measure(*, sandboxed: bool, custom: bool, internet: bool, n: int, root: Path) -> tuple[float, float]:
    code = root / "code"
    code.mkdir(mode=0o755, exist_ok=True)
    (code / "index.py").write_text("def handler(event, context):\n    return event\n")
    (code / "server.py").write_text(SERVER)
    work = root / f"work-{sandboxed}-{custom}-{internet}"
    pool = InstancePool(work_dir=work, sandbox=new_sandbox(SandboxSettings(enabled=sandboxed), work_dir=work))
    cold: list[float] = []
    warm: list[float] = []
    try:
        for i in range(n):
            spec = FunctionSpec(name="bench", runtime="custom.debian12" if custom else "python3.10",
                                handler="index.handler", timeout_s=30, code_dir=code, code_checksum=f"v{i}",
                                custom_command=[sys.executable, "server.py"] if custom else (),
                                internet_access=internet)
            began = time.perf_counter()
            async with pool.lease(spec) as instance:
                assert (await instance.invoke(b"x", InvokeContext(request_id="r", task_id="t"))).ok
                cold.append(time.perf_counter() - began)
                began = time.perf_counter()
                await instance.invoke(b"x", InvokeContext(request_id="r", task_id="t"))
                warm.append(time.perf_counter() - began)
    finally:
        await pool.close()
    return statistics.median(cold) * 1000, statistics.median(warm) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"median of {args.n}, ms          cold start   warm call")
        for custom in (False, True):
            for sandboxed, internet in ((False, False), (True, False), (True, True)):
                cold, warm = await measure(sandboxed=sandboxed, custom=custom, internet=internet, n=args.n,
                                           root=Path(tmp))
                label = f"{'custom' if custom else 'python'} {'sandbox' if sandboxed else 'plain  '}" + \
                        (" +net" if internet else "     ")
                print(f"  {label:24} {cold:10.1f} {warm:11.2f}")


if __name__ == "__main__":
    asyncio.run(main())
