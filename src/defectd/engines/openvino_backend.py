"""OpenVINO engine: the CPU default. fp32 or bf16 from the fp32 ONNX, INT8 from a QDQ ONNX.

The inference precision is always pinned (``INFERENCE_PRECISION_HINT``): OpenVINO would
otherwise pick bf16 by itself on CPUs with AMX, and results would silently change with the
machine. For a QDQ model the quantised convolutions run in int8 and the few operators left
in float run in f32.

Two modes (``mode``, the station's ``[pipeline] mode``):

- ``throughput`` (default): compiled with the THROUGHPUT hint, so the CPU is split into
  parallel streams (on 2 cores: two single-threaded streams), with one infer request per
  stream. ``infer`` is thread-safe and runs each whole batch on one free request; callers keep
  every request busy by calling from ``concurrency`` threads at once (the pipeline runs that
  many inference threads). No batch is split over streams: a split batch waits for its slowest
  half and leaves the other stream idle meanwhile.
- ``latency``: compiled with the LATENCY hint, one stream using every thread, one request;
  each batch finishes as soon as the whole CPU can make it (``concurrency`` 1).

Shapes are static: the model is compiled once per batch size it will see (1, 2, 4, ... up to
``max_batch``, and ``max_batch`` itself); a batch of another size runs on the next larger
one, zero-padded. A static shape lets OpenVINO plan memory and pick kernels once (on the
development machine's AMD EPYC the int8 magnetic-tile model spends ~20% less CPU per frame
than with a dynamic batch axis). ``sizes`` picks the compiled batch sizes explicitly.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
from numpy.typing import NDArray

from defectd.engines.base import EngineSpec, OpenRequest
from defectd.engines.model_file import OnnxEngine, OnnxModel, prepare_onnx
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


MODES = ("throughput", "latency")


def batch_sizes(min_batch: int, max_batch: int) -> tuple[int, ...]:
    """The batch sizes compiled for ``min_batch..max_batch``: powers of two in the range and
    both ends, e.g. ``1..8`` -> ``(1, 2, 4, 8)``, ``1..6`` -> ``(1, 2, 4, 6)``."""
    sizes = {min_batch, max_batch}
    k = 1
    while k < max_batch:
        if k >= min_batch:
            sizes.add(k)
        k *= 2
    return tuple(sorted(sizes))


class OpenVinoEngine(OnnxEngine):
    """One OpenVINO model on the CPU, compiled per batch size, with ``concurrency`` infer
    requests; ``infer`` may be called from that many threads at once."""

    backend = "openvino"

    def __init__(
        self,
        model: OnnxModel,
        *,
        threads: int | None = None,
        cache_dir: Path | None = None,
        mode: str = "throughput",
        sizes: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(model)
        model_path, spec, precision = model.path, model.spec, model.precision
        if precision not in _PRECISIONS:
            raise EngineError(
                f"{model_path}: OpenVINO runs {', '.join(PRECISIONS)}; asked for {precision}"
            )
        if mode not in MODES:
            raise EngineError(f"{model_path}: OpenVINO mode {mode!r}: choose {' or '.join(MODES)}")
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
            ov_model = core.read_model(str(model_path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelError(f"{model_path}: OpenVINO cannot read the model: {exc}") from exc
        sizes = tuple(sorted(set(sizes or batch_sizes(spec.min_batch, spec.max_batch))))
        if sizes[0] < spec.min_batch or sizes[-1] != spec.max_batch:
            raise EngineError(
                f"{model_path}: compiled batch sizes {sizes} must lie in "
                f"{spec.min_batch}..{spec.max_batch} and include {spec.max_batch}"
            )
        config: dict[Any, Any] = {
            hints.inference_precision: ov_type,
            hints.performance_mode: (
                hints.PerformanceMode.THROUGHPUT
                if mode == "throughput"
                else hints.PerformanceMode.LATENCY
            ),
        }
        if threads is not None:
            config[props.inference_num_threads] = threads
        compiled: dict[int, ov.CompiledModel] = {}
        for n in sizes:
            shaped = ov_model.clone()
            shaped.reshape({shaped.input(0): ov.PartialShape([n, *map(int, spec.chw)])})
            compiled[n] = self._compile(core, shaped, model_path, config)
        first = compiled[sizes[0]]
        effective = first.get_property(hints.inference_precision)
        if effective != ov_type:
            raise EngineError(
                f"{model_path}: OpenVINO compiled with {effective}, asked for {ov_type}"
            )
        n_threads = int(first.get_property(props.inference_num_threads))
        streams = int(first.get_property(props.num_streams))
        # One request per stream: more would only queue inside OpenVINO, fewer leaves a
        # stream idle. The same number for every size; each size has its own requests.
        self._concurrency = max(1, streams) if mode == "throughput" else 1
        self._free: dict[int, queue.SimpleQueue[ov.InferRequest]] = {}
        for n, cm in compiled.items():
            free: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
            for _ in range(self._concurrency):
                free.put(cm.create_infer_request())
            self._free[n] = free
        # One call here, on this thread, before any in parallel: the first ``infer`` of a
        # process initialises statics in OpenVINO's Python binding, and two threads doing
        # that at once deadlock (one holds the GIL, the other the static's guard).
        first_request = self._free[sizes[0]].get()
        try:
            first_request.infer(
                {0: np.zeros((sizes[0], *map(int, spec.chw)), np.float32)},
                share_inputs=True,
                share_outputs=False,
            )
        except Exception as exc:
            raise EngineError(f"{model_path}: OpenVINO inference failed: {exc}") from exc
        finally:
            self._free[sizes[0]].put(first_request)
        self._compiled = compiled
        self._sizes = sizes
        self._slots = threading.BoundedSemaphore(self._concurrency)
        self._closed = False
        self._mode = mode
        self._threads = threads
        self._cache_dir = cache_dir
        log.info(
            "openvino_compiled",
            model=str(model_path),
            precision=precision,
            inference_precision=effective.get_type_name(),
            mode=mode,
            threads=n_threads,
            streams=streams,
            infer_requests=self._concurrency,
            batch_sizes=list(sizes),
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
    def concurrency(self) -> int:
        """How many ``infer`` calls run in parallel (one per infer request)."""
        return self._concurrency

    @property
    def mode(self) -> str:
        """``throughput`` or ``latency``."""
        return self._mode

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes compiled with a static shape."""
        return self._sizes

    def at_size(self, height: int, width: int) -> OpenVinoEngine:
        """The same model and precision compiled for single ``(C, height, width)`` images (a
        fully convolutional model inspecting a large frame in a few large windows), in this
        engine's mode: in throughput mode a window per stream runs at once, each on one core
        (the pipeline shares its window budget, ``full_frame_max_px``, among them), in latency
        mode one window at a time on every core. The caller closes it. ``EngineError`` when
        the model cannot take that size."""
        spec = EngineSpec(
            self._spec.channels, height, width, 1, 1, self._spec.dtype, self._spec.outputs
        )
        return OpenVinoEngine(
            replace(self._model, spec=spec),
            threads=self._threads,
            cache_dir=self._cache_dir,
            mode=self._mode,
        )

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        n = batch.shape[0]
        size = next(s for s in self._sizes if s >= n)
        if size > n:
            padded = np.zeros((size, *batch.shape[1:]), np.float32)
            padded[:n] = batch
            batch = padded
        with self._slots:
            if self._closed:
                raise EngineError(f"{self._path}: OpenVINO engine is closed")
            free = self._free[size]
            request = free.get_nowait()  # never empty: the semaphore counts the requests
            try:
                # share_inputs: OpenVINO reads the caller's array in place (the GIL is released
                # while it runs). Outputs are copied out (share_outputs=False): ours to keep.
                result = request.infer({0: batch}, share_inputs=True, share_outputs=False)
                out: NDArray[np.float32] = result[0]
            except Exception as exc:
                raise EngineError(f"{self._path}: OpenVINO inference failed: {exc}") from exc
            finally:
                free.put(request)
        return out[:n] if size > n else out

    def close(self) -> None:
        """Wait for running calls to finish, then refuse new ones and drop the requests."""
        for _ in range(self._concurrency):
            self._slots.acquire()
        try:
            self._closed = True
            self._free = {}
            self._compiled = {}
        finally:
            for _ in range(self._concurrency):
                self._slots.release()


def open_request(request: OpenRequest) -> OpenVinoEngine:
    """The registry's entry point: an ONNX model compiled by OpenVINO for this CPU."""
    return OpenVinoEngine(
        prepare_onnx(request),
        threads=request.threads,
        cache_dir=request.cache_dir,
        mode=request.mode,
    )
