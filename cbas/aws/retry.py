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


# a transaction cancelled for one of these reasons is throttled, not refused
TRANSIENT_CANCELLATIONS = frozenset({"ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded"})


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (BotoConnectionError, EndpointConnectionError)):
        return True
    if not isinstance(error, ClientError):
        return False
    code = error.response.get("Error", {}).get("Code")
    if code == "TransactionCanceledException":
        reasons = {reason.get("Code") for reason in error.response.get("CancellationReasons", [])}
        return bool(reasons & TRANSIENT_CANCELLATIONS)
    return code in TRANSIENT_CODES


def aws_retry(func: Callable[..., T]) -> Callable[..., T]:
    """Retry a call on throttling and service errors: 5 attempts, 0.2 s to 5 s apart."""
    return retry(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.2, max=5.0),
        stop=stop_after_attempt(5),
        reraise=True,
    )(func)
