"""A simulated production line: rendered parts, some defective, with their ground truth.

Each frame carries the truth the renderer drew, so the whole daemon can be checked end to end:
``meta["truth_mask"]`` ``(H, W)`` uint8 {0, 1}, ``meta["truth_defective"]`` bool,
``meta["truth_kinds"]`` tuple of defect kinds, ``meta["surface"]``. The line is a pure
function of ``seed``: the n-th part is the same on every run and machine.
"""

from __future__ import annotations

import time

import numpy as np

from defectd.errors import CameraError
from defectd.pipeline.sources._runner import Pacer, ThreadedSource
from defectd.pipeline.sources.base import EventKind, SourceState, SyntheticSourceConfig
from defectd.training.synth import SURFACES, PartRenderer


class SyntheticSource(ThreadedSource):
    """Renders ``config.count`` parts (or endlessly) at ``config.rate_hz`` (or unthrottled).

    Unthrottled, ``on_frame`` may block: the line then runs exactly as fast as its consumer.
    Frames are ``(H, W)`` uint8 (pixel format ``Mono8``) or ``(H, W, 3)`` uint8 RGB
    (``RGB8``); ``part_id`` is ``<camera>-<n>`` with ``n`` counting from 0.
    """

    def __init__(self, config: SyntheticSourceConfig, station: str) -> None:
        super().__init__(config.camera, station, "synthetic")
        self.config = config
        self._renderer: PartRenderer | None = None

    def _open(self) -> None:
        cfg = self.config
        unknown = [s for s in cfg.surfaces if s not in SURFACES]
        if unknown:
            raise CameraError(
                f"camera {self.camera!r}: surfaces: unknown {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(SURFACES)}"
            )
        renderer = PartRenderer(cfg.height, cfg.width, cfg.channels)
        # Render the texture banks now, so the first parts come at the line's rate.
        warm = np.random.default_rng(0)
        for surface in cfg.surfaces or SURFACES:
            renderer.render(warm, surface=surface, defect_prob=0.0)
        self._renderer = renderer
        self._set_state(SourceState.STREAMING)

    def _run(self) -> None:
        cfg = self.config
        renderer = self._renderer
        assert renderer is not None
        rng = np.random.default_rng(cfg.seed)
        surfaces = cfg.surfaces or None
        pixel_format = "Mono8" if cfg.channels == 1 else "RGB8"
        pacer = Pacer(cfg.rate_hz, self._stopping)
        n = 0
        while cfg.count is None or n < cfg.count:
            if not pacer.wait():
                return
            surface = None if surfaces is None else surfaces[int(rng.integers(len(surfaces)))]
            part = renderer.render(rng, surface=surface, defect_prob=cfg.defect_rate)
            self._emit_frame(
                part.image,
                t_host_ns=time.monotonic_ns(),
                t_wall=time.time(),
                pixel_format=pixel_format,
                part_id=f"{self.camera}-{n}",
                meta={
                    "truth_mask": part.mask,
                    "truth_defective": bool(part.defects),
                    "truth_kinds": part.defects,
                    "surface": part.surface,
                },
            )
            n += 1
        self._set_state(SourceState.STOPPED, f"rendered {n} parts")
        self._emit_event(EventKind.END_OF_STREAM, f"rendered {n} parts", parts=n)
