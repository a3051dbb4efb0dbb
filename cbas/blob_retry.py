"""Any BlobStore, with its transient failures retried: exponential backoff within a total time
budget, after which the last error is raised for the caller to report. A missing blob or a
missing local file is not transient and is raised at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import structlog
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from cbas.backends import BlobStore, Progress

log = structlog.get_logger(__name__)
T = TypeVar("T")
PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, PERMANENT):
        return False
    if isinstance(error, (OSError, TimeoutError, ConnectionError)):
        return True
    from cbas.aws.retry import is_transient as aws_transient  # botocore's own errors

    return aws_transient(error)


class RetryingBlobStore:
    def __init__(self, inner: BlobStore, budget_seconds: float = 120.0, first_wait: float = 0.2) -> None:
        self.inner = inner
        self.budget_seconds = budget_seconds
        self.first_wait = first_wait

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(is_transient), reraise=True,
            wait=wait_exponential(multiplier=self.first_wait, max=10.0), stop=stop_after_delay(self.budget_seconds),
            before_sleep=lambda state: log.warning("blob.retrying", call=what, attempt=state.attempt_number,
                                                   error=str(state.outcome.exception() if state.outcome else "")),
        )
        return retrying(call)

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        self._retry(f"put {key}", lambda: self.inner.put_file(key, path, progress))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._retry(f"put {key}", lambda: self.inner.put_bytes(key, data))

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        self._retry(f"get {key}", lambda: self.inner.get_file(key, path, progress))

    def get_bytes(self, key: str) -> bytes:
        return self._retry(f"get {key}", lambda: self.inner.get_bytes(key))

    def size(self, key: str) -> int:
        return self._retry(f"size {key}", lambda: self.inner.size(key))

    def exists(self, key: str) -> bool:
        return self._retry(f"exists {key}", lambda: self.inner.exists(key))

    def list(self, prefix: str) -> list[str]:
        return self._retry(f"list {prefix}", lambda: self.inner.list(prefix))

    def list_modified(self, prefix: str) -> dict[str, float]:
        return self._retry(f"list {prefix}", lambda: self.inner.list_modified(prefix))

    def delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.inner.delete(key))

    def __getattr__(self, name: str) -> Any:  # presigned URLs and the like: no I/O to retry
        return getattr(self.inner, name)
