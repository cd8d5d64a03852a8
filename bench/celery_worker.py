"""The Celery app the reference worker runs: `celery -A bench.celery_worker worker`.

Separate from bench/celery_reference.py because Celery's command line wants an app object at
import time, and only the worker's environment knows the broker's URL by then.
"""

from __future__ import annotations

import os

from bench.celery_reference import REDIS_URL_ENV, make_app

app = make_app(os.environ[REDIS_URL_ENV])
