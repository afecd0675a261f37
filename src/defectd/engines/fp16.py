"""fp16 ONNX for TensorRT's strongly typed networks: weights and activations in half precision,
the model's input and output kept float32 so callers feed and read the same arrays.

TensorRT 11 takes precision from the ONNX types only (no FP16 builder flag), so an fp16 engine
needs an fp16 model. The conversion is ONNX Runtime's own float16 converter (ships with the
``onnxruntime`` wheel): it casts initialisers, retypes tensors and inserts a Cast at the input
and the output.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from defectd.errors import ModelError
from defectd.log import get_logger

log = get_logger(__name__)


def convert_fp16(onnx_in: Path, onnx_out: Path) -> None:
    """Write an fp16 copy of ``onnx_in`` with float32 I/O at ``onnx_out`` (atomically).

    Raises ``ModelError`` naming the file when it cannot be read or converted.
    """
    try:
        model = onnx.load(str(onnx_in))
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ModelError(f"{onnx_in}: not a readable ONNX model ({type(exc).__name__})") from exc
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # the converter raises ValueError/KeyError on odd graphs
        raise ModelError(f"{onnx_in}: fp16 conversion failed: {exc}") from exc
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_out.with_name(f".{onnx_out.name}.tmp")
    onnx.save(half, str(tmp))
    tmp.replace(onnx_out)
    log.info("converted_fp16", model=str(onnx_in), out=str(onnx_out))
