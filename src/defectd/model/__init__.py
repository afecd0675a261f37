"""The U-Net and its model card."""

from defectd.model.card import ModelCard, card_path, load_card
from defectd.model.unet import UNet, UNetConfig

__all__ = ["ModelCard", "UNet", "UNetConfig", "card_path", "load_card"]
