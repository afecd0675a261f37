"""Open a model on a backend chosen by name or automatically; list what this machine offers.

``auto`` picks, in order: TensorRT when an NVIDIA GPU and ``tensorrt`` are present, else ONNX
Runtime with its CUDA provider when that and a GPU are present, else OpenVINO (the fastest
CPU backend). A ``.pt`` checkpoint always opens on torch and a
``.plan`` file on TensorRT. The choice and the reason are logged as ``engine_selected``.

Precision defaults to the card's (an fp32 model runs fp32 unless asked otherwise). ``int8``
needs a QDQ model: the model itself (card precision ``int8``) or ``<stem>.int8.onnx`` beside it
(TensorRT: ``<stem>.int8-sym.onnx`` first, symmetric int8).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import openvino as ov

from defectd.engines.base import Engine
from defectd.engines.model_file import (
    check_expected,
    check_onnx_against_card,
    make_spec,
    read_onnx_io,
)
from defectd.engines.openvino_backend import OpenVinoEngine, cpu_capabilities
from defectd.engines.ort_backend import CUDA, OrtEngine, choose_providers
from defectd.engines.tensorrt_backend import (
    INSTALL_HINT,
    BuildProgress,
    gpu_present,
    open_plan_file,
    open_tensorrt,
)
from defectd.errors import EngineError, ModelError
from defectd.log import get_logger
from defectd.model.card import ModelCard, load_card

log = get_logger(__name__)

BACKENDS = ("auto", "torch", "ort", "openvino", "tensorrt")
PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32",),
    "ort": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "tensorrt": ("fp32", "fp16", "int8"),
}


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What ``defectd engines`` prints for one backend on this machine."""

    name: str
    available: bool
    version: str
    precisions: tuple[str, ...]
    detail: str


def _module_version(name: str) -> str | None:
    """Installed version of ``name``, from its distribution metadata when it has one (no import)."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "?"))


def _ort_cuda() -> bool:
    return CUDA in ort.get_available_providers()


def available_backends() -> list[BackendInfo]:
    """Every backend with whether it runs here, its version, precisions and why (not)."""
    gpu = gpu_present()
    infos = [
        BackendInfo(
            "torch", True, _module_version("torch") or "", PRECISIONS["torch"], "eager reference"
        )
    ]
    ort_detail = "CUDA + CPU providers" if gpu and _ort_cuda() else "CPU provider"
    infos.append(BackendInfo("ort", True, str(ort.__version__), PRECISIONS["ort"], ort_detail))
    caps = cpu_capabilities()
    ov_precisions = tuple(
        p
        for p in PRECISIONS["openvino"]
        if {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}[p] in caps
    )
    ov_version = str(ov.get_version()).split("-")[0]
    ov_detail = "CPU capabilities " + " ".join(caps)
    infos.append(BackendInfo("openvino", True, ov_version, ov_precisions, ov_detail))
    trt_v = _module_version("tensorrt")
    trt_ok = trt_v is not None and gpu
    trt_detail = (
        "GPU present"
        if trt_ok
        else ("no NVIDIA GPU" if not gpu else f"tensorrt not installed ({INSTALL_HINT})")
    )
    infos.append(BackendInfo("tensorrt", trt_ok, trt_v or "", PRECISIONS["tensorrt"], trt_detail))
    return infos


def choose_backend(model_path: Path) -> tuple[str, str]:
    """``(backend, reason)`` for ``backend="auto"`` on this machine."""
    suffix = model_path.suffix.lower()
    if suffix == ".pt":
        return "torch", "a .pt checkpoint runs on the torch reference backend"
    if suffix == ".plan":
        return "tensorrt", "a .plan file is a TensorRT engine"
    gpu = gpu_present()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    if gpu and has_trt:
        return "tensorrt", "NVIDIA GPU and TensorRT present"
    if gpu and _ort_cuda():
        return "ort", f"NVIDIA GPU with ONNX Runtime CUDA; no tensorrt ({INSTALL_HINT})"
    why = "no NVIDIA GPU" if not gpu else "GPU without TensorRT or ONNX Runtime CUDA"
    return "openvino", f"{why}; OpenVINO is the fastest CPU backend"


def _int8_model(model_path: Path, card: ModelCard, backend: str) -> tuple[Path, ModelCard]:
    """The QDQ model that serves int8: this one, or one beside it.

    CPU backends take ``<stem>.int8.onnx`` (uint8 activations, fastest there); TensorRT takes
    ``<stem>.int8-sym.onnx`` (symmetric int8, ``quantize_qdq(..., symmetric_activations=True)``)
    and falls back to ``<stem>.int8.onnx``, which it checks.
    """
    if card.precision == "int8":
        return model_path, card
    names = [".int8.onnx"] if backend != "tensorrt" else [".int8-sym.onnx", ".int8.onnx"]
    for suffix in names:
        sibling = model_path.with_name(model_path.stem + suffix)
        if sibling.is_file():
            sibling_card = load_card(sibling)
            if sibling_card.precision == "int8":
                return sibling, sibling_card
    wanted = " or ".join(model_path.stem + n for n in names)
    raise EngineError(
        f"{model_path}: precision int8 needs a QDQ model (card precision int8) or "
        f"{wanted} beside it; make one with `defectd calibrate int8`"
    )


def open_engine(
    model_path: Path,
    *,
    backend: str = "auto",
    precision: str | None = None,
    max_batch: int = 16,
    min_batch: int = 1,
    threads: int | None = None,
    cache_dir: Path | None = None,
    opt_batch: int | None = None,
    expect: tuple[int, int, int] | None = None,
    build_progress: BuildProgress | None = None,
) -> Engine:
    """Open ``model_path`` (``.onnx`` with its card, ``.pt`` checkpoint or TensorRT ``.plan``).

    ``backend``: ``auto``, ``torch``, ``ort``, ``openvino`` or ``tensorrt``. ``precision``:
    ``fp32``, ``bf16``, ``fp16`` or ``int8`` (``None``: the card's). The engine accepts
    batches ``min_batch..max_batch``; ``opt_batch`` is TensorRT's tuning batch (default max).
    ``threads`` caps the CPU threads (``None``: the runtime's default, all cores).
    ``cache_dir`` holds TensorRT plans and timing caches and OpenVINO's compiled blobs.
    ``expect`` is the ``(channels, height, width)`` the caller will feed (e.g. the station
    config); a model that takes something else is refused. ``build_progress(phase, done,
    total)`` is called while a TensorRT plan is built (from TensorRT's threads).

    Raises ``ModelError`` for a missing/unreadable model or card or a spec mismatch and
    ``EngineError`` when the backend or precision cannot run here.
    """
    model_path = Path(model_path)
    if backend not in BACKENDS:
        raise EngineError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found")
    reason = "asked for by name"
    chosen = backend
    if backend == "auto":
        chosen, reason = choose_backend(model_path)
    suffix = model_path.suffix.lower()

    if suffix == ".plan":
        if chosen != "tensorrt":
            raise EngineError(f"{model_path}: a .plan file runs only on tensorrt, not {chosen}")
        engine: Engine = open_plan_file(model_path, min_batch, max_batch)
        _selected(engine, model_path, reason)
        return engine

    if suffix == ".pt":
        if chosen != "torch":
            raise EngineError(
                f"{model_path}: a .pt checkpoint runs on torch; export it to ONNX for {chosen}"
            )
        from defectd.engines.torch_backend import TorchEngine  # noqa: PLC0415  (torch is heavy)
        from defectd.model.checkpoint import load_checkpoint  # noqa: PLC0415

        net, card = load_checkpoint(model_path)
        check_expected(model_path, card, expect)
        _check_precision("torch", precision or "fp32", model_path)
        spec = make_spec(model_path, card, None, min_batch, max_batch)
        engine = TorchEngine(net, card, spec, threads=threads)
        _selected(engine, model_path, reason)
        return engine

    if chosen == "torch":
        raise EngineError(
            f"{model_path}: the torch backend opens .pt checkpoints; this is an ONNX model"
        )
    card = load_card(model_path)
    check_expected(model_path, card, expect)
    want = precision or card.precision
    _check_precision(chosen, want, model_path)
    if want == "int8":
        model_path, card = _int8_model(model_path, card, chosen)
    elif card.precision == "int8":
        raise EngineError(
            f"{model_path}: is an INT8 QDQ model; open the fp32 model for {want} (card precision)"
        )
    io = read_onnx_io(model_path)
    check_onnx_against_card(model_path, io, card)
    spec = make_spec(model_path, card, io, min_batch, max_batch)

    if chosen == "ort":
        providers = choose_providers(gpu_present(), want, cache_dir)
        engine = OrtEngine(
            model_path, io, spec, precision=want, threads=threads, providers=providers
        )
    elif chosen == "openvino":
        engine = OpenVinoEngine(
            model_path, io, spec, precision=want, threads=threads, cache_dir=cache_dir
        )
    else:
        engine = open_tensorrt(
            model_path,
            card,
            spec,
            io.input_name,
            precision=want,
            cache_dir=cache_dir,
            opt_batch=opt_batch,
            progress=build_progress,
        )
    _selected(engine, model_path, reason)
    return engine


def _check_precision(backend: str, precision: str, model_path: Path) -> None:
    if precision not in PRECISIONS[backend]:
        raise EngineError(
            f"{model_path}: {backend} runs {', '.join(PRECISIONS[backend])}; "
            f"precision {precision} is not one of them"
        )


def _selected(engine: Engine, model_path: Path, reason: str) -> None:
    log.info(
        "engine_selected",
        engine=engine.name,
        backend=engine.name.split("-")[0],
        precision=engine.precision,
        version=engine.version,
        model=str(model_path),
        batch_range=f"{engine.spec.min_batch}..{engine.spec.max_batch}",
        reason=reason,
    )
