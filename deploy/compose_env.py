"""Print a fresh `.env` for docker compose: every secret the deployment needs, random.

    .venv/bin/python deploy/compose_env.py > .env && chmod 600 .env

The access key (for API clients), one NATS password per service role (each NATS node reads them
from its environment into the users of deploy/nats/cluster.conf; each service gets its own role's),
MongoDB's replica-set key file and users' passwords, Grafana's admin password and the
webhook signing secret. Other settings of
deploy/compose.env.example may be appended.
"""

from __future__ import annotations

import base64
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared import natsauth  # noqa: E402


def main() -> None:
    lines = [f"TASKMODE_ACCESS_KEYS=key{secrets.token_hex(6)}:{secrets.token_urlsafe(24)}"]
    lines += [f"{natsauth.password_variable(role)}={natsauth.new_password()}" for role in natsauth.ROLES]
    # MongoDB: the replica set's shared key file (base64 characters only, as mongod requires), the
    # root user's password (mongo-init only) and the services' user's (hex: it goes into a URL).
    lines += [f"MONGO_KEYFILE={base64.b64encode(secrets.token_bytes(384)).decode()}",
              f"MONGO_ROOT_PASSWORD={secrets.token_hex(24)}", f"MONGO_TASKMODE_PASSWORD={secrets.token_hex(24)}"]
    lines += [f"GRAFANA_ADMIN_PASSWORD={secrets.token_urlsafe(18)}", f"TASKMODE_DELIVERY_SECRET={secrets.token_urlsafe(32)}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
