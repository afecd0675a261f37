"""OpenVINO engine: the CPU default. fp32 or bf16 from the fp32 ONNX, INT8 from a QDQ ONNX.

The inference precision is always pinned (``INFERENCE_PRECISION_HINT``): OpenVINO would
otherwise pick bf16 by itself on CPUs with AMX, and results would silently change with the
machine. For a QDQ model the quantised convolutions run in int8 and the few operators left
in float run in f32. The model is reshaped to the engine's batch range (one compiled model
serves every batch size) and one infer request is created up front.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
from numpy.typing import NDArray

from defectd.engines.base import EngineSpec
from defectd.engines.model_file import OnnxIO
from defectd.errors import EngineError, ModelError
from defectd.log import get_logger

log = get_logger(__name__)

# precision asked for -> (OpenVINO inference precision, CPU capability it needs)
_PRECISIONS: dict[str, tuple[ov.Type, str]] = {
    "fp32": (ov.Type.f32, "FP32"),
    "bf16": (ov.Type.bf16, "BF16"),
    "int8": (ov.Type.f32, "INT8"),
}
PRECISIONS = tuple(_PRECISIONS)


def cpu_capabilities(core: ov.Core | None = None) -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU, e.g. ``["FP32", "BF16", "INT8"]``."""
    core = core or ov.Core()
    caps: list[str] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return caps


class OpenVinoEngine:
    """One compiled OpenVINO model on the CPU. Calls are serialised by a lock."""

    def __init__(
        self,
        model_path: Path,
        io: OnnxIO,
        spec: EngineSpec,
        *,
        precision: str,
        threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        if precision not in _PRECISIONS:
            raise EngineError(
                f"{model_path}: OpenVINO runs {', '.join(PRECISIONS)}; asked for {precision}"
            )
        ov_type, capability = _PRECISIONS[precision]
        core = ov.Core()
        caps = cpu_capabilities(core)
        if capability not in caps:
            raise EngineError(
                f"{model_path}: this CPU cannot run OpenVINO {precision} "
                f"(capabilities: {', '.join(caps)})"
            )
        if cache_dir is not None:
            (cache_dir / "openvino").mkdir(parents=True, exist_ok=True)
            core.set_property({props.cache_dir: str(cache_dir / "openvino")})
        try:
            model = core.read_model(str(model_path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelError(f"{model_path}: OpenVINO cannot read the model: {exc}") from exc
        model.reshape(
            {
                model.input(0): ov.PartialShape(
                    [ov.Dimension(spec.min_batch, spec.max_batch), *map(int, spec.chw)]
                )
            }
        )
        config: dict[Any, Any] = {
            hints.inference_precision: ov_type,
            # One request at a time from the inference thread: latency mode gives it
            # one stream with every thread.
            hints.performance_mode: hints.PerformanceMode.LATENCY,
        }
        if threads is not None:
            config[props.inference_num_threads] = threads
        try:
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise EngineError(f"{model_path}: OpenVINO cannot compile the model: {exc}") from exc
        effective = self._compiled.get_property(hints.inference_precision)
        if effective != ov_type:
            raise EngineError(
                f"{model_path}: OpenVINO compiled with {effective}, asked for {ov_type}"
            )
        self._request: ov.InferRequest | None = self._compiled.create_infer_request()
        self._path = model_path
        self._io = io
        self._spec = spec
        self._precision = precision
        self._lock = threading.Lock()
        log.info(
            "openvino_compiled",
            model=str(model_path),
            precision=precision,
            inference_precision=effective.get_type_name(),
            threads=int(self._compiled.get_property(props.inference_num_threads)),
            batch_range=f"{spec.min_batch}..{spec.max_batch}",
        )

    @property
    def name(self) -> str:
        return f"openvino-{self._precision}"

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def version(self) -> str:
        return str(ov.get_version()).split("-")[0]

    @property
    def spec(self) -> EngineSpec:
        return self._spec

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(N, C, H, W)`` float32 -> ``(N, 1, H, W)`` float32 probabilities (new array).

        Raises ``ValueError`` for a batch outside the spec, ``EngineError`` if the run fails.
        """
        self._spec.check(batch)
        batch = np.ascontiguousarray(batch)
        with self._lock:
            if self._request is None:
                raise EngineError(f"{self._path}: OpenVINO engine is closed")
            try:
                # share_inputs: OpenVINO reads the caller's array in place. Outputs are
                # copied out of the request (share_outputs=False), so the result is ours.
                result = self._request.infer({0: batch}, share_inputs=True, share_outputs=False)
            except Exception as exc:
                raise EngineError(f"{self._path}: OpenVINO inference failed: {exc}") from exc
        out: NDArray[np.float32] = result[0]
        return out

    def close(self) -> None:
        with self._lock:
            self._request = None
