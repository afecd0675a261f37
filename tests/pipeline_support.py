"""Real, small models and frames for the pipeline tests.

``brightness_model`` writes a real ONNX graph (3x3 mean filter, then a steep sigmoid around a
grey level) that ONNX Runtime runs: bright spots on a dark part become defects with a known
position and size, so tiling, stitching and post-processing can be checked exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper

from defectd.engines.base import EngineSpec
from defectd.errors import EngineError
from defectd.model.card import InputSpec, ModelCard, Normalisation, file_sha256
from defectd.pipeline.frame import Frame


def brightness_model(
    out: Path, *, channels: int = 1, size: int = 64, level: float = 0.5, gain: float = 40.0
) -> ModelCard:
    """ONNX ``image`` (N,C,H,W) -> ``prob`` (N,1,H,W) = sigmoid(gain * (mean3x3(x) - level)).

    With the card's normalisation (scale 255, mean 0, std 1) ``x`` is the pixel / 255, so
    pixels brighter than ``level * 255`` have probability > 0.5.
    """
    weight = np.full((1, channels, 3, 3), 1.0 / (9 * channels), np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["m"], pads=[1, 1, 1, 1]),
        helper.make_node("Sub", ["m", "level"], ["d"]),
        helper.make_node("Mul", ["d", "gain"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "brightness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, size, size])],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel()),
            helper.make_tensor("level", TensorProto.FLOAT, [], [level]),
            helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    card = ModelCard(
        name="brightness",
        input=InputSpec(channels=channels, height=size, width=size, resize="tile"),  # type: ignore[arg-type]
        normalisation=Normalisation(scale=255.0, mean=(0.0,) * channels, std=(1.0,) * channels),
        threshold=0.5,
        sha256=file_sha256(out),
    )
    card.save(out.with_name(out.stem + ".card.json"))
    return card


class OrtTestEngine:
    """The Engine contract over a plain ONNX Runtime session (one thread), optionally slowed
    down or made to fail, to exercise the pipeline's fail-safe paths."""

    def __init__(self, path: Path, card: ModelCard, *, max_batch: int = 16) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._path = path
        i = card.input
        self._spec = EngineSpec(i.channels, i.height, i.width, 1, max_batch)
        self.delay_s = 0.0
        self.fail_next = 0
        self.nan_next = 0
        self.calls = 0

    @property
    def name(self) -> str:
        return "ort-fp32"

    @property
    def version(self) -> str:
        return str(ort.__version__)

    @property
    def spec(self) -> EngineSpec:
        return self._spec

    @property
    def model_file(self) -> Path:
        return self._path

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        self._spec.check(batch)
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise EngineError("simulated runtime failure")
        out: NDArray[np.float32] = self._session.run(["prob"], {"image": batch})[0]
        if self.nan_next > 0:
            self.nan_next -= 1
            out[:, :, :2, :2] = np.nan
        return out

    def close(self) -> None:
        pass


def dark_frame(
    h: int,
    w: int,
    *,
    camera: str = "cam0",
    seq: int = 0,
    spots: list[tuple[int, int, int, int]] | None = None,
    value: int = 235,
    channels: int = 1,
    **kw: Any,
) -> Frame:
    """A dark ``(h, w)`` (or RGB) uint8 frame with rectangles ``(x, y, width, height)`` of
    brightness ``value``, grabbed now."""
    img = np.full((h, w), 20, np.uint8)
    for x, y, sw, sh in spots or []:
        img[y : y + sh, x : x + sw] = value
    if channels == 3:
        img = np.repeat(img[:, :, None], 3, axis=2)
    kw.setdefault("t_host_ns", time.monotonic_ns())
    return Frame(station="st1", camera=camera, seq=seq, image=img, t_wall=time.time(), **kw)
