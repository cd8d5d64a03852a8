import asyncio, tempfile, time, sys, subprocess
from pathlib import Path
from shared.devstack import Stack, free_port
from tests.fc_client import FcClient
import bench.full_stack as b
async def main():
    b.KEY_ID, b.SECRET = "k", "s"
    target = sys.argv[1]
    stack = Stack(data_dir=Path(tempfile.mkdtemp()), access_keys="k:s", gateway_port=free_port())
    stack.start_infra(); stack.start_services()
    fc = FcClient(f"http://127.0.0.1:{stack.gateway_port}", access_key_id="k", access_key_secret="s")
    await fc.create_function("p", code={"index.py": b.NOOP})
    base=f"http://127.0.0.1:{stack.gateway_port}"
    await b.submit_many(base, "p", ["warm"], concurrency=1)
    pid = stack.services[target].process.pid
    spy = subprocess.Popen(["/work/main/.venv/bin/py-spy", "record", "-d", "5", "-r", "200", "-o", f"/tmp/{target}.txt", "-f", "raw", "-p", str(pid)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    await b.submit_many(base, "p", [f"x{i}" for i in range(3000)], concurrency=32)
    spy.wait()
    await fc.close(); stack.stop()
asyncio.run(main())
