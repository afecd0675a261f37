"""``defectd train --init``: a wider ``--base`` grows the checkpoint's network with the same
map at the start, and an exported ``model.onnx`` (batch norms folded) is a starting point too,
checked against real ONNX Runtime sessions of the export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from defectd.cli import main
from defectd.data.synth import write_dataset
from defectd.errors import ConfigError, ModelError
from defectd.model.card import ModelCard, file_sha256
from defectd.model.checkpoint import load_checkpoint, read_checkpoint
from defectd.model.export import export_onnx
from defectd.model.recover import read_onnx_init, refit_norms
from defectd.model.unet import Norm, UNet, UNetConfig, widen_state


def _trained_like(net: UNet) -> UNet:
    """Norm statistics and scales far from their defaults, as after training."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-1.0, 1.0, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return net


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_a_widened_network_computes_the_narrow_ones_map(norm: Norm) -> None:
    torch.manual_seed(0)
    narrow = _trained_like(UNet(UNetConfig(base=4, depth=3, norm=norm, out_channels=2)))
    wide = UNet(UNetConfig(base=8, depth=3, norm=norm, out_channels=2))
    state, widened = widen_state(narrow.state_dict(), wide)
    wide.load_state_dict(state)
    assert "stem.0.weight" in widened and "merge.0.0.weight" in widened
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        for training in (False, True):  # running statistics, then batch statistics
            narrow.train(training)
            wide.train(training)
            assert torch.allclose(wide(x), narrow(x), atol=1e-5)
    # The new channels are there to learn: they read the old ones, the old ones read them as 0.
    w = state["stem.3.weight"]
    assert w[4:].abs().sum() > 0 and torch.count_nonzero(w[:4, 4:]) == 0
    merge = state["merge.2.0.weight"]  # reads cat([upsampled 8, skip 8]); old halves of 4
    assert torch.equal(merge[:4, :4], narrow.state_dict()["merge.2.0.weight"][:, :4])
    assert torch.equal(merge[:4, 8:12], narrow.state_dict()["merge.2.0.weight"][:, 4:])


def test_widening_refuses_group_norm_and_another_depth() -> None:
    narrow = UNet(UNetConfig(base=4, depth=2, norm="group"))
    with pytest.raises(ValueError, match="group norm"):
        widen_state(narrow.state_dict(), UNet(UNetConfig(base=8, depth=2, norm="group")))
    with pytest.raises(ValueError, match="another depth"):
        widen_state(UNet(UNetConfig(base=4, depth=2)).state_dict(), UNet(UNetConfig(base=8)))


def _probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {session.get_inputs()[0].name: x})[0]
    return out


def test_an_export_reads_back_as_the_same_network(tiny_model: Path) -> None:
    state = read_onnx_init(tiny_model)
    net = UNet(UNetConfig(**state["unet"]))
    net.load_state_dict(state["model"])
    x = np.random.default_rng(0).standard_normal((4, 1, 64, 64)).astype(np.float32)
    expected = _probabilities(tiny_model, x)

    def error(training: bool) -> np.ndarray:
        # On a copy: a forward pass in train mode moves the running statistics.
        copy = UNet(net.config)
        copy.load_state_dict(net.state_dict())
        with torch.no_grad():
            got = torch.sigmoid(copy.train(training)(torch.from_numpy(x))).numpy()
        return np.abs(got - expected)

    assert error(training=False).max() < 1e-5
    # Identity-form norms: train mode (batch statistics) rescales every layer. After the refit
    # eval mode is still the export and train mode close to it.
    before = error(training=True).mean()
    assert refit_norms(net, [torch.from_numpy(x[i : i + 2]) for i in (0, 2)]) == 4
    assert error(training=False).max() < 1e-5
    assert error(training=True).mean() < 0.2 * before


def test_an_ensemble_export_is_refused_with_a_reason(tiny_model: Path, tmp_path: Path) -> None:
    net, card = load_checkpoint(tiny_model.with_suffix(".pt"))
    out = tmp_path / "ensemble.onnx"
    export_onnx([net, net], ModelCard(name="two", input=card.input), out)
    with pytest.raises(ModelError, match="ensemble"):
        read_onnx_init(out)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("grow") / "parts"
    write_dataset(out, 24, seed=4, height=64, width=64, defect_rate=0.6)
    return out


def test_train_grows_a_deployed_model_into_a_wider_one(
    parts: Path, tiny_model: Path, tmp_path: Path
) -> None:
    args = ["train", "--data", str(parts), "--out", str(tmp_path / "run"), "--init"]
    args += [str(tiny_model), "--base", "8", "--epochs", "1", "--steps-per-epoch", "2"]
    args += ["--batch-size", "4", "--threads", "1", "--no-bf16", "--augment", "off"]
    assert main([*args, "--lr", "1e-9", "--json"]) == 0
    state = read_checkpoint(tmp_path / "run" / "best.pt")
    card = ModelCard.from_dict(state["card"])
    assert card.architecture["base"] == 8 and card.architecture["depth"] == 2
    init = card.training.init
    assert init is not None and init.sha256 == file_sha256(tiny_model)
    assert any("widened from base 4 to 8" in note for note in init.initialised)
    exported = read_onnx_init(tiny_model)["model"]
    weights = state["model"]
    # Almost no learning rate: the old channels are the export's, the new ones still unread.
    assert torch.allclose(weights["stem.0.weight"][:4], exported["stem.0.weight"], atol=1e-6)
    assert weights["head.weight"][:, 4:].abs().max() < 1e-6
    assert weights["merge.1.0.weight"][:4, 4:8].abs().max() < 1e-6


def test_a_wider_base_from_a_group_norm_checkpoint_is_a_config_error(
    parts: Path, tmp_path: Path
) -> None:
    from defectd.model.checkpoint import save_checkpoint
    from defectd.training.train import TrainConfig, train

    init = tmp_path / "group.pt"
    net = UNet(UNetConfig(base=4, depth=2, norm="group"))
    save_checkpoint(
        init, net, ModelCard(name="g", input={"channels": 1, "height": 64, "width": 64})
    )
    config = TrainConfig(
        data=parts,
        out=tmp_path / "run",
        init=init,
        height=64,
        width=64,
        base=8,
        depth=2,
        norm="group",
        epochs=1,
        steps_per_epoch=1,
        batch_size=4,
        augment="off",
        threads=1,
        bf16=False,
    )
    with pytest.raises(ConfigError, match="cannot widen it to base 8: group norm"):
        train(config)


def test_a_grey_export_starts_an_rgb_model_with_its_first_layer_fresh(
    parts: Path, tiny_model: Path, tmp_path: Path
) -> None:
    args = ["train", "--data", str(parts), "--out", str(tmp_path / "rgb"), "--init"]
    args += [str(tiny_model), "--channels", "3", "--epochs", "1", "--steps-per-epoch", "1"]
    args += ["--batch-size", "4", "--threads", "1", "--no-bf16", "--augment", "off", "--json"]
    assert main(args) == 0
    init = ModelCard.from_dict(read_checkpoint(tmp_path / "rgb" / "best.pt")["card"]).training.init
    assert init is not None and any(n.startswith("stem.0.weight") for n in init.initialised)
