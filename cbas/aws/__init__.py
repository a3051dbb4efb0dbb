"""boto3 implementations of the interfaces in cbas/backends.py."""
