"""Per-tenant quotas: functions, standbys, snapshot bytes and GPU memory (pure).

Limits are the scheduler's configured defaults (``quota_*``), overridden per tenant by a
``TenantQuota`` an operator stores with SetTenantQuota (etcd, ``/snapwake/access/quotas/``, so
every replica sees the same limits and a change needs no restart). 0 means no limit.

Where each is enforced:

- functions: CreateFunction;
- standbys: CreateFunction/UpdateFunction refuse a ``standby_per_node`` above the limit; the
  controller starts no standby, and the starter parks no idle instance, while the tenant holds
  as many as the limit;
- snapshot bytes: CreateFunction/UpdateFunction of a revision that needs a snapshot are refused
  while the tenant's snapshots already fill the limit (a snapshot's size is known only once
  built, so one build may pass the limit; the next revision is refused);
- GPU memory: CreateFunction/UpdateFunction refuse a function whose one instance, or whose
  ``min_instances`` together with the tenant's other functions' minimums, exceeds the limit;
  the starter refuses any start or restore that would take the slices the tenant's instances
  hold (or are being given) past it. A claim then fails RESOURCE_EXHAUSTED (429 at the
  gateway) instead of filling a node.

Every refusal is ``errors.ResourceExhausted`` naming the quota, the tenant, the limit and the
current use.

The admin checks and their write are one: CreateFunction and UpdateFunction read the tenant's
functions (``list_at``), check, and write the function in an etcd transaction that holds only
if no function of the tenant was written since that read (``EtcdClient.put_if_unchanged``).
Two calls racing at a limit cannot both pass: the loser's transaction fails, it reads again
(``write_checked``) and is refused with the quota named. A conflict that leaves room (another
function of the tenant changed its state, or another call created one below the limit) is
retried, at most ``ATTEMPTS`` times (then ABORTED). Without any limit for the tenant, the write
compares only its own key, as no check depends on the others. Snapshot bytes are read beside that transaction, as their limit is approximate
anyway (above). The runtime checks run on the leader alone and read the mirror plus the
starts in flight, so a tenant's own concurrent starts are counted; the starter checks GPU
memory again once a start is placed (placing may wait on an eviction, while another start
goes ahead), with no wait between that check and the start being counted.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields
from typing import TypeVar

from snapwake import errors
from snapwake.lifecycle import CLAIMS_GPU
from snapwake.v1.scheduler_pb2 import TenantQuota, TenantUsage
from snapwake.v1.types_pb2 import Function, Instance, InstanceState, Snapshot

__all__ = ["ATTEMPTS", "MAX_PAUSE_S", "PAUSE_S", "Limits", "Quotas", "Usage", "check", "check_spec", "limits_for", "tenant_of", "usage",
           "write_checked"]

T = TypeVar("T")
# How many times a checked write is tried. Each lost transaction means another write of the
# tenant's functions landed, so this bounds how many such writes may race one call.
ATTEMPTS = 32
PAUSE_S, MAX_PAUSE_S = 0.002, 0.05


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; 0 is no limit. Field names match ``TenantQuota``'s ``max_*``."""

    functions: int = 0
    standbys: int = 0
    snapshot_bytes: int = 0
    gpu_memory_bytes: int = 0

    def to_proto(self, tenant: str) -> TenantQuota:
        return TenantQuota(tenant=tenant, **{f"max_{f.name}": getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class Usage:
    """What a tenant holds now, counted as the limits count it."""

    functions: int = 0
    standbys: int = 0
    snapshot_bytes: int = 0
    gpu_memory_bytes: int = 0

    def to_proto(self) -> TenantUsage:
        return TenantUsage(**{f.name: getattr(self, f.name) for f in fields(self)})


def tenant_of(function_id: str) -> str:
    return function_id.partition("/")[0]


def limits_for(defaults: Limits, override: TenantQuota | None) -> Limits:
    """The defaults with every field the override sets replaced."""
    if override is None:
        return defaults
    return Limits(**{f.name: getattr(override, f"max_{f.name}") if override.HasField(f"max_{f.name}")
                     else getattr(defaults, f.name) for f in fields(Limits)})


def gpu_bytes(inst: Instance) -> int:
    """The GPU memory ``inst`` holds or is being given."""
    return inst.gpu_memory_bytes if inst.state in CLAIMS_GPU else 0


def usage(tenant: str, functions: Iterable[Function], instances: Iterable[Instance],
          snapshots: Iterable[Snapshot]) -> Usage:
    mine = [i for i in instances if tenant_of(i.function_id) == tenant]
    return Usage(
        functions=sum(1 for f in functions if tenant_of(f.id) == tenant),
        standbys=sum(1 for i in mine if i.state == InstanceState.INSTANCE_STATE_STANDBY),
        snapshot_bytes=sum(s.total_bytes for s in snapshots if tenant_of(s.function_id) == tenant),
        gpu_memory_bytes=sum(gpu_bytes(i) for i in mine))


_UNITS = {"snapshot_bytes": "bytes", "gpu_memory_bytes": "bytes"}


def check(name: str, tenant: str, limit: int, used: int, adding: int) -> None:
    """ResourceExhausted unless ``used + adding`` fits ``limit`` (0: no limit)."""
    if limit and used + adding > limit:
        unit = _UNITS.get(name, "")
        raise errors.ResourceExhausted(
            f"quota {name} of tenant {tenant} exceeded: limit {limit}{' ' + unit if unit else ''}, "
            f"in use {used}, this needs {adding} more")


def check_spec(fn: Function, limits: Limits, use: Usage, others: Iterable[Function], needs_snapshot: bool,
               creating: bool) -> None:
    """The checks of CreateFunction (``creating``) and UpdateFunction for ``fn``'s new spec;
    ``others`` are the tenant's other functions."""
    tenant = tenant_of(fn.id)
    if creating:
        check("functions", tenant, limits.functions, use.functions, 1)
    check("standbys", tenant, limits.standbys, 0, fn.spec.policy.standby_per_node)
    if needs_snapshot and limits.snapshot_bytes and use.snapshot_bytes >= limits.snapshot_bytes:
        check("snapshot_bytes", tenant, limits.snapshot_bytes, use.snapshot_bytes, 1)
    per_instance = fn.spec.resources.gpu_count * fn.spec.resources.gpu_memory_bytes
    if per_instance:
        committed = sum(f.spec.policy.min_instances * f.spec.resources.gpu_count * f.spec.resources.gpu_memory_bytes
                        for f in others if f.id != fn.id)
        check("gpu_memory_bytes", tenant, limits.gpu_memory_bytes, committed,
              max(1, fn.spec.policy.min_instances) * per_instance)


async def write_checked(what: str, attempt: Callable[[], Awaitable[tuple[T, bool]]], attempts: int = ATTEMPTS,
                        pause_s: float = PAUSE_S) -> T:
    """Runs ``attempt`` (read, check the quotas, write in a transaction conditional on that read;
    it returns what it wrote and whether the write landed) until a write lands. A refusal from a
    check propagates; a lost transaction means another write landed since the read, so the
    checks run again on a fresh read, after a random pause of up to ``pause_s`` times the
    attempt (capped at ``MAX_PAUSE_S``) that spreads the racers out. Aborted after ``attempts``
    lost transactions."""
    for n in range(1, attempts + 1):
        value, written = await attempt()
        if written:
            return value
        await asyncio.sleep(random.uniform(0, min(MAX_PAUSE_S, pause_s * n)))
    raise errors.Aborted(f"{what}: changed concurrently {attempts} times while its quotas were checked; try again")


class Quotas:
    """Each tenant's limits: ``defaults`` and the overrides ``override(tenant)`` finds."""

    def __init__(self, defaults: Limits, override: Callable[[str], TenantQuota | None] = lambda _: None) -> None:
        self.defaults, self.override = defaults, override

    def limits(self, tenant: str) -> Limits:
        return limits_for(self.defaults, self.override(tenant))
