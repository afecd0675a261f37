"""TensorRT: plan keys, profiles, cache invalidation and errors (no GPU needed); a GPU build test.

The GPU test builds a real plan from the tiny model and checks parity with ONNX Runtime; it
runs only where torch sees a CUDA device and ``tensorrt`` is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from defectd.engines import open_engine
from defectd.engines.base import EngineSpec, OpenRequest
from defectd.engines.plan_cache import (
    Device,
    PlanKey,
    Profile,
    check_device,
    load_cached,
    plan_path,
    read_plan,
    timing_cache_path,
    write_plan,
)
from defectd.engines.tensorrt_backend import PRECISIONS, resolve_plan
from defectd.errors import EngineError
from defectd.model import card_path, load_card

H100 = Device(tensorrt="10.13.0.35", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
ORIN = Device(tensorrt="10.3.0.30", gpu="Orin (nvgpu)", compute_capability="8.7")
SPEC = EngineSpec(channels=1, height=64, width=64, min_batch=1, max_batch=8)

has_gpu_and_trt = torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def key(**changes: object) -> PlanKey:
    base = PlanKey.make("ab" * 32, "fp16", (1, 64, 64), Profile(1, 4, 8), H100)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_profile_defaults_opt_to_max_and_gives_nchw_shapes() -> None:
    profile = Profile.make(1, 16)
    assert profile == Profile(1, 16, 16)
    assert profile.shapes((3, 256, 320)) == ((1, 3, 256, 320), (16, 3, 256, 320), (16, 3, 256, 320))


@pytest.mark.parametrize(
    ("lo", "hi", "opt", "option"),
    [(0, 4, None, "--min-batch 0"), (4, 2, None, "--max-batch 2"), (1, 8, 9, "--opt-batch 9")],
)
def test_profile_out_of_range_names_the_option(
    lo: int, hi: int, opt: int | None, option: str
) -> None:
    with pytest.raises(EngineError, match=option):
        Profile.make(lo, hi, opt)


def test_profile_covers_only_batches_inside_it() -> None:
    assert Profile(2, 4, 8).covers(2, 8)
    assert not Profile(2, 4, 8).covers(1, 8)
    assert not Profile(2, 4, 8).covers(2, 16)


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "cd" * 32},
        {"precision": "int8"},
        {"height": 128},
        {"opt_batch": 8},
        {"max_batch": 16},
        {"tensorrt": "11.0.0"},
        {"gpu": "NVIDIA A100"},
        {"compute_capability": "8.0"},
    ],
)
def test_every_key_field_changes_the_plan_file(tmp_path: Path, change: dict[str, object]) -> None:
    assert key(**change).digest() != key().digest()
    assert plan_path(tmp_path, "model", key(**change)) != plan_path(tmp_path, "model", key())


def test_plan_file_name_says_what_it_is_for(tmp_path: Path) -> None:
    name = plan_path(tmp_path, "model", key()).name
    assert name.startswith("model-fp16-b1-4-8-nvidia-h100-80gb-hbm3-sm90-")
    assert name.endswith(".plan")
    assert (
        timing_cache_path(tmp_path, H100).name
        == "timing-trt10.13.0.35-nvidia-h100-80gb-hbm3-sm90.cache"
    )


def test_plan_round_trips_with_its_key_inside(tmp_path: Path) -> None:
    path = tmp_path / "m.plan"
    write_plan(path, key(), b"serialised engine bytes")
    stored, plan = read_plan(path)
    assert stored == key()
    assert plan == b"serialised engine bytes"
    assert load_cached(path, key()) == b"serialised engine bytes"


def test_plan_with_another_key_is_not_loaded_and_the_reason_is_logged(tmp_path: Path) -> None:
    path = tmp_path / "m.plan"
    write_plan(path, key(), b"plan")
    with capture_logs() as logs:
        assert load_cached(path, key(gpu="NVIDIA A100", compute_capability="8.0")) is None
    (event,) = [e for e in logs if e["event"] == "plan_stale"]
    assert any(d.startswith("gpu:") for d in event["differences"])


def test_damaged_plan_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "m.plan"
    write_plan(path, key(), b"plan bytes")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(EngineError, match=r"m\.plan: plan is truncated or damaged"):
        read_plan(path)
    assert load_cached(path, key()) is None


def test_foreign_file_is_not_a_plan(tmp_path: Path) -> None:
    path = tmp_path / "engine.plan"
    path.write_bytes(b"\x00\x01raw trtexec output")
    with pytest.raises(EngineError, match=r"engine\.plan: not a defectd TensorRT plan"):
        read_plan(path)


def test_plan_for_another_gpu_names_both_gpus(tmp_path: Path) -> None:
    path = tmp_path / "station.plan"
    with pytest.raises(
        EngineError, match=r"station\.plan: plan was built for Orin .*this is NVIDIA H100"
    ):
        check_device(path, key(**dataclasses.asdict(ORIN)), H100)
    check_device(path, key(), H100)  # same device: fine


def test_fp16_plan_builds_from_an_fp16_copy_with_float32_io(
    tiny_model: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    onnx_path, k, plan = resolve_plan(
        tiny_model, load_card(tiny_model), SPEC, precision="fp16", device=H100, cache_dir=tmp_path
    )
    assert onnx_path.parent == tmp_path and onnx_path.name.startswith("model.fp16-")
    assert k.precision == "fp16" and (k.min_batch, k.opt_batch, k.max_batch) == (1, 8, 8)
    assert plan.parent == tmp_path
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_outputs()[0].type == "tensor(float)"
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    diff = np.abs(session.run(None, {"image": x})[0] - ref.run(None, {"image": x})[0]).max()
    assert diff < 5e-3


def test_changed_model_invalidates_the_cached_plan(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_model, model)
    shutil.copy(card_path(tiny_model), card_path(model))
    cache = tmp_path / "cache"
    _, k1, plan1 = resolve_plan(
        model, load_card(model), SPEC, precision="fp32", device=H100, cache_dir=cache
    )
    write_plan(plan1, k1, b"plan for the first model")
    assert load_cached(plan1, k1) == b"plan for the first model"
    model.write_bytes(model.read_bytes() + b"\x00")  # any change to the ONNX bytes
    _, k2, plan2 = resolve_plan(
        model, load_card(model), SPEC, precision="fp32", device=H100, cache_dir=cache
    )
    assert k2.onnx_sha256 != k1.onnx_sha256
    assert load_cached(plan2, k2) is None  # rebuilt, never loaded


def test_int8_plan_needs_a_qdq_model(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"TensorRT int8 needs a QDQ ONNX"):
        resolve_plan(
            tiny_model,
            load_card(tiny_model),
            SPEC,
            precision="int8",
            device=H100,
            cache_dir=tmp_path,
        )


def test_int8_plan_refuses_a_uint8_qdq_model(tiny_int8_model: Path, tmp_path: Path) -> None:
    card = load_card(tiny_int8_model)
    with pytest.raises(EngineError, match=r"needs symmetric int8: .*symmetric_activations=True"):
        resolve_plan(tiny_int8_model, card, SPEC, precision="int8", device=H100, cache_dir=tmp_path)


def test_int8_plan_builds_from_the_symmetric_qdq_model(
    tiny_int8_trt_model: Path, tmp_path: Path
) -> None:
    qdq = tiny_int8_trt_model.with_name("model.int8-sym.onnx")
    onnx_path, k, plan = resolve_plan(
        qdq, load_card(qdq), SPEC, precision="int8", device=H100, cache_dir=tmp_path
    )
    assert onnx_path == qdq
    assert k.precision == "int8" and plan.name.startswith("model.int8-sym-int8-")


@pytest.mark.skipif(has_gpu_and_trt, reason="a GPU and TensorRT are present")
def test_tensorrt_without_gpu_or_package_is_one_clear_error(tiny_model: Path) -> None:
    with pytest.raises(
        EngineError, match=r"(no NVIDIA GPU|tensorrt not installed).*pip install defectd\[gpu\]"
    ):
        open_engine(tiny_model, backend="tensorrt", precision="fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu_and_trt, reason="needs an NVIDIA GPU and tensorrt")
@pytest.mark.parametrize(("precision", "limit"), [("fp32", 1e-3), ("fp16", 2e-2)])
def test_tensorrt_plan_builds_runs_and_matches_onnx_runtime(
    tiny_model: Path, tmp_path: Path, precision: str, limit: float
) -> None:
    x = np.random.default_rng(3).normal(size=(3, 1, 64, 64)).astype(np.float32)
    ref_engine = open_engine(tiny_model, backend="ort", precision="fp32")
    ref = ref_engine.infer(x)
    with capture_logs() as logs:
        engine = open_engine(
            tiny_model, backend="tensorrt", precision=precision, max_batch=4, cache_dir=tmp_path
        )
    assert any(e["event"] == "plan_built" for e in logs)
    out = engine.infer(x)
    assert engine.name == f"tensorrt-{precision}"
    assert out.shape == (3, 1, 64, 64) and out.dtype == np.float32
    diff = float(np.abs(out - ref).max())
    print(f"tensorrt-{precision} max abs diff vs ONNX Runtime: {diff:.2e}")
    assert diff <= limit
    engine.close()
    with capture_logs() as logs:
        again = open_engine(
            tiny_model, backend="tensorrt", precision=precision, max_batch=4, cache_dir=tmp_path
        )
    assert any(e["event"] == "plan_loaded" for e in logs)
    np.testing.assert_allclose(again.infer(x), out, atol=1e-6)
    again.close()
    ref_engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu_and_trt, reason="needs an NVIDIA GPU and tensorrt")
def test_tensorrt_int8_plan_masks_match_onnx_runtime(
    tiny_int8_trt_model: Path, tmp_path: Path
) -> None:
    tiny_model = tiny_int8_trt_model
    from conftest import blob_batch

    x = load_card(tiny_model).normalisation.apply(blob_batch(np.random.default_rng(4), 2)[0])
    ref_engine = open_engine(tiny_model, backend="ort")
    ref = ref_engine.infer(x) > 0.5
    ref_engine.close()
    engine = open_engine(
        tiny_model, backend="tensorrt", precision="int8", max_batch=2, cache_dir=tmp_path
    )
    got = engine.infer(x) > 0.5
    union = np.logical_or(got, ref).sum()
    assert union == 0 or np.logical_and(got, ref).sum() / union >= 0.9
    engine.close()


def test_opening_a_foreign_plan_file_names_it(tmp_path: Path) -> None:
    plan = tmp_path / "station.plan"
    plan.write_bytes(b"\x00raw engine bytes from elsewhere")
    with pytest.raises(EngineError, match=r"station\.plan: not a defectd TensorRT plan"):
        open_engine(plan)


# Multi-class models: a plan has one output channel per class of the card, as the ONNX Runtime
# and OpenVINO engines do. Without a GPU these tests check what decides the plan (its key,
# the ONNX it is built from, the output shape it must have); the GPU test below runs it.

CLASSES = ("scratch", "pit", "stain")
SPEC3 = dataclasses.replace(SPEC, outputs=len(CLASSES))


@pytest.fixture(scope="module")
def three_class_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` + card of an untrained 3-class U-Net (base 4, depth 2, 1x64x64)."""
    from defectd.model import ModelCard, UNet, UNetConfig
    from defectd.model.export import export_onnx

    torch.manual_seed(0)
    card = ModelCard(
        name="three", input={"channels": 1, "height": 64, "width": 64}, classes=CLASSES
    )
    net = UNet(UNetConfig(base=4, depth=2, out_channels=len(CLASSES))).eval()
    out = tmp_path_factory.mktemp("three") / "model.onnx"
    export_onnx(net, card, out)
    return out


def test_one_class_plan_keys_and_file_names_are_what_they_were() -> None:
    # The digest a one-class key had before keys carried output channels: cached plans of
    # binary models keep their names and are loaded, not rebuilt.
    assert key().digest() == "a016e04ea13d1724689614174179bc2ab1653dd54f2b49f9ac29629427c55ead"
    assert "outputs" not in key().as_dict()


def test_a_multiclass_model_plan_is_keyed_by_its_output_channels(
    three_class_model: Path, tmp_path: Path
) -> None:
    from defectd.engines.model_file import prepare_onnx

    model = prepare_onnx(
        OpenRequest(three_class_model, "tensorrt", PRECISIONS, "fp32", min_batch=1, max_batch=8)
    )
    assert model.spec.outputs == len(CLASSES)
    _, k, plan = resolve_plan(
        three_class_model, model.card, model.spec, precision="fp32", device=H100,
        cache_dir=tmp_path,
    )  # fmt: skip
    assert k.outputs == len(CLASSES)
    one = dataclasses.replace(k, outputs=1)
    assert k.digest() != one.digest() and plan != plan_path(tmp_path, "model", one)
    write_plan(plan, k, b"three-class plan")
    stored, _ = read_plan(plan)
    assert stored == k and load_cached(plan, one) is None


def test_a_plan_opened_by_path_has_the_output_channels_of_its_key() -> None:
    from defectd.engines.tensorrt_backend import plan_spec

    spec = plan_spec(key(outputs=3), None, 4)
    assert spec.outputs == 3 and (spec.min_batch, spec.max_batch) == (1, 4)
    assert plan_spec(key(), None, None).outputs == 1


def test_a_plan_whose_output_lacks_a_channel_per_class_is_refused() -> None:
    from defectd.engines.tensorrt_backend import check_plan_output

    check_plan_output((-1, 3, 64, 64), SPEC3, Path("m.plan"))
    check_plan_output((-1, 1, 64, 64), SPEC, Path("m.plan"))
    with pytest.raises(EngineError, match=r"m\.plan: plan output is \(-1, 1, 64, 64\).*3 chan"):
        check_plan_output((-1, 1, 64, 64), SPEC3, Path("m.plan"))


def test_fp16_copy_of_a_multiclass_model_keeps_a_channel_per_class(
    three_class_model: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    card = load_card(three_class_model)
    onnx_path, _, _ = resolve_plan(
        three_class_model, card, SPEC3, precision="fp16", device=H100, cache_dir=tmp_path
    )
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    half = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(three_class_model), providers=["CPUExecutionProvider"])
    got, want = half.run(None, {"image": x})[0], full.run(None, {"image": x})[0]
    assert got.shape == want.shape == (2, len(CLASSES), 64, 64)
    assert float(np.abs(got - want).max()) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu_and_trt, reason="needs an NVIDIA GPU and tensorrt")
def test_tensorrt_multiclass_plan_matches_onnx_runtime_channel_by_channel(
    three_class_model: Path, tmp_path: Path
) -> None:
    x = np.random.default_rng(5).normal(size=(3, 1, 64, 64)).astype(np.float32)
    ref_engine = open_engine(three_class_model, backend="ort", precision="fp32")
    ref = ref_engine.infer(x)
    ref_engine.close()
    engine = open_engine(
        three_class_model, backend="tensorrt", precision="fp32", max_batch=4, cache_dir=tmp_path
    )
    out = engine.infer(x)
    engine.close()
    assert out.shape == ref.shape == (3, len(CLASSES), 64, 64)
    assert float(np.abs(out - ref).max()) <= 1e-3
