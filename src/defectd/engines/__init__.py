"""Inference engines behind one contract: OpenVINO, ONNX Runtime, TensorRT, torch, and a Triton
Inference Server (``triton``: the model runs on a shared server).

``open_engine(path, backend="auto"|"openvino"|"ort"|"torch"|"tensorrt"|"triton", precision=...)``
returns an ``Engine``; backends import their runtime only when opened.
"""

from defectd.engines.base import Engine, EngineSpec
from defectd.engines.registry import (
    BACKENDS,
    BackendInfo,
    available_backends,
    choose_backend,
    open_engine,
)

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "Engine",
    "EngineSpec",
    "available_backends",
    "choose_backend",
    "open_engine",
]
