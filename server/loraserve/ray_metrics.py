"""A Ray Serve replica's metrics, pushed to Ray's metrics agent so that Prometheus sees them.

Under Ray nothing scrapes a replica's own registry (`metrics.Metrics`): its process has no
metrics port, and several replicas share a node. `RegistryMirror` reads the registry the way a
scrape does and sets one Ray Serve gauge per series name to each sample's value; Ray's agent on
each node exports them with Ray's `ray_` prefix and the tags Serve adds (`deployment`,
`replica`, `application`) beside the series' own labels. `push_forever` repeats that while the
replica lives.

Gauges, not Ray's Counter and Histogram: those take events, the registry holds totals. A gauge
carrying a counter's `_total` or a histogram's `_bucket`, `_sum` and `_count` holds exactly the
plain server's values, and PromQL's `rate`, `increase` and `histogram_quantile` read it as they
read them. Left out: `_created` samples (prometheus_client's start times, not values) and names
Ray cannot export (the `vllm:*` gateway family: gateways read it from pods, not through Ray).

Knows nothing about what the metrics mean, or about the engine: it copies samples.
"""

from __future__ import annotations

import asyncio
import logging
import re

from prometheus_client import CollectorRegistry
from ray.serve.metrics import Gauge

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 1.0  # a push costs about 1 ms; Ray's agent exports at its own interval (10 s)
_EXPORTABLE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # Ray warns on ':' and drops the rest
_WITH_START_TIMES = frozenset({"counter", "histogram", "summary"})


class RegistryMirror:
    """Copies every exportable sample of `registry` into a Ray Serve gauge of the same name
    (see the module doc), made the first time the name is seen."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._gauges: dict[str, Gauge] = {}

    def push(self) -> None:
        """Set each exportable sample's gauge to its value now."""
        for family in self._registry.collect():
            start_times = family.name + "_created"
            for sample in family.samples:
                if family.type in _WITH_START_TIMES and sample.name == start_times:
                    continue
                if not _EXPORTABLE.match(sample.name):
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    keys = tuple(sorted(sample.labels))
                    # Ray annotates tag_keys as a tuple of one string; it takes any number
                    gauge = Gauge(sample.name, family.documentation, tag_keys=keys)  # type: ignore[arg-type]
                    self._gauges[sample.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))


async def push_forever(mirror: RegistryMirror, interval_s: float = PUSH_INTERVAL_S) -> None:
    """`mirror.push()` every `interval_s` until cancelled. A failure is logged once, when
    pushes start failing, and the next push tries again: metrics never end a replica."""
    failing = False
    while True:
        try:
            mirror.push()
            failing = False
        except Exception:
            if not failing:
                log.exception("pushing the replica's metrics to Ray failed; retrying each push")
            failing = True
        await asyncio.sleep(interval_s)
