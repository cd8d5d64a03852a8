"""Pure pieces of triggers and destinations: schedules, tick ids, destination parsing, signing."""

from __future__ import annotations

import pytest

from shared.destinations import (
    FunctionTarget,
    NatsTarget,
    WebhookTarget,
    destination_task_id,
    parse_destination,
    sign_webhook,
    verify_webhook,
)
from shared.errors import InvalidArgument
from shared.schedules import parse_schedule
from shared.submission import TASK_ID_RE
from services.triggers.timers import tick_task_id


def test_every_ticks_at_multiples_of_the_interval_since_the_epoch() -> None:
    schedule = parse_schedule("@every 1m30s")
    assert schedule.every_s == 90
    assert schedule.ticks_between(0, 200_000) == [90_000, 180_000]
    assert schedule.ticks_between(90_000, 180_000) == [180_000]  # after < t <= until
    assert schedule.next_after(90_000) == 180_000


def test_six_field_cron_has_seconds_first_and_a_time_zone_prefix() -> None:
    every_ten = parse_schedule("*/10 * * * * *")
    assert every_ten.ticks_between(0, 30_000) == [10_000, 20_000, 30_000]
    daily = parse_schedule("CRON_TZ=Asia/Shanghai 0 0 4 ? * *")
    assert daily.next_after(0) == 20 * 3600 * 1000  # 04:00 in UTC+8 is 20:00 UTC


@pytest.mark.parametrize("expression", ["0 0 * * *", "@every", "@every 0s", "@every 10d", "61 * * * * *",
                                        "CRON_TZ=Mars/Base 0 * * * * *", "hourly"])
def test_bad_schedules_are_refused(expression: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_schedule(expression)


def test_tick_task_ids_follow_the_task_id_rule() -> None:
    assert tick_task_id("nightly", 1_700_000_000_123) == "nightly-1700000000"
    long = tick_task_id("t" * 128, 1_700_000_000_000)
    assert TASK_ID_RE.fullmatch(long) and long != tick_task_id("t" * 127 + "u", 1_700_000_000_000)


def test_destinations_parse_into_targets() -> None:
    parse = lambda text: parse_destination(text, region="local", account_id="42")  # noqa: E731
    assert parse("acs:fc:local:42:functions/sink") == FunctionTarget("sink", "LATEST")
    assert parse("acs:fc:local:42:functions/sink/prod") == FunctionTarget("sink", "prod")
    assert parse("https://example.com/hook?x=1") == WebhookTarget("https://example.com/hook?x=1")
    assert parse("nats:results.done") == NatsTarget("results.done")
    for bad in ("acs:fc:other:42:functions/sink", "mailto:a@b", "nats:$JS.API.x", "nats:a.>", "https:///x"):
        with pytest.raises(InvalidArgument):
            parse(bad)


def test_destination_task_ids_are_derived_and_valid() -> None:
    first = destination_task_id("fn", "job-1")
    assert first == destination_task_id("fn", "job-1") != destination_task_id("other", "job-1")
    assert TASK_ID_RE.fullmatch(first) and TASK_ID_RE.fullmatch(destination_task_id("fn", "j" * 128))


def test_webhook_signatures_verify_and_expire() -> None:
    body = b'{"x": 1}'
    signature = sign_webhook("s3cret", timestamp=1000, body=body)
    assert signature.startswith("v1=")
    assert verify_webhook("s3cret", timestamp="1000", body=body, signature=signature, now_s=1010)
    assert not verify_webhook("s3cret", timestamp="1000", body=body + b" ", signature=signature, now_s=1010)
    assert not verify_webhook("s3cret", timestamp="1000", body=body, signature=signature, now_s=5000)
