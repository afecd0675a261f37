"""What importing a module costs: parsing a station config loads no inference runtime, and the
runtime packages load neither torch nor the training code."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported(statement: str) -> set[str]:
    """Top-level names of every module a fresh interpreter imports for ``statement``."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    names = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_parsing_a_station_config_loads_neither_onnxruntime_nor_openvino() -> None:
    modules = _imported("import defectd.daemon.config")
    assert "defectd.daemon.config" in modules
    assert "onnxruntime" not in modules
    assert "openvino" not in modules


@pytest.mark.parametrize(
    "module", ["defectd.daemon.service", "defectd.pipeline.runner", "defectd.publish.mqtt"]
)
def test_runtime_modules_load_neither_torch_nor_training(module: str) -> None:
    modules = _imported(f"import {module}")
    assert module in modules
    assert "torch" not in modules
    assert not {m for m in modules if m.startswith("defectd.training")}


@pytest.mark.parametrize("module", ["defectd.daemon.service", "defectd.engines"])
def test_the_station_loads_tritonclient_only_when_the_triton_engine_is_chosen(module: str) -> None:
    modules = _imported(f"import {module}; import defectd.engines as e; e.available_backends()")
    assert module in modules
    assert not {m for m in modules if m.startswith(("tritonclient", "grpc", "gevent"))}
