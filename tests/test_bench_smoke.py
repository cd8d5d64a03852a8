"""Every benchmark `make bench` runs still runs to the end and prints its figures.

Benchmarks assert nothing about speed, so nothing else notices when one stops working (one
called an event-store method that had been removed). Each runs here on a small count; the
figures are not looked at, only that the run ends well and prints what it is for. The list
comes from the Makefile, so a benchmark added there without an entry here fails.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Small runs, and a line each prints only once it has measured everything.
SMALL_RUNS: dict[str, tuple[list[str], str]] = {
    "store_bench": (["--n", "300", "--batch", "100", "--calls", "20"], "list deep page"),
    "full_stack": (["--tasks", "150", "--paced", "20", "--fast-rate", "100", "--lag-samples", "3"],
                   "ratio completion / raw publish+consume"),
    "cpu_per_task": (["--tasks", "150"], "all processes"),
    "compare": (["--tasks", "150"], "taskmode/Celery"),
    "stream_size": (["--tasks", "50"], "S2"),
    "bus_messages": (["--tasks", "100"], "all"),
    "hop_cost": (["--messages", "200"], "read, fetches of 256"),
}


def make_bench_modules() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None, "no bench target in the Makefile"
    return re.findall(r"-m bench\.(\w+)", recipe.group(1))


def test_every_make_bench_module_has_a_small_run() -> None:
    modules = make_bench_modules()
    assert modules, "the bench target runs no bench module"
    assert set(modules) == set(SMALL_RUNS), "a bench module in `make bench` without a small run here (or the reverse)"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("module", make_bench_modules())
def test_the_benchmark_runs_to_the_end(module: str) -> None:
    if module == "compare" and (importlib.util.find_spec("celery") is None or shutil.which("redis-server") is None):
        pytest.skip("the Celery reference needs the bench extra and redis-server (`make bench` installs both)")
    args, last_figure = SMALL_RUNS[module]
    run = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=540)
    assert run.returncode == 0, f"bench.{module} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert last_figure in run.stdout, run.stdout[-3000:]
