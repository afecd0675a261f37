"""TensorRT engine (``pip install defectd[gpu]``): build a plan from the ONNX, cache it, run it.

The network is strongly typed, which TensorRT 10.x (JetPack) and 11.x (no FP16/INT8 builder
flags any more) both build: fp32 from the exported ONNX, fp16 from an fp16 copy of it (float32
I/O, see ``defectd.engines.fp16``), int8 from a QDQ ONNX (``defectd.calibration.int8``). One
optimisation profile covers the batch range; the timing cache and the plans live in the cache
directory, plans under a key that must match exactly (see ``defectd.engines.plan_cache``).

The plan's output has one channel per class of the card (``(N, K, H, W)``, ``K = 1`` for a
one-class model), as the ONNX Runtime and OpenVINO engines give it: ``K`` is part of the plan
key, sizes the output buffers and is checked against the plan's own output shape.

At run time the input and output live in device buffers sized for the largest batch (torch
CUDA tensors), staged through pinned host buffers, and every call is
``set_input_shape`` + ``execute_async_v3`` on the engine's own CUDA stream.

``tensorrt`` and CUDA are imported lazily: this module imports on machines without them.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from defectd.engines.base import EngineSpec, OpenRequest
from defectd.engines.fp16 import convert_fp16
from defectd.engines.model_file import prepare_onnx
from defectd.engines.plan_cache import (
    Device,
    PlanKey,
    Profile,
    check_device,
    load_cached,
    plan_path,
    read_plan,
    timing_cache_path,
    write_plan,
)
from defectd.engines.probe import INSTALL_HINT, gpu_present
from defectd.errors import EngineError, ModelError
from defectd.log import get_logger
from defectd.model.card import ModelCard, file_sha256

log = get_logger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")

# (phase, steps done, steps in phase) while TensorRT builds; called from TensorRT's threads.
BuildProgress = Callable[[str, int, int], None]


def default_cache_dir() -> Path:
    """``$DEFECTD_CACHE_DIR``, else ``$XDG_CACHE_HOME/defectd``, else ``~/.cache/defectd``."""
    if os.environ.get("DEFECTD_CACHE_DIR"):
        return Path(os.environ["DEFECTD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "defectd"


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module; ``EngineError`` with the install hint when it is missing."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineError(f"tensorrt not installed ({INSTALL_HINT})") from exc


def require_tensorrt() -> tuple[ModuleType, Device]:
    """TensorRT and the device it builds for; one clear ``EngineError`` when either is missing."""
    if not gpu_present():
        raise EngineError(
            f"no NVIDIA GPU: TensorRT needs a CUDA device and tensorrt ({INSTALL_HINT})"
        )
    trt = import_tensorrt()
    return trt, current_device(trt)


def current_device(trt: ModuleType) -> Device:
    import torch  # noqa: PLC0415  (deferred: torch is heavy)

    major, minor = torch.cuda.get_device_capability(0)
    return Device(
        tensorrt=str(trt.__version__),
        gpu=str(torch.cuda.get_device_name(0)),
        compute_capability=f"{major}.{minor}",
    )


def tensorrt_onnx(model_path: Path, card: ModelCard, precision: str, cache_dir: Path) -> Path:
    """The ONNX whose types give ``precision`` in a strongly typed network.

    fp32: the model itself. fp16: an fp16 copy in ``cache_dir`` named by the source sha256
    (made once). int8: the model itself, which must be a QDQ model (card precision int8).
    """
    if precision not in PRECISIONS:
        raise EngineError(f"{model_path}: TensorRT builds {', '.join(PRECISIONS)}; not {precision}")
    if precision == "int8" or card.precision == "int8":
        if card.precision != precision:
            raise EngineError(
                f"{model_path}: card precision is {card.precision}; TensorRT {precision} needs "
                + ("a QDQ ONNX (defectd calibrate int8)" if precision == "int8" else "fp32 ONNX")
            )
        check_symmetric_qdq(model_path)
        return model_path
    if precision == "fp32" or card.precision == "fp16":
        return model_path
    sha = file_sha256(model_path)
    out = cache_dir / f"{model_path.stem}.fp16-{sha[:16]}.onnx"
    if not out.is_file():
        convert_fp16(model_path, out)
    return out


def check_symmetric_qdq(model_path: Path) -> None:
    """TensorRT runs INT8 only with int8 zero points of 0; uint8 activations are refused."""
    model = onnx.load(str(model_path), load_external_data=False)
    initialisers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        zero = initialisers.get(node.input[2])
        if zero is None:
            continue
        values = numpy_helper.to_array(zero)
        if values.dtype != np.int8 or values.any():
            raise EngineError(
                f"{model_path}: QDQ activations are {values.dtype} with a zero point; TensorRT "
                "needs symmetric int8: quantise with quantize_qdq(..., symmetric_activations=True) "
                "into <stem>.int8-sym.onnx"
            )


def resolve_plan(
    model_path: Path,
    card: ModelCard,
    spec: EngineSpec,
    *,
    precision: str,
    device: Device,
    cache_dir: Path,
    opt_batch: int | None = None,
) -> tuple[Path, PlanKey, Path]:
    """``(onnx_to_build, key, plan_file)`` for this model, precision, profile and device.

    Needs no GPU: the device is passed in. Raises ``EngineError`` for a bad profile.
    """
    profile = Profile.make(spec.min_batch, spec.max_batch, opt_batch)
    onnx_path = tensorrt_onnx(model_path, card, precision, cache_dir)
    key = PlanKey.make(
        file_sha256(onnx_path), precision, spec.chw, profile, device, outputs=spec.outputs
    )
    return onnx_path, key, plan_path(cache_dir, model_path.stem, key)


class _Monitor:
    """Adapts TensorRT's IProgressMonitor to a ``BuildProgress`` callback (made lazily)."""

    @staticmethod
    def make(trt: ModuleType, progress: BuildProgress) -> Any:
        class Monitor(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)
                self._steps: dict[str, int] = {}
                self._lock = threading.Lock()

            def phase_start(
                self, phase_name: str, parent_phase: str | None, num_steps: int
            ) -> None:
                with self._lock:
                    self._steps[phase_name] = num_steps
                progress(phase_name, 0, num_steps)

            def step_complete(self, phase_name: str, step: int) -> bool:
                progress(phase_name, step + 1, self._steps.get(phase_name, step + 1))
                return True  # never cancel

            def phase_finish(self, phase_name: str) -> None:
                n = self._steps.get(phase_name, 1)
                progress(phase_name, n, n)

        return Monitor()


def build_plan(
    trt: ModuleType,
    *,
    onnx_path: Path,
    key: PlanKey,
    input_name: str,
    cache_dir: Path,
    progress: BuildProgress | None = None,
) -> bytes:
    """Build a strongly typed plan for ``key``'s profile, reusing and updating the timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT cannot parse the ONNX: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *key.profile.shapes((key.channels, key.height, key.width)))
    config.add_optimization_profile(profile)

    timing_file = timing_cache_path(cache_dir, key.device)
    blob = timing_file.read_bytes() if timing_file.is_file() else b""
    timing = config.create_timing_cache(blob)
    if timing is None or not config.set_timing_cache(timing, ignore_mismatch=False):
        log.warning("timing_cache_ignored", path=str(timing_file))
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = None
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        monitor = _Monitor.make(trt, progress)
        config.progress_monitor = monitor

    log.info(
        "tensorrt_build_started",
        onnx=str(onnx_path),
        precision=key.precision,
        profile=f"{key.min_batch}/{key.opt_batch}/{key.max_batch}",
        gpu=key.gpu,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT build failed (see the TensorRT log above)")
    cache = config.get_timing_cache()
    if cache is not None:
        tmp = timing_file.with_name(f".{timing_file.name}.{os.getpid()}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(bytes(cache.serialize()))
        tmp.replace(timing_file)
    return bytes(serialized)


def check_plan_output(shape: tuple[int, ...], spec: EngineSpec, source: Path) -> None:
    """The plan's output tensor shape (``-1`` for a dynamic batch) must be ``(N, K, H, W)``
    with ``K = spec.outputs`` and the input's ``H, W``; ``EngineError`` naming the plan and
    both shapes otherwise (a plan built for another model's classes, say)."""
    want = (spec.outputs, spec.height, spec.width)
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise EngineError(
            f"{source}: plan output is {tuple(shape)}, expected (N, {', '.join(map(str, want))})"
            f": {spec.outputs} channel(s), one per class of the model card"
        )


class TensorRTEngine:
    """A deserialised plan with preallocated device buffers for the largest batch."""

    def __init__(
        self, trt: ModuleType, plan: bytes, key: PlanKey, spec: EngineSpec, source: Path
    ) -> None:
        if not key.profile.covers(spec.min_batch, spec.max_batch):
            raise EngineError(
                f"{source}: plan accepts batches {key.min_batch}..{key.max_batch}, "
                f"asked for {spec.min_batch}..{spec.max_batch}"
            )
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError(f"{source}: TensorRT cannot deserialise the plan")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{source}: plan has {len(inputs)} inputs, {len(outputs)} outputs")
        self._in, self._out = inputs[0], outputs[0]
        for name in (self._in, self._out):
            if self._engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise EngineError(f"{source}: plan tensor {name!r} is not float32")
        check_plan_output(tuple(self._engine.get_tensor_shape(self._out)), spec, source)
        self._context = self._engine.create_execution_context()
        import torch  # noqa: PLC0415  (deferred: torch is heavy)

        self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        n, c, h, w = key.max_batch, spec.channels, spec.height, spec.width
        cuda = torch.device("cuda", 0)
        self._dev_in = torch.empty((n, c, h, w), dtype=torch.float32, device=cuda)
        self._dev_out = torch.empty((n, spec.outputs, h, w), dtype=torch.float32, device=cuda)
        self._host_in = torch.empty((n, c, h, w), dtype=torch.float32, pin_memory=True)
        self._host_out = torch.empty((n, spec.outputs, h, w), dtype=torch.float32, pin_memory=True)
        self._context.set_tensor_address(self._in, self._dev_in.data_ptr())
        self._context.set_tensor_address(self._out, self._dev_out.data_ptr())
        self._key = key
        self._spec = spec
        self._source = source
        self._lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return f"tensorrt-{self._key.precision}"

    @property
    def precision(self) -> str:
        return self._key.precision

    @property
    def version(self) -> str:
        return self._key.tensorrt

    @property
    def spec(self) -> EngineSpec:
        return self._spec

    @property
    def key(self) -> PlanKey:
        return self._key

    @property
    def plan_file(self) -> Path:
        """The cached (or given) plan file this engine was loaded from."""
        return self._source

    @property
    def model_file(self) -> Path:
        """The plan: what TensorRT executes (built from the ONNX model, cached by its key)."""
        return self._source

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(N, C, H, W)`` float32 -> ``(N, K, H, W)`` float32 probabilities (new array),
        ``K = spec.outputs``: one channel per class of the card."""
        import torch  # noqa: PLC0415  (loaded by __init__; deferred for a light module import)

        self._spec.check(batch)
        n = batch.shape[0]
        with self._lock:
            if self._closed:
                raise EngineError(f"{self._source}: TensorRT engine is closed")
            self._host_in[:n].numpy()[...] = batch
            with torch.cuda.stream(self._stream):
                self._dev_in[:n].copy_(self._host_in[:n], non_blocking=True)
                if not self._context.set_input_shape(self._in, tuple(batch.shape)):
                    raise EngineError(
                        f"{self._source}: TensorRT rejected input shape {batch.shape}"
                    )
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise EngineError(f"{self._source}: TensorRT execution failed")
                self._host_out[:n].copy_(self._dev_out[:n], non_blocking=True)
            self._stream.synchronize()
            out: NDArray[np.float32] = self._host_out[:n].numpy().copy()
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            del self._context, self._engine, self._runtime
            del self._dev_in, self._dev_out, self._host_in, self._host_out


def open_tensorrt(
    model_path: Path,
    card: ModelCard,
    spec: EngineSpec,
    input_name: str,
    *,
    precision: str,
    cache_dir: Path | None = None,
    opt_batch: int | None = None,
    progress: BuildProgress | None = None,
) -> TensorRTEngine:
    """Load the cached plan for this model/precision/profile/GPU, or build and cache it."""
    trt, device = require_tensorrt()
    cache = cache_dir or default_cache_dir()
    onnx_path, key, path = resolve_plan(
        model_path,
        card,
        spec,
        precision=precision,
        device=device,
        cache_dir=cache,
        opt_batch=opt_batch,
    )
    plan = load_cached(path, key)
    if plan is None:
        plan = build_plan(
            trt,
            onnx_path=onnx_path,
            key=key,
            input_name=input_name,
            cache_dir=cache,
            progress=progress,
        )
        write_plan(path, key, plan)
        log.info("plan_built", plan=str(path), bytes=len(plan))
    else:
        log.info("plan_loaded", plan=str(path))
    return TensorRTEngine(trt, plan, key, spec, path)


def open_plan_file(path: Path, min_batch: int | None, max_batch: int | None) -> TensorRTEngine:
    """Open a plan file directly: it must have been built for this GPU and TensorRT."""
    stored, plan = read_plan(path)
    trt, device = require_tensorrt()
    check_device(path, stored, device)
    return TensorRTEngine(trt, plan, stored, plan_spec(stored, min_batch, max_batch), path)


def plan_spec(stored: PlanKey, min_batch: int | None, max_batch: int | None) -> EngineSpec:
    """The engine spec of a plan opened by path, from its key: input, output channels (one per
    class of the model it was built from) and the batch range asked for, else the plan's."""
    return EngineSpec(
        channels=stored.channels,
        height=stored.height,
        width=stored.width,
        min_batch=stored.min_batch if min_batch is None else min_batch,
        max_batch=stored.max_batch if max_batch is None else max_batch,
        outputs=stored.outputs,
    )


def open_request(request: OpenRequest) -> TensorRTEngine:
    """The registry's entry point: a ``.plan`` file as it is, or an ONNX model's cached plan
    (built for this GPU and TensorRT when missing)."""
    if request.model_path.suffix.lower() == ".plan":
        return open_plan_file(request.model_path, request.min_batch, request.max_batch)
    model = prepare_onnx(request)
    return open_tensorrt(
        model.path,
        model.card,
        model.spec,
        model.io.input_name,
        precision=model.precision,
        cache_dir=request.cache_dir,
        opt_batch=request.opt_batch,
        progress=request.build_progress,
    )
