from __future__ import annotations

import msgspec

from shared.settings import CommonSettings, env_float, env_int


class ProjectionSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    batch_size: int
    fetch_wait_s: float
    min_batch_interval_s: float  # lets events of one task gather into one write under load
    busy_rate: float  # events a second (per partition) above which batches gather for min_batch_interval_s
    expiry_sweep_s: float  # 0: MongoDB's TTL index expires tasks; else sweep this often
    ack_wait_s: float  # how soon a crashed projection's unfinished batch is redelivered

    @classmethod
    def from_env(cls) -> ProjectionSettings:
        return cls(
            common=CommonSettings.from_env(metrics_port_var="TASKMODE_PROJECTION_METRICS_PORT", metrics_port_default=9103),
            batch_size=env_int("TASKMODE_PROJECTION_BATCH", 1000),
            fetch_wait_s=env_float("TASKMODE_PROJECTION_FETCH_WAIT_S", 0.05),
            ack_wait_s=env_float("TASKMODE_PROJECTION_ACK_WAIT_S", 10.0),
            expiry_sweep_s=env_float("TASKMODE_EXPIRY_SWEEP_S", 0.0),
            min_batch_interval_s=env_float("TASKMODE_PROJECTION_MIN_BATCH_INTERVAL_S", 0.1),
            busy_rate=env_float("TASKMODE_PROJECTION_BUSY_RATE", 40.0),
        )
