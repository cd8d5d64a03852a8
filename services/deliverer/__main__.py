from services.deliverer.app import run
from services.deliverer.settings import DelivererSettings
from shared import service

if __name__ == "__main__":
    settings = DelivererSettings.from_env()
    service.run("deliverer", lambda stop, stack: run(settings, stop, stack))
