"""The scheduler's Prometheus series: instances per function and state, from its etcd mirror,
and the instance records it does not believe (``ClusterState.why_not_believed``), by reason."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.scheduler.state import ClusterState
from snapwake import telemetry
from snapwake.v1.types_pb2 import Instance, InstanceState

__all__ = ["InstancesCollector", "count_instances"]

_PREFIX = "INSTANCE_STATE_"


def count_instances(instances: Iterable[Instance]) -> dict[tuple[str, str], int]:
    """(function id, state name without its prefix, e.g. RUNNING) -> how many instances."""
    return dict(Counter((i.function_id, InstanceState.Name(i.state).removeprefix(_PREFIX)) for i in instances))


class InstancesCollector(Collector):
    """``snapwake_instances{function,state}``, read from the mirror at scrape time (every process
    mirrors etcd, so followers report the same numbers as the leader)."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # read only at scrape time

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        family = GaugeMetricFamily(telemetry.INSTANCES, "Instances per function and lifecycle state.",
                                   labels=["function", "state"])
        # Scrapes run on the metrics server's thread: copy the mirror in one C-level step
        # (atomic under the GIL) instead of iterating it while the event loop applies events.
        held = list(self.state.mirrors["instances"].items.values())
        for (function_id, state), n in sorted(count_instances(m for m, _ in held).items()):
            family.add_metric([function_id, state], n)
        yield family
        ignored = CounterMetricFamily(
            "snapwake_scheduler_ignored_instance_records",
            "Instance records not believed: misplaced (not at their node's key), unknown (never asked "
            "of that node), mismatch (another function, revision or node than asked).", labels=["reason"])
        for reason, n in sorted(dict(self.state.ignored_records()).items()):
            ignored.add_metric([reason], n)
        yield ignored
