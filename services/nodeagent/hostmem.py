"""Host memory on one node: what its instances hold, and whether it has room for one more
whole-process standby (pure; ``NodeAgent.admit_standby`` feeds it and acts on the answer).

A PROCESS-mode standby (and any user image's, which is always checkpointed whole) is made by a
driver checkpoint that copies every byte of GPU memory its process uses into that process's host
memory, where its container's memory cgroup is charged for it (``container.container_limits``
gives the container room for its GPU slice). So it holds about its model's size in host memory
for as long as it waits, where a built-in ARENA standby holds its CPU state only (~1-2 GB; its
weights wait in the blobstore). A node that parked such standbys without counting them would end
in swap or the OOM killer. Before every driver checkpoint that makes one (a new standby, or an
idle instance parked), the node checks::

    committed + need <= host_memory * standby_host_memory_fraction

- ``need``: the new standby's estimate, its GPU slice (an upper bound on what the checkpoint
  moves) plus its container's host RSS now (RSS counts shared pages in full: an upper bound too);
- ``committed``: the sum over the node's other live instances of what each holds (``Held``): its
  measured PSS (RSS where the kernel reports no PSS), and for a whole-process standby at least
  the ``need`` it was admitted with. The reconcile loop measures a checkpointed process a pass
  later, and only the container's first process, so the admitted number is the floor until it
  is restored; it also counts from the admission on, so two parks at once cannot both take the
  last room;
- a cold standby (paged out to swap, ``coldstandby``) is counted at the PSS its container keeps
  resident, re-read after the page-out: its ``admitted`` is replaced by that number;
- ``standby_host_memory_fraction`` (default 0.8): the rest of the host is left to the kernel,
  the nodeagent, the blobstore and its cache (lower it when the blobstore's ``cache_bytes`` is a
  large share of the host).

ARENA standbys are not held to the rule (the model server releases its weights before their
checkpoint, so it moves a bare CUDA context), but they count in ``committed`` with their measured
size, as every live instance does. A node that does not know its host memory (0) admits all.

A refusal is ``HostMemoryFull`` (RESOURCE_EXHAUSTED) with ``Admission.refusal``'s message. Nothing
was done to the instance yet: a park refused leaves it IDLE; a new standby's start is refused
before its container starts, or, when only the measured RSS tips it over, ends (ENDED, not
FAILED, so the scheduler counts no crash).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from snapwake import errors

__all__ = ["Admission", "Held", "HostMemoryFull", "admit", "measured", "standby_need"]

_GIB = float(1 << 30)


class HostMemoryFull(errors.ResourceExhausted):
    """The node has no host memory for another whole-process standby now (see module docstring)."""


@dataclass(frozen=True)
class Held:
    """What one live instance holds in host memory, in bytes."""

    # Its PSS as last measured (``measured``), 0 before the first measurement.
    measured: int
    # The ``need`` it was admitted with as a whole-process standby; 0 when it is none.
    admitted: int = 0

    @property
    def bytes(self) -> int:
        return max(self.measured, self.admitted)


def measured(rss: int, pss: int) -> int:
    """An instance's measured host memory: PSS, whose sum over processes is what they hold
    together (shared library pages split among them); RSS on kernels that report no PSS."""
    return pss or rss


def standby_need(gpu_slice: int, rss: int) -> int:
    """The estimate for a new whole-process standby: its GPU slice plus its host RSS now."""
    return gpu_slice + rss


@dataclass(frozen=True)
class Admission:
    """The rule's numbers for one standby, and its answer."""

    need: int
    committed: int
    host_memory: int
    fraction: float

    @property
    def limit(self) -> int:
        """The bytes the node's instances may hold together."""
        return int(self.host_memory * self.fraction)

    @property
    def ok(self) -> bool:
        """Whether the standby may be made (always, on a node that does not know its memory)."""
        return self.host_memory <= 0 or self.committed + self.need <= self.limit

    def refusal(self, instance_id: str) -> str:
        """Why a standby of ``instance_id`` is refused, with the numbers."""
        return (f"host memory: a standby of {instance_id} needs ~{self.need / _GIB:.1f} GiB, "
                f"{self.committed / _GIB:.1f} GiB of {self.limit / _GIB:.1f} GiB committed "
                f"(standby_host_memory_fraction {self.fraction:g} of {self.host_memory / _GIB:.1f} GiB)")


def admit(need: int, others: Iterable[Held], host_memory: int, fraction: float) -> Admission:
    """The rule for a standby needing ``need`` bytes beside the live instances ``others``."""
    return Admission(need, sum(h.bytes for h in others), host_memory, fraction)
