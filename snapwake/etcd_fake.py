"""``FakeEtcd``: the ``EtcdClient`` interface in memory, for unit tests of the services.

It keeps the etcd semantics the services rely on, and tests/inproc/test_etcd_behaviour.py runs
one suite against it and against a real etcd:

- One store revision, bumped once by every write that changes something: a put, a delete that
  found its key, a prefix delete, a lease ending (all its keys go at one revision). A key's
  ``mod_revision`` is the revision that last wrote it; compare-and-swap compares it (0: absent).
- A watch replays the history from its start revision, then follows live changes in order.
- Leases run on a clock of their own that only ``advance`` moves. A lease is granted at least
  ``min_ttl`` seconds (etcd's default minimum is 2). When it expires or is revoked, its keys are
  deleted (watchers see the deletes) and it refreshes to 0; a put under it is NotFound.
- ``down = True`` makes every call raise Unavailable and breaks open watches, as an unreachable
  etcd does; ``fail_next`` makes the next calls raise a chosen error.

Every call yields to the event loop once, as a round trip to etcd would, so concurrent
read-modify-writes interleave and lose races as they do against a real etcd.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import Message

from snapwake import errors
from snapwake.etcd import Entry, EtcdClient, WatchEvent, decode_value, encode_value

__all__ = ["FakeEtcd"]

M = TypeVar("M", bound=Message)


@dataclass
class _Kv:
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class _Change:
    revision: int
    key: str
    value: bytes | None  # None for a delete


@dataclass
class _Lease:
    ttl: int
    expires_at: float


@dataclass
class _Watcher:
    prefix: str
    queue: asyncio.Queue[_Change | errors.SnapwakeError] = field(default_factory=asyncio.Queue)


class FakeEtcd(EtcdClient):
    """An in-memory etcd with revisions, compare-and-swap, watches and leases on a test clock."""

    def __init__(self, min_ttl: int = 2) -> None:
        self.min_ttl = min_ttl
        self.revision = 1  # as a fresh etcd
        self.now = 0.0  # the lease clock, in seconds; only ``advance`` moves it
        self._kvs: dict[str, _Kv] = {}
        self._history: list[_Change] = []
        self._watchers: list[_Watcher] = []
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x5F00_0000_0000_0001)
        self._down = False
        self._failures: list[errors.SnapwakeError] = []

    # --- test controls -------------------------------------------------------------------
    @property
    def down(self) -> bool:
        """Whether etcd is unreachable: every call raises Unavailable, open watches break."""
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        for watcher in self._watchers if value else []:
            watcher.queue.put_nowait(errors.Unavailable("etcd (fake): connection lost"))

    def fail_next(self, error: errors.SnapwakeError | None = None, times: int = 1) -> None:
        """The next ``times`` calls raise ``error`` (default: Unavailable) instead of running."""
        self._failures.extend([error or errors.Unavailable("etcd (fake): injected failure")] * times)

    def advance(self, seconds: float) -> None:
        """Moves the lease clock; leases that run out end now, oldest deadline first."""
        self.now += seconds
        for lease_id, lease in sorted(self._leases.items(), key=lambda item: item[1].expires_at):
            if lease.expires_at <= self.now:
                self._end_lease(lease_id)

    # --- internals -----------------------------------------------------------------------
    async def _enter(self, what: str) -> None:
        await asyncio.sleep(0)
        if self._down:
            raise errors.Unavailable(f"etcd (fake) is down: {what}")
        if self._failures:
            raise self._failures.pop(0)

    def _commit(self, changes: builtins.list[tuple[str, bytes | None, int]]) -> int:
        """Applies (key, value or None, lease) changes at one new revision; tells the watchers."""
        self.revision += 1
        for key, value, lease in changes:
            if value is None:
                del self._kvs[key]
            else:
                self._kvs[key] = _Kv(value, self.revision, lease)
            change = _Change(self.revision, key, value)
            self._history.append(change)
            for watcher in self._watchers:
                if key.startswith(watcher.prefix):
                    watcher.queue.put_nowait(change)
        return self.revision

    def _check_lease(self, lease: int | None) -> int:
        if lease and lease not in self._leases:
            raise errors.NotFound(f"etcd (fake): lease {lease:x} not found")
        return lease or 0

    def _end_lease(self, lease_id: int) -> None:
        del self._leases[lease_id]
        gone = sorted(k for k, kv in self._kvs.items() if kv.lease == lease_id)
        if gone:
            self._commit([(k, None, 0) for k in gone])

    def _mod(self, key: str) -> int:
        kv = self._kvs.get(key)
        return kv.mod_revision if kv else 0

    # --- EtcdClient ----------------------------------------------------------------------
    async def get(self, key: str, cls: type[M]) -> Entry | None:
        await self._enter(f"get {key}")
        kv = self._kvs.get(key)
        return None if kv is None else Entry(key, decode_value(kv.value, cls), kv.mod_revision, kv.lease)

    async def list_at(self, prefix: str, cls: type[M]) -> tuple[builtins.list[Entry], int]:
        await self._enter(f"list {prefix}")
        entries = [Entry(k, decode_value(kv.value, cls), kv.mod_revision, kv.lease)
                   for k, kv in sorted(self._kvs.items()) if k.startswith(prefix)]
        return entries, self.revision

    async def put(self, key: str, value: Message, lease: int | None = None) -> int:
        await self._enter(f"put {key}")
        return self._commit([(key, encode_value(value), self._check_lease(lease))])

    async def create(self, key: str, value: Message, lease: int | None = None) -> bool:
        return await self.swap(key, value, 0, lease)

    async def swap(self, key: str, value: Message, mod_revision: int, lease: int | None = None) -> bool:
        await self._enter(f"swap {key}")
        if self._mod(key) != mod_revision:
            return False
        self._commit([(key, encode_value(value), self._check_lease(lease))])
        return True

    async def put_if_unchanged(self, key: str, value: Message, prefix: str, revision: int,
                               create: bool = False) -> bool:
        await self._enter(f"put {key} unless {prefix}* changed")
        if any(k.startswith(prefix) and kv.mod_revision > revision for k, kv in self._kvs.items()):
            return False
        if create and key in self._kvs:
            return False
        self._commit([(key, encode_value(value), 0)])
        return True

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        await self._enter(f"delete {key}")
        if mod_revision is not None and self._mod(key) != mod_revision:
            return False
        if key in self._kvs:
            self._commit([(key, None, 0)])
            return True
        return mod_revision is not None  # etcd: the compare held, the delete found nothing

    async def delete_prefix(self, prefix: str) -> int:
        await self._enter(f"delete {prefix}*")
        gone = sorted(k for k in self._kvs if k.startswith(prefix))
        if gone:
            self._commit([(k, None, 0) for k in gone])
        return len(gone)

    async def watch(self, prefix: str, cls: type[M], start_revision: int | None = None
                    ) -> AsyncGenerator[WatchEvent, None]:
        await self._enter(f"watch {prefix}")
        watcher = _Watcher(prefix)
        start = self.revision + 1 if start_revision is None else start_revision
        for change in self._history:
            if change.revision >= start and change.key.startswith(prefix):
                watcher.queue.put_nowait(change)
        self._watchers.append(watcher)
        try:
            while True:
                item = await watcher.queue.get()
                if isinstance(item, errors.SnapwakeError):
                    raise item
                value = None if item.value is None else decode_value(item.value, cls)
                yield WatchEvent(item.key, value, item.revision)
        finally:
            self._watchers.remove(watcher)

    async def grant_lease(self, ttl: int) -> int:
        await self._enter(f"grant a {ttl}s lease")
        lease_id, granted = next(self._lease_ids), max(ttl, self.min_ttl)
        self._leases[lease_id] = _Lease(granted, self.now + granted)
        return lease_id

    async def refresh_lease(self, lease_id: int) -> int:
        await self._enter(f"refresh lease {lease_id:x}")
        lease = self._leases.get(lease_id)
        if lease is None:
            return 0
        lease.expires_at = self.now + lease.ttl
        return lease.ttl

    async def revoke_lease(self, lease_id: int) -> bool:
        await self._enter(f"revoke lease {lease_id:x}")
        if lease_id not in self._leases:
            return False
        self._end_lease(lease_id)
        return True
