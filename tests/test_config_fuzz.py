"""Seeded fuzz of the station config, and agreement between ``config check`` and ``run``.

A valid base config (tiny ONNX model on ONNX Runtime, synthetic camera, every section) is
mutated with a seeded generator (10,000 configs in 4 chunks): values replaced by over-long
paths, NUL bytes, unicode, wrong types, huge numbers; keys removed or added; the TOML text
itself damaged. Loading and
checking such a config may only ever fail with ``ConfigError``.

Agreement: for a seeded sample of plausible edits, every config that ``config check``
accepts starts with ``defectd run`` (in this process, real engine, broker, outbox, health
endpoint and camera; a counted synthetic line, so the run ends by itself) and stops with
exit 0 after giving every part a verdict; every config it rejects fails ``run`` with the
very same ``error:`` line.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from defectd.cli import main
from defectd.daemon.config import load_station_config
from defectd.daemon.preflight import check_station
from defectd.errors import ConfigError
from defectd.model.card import card_path

pytestmark = pytest.mark.slow

FUZZ_CONFIGS = 10_000
FUZZ_CHUNKS = 4  # separate tests, so each stays well inside the per-test timeout
AGREEMENT_STARTS = 50
AGREEMENT_REJECTS = 50
SEED = 20261202

LONG = "p" * 5000

# Keys that hold paths, as written in the file (a list index is "*").
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("model", "path"),
    ("model", "cache_dir"),
    ("cameras", "0", "calibration"),
    ("cameras", "0", "ignore_zones"),
    ("postprocess", "ignore_zones"),
    ("mqtt", "password_file"),
    ("mqtt", "tls"),
    ("outbox", "path"),
    ("archive", "dir"),
    ("daemon", "state_dir"),
    ("daemon", "result_ledger"),
)


def base_config(model: str) -> dict[str, Any]:
    """A valid station config as the TOML file would hold it."""
    return {
        "station": "fuzz",
        "model": {"path": model, "backend": "ort", "threads": 1, "warmup": 1},
        "cameras": [
            {
                "type": "synthetic",
                "camera": "cam0",
                "rate_hz": 200.0,
                "height": 64,
                "width": 64,
                "count": 2,
                "surfaces": ["brushed"],
                "ignore_zones": [{"x": 0, "y": 0, "width": 4, "height": 4}],
            }
        ],
        "pipeline": {"max_batch": 2, "max_delay_ms": 2.0, "tile_overlap_px": 8, "workers": 1},
        "postprocess": {"open_px": 0, "close_px": 0, "max_defects": 10},
        "rules": {"rules": [{"kind": "area", "min_area_px": 4, "min_score": 0.5}]},
        "mqtt": {"host": "127.0.0.1", "port": 1883, "topic_prefix": "fz", "keepalive_s": 30},
        "outbox": {"path": "outbox.sqlite", "max_rows": 1000},
        "archive": {"enabled": False, "pass_sample": 0.0},
        "health": {"enabled": True, "address": "127.0.0.1:0"},
        "daemon": {
            "state_dir": "state",
            "result_ledger": "ids.txt",
            "exit_when_sources_end": True,
            "drain_timeout_s": 3.0,
            "status_interval_s": 1.0,
        },
    }


# --- a small TOML writer (inline tables; enough for these configs) ---------------------------


def _toml_string(value: str) -> str:
    # JSON's string escapes are TOML's, except that TOML also wants DEL escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(text, text)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(type(value))


def to_toml(config: dict[str, Any]) -> str:
    return "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in config.items())


# --- mutations --------------------------------------------------------------------------------


def _nasty_values(rng: random.Random, folder: Path) -> list[Any]:
    return [
        LONG,
        "/tmp/" + LONG,
        "a\x00b",
        "state\x00",
        "ü" * 300,
        "é/" * 2500,
        "Zoë Ωmega 検査 🚀",
        "",
        " ",
        "../" * 40 + "etc",
        str(folder / "missing" / "file.onnx"),
        str(folder),
        "/dev/null",
        "\x7f\x01\x1f",
        "a" * 256,
        "#/+",
        0,
        -1,
        1,
        3,
        10**30,
        -(2**63),
        0.5,
        -0.0,
        1e308,
        float("nan"),
        float("inf"),
        True,
        False,
        [],
        [1, "a", True],
        {},
        {"x": 1},
        {"x": 0, "y": 0, "width": 2, "height": 2},
        rng.choice(["synthetic", "replay", "genicam", "usb"]),
    ]


def _leaves(node: Any, where: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*where, key)
            yield from _leaves(value, (*where, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*where, i)
            yield from _leaves(value, (*where, i))


def _parent(config: Any, key: tuple[Any, ...]) -> Any:
    node = config
    for part in key[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node


def _set(config: Any, key: tuple[Any, ...], value: Any) -> None:
    parent = _parent(config, key)
    last = key[-1]
    in_list = isinstance(parent, list) and isinstance(last, int) and last < len(parent)
    if isinstance(parent, dict) or in_list:
        parent[last] = value


def _delete(config: Any, key: tuple[Any, ...]) -> None:
    parent = _parent(config, key)
    last = key[-1]
    if isinstance(parent, dict):
        parent.pop(last, None)
    elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        del parent[last]


def mutate(config: dict[str, Any], rng: random.Random, folder: Path) -> dict[str, Any]:
    """1..4 seeded edits of a copy of ``config``."""
    out = copy.deepcopy(config)
    values = _nasty_values(rng, folder)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        leaves = list(_leaves(out))
        if roll < 0.35:  # a path key gets a nasty value
            key = tuple(int(p) if p.isdigit() else p for p in rng.choice(PATH_KEYS))
            value = copy.deepcopy(rng.choice(values))
            if key[-1] == "tls":
                value = {"ca_file": value}
            elif key[-1] == "ignore_zones":
                value = [value]
            _set(out, key, value)
        elif roll < 0.7 and leaves:  # any key gets a nasty value
            _set(out, rng.choice(leaves), copy.deepcopy(rng.choice(values)))
        elif roll < 0.85 and leaves:  # a key goes missing
            _delete(out, rng.choice(leaves))
        elif leaves:  # an extra key
            parent = _parent(out, (*rng.choice(leaves), "x"))
            if isinstance(parent, dict):
                parent[rng.choice(["extra", "ü_key", "a" * 300, "", "x.y"])] = copy.deepcopy(
                    rng.choice(values)
                )
    return out


def damage_text(text: str, rng: random.Random) -> bytes:
    """The TOML text with a few bytes deleted, inserted or replaced (may be invalid UTF-8)."""
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data))
        action = rng.random()
        if action < 0.4:
            del data[at]
        elif action < 0.8:
            data.insert(at, rng.choice(b'"[]{}=\\\n\x00\xff#.,'))
        else:
            data[at] = rng.randrange(256)
    return bytes(data)


# --- the tests --------------------------------------------------------------------------------


@pytest.fixture
def fuzz_dir(tmp_path: Path, tiny_model: Path) -> Path:
    shutil.copy(tiny_model, tmp_path / "model.onnx")
    shutil.copy(card_path(tiny_model), tmp_path / "model.card.json")
    return tmp_path


@pytest.mark.parametrize("chunk", range(FUZZ_CHUNKS))
def test_mutated_configs_only_ever_fail_with_a_config_error(
    fuzz_dir: Path, capsys: pytest.CaptureFixture[str], chunk: int
) -> None:
    rng = random.Random(SEED + 100 * chunk)
    base = base_config("model.onnx")
    path = fuzz_dir / "station.toml"
    loaded = checked = 0
    count = FUZZ_CONFIGS // FUZZ_CHUNKS
    for n in range(count):
        if n % 10 == 9:
            path.write_bytes(damage_text(to_toml(base), rng))
        else:
            path.write_text(to_toml(mutate(base, rng, fuzz_dir)), encoding="utf-8")
        try:
            cfg = load_station_config(path, env={})
            loaded += 1
            check_station(cfg)
            checked += 1
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(str(path)) and "\n" not in message, message
        if n % 50 == 0:  # the CLI prints the same outcome: a summary or one error line
            code = main(["config", "check", "--json", str(path)])
            out, err = capsys.readouterr()
            assert (code, bool(out)) in ((0, True), (2, False)), err
            assert code == 0 or err.strip().splitlines()[-1].startswith("error: ")
    # The mutations must reach every stage: loading, checking, acceptance.
    assert loaded > count // 10 and checked > count // 50, (loaded, checked)


def plausible_edit(config: dict[str, Any], rng: random.Random, folder: Path) -> dict[str, Any]:
    """Edits an operator might make, about half of them wrong; the counted synthetic line,
    its ledger and the batch-job exit stay, so that a run that starts also ends."""
    out = copy.deepcopy(config)
    edits: list[Callable[[], None]] = [
        lambda: _set(out, ("pipeline", "max_batch"), rng.choice([1, 4, 0, 300])),
        lambda: _set(out, ("pipeline", "tile_overlap_px"), rng.choice([0, 16, 63, 64, 100])),
        lambda: _set(out, ("pipeline", "max_latency_ms"), rng.choice([50.0, 5000.0, -1.0])),
        lambda: _set(out, ("pipeline", "admission"), rng.choice(["block", "reject", "drop"])),
        lambda: _set(out, ("pipeline", "workers"), rng.choice([1, 2, 0, "two"])),
        lambda: _set(out, ("postprocess", "threshold"), rng.choice([0.3, 0.9, 1.5, "high"])),
        lambda: _set(out, ("postprocess", "open_px"), rng.choice([0, 1, 2, -1])),
        lambda: _set(
            out,
            ("rules", "rules"),
            rng.choice(
                [
                    [{"kind": "count", "max_defects": 2}],
                    [{"kind": "any"}],
                    [{"kind": "score", "min_score": 0.7}],
                    [{"kind": "area", "min_area_mm2": 0.5}],  # needs a calibrated camera
                    [{"kind": "size", "max": 3}],
                ]
            ),
        ),
        lambda: _set(out, ("cameras", 0, "surfaces"), rng.choice([["cast"], [], ["velvet"]])),
        lambda: _set(out, ("cameras", 0, "height"), rng.choice([64, 96, 8, 128])),
        lambda: _set(out, ("cameras", 0, "channels"), rng.choice([1, 3, 2])),
        lambda: _set(
            out,
            ("cameras", 0, "roi"),
            rng.choice([{"x": 0, "y": 0, "width": 32, "height": 32}, {"x": -1}]),
        ),
        lambda: _set(out, ("cameras", 0, "calibration"), rng.choice(["cal.json", "bad.json"])),
        lambda: _set(out, ("cameras", 0, "ignore_zones"), [rng.choice(["zone.png", "nope.png"])]),
        lambda: _set(
            out, ("model", "path"), rng.choice(["model.onnx", "text.onnx", "nocard.onnx"])
        ),
        lambda: _set(out, ("model", "precision"), rng.choice(["fp32", "int8", "fp64"])),
        lambda: _set(out, ("model", "cache_dir"), rng.choice(["cache", "blocker/cache", LONG])),
        lambda: _set(out, ("mqtt", "username"), "station"),
        lambda: _set(out, ("mqtt", "password_file"), rng.choice(["pw.txt", "empty.txt", "x"])),
        lambda: _set(out, ("mqtt", "tls"), {"ca_file": rng.choice(["ca.pem", "gone.pem"])}),
        lambda: _set(out, ("outbox", "path"), rng.choice(["o.sqlite", "blocker/o", "ob\x00x"])),
        lambda: _set(out, ("archive", "enabled"), rng.choice([True, False, "yes"])),
        lambda: _set(out, ("health", "address"), rng.choice(["127.0.0.1:0", "nohost", ":99999"])),
        lambda: _set(out, ("daemon", "drain_timeout_s"), rng.choice([2.0, 0.0, 1000.0])),
        lambda: _set(out, ("station",), rng.choice(["line-2", "a/b", "Zoë", ""])),
        lambda: _delete(out, (rng.choice(["pipeline", "postprocess", "rules", "archive"]),)),
        lambda: _set(out, ("daemon", rng.choice(["unknown_key", "camera_stall_s"])), 5.0),
    ]
    for edit in rng.sample(edits, rng.randint(1, 3)):
        edit()
    return out


@pytest.fixture
def agreement_dir(fuzz_dir: Path, tiny_model: Path) -> Path:
    """Files the plausible edits refer to, good and bad."""
    import cv2
    import numpy as np

    from defectd.calibration.file import update_calibration

    f = fuzz_dir
    (f / "text.onnx").write_text("not a model\n")
    shutil.copy(card_path(tiny_model), f / "text.card.json")
    shutil.copy(tiny_model, f / "nocard.onnx")
    cv2.imwrite(str(f / "zone.png"), np.zeros((64, 64), np.uint8))
    (f / "pw.txt").write_text("secret\n")
    (f / "empty.txt").write_text("")
    (f / "ca.pem").write_text("not a certificate\n")
    (f / "bad.json").write_text("{not json")
    (f / "blocker").write_text("a file where a folder should be")
    update_calibration(f / "cal.json")
    return f


def test_check_and_run_agree_on_a_seeded_sample(
    agreement_dir: Path,
    mosquitto: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = mosquitto()
    rng = random.Random(SEED + 1)
    base = base_config("model.onnx")
    base["mqtt"]["port"] = broker.port
    started = rejected = 0
    tries = 0
    while started < AGREEMENT_STARTS or rejected < AGREEMENT_REJECTS:
        tries += 1
        assert tries < 20 * (AGREEMENT_STARTS + AGREEMENT_REJECTS), (started, rejected)
        case = agreement_dir / f"case{tries}"
        case.mkdir()
        config = plausible_edit(base, rng, agreement_dir)
        config["daemon"]["state_dir"] = str(case / "state")
        path = agreement_dir / f"case{tries}.toml"
        path.write_text(to_toml(config), encoding="utf-8")
        check_code = main(["config", "check", str(path)])
        check_err = capsys.readouterr().err.strip().splitlines()
        if check_code == 0:
            if started >= AGREEMENT_STARTS:
                continue
            run_code = main(["--log-level", "warning", "run", "--config", str(path)])
            run_err = capsys.readouterr().err
            assert run_code == 0, (path.read_text(), run_err)
            ledger = case / "state" / "ids.txt"
            assert len(ledger.read_text().splitlines()) == 2, "every part got a verdict"
            started += 1
        else:
            assert check_code == 2
            if rejected >= AGREEMENT_REJECTS:
                continue
            run_code = main(["run", "--config", str(path)])
            run_err = capsys.readouterr().err.strip().splitlines()
            assert run_code == 2
            assert run_err[-1] == check_err[-1]
            assert not (case / "state").exists(), "a rejected config starts nothing"
            rejected += 1
