"""Camera geometry and flat-field, checked on synthetic views rendered with a known camera.

Views are rendered by ray casting: every pixel is undistorted with the true camera matrix and
distortion, its ray intersected with the board plane of a known pose, and the board image
(a texture in mm) sampled there with ``cv2.remap``. So the images obey the exact lens model,
and the plane view (board fronto-parallel at distance Z) has a known scale of Z / f mm/px.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from defectd.calibration.camera import (
    CameraCalibration,
    CheckerboardPattern,
    CircleGridPattern,
    Undistorter,
    calibrate_camera,
)
from defectd.calibration.file import load_calibration
from defectd.calibration.flatfield import FlatField, estimate_flatfield, uniformity
from defectd.cli import main
from defectd.errors import CalibrationError, ConfigError

WIDTH, HEIGHT = 640, 480
TRUE_K = np.array([[700.0, 0.0, 322.5], [0.0, 700.0, 236.0], [0.0, 0.0, 1.0]])
TRUE_DIST = np.array([-0.25, 0.08, 0.001, -0.0005, 0.0])  # ~5% barrel at the corners
PLANE_Z_MM = 100.0
TRUE_MM_PER_PX = PLANE_Z_MM / TRUE_K[0, 0]
CHECKER = CheckerboardPattern(cols=9, rows=6, square_mm=5.0)
CIRCLES = CircleGridPattern(cols=7, rows=5, spacing_mm=6.0)
TEXTURE_PX_PER_MM = 16  # board texture resolution, ~2.3 texels per image pixel at the plane

# (rotation about x, y, z in degrees), board centre in camera coordinates (mm).
# The first pose is the plane view: fronto-parallel at PLANE_Z_MM.
POSES = [
    ((0, 0, 0), (0, 0, PLANE_Z_MM)),
    ((25, 0, 0), (-15, -12, 90)),
    ((-25, 0, 0), (15, 12, 90)),
    ((0, 25, 0), (15, -12, 90)),
    ((0, -25, 0), (-15, 12, 90)),
    ((20, 20, 10), (0, 0, 95)),
    ((-15, 20, -20), (12, 0, 90)),
    ((15, -20, 30), (-12, 5, 90)),
]

BoardFn = Callable[[NDArray[np.float32], NDArray[np.float32]], NDArray[np.float32]]


@dataclass(frozen=True)
class Board:
    """A board image: ``texture[i, j]`` shows board point (x0 + (j + .5) / ppm, y0 + ...) mm."""

    texture: NDArray[np.float32]
    origin_mm: tuple[float, float]
    centre_mm: tuple[float, float]


def _board(fn: BoardFn, lo_mm: float, hi_x_mm: float, hi_y_mm: float) -> Board:
    ppm = TEXTURE_PX_PER_MM
    xs = lo_mm + (np.arange(int((hi_x_mm - lo_mm) * ppm)) + 0.5) / ppm
    ys = lo_mm + (np.arange(int((hi_y_mm - lo_mm) * ppm)) + 0.5) / ppm
    xx, yy = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    # Pre-blur about half an image pixel, so that sampling the texture does not alias.
    texture = cv2.GaussianBlur(fn(xx, yy), (0, 0), 1.2)
    return Board(texture, (lo_mm, lo_mm), ((lo_mm + hi_x_mm) / 2, (lo_mm + hi_y_mm) / 2))


def _rays() -> NDArray[np.float64]:
    """Undistorted viewing rays (x, y, 1) of every pixel centre, ``(H * W, 3)``."""
    vv, uu = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    pix = np.stack([uu.ravel(), vv.ravel()], axis=-1).reshape(-1, 1, 2)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-12)
    norm = cv2.undistortPoints(pix, TRUE_K, TRUE_DIST, criteria=criteria).reshape(-1, 2)
    return np.concatenate([norm, np.ones((norm.shape[0], 1))], axis=1)


def _render(
    rays: NDArray[np.float64], board: Board, rng: np.random.Generator, *, noise: float = 2.0
) -> list[NDArray[np.uint8]]:
    """One ``(HEIGHT, WIDTH)`` uint8 view of ``board`` per pose, its centre at the pose's."""
    views = []
    for angles, centre in POSES:
        rotation, _ = cv2.Rodrigues(np.radians(np.array(angles, float)))
        t = np.array(centre, float) - rotation @ np.array([*board.centre_mm, 0.0])
        normal = rotation[:, 2]
        depth = (normal @ t) / (rays @ normal)  # ray parameter where it meets the board
        on_board = (depth[:, None] * rays - t) @ rotation  # R^T (p - t), board mm
        ppm = TEXTURE_PX_PER_MM
        map_x = ((on_board[:, 0] - board.origin_mm[0]) * ppm - 0.5).astype(np.float32)
        map_y = ((on_board[:, 1] - board.origin_mm[1]) * ppm - 0.5).astype(np.float32)
        image = cv2.remap(
            board.texture,
            map_x.reshape(HEIGHT, WIDTH),
            map_y.reshape(HEIGHT, WIDTH),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.4,
        )
        image = image * 255.0 + rng.normal(0.0, noise, image.shape).astype(np.float32)
        views.append(np.clip(image + 0.5, 0, 255).astype(np.uint8))
    return views


def _checkerboard(x: NDArray[np.float32], y: NDArray[np.float32]) -> NDArray[np.float32]:
    """Black and white squares with a white margin of one square around them."""
    sq, cols, rows = CHECKER.square_mm, CHECKER.cols, CHECKER.rows
    inside = (x >= -sq) & (x <= cols * sq) & (y >= -sq) & (y <= rows * sq)
    dark = (np.floor(x / sq) + np.floor(y / sq)) % 2 == 0
    return np.where(inside & dark, 0.1, 0.9).astype(np.float32)


def _circle_grid(x: NDArray[np.float32], y: NDArray[np.float32]) -> NDArray[np.float32]:
    s, cols, rows = CIRCLES.spacing_mm, CIRCLES.cols, CIRCLES.rows
    col = np.clip(np.round(x / s), 0, cols - 1)
    row = np.clip(np.round(y / s), 0, rows - 1)
    in_circle = (x - col * s) ** 2 + (y - row * s) ** 2 <= (0.3 * s) ** 2
    return np.where(in_circle, 0.1, 0.9).astype(np.float32)


@pytest.fixture(scope="module")
def rays() -> NDArray[np.float64]:
    return _rays()


@dataclass(frozen=True)
class Views:
    checker: list[NDArray[np.uint8]]
    calibration: CameraCalibration


@pytest.fixture(scope="module")
def views(rays: NDArray[np.float64]) -> Views:
    sq = CHECKER.square_mm
    board = _board(_checkerboard, -2 * sq, (CHECKER.cols + 1) * sq, (CHECKER.rows + 1) * sq)
    checker = _render(rays, board, np.random.default_rng(7))
    return Views(checker, calibrate_camera(checker, CHECKER))


@pytest.fixture
def view_dir(tmp_path: Path, views: Views) -> Path:
    folder = tmp_path / "views"
    folder.mkdir()
    for i, image in enumerate(views.checker):
        cv2.imwrite(str(folder / f"view{i:02d}.png"), image)
    return folder


# ----------------------------------------------------------------------------- geometry


def test_scale_at_the_plane_is_recovered_within_one_percent(views: Views) -> None:
    assert views.calibration.mm_per_px == pytest.approx(TRUE_MM_PER_PX, rel=0.01)


def test_reprojection_error_is_below_half_a_pixel(views: Views) -> None:
    assert views.calibration.reprojection_error_px < 0.5
    assert max(views.calibration.per_view_error_px) < 0.5


def test_focal_length_and_distortion_are_recovered(views: Views) -> None:
    fx, fy = views.calibration.focal_px
    assert fx == pytest.approx(TRUE_K[0, 0], rel=0.01)
    assert fy == pytest.approx(TRUE_K[1, 1], rel=0.01)
    assert views.calibration.dist_coeffs[0] == pytest.approx(TRUE_DIST[0], abs=0.02)


def test_plane_view_tilt_is_reported_near_zero(views: Views) -> None:
    assert views.calibration.plane_tilt_deg < 1.0


def _row_straightness(corners: NDArray[np.float32]) -> float:
    """Largest distance (px) of a corner from the straight line through its board row."""
    worst = 0.0
    for row in corners.reshape(CHECKER.rows, CHECKER.cols, 2).astype(np.float64):
        centred = row - row.mean(axis=0)
        _, _, vt = np.linalg.svd(centred)
        worst = max(worst, float(np.abs(centred @ vt[1]).max()))
    return worst


def test_undistorted_view_has_straight_board_rows(views: Views) -> None:
    tilted = views.checker[1]  # reaches the image corner, where distortion is strongest
    undistorted = Undistorter(views.calibration).apply(tilted)
    raw_corners = CHECKER.find(tilted)
    fixed_corners = CHECKER.find(undistorted)
    assert raw_corners is not None and fixed_corners is not None
    assert _row_straightness(raw_corners) > 1.0  # the lens really bends them
    assert _row_straightness(fixed_corners) < 0.3


def test_undistort_into_out_reuses_the_buffer(views: Views) -> None:
    undistorter = Undistorter(views.calibration)
    out = np.empty((HEIGHT, WIDTH), np.uint8)
    result = undistorter.apply(views.checker[0], out=out)
    assert result is out
    assert np.array_equal(out, undistorter.apply(views.checker[0]))


def test_undistort_rejects_a_frame_of_another_size(views: Views) -> None:
    with pytest.raises(ValueError, match="undistorter built for 640x480"):
        Undistorter(views.calibration).apply(np.zeros((240, 320), np.uint8))


def test_binned_frames_get_a_rescaled_scale(views: Views) -> None:
    binned = Undistorter(views.calibration, (WIDTH // 2, HEIGHT // 2))
    assert binned.mm_per_px == pytest.approx(2 * views.calibration.mm_per_px)
    with pytest.raises(ConfigError, match="calibration is for 640x480 frames, got 640x640"):
        Undistorter(views.calibration, (640, 640))


def test_valid_mask_marks_pixels_from_outside_the_sensor(views: Views) -> None:
    # Pincushion distortion: the undistorted image's corners come from beyond the sensor.
    pincushion = replace(views.calibration, dist_coeffs=np.array([0.3, 0.0, 0.0, 0.0, 0.0]))
    mask = Undistorter(pincushion).valid_mask()
    assert mask.shape == (HEIGHT, WIDTH)
    assert mask[HEIGHT // 2, WIDTH // 2] == 1
    assert mask[0, 0] == 0
    assert Undistorter(views.calibration).valid_mask().all()  # barrel: all from the sensor


def test_section_round_trip_gives_the_same_undistortion(views: Views) -> None:
    section = views.calibration.to_section()
    again = CameraCalibration.from_section(section)
    frame = views.checker[3]
    assert np.array_equal(
        Undistorter(again).apply(frame), Undistorter(views.calibration).apply(frame)
    )
    assert section.mm2_per_px == pytest.approx(views.calibration.mm_per_px**2)


def test_circle_grid_scale_is_recovered_within_one_percent(rays: NDArray[np.float64]) -> None:
    s = CIRCLES.spacing_mm
    board = _board(_circle_grid, -s, CIRCLES.cols * s, CIRCLES.rows * s)
    circle_views = _render(rays, board, np.random.default_rng(3))
    result = calibrate_camera(circle_views, CIRCLES)
    assert result.mm_per_px == pytest.approx(TRUE_MM_PER_PX, rel=0.01)
    assert result.reprojection_error_px < 0.5


def test_view_without_a_board_is_named_in_the_error(views: Views) -> None:
    blank = np.full((HEIGHT, WIDTH), 128, np.uint8)
    names = [f"view{i}.png" for i in range(4)]
    with pytest.raises(CalibrationError, match=r"view2\.png: no 9x6 checkerboard"):
        calibrate_camera([*views.checker[:2], blank, views.checker[2]], CHECKER, names=names)


def test_skip_unfound_leaves_out_the_view_and_lists_it(views: Views) -> None:
    blank = np.full((HEIGHT, WIDTH), 128, np.uint8)
    names = [f"v{i}.png" for i in range(5)]
    result = calibrate_camera(
        [*views.checker[:3], blank, views.checker[3]], CHECKER, names=names, skip_unfound=True
    )
    assert result.skipped == ("v3.png",)
    assert len(result.views) == 4


def test_too_few_views_is_an_error(views: Views) -> None:
    with pytest.raises(CalibrationError, match="need at least 3 views"):
        calibrate_camera(views.checker[:2], CHECKER)


# ----------------------------------------------------------------------------- flat-field


def _vignetted_blank(rng: np.random.Generator, channels: int = 1) -> NDArray[np.uint8]:
    """A textured blank under cos^4 vignetting (corners at ~40%) and a 20% lighting ramp.

    The texture (3% reflectance variation) is the same in every frame, like a real blank
    reference; the sensor noise (3 grey levels) is new in each.
    """
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    radius = np.hypot(x - 0.55 * WIDTH, y - 0.45 * HEIGHT)
    shading = np.cos(np.arctan(radius / 600.0)) ** 4 * (0.9 + 0.2 * x / WIDTH)
    texture = 1.0 + cv2.GaussianBlur(
        np.random.default_rng(0).normal(0, 0.03, (HEIGHT, WIDTH)).astype(np.float32), (0, 0), 1.5
    )
    planes = [
        level * shading * texture + rng.normal(0, 3.0, shading.shape)
        for level in (200.0, 150.0, 100.0)[:channels]
    ]
    image = planes[0] if channels == 1 else np.stack(planes, axis=2)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def blanks() -> list[NDArray[np.uint8]]:
    rng = np.random.default_rng(11)
    return [_vignetted_blank(rng) for _ in range(9)]  # 8 reference frames + 1 to check


# The uniformity measure: (max - min) / mean of the frame blurred with sigma = 2% of the
# short side (9.6 px), so that it sees shading, not pixel noise or the blank's texture.


def test_flatfield_removes_vignetting_to_two_percent_uniformity(
    blanks: list[NDArray[np.uint8]],
) -> None:
    flat = estimate_flatfield(blanks[:8])
    fresh = blanks[8]
    assert uniformity(fresh) > 0.5
    corrected = flat.apply(fresh)
    assert uniformity(corrected) < 0.02
    assert flat.stats is not None and flat.stats.uniformity_after < 0.02


def test_gaussian_flatfield_also_meets_two_percent(blanks: list[NDArray[np.uint8]]) -> None:
    flat = estimate_flatfield(blanks[:8], method="gaussian")
    assert uniformity(flat.apply(blanks[8])) < 0.02


def test_flatfield_keeps_each_colour_channels_level() -> None:
    rng = np.random.default_rng(5)
    frames = [_vignetted_blank(rng, channels=3) for _ in range(4)]
    flat = estimate_flatfield(frames)
    corrected = flat.apply(frames[0]).astype(np.float64)
    means = corrected.reshape(-1, 3).mean(axis=0)
    originals = frames[0].reshape(-1, 3).astype(np.float64).mean(axis=0)
    assert means == pytest.approx(originals, rel=0.02)
    assert uniformity(corrected) < 0.02


def test_flatfield_apply_into_out_reuses_the_buffer(blanks: list[NDArray[np.uint8]]) -> None:
    flat = estimate_flatfield(blanks[:2])
    out = np.empty_like(blanks[0])
    assert flat.apply(blanks[0], out=out) is out
    with pytest.raises(ValueError, match="out is"):
        flat.apply(blanks[0], out=np.empty((HEIGHT, WIDTH), np.uint16))


def test_flatfield_corrects_16_bit_frames_without_clipping_at_255() -> None:
    gain = np.full((4, 4), 2.0, np.float32)
    frame = np.full((4, 4), 3000, np.uint16)
    assert FlatField(gain).apply(frame).tolist() == [[6000] * 4] * 4


def test_flatfield_gain_survives_save_and_load(
    tmp_path: Path, blanks: list[NDArray[np.uint8]]
) -> None:
    flat = estimate_flatfield(blanks[:2])
    path = tmp_path / "gain.npy"
    flat.save(path)
    assert np.array_equal(FlatField.load(path).gain, flat.gain)


def test_corrupt_gain_file_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "gain.npy"
    path.write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match=r"gain\.npy: not a readable \.npy"):
        FlatField.load(path)


def test_no_reference_frames_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="no reference frames"):
        estimate_flatfield([])


# ----------------------------------------------------------------------------- CLI


def test_cli_camera_writes_the_camera_section_and_prints_json(
    tmp_path: Path, view_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "station" / "calibration.json"
    code = main(
        ["calibrate", "camera", "--images", str(view_dir), "--cols", "9", "--rows", "6",
         "--square-mm", "5", "--out", str(out), "--json"]
    )  # fmt: skip
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    camera = load_calibration(out).camera
    assert camera is not None
    assert camera.mm_per_px == pytest.approx(TRUE_MM_PER_PX, rel=0.01)
    assert payload["camera"]["mm_per_px"] == camera.mm_per_px
    assert camera.plane_image.endswith("view00.png")
    assert camera.command.startswith("defectd")


def test_cli_flatfield_adds_its_section_without_touching_the_camera(
    tmp_path: Path,
    views: Views,
    blanks: list[NDArray[np.uint8]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "calibration.json"
    from defectd.calibration.file import update_calibration

    update_calibration(out, camera=views.calibration.to_section())
    ref = tmp_path / "blank"
    ref.mkdir()
    for i, frame in enumerate(blanks[:4]):
        cv2.imwrite(str(ref / f"blank{i}.png"), frame)
    assert main(["calibrate", "flatfield", "--images", str(ref), "--out", str(out)]) == 0
    assert "uniformity after" in capsys.readouterr().out
    cal = load_calibration(out)
    assert cal.camera == views.calibration.to_section()
    assert cal.flatfield is not None
    flat = FlatField.from_section(cal.flatfield, out)
    assert flat.image_size == (WIDTH, HEIGHT)
    assert (tmp_path / "calibration.flatfield.npy").is_file()


def test_cli_empty_folder_error_names_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["calibrate", "camera", "--images", str(empty), "--out", str(tmp_path / "c.json")])
    assert code == 2
    assert f"error: no images in folder {empty}" in capsys.readouterr().err


def test_cli_view_without_board_error_names_the_file(
    tmp_path: Path, view_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in sorted(view_dir.iterdir())[3:]:  # three views and the blank keep it quick
        extra.unlink()
    cv2.imwrite(str(view_dir / "view99.png"), np.full((HEIGHT, WIDTH), 128, np.uint8))
    code = main(
        ["calibrate", "camera", "--images", str(view_dir), "--out", str(tmp_path / "c.json")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "view99.png: no 9x6 checkerboard" in err
    assert not (tmp_path / "c.json").exists()
