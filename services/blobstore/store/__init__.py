"""Snapshot stores: ``StripedStore`` (disk) beside ``MemoryStore`` (unit tests)."""

from services.blobstore.store.base import CorruptSnapshot, SnapshotStore, SnapshotWriter
from services.blobstore.store.memory import MemoryStore
from services.blobstore.store.striped import StripedStore

__all__ = ["CorruptSnapshot", "MemoryStore", "SnapshotStore", "SnapshotWriter", "StripedStore"]
