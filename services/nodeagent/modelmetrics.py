"""The built-in model servers' metrics, scraped through the node's ``/metrics``.

A Prometheus collector on the node's registry: at each scrape it reads ``GET /metrics`` of every
running built-in instance on this node (through its endpoint, bounded by ``timeout``) and
re-exports the ``snapwake_model_*`` families with ``instance_id`` and ``function_id`` labels. An
instance that does not answer in time is left out of that scrape (and logged at debug level).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from snapwake.v1 import types_pb2

__all__ = ["ModelServerMetrics"]

log = logging.getLogger(__name__)

_SERVING = (types_pb2.INSTANCE_STATE_RUNNING, types_pb2.INSTANCE_STATE_IDLE)
_PREFIX = "snapwake_model_"


def _fetch(endpoint: str, timeout: float) -> str:
    return httpx.get(f"http://{endpoint}/metrics", timeout=timeout).text


class ModelServerMetrics(Collector):
    """``instances()`` gives ``types_pb2.Instance`` records of the node's built-in instances."""

    def __init__(self, instances: Callable[[], Iterable[types_pb2.Instance]], timeout: float = 1.0,
                 fetch: Callable[[str, float], str] = _fetch) -> None:
        self._instances, self._timeout, self._fetch = instances, timeout, fetch

    def collect(self) -> Iterator[Any]:
        families: dict[str, Any] = {}
        for inst in list(self._instances()):
            if inst.state not in _SERVING or not inst.endpoint:
                continue
            try:
                text = self._fetch(inst.endpoint, self._timeout)
            except (httpx.HTTPError, OSError) as exc:
                log.debug("no metrics from %s: %s", inst.id, exc)
                continue
            labels = {"instance_id": inst.id, "function_id": inst.function_id}
            for family in text_string_to_metric_families(text):
                if not family.name.startswith(_PREFIX):
                    continue
                samples = [Sample(s.name, {**s.labels, **labels}, s.value, s.timestamp, s.exemplar)
                           for s in family.samples]
                merged = families.setdefault(family.name, family)
                merged.samples = samples if merged is family else merged.samples + samples
        yield from families.values()
