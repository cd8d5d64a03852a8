"""Celery + Redis reference: the same no-op workload as bench/cpu_per_task.py, through Celery.

Starts its own redis-server (free loopback port, temporary directory, no persistence) and a
Celery 5 worker (prefork pool, 2 processes) as subprocesses; submits N no-op tasks with
`apply_async` from this one process, waits until every result is SUCCESS in the Redis result
backend, and divides each process's CPU time by N. Prints figures; asserts nothing about speed.

Needs the `bench` extra and a redis-server on PATH (`make bench` installs both). Run:
`python -m bench.celery_reference --tasks 3000`. `run_celery` is the same run for other benches
(bench/compare.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import celery
import kombu
import psutil
import redis
from celery import Celery
from celery.result import AsyncResult

from bench.figures import RunFigures, cpu_seconds, ms_per_task, print_cpu_per_task
from shared.devstack import ChildProcess, free_port, wait_for_port

REDIS_URL_ENV = "TASKMODE_BENCH_REDIS_URL"
NOOP_TASK = "bench.noop"
WORKER_PROCESSES = 2  # one per core, as the taskmode executor runs on the same two cores
REPO_ROOT = Path(__file__).resolve().parent.parent
DESCENDANTS_AS = {"celery worker": "celery pool processes"}


def noop() -> None:
    """The task body: nothing, so all that is measured is Celery's and Redis's own cost."""


def make_app(redis_url: str) -> Celery:
    """A Celery app with Redis as broker and result backend, and the no-op task registered."""
    app = Celery("bench_celery_reference", broker=redis_url, backend=redis_url, set_as_current=False)
    # Keeps Celery 5's behaviour and silences its warning that the default will change.
    app.conf.broker_connection_retry_on_startup = True
    app.task(name=NOOP_TASK)(noop)
    return app


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server, or `make bench`)")
    return found


def start_child(
    name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> ChildProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,  # its own process group, so stop_tree can end all of it
        )
    return ChildProcess(name, process, log_path)


def start_redis(work_dir: Path) -> ChildProcess:
    """redis-server on loopback with snapshots and the append-only file off: a broker kept in
    memory, as fast as Redis can be, so the reference is not slowed by our choice of settings."""
    port = free_port()
    argv = [
        redis_server_binary(),
        "--bind", "127.0.0.1", "--port", str(port),
        "--dir", str(work_dir), "--save", "", "--appendonly", "no",
    ]
    child = start_child("redis-server", argv, work_dir / "logs" / "redis-server.log")
    wait_for_port(port, deadline_s=20, process=child.process)
    child.url = f"redis://127.0.0.1:{port}/0"
    return child


def start_worker(redis_url: str, work_dir: Path) -> ChildProcess:
    argv = [
        sys.executable, "-m", "celery", "-A", "bench.celery_worker", "worker",
        "--pool", "prefork", "--concurrency", str(WORKER_PROCESSES), "--loglevel", "WARNING",
        "--hostname", f"bench-{os.getpid()}@%h",
    ]
    env = {**os.environ, REDIS_URL_ENV: redis_url}
    # cwd: the worker imports bench.celery_worker from the repository, which is not installed.
    return start_child("celery worker", argv, work_dir / "logs" / "celery-worker.log", env=env, cwd=REPO_ROOT)


def stop_tree(child: ChildProcess) -> None:
    """Warm shutdown, then kill whatever is left of its process group (pool processes included)."""
    child.stop(grace_s=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.process.pid, signal.SIGKILL)


def wait_all_successful(results: list[AsyncResult], *, deadline_s: float) -> None:
    """Until every result is SUCCESS; raises if one failed or the deadline passes."""
    end = time.monotonic() + deadline_s
    for result in results:
        # Each get() drains the result backend's pub/sub, so the later ones are mostly in hand.
        result.get(timeout=max(0.1, end - time.monotonic()), propagate=True)
    failed = [r.id for r in results if not r.successful()]
    if failed:
        raise RuntimeError(f"{len(failed)} Celery tasks did not succeed, first {failed[0]}")


def warm_up(app: Celery, worker: ChildProcess) -> None:
    """A few tasks first, so the measured run starts with the worker consuming and every
    connection open; up to a minute, as the worker may start slowly on a busy machine."""
    results = [app.tasks[NOOP_TASK].apply_async() for _ in range(2 * WORKER_PROCESSES)]
    try:
        wait_all_successful(results, deadline_s=60)
    except Exception as exc:
        raise RuntimeError(f"the Celery worker did not run tasks: {worker.log_text()[-2000:]}") from exc


def poll_all_successful(redis_url: str, task_ids: list[str], *, deadline_s: float) -> None:
    """Until every task's stored result says SUCCESS, read in bulk (MGET) every few ms.

    The cheapest way a Celery client can learn that work is done: no subscription per task.
    """
    client = redis.Redis.from_url(redis_url)
    keys = [f"celery-task-meta-{task_id}" for task_id in task_ids]
    end = time.monotonic() + deadline_s
    pending = keys
    try:
        while pending:
            if time.monotonic() > end:
                raise RuntimeError(f"{len(pending)} Celery tasks not done within {deadline_s}s")
            still: list[str] = []
            for start in range(0, len(pending), 1000):
                chunk = pending[start:start + 1000]
                for key, value in zip(chunk, client.mget(chunk)):
                    if value is None or b'"SUCCESS"' not in value:
                        still.append(key)
            pending = still
            if pending:
                time.sleep(0.005)
    finally:
        client.close()


def submit_and_wait(app: Celery, redis_url: str, tasks: int, *, deadline_s: float) -> tuple[float, float]:
    """Seconds the apply_async loop took, and from its start until every result was SUCCESS.

    Results are stored by the worker (the last state of each task, as Celery keeps it), but
    the load generator does not subscribe to each one: it polls them in bulk, which costs the
    client far less than an AsyncResult.get() per task.
    """
    task = app.tasks[NOOP_TASK]
    app.backend.on_task_call = lambda producer, task_id: None  # no per-task result subscription
    started = time.perf_counter()
    task_ids = [task.apply_async().id for _ in range(tasks)]
    submit_s = time.perf_counter() - started
    poll_all_successful(redis_url, task_ids, deadline_s=deadline_s)
    return submit_s, time.perf_counter() - started


def run_celery(tasks: int, *, deadline_s: float = 600) -> RunFigures:
    """A fresh redis-server and Celery worker, N no-op tasks through them, then both are stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        redis_server = start_redis(work_dir)
        worker: ChildProcess | None = None
        app = make_app(redis_server.url)
        try:
            worker = start_worker(redis_server.url, work_dir)
            warm_up(app, worker)
            processes = {
                "load generator": psutil.Process(),
                "celery worker": psutil.Process(worker.process.pid),
                "redis-server": psutil.Process(redis_server.process.pid),
            }
            before = cpu_seconds(processes, DESCENDANTS_AS)
            submit_s, complete_s = submit_and_wait(app, redis_server.url, tasks, deadline_s=deadline_s)
            after = cpu_seconds(processes, DESCENDANTS_AS)
        finally:
            app.close()
            if worker is not None:
                stop_tree(worker)
            stop_tree(redis_server)
    return RunFigures("Celery + Redis", tasks, submit_s, complete_s, ms_per_task(before, after, tasks))


def redis_server_version() -> str:
    banner = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\S+)", banner)
    return match.group(1) if match else banner.strip()


def versions() -> dict[str, str]:
    return {
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "redis-server": redis_server_version(),
    }


def print_figures(figures: RunFigures) -> None:
    print(f"\n== Celery + Redis reference, {figures.tasks} no-op tasks "
          f"(apply_async from one process, prefork worker with {WORKER_PROCESSES} processes) ==")
    print(", ".join(f"{name} {version}" for name, version in versions().items()))
    print(f"submission rate (apply_async)  {figures.submit_rate:8.0f} tasks/s")
    print(f"completion throughput          {figures.completion_rate:8.0f} tasks/s  "
          f"(all {figures.tasks} SUCCESS after {figures.complete_s:.1f} s)")
    print_cpu_per_task(figures)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    args = parser.parse_args()
    print_figures(run_celery(args.tasks))


if __name__ == "__main__":
    main()
