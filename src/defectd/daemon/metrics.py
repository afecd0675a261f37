"""The daemon's metrics on ``prometheus_client``, behind the small keyword-label API it uses.

``Registry`` owns one ``prometheus_client.CollectorRegistry``; its counters, gauges and
histograms are the library's own, so the library does the locking, the buckets and the text
exposition (format 0.0.4, the one ``/metrics`` has always served). What this module adds:

- labels as keywords (``verdicts.inc(camera="cam0", verdict="fail")``), checked against the
  declared names with an error that names the metric;
- ``Counter.set_total`` to mirror a total that another component counts (the library's counters
  only go up by increments, so the mirror adds the difference);
- ``value()``/``count()`` reads, for tests and the operator view;
- collectors that refresh mirrored gauges just before each scrape, so the hot path never pays
  for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

import prometheus_client
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from defectd.log import get_logger

log = get_logger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Milliseconds: a CPU station runs tens of ms per stage, an overloaded one seconds.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
)  # fmt: skip

LabelValues = tuple[str, ...]

# The ``*_created`` series are OpenMetrics extras the station's dashboards never had; the
# library switches them off only for the whole process.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class _Metric:
    def __init__(self, name: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"metric {self.name} takes labels {self.labelnames}, got {tuple(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)


def _sample(
    metric: prometheus_client.metrics.MetricWrapperBase,
    sample_name: str,
    names: Sequence[str],
    key: LabelValues,
) -> float | None:
    wanted = dict(zip(names, key, strict=True))
    for family in metric.collect():
        for s in family.samples:
            if s.name == sample_name and s.labels == wanted:
                return float(s.value)
    return None


class Counter(_Metric):
    """A value that only goes up; ``name`` ends in ``_total`` as it is exposed."""

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str], registry: Registry
    ) -> None:
        super().__init__(name, labelnames)
        self._prom = prometheus_client.Counter(
            name, help_text, self.labelnames, registry=registry.prometheus
        )
        self._mirrored: dict[LabelValues, float] = {}
        self._lock = threading.Lock()

    def _child(self, key: LabelValues) -> prometheus_client.Counter:
        return self._prom.labels(*key) if key else self._prom

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter cannot go down")
        self._child(self._key(labels)).inc(amount)

    def set_total(self, total: float, **labels: str) -> None:
        """Mirror a total counted elsewhere (e.g. a component's own ``stats()``); a smaller
        total than the last one (the component restarted) leaves the counter where it is."""
        key = self._key(labels)
        with self._lock:
            last = self._mirrored.get(key, 0.0)
            if total <= last:
                return
            self._mirrored[key] = total
        self._child(key).inc(total - last)

    def value(self, **labels: str) -> float:
        found = _sample(self._prom, self.name, self.labelnames, self._key(labels))
        return 0.0 if found is None else found


class Gauge(_Metric):
    """A value that goes up and down; ``clear()`` forgets label sets that no longer exist."""

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str], registry: Registry
    ) -> None:
        super().__init__(name, labelnames)
        self._prom = prometheus_client.Gauge(
            name, help_text, self.labelnames, registry=registry.prometheus
        )

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        (self._prom.labels(*key) if key else self._prom).set(float(value))

    def clear(self) -> None:
        if self.labelnames:
            self._prom.clear()

    def value(self, **labels: str) -> float | None:
        return _sample(self._prom, self.name, self.labelnames, self._key(labels))


class Histogram(_Metric):
    """Cumulative buckets with ``_bucket{le=...}``, ``_sum`` and ``_count`` series."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str],
        registry: Registry,
        buckets: Iterable[float] = LATENCY_BUCKETS_MS,
    ) -> None:
        super().__init__(name, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets))
        if not bounds:
            raise ValueError(f"histogram {name} needs at least one bucket")
        self._prom = prometheus_client.Histogram(
            name, help_text, self.labelnames, registry=registry.prometheus, buckets=bounds
        )

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        (self._prom.labels(*key) if key else self._prom).observe(value)

    def count(self, **labels: str) -> int:
        found = _sample(self._prom, f"{self.name}_count", self.labelnames, self._key(labels))
        return 0 if found is None else int(found)


class Registry:
    """The metrics of one daemon and the collectors that refresh mirrored values."""

    def __init__(self) -> None:
        self.prometheus = prometheus_client.CollectorRegistry(auto_describe=True)
        self._collectors: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        """Raises ``ValueError`` when ``name`` is registered already."""
        return Counter(name, help_text, labelnames, self)

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return Gauge(name, help_text, labelnames, self)

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS_MS,
    ) -> Histogram:
        return Histogram(name, help_text, labelnames, self, buckets)

    def add_collector(self, collect: Callable[[], None]) -> None:
        """``collect()`` runs before every render to refresh gauges from live components."""
        with self._lock:
            self._collectors.append(collect)

    def refresh(self) -> None:
        """Run the collectors; a failing one leaves its gauges at their last values."""
        with self._lock:
            collectors = list(self._collectors)
        for collect in collectors:
            try:
                collect()
            except Exception as exc:  # a scrape must not fail because one component did
                log.warning("metrics_collector_failed", error=repr(exc))

    def render(self) -> str:
        """The whole exposition in the Prometheus text format 0.0.4 (``CONTENT_TYPE``)."""
        self.refresh()
        return generate_latest(self.prometheus).decode()
