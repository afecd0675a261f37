"""Camera sources: GenICam (harvesters), synthetic line, replay.

Build a station's sources with ``make_sources(configs, station)`` (its GenICam cameras then
share one producer hub) or one with ``make_source(config, station)`` (``sources.factory``);
the contract and the config models are in ``sources.base``, the threaded base class of the
backends in ``sources.threaded``.
"""

from defectd.pipeline.sources.base import (
    DeviceSelector,
    EventKind,
    GenICamSourceConfig,
    OnEvent,
    OnFrame,
    ReplaySourceConfig,
    Source,
    SourceConfig,
    SourceEvent,
    SourceHealth,
    SourceState,
    SyntheticSourceConfig,
    TriggeredSource,
)
from defectd.pipeline.sources.factory import make_source, make_sources

__all__ = [
    "DeviceSelector",
    "EventKind",
    "GenICamSourceConfig",
    "OnEvent",
    "OnFrame",
    "ReplaySourceConfig",
    "Source",
    "SourceConfig",
    "SourceEvent",
    "SourceHealth",
    "SourceState",
    "SyntheticSourceConfig",
    "TriggeredSource",
    "make_source",
    "make_sources",
]
