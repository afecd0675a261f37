"""OpenVINO engine: the CPU default. fp32 or bf16 from the fp32 ONNX, INT8 from a QDQ ONNX.

The inference precision is always pinned (``INFERENCE_PRECISION_HINT``): OpenVINO would
otherwise pick bf16 by itself on CPUs with AMX, and results would silently change with the
machine. For a QDQ model the quantised convolutions run in int8 and the few operators left
in float run in f32. The model is reshaped to the engine's batch range and compiled twice, with
infer requests created up front: in latency mode (one stream, every thread) for single images,
and in throughput mode (parallel streams) for batches, which are split across the streams.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
from numpy.typing import NDArray

from defectd.engines.base import BackendEngine, EngineSpec, OpenRequest
from defectd.engines.model_file import OnnxIO, prepare_onnx
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


class OpenVinoEngine(BackendEngine):
    """One compiled OpenVINO model on the CPU. Calls are serialised by a lock."""

    backend = "openvino"

    def __init__(
        self,
        model_path: Path,
        io: OnnxIO,
        spec: EngineSpec,
        *,
        precision: str,
        threads: int | None = None,
        cache_dir: Path | None = None,
        streams: bool = True,
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
        base: dict[Any, Any] = {hints.inference_precision: ov_type}
        if threads is not None:
            base[props.inference_num_threads] = threads
        latency = self._compile(
            core, model, model_path, {**base, hints.performance_mode: hints.PerformanceMode.LATENCY}
        )
        effective = latency.get_property(hints.inference_precision)
        if effective != ov_type:
            raise EngineError(
                f"{model_path}: OpenVINO compiled with {effective}, asked for {ov_type}"
            )
        n_threads = int(latency.get_property(props.inference_num_threads))
        # A batch of two or more is split over parallel streams (one per thread pair or
        # thread): independent single-threaded streams keep the cores busy where one
        # multi-threaded stream waits at every layer for its slowest thread (worst on a
        # CPU shared with other work). A single image goes to the latency model.
        self._streams: list[ov.InferRequest] = []
        self._throughput: ov.CompiledModel | None = None
        if streams and spec.max_batch >= 2 and n_threads >= 2:
            # Slices can be smaller than min_batch: this model takes 1..max_batch.
            sliced = model.clone()
            sliced.reshape(
                {
                    sliced.input(0): ov.PartialShape(
                        [ov.Dimension(1, spec.max_batch), *map(int, spec.chw)]
                    )
                }
            )
            throughput = self._compile(
                core,
                sliced,
                model_path,
                {
                    **base,
                    hints.performance_mode: hints.PerformanceMode.THROUGHPUT,
                    props.inference_num_threads: n_threads,
                },
            )
            n_requests = int(throughput.get_property(props.optimal_number_of_infer_requests))
            self._throughput = throughput
            self._streams = [throughput.create_infer_request() for _ in range(max(1, n_requests))]
            if len(self._streams) < 2:
                self._streams = []
        self._latency = latency
        self._request: ov.InferRequest | None = latency.create_infer_request()
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
            threads=n_threads,
            streams_for_batches=len(self._streams) or 1,
            batch_range=f"{spec.min_batch}..{spec.max_batch}",
        )

    @staticmethod
    def _compile(
        core: ov.Core, model: ov.Model, model_path: Path, config: dict[Any, Any]
    ) -> ov.CompiledModel:
        try:
            return core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise EngineError(f"{model_path}: OpenVINO cannot compile the model: {exc}") from exc

    @property
    def version(self) -> str:
        return str(ov.get_version()).split("-")[0]

    @property
    def model_file(self) -> Path:
        return self._path

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        n = batch.shape[0]
        with self._lock:
            if self._request is None:
                raise EngineError(f"{self._path}: OpenVINO engine is closed")
            try:
                if n < 2 or not self._streams:
                    # share_inputs: OpenVINO reads the caller's array in place. Outputs are
                    # copied out of the request (share_outputs=False), so the result is ours.
                    result = self._request.infer({0: batch}, share_inputs=True, share_outputs=False)
                    out: NDArray[np.float32] = result[0]
                    return out
                return self._infer_split(batch)
            except Exception as exc:
                raise EngineError(f"{self._path}: OpenVINO inference failed: {exc}") from exc

    def _infer_split(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Run contiguous slices of ``batch`` on the parallel streams; gather into one array."""
        n = batch.shape[0]
        k = min(n, len(self._streams))
        bounds = [round(i * n / k) for i in range(k + 1)]
        requests = self._streams[:k]
        out = np.empty((n, 1, self._spec.height, self._spec.width), np.float32)
        started = []
        try:
            for request, lo, hi in zip(requests, bounds, bounds[1:], strict=False):
                request.start_async({0: batch[lo:hi]}, share_inputs=True)
                started.append(request)
            for request, lo, hi in zip(requests, bounds, bounds[1:], strict=False):
                request.wait()
                out[lo:hi] = request.get_output_tensor(0).data
        except Exception:
            for request in started:  # never leave a request running on the caller's array
                with contextlib.suppress(Exception):
                    request.wait()
            raise
        return out

    def close(self) -> None:
        with self._lock:
            self._request = None
            self._streams = []


def open_request(request: OpenRequest) -> OpenVinoEngine:
    """The registry's entry point: an ONNX model compiled by OpenVINO for this CPU."""
    model = prepare_onnx(request)
    return OpenVinoEngine(
        model.path,
        model.io,
        model.spec,
        precision=model.precision,
        threads=request.threads,
        cache_dir=request.cache_dir,
    )
