"""What every command gets from the global options: the output format and an API client."""

from __future__ import annotations

from dataclasses import dataclass, field

from taskmode_cli.api import TaskmodeApi
from taskmode_cli.output import OutputFormat
from taskmode_cli.profile import resolve


class UsageProblem(Exception):
    """Arguments that make no sense together; reported in one line with exit code 2."""


@dataclass
class CliState:
    endpoint: str | None
    access_key_id: str | None
    access_key_secret: str | None
    output: OutputFormat
    timeout_s: float
    _api: TaskmodeApi | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return self.output == OutputFormat.json

    def api(self) -> TaskmodeApi:
        """The API client for the resolved profile (built on first use)."""
        if self._api is None:
            profile = resolve(endpoint=self.endpoint, access_key_id=self.access_key_id,
                              access_key_secret=self.access_key_secret)
            try:
                self._api = TaskmodeApi(profile, timeout_s=self.timeout_s)
            except ValueError as err:
                raise UsageProblem(str(err)) from err
        return self._api
