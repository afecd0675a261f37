"""Pixel-format conversion: every camera format becomes the Frame layout the model expects."""

from __future__ import annotations

import numpy as np
import pytest

from defectd.errors import CameraError
from defectd.pipeline.sources.convert import (
    SUPPORTED_PIXEL_FORMATS,
    check_pixel_format,
    to_output,
)

H, W = 6, 8
RGB = (200, 100, 30)


def mosaic(pattern: str) -> np.ndarray:
    """A flat ``RGB`` colour sampled through a Bayer pattern named the GenICam way
    (``pattern[0:2]`` is the first row of each 2x2 cell, ``pattern[2:4]`` the second)."""
    value = dict(zip("RGB", RGB, strict=True))
    raw = np.empty((H, W), np.uint8)
    for dy in (0, 1):
        for dx in (0, 1):
            raw[dy::2, dx::2] = value[pattern[2 * dy + dx]]
    return raw


@pytest.mark.parametrize(
    ("name", "cells"),
    [("BayerRG8", "RGGB"), ("BayerGR8", "GRBG"), ("BayerGB8", "GBRG"), ("BayerBG8", "BGGR")],
)
def test_bayer_patterns_demosaic_to_the_true_colour(name: str, cells: str) -> None:
    rgb = to_output(mosaic(cells), H, W, name, 3)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    # Away from the border every pixel interpolates the flat colour exactly.
    assert tuple(int(v) for v in rgb[3, 4]) == RGB


def test_bayer_to_one_channel_gives_the_luminance_of_the_colour() -> None:
    gray = to_output(mosaic("RGGB"), H, W, "BayerRG8", 1)
    expected = 0.299 * RGB[0] + 0.587 * RGB[1] + 0.114 * RGB[2]
    assert gray.shape == (H, W)
    assert abs(int(gray[3, 4]) - expected) <= 1


@pytest.mark.parametrize(
    ("name", "pixel"),
    [("RGB8", RGB), ("BGR8", RGB[::-1]), ("RGBa8", (*RGB, 255)), ("BGRa8", (*RGB[::-1], 255))],
)
def test_colour_formats_become_rgb_in_rgb_order(name: str, pixel: tuple[int, ...]) -> None:
    raw = np.tile(np.array(pixel, np.uint8), H * W)
    rgb = to_output(raw, H, W, name, 3)
    assert rgb.shape == (H, W, 3)
    assert tuple(int(v) for v in rgb[0, 0]) == RGB


def test_mono16_keeps_its_bits_for_one_channel_and_scales_for_rgb() -> None:
    raw = np.full(H * W, 0x0FFF, np.uint16)  # Mono12 full scale
    gray = to_output(raw, H, W, "Mono12", 1)
    assert gray.dtype == np.uint16 and int(gray[0, 0]) == 0x0FFF
    rgb = to_output(raw, H, W, "Mono12", 3)
    assert rgb.dtype == np.uint8 and tuple(int(v) for v in rgb[0, 0]) == (255, 255, 255)


def test_the_output_never_shares_memory_with_the_driver_buffer() -> None:
    raw = np.arange(H * W, dtype=np.uint8)
    out = to_output(raw, H, W, "Mono8", 1)
    assert not np.shares_memory(out, raw)
    assert out.shape == (H, W) and int(out[1, 0]) == W


def test_a_buffer_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 48 uint8 samples, buffer has 47"):
        to_output(np.zeros(47, np.uint8), H, W, "Mono8", 1)


def test_an_unsupported_pixel_format_names_the_camera_and_the_supported_ones() -> None:
    with pytest.raises(
        CameraError, match=r"camera 'top': PixelFormat 'Mono12p' is not supported; use one of Mono8"
    ):
        check_pixel_format("Mono12p", "top")
    for name in SUPPORTED_PIXEL_FORMATS:
        check_pixel_format(name, "top")
