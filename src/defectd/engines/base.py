"""The engine contract every inference backend implements.

An engine takes a normalised batch ``(N, C, H, W) float32`` (see ``Normalisation.apply``)
and returns defect probabilities ``(N, K, H, W) float32`` in [0, 1], one channel per class
of the model card (``K = spec.outputs``, 1 for a one-class model), as a new array the
caller owns. ``N`` must lie in ``spec.min_batch .. spec.max_batch``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from defectd.engines.remote import TritonOptions
from defectd.errors import EngineError


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Input shape an engine accepts; height and width are fixed, batch is a range."""

    channels: int
    height: int
    width: int
    min_batch: int = 1
    max_batch: int = 16
    dtype: str = "float32"
    outputs: int = 1  # probability channels out: one per class of the card

    @property
    def chw(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one input image."""
        return (self.channels, self.height, self.width)

    def check(self, batch: NDArray[np.float32]) -> None:
        """Raise ``ValueError`` naming the mismatch when ``batch`` does not fit this spec."""
        if batch.dtype != np.float32:
            raise ValueError(f"batch dtype {batch.dtype}, engine expects float32")
        if batch.ndim != 4 or batch.shape[1:] != (self.channels, self.height, self.width):
            raise ValueError(
                f"batch shape {tuple(batch.shape)}, engine expects "
                f"(N, {self.channels}, {self.height}, {self.width})"
            )
        if not self.min_batch <= batch.shape[0] <= self.max_batch:
            raise ValueError(
                f"batch of {batch.shape[0]}, engine accepts {self.min_batch}..{self.max_batch}"
            )


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What ``open_engine`` hands a backend's open function (see ``engines.registry``).

    ``precision`` None means the card's; ``precisions`` are what this backend runs;
    ``expect`` is the caller's ``(channels, height, width)``; ``build_progress(phase, done,
    total)`` is called while a TensorRT plan is built; ``mode`` is ``throughput`` (parallel
    infer requests, see ``engine_concurrency``) or ``latency`` (one request on every core),
    for backends that have the choice; ``remote`` says where a server-side backend finds its
    server (``TritonOptions`` for ``triton``).
    """

    model_path: Path
    backend: str
    precisions: tuple[str, ...]
    precision: str | None = None
    min_batch: int = 1
    max_batch: int = 16
    threads: int | None = None
    cache_dir: Path | None = None
    opt_batch: int | None = None
    expect: tuple[int, int, int] | None = None
    build_progress: Callable[[str, int, int], None] | None = None
    mode: str = "throughput"
    remote: TritonOptions | None = None

    def check_precision(self, precision: str) -> None:
        """``EngineError`` naming what the backend runs when ``precision`` is not one of them."""
        if precision not in self.precisions:
            raise EngineError(
                f"{self.model_path}: {self.backend} runs {', '.join(self.precisions)}; "
                f"precision {precision} is not one of them"
            )


@runtime_checkable
class Engine(Protocol):
    """One loaded model on one runtime, ready to infer."""

    @property
    def name(self) -> str:
        """Backend and precision, e.g. ``openvino-int8``, ``ort-fp32``, ``tensorrt-fp16``."""
        ...

    @property
    def precision(self) -> str:
        """Arithmetic the engine computes in: ``fp32``, ``bf16``, ``fp16`` or ``int8``."""
        ...

    @property
    def version(self) -> str:
        """Version of the runtime library, e.g. ``2026.4.1``."""
        ...

    @property
    def spec(self) -> EngineSpec: ...

    @property
    def model_file(self) -> Path:
        """The file this engine executes: the ONNX model it opened (``model.int8.onnx`` for
        int8), the TensorRT plan, the ``.pt`` checkpoint. Verdicts name its sha256."""
        ...

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(N, C, H, W)`` normalised float32 -> ``(N, 1, H, W)`` probabilities, a new array.

        Raises ``EngineError`` when the runtime fails.
        """
        ...

    def close(self) -> None:
        """Release the runtime's resources; the engine cannot be used afterwards."""
        ...


class BackendEngine:
    """What the in-process backends share: ``name`` (``<backend>-<precision>``),
    ``precision``, ``spec``, and ``infer``, which checks the batch against the spec and hands a
    C-contiguous ``(N, C, H, W)`` float32 array to the backend's ``_run``."""

    backend = ""
    _spec: EngineSpec
    _precision: str

    @property
    def name(self) -> str:
        return f"{self.backend}-{self._precision}"

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def spec(self) -> EngineSpec:
        return self._spec

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(N, C, H, W)`` float32 -> ``(N, 1, H, W)`` float32 probabilities (new array).

        Raises ``ValueError`` for a batch outside the spec, ``EngineError`` if the run fails.
        """
        self._spec.check(batch)
        return self._run(np.ascontiguousarray(batch))

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        raise NotImplementedError


def engine_concurrency(engine: Engine) -> int:
    """How many ``infer`` calls ``engine`` runs in parallel: its ``concurrency`` attribute
    (OpenVINO in throughput mode: one per stream), else 1 (calls are serialised)."""
    value = getattr(engine, "concurrency", 1)
    return value if isinstance(value, int) and value >= 1 else 1
