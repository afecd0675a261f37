"""Torch eager reference engine: the trained module as it is, used for parity and baselines."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from defectd.engines.base import EngineSpec, OpenRequest
from defectd.engines.model_file import check_expected, make_spec
from defectd.errors import EngineError
from defectd.log import get_logger
from defectd.model.card import ModelCard
from defectd.model.checkpoint import load_checkpoint
from defectd.model.ensemble import members_of
from defectd.model.export import probability_module
from defectd.model.unet import UNet

log = get_logger(__name__)


class TorchEngine:
    """U-Net + sigmoid in torch eager mode, fp32 on CPU (several U-Nets: their mean probability).

    ``threads`` sets torch's intra-op thread count, which is per process in torch: the last
    engine opened with ``threads`` wins. Safe to call from several threads (calls serialise).
    """

    def __init__(
        self,
        net: UNet | Sequence[UNet],
        card: ModelCard,
        spec: EngineSpec,
        *,
        threads: int | None = None,
        source: Path | None = None,
    ) -> None:
        for member in members_of(net):
            if member.config.in_channels != spec.channels:
                raise EngineError(
                    f"U-Net takes {member.config.in_channels} channel(s), card says {spec.channels}"
                )
        if threads is not None:
            torch.set_num_threads(threads)
        self._module: torch.nn.Module | None = probability_module(net).eval()
        self._card = card
        self._spec = spec
        self._source = source or Path(f"{card.name}.pt")  # an in-memory net: its nominal file
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, path: Path, spec: EngineSpec, *, threads: int | None = None
    ) -> TorchEngine:
        net, card = load_checkpoint(path)
        return cls(net, card, spec, threads=threads, source=path)

    @property
    def name(self) -> str:
        return "torch-fp32"

    @property
    def precision(self) -> str:
        return "fp32"

    @property
    def version(self) -> str:
        return str(torch.__version__)

    @property
    def spec(self) -> EngineSpec:
        return self._spec

    @property
    def model_file(self) -> Path:
        return self._source

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(N, C, H, W)`` float32 -> ``(N, 1, H, W)`` float32 probabilities (new array)."""
        self._spec.check(batch)
        with self._lock:
            if self._module is None:
                raise EngineError("torch engine is closed")
            try:
                with torch.inference_mode():
                    out = self._module(torch.from_numpy(np.ascontiguousarray(batch)))
            except RuntimeError as exc:
                raise EngineError(f"torch inference failed: {exc}") from exc
        result: NDArray[np.float32] = out.numpy()
        return result

    def close(self) -> None:
        with self._lock:
            self._module = None


def open_request(request: OpenRequest) -> TorchEngine:
    """The registry's entry point: a ``.pt`` checkpoint in torch eager fp32 (the reference)."""
    net, card = load_checkpoint(request.model_path)
    check_expected(request.model_path, card, request.expect)
    request.check_precision(request.precision or "fp32")
    spec = make_spec(request.model_path, card, None, request.min_batch, request.max_batch)
    return TorchEngine(net, card, spec, threads=request.threads, source=request.model_path)
