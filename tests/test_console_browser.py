"""The web console in headless Chromium (Debian's `chromium`, driven by Playwright) against a
running stack: sign-in, Submit Task, live rows, a task's timeline, stop from the list, filters,
monitoring. Screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.devstack import Stack, free_port
from tests.fc_client import FcClient
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, HANDLERS, client_for, new_stack

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"),
]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
FUNCTION = "console_demo"
SLEEPER = "console_sleeper"
WAIT_MS = 25_000


def _run(coro):  # type: ignore[no-untyped-def]
    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _setup_function(fc: FcClient) -> None:
    try:
        response = await fc.create_function(FUNCTION, code={"index.py": HANDLERS}, handler="index.handler", timeout=60)
        assert response.status_code == 200, response.text
        response = await fc.put_async_config(FUNCTION, asyncTask=True, maxAsyncRetryAttempts=0)
        assert response.status_code == 200, response.text
        response = await fc.create_function(SLEEPER, code={"index.py": HANDLERS}, handler="index.sleep", timeout=120)
        assert response.status_code == 200, response.text
    finally:
        await fc.close()


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = {service: str(free_port()) for service in ("SCHEDULER", "EXECUTOR", "PROJECTION")}
    stack = new_stack(
        tmp_path_factory.mktemp("console"),
        extra_env={**{f"TASKMODE_{s}_METRICS_PORT": p for s, p in ports.items()}, "TASKMODE_CONSOLE_SAMPLE_EVERY_S": "1"},
    )
    try:
        _run(_setup_function(client_for(stack)))
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser(console_stack: Stack) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, console_stack: Stack):  # type: ignore[no-untyped-def]
    context = browser.new_context(base_url=f"http://127.0.0.1:{console_stack.gateway_port}",
                                  viewport={"width": 1440, "height": 900})
    opened = context.new_page()
    opened.on("dialog", lambda dialog: dialog.accept())
    try:
        yield opened
    finally:
        context.close()


def sign_in(page, *, secret: str = ACCESS_KEY_SECRET) -> None:  # type: ignore[no-untyped-def]
    page.goto("/console/login")
    page.fill("input[name=access_key_id]", ACCESS_KEY_ID)
    page.fill("input[name=access_key_secret]", secret)
    page.click("button[type=submit]")


def row_status(page, task_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f"#task-row-{task_id} .status")


def test_a_wrong_key_is_refused(page) -> None:  # type: ignore[no-untyped-def]
    sign_in(page, secret="not-the-secret")
    from playwright.sync_api import expect

    expect(page.locator(".error")).to_contain_text("do not match")
    assert page.url.endswith("/console/login")
    assert not [c for c in page.context.cookies() if c["name"] == "taskmode_console"]
    page.goto("/console/functions")
    assert "/console/login" in page.url  # still not signed in


def test_submit_a_delayed_task_and_watch_it_live(page, console_stack: Stack) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    sign_in(page)
    expect(page.locator("h1")).to_have_text("Functions")
    page.click(f"a[href='/console/functions/{FUNCTION}/tasks']")
    expect(page.locator(".live-state.on")).to_be_visible()
    page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page

    page.click("[data-open-dialog=submit-dialog]")
    dialog = page.locator("#submit-dialog")
    dialog.locator("input[name=task_id_mode][value=custom]").check()
    dialog.locator("input[name=task_id]").fill("browser-1")
    dialog.locator("input[name=when][value=delay]").check()
    dialog.locator("input[name=delay_s]").fill("3")
    dialog.locator("textarea[name=payload]").fill('{"hello": "console"}')
    dialog.locator("button[type=submit]").click()

    expect(page.locator("#flash")).to_contain_text("browser-1")
    expect(row_status(page, "browser-1")).to_have_text("Enqueued", timeout=WAIT_MS)
    expect(row_status(page, "browser-1")).to_have_text("Succeeded", timeout=WAIT_MS)
    assert page.evaluate("window.__sameDocument") is True
    page.screenshot(path=str(ARTIFACTS / "console-tasks-tab.png"), full_page=True)

    page.click("#task-row-browser-1 a")
    timeline = page.locator("#task-timeline li .status")
    expect(timeline).to_have_text(["Enqueued", "Processed", "Running", "Succeeded"], timeout=WAIT_MS)
    expect(page.locator("#task-outcome")).to_contain_text("console")
    expect(page.locator("#task-logs")).to_contain_text("task", timeout=WAIT_MS)
    page.screenshot(path=str(ARTIFACTS / "console-task-timeline.png"), full_page=True)


def test_stop_a_long_task_from_the_list_and_its_page(page, console_stack: Stack) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    sign_in(page)
    page.goto(f"/console/functions/{SLEEPER}/tasks")
    expect(page.locator(".live-state.on")).to_be_visible()
    page.click("[data-open-dialog=submit-dialog]")
    dialog = page.locator("#submit-dialog")
    dialog.locator("input[name=task_id_mode][value=custom]").check()
    dialog.locator("input[name=task_id]").fill("long-1")
    dialog.locator("input[name=payload_format][value=text]").check()
    dialog.locator("textarea[name=payload]").fill("60")
    dialog.locator("button[type=submit]").click()
    expect(row_status(page, "long-1")).to_have_text("Running", timeout=WAIT_MS)
    page.click("#task-row-long-1 button:has-text('Stop')")  # the confirmation is accepted
    expect(row_status(page, "long-1")).to_have_text("Stopped", timeout=WAIT_MS)
    expect(page.locator("#task-row-long-1 button")).to_have_count(0)

    # And from the task's own page.
    _run(_submit(console_stack, SLEEPER, "long-2", b"60"))
    page.goto(f"/console/functions/{SLEEPER}/tasks/long-2")
    expect(page.locator("#task-status")).to_have_text("Running", timeout=WAIT_MS)
    page.click("#task-summary button:has-text('Stop')")
    expect(page.locator("#task-status")).to_have_text("Stopped", timeout=WAIT_MS)
    expect(page.locator("#task-timeline li .status").last).to_have_text("Stopped")


async def _submit(stack: Stack, function: str, task_id: str, payload: bytes) -> None:
    fc = client_for(stack)
    try:
        assert (await fc.invoke_async(function, payload, task_id=task_id)).status_code == 202
    finally:
        await fc.close()


async def _run_tasks(stack: Stack, count: int) -> None:
    fc = client_for(stack)
    try:
        for index in range(count):
            assert (await fc.invoke_async(FUNCTION, b'"charted"', task_id=f"charted-{index}")).status_code == 202
        await fc.wait_for(FUNCTION, f"charted-{count - 1}", {"Succeeded"})
    finally:
        await fc.close()


def test_the_monitoring_view_charts_the_exported_figures(page, console_stack: Stack) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    sign_in(page)
    page.goto(f"/console/functions/{FUNCTION}/monitoring")
    charts = page.locator("#charts")
    expect(charts).to_have_attribute("data-samples", re.compile(r"^([2-9]|\d\d+)$"), timeout=WAIT_MS)
    _run(_run_tasks(console_stack, 8))
    # Samples taken after the tasks ran: the throughput chart has drawn them.
    expect(charts).to_have_attribute("data-samples", re.compile(r"^([6-9]|\d\d+)$"), timeout=WAIT_MS)
    data = page.evaluate("fetch(document.getElementById('charts').dataset.source).then(r => r.json())")
    assert sum(v or 0 for v in data["charts"]["throughput"]["series"]["Succeeded/s"]) > 0
    expect(page.locator("[data-chart=throughput] .u-legend")).to_contain_text("Succeeded/s")
    expect(page.locator("[data-chart=backlog] canvas")).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "console-monitoring.png"), full_page=True)


def test_filter_by_status(page) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    sign_in(page)
    page.goto(f"/console/functions/{FUNCTION}/tasks")
    page.select_option("select[name=status]", "Succeeded")
    page.click("#filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"status=Succeeded"))
    statuses = page.locator("#task-rows .status")
    expect(statuses.first).to_have_text("Succeeded")
    assert set(statuses.all_inner_texts()) == {"Succeeded"}
