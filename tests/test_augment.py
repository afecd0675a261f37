"""Augmentation: geometric ops keep the mask on its image content; photometric ops spare it."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defectd.errors import ConfigError
from defectd.training.augment import Augment, AugmentConfig

# Strong geometry so most examples rotate, zoom, flip and turn at once.
GEOMETRY = AugmentConfig(
    hflip=0.5, vflip=0.5, rot90=0.5, rotate_p=0.8, rotate_deg=30.0, scale_p=0.8, scale=(0.7, 1.5)
).geometric_only()
BRIGHT = 255
BACKGROUND_MAX = 100


def _marked_pair(
    seed: int, height: int, width: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """A mask of rectangles and an image that is 255 exactly there, textured below 101 elsewhere."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        h, w = int(rng.integers(6, height // 2 + 1)), int(rng.integers(6, width // 2 + 1))
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        mask[y : y + h, x : x + w] = 1
    # No strips or gaps thinner than 5 px: nearest-neighbour sampling may step over a
    # one-pixel gap that bilinear sampling smears, which says nothing about alignment.
    kernel = np.ones((5, 5), np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_REPLICATE)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_REPLICATE)
    background = rng.integers(0, BACKGROUND_MAX + 1, (height, width), dtype=np.uint8)
    image = np.where(mask == 1, np.uint8(BRIGHT), background)
    if channels == 3:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image), mask


pairs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(16, 72),
    st.integers(16, 72),
    st.sampled_from([1, 3]),
)


@settings(max_examples=150, deadline=None)
@given(pairs, st.integers(0, 2**32 - 1))
def test_geometric_ops_keep_the_mask_on_the_same_content(
    pair: tuple[int, int, int, int], aug_seed: int
) -> None:
    image, mask = _marked_pair(*pair)
    out, out_mask = Augment(GEOMETRY)(image, mask, np.random.default_rng(aug_seed))
    grey = out if out.ndim == 2 else out[:, :, 0]
    bright = grey > (BRIGHT + BACKGROUND_MAX) // 2
    # Bilinear image vs nearest-neighbour mask may differ only on the mask's one-pixel rim
    # (which may run along the frame edge, where the warp reflects the border).
    kernel = np.ones((3, 3), np.uint8)
    rim = cv2.dilate(out_mask, kernel) != cv2.erode(out_mask, kernel)
    rim[[0, -1], :] = rim[:, [0, -1]] = True
    disagree = bright != (out_mask == 1)
    assert not (disagree & ~rim).any()


@settings(max_examples=60, deadline=None)
@given(pairs, st.integers(0, 2**32 - 1))
def test_flips_and_quarter_turns_move_image_and_mask_exactly(
    pair: tuple[int, int, int, int], aug_seed: int
) -> None:
    image, mask = _marked_pair(*pair)
    exact = dataclasses.replace(GEOMETRY, hflip=0.5, vflip=0.5, rot90=0.9, rotate_p=0, scale_p=0)
    out, out_mask = Augment(exact)(image, mask, np.random.default_rng(aug_seed))
    grey = out if out.ndim == 2 else out[:, :, 0]
    assert np.array_equal(grey == BRIGHT, out_mask == 1)


@settings(max_examples=80, deadline=None)
@given(pairs, st.integers(0, 2**32 - 1))
def test_full_augmentation_keeps_shapes_dtypes_and_a_binary_mask(
    pair: tuple[int, int, int, int], aug_seed: int
) -> None:
    image, mask = _marked_pair(*pair)
    full = dataclasses.replace(AugmentConfig(), rotate_p=0.8, scale_p=0.8, noise_p=0.8, blur_p=0.8)
    out, out_mask = Augment(full)(image, mask, np.random.default_rng(aug_seed))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 1}
    assert out.flags.c_contiguous and out_mask.flags.c_contiguous


def test_photometric_ops_change_the_image_but_never_the_mask() -> None:
    image, mask = _marked_pair(5, 48, 48, 1)
    light = dataclasses.replace(
        AugmentConfig.off(), brightness_p=1, contrast_p=1, gamma_p=1, noise_p=1, blur_p=1
    )
    for seed in range(10):
        out, out_mask = Augment(light)(image, mask, np.random.default_rng(seed))
        assert np.array_equal(out_mask, mask)
        assert not np.array_equal(out, image)


def test_inputs_are_left_untouched() -> None:
    image, mask = _marked_pair(1, 32, 40, 3)
    before = image.copy(), mask.copy()
    Augment()(image, mask, np.random.default_rng(0))
    assert np.array_equal(image, before[0]) and np.array_equal(mask, before[1])


def test_equal_generator_states_give_equal_results() -> None:
    image, mask = _marked_pair(2, 40, 40, 1)
    a = Augment()(image, mask, np.random.default_rng(9))
    b = Augment()(image, mask, np.random.default_rng(9))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_all_ops_off_returns_equal_copies() -> None:
    image, mask = _marked_pair(3, 20, 30, 1)
    out, out_mask = Augment(AugmentConfig.off())(image, mask, np.random.default_rng(0))
    assert np.array_equal(out, image) and np.array_equal(out_mask, mask)
    assert out is not image and out_mask is not mask


def test_a_bad_probability_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"augment\.vflip: a probability within \[0, 1\]"):
        AugmentConfig(vflip=1.5)
    with pytest.raises(ConfigError, match=r"augment\.scale: expected 0 <= low <= high"):
        AugmentConfig(scale=(1.2, 0.8))
