"""What the commands print: JSON logs stay JSON to the end, normal ends are info, log lines
follow sys.stderr (so a progress bar's proxy places them), tables are whole when piped, and
training announces its estimated time before it starts."""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

from defectd.cli import main
from defectd.log import configure_logging, get_logger
from defectd.model.card import card_path
from defectd.testing.mosquitto import Mosquitto
from defectd.training.train import time_one_step, train
from test_train import tiny_config, write_chip_parts


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the CLI configures logging globally


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_fatal_error_is_a_json_event_with_json_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--log-format", "json", "config", "check", str(tmp_path / "gone.toml")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    last = json.loads(lines[-1])  # every line is JSON, the last one says why it ended
    assert all(line.startswith("{") for line in lines)
    assert last["level"] == "error" and last["exit_code"] == 2
    assert last["error"].endswith("gone.toml: config file not found")


def test_fatal_error_stays_one_plain_line_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(tmp_path / "gone.toml")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {tmp_path / 'gone.toml'}: config file not found"
    )


def test_end_of_a_replayed_line_is_logged_at_info(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(tiny_model, tmp_path / "model.onnx")
    shutil.copy(card_path(tiny_model), tmp_path / "model.card.json")
    config = tmp_path / "station.toml"
    config.write_text(
        'station = "end"\n[model]\npath = "model.onnx"\nbackend = "ort"\nthreads = 1\n'
        'warmup = 1\n[[cameras]]\ntype = "synthetic"\ncamera = "c"\nheight = 64\nwidth = 64\n'
        "count = 2\nrate_hz = 100\n[mqtt]\nport = 1\nconnect_timeout_s = 0.5\n"
        '[health]\nenabled = false\n[archive]\nenabled = false\n[daemon]\nstate_dir = "s"\n'
        "exit_when_sources_end = true\ndrain_timeout_s = 1\n"
    )
    assert main(["--log-format", "json", "run", "--config", str(config)]) == 0
    events = _json_lines(capsys.readouterr().err)
    ends = [e for e in events if e.get("kind") == "end_of_stream"]
    assert ends and all(e["level"] == "info" for e in ends)


def test_timed_watch_ends_at_info(
    mosquitto: Callable[..., Mosquitto], capsys: pytest.CaptureFixture[str]
) -> None:
    broker = mosquitto()
    args = ["--log-format", "json", "watch", "--host", broker.host, "--port", str(broker.port)]
    assert main([*args, "--timeout", "0.5"]) == 0
    events = _json_lines(capsys.readouterr().err)
    assert not [e for e in events if e["level"] in ("warning", "error")], events
    assert any(e["event"] == "watch_closed" and e["level"] == "info" for e in events)


def test_log_lines_follow_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("info", "console")
    # A rich progress bar on a terminal swaps sys.stderr for a proxy that prints above the
    # bar; the log must write to whatever sys.stderr is at that moment.
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    get_logger("t").info("through_the_proxy", n=1)
    assert "through_the_proxy" in swapped.getvalue()


def test_tables_are_not_cut_at_80_columns_when_piped(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "models"
    deep.mkdir(parents=True)
    shutil.copy(tiny_model, deep / "model.onnx")
    shutil.copy(card_path(tiny_model), deep / "model.card.json")
    config = tmp_path / "station.toml"
    config.write_text(
        f'station = "w"\n[model]\npath = "{deep / "model.onnx"}"\nbackend = "ort"\n'
        '[[cameras]]\ntype = "synthetic"\ncamera = "c"\n[daemon]\nstate_dir = "s"\n'
    )
    assert main(["config", "check", str(config)]) == 0
    out = capsys.readouterr().out
    assert len(str(deep / "model.onnx")) > 80
    assert str(deep / "model.onnx") in out


def test_training_time_is_estimated_before_the_first_step(tmp_path: Path) -> None:
    data = write_chip_parts(tmp_path / "parts", 20)
    config = tiny_config(data, tmp_path / "run")
    config = type(config)(**{**config.__dict__, "epochs": 1, "steps_per_epoch": 3})
    calls: list[tuple[str, Any]] = []
    train(
        config,
        on_estimate=lambda s, step_s, steps: calls.append(("estimate", (s, step_s, steps))),
        on_step=lambda info: calls.append(("step", info.step)),
    )
    assert calls[0][0] == "estimate" and [c for c in calls if c[0] == "estimate"] == [calls[0]]
    seconds, step_s, steps = calls[0][1]
    assert steps == 3 and step_s > 0 and seconds == pytest.approx(step_s * 3)


def test_timing_a_step_leaves_the_network_untouched(tmp_path: Path) -> None:
    from defectd.model.unet import UNet
    from defectd.training.losses import LossConfig, SegLoss

    config = tiny_config(tmp_path, tmp_path / "run")
    net = UNet(config.unet())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng_before = torch.get_rng_state()
    assert time_one_step(net, SegLoss(LossConfig()), config, bf16=False) > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng_before, torch.get_rng_state())
