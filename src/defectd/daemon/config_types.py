"""Field types that several sections of the station config check the same way.

``[model]`` and ``[shadow]`` both name a model file and a backend, ``[[cameras]]`` and
``[shadow]`` a calibration file: ``ModelFile`` and ``CalibrationFile`` must exist,
``BackendName`` must be one the engine registry knows. Each is a pydantic ``Annotated`` type, so
a section declares ``path: ModelFile`` and the error names the key like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from defectd.engines.registry import BACKENDS


def _known_backend(value: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"unknown backend {value!r}; choose one of {', '.join(BACKENDS)}")
    return value


def _existing(what: str) -> AfterValidator:
    """Checks that a path names a file; the error: ``<what> file not found: <path>``."""

    def check(value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"{what} file not found: {value}")
        return value

    return AfterValidator(check)


BackendName = Annotated[str, AfterValidator(_known_backend)]
"""A backend of ``defectd.engines.registry.BACKENDS`` (``auto`` included)."""

ModelFile = Annotated[Path, _existing("model")]
"""A model file that exists (``.onnx`` with its card beside it, or a ``.pt`` checkpoint)."""

CalibrationFile = Annotated[Path, _existing("calibration")]
"""A calibration file (JSON, ``defectd calibrate``) that exists."""
