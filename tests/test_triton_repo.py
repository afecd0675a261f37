"""``defectd build-engine --backend triton``: the model repository, read back with Triton's own
``ModelConfig`` schema (tritonclient's ``model_config_pb2``), for each kind of server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from defectd.cli import main
from defectd.model.card import file_sha256

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def _config(path: Path) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _write(
    tiny_model: Path, repo: Path, *args: str, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    argv = ["build-engine", "--backend", "triton", "--model", str(tiny_model), "--repo", str(repo)]
    assert main([*argv, *args, "--json"]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out)
    return summary


def test_onnxruntime_repository_batches_dynamically_on_gpu_instances(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--max-batch", "16", "--preferred-batch", "8", "--preferred-batch", "16"]
    args += ["--max-queue-delay-us", "2000", "--instances", "2", "--tensorrt-accelerator"]
    summary = _write(tiny_model, tmp_path / "repo", *args, capsys=capsys)
    model_dir = tmp_path / "repo" / "tiny"
    config = _config(model_dir / "config.pbtxt")
    assert summary["kind"] == "onnxruntime_onnx" and summary["missing"] == []
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert list(config.input[0].dims) == [1, 64, 64] and list(config.output[0].dims) == [1, 64, 64]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    group = config.instance_group[0]
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt"
    assert config.parameters["defectd_sha256"].string_value == file_sha256(tiny_model)
    assert (model_dir / "1" / "model.onnx").read_bytes() == tiny_model.read_bytes()


def test_tensorrt_repository_names_the_plan_it_still_needs_or_takes_the_one_given(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = _write(tiny_model, tmp_path / "a", "--triton-kind", "tensorrt_plan", capsys=capsys)
    assert summary["missing"] == [str(tmp_path / "a" / "tiny" / "1" / "model.plan")]
    assert (tmp_path / "a" / "tiny" / "source.onnx").is_file()
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan bytes")
    args = ["--triton-kind", "tensorrt_plan", "--plan", str(plan), "--name", "tiny_trt"]
    summary = _write(tiny_model, tmp_path / "b", *args, capsys=capsys)
    config = _config(tmp_path / "b" / "tiny_trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and summary["missing"] == []
    assert config.parameters["defectd_plan_sha256"].string_value == file_sha256(plan)
    assert config.parameters["defectd_sha256"].string_value == file_sha256(tiny_model)


def test_python_repository_runs_on_cpu_instances_and_refuses_to_overwrite(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tiny_model, tmp_path / "repo", "--triton-kind", "python", capsys=capsys)
    config = _config(tmp_path / "repo" / "tiny" / "config.pbtxt")
    assert config.backend == "python"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (tmp_path / "repo" / "tiny" / "1" / "model.py").is_file()
    argv = ["build-engine", "--backend", "triton", "--model", str(tiny_model)]
    assert main([*argv, "--repo", str(tmp_path / "repo"), "--triton-kind", "python"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--triton-kind", "python"]) == 2
    assert "--repo DIR" in capsys.readouterr().err
    assert main([*argv, "--repo", str(tmp_path / "x"), "--preferred-batch", "32"]) == 2
    assert "--preferred-batch 32" in capsys.readouterr().err
