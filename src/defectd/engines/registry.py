"""The backends by name: a declarative table, opened lazily; ``open_engine`` and ``auto``.

Each ``Backend`` entry names its open function as a lazy entry point (``module:function``,
imported only when a model is opened on it, so a runtime is loaded only by the station that
uses it), the precisions it runs, the model files it opens and two probes: ``probe()`` for
``defectd engines`` (may import the runtime) and ``pick()`` for ``auto`` (a reason when this
backend should serve here, else None). Adding a backend is one entry and one open function.

``auto`` takes the only backend that opens the model's file type (``.pt`` -> torch, ``.plan``
-> TensorRT), else the first entry, in table order, whose ``pick()`` answers: TensorRT when an
NVIDIA GPU and ``tensorrt`` are present, else ONNX Runtime with its CUDA provider when that and
a GPU are present, else OpenVINO (the fastest CPU backend). Explicit names and ``auto`` then
take the same path. The choice and the reason are logged as ``engine_selected``.

Precision (OpenVINO, ONNX Runtime) defaults to the fastest one the backend runs here whose
validation Dice the card records within 0.01 of the model's own (``val_dice_int8`` /
``val_dice_fp16`` / ``val_dice_bf16`` against ``val_dice``; ``model_file.fast_precision``),
else the card's: a card without those metrics, and the other backends, run at the card's
precision. Evaluation and calibration open models the same way, so they measure the precision
the station runs. ``int8`` needs a QDQ model: the model itself (card precision ``int8``) or
``<stem>.int8.onnx`` beside it (TensorRT: ``<stem>.int8-sym.onnx`` first, symmetric int8).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from defectd.engines.base import Engine, OpenRequest
from defectd.engines.probe import INSTALL_HINT, gpu_present, installed, module_version, ort_cuda
from defectd.engines.remote import TritonOptions
from defectd.errors import EngineError, ModelError
from defectd.extras import install_hint, missing_extra_error
from defectd.log import get_logger

log = get_logger(__name__)

OpenFn = Callable[[OpenRequest], Engine]


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What ``defectd engines`` prints for one backend on this machine."""

    name: str
    available: bool
    version: str
    precisions: tuple[str, ...]
    detail: str


@dataclass(frozen=True, slots=True)
class Backend:
    """One registry entry. ``entry_point`` is ``"module:function"`` taking an ``OpenRequest``."""

    name: str
    entry_point: str
    precisions: tuple[str, ...]
    suffixes: tuple[str, ...]
    probe: Callable[[], BackendInfo]
    pick: Callable[[], str | None]

    def load(self) -> OpenFn:
        """Import the backend's module (and with it its runtime) and return its open function.

        ``MissingExtraError`` naming the pip extra when the runtime is one that is not
        installed (torch on a station install).
        """
        module, _, attr = self.entry_point.partition(":")
        try:
            return cast(OpenFn, getattr(importlib.import_module(module), attr))
        except ModuleNotFoundError as exc:
            missing = missing_extra_error(exc, f"the {self.name} backend")
            if missing is None:
                raise
            raise missing from exc


# ---------------------------------------------------------------------- probes


def _probe_torch() -> BackendInfo:
    version = module_version("torch")
    detail = "eager reference" if version else f"torch not installed ({install_hint('train')})"
    return BackendInfo("torch", version is not None, version or "", PRECISIONS["torch"], detail)


def _probe_ort() -> BackendInfo:
    import onnxruntime as ort  # noqa: PLC0415  (the listing reports the runtime itself)

    detail = "CUDA + CPU providers" if gpu_present() and ort_cuda() else "CPU provider"
    return BackendInfo("ort", True, str(ort.__version__), PRECISIONS["ort"], detail)


def _probe_openvino() -> BackendInfo:
    import openvino as ov  # noqa: PLC0415

    from defectd.engines.openvino_backend import cpu_capabilities  # noqa: PLC0415

    caps = cpu_capabilities()
    names = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}
    precisions = tuple(p for p in PRECISIONS["openvino"] if names[p] in caps)
    version = str(ov.get_version()).split("-")[0]
    return BackendInfo("openvino", True, version, precisions, "CPU capabilities " + " ".join(caps))


def _probe_tensorrt() -> BackendInfo:
    gpu = gpu_present()
    version = module_version("tensorrt")
    ok = version is not None and gpu
    if ok:
        detail = "GPU present"
    elif not gpu:
        detail = "no NVIDIA GPU"
    else:
        detail = f"tensorrt not installed ({INSTALL_HINT})"
    return BackendInfo("tensorrt", ok, version or "", PRECISIONS["tensorrt"], detail)


def _probe_triton() -> BackendInfo:
    version = module_version("tritonclient")
    detail = (
        "client of a Triton Inference Server (model.triton.url); never chosen by auto"
        if version
        else f"tritonclient not installed ({install_hint('triton')})"
    )
    return BackendInfo("triton", version is not None, version or "", PRECISIONS["triton"], detail)


def _pick_tensorrt() -> str | None:
    return "NVIDIA GPU and TensorRT present" if gpu_present() and installed("tensorrt") else None


def _pick_ort() -> str | None:
    if gpu_present() and ort_cuda():
        return f"NVIDIA GPU with ONNX Runtime CUDA; no tensorrt ({INSTALL_HINT})"
    return None


def _pick_openvino() -> str | None:
    why = "no NVIDIA GPU" if not gpu_present() else "GPU without TensorRT or ONNX Runtime CUDA"
    return f"{why}; OpenVINO is the fastest CPU backend"


# ---------------------------------------------------------------------- the table

# Table order is the order ``auto`` tries them in.
REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "tensorrt",
            "defectd.engines.tensorrt_backend:open_request",
            ("fp32", "fp16", "int8"),
            (".onnx", ".plan"),
            _probe_tensorrt,
            _pick_tensorrt,
        ),
        Backend(
            "ort",
            "defectd.engines.ort_backend:open_request",
            ("fp32", "int8"),
            (".onnx",),
            _probe_ort,
            _pick_ort,
        ),
        Backend(
            "openvino",
            "defectd.engines.openvino_backend:open_request",
            ("fp32", "bf16", "int8"),
            (".onnx",),
            _probe_openvino,
            _pick_openvino,
        ),
        Backend(
            "torch",
            "defectd.engines.torch_backend:open_request",
            ("fp32",),
            (".pt",),
            _probe_torch,
            lambda: None,
        ),
        # The model runs on a shared server; the station holds the same file and its card.
        Backend(
            "triton",
            "defectd.engines.triton_backend:open_request",
            ("fp32", "int8"),
            (".onnx",),
            _probe_triton,
            lambda: None,
        ),
    )
}
# The CPU backends whose precision defaults to the card's fastest within Dice tolerance; the
# others (TensorRT: its int8 needs a symmetric model; Triton: the server's repository) keep
# the card's precision unless asked.
FAST_DEFAULT_BACKENDS = ("openvino", "ort")
BACKENDS: tuple[str, ...] = ("auto", "torch", "ort", "openvino", "tensorrt", "triton")
PRECISIONS: dict[str, tuple[str, ...]] = {name: b.precisions for name, b in REGISTRY.items()}
assert set(BACKENDS) == {"auto", *REGISTRY}


def available_backends() -> list[BackendInfo]:
    """Every backend with whether it runs here, its version, precisions and why (not)."""
    return [REGISTRY[name].probe() for name in BACKENDS if name != "auto"]


def choose_backend(model_path: Path) -> tuple[str, str]:
    """``(backend, reason)`` for ``backend="auto"`` on this machine."""
    suffix = model_path.suffix.lower()
    owners = [b for b in REGISTRY.values() if suffix in b.suffixes]
    if len(owners) == 1:
        only = owners[0]
        kind = "a .pt checkpoint" if suffix == ".pt" else f"a {suffix} file"
        return only.name, f"{kind} runs only on the {only.name} backend"
    for backend in owners:
        reason = backend.pick()
        if reason is not None:
            return backend.name, reason
    raise EngineError(f"{model_path}: no backend opens {suffix or 'files without a suffix'}")


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
    build_progress: Callable[[str, int, int], None] | None = None,
    mode: str = "throughput",
    remote: TritonOptions | None = None,
) -> Engine:
    """Open ``model_path`` (``.onnx`` with its card, ``.pt`` checkpoint or TensorRT ``.plan``).

    ``backend``: ``auto``, ``torch``, ``ort``, ``openvino``, ``tensorrt`` or ``triton``.
    ``precision``: ``fp32``, ``bf16``, ``fp16`` or ``int8`` (``None``: the card's). The engine
    accepts batches ``min_batch..max_batch``; ``opt_batch`` is TensorRT's tuning batch (default
    max).
    ``threads`` caps the CPU threads (``None``: the runtime's default, all cores).
    ``cache_dir`` holds TensorRT plans and timing caches and OpenVINO's compiled blobs.
    ``expect`` is the ``(channels, height, width)`` the caller will feed (e.g. the station
    config); a model that takes something else is refused. ``build_progress(phase, done,
    total)`` is called while a TensorRT plan is built (from TensorRT's threads). ``mode``:
    ``throughput`` (OpenVINO: parallel infer requests, one whole batch each; call ``infer``
    from ``engine_concurrency(engine)`` threads) or ``latency`` (one request on every core).
    ``remote`` names the server for ``backend="triton"`` (default ``TritonOptions()``:
    127.0.0.1:8001).

    Raises ``ModelError`` for a missing/unreadable model or card or a spec mismatch and
    ``EngineError`` when the backend or precision cannot run here.
    """
    model_path = Path(model_path)
    if backend not in BACKENDS:
        raise EngineError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found")
    if backend == "auto":
        chosen, reason = choose_backend(model_path)
    else:
        chosen, reason = backend, "asked for by name"
    entry = REGISTRY[chosen]
    suffix = model_path.suffix.lower()
    if suffix not in entry.suffixes:
        owners = [b.name for b in REGISTRY.values() if suffix in b.suffixes]
        raise EngineError(
            f"{model_path}: the {chosen} backend opens {' and '.join(entry.suffixes)} files; "
            f"a {suffix or 'suffix-less'} file opens on {' or '.join(owners) or 'none'}"
            + ("; export the checkpoint to ONNX first" if suffix == ".pt" else "")
        )
    why_precision = "asked for"
    if precision is None and suffix == ".onnx" and chosen in FAST_DEFAULT_BACKENDS:
        from defectd.engines.model_file import fast_precision  # noqa: PLC0415
        from defectd.model.card import load_card  # noqa: PLC0415

        runnable = entry.probe().precisions
        precision, why_precision = fast_precision(
            model_path, load_card(model_path), runnable, chosen
        )
    request = OpenRequest(
        model_path=model_path,
        backend=chosen,
        precisions=entry.precisions,
        precision=precision,
        min_batch=min_batch,
        max_batch=max_batch,
        threads=threads,
        cache_dir=cache_dir,
        opt_batch=opt_batch,
        expect=expect,
        build_progress=build_progress,
        mode=mode,
        remote=remote,
    )
    engine = entry.load()(request)
    log.info(
        "engine_selected",
        engine=engine.name,
        backend=engine.name.split("-")[0],
        precision=engine.precision,
        version=engine.version,
        model=str(model_path),
        batch_range=f"{engine.spec.min_batch}..{engine.spec.max_batch}",
        reason=reason,
        precision_reason=why_precision,
    )
    return engine
