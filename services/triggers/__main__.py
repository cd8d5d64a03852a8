from services.triggers.app import run
from services.triggers.settings import TriggersSettings
from shared import service

if __name__ == "__main__":
    settings = TriggersSettings.from_env()
    service.run("triggers", lambda stop, stack: run(settings, stop, stack))
