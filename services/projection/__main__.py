"""`python -m services.projection` runs the projection; `... rebuild` drops the read model first."""

import asyncio
import sys

from services.projection.app import rebuild, run
from services.projection.settings import ProjectionSettings
from shared import service
from shared.logs import configure

if __name__ == "__main__":
    settings = ProjectionSettings.from_env()
    if sys.argv[1:] == ["rebuild"]:
        configure("projection")
        asyncio.run(rebuild(settings))
    else:
        service.run("projection", lambda stop, stack: run(settings, stop, stack))
