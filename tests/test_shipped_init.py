"""The shipped starting point for a new line's model (``models/init/neu_seg_base8.pt``): a
defectd checkpoint whose every layer but the class head loads into a one-class U-Net of the
magnetic-tile recipe's size (base 8, depth 4, one grey channel)."""

from __future__ import annotations

from pathlib import Path

from defectd.model.checkpoint import load_checkpoint, load_matching
from defectd.model.unet import UNet, UNetConfig

INIT = Path(__file__).resolve().parents[1] / "models" / "init" / "neu_seg_base8.pt"


def test_the_starting_point_loads_into_a_one_class_model_of_the_recipe() -> None:
    net, card = load_checkpoint(INIT)
    assert card.classes == ("inclusion", "patches", "scratches")
    assert (net.config.base, net.config.depth, net.config.in_channels) == (8, 4, 1)
    target = UNet(UNetConfig(base=8, depth=4, in_channels=1, out_channels=1))
    report = load_matching(target, net.state_dict())
    assert [name for name, _ in report.initialised] == ["head.weight", "head.bias"]
    assert not report.head_loaded and not report.unused
