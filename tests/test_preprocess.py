"""Frames become normalised model-sized tiles; the geometry maps results back to the frame."""

import numpy as np
import pytest

from defectd.calibration.flatfield import FlatField
from defectd.model.card import InputSpec, ModelCard, Normalisation
from defectd.model.fit import fit_to_input
from defectd.pipeline.buffers import BufferPool
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.config import PipelineConfig, Rect
from defectd.pipeline.failures import ErrorReason, FrameError
from defectd.pipeline.frame import Frame
from defectd.pipeline.preprocess import Preprocessor, check_image, choose_fit


def card(channels: int = 1, size: int = 64, resize: str = "tile") -> ModelCard:
    return ModelCard(
        name="m",
        input=InputSpec(channels=channels, height=size, width=size, resize=resize),  # type: ignore[arg-type]
        normalisation=Normalisation(scale=255.0, mean=(0.5,) * channels, std=(0.25,) * channels),
    )


def frame(image: np.ndarray, pixel_format: str = "Mono8") -> Frame:
    return Frame("st", "cam", 0, image, 0, 0.0, pixel_format=pixel_format)


def prep(c: ModelCard, **cfg: object) -> Preprocessor:
    return Preprocessor(c, PipelineConfig(**cfg), BufferPool())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((10, 10), np.float64), "dtype float64"),
        (np.zeros((10, 10, 4), np.uint8), r"shape \(10, 10, 4\)"),
        (np.zeros((10, 10, 3), np.uint16), "colour image dtype uint16"),
        ("not an image", "str"),
    ],
)
def test_a_corrupt_buffer_is_refused_with_the_reason(image: object, match: str) -> None:
    with pytest.raises(FrameError, match=match) as err:
        check_image(image)
    assert err.value.code is ErrorReason.CORRUPT_FRAME


def test_a_model_sized_mono_frame_is_one_normalised_tile() -> None:
    img = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    out = prep(card())(frame(img), CameraSetup())
    assert out.data.shape == (1, 64, 64) and out.data.dtype == np.float32
    assert out.geometry.plan.count == 1
    np.testing.assert_allclose(out.data[0], (img / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_an_rgb_frame_feeds_a_gray_model_through_the_luma_conversion() -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 1] = 200  # pure green
    out = prep(card())(frame(rgb, "RGB8"), CameraSetup())
    gray = round(0.587 * 200)
    assert out.data[0, 0, 0] == pytest.approx((gray / 255 - 0.5) / 0.25, abs=0.02)


def test_a_mono_frame_feeds_an_rgb_model_as_three_equal_channels() -> None:
    img = np.full((64, 64), 51, np.uint8)
    out = prep(card(channels=3))(frame(img), CameraSetup())
    assert out.data.shape == (3, 64, 64)
    assert np.all(out.data == pytest.approx((0.2 - 0.5) / 0.25, abs=1e-6))


def test_mono12_pixels_are_scaled_to_eight_bits_for_an_eight_bit_model() -> None:
    img = np.full((64, 64), 4095, np.uint16)
    out = prep(card())(frame(img, "Mono12"), CameraSetup())
    assert out.data.max() == pytest.approx((1.0 - 0.5) / 0.25)


def test_a_large_frame_is_tiled_at_full_resolution() -> None:
    img = np.zeros((2048, 2448), np.uint8)
    out = prep(card(size=256), tile_overlap_px=32)(frame(img), CameraSetup())
    geo = out.geometry
    assert geo.mode == "tile"
    assert geo.fitted == (2048, 2448)
    assert geo.plan.count == 9 * 11
    assert out.data.shape == (1, 2048, 2448)


def test_the_roi_is_cut_before_tiling_and_restored_in_roi_pixels() -> None:
    img = np.zeros((100, 200), np.uint8)
    img[30:40, 50:60] = 255
    setup = CameraSetup(roi=Rect(x=40, y=20, width=80, height=64))
    out = prep(card())(frame(img), setup)
    assert out.geometry.roi == (40, 20, 80, 64)
    assert out.data.shape == (1, 64, 80)
    assert out.data[0, 10, 10] == pytest.approx(2.0)  # frame pixel (50, 30)


def test_a_roi_outside_the_frame_is_a_corrupt_frame() -> None:
    setup = CameraSetup(roi=Rect(x=150, y=0, width=100, height=50))
    with pytest.raises(FrameError, match="outside the 200x100 frame"):
        prep(card())(frame(np.zeros((100, 200), np.uint8)), setup)


def test_a_small_frame_is_resized_when_the_card_says_resize_and_restored() -> None:
    img = np.zeros((32, 48), np.uint8)
    out = prep(card(resize="resize"))(frame(img), CameraSetup())
    geo = out.geometry
    assert (geo.mode, geo.fitted, out.data.shape) == ("resize", (64, 64), (1, 64, 64))
    prob = np.zeros((64, 64), np.float32)
    prob[:, 32:] = 1.0
    back = geo.restore(prob, np.empty((32, 48), np.float32))
    assert back[:, :20].max() < 0.05 and back[:, 28:].min() > 0.95


def test_a_small_frame_is_centre_padded_when_the_card_says_pad_and_cropped_back() -> None:
    img = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48).astype(np.uint8)
    out = prep(card(resize="pad"))(frame(img), CameraSetup())
    geo = out.geometry
    assert geo.mode == "pad"
    assert geo.offsets[:2] == (16, 8)
    np.testing.assert_allclose(out.data[0, 16:48, 8:56], (img / 255 - 0.5) / 0.25, atol=1e-6)
    prob = np.zeros((64, 64), np.float32)
    prob[16:48, 8:56] = np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)
    back = geo.restore(prob, np.empty((32, 48), np.float32))
    np.testing.assert_array_equal(back, prob[16:48, 8:56])


def test_a_small_frame_is_padded_for_tiling_when_the_card_says_tile() -> None:
    out = prep(card(), tile_overlap_px=8)(frame(np.zeros((40, 100), np.uint8)), CameraSetup())
    assert out.geometry.mode == "tile"
    assert out.geometry.fitted == (64, 100)
    assert out.geometry.plan.count == 2


def test_auto_fit_follows_the_card_and_a_station_may_force_another() -> None:
    assert choose_fit("auto", "resize") == "resize"
    assert choose_fit("auto", "pad") == "pad"
    assert choose_fit("auto", "tile") == "tile"
    assert choose_fit("resize", "tile") == "resize"


def test_a_frame_larger_than_the_input_is_resized_whole_when_the_card_says_resize() -> None:
    img = np.random.default_rng(3).integers(0, 256, (300, 200), dtype=np.uint8)
    out = prep(card(resize="resize"))(frame(img), CameraSetup())
    assert (out.geometry.mode, out.geometry.plan.count, out.data.shape) == (
        "resize",
        1,
        (1, 64, 64),
    )
    fitted, _ = fit_to_input(img, None, 64, 64, "resize")
    np.testing.assert_allclose(out.data[0], (fitted / 255 - 0.5) / 0.25, atol=1e-6)


def test_flatfield_correction_is_applied_to_the_full_frame_before_the_roi() -> None:
    img = np.full((64, 128), 100, np.uint8)
    gain = np.ones((64, 128), np.float32)
    gain[:, 64:] = 2.0
    setup = CameraSetup(roi=Rect(x=64, y=0, width=64, height=64), flatfield=FlatField(gain))
    out = prep(card())(frame(img), setup)
    assert out.data[0].mean() == pytest.approx((200 / 255 - 0.5) / 0.25, abs=1e-5)


def test_a_failing_correction_is_a_preprocess_error_naming_it() -> None:
    setup = CameraSetup(flatfield=FlatField(np.ones((10, 10), np.float32)))
    with pytest.raises(FrameError, match="flatfield failed on a 64x64 frame") as err:
        prep(card())(frame(np.zeros((64, 64), np.uint8)), setup)
    assert err.value.code is ErrorReason.PREPROCESS


def test_preprocessed_buffers_are_reused_once_given_back() -> None:
    p = prep(card())
    first = p(frame(np.zeros((64, 64), np.uint8)), CameraSetup())
    first.release()
    second = p(frame(np.zeros((64, 64), np.uint8)), CameraSetup())
    assert second.data is first.data
    assert p.pool.allocated == 1
