"""Print a fresh `.env` for docker compose: every secret the deployment needs, random.

    .venv/bin/python deploy/compose_env.py > .env && chmod 600 .env

The access key (for API clients), one NATS password per service role (nats-server reads them
from its environment, deploy/nats-server.conf), and MongoDB's administrator and the `taskmode`
user the gateway and the projection connect as (deploy/mongo-init.js creates it).
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared import natsauth  # noqa: E402


def main() -> None:
    lines = [f"TASKMODE_ACCESS_KEYS=key{secrets.token_hex(6)}:{secrets.token_urlsafe(24)}"]
    lines += [f"{natsauth.password_variable(role)}={secrets.token_urlsafe(24)}" for role in natsauth.ROLES]
    lines += [f"MONGO_ROOT_PASSWORD={secrets.token_urlsafe(24)}", f"TASKMODE_MONGO_PASSWORD={secrets.token_urlsafe(24)}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
