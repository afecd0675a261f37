"""``defectd build-engine`` and ``defectd engines`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defectd.cli import main


def test_build_engine_compiles_validates_and_reports_json(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "build-engine", "--model", str(tiny_model), "--backend", "openvino",
            "--precision", "fp32", "--max-batch", "4", "--cache-dir", str(tmp_path), "--json",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert summary["engine"] == "openvino-fp32"
    assert summary["batch"] == [1, 4]
    assert set(summary["first_run_ms"]) == {"1", "4"}


def test_build_engine_for_tensorrt_without_gpu_is_one_clear_error(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("defectd.engines.tensorrt_backend")
    from defectd.engines.tensorrt_backend import gpu_present

    if gpu_present():
        pytest.skip("a GPU is present")
    code = main(
        [
            "build-engine", "--model", str(tiny_model), "--backend", "tensorrt",
            "--precision", "fp16", "--cache-dir", str(tmp_path),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no NVIDIA GPU")
    assert "pip install defectd[gpu]" in last


def test_build_engine_with_a_bad_profile_names_the_option(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["build-engine", "--model", str(tiny_model), "--min-batch", "8", "--max-batch", "4"]
    )
    assert code == 2
    assert "--max-batch 4" in capsys.readouterr().err


def test_engines_lists_backends_and_the_auto_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["engines", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = [b["name"] for b in listing["backends"]]
    assert names == ["torch", "ort", "openvino", "tensorrt", "triton"]
    assert listing["auto"] in names and listing["reason"]
