"""Which AWS errors are worth trying again (cbas.aws.retry)."""

from __future__ import annotations

from botocore.exceptions import ClientError

from cbas.aws.retry import is_transient


def cancelled(*reasons: str) -> ClientError:
    return ClientError({"Error": {"Code": "TransactionCanceledException", "Message": "Transaction cancelled"},
                        "CancellationReasons": [{"Code": reason} for reason in reasons]}, "TransactWriteItems")


def test_a_throttled_transaction_is_tried_again_a_refused_one_is_not() -> None:
    # DynamoDB says throttling inside a transaction as a cancellation reason, not as the error code
    assert is_transient(cancelled("ThrottlingError", "None"))
    assert is_transient(cancelled("None", "ProvisionedThroughputExceeded"))
    assert not is_transient(cancelled("ConditionalCheckFailed", "None"))  # another writer won: read again
    assert not is_transient(cancelled("ValidationError"))
    assert is_transient(ClientError({"Error": {"Code": "ThrottlingException"}}, "PutItem"))
    assert not is_transient(ClientError({"Error": {"Code": "ConditionalCheckFailedException"}}, "PutItem"))
