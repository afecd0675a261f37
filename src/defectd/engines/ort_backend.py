"""ONNX Runtime engine: fp32 or INT8 QDQ ONNX on the CPU (or CUDA / TensorRT providers).

Tuned for a small multi-core CPU: intra-op threads from the config, one inter-op thread
(a U-Net is a chain; parallel branches do not pay), all graph optimisations, sequential
execution. Each call binds the caller's input array and a freshly allocated output array
through IOBinding, so ONNX Runtime reads and writes them in place: no copies in or out.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from defectd.engines.base import OpenRequest
from defectd.engines.model_file import OnnxEngine, OnnxModel, prepare_onnx
from defectd.engines.probe import gpu_present
from defectd.errors import EngineError, ModelError
from defectd.log import get_logger

log = get_logger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def cpu_session_options(threads: int | None) -> ort.SessionOptions:
    """Session options for low-latency inference of one model on a shared CPU."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0  # 0: one per physical core
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings from the graph optimiser are noise here
    return opts


def choose_providers(
    gpu: bool, precision: str, cache_dir: Path | None
) -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers to try, best first; CPU is always last as the fallback."""
    available = set(ort.get_available_providers())
    providers: list[str | tuple[str, dict[str, str]]] = []
    if gpu and TENSORRT in available and cache_dir is not None:
        providers.append(
            (
                TENSORRT,
                {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(cache_dir / "ort-trt"),
                    "trt_timing_cache_enable": "True",
                    "trt_fp16_enable": "True" if precision == "fp16" else "False",
                    "trt_int8_enable": "True" if precision == "int8" else "False",
                },
            )
        )
    if gpu and CUDA in available:
        providers.append(CUDA)
    providers.append(CPU)
    return providers


class OrtEngine(OnnxEngine):
    """One ONNX Runtime session behind the engine contract. Calls are serialised by a lock."""

    backend = "ort"

    def __init__(
        self,
        model: OnnxModel,
        *,
        threads: int | None = None,
        providers: list[str | tuple[str, dict[str, str]]] | None = None,
    ) -> None:
        super().__init__(model)
        model_path = model.path
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(model_path),
                sess_options=cpu_session_options(threads),
                providers=providers or [CPU],
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{model_path}: ONNX Runtime cannot load the model: {first}") from exc
        self._providers: list[str] = list(self._session.get_providers())
        self._binding = self._session.io_binding()
        self._lock = threading.Lock()
        log.info(
            "ort_session_ready",
            model=str(model_path),
            precision=model.precision,
            providers=self._providers,
            intra_op_threads=threads or "auto",
        )

    @property
    def version(self) -> str:
        return str(ort.__version__)

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, in priority order."""
        return list(self._providers)

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        n = batch.shape[0]
        out = np.empty((n, self._spec.outputs, self._spec.height, self._spec.width), np.float32)
        with self._lock:
            if self._session is None:
                raise EngineError(f"{self._path}: ONNX Runtime engine is closed")
            binding = self._binding
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            binding.bind_cpu_input(self._io.input_name, batch)
            binding.bind_output(
                self._io.output_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data
            )
            try:
                self._session.run_with_iobinding(binding)
            except Exception as exc:  # ORT's runtime errors have no common base
                raise EngineError(f"{self._path}: ONNX Runtime inference failed: {exc}") from exc
            finally:
                binding.clear_binding_inputs()
                binding.clear_binding_outputs()
        return out

    def close(self) -> None:
        with self._lock:
            self._session = None


def open_request(request: OpenRequest) -> OrtEngine:
    """The registry's entry point: an ONNX model on ONNX Runtime (CUDA where present)."""
    model = prepare_onnx(request)
    providers = choose_providers(gpu_present(), model.precision, request.cache_dir)
    return OrtEngine(model, threads=request.threads, providers=providers)
