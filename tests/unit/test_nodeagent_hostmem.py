"""The host memory rule for whole-process standbys (``services/nodeagent/hostmem.py``), as tables."""

from __future__ import annotations

import pytest

from services.nodeagent.hostmem import Held, HostMemoryFull, admit, measured, standby_need
from snapwake import errors

GIB = 1 << 30


@pytest.mark.parametrize(("rss", "pss", "want"), [
    (3 * GIB, 2 * GIB, 2 * GIB),  # PSS: shared library pages split among the processes
    (3 * GIB, 0, 3 * GIB),  # a kernel without smaps_rollup reports RSS alone
    (0, 0, 0),  # not measured yet
])
def test_an_instance_is_measured_by_its_pss(rss: int, pss: int, want: int) -> None:
    assert measured(rss, pss) == want


@pytest.mark.parametrize(("held", "want"), [
    (Held(2 * GIB), 2 * GIB),  # a serving instance, or an ARENA standby: what was measured
    (Held(2 * GIB, admitted=22 * GIB), 22 * GIB),  # a standby measured before its checkpoint
    (Held(23 * GIB, admitted=22 * GIB), 23 * GIB),  # measured since, and more than admitted
])
def test_a_standby_holds_at_least_what_it_was_admitted_with(held: Held, want: int) -> None:
    assert held.bytes == want


def test_a_standby_needs_its_gpu_slice_plus_its_rss() -> None:
    assert standby_need(20 * GIB, 2 * GIB) == 22 * GIB


@pytest.mark.parametrize(("need", "others", "host", "fraction", "ok"), [
    (22 * GIB, [], 64 * GIB, 0.8, True),
    (22 * GIB, [Held(GIB, 22 * GIB)], 64 * GIB, 0.8, True),  # 44 of 51.2 GiB
    (22 * GIB, [Held(GIB, 22 * GIB), Held(2 * GIB)], 64 * GIB, 0.8, True),  # 46 of 51.2
    (22 * GIB, [Held(GIB, 22 * GIB), Held(8 * GIB)], 64 * GIB, 0.8, False),  # 52 of 51.2
    (60 * GIB, [], 64 * GIB, 0.8, False),  # more than the share on its own
    (60 * GIB, [], 64 * GIB, 1.0, True),  # the whole host, when so configured
    (32 * GIB, [Held(32 * GIB)], 64 * GIB, 1.0, True),  # exactly the limit fits
    (500 * GIB, [Held(500 * GIB)], 0, 0.8, True),  # a node that does not know its memory admits all
])
def test_the_rule(need: int, others: list[Held], host: int, fraction: float, ok: bool) -> None:
    assert admit(need, others, host, fraction).ok is ok


def test_a_refusal_names_the_numbers() -> None:
    admission = admit(22 * GIB, [Held(GIB, 22 * GIB), Held(8 * GIB)], 64 * GIB, 0.8)
    assert (admission.committed, admission.limit) == (30 * GIB, int(64 * GIB * 0.8))
    assert admission.refusal("i-0123456789ab") == (
        "host memory: a standby of i-0123456789ab needs ~22.0 GiB, 30.0 GiB of 51.2 GiB committed "
        "(standby_host_memory_fraction 0.8 of 64.0 GiB)")
    assert issubclass(HostMemoryFull, errors.ResourceExhausted)  # RESOURCE_EXHAUSTED over gRPC
