"""Typed access to etcd through ``aetcd``: protobuf values, CAS transactions, leases, watches.

Every read-modify-write goes through ``update``, a transaction that compares the key's mod
revision and retries a bounded number of times on a lost race.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aetcd
import aetcd.exceptions
from google.protobuf import json_format
from google.protobuf.message import Message

from snapwake import errors
from snapwake.config import parse_address

__all__ = ["Entry", "LeaseKeeper", "Etcd", "WatchEvent"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Entry:
    """A decoded value with the mod revision it was read at (for compare-and-swap)."""

    key: str
    value: Message
    mod_revision: int


@dataclass(frozen=True)
class WatchEvent:
    key: str
    value: Message | None  # None for a delete
    revision: int


def _encode(msg: Message) -> bytes:
    return json_format.MessageToJson(msg, indent=None, preserving_proto_field_name=True).encode()


def _decode(raw: bytes, cls: type[M]) -> M:
    return json_format.Parse(raw, cls(), ignore_unknown_fields=True)


class Etcd:
    """A connected etcd client. ``async with Etcd.connect(addr) as etcd: ...``."""

    def __init__(self, client: aetcd.Client) -> None:
        self.client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, address: str, timeout: float = 5.0) -> AsyncIterator[Etcd]:
        host, port = parse_address(address)
        client = aetcd.Client(host=host, port=port, timeout=int(max(1, timeout)))
        try:
            await asyncio.wait_for(client.connect(), timeout)
            await asyncio.wait_for(client.status(), timeout)
        except (TimeoutError, aetcd.exceptions.ClientError, OSError) as exc:
            await client.close()
            raise errors.Unavailable(f"etcd at {address} is unreachable: {exc}") from exc
        try:
            yield cls(client)
        finally:
            await client.close()

    async def get(self, key: str, cls: type[M]) -> Entry | None:
        got = await self.client.get(key.encode())
        if got is None:
            return None
        return Entry(key, _decode(got.value, cls), got.mod_revision)

    async def list(self, prefix: str, cls: type[M]) -> list[Entry]:
        return (await self.list_at(prefix, cls))[0]

    async def list_at(self, prefix: str, cls: type[M]) -> tuple[builtins.list[Entry], int]:
        """Lists ``prefix`` and returns the etcd revision it was read at (to watch from +1)."""
        result = await self.client.get_prefix(prefix.encode())
        entries = [Entry(kv.key.decode(), _decode(kv.value, cls), kv.mod_revision) for kv in result]
        return entries, int(result.header.revision)

    async def put(self, key: str, value: Message, lease: int | None = None) -> None:
        await self.client.put(key.encode(), _encode(value), lease=lease)

    async def create(self, key: str, value: Message, lease: int | None = None) -> bool:
        """Writes ``key`` only if it does not exist; returns False if it did."""
        tx = self.client.transactions
        ok, _ = await self.client.transaction(
            compare=[tx.version(key.encode()) == 0],
            success=[tx.put(key.encode(), _encode(value), lease)], failure=[])
        return bool(ok)

    async def swap(self, key: str, value: Message, mod_revision: int, lease: int | None = None) -> bool:
        """Writes ``key`` only if its mod revision is still ``mod_revision`` (0: absent)."""
        tx = self.client.transactions
        ok, _ = await self.client.transaction(
            compare=[tx.mod(key.encode()) == mod_revision],
            success=[tx.put(key.encode(), _encode(value), lease)], failure=[])
        return bool(ok)

    async def update(self, key: str, cls: type[M], mutate: Callable[[M], M | None],
                     attempts: int = 8) -> M:
        """Read-modify-write under a mod-revision compare. ``mutate`` returns None to skip."""
        for _ in range(attempts):
            entry = await self.get(key, cls)
            if entry is None:
                raise errors.NotFound(f"{key} does not exist")
            current = cls()
            current.CopyFrom(entry.value)
            new = mutate(current)
            if new is None:
                return current
            if await self.swap(key, new, entry.mod_revision):
                return new
        raise errors.Aborted(f"{key} changed concurrently {attempts} times; retry")

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        if mod_revision is None:
            return bool(await self.client.delete(key.encode()))
        tx = self.client.transactions
        ok, _ = await self.client.transaction(
            compare=[tx.mod(key.encode()) == mod_revision], success=[tx.delete(key.encode())], failure=[])
        return bool(ok)

    async def watch(self, prefix: str, cls: type[M], start_revision: int | None = None
                    ) -> AsyncIterator[WatchEvent]:
        """Yields changes under ``prefix``; the caller cancels the iteration to stop."""
        watch = await self.client.watch_prefix(prefix.encode(), start_revision=start_revision)
        try:
            async for ev in watch:
                kv = ev.kv
                value = None if ev.kind == aetcd.rtypes.EventKind.DELETE else _decode(kv.value, cls)
                yield WatchEvent(kv.key.decode(), value, kv.mod_revision)
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()


class LeaseKeeper:
    """Holds one etcd lease and refreshes it until stopped; keys put under it die with us.

    If a refresh finds the lease gone (etcd restarted or we were partitioned too long),
    ``on_lost`` is awaited so the owner can re-register its keys under a new lease.
    """

    def __init__(self, etcd: Etcd, ttl: int, on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        self.etcd, self.ttl, self.on_lost = etcd, ttl, on_lost
        self.lease_id: int = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        lease = await self.etcd.client.lease(self.ttl)
        self.lease_id = lease.id
        self._task = asyncio.create_task(self._keepalive(), name="lease-keepalive")
        return self.lease_id

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.ttl / 3))
            try:
                resp = await self.etcd.client.refresh_lease(self.lease_id)
                alive = resp is not None and resp.TTL > 0
            except Exception as exc:  # noqa: BLE001 - a transient etcd error: try again next tick
                log.warning("lease %x refresh failed: %s", self.lease_id, exc)
                continue
            if not alive:
                log.warning("lease %x expired; taking a new one", self.lease_id)
                self.lease_id = (await self.etcd.client.lease(self.ttl)).id
                if self.on_lost is not None:
                    await self.on_lost()

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease_id:
            with contextlib.suppress(Exception):
                await self.etcd.client.revoke_lease(self.lease_id)
