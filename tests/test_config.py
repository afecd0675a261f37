"""The station config: assembled from every module's section, every bad key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectd.daemon.config import load_station_config
from defectd.errors import ConfigError
from defectd.pipeline.sources import SyntheticSourceConfig

VALID = """
station = "line1"
[model]
path = "models/tiny.onnx"
[[cameras]]
type = "synthetic"
camera = "cam0"
rate_hz = 5
height = 128
width = 128
[mqtt]
port = 1883
"""


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.onnx").write_bytes(b"onnx")
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "station.toml"
    path.write_text(text)
    return path


def test_valid_config_assembles_every_section(cfg_dir: Path) -> None:
    cfg = load_station_config(_write(cfg_dir, VALID), env={})
    assert cfg.station == "line1"
    assert isinstance(cfg.cameras[0].source, SyntheticSourceConfig)
    assert cfg.cameras[0].camera == "cam0"
    assert cfg.pipeline.max_batch >= 1 and cfg.rules.rules
    assert cfg.health.address == "127.0.0.1:9464"


def test_relative_paths_are_relative_to_the_config_file(cfg_dir: Path) -> None:
    cfg = load_station_config(_write(cfg_dir, VALID), env={})
    assert cfg.model.path == cfg_dir / "models" / "tiny.onnx"


def test_state_paths_default_under_state_directory(cfg_dir: Path) -> None:
    state = cfg_dir / "state"
    cfg = load_station_config(_write(cfg_dir, VALID), env={"STATE_DIRECTORY": str(state)})
    assert cfg.state_dir == state
    assert cfg.outbox.path == state / "outbox.sqlite"
    assert cfg.archive.dir == state / "archive"
    assert cfg.model.cache_dir == state / "cache"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CACHE_DIRECTORY": "/var/cache/defectd", "HOME": "/home/op"}, "/var/cache/defectd"),
        ({"XDG_CACHE_HOME": "/home/op/.xdg", "HOME": "/home/op"}, "/home/op/.xdg/defectd"),
        ({"HOME": "/home/op"}, "/home/op/.cache/defectd"),
    ],
)
def test_engine_caches_default_outside_the_state_directory(
    cfg_dir: Path, env: dict[str, str], expected: str
) -> None:
    env = {"STATE_DIRECTORY": str(cfg_dir / "state"), **env}
    cfg = load_station_config(_write(cfg_dir, VALID), env=env)
    assert cfg.model.cache_dir == Path(expected)
    assert cfg.state_dir not in cfg.model.cache_dir.parents


def test_bad_value_is_named_by_its_key_as_written(cfg_dir: Path) -> None:
    path = _write(cfg_dir, VALID.replace("rate_hz = 5", "rate_hz = 0"))
    with pytest.raises(ConfigError) as err:
        load_station_config(path, env={})
    assert str(err.value) == f"{path}: cameras.0.rate_hz: Input should be greater than 0"


def test_every_bad_key_is_named_in_one_line(cfg_dir: Path) -> None:
    text = VALID.replace("rate_hz = 5", "rate_hz = -1\nspeed = 3").replace(
        "port = 1883", "port = 0"
    )
    with pytest.raises(ConfigError) as err:
        load_station_config(_write(cfg_dir, text), env={})
    message = str(err.value)
    assert "\n" not in message
    assert "cameras.0.rate_hz: Input should be greater than 0" in message
    assert "cameras.0.speed: Extra inputs are not permitted" in message
    assert "mqtt.port: Input should be greater than or equal to 1" in message


def test_a_drain_longer_than_the_service_managers_stop_timeout_is_refused(cfg_dir: Path) -> None:
    path = _write(cfg_dir, VALID + "\n[daemon]\ndrain_timeout_s = 60\n")
    with pytest.raises(ConfigError, match=r"daemon\.drain_timeout_s: .*stop_timeout_s = 30 s"):
        load_station_config(path, env={})
    longer = VALID + "\n[daemon]\ndrain_timeout_s = 60\nstop_timeout_s = 90\n"
    assert load_station_config(_write(cfg_dir, longer), env={}).daemon.drain_timeout_s == 60


def test_missing_model_file_is_named(cfg_dir: Path) -> None:
    path = _write(cfg_dir, VALID.replace("tiny.onnx", "gone.onnx"))
    with pytest.raises(ConfigError, match=r"model\.path: model file not found: .*gone\.onnx"):
        load_station_config(path, env={})


def test_missing_required_section_is_named(cfg_dir: Path) -> None:
    text = VALID.split("[[cameras]]", maxsplit=1)[0]
    with pytest.raises(ConfigError, match="cameras: Field required"):
        load_station_config(_write(cfg_dir, text), env={})


def test_unknown_camera_type_is_named(cfg_dir: Path) -> None:
    expected = (
        r"station\.toml: cameras\.0: Input tag 'usb' found using 'type' does not match any of "
        r"the expected tags: 'genicam', 'synthetic', 'replay'$"
    )
    with pytest.raises(ConfigError, match=expected):
        load_station_config(_write(cfg_dir, VALID.replace('"synthetic"', '"usb"')), env={})


def test_duplicate_camera_ids_are_refused(cfg_dir: Path) -> None:
    text = VALID + '[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\n'
    with pytest.raises(ConfigError, match="camera id 'cam0' is used twice"):
        load_station_config(_write(cfg_dir, text), env={})


def test_toml_syntax_error_names_the_file_and_line(cfg_dir: Path) -> None:
    path = _write(cfg_dir, VALID + "\n[mqtt\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML: .*line \d+"):
        load_station_config(path, env={})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_station_config(tmp_path / "nope.toml")


def test_station_id_must_be_a_topic_level(cfg_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"station: .*cannot be an MQTT topic level"):
        load_station_config(_write(cfg_dir, VALID.replace('"line1"', '"a/b"')), env={})


def test_camera_calibration_and_roi_belong_to_the_station(cfg_dir: Path) -> None:
    (cfg_dir / "cam0.json").write_text("{}")
    text = VALID.replace(
        'camera = "cam0"',
        'camera = "cam0"\ncalibration = "cam0.json"\nroi = {x = 0, y = 0, width = 64, height = 64}',
    )
    cam = load_station_config(_write(cfg_dir, text), env={}).cameras[0]
    assert cam.calibration == cfg_dir / "cam0.json"
    assert cam.roi is not None and cam.roi.width == 64


def test_empty_camera_list_is_refused(cfg_dir: Path) -> None:
    text = "cameras = []\n" + VALID.split("[[cameras]]", maxsplit=1)[0]
    with pytest.raises(ConfigError, match=r"at least one \[\[cameras\]\] table is needed"):
        load_station_config(_write(cfg_dir, text), env={})


def test_example_station_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "configs" / "station.example.toml"
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    text = example.read_text().replace(
        'path = "/opt/defectd/models/magnetic_tile/model.onnx"', f'path = "{model}"'
    )
    cfg = load_station_config(_write(tmp_path, text), env={"STATE_DIRECTORY": str(tmp_path)})
    assert cfg.station == "line1-top"
    assert [r.kind for r in cfg.rules.rules] == ["area", "count"]
