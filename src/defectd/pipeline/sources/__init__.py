"""Camera sources: GenICam (harvesters), synthetic line, replay.

Build one with ``make_source(config, station)``; the contract is in ``sources.base``.
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
    make_source,
)

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
    "make_source",
]
