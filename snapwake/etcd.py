"""Typed access to etcd: the ``EtcdClient`` interface, ``Etcd`` over ``aetcd``, and ``LeaseKeeper``.

Services are typed against ``EtcdClient``. ``Etcd`` talks to a real etcd; ``FakeEtcd`` (in
``snapwake.etcd_fake``) is the same interface in memory, for unit tests. One behaviour suite
(tests/inproc/test_etcd_behaviour.py) runs against both, so the fake cannot drift.

Values are protobuf messages stored as JSON (readable with etcdctl). Every read-modify-write
goes through ``update``, a transaction that compares the key's mod revision and retries a
bounded number of times on a lost race. Expected outcomes are values, not exceptions: a missing
key reads as None, a lost compare-and-swap returns False, an unknown lease refreshes to 0.

Every call to etcd is bounded by the client's timeout, and every exception from aetcd, gRPC or
the socket is translated in exactly one place (``_translated``); no caller sees the raw client::

    aetcd / grpc / asyncio                           snapwake.errors
    ConnectionFailedError      (gRPC UNAVAILABLE)    Unavailable
    ConnectionTimeoutError     (DEADLINE_EXCEEDED)   Unavailable
    WatchTimeoutError                                Unavailable
    TimeoutError (our bound), OSError                Unavailable
    DuplicateLeaseError                              AlreadyExists
    RevisionCompactedError                           FailedPrecondition  (relist, watch again)
    PreconditionFailedError                          FailedPrecondition
    InvalidArgumentError                             InvalidArgument
    ClientError from NOT_FOUND (an unknown lease)    NotFound
    ClientError from RESOURCE_EXHAUSTED              ResourceExhausted
    anything else (InternalError, Unauthenticated)   SnapwakeError
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import aetcd
import aetcd.exceptions as aetcd_errors
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from snapwake import errors
from snapwake.config import parse_address

__all__ = ["Entry", "Etcd", "EtcdClient", "LeaseKeeper", "WatchEvent", "decode_value", "encode_value"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """A decoded value with the mod revision it was read at (for compare-and-swap)."""

    key: str
    value: Message
    mod_revision: int
    # The etcd lease the key lives under (0: none); the key is deleted when the lease ends.
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix, at the etcd revision that made it."""

    key: str
    value: Message | None  # None for a delete
    revision: int


def encode_value(msg: Message) -> bytes:
    """A message as stored in etcd: one line of JSON with the proto field names."""
    return json_format.MessageToJson(msg, indent=None, preserving_proto_field_name=True).encode()


def decode_value(raw: bytes, cls: type[M]) -> M:
    return json_format.Parse(raw, cls(), ignore_unknown_fields=True)


class EtcdClient(abc.ABC):
    """What the services use of etcd. A ``lease`` argument of None or 0 means no lease."""

    @abc.abstractmethod
    async def get(self, key: str, cls: type[M]) -> Entry | None:
        """The key's value decoded as ``cls``, or None when it does not exist."""

    @abc.abstractmethod
    async def list_at(self, prefix: str, cls: type[M]) -> tuple[builtins.list[Entry], int]:
        """Every key under ``prefix`` in key order, and the store revision it was read at (to
        watch from + 1)."""

    async def list(self, prefix: str, cls: type[M]) -> builtins.list[Entry]:
        return (await self.list_at(prefix, cls))[0]

    @abc.abstractmethod
    async def put(self, key: str, value: Message, lease: int | None = None) -> int:
        """Writes ``key``; returns the revision of the write. An unknown lease is NotFound."""

    @abc.abstractmethod
    async def create(self, key: str, value: Message, lease: int | None = None) -> bool:
        """Writes ``key`` only if it does not exist; returns False if it did."""

    @abc.abstractmethod
    async def swap(self, key: str, value: Message, mod_revision: int, lease: int | None = None) -> bool:
        """Writes ``key`` only if its mod revision is still ``mod_revision`` (0: absent)."""

    @abc.abstractmethod
    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        """Deletes ``key`` (only if its mod revision is still ``mod_revision``, when given);
        False when it was absent or the compare failed."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Deletes every key under ``prefix`` at one revision; returns how many there were."""

    @abc.abstractmethod
    def watch(self, prefix: str, cls: type[M], start_revision: int | None = None
              ) -> AsyncGenerator[WatchEvent, None]:
        """Yields changes under ``prefix`` from ``start_revision`` (default: from now on), in
        revision order; the caller stops iterating to stop. A broken watch raises."""

    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd grants at least 2); returns its id."""

    @abc.abstractmethod
    async def refresh_lease(self, lease_id: int) -> int:
        """Restarts the lease's TTL; returns it, or 0 when the lease expired or never existed."""

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> bool:
        """Ends the lease now, deleting its keys; False when it was already gone."""

    async def update(self, key: str, cls: type[M], mutate: Callable[[M], M | None], attempts: int = 8) -> M:
        """Read-modify-write under a mod-revision compare, keeping the key's lease. ``mutate``
        gets a copy and returns the new value, or None to leave the key as it is. NotFound if
        the key does not exist; Aborted after ``attempts`` lost races."""
        for _ in range(attempts):
            entry = await self.get(key, cls)
            if entry is None:
                raise errors.NotFound(f"{key} does not exist")
            current = cls()
            current.CopyFrom(entry.value)
            new = mutate(current)
            if new is None:
                return current
            if await self.swap(key, new, entry.mod_revision, lease=entry.lease):
                return new
        raise errors.Aborted(f"{key} changed concurrently {attempts} times; retry")


# aetcd's exception classes, most specific first (each maps as the module docstring draws).
_BY_CLASS: tuple[tuple[type[BaseException], type[errors.SnapwakeError]], ...] = (
    (aetcd_errors.DuplicateLeaseError, errors.AlreadyExists),
    (aetcd_errors.RevisionCompactedError, errors.FailedPrecondition),
    (aetcd_errors.PreconditionFailedError, errors.FailedPrecondition),
    (aetcd_errors.InvalidArgumentError, errors.InvalidArgument),
    (aetcd_errors.ConnectionFailedError, errors.Unavailable),
    (aetcd_errors.ConnectionTimeoutError, errors.Unavailable),
    (aetcd_errors.WatchTimeoutError, errors.Unavailable),
    (OSError, errors.Unavailable),  # TimeoutError and ConnectionError included
)
# A bare ClientError (or a gRPC error aetcd did not wrap): the status code behind it decides.
_BY_CODE: dict[grpc.StatusCode, type[errors.SnapwakeError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}
_FOREIGN = (aetcd_errors.ClientError, grpc.RpcError, OSError)


def _domain_class(exc: BaseException) -> type[errors.SnapwakeError]:
    for foreign, ours in _BY_CLASS:
        if isinstance(exc, foreign):
            return ours
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.RpcError) and callable(getattr(err, "code", None)):
            return _BY_CODE.get(err.code(), errors.SnapwakeError)
    return errors.SnapwakeError


@contextlib.contextmanager
def _translated(where: str, timeout: float) -> Iterator[None]:
    """The one place where aetcd's and gRPC's exceptions become ``snapwake.errors``."""
    try:
        yield
    except _FOREIGN as exc:
        detail = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
        raise _domain_class(exc)(f"{where}: {detail or type(exc).__name__}") from exc


class Etcd(EtcdClient):
    """A connected etcd client. ``async with Etcd.connect(addr) as etcd: ...``."""

    def __init__(self, client: aetcd.Client, address: str, timeout: float) -> None:
        self._client, self._address, self._timeout = client, address, timeout

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, address: str, timeout: float = 5.0) -> AsyncIterator[Etcd]:
        """Connects and checks that etcd answers (Unavailable if not within ``timeout``); every
        later call is bounded by ``timeout`` too."""
        host, port = parse_address(address)
        etcd = cls(aetcd.Client(host=host, port=port, timeout=math.ceil(timeout)), address, timeout)
        try:
            await etcd._call("connect", etcd._connect())
            yield etcd
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(etcd._client.close(), timeout)

    async def _connect(self) -> None:
        await self._client.connect()
        await self._client.status()

    def _translated(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _translated(f"etcd at {self._address}: {what}", self._timeout)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        with self._translated(what):
            return await asyncio.wait_for(call, self._timeout)

    async def get(self, key: str, cls: type[M]) -> Entry | None:
        got = await self._call(f"get {key}", self._client.get(key.encode()))
        if got is None:
            return None
        return Entry(key, decode_value(got.value, cls), got.mod_revision, got.lease)

    async def list_at(self, prefix: str, cls: type[M]) -> tuple[builtins.list[Entry], int]:
        result = await self._call(f"list {prefix}", self._client.get_prefix(prefix.encode()))
        entries = [Entry(kv.key.decode(), decode_value(kv.value, cls), kv.mod_revision, kv.lease) for kv in result]
        return entries, int(result.header.revision)

    async def put(self, key: str, value: Message, lease: int | None = None) -> int:
        done = await self._call(f"put {key}", self._client.put(key.encode(), encode_value(value), lease=lease or None))
        return int(done.header.revision)

    async def _txn(self, what: str, compare: object, success: builtins.list[object]) -> bool:
        ok, _ = await self._call(what, self._client.transaction(compare=[compare], success=success, failure=[]))
        return bool(ok)

    async def create(self, key: str, value: Message, lease: int | None = None) -> bool:
        tx = self._client.transactions
        return await self._txn(f"create {key}", tx.version(key.encode()) == 0,
                               [tx.put(key.encode(), encode_value(value), lease or None)])

    async def swap(self, key: str, value: Message, mod_revision: int, lease: int | None = None) -> bool:
        tx = self._client.transactions
        return await self._txn(f"swap {key}", tx.mod(key.encode()) == mod_revision,
                               [tx.put(key.encode(), encode_value(value), lease or None)])

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        if mod_revision is None:
            return bool(await self._call(f"delete {key}", self._client.delete(key.encode())))
        tx = self._client.transactions
        return await self._txn(f"delete {key}", tx.mod(key.encode()) == mod_revision, [tx.delete(key.encode())])

    async def delete_prefix(self, prefix: str) -> int:
        done = await self._call(f"delete {prefix}*", self._client.delete_prefix(prefix.encode()))
        return int(done.deleted) if done is not None else 0

    async def watch(self, prefix: str, cls: type[M], start_revision: int | None = None
                    ) -> AsyncGenerator[WatchEvent, None]:
        what = f"watch {prefix}"
        watch = await self._call(what, self._client.watch_prefix(prefix.encode(), start_revision=start_revision))
        events = aiter(watch)
        try:
            while True:
                # Translated around the wait only: the caller's code runs at the yield.
                with self._translated(what):
                    ev = await anext(events, None)
                if ev is None:  # the client was closed
                    return
                deleted = ev.kind == aetcd.rtypes.EventKind.DELETE
                yield WatchEvent(ev.kv.key.decode(), None if deleted else decode_value(ev.kv.value, cls),
                                 ev.kv.mod_revision)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), self._timeout)

    async def grant_lease(self, ttl: int) -> int:
        return int((await self._call(f"grant a {ttl}s lease", self._client.lease(ttl))).id)

    async def refresh_lease(self, lease_id: int) -> int:
        reply = await self._call(f"refresh lease {lease_id:x}", self._client.refresh_lease(lease_id))
        return max(0, int(reply.TTL)) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> bool:
        try:
            await self._call(f"revoke lease {lease_id:x}", self._client.revoke_lease(lease_id))
        except errors.NotFound:  # expired or revoked already: its keys are gone, as asked
            return False
        return True


class LeaseKeeper:
    """Holds one etcd lease and refreshes it until stopped; keys put under it die with us.

    If a refresh finds the lease gone (etcd restarted or we were partitioned too long), a new
    lease is taken and ``on_lost`` is awaited so the owner can re-register its keys under it.
    """

    def __init__(self, etcd: EtcdClient, ttl: int, on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        self.etcd, self.ttl, self.on_lost = etcd, ttl, on_lost
        self.lease_id: int = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.lease_id = await self.etcd.grant_lease(self.ttl)
        self._task = asyncio.create_task(self._keepalive(), name="lease-keepalive")
        return self.lease_id

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.ttl / 3))
            try:
                if await self.etcd.refresh_lease(self.lease_id) > 0:
                    continue
                log.warning("lease %x expired; taking a new one", self.lease_id)
                self.lease_id = await self.etcd.grant_lease(self.ttl)
            except errors.SnapwakeError as exc:  # a transient etcd error: try again next tick
                log.warning("lease %x refresh failed: %s", self.lease_id, exc.message)
                continue
            if self.on_lost is not None:
                try:
                    await self.on_lost()
                except errors.SnapwakeError as exc:  # keep the new lease alive all the same
                    log.warning("re-registering under lease %x failed: %s", self.lease_id, exc.message)

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease_id:
            with contextlib.suppress(errors.SnapwakeError):
                await self.etcd.revoke_lease(self.lease_id)
