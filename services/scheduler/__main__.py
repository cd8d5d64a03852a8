from services.scheduler.app import run
from services.scheduler.settings import SchedulerSettings
from shared import service

if __name__ == "__main__":
    settings = SchedulerSettings.from_env()
    service.run("scheduler", lambda stop, stack: run(settings, stop, stack))
