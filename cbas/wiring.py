"""Builds the backend implementations that Settings chooses, and knows the home's file layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cbas.settings import Settings

if TYPE_CHECKING:  # the implementations are imported when asked for, not at start-up
    from cbas.backends import BlobStore, MessageBus
    from cbas.master.service import Backends


class BackendUnavailable(RuntimeError):
    pass


def db_path(settings: Settings) -> Path:
    return settings.home / "cbas.db"


def token_path(settings: Settings) -> Path:
    return settings.home / "api-token"


def master_file(settings: Settings) -> Path:
    return settings.home / "master.json"


def _require_local(settings: Settings) -> None:
    if settings.backend != "local":
        raise BackendUnavailable(
            f"the {settings.backend!r} backend is not available in this version; use backend 'local'"
        )


def open_blobs(settings: Settings) -> BlobStore:
    _require_local(settings)
    from cbas.local.blobs import FolderBlobStore

    return FolderBlobStore(settings.home / "blobs")


def open_bus(settings: Settings) -> MessageBus:
    _require_local(settings)
    from cbas.local.bus import LocalMessageBus

    return LocalMessageBus(settings.home, db_path(settings))


def open_master_backends(settings: Settings) -> Backends:
    _require_local(settings)
    from cbas.local.cloud import LocalCloud
    from cbas.local.store import SqliteJobStore
    from cbas.master.service import Backends

    return Backends(
        store=SqliteJobStore(db_path(settings)),
        blobs=open_blobs(settings),
        bus=open_bus(settings),
        cloud=LocalCloud(settings),
    )
