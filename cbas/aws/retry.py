"""Retries for AWS calls: transient errors only, with backoff and a bounded number of attempts."""

from __future__ import annotations

from typing import Callable, TypeVar

from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, EndpointConnectionError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

TRANSIENT_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "Throttling", "RequestLimitExceeded",
    "InternalServerError", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "TransactionInProgressException",
})

T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (BotoConnectionError, EndpointConnectionError)):
        return True
    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in TRANSIENT_CODES


def aws_retry(func: Callable[..., T]) -> Callable[..., T]:
    """Retry a call on throttling and service errors: 5 attempts, 0.2 s to 5 s apart."""
    return retry(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.2, max=5.0),
        stop=stop_after_attempt(5),
        reraise=True,
    )(func)
