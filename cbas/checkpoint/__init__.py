"""Checkpoint strategies and checkpoint storage."""
