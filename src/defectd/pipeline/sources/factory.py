"""Building a station's camera sources from their configs (the contract is in ``base``).

``make_sources`` gives a station's GenICam cameras one shared producer hub; each backend
module is imported only when a source of its type is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from defectd.pipeline.sources.base import (
    GenICamSourceConfig,
    Source,
    SourceConfig,
    SyntheticSourceConfig,
)

if TYPE_CHECKING:
    from defectd.pipeline.sources.gentl import GenTLHub


def make_source(config: SourceConfig, station: str, *, hub: GenTLHub | None = None) -> Source:
    """Build the source ``config`` describes; nothing is opened before ``start``.

    ``hub`` is the one ``GenTLHub`` a station shares between its GenICam cameras (a producer
    can be loaded only once per process); without it each GenICam source loads its own.
    """
    # Imported on use: a station without GenICam cameras never loads harvesters/genicam,
    # and one without a synthetic line never loads the renderer.
    if isinstance(config, GenICamSourceConfig):
        from defectd.pipeline.sources.genicam import GenICamSource  # noqa: PLC0415

        return GenICamSource(config, station, hub=hub)
    if isinstance(config, SyntheticSourceConfig):
        from defectd.pipeline.sources.synthetic import SyntheticSource  # noqa: PLC0415

        return SyntheticSource(config, station)
    from defectd.pipeline.sources.replay import ReplaySource  # noqa: PLC0415

    return ReplaySource(config, station)


def make_sources(configs: Sequence[SourceConfig], station: str) -> list[Source]:
    """Build every source of a station, in order; its GenICam cameras share one hub.

    The hub loads the union of their producers when the first camera starts and unloads them
    when the last one stops. Raises ``CameraError`` for a producer file that does not exist.
    """
    genicam = [c for c in configs if isinstance(c, GenICamSourceConfig)]
    hub = None
    if len(genicam) > 1:
        from defectd.pipeline.sources.gentl import GenTLHub, resolve_producers  # noqa: PLC0415

        producers: dict[Path, None] = {}  # ordered union
        for c in genicam:
            producers.update(dict.fromkeys(resolve_producers(c.producers, camera=c.camera)))
        hub = GenTLHub(tuple(producers), close_when_unused=True)
    return [make_source(c, station, hub=hub) for c in configs]
