"""structlog set-up, in one place: JSON lines for daemons, readable lines for the CLI."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(json: bool, level: str = "INFO") -> None:
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


_said: set[str] = set()


def say_once(logger: structlog.typing.FilteringBoundLogger, event: str, **fields: object) -> None:
    """A warning about the machine rather than a job (no cgroups, no iptables): once a process."""
    if event not in _said:
        _said.add(event)
        logger.warning(event, **fields)
