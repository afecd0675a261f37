"""TensorRT plan cache: keys, optimisation profiles and the plan file format (no GPU needed).

A TensorRT plan only runs on the GPU model and TensorRT version it was built with, for the
shapes of its optimisation profile. So each plan is stored under a key made of everything
that decides it: the sha256 of the ONNX actually built (after fp16 conversion, if any),
the precision, the input ``C, H, W``, the output channels ``K`` (one per class of the card;
left out of the key's JSON for a one-class model, so its plans keep their names), the batch
profile ``min/opt/max``, the TensorRT version and the GPU's name and compute capability.
The key travels *inside* the plan file (a small JSON header before the serialised engine,
with the plan's own sha256), so a plan copied without its key cannot exist; a plan whose key
does not match is rebuilt, never loaded.

File layout: ``b"DEFECTD-TRT-PLAN\\n"``, 4-byte little-endian header length, UTF-8 JSON
header ``{"key": {...}, "plan_sha256": "..."}``, then the TensorRT plan bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from defectd.errors import EngineError
from defectd.log import get_logger

log = get_logger(__name__)

MAGIC = b"DEFECTD-TRT-PLAN\n"
_LEN = struct.Struct("<I")
PLAN_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Profile:
    """Batch sizes of a TensorRT optimisation profile: ``1 <= min <= opt <= max``.

    TensorRT tunes kernels for ``opt`` and accepts any batch in ``min..max``.
    """

    min: int
    opt: int
    max: int

    @classmethod
    def make(cls, min_batch: int, max_batch: int, opt_batch: int | None = None) -> Profile:
        """Validated profile; ``opt`` defaults to ``max`` (a loaded line fills its batches).

        Raises ``EngineError`` naming the option that is out of range.
        """
        opt = max_batch if opt_batch is None else opt_batch
        if min_batch < 1:
            raise EngineError(f"--min-batch {min_batch}: must be at least 1")
        if max_batch < min_batch:
            raise EngineError(f"--max-batch {max_batch}: must be >= --min-batch {min_batch}")
        if not min_batch <= opt <= max_batch:
            raise EngineError(
                f"--opt-batch {opt}: must lie in --min-batch..--max-batch "
                f"({min_batch}..{max_batch})"
            )
        return cls(min_batch, opt, max_batch)

    def shapes(
        self, chw: tuple[int, int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(min, opt, max)`` input shapes ``(N, C, H, W)`` for ``set_shape``."""
        return ((self.min, *chw), (self.opt, *chw), (self.max, *chw))

    def covers(self, min_batch: int, max_batch: int) -> bool:
        return self.min <= min_batch and max_batch <= self.max


@dataclass(frozen=True, slots=True)
class Device:
    """The build target: TensorRT version and the GPU (name, compute capability ``"9.0"``)."""

    tensorrt: str
    gpu: str
    compute_capability: str


@dataclass(frozen=True, slots=True)
class PlanKey:
    """Everything a plan depends on; equal keys mean the plan may be loaded."""

    onnx_sha256: str
    precision: str
    channels: int
    height: int
    width: int
    min_batch: int
    opt_batch: int
    max_batch: int
    tensorrt: str
    gpu: str
    compute_capability: str
    format: int = PLAN_FORMAT
    outputs: int = 1  # probability channels out: one per class of the card

    @classmethod
    def make(
        cls,
        onnx_sha256: str,
        precision: str,
        chw: tuple[int, int, int],
        profile: Profile,
        device: Device,
        *,
        outputs: int = 1,
    ) -> PlanKey:
        return cls(
            onnx_sha256=onnx_sha256,
            precision=precision,
            channels=chw[0],
            height=chw[1],
            width=chw[2],
            min_batch=profile.min,
            opt_batch=profile.opt,
            max_batch=profile.max,
            tensorrt=device.tensorrt,
            gpu=device.gpu,
            compute_capability=device.compute_capability,
            outputs=outputs,
        )

    @property
    def profile(self) -> Profile:
        return Profile(self.min_batch, self.opt_batch, self.max_batch)

    @property
    def device(self) -> Device:
        return Device(self.tensorrt, self.gpu, self.compute_capability)

    def as_dict(self) -> dict[str, Any]:
        """The key as stored and hashed: ``outputs`` only where it is not 1, so a one-class
        model's key (and the name of its plan) is what it was before keys had outputs."""
        data = asdict(self)
        if data["outputs"] == 1:
            del data["outputs"]
        return data

    def digest(self) -> str:
        """sha256 of the key's canonical JSON; names the plan file."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def differences(self, other: PlanKey) -> list[str]:
        """``"field: self_value != other_value"`` for every field that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanKey:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not names - {"format", "outputs"} <= data.keys():
            raise ValueError("plan key is incomplete")
        return cls(**{k: v for k, v in data.items() if k in names})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def plan_path(cache_dir: Path, model_stem: str, key: PlanKey) -> Path:
    """``cache_dir/<stem>-<precision>-b<min>-<opt>-<max>-<gpu>-sm<cc>-<digest12>.plan``."""
    return cache_dir / (
        f"{model_stem}-{key.precision}-b{key.min_batch}-{key.opt_batch}-{key.max_batch}-"
        f"{_slug(key.gpu)}-sm{key.compute_capability.replace('.', '')}-{key.digest()[:12]}.plan"
    )


def timing_cache_path(cache_dir: Path, device: Device) -> Path:
    """One timing cache per TensorRT version and GPU model; reused by every build on it."""
    return cache_dir / (
        f"timing-trt{_slug(device.tensorrt)}-{_slug(device.gpu)}"
        f"-sm{device.compute_capability.replace('.', '')}.cache"
    )


def write_plan(path: Path, key: PlanKey, plan: bytes) -> None:
    """Write key header + plan atomically (temp file + rename): readers never see half a plan."""
    header = json.dumps(
        {"key": key.as_dict(), "plan_sha256": hashlib.sha256(plan).hexdigest()}, sort_keys=True
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(MAGIC)
        fh.write(_LEN.pack(len(header)))
        fh.write(header)
        fh.write(plan)
    tmp.replace(path)


def read_plan(path: Path) -> tuple[PlanKey, bytes]:
    """The stored key and the plan bytes; ``EngineError`` naming the file when it is not a
    defectd plan, is truncated or its bytes do not match the recorded sha256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EngineError(f"{path}: cannot read plan ({exc.strerror})") from exc
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LEN.size:
        raise EngineError(
            f"{path}: not a defectd TensorRT plan (build it with `defectd build-engine`)"
        )
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(data[start : start + n])
        key = PlanKey.from_dict(header["key"])
        want = str(header["plan_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"{path}: plan header is damaged ({exc})") from exc
    plan = data[start + n :]
    if hashlib.sha256(plan).hexdigest() != want:
        raise EngineError(f"{path}: plan is truncated or damaged (sha256 mismatch)")
    return key, plan


def load_cached(path: Path, key: PlanKey) -> bytes | None:
    """The plan at ``path`` if its stored key equals ``key``; ``None`` (rebuild) otherwise.

    A missing, damaged or foreign plan is never loaded; the reason is logged.
    """
    if not path.is_file():
        return None
    try:
        stored, plan = read_plan(path)
    except EngineError as exc:
        log.warning("plan_unusable", plan=str(path), reason=str(exc))
        return None
    if stored != key:
        log.info("plan_stale", plan=str(path), differences=stored.differences(key))
        return None
    return plan


def check_device(path: Path, stored: PlanKey, device: Device) -> None:
    """A plan given by path must have been built for this GPU and TensorRT version."""
    if stored.device != device:
        raise EngineError(
            f"{path}: plan was built for {stored.gpu} (sm {stored.compute_capability}) with "
            f"TensorRT {stored.tensorrt}; this is {device.gpu} (sm {device.compute_capability}) "
            f"with TensorRT {device.tensorrt}: rebuild it with `defectd build-engine`"
        )
