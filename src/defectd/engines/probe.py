"""What this machine offers, asked without importing a runtime where that can be avoided.

``gpu_present`` looks for NVIDIA device nodes before it imports torch; ``module_version``
reads distribution metadata. Used by the registry's availability probes and ``auto`` choice.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path

from defectd.extras import install_hint

INSTALL_HINT = install_hint("gpu")


def gpu_present() -> bool:
    """True when torch sees a CUDA device (the TensorRT backend's buffers are torch tensors).

    Machines without NVIDIA device nodes answer without importing torch (seconds of start-up
    for a CPU station that runs ONNX models only).
    """
    dev = Path("/dev")
    if not any(dev.glob("nvidia[0-9]*")) and not (dev / "nvhost-ctrl-gpu").exists():
        return False
    import torch  # noqa: PLC0415  (deferred: torch is heavy)

    return bool(torch.cuda.is_available())


def installed(name: str) -> bool:
    """Whether module ``name`` can be imported (found, not imported)."""
    return importlib.util.find_spec(name) is not None


def module_version(name: str) -> str | None:
    """Installed version of ``name``, from its distribution metadata when it has one (no import)."""
    if not installed(name):
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


def ort_cuda() -> bool:
    """ONNX Runtime offers its CUDA provider (imports onnxruntime)."""
    import onnxruntime as ort  # noqa: PLC0415  (only asked where a GPU is present)

    return "CUDAExecutionProvider" in ort.get_available_providers()
