"""The CLI's client for the master's JSON API (standard library HTTP; the CLI is synchronous)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from cbas.master.daemon import master_file_info
from cbas.settings import Settings
from cbas.wiring import master_file, token_path


class MasterUnavailable(RuntimeError):
    pass


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MasterClient:
    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        info = master_file_info(master_file(settings))
        if info is None:
            raise MasterUnavailable(
                f"no master is running for {settings.home}: start one with `cbas master` (or set CBAS_HOME)"
            )
        self.url = str(info["url"])
        try:
            self.token = token_path(settings).read_text().strip()
        except OSError as exc:
            raise MasterUnavailable(f"cannot read the API token: {exc}") from None
        self.timeout = timeout

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            raise ApiError(exc.code, str(message)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise MasterUnavailable(f"the master at {self.url} does not answer ({exc}); is `cbas master` running?") from None

    def create_job(self, name: str | None) -> str:
        return str(self._call("POST", "/api/jobs", {"name": name})["job_id"])

    def submit_job(self, job_id: str, text: str) -> str:
        """Queue a job whose files are uploaded; returns its state."""
        return str(self._call("POST", f"/api/jobs/{job_id}/submit", {"jdl": text})["state"])

    def cancel_job(self, job_id: str) -> str:
        try:
            return str(self._call("POST", f"/api/jobs/{job_id}/cancel", {})["state"])
        except ApiError as exc:
            if exc.status == 404:
                raise ApiError(404, f"no job with id {job_id!r} (see `cbas status`)") from None
            raise

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/jobs")["jobs"])

    def collect_garbage(self, dry_run: bool) -> dict[str, Any]:
        return self._call("POST", "/api/gc", {"dry_run": dry_run})

    def job(self, job_id: str) -> dict[str, Any]:
        try:
            return self._call("GET", f"/api/jobs/{job_id}")
        except ApiError as exc:
            if exc.status == 404:
                raise ApiError(404, f"no job with id {job_id!r} (see `cbas status`)") from None
            raise
