"""The fit policy, defined once: how images reach the model input and maps come back."""

from __future__ import annotations

import numpy as np
import pytest

from defectd.model.fit import fit_image, fit_to_input, plan_fit, restore_map, restore_size


@pytest.mark.parametrize("shape", [(30, 50), (64, 64), (90, 70), (20, 100)])
def test_pad_policy_round_trips_what_the_model_saw(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = (image > 128).astype(np.uint8)
    fitted, fmask = fit_to_input(image, mask, 64, 64, "pad")
    assert fitted.shape == (64, 64) and fmask is not None and fmask.shape == (64, 64)
    assert np.array_equal(fmask, (fitted > 128).astype(np.uint8))  # mask follows content
    back = restore_size(fitted.astype(np.float32), shape, "pad")
    assert back.shape == shape and back.dtype == np.float32
    # The model saw the centre rows/columns of a too-large image and all of a small one.
    seen = np.zeros(shape, bool)
    top, left = max(0, (shape[0] - 64) // 2), max(0, (shape[1] - 64) // 2)
    seen[top : top + 64, left : left + 64] = True
    assert np.array_equal(back[seen], image[seen].astype(np.float32))
    assert not back[~seen].any()


def test_resize_policy_round_trips_a_smooth_map_and_keeps_masks_binary() -> None:
    yy, xx = np.mgrid[0:120, 0:200]
    prob = ((yy / 120 + xx / 200) / 2).astype(np.float32)
    image = (prob * 255).astype(np.uint8)
    mask = (prob > 0.5).astype(np.uint8)
    fitted, fmask = fit_to_input(image, mask, 64, 64, "resize")
    assert fitted.shape == (64, 64) and fmask is not None
    assert set(np.unique(fmask)) <= {0, 1}
    small = fitted.astype(np.float32) / 255
    back = restore_size(small, (120, 200), "resize")
    assert back.shape == (120, 200)
    assert np.abs(back - prob).max() < 0.03


def test_resize_shrinks_by_area_averaging_and_grows_bilinearly() -> None:
    checker = (np.indices((128, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    fitted, _ = fit_to_input(checker, None, 64, 64, "resize")
    assert np.all(np.abs(fitted.astype(int) - 128) <= 1)  # each 2x2 block averaged
    ramp = np.tile(np.array([0, 200], np.uint8), (2, 1))
    grown, _ = fit_to_input(ramp, None, 2, 4, "resize")
    assert 0 < grown[0, 1] < grown[0, 2] < 200  # interpolated, not repeated


def test_tile_keeps_the_pixel_scale_and_pads_only_at_the_bottom_right() -> None:
    image = np.arange(40 * 100, dtype=np.int64).reshape(40, 100).astype(np.uint8)
    fitted, _ = fit_to_input(image, None, 64, 64, "tile")
    assert fitted.shape == (64, 100)
    np.testing.assert_array_equal(fitted[:40], image)
    geometry = plan_fit((40, 100), (64, 64), "tile")
    assert (geometry.pad, geometry.crop) == ((0, 24, 0, 0), (0, 0))
    prob = np.random.default_rng(0).random((64, 100), dtype=np.float32)
    np.testing.assert_array_equal(restore_size(prob, (40, 100), "tile"), prob[:40])


@pytest.mark.parametrize("policy", ["resize", "pad", "tile"])
@pytest.mark.parametrize("shape", [(40, 50), (64, 64), (70, 60), (50, 90)])
def test_fitting_into_a_preallocated_buffer_gives_the_same_pixels(
    policy: str, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    geometry = plan_fit(shape, (64, 64), policy)  # type: ignore[arg-type]
    out = np.full((*geometry.fitted, 3), 7, np.uint8)
    assert fit_image(image, geometry, out=out) is out
    expected, _ = fit_to_input(image, None, 64, 64, policy)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out, expected)
    prob = rng.random(geometry.fitted, dtype=np.float32)
    back = np.full(shape, -1.0, np.float32)
    assert restore_map(prob, geometry, out=back) is back
    np.testing.assert_array_equal(back, restore_size(prob, shape, policy))  # type: ignore[arg-type]


def test_an_unknown_policy_or_a_mismatched_map_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown fit policy 'stretch'"):
        plan_fit((10, 10), (64, 64), "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot come from fitting"):
        restore_size(np.zeros((32, 32), np.float32), (100, 100), "tile")
    with pytest.raises(ValueError, match="does not match image shape"):
        fit_to_input(np.zeros((10, 10), np.uint8), np.zeros((9, 10), np.uint8), 8, 8, "pad")
