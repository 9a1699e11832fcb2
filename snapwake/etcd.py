"""Typed access to etcd: the ``EtcdClient`` interface, ``Etcd`` over ``aetcd``, and ``LeaseKeeper``.

Services are typed against ``EtcdClient``. ``Etcd`` talks to a real etcd; ``FakeEtcd`` (in
``snapwake.etcd_fake``) is the same interface in memory, for unit tests. One behaviour suite
(tests/inproc/test_etcd_behaviour.py) runs against both, so the fake cannot drift.

Values are protobuf messages stored as JSON (readable with etcdctl). Every read-modify-write
goes through ``update``, a transaction that compares the key's mod revision and retries a
bounded number of times on a lost race. A write that must hold only while a whole prefix is as it was
read (a limit counted over it) goes through ``put_if_unchanged``, one transaction comparing
every key under the prefix. Expected outcomes are values, not exceptions: a missing
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

Several members, one channel. ``Etcd.connect`` takes every member's ``host:port`` (a list, or
one comma-separated string) and dials them through one gRPC channel with the ``round_robin``
policy, as etcd's own Go client (clientv3, since 3.4) balances: each call goes to a member
whose connection is READY, a killed member's connection drops out until it answers again (a
reconnect is retried at most every 2 s, so a member that comes back is used within seconds),
and keepalive pings find a member that went silent. aetcd 1.0 dials one ``host:port`` with an
insecure channel and takes no channel of ours, so ``_MemberSetClient`` overrides only its
``connect`` to set up this channel (and the same stubs); the pinned aetcd keeps it honest, and
the behaviour suite runs every call through it. Other asyncio clients were no better: aioetcd3
and aio-etcd are unmaintained, etcd3 needs the pure-Python protobuf. The target is
``ipv4:a:p,b:p`` (or ``ipv6:``) for IP members; a host name is resolved once at connect time,
except a single endpoint, which gRPC's DNS resolver keeps re-resolving: give one DNS name that
lists every member (a Kubernetes headless service) where member addresses change.

TLS and client certificates. etcd runs with ``--client-cert-auth`` and auth enabled
(``snapwake.etcdauth``): every service dials it over TLS with its own certificate, whose common
name (``role/name``) etcd takes as the user whose role limits it to its key prefixes. ``EtcdTls``
(the ``etcd_ca``/``etcd_cert``/``etcd_key`` config keys, ``snapwake.config.EtcdTlsConfig``) is
read and checked once at connect time and becomes the channel's ``grpc.ssl_channel_credentials``
for every member. Why wrap aetcd's channel set-up rather than change clients: the channel is
already ours (the member set above), so TLS is one more argument to it, and everything else
(the stubs, the watcher, the error types the ``_translated`` table maps, the behaviour suite
that pins them) stays as it is, while another client (the ones weighed above: aioetcd3 and
aio-etcd unmaintained, etcd3 blocking and on the pure-Python protobuf) would replace every call
to gain nothing etcd's TLS needs.
With several members the channel's one authority (``ipv4:a,b,c``) matches no certificate, so
the name checked for every member is ``etcd_server_name``, by default the first member's host:
give member certificates a common DNS name (or each the others' addresses) in that case.
Plaintext needs the explicit development flag ``etcd_plaintext``.

What a member without quorum does: it accepts the connection and lets calls wait; each call
then ends at our ``timeout`` as Unavailable, like an unreachable etcd. A request in flight when
etcd's raft leader dies is never answered either, even though the others elect a new leader
within a second or two, so requests that may run twice (reads, plain puts and deletes, lease
refreshes) are sent in attempts of a third of the bound (``_retried``); compare-and-swaps are
not. Holders of a lease never wait for etcd to say it is gone: ``LeaseKeeper`` tracks by this
process's own clock when the lease may have run out, see there.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
import ipaddress
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aetcd
import aetcd.exceptions as aetcd_errors
import aetcd.rpc
import aetcd.utils
import aetcd.watcher
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format
from google.protobuf.message import Message

from snapwake import errors
from snapwake.config import EtcdTlsConfig, parse_endpoints

__all__ = ["Entry", "Etcd", "EtcdAuthApi", "EtcdClient", "EtcdTls", "KeyPermission", "LeaseKeeper", "WatchEvent", "channel_target", "decode_value",
           "encode_value"]

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
    async def put_if_unchanged(self, key: str, value: Message, prefix: str, revision: int,
                               create: bool = False) -> bool:
        """Writes ``key`` only if no key under ``prefix`` was written since ``revision`` (the
        revision a ``list_at(prefix)`` returned) and, with ``create``, ``key`` does not exist;
        False when a compare failed. A check over what ``list_at`` read then holds when the
        write lands (a deleted key is not noticed: the caller counted it, which errs on the
        safe side for a limit). One transaction, sent once, like ``swap``."""

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
        detail = (f"no answer within {timeout:g}s (unreachable, or without quorum)" if isinstance(exc, TimeoutError)
                  else str(exc))
        raise _domain_class(exc)(f"{where}: {detail or type(exc).__name__}") from exc


# One channel to every member (see the module docstring). etcd refuses keepalive pings more
# often than every 5 s (its --grpc-keepalive-min-time) and pings without a call in flight.
_CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    # Not grpc.min_reconnect_backoff_ms: gRPC also takes it as the connect timeout.
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def channel_target(members: Sequence[tuple[str, int]]) -> str:
    """The gRPC target naming every member: ``host:port`` for one (DNS may list several), else
    ``ipv4:a:p,b:p`` or ``ipv6:[a]:p,...`` (IPv4 when both kinds are given). Members must be IP
    addresses here; ``Etcd.connect`` resolves names first."""
    if len(members) == 1:
        host, port = members[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ips = [(ipaddress.ip_address(host), port) for host, port in members]
    v4 = [f"{ip}:{port}" for ip, port in ips if ip.version == 4]
    if v4:
        return "ipv4:" + ",".join(v4)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in ips)


async def _resolved(members: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Every member as IP addresses (a name may stand for several); one member stays as given."""
    if len(members) == 1:
        return list(members)
    loop, out = asyncio.get_running_loop(), []
    for host, port in members:
        try:
            ipaddress.ip_address(host)
            out.append((host, port))
            continue
        except ValueError:
            pass
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        out.extend(dict.fromkeys((str(info[4][0]), port) for info in infos))
    return out


@dataclass(frozen=True)
class EtcdTls:
    """The etcd client's TLS files (PEM paths) and the name members' certificates are checked
    for (empty: the member's host; with several members, the first one's)."""

    ca: str
    cert: str
    key: str
    server_name: str = ""

    @classmethod
    def from_config(cls, cfg: EtcdTlsConfig) -> EtcdTls | None:
        """None where the config says plaintext (development only)."""
        if cfg.etcd_plaintext:
            return None
        return cls(cfg.etcd_ca, cfg.etcd_cert, cfg.etcd_key, cfg.etcd_server_name)

    def _read(self, key: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise errors.InvalidArgument(f"{key}: cannot read {path!r}: {exc.strerror or exc}", field=key) from exc

    def credentials(self) -> grpc.ChannelCredentials:
        """The files read and checked (InvalidArgument naming the key of one that is missing or
        no PEM of its kind), as gRPC channel credentials."""
        ca, cert, key = (self._read("etcd_ca", self.ca), self._read("etcd_cert", self.cert),
                         self._read("etcd_key", self.key))
        for name, path, data, parse in (("etcd_ca", self.ca, ca, x509.load_pem_x509_certificates),
                                        ("etcd_cert", self.cert, cert, x509.load_pem_x509_certificate)):
            try:
                parse(data)
            except ValueError as exc:
                raise errors.InvalidArgument(f"{name}: {path!r} is no PEM certificate", field=name) from exc
        try:
            serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise errors.InvalidArgument(f"etcd_key: {self.key!r} is no unencrypted PEM private key",
                                         field="etcd_key") from exc
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _MemberSetClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on our channel: every member, ``round_robin``, optional TLS credentials.
    Only ``connect`` differs from aetcd 1.0's, which dials one address without TLS."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None, timeout: int,
                 server_name: str = "") -> None:
        super().__init__(timeout=timeout)
        self._target, self._credentials, self._server_name = target, credentials, server_name

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = list(_CHANNEL_OPTIONS)
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        if self._credentials is not None:
            self.channel = grpc.aio.secure_channel(self._target, self._credentials, options)
        else:
            self.channel = grpc.aio.insecure_channel(self._target, options)
        rpc = aetcd.rpc
        self.kvstub, self.clusterstub = rpc.KVStub(self.channel), rpc.ClusterStub(self.channel)
        self.leasestub, self.maintenancestub = rpc.LeaseStub(self.channel), rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                              metadata=self.metadata)
        self._connected.set()


@dataclass(frozen=True)
class KeyPermission:
    """One permission of an etcd role: read, or read and write, on ``key`` or on ``[key,
    range_end)`` (a prefix)."""

    key: bytes
    range_end: bytes
    write: bool


class EtcdAuthApi:
    """etcd's Auth service (users, roles, their permissions, ``auth enable``) for the
    bootstrap in ``snapwake.etcdauth``: blocking calls to the first member over TLS (auth
    changes go through raft to every member), errors translated as every other etcd call.
    ``with EtcdAuthApi(endpoints, tls) as api: ...``."""

    def __init__(self, endpoints: str, tls: EtcdTls, timeout: float = 10.0) -> None:
        members = parse_endpoints(endpoints)
        options: list[tuple[str, str]] = []
        if tls.server_name or len(members) > 1:
            options.append(("grpc.ssl_target_name_override", tls.server_name or members[0][0]))
        self._where, self._timeout = f"etcd at {endpoints}", timeout
        self._channel = grpc.secure_channel(channel_target(members[:1]), tls.credentials(), options)
        self._auth = aetcd.rpc.AuthStub(self._channel)

    def __enter__(self) -> EtcdAuthApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def _call(self, what: str, method: Callable[..., T], request: object) -> T:
        with _translated(f"{self._where}: {what}", self._timeout):
            return method(request, timeout=self._timeout)

    def _add(self, what: str, method: Callable[..., object], request: object) -> bool:
        try:
            self._call(what, method, request)
        except errors.FailedPrecondition as exc:
            if "already exists" in exc.message:
                return False
            raise
        return True

    def add_role(self, role: str) -> bool:
        """Creates the role; False when it exists."""
        return self._add(f"add role {role}", self._auth.RoleAdd, aetcd.rpc.AuthRoleAddRequest(name=role))

    def add_user(self, user: str) -> bool:
        """Creates the user without a password (a client certificate names it); False when it exists."""
        request = aetcd.rpc.AuthUserAddRequest(name=user, options=aetcd.rpc.UserAddOptions(no_password=True))
        return self._add(f"add user {user}", self._auth.UserAdd, request)

    def permissions(self, role: str) -> builtins.list[KeyPermission]:
        got = self._call(f"get role {role}", self._auth.RoleGet, aetcd.rpc.AuthRoleGetRequest(role=role))
        return [KeyPermission(p.key, p.range_end, p.permType != aetcd.rpc.Permission.READ) for p in got.perm]

    def grant(self, role: str, perm: KeyPermission) -> None:
        kind = aetcd.rpc.Permission.READWRITE if perm.write else aetcd.rpc.Permission.READ
        request = aetcd.rpc.AuthRoleGrantPermissionRequest(
            name=role, perm=aetcd.rpc.Permission(permType=kind, key=perm.key, range_end=perm.range_end))
        self._call(f"grant {role} {perm.key!r}", self._auth.RoleGrantPermission, request)

    def revoke(self, role: str, perm: KeyPermission) -> None:
        request = aetcd.rpc.AuthRoleRevokePermissionRequest(role=role, key=perm.key, range_end=perm.range_end)
        self._call(f"revoke {role} {perm.key!r}", self._auth.RoleRevokePermission, request)

    def roles(self, user: str) -> builtins.list[str]:
        got = self._call(f"get user {user}", self._auth.UserGet, aetcd.rpc.AuthUserGetRequest(name=user))
        return list(got.roles)

    def grant_role(self, user: str, role: str) -> None:
        self._call(f"grant {user} role {role}", self._auth.UserGrantRole,
                   aetcd.rpc.AuthUserGrantRoleRequest(user=user, role=role))

    def revoke_role(self, user: str, role: str) -> None:
        self._call(f"revoke {user} role {role}", self._auth.UserRevokeRole,
                   aetcd.rpc.AuthUserRevokeRoleRequest(name=user, role=role))

    def enable(self) -> None:
        """Turns auth on (a no-op when it is on); etcd refuses without a root user."""
        self._call("auth enable", self._auth.AuthEnable, aetcd.rpc.AuthEnableRequest())


class Etcd(EtcdClient):
    """A connected etcd client. ``async with Etcd.connect("a:2379,b:2379,c:2379") as etcd: ...``."""

    def __init__(self, client: aetcd.Client, address: str, timeout: float) -> None:
        self._client, self._address, self._timeout = client, address, timeout

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, endpoints: str | Sequence[str], timeout: float = 5.0,
                      credentials: grpc.ChannelCredentials | None = None,
                      tls: EtcdTls | None = None) -> AsyncIterator[Etcd]:
        """Connects to the members ``endpoints`` names (``host:port`` each, or one string of
        them comma-separated) and checks that one answers (Unavailable if none does within
        ``timeout``); every later call is bounded by ``timeout`` too. ``tls`` (the files of a
        client certificate, read here) or ``credentials`` make the channel a secure one."""
        joined = endpoints if isinstance(endpoints, str) else ",".join(endpoints)
        where = f"etcd at {joined}"
        try:
            members = parse_endpoints(joined)
            with _translated(f"{where}: resolve", timeout):
                resolved = await asyncio.wait_for(_resolved(members), timeout)
                target = channel_target(resolved)
        except ValueError as exc:
            raise errors.InvalidArgument(f"{where}: {exc}", field="etcd") from exc
        server_name = ""
        if tls is not None:
            credentials = tls.credentials()
            server_name = tls.server_name or (members[0][0] if len(resolved) > 1 else "")
        client = _MemberSetClient(target, credentials, math.ceil(timeout), server_name)
        etcd = cls(client, joined, timeout)
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

    async def _retried(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """``_call`` for a request that may run twice (a read, a plain put or delete, a lease
        refresh or revoke): within the same bound, in attempts of a third of it, so a request
        lost with etcd's raft leader (it is never answered) goes again to a member that has a
        new leader; and once more after a refused connection (the member died under it), but
        not again: with every member refusing, the caller hears so at once. Compare-and-swaps
        are never sent twice: the first may have applied."""
        deadline, refused = time.monotonic() + self._timeout, False
        with self._translated(what):
            while True:
                left = deadline - time.monotonic()
                try:
                    return await asyncio.wait_for(make(), min(left, self._timeout / 3))
                except TimeoutError:
                    if deadline - time.monotonic() < _RETRY_PAUSE_S:
                        raise
                except aetcd_errors.ConnectionFailedError:
                    if refused or deadline - time.monotonic() < _RETRY_PAUSE_S:
                        raise
                    refused = True
                    await asyncio.sleep(_RETRY_PAUSE_S / 4)

    async def get(self, key: str, cls: type[M]) -> Entry | None:
        got = await self._retried(f"get {key}", lambda: self._client.get(key.encode()))
        if got is None:
            return None
        return Entry(key, decode_value(got.value, cls), got.mod_revision, got.lease)

    async def list_at(self, prefix: str, cls: type[M]) -> tuple[builtins.list[Entry], int]:
        result = await self._retried(f"list {prefix}", lambda: self._client.get_prefix(prefix.encode()))
        entries = [Entry(kv.key.decode(), decode_value(kv.value, cls), kv.mod_revision, kv.lease) for kv in result]
        return entries, int(result.header.revision)

    async def put(self, key: str, value: Message, lease: int | None = None) -> int:
        done = await self._retried(f"put {key}",
                                   lambda: self._client.put(key.encode(), encode_value(value), lease=lease or None))
        return int(done.header.revision)

    async def _txn(self, what: str, compare: object | builtins.list[object], success: builtins.list[object]) -> bool:
        compares = compare if isinstance(compare, builtins.list) else [compare]
        ok, _ = await self._call(what, self._client.transaction(compare=compares, success=success, failure=[]))
        return bool(ok)

    async def create(self, key: str, value: Message, lease: int | None = None) -> bool:
        tx = self._client.transactions
        return await self._txn(f"create {key}", tx.version(key.encode()) == 0,
                               [tx.put(key.encode(), encode_value(value), lease or None)])

    async def swap(self, key: str, value: Message, mod_revision: int, lease: int | None = None) -> bool:
        tx = self._client.transactions
        return await self._txn(f"swap {key}", tx.mod(key.encode()) == mod_revision,
                               [tx.put(key.encode(), encode_value(value), lease or None)])

    async def put_if_unchanged(self, key: str, value: Message, prefix: str, revision: int,
                               create: bool = False) -> bool:
        tx = self._client.transactions
        start = prefix.encode()
        # etcd compares every key in [start, end): all were last written at or before ``revision``.
        compare: builtins.list[object] = [tx.mod(start, aetcd.utils.prefix_range_end(start)) < revision + 1]
        if create:
            compare.append(tx.version(key.encode()) == 0)
        return await self._txn(f"put {key} unless {prefix}* changed", compare,
                               [tx.put(key.encode(), encode_value(value), None)])

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        if mod_revision is None:
            return bool(await self._retried(f"delete {key}", lambda: self._client.delete(key.encode())))
        tx = self._client.transactions
        return await self._txn(f"delete {key}", tx.mod(key.encode()) == mod_revision, [tx.delete(key.encode())])

    async def delete_prefix(self, prefix: str) -> int:
        done = await self._retried(f"delete {prefix}*", lambda: self._client.delete_prefix(prefix.encode()))
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
        reply = await self._retried(f"refresh lease {lease_id:x}", lambda: self._client.refresh_lease(lease_id))
        return max(0, int(reply.TTL)) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> bool:
        try:
            await self._retried(f"revoke lease {lease_id:x}", lambda: self._client.revoke_lease(lease_id))
        except errors.NotFound:  # expired or revoked already: its keys are gone, as asked
            return False
        return True


# A lease is taken as gone this share of its TTL before etcd could end it at the earliest:
# room for two hosts' clocks running at slightly different rates.
_SKEW = 0.1
# Pause between refresh attempts that failed at once (no member reachable).
_RETRY_PAUSE_S = 0.2


class LeaseKeeper:
    """Holds one etcd lease and refreshes it until stopped; keys put under it die with us.

    How long the lease may be relied on is decided by this process's own clock, never by an
    answer from etcd (a process cut off from etcd gets none): ``expires_at`` is the moment, on
    the monotonic ``clock``, at which etcd may have ended the lease at the earliest. That is
    when the last successful grant or refresh was *sent*, plus its TTL, less ``_SKEW`` of it;
    ``held()`` is true only before then, and every refresh is bounded by it.

    - When it passes without a successful refresh (etcd unreachable, or without quorum), or a
      refresh finds the lease gone, ``on_expired`` is awaited once: the holder stops acting on
      the lease (a scheduler leader steps down, a node fences itself).
    - Once etcd answers again, the keeper revokes the old lease (if etcd still had it, its keys
      go: they spoke for a holder that has stopped acting) and takes a new one, then awaits
      ``on_lost`` so the owner re-registers under it. If ``on_lost`` fails, the next tick does
      both again.
    """

    def __init__(self, etcd: EtcdClient, ttl: int, on_lost: Callable[[], Awaitable[None]] | None = None,
                 on_expired: Callable[[], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd, self.ttl, self.on_lost, self.on_expired, self.clock = etcd, ttl, on_lost, on_expired, clock
        self.lease_id: int = 0
        self.expires_at = -math.inf
        self._expired = False
        self._task: asyncio.Task[None] | None = None

    def held(self) -> bool:
        """Whether the lease is certainly still alive in etcd, by our clock."""
        return bool(self.lease_id) and not self._expired and self.clock() < self.expires_at

    def _granted(self, sent: float, ttl: int) -> None:
        self.expires_at = sent + ttl * (1 - _SKEW)

    async def start(self) -> int:
        sent = self.clock()
        self.lease_id = await self.etcd.grant_lease(self.ttl)
        self._granted(sent, self.ttl)
        self._task = asyncio.create_task(self._keepalive(), name="lease-keepalive")
        return self.lease_id

    def _pause(self) -> float:
        period = max(0.5, self.ttl / 3)
        return period if self._expired else max(0.0, min(period, self.expires_at - self.clock()))

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self._pause())
            if self._expired:
                await self._renew()
            else:
                await self._refresh()

    async def _refresh(self) -> None:
        """One refresh, retried in short attempts until it succeeds or the lease runs out: a
        keepalive sent as etcd's raft leader dies gets no answer at all, the next one sent to a
        member that has a new leader does (a refresh is idempotent)."""
        attempt_s = max(0.5, self.ttl / 4)
        while (left := self.expires_at - (sent := self.clock())) > 0:
            try:
                ttl = await asyncio.wait_for(self.etcd.refresh_lease(self.lease_id), min(left, attempt_s))
            except TimeoutError:
                log.warning("lease %x: no refresh answer within %.2fs; again", self.lease_id, min(left, attempt_s))
                continue
            except errors.SnapwakeError as exc:  # transient: again, while time is left
                log.warning("lease %x refresh failed: %s", self.lease_id, exc.message)
                await asyncio.sleep(min(_RETRY_PAUSE_S, max(0.0, self.expires_at - self.clock())))
                continue
            if ttl:
                self._granted(sent, ttl)
            else:
                await self._expire("etcd says it expired")
            return
        await self._expire(f"not refreshed within its {self.ttl}s TTL")

    async def _expire(self, why: str) -> None:
        self._expired = True
        log.warning("lease %x is gone (%s)", self.lease_id, why)
        if self.on_expired is not None:
            try:
                await self.on_expired()
            except errors.SnapwakeError as exc:
                log.warning("after losing lease %x: %s", self.lease_id, exc.message)

    async def _renew(self) -> None:
        old = self.lease_id
        try:
            if old:
                await self.etcd.revoke_lease(old)
            sent = self.clock()
            self.lease_id = await self.etcd.grant_lease(self.ttl)
        except errors.SnapwakeError as exc:
            log.info("no new lease yet: %s", exc.message)
            return
        self._expired = False
        self._granted(sent, self.ttl)
        log.warning("took a new lease %x", self.lease_id)
        if self.on_lost is not None:
            try:
                await self.on_lost()
            except errors.SnapwakeError as exc:  # again next tick, under yet another lease
                log.warning("re-registering under lease %x failed: %s", self.lease_id, exc.message)
                self._expired = True

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease_id:
            with contextlib.suppress(errors.SnapwakeError):
                await self.etcd.revoke_lease(self.lease_id)
