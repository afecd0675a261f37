"""The U-Net contract and the model card round trip."""

from pathlib import Path

import numpy as np
import pytest
import torch

from defectd.errors import ModelError
from defectd.model import ModelCard, UNet, UNetConfig, card_path, load_card


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_unet_returns_one_logit_map_of_input_size(norm: str) -> None:
    net = UNet(UNetConfig(in_channels=3, base=4, depth=3, norm=norm))  # type: ignore[arg-type]
    out = net(torch.zeros(2, 3, 32, 48))
    assert out.shape == (2, 1, 32, 48)
    assert out.dtype == torch.float32


def test_gflops_grow_with_resolution() -> None:
    net = UNet(UNetConfig(base=8, depth=3))
    small, large = net.gflops(64, 64), net.gflops(128, 128)
    assert small > 0
    assert large == pytest.approx(4 * small, rel=1e-6)


def test_card_round_trips_beside_its_model(tmp_path: Path) -> None:
    model = tmp_path / "m" / "model.onnx"
    card = ModelCard(name="m", threshold=0.4, metrics={"dice": 0.7})
    card.save(card_path(model))
    assert card_path(model).name == "model.card.json"
    assert load_card(model) == card


def test_missing_card_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.card\.json: model card not found"):
        load_card(tmp_path / "model.onnx")


def test_invalid_card_names_the_bad_key(tmp_path: Path) -> None:
    card_path(tmp_path / "model.onnx").write_text('{"name": "m", "threshold": 3}')
    with pytest.raises(ModelError, match="threshold"):
        load_card(tmp_path / "model.onnx")


def test_normalisation_matches_formula() -> None:
    card = ModelCard(name="m")
    img = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = card.normalisation.apply(img)
    expected = (img / 255.0 - 0.5) / 0.25
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_export_writes_onnx_with_dynamic_batch_and_card(tmp_path: Path) -> None:
    import onnxruntime as ort

    from defectd.model.export import WithSigmoid, export_onnx

    net = UNet(UNetConfig(base=4, depth=2)).eval()
    card = ModelCard(name="tiny", input={"channels": 1, "height": 32, "width": 32})
    out = tmp_path / "model.onnx"
    final = export_onnx(net, card, out)
    assert final.sha256 and final.opset == 18
    assert load_card(out) == final
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    (prob,) = sess.run(["prob"], {"image": x})
    with torch.no_grad():
        ref = WithSigmoid(net)(torch.from_numpy(x)).numpy()
    assert prob.shape == (3, 1, 32, 32)
    assert float(np.abs(prob - ref).max()) <= 1e-4


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    from defectd.model.checkpoint import load_checkpoint, save_checkpoint

    net = UNet(UNetConfig(base=4, depth=2))
    card = ModelCard(name="ck")
    save_checkpoint(tmp_path / "best.pt", net, card, epoch=3)
    net2, card2 = load_checkpoint(tmp_path / "best.pt")
    assert card2 == card
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_garbage_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from defectd.model.checkpoint import load_checkpoint

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"bad\.pt: not a defectd checkpoint"):
        load_checkpoint(bad)
