"""A Triton model repository for one defectd model: ``config.pbtxt`` plus the versioned file.

Three forms (``kind``):

- ``onnxruntime_onnx``: the ONNX model on Triton's ONNX Runtime backend (GPU servers; CPU too
  where the server has that backend); ``--accelerator tensorrt`` lets it build TensorRT engines;
- ``tensorrt_plan``: a TensorRT plan built on the server's GPU model and TensorRT version
  (``defectd build-engine --backend tensorrt`` there); without one, the config and the ONNX
  to build it from are written and the plan's place is named;
- ``python``: Triton's Python backend running the ONNX model with ONNX Runtime on the CPU
  (servers without the ONNX Runtime backend, e.g. the one in the ``nvidia-pytriton`` wheel).

Every form carries the model's identity in ``parameters``: ``defectd_sha256`` (of the ONNX file
the station holds, which its verdicts name) and ``defectd_model`` (the card's name); the
``triton`` engine refuses a server whose parameters disagree with the station's model.
Dynamic batching (preferred sizes, queue delay) and instance groups come from the options.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from defectd.engines.model_file import read_onnx_io
from defectd.errors import ConfigError, ModelError
from defectd.model.card import card_path, file_sha256, load_card

Kind = Literal["onnxruntime_onnx", "tensorrt_plan", "python"]
KINDS: tuple[Kind, ...] = ("onnxruntime_onnx", "tensorrt_plan", "python")
INPUT_NAME = "image"
OUTPUT_NAME = "prob"

# The Python backend's model: ONNX Runtime on the CPU. Tensors cross the stub through DLPack:
# the stub's numpy interface was built for numpy 1.x and reads numpy 2 arrays as empty.
MODEL_PY = '''"""A defectd model on Triton's Python backend: ONNX Runtime on the CPU."""

import json
import os
import sys


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # The backend stub runs an isolated interpreter: it does not see the environment's
        # packages unless told where they are.
        for path in params.get("python_path", "").split(os.pathsep):
            if path and path not in sys.path:
                sys.path.append(path)
        import numpy as np
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.np = np
        self.pb = pb_utils
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        opts.inter_op_num_threads = 1
        onnx_file = os.path.join(os.path.dirname(__file__), params.get("onnx_file", "model.onnx"))
        self.session = ort.InferenceSession(
            onnx_file, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def execute(self, requests):
        np, pb = self.np, self.pb
        images = [np.from_dlpack(pb.get_input_tensor_by_name(r, "image")) for r in requests]
        sizes = [len(x) for x in images]
        batch = images[0] if len(images) == 1 else np.concatenate(images)
        probs = self.session.run([self.output], {self.input: np.ascontiguousarray(batch)})[0]
        responses, start = [], 0
        for n in sizes:
            part = np.ascontiguousarray(probs[start : start + n], dtype=np.float32)
            responses.append(pb.InferenceResponse([pb.Tensor.from_dlpack("prob", part)]))
            start += n
        return responses
'''


@dataclass(frozen=True, slots=True)
class RepoOptions:
    """How the server should serve the model.

    ``max_batch`` is the config's ``max_batch_size`` (the largest batch a station may send);
    ``preferred_batch`` the sizes the dynamic batcher aims for (empty: let it choose);
    ``max_queue_delay_us`` how long it may hold a request to fill a batch; ``instances`` model
    copies per device of ``instance_kind`` (``gpu`` or ``cpu``; default: ``cpu`` for
    ``python``, ``gpu`` otherwise); ``gpus`` the device ids for ``gpu`` (empty: all).
    """

    name: str | None = None
    version: int = 1
    max_batch: int = 16
    preferred_batch: tuple[int, ...] = ()
    max_queue_delay_us: int = 1000
    instances: int = 1
    instance_kind: Literal["gpu", "cpu"] | None = None
    gpus: tuple[int, ...] = ()
    accelerator: Literal["tensorrt"] | None = None
    fp16: bool = False
    intra_op_threads: int = 0
    python_path: tuple[str, ...] = ()

    def check(self) -> None:
        """``ConfigError`` naming the option that cannot work."""
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch}: must be at least 1")
        if self.version < 1:
            raise ConfigError(f"--version {self.version}: Triton model versions start at 1")
        if self.instances < 1:
            raise ConfigError(f"--instances {self.instances}: must be at least 1")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"--max-queue-delay-us {self.max_queue_delay_us}: must be >= 0")
        bad = [b for b in self.preferred_batch if not 1 <= b <= self.max_batch]
        if bad:
            raise ConfigError(
                f"--preferred-batch {bad[0]}: must lie in 1..{self.max_batch} (--max-batch)"
            )


@dataclass(frozen=True, slots=True)
class Repository:
    """What ``write_repository`` wrote: the model's directory, its config and what is missing."""

    root: Path
    model_dir: Path
    config: Path
    name: str
    kind: Kind
    sha256: str
    missing: tuple[str, ...] = ()


def default_python_path() -> tuple[str, ...]:
    """This interpreter's site-packages: where the Python backend finds numpy and ONNX Runtime
    when the server runs on this machine."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return tuple(sorted(paths))


def _q(text: str) -> str:
    return json.dumps(text)  # a pbtxt string literal: double quotes, backslash escapes


def render_config(
    name: str,
    kind: Kind,
    chw: tuple[int, int, int],
    options: RepoOptions,
    parameters: dict[str, str],
    *,
    outputs: int = 1,
) -> str:
    """The ``config.pbtxt`` text for ``kind`` (input ``image`` and output ``prob`` are float32
    ``(N, C, H, W)`` and ``(N, K, H, W)``, ``K = outputs``: one channel per class of the card;
    for ONNX/TensorRT the names are the model's own, given in
    ``parameters['input']``/``['output']``)."""
    c, h, w = chw
    in_name = parameters.get("input", INPUT_NAME) if kind != "python" else INPUT_NAME
    out_name = parameters.get("output", OUTPUT_NAME) if kind != "python" else OUTPUT_NAME
    lines = [f"name: {_q(name)}"]
    if kind == "python":
        lines.append('backend: "python"')
    else:
        lines.append(f"platform: {_q(kind)}")
    lines += [
        f"max_batch_size: {options.max_batch}",
        f"input [ {{ name: {_q(in_name)} data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }} ]",
        f"output [ {{ name: {_q(out_name)} data_type: TYPE_FP32 dims: [ {outputs}, {h}, {w} ] }} ]",
    ]
    batching = f"max_queue_delay_microseconds: {options.max_queue_delay_us}"
    if options.preferred_batch:
        sizes = ", ".join(str(b) for b in options.preferred_batch)
        batching = f"preferred_batch_size: [ {sizes} ] " + batching
    lines.append(f"dynamic_batching {{ {batching} }}")
    kind_name = options.instance_kind or ("cpu" if kind == "python" else "gpu")
    group = f"count: {options.instances} kind: KIND_{kind_name.upper()}"
    if kind_name == "gpu" and options.gpus:
        group += f" gpus: [ {', '.join(str(g) for g in options.gpus)} ]"
    lines.append(f"instance_group [ {{ {group} }} ]")
    if kind == "onnxruntime_onnx" and options.accelerator == "tensorrt":
        precision = "FP16" if options.fp16 else "FP32"
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator : [ { "
            'name : "tensorrt" parameters { key: "precision_mode" value: '
            f'"{precision}" }} }} ] }} }}'
        )
    for key, value in parameters.items():
        if key in ("input", "output"):
            continue
        lines.append(f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(value)} }} }}")
    return "\n".join(lines) + "\n"


def write_repository(
    model_path: Path,
    root: Path,
    kind: Kind,
    options: RepoOptions | None = None,
    *,
    plan: Path | None = None,
    force: bool = False,
) -> Repository:
    """Write ``root/<name>/config.pbtxt`` and ``root/<name>/<version>/`` for ``model_path``
    (an ``.onnx`` with its card beside it). ``plan``: the TensorRT plan for ``tensorrt_plan``.

    Raises ``ModelError`` for a model that cannot be read, ``ConfigError`` for bad options or
    an existing model directory (unless ``force``).
    """
    options = options or RepoOptions()
    options.check()
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
    model_path = Path(model_path)
    card = load_card(model_path)
    io = read_onnx_io(model_path)
    if isinstance(io.input_shape[0], int):
        raise ModelError(
            f"{model_path}: has a fixed batch of {io.input_shape[0]}; Triton's dynamic batching "
            "needs a dynamic batch dimension (export again)"
        )
    if plan is not None and kind != "tensorrt_plan":
        raise ConfigError("--plan is for --triton-kind tensorrt_plan only")
    if plan is not None and not plan.is_file():
        raise ConfigError(f"--plan: file not found: {plan}")
    name = options.name or card.name
    model_dir = Path(root) / name
    if model_dir.exists():
        if not force:
            raise ConfigError(f"{model_dir} exists; pass --force to replace it")
        shutil.rmtree(model_dir)
    version_dir = model_dir / str(options.version)
    version_dir.mkdir(parents=True)
    sha = file_sha256(model_path)
    params = {
        "defectd_sha256": sha,
        "defectd_model": card.name,
        "input": io.input_name,
        "output": io.output_name,
    }
    missing: list[str] = []
    if kind == "python":
        shutil.copyfile(model_path, version_dir / "model.onnx")
        (version_dir / "model.py").write_text(MODEL_PY)
        params["onnx_file"] = "model.onnx"
        params["intra_op_threads"] = str(options.intra_op_threads)
        python_path = options.python_path or default_python_path()
        params["python_path"] = ":".join(python_path)
    elif kind == "onnxruntime_onnx":
        shutil.copyfile(model_path, version_dir / "model.onnx")
    else:
        # The plan is built from this ONNX on the server's GPU; keep the source beside it.
        shutil.copyfile(model_path, model_dir / "source.onnx")
        if plan is not None:
            shutil.copyfile(plan, version_dir / "model.plan")
            params["defectd_plan_sha256"] = file_sha256(plan)
        else:
            missing.append(str(version_dir / "model.plan"))
    shutil.copyfile(card_path(model_path), model_dir / "model.card.json")
    config = model_dir / "config.pbtxt"
    chw = (card.input.channels, card.input.height, card.input.width)
    config.write_text(render_config(name, kind, chw, options, params, outputs=len(card.classes)))
    return Repository(Path(root), model_dir, config, name, kind, sha, tuple(missing))
