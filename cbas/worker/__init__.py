"""The worker daemon that runs on every machine."""
