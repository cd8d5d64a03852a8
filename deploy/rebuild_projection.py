"""`make rebuild-projection`: rebuild the read model of the stack that `make run` is running.

It uses that stack's own NATS and MongoDB (recorded in `.data/stack.json` by deploy/run.py), never
the default ports, and gives the rebuild the projection's own TASKMODE_EXPIRY_SWEEP_S, so the
embedded store gets no TTL index. For any other deployment run
`python -m services.projection rebuild` with NATS_URL and MONGODB_URL set (README, Operations).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.preflight import is_running, read_stack_file  # noqa: E402
from shared import natsauth  # noqa: E402


def main() -> int:
    data_dir = Path(os.environ.get("TASKMODE_DATA_DIR") or ".data").resolve()
    stack = read_stack_file(data_dir)
    if not is_running(data_dir) or not stack:
        print(f"make rebuild-projection: taskmode is not running on {data_dir} (start it with make run; for "
              "another deployment run python -m services.projection rebuild with NATS_URL and MONGODB_URL set)",
              flush=True)
        return 1
    env = {**os.environ, **stack.get("projection_env", {}),
           "NATS_URL": stack["nats_url"], "MONGODB_URL": stack["mongodb_url"]}
    # The stack's nats-server asks for credentials: the rebuild is the projection's role.
    password_file = natsauth.password_file(data_dir / "secrets", natsauth.PROJECTION)
    if password_file.exists() and "NATS_USER" not in os.environ:
        env.update({"NATS_USER": natsauth.PROJECTION, "NATS_PASSWORD_FILE": str(password_file)})
    print(f"rebuilding the read model of the stack at {stack['api']} "
          f"(NATS {stack['nats_url']}, MongoDB {stack['mongodb_url']})", flush=True)
    return subprocess.run([sys.executable, "-m", "services.projection", "rebuild"], env=env, cwd=ROOT,
                          check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
