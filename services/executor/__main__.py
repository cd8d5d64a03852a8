from services.executor.app import run
from services.executor.settings import ExecutorSettings
from shared import service

if __name__ == "__main__":
    settings = ExecutorSettings.from_env()
    service.run("executor", lambda stop, stack: run(settings, stop, stack))
