import asyncio, tempfile, time, sys
from pathlib import Path
import psutil
from shared.devstack import Stack, free_port
from tests.fc_client import FcClient
from bench.full_stack import submit_many, NOOP, count_succeeded
async def main():
    tmp = tempfile.mkdtemp()
    import os, json
    stack = Stack(data_dir=Path(tmp), access_keys="k:s", gateway_port=free_port(), service_env=json.loads(os.environ.get("BENV","{}")))
    stack.start_infra(); stack.start_services()
    fc = FcClient(f"http://127.0.0.1:{stack.gateway_port}", access_key_id="k", access_key_secret="s")
    await fc.create_function("p", code={"index.py": NOOP})
    base=f"http://127.0.0.1:{stack.gateway_port}"
    import bench.full_stack as b; b.KEY_ID, b.SECRET = "k", "s"
    await submit_many(base, "p", ["warm"], concurrency=1)
    procs = {c.name: psutil.Process(c.process.pid) for c in [*stack.infra, *stack.services.values()]}
    procs["bench-client"] = psutil.Process()
    def cpu():
        out = {}
        for k, p in procs.items():
            t = p.cpu_times(); out[k] = t.user + t.system
            if k == "executor":
                out["instances"] = sum((c.cpu_times().user + c.cpu_times().system) for c in p.children(recursive=True))
        return out
    before = cpu(); t = time.perf_counter()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    await submit_many(base, "p", [f"x{i}" for i in range(n)], concurrency=32)
    sub = time.perf_counter() - t
    while await count_succeeded(fc, "p") < n + 1:
        await asyncio.sleep(0.2)
    total = time.perf_counter() - t
    after = cpu()
    print(f"submit {n/sub:.0f}/s complete {n/total:.0f}/s")
    for k in after:
        print(f"{k:14s} {(after[k]-before.get(k,0))/n*1000:6.2f} ms CPU/task")
    await fc.close(); stack.stop()
asyncio.run(main())
