"""The station install: what runs without the [train] extra, the one-line hint for what does not,
one version number everywhere, and a wheel and sdist that build and pass ``twine check``.

A station install is simulated by a fresh interpreter whose import system refuses torch (and
the other modules of the extras), as it would fail where they are not installed.
"""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import defectd
from defectd.cli import main
from defectd.model.card import PRODUCER, ModelCard, card_path, load_card
from defectd.publish import MqttConfig, OutboxConfig, Publisher
from defectd.testing.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "demo" / "model.onnx"

# Installed into a fresh interpreter before defectd is imported: imports of the named
# top-level modules fail as they do where the package is not installed.
BLOCKER = """
import sys

class NotInstalled:
    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled(set(sys.argv[1].split(","))))
from defectd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _python(
    *args: str, timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter, its output captured as text, whatever its exit."""
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _defectd_without(
    modules: str, *argv: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``defectd ARGV`` in a fresh interpreter where ``modules`` (comma-separated) are missing."""
    return _python("-c", BLOCKER, modules, *argv, timeout=240, cwd=cwd)


def _assert_hint(out: subprocess.CompletedProcess[str], extra: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    assert f"needs the [{extra}] extra" in lines[0]
    assert lines[0].endswith(f"pip install defectd[{extra}]")


NO_TRAINING = "torch,onnxscript,matplotlib"


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled set written by ``defectd synth`` on an install without torch.

    Parts as the demo line shows them (256 px, its 4 textures per surface): the demo model is
    that line's model, and these tests run it.
    """
    out = tmp_path_factory.mktemp("station") / "parts"
    done = _defectd_without(
        NO_TRAINING,
        *("synth", "--out", str(out), "--count", "24", "--size", "256", "--textures", "4"),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "{parts}", "--out", "run"],
        ["export", "--checkpoint", "run/best.pt", "--out", "m/model.onnx"],
        ["eval", "--model", "run/best.pt", "--data", "{parts}"],
        ["calibrate", "threshold", "--model", "run/best.pt", "--data", "{parts}", "--out", "c"],
        ["build-engine", "--model", "run/best.pt", "--backend", "torch"],
    ],
    ids=["train", "export", "eval-checkpoint", "calibrate-checkpoint", "torch-backend"],
)
def test_a_training_feature_without_torch_says_to_install_the_train_extra_in_one_line(
    argv: list[str], parts: Path, tmp_path: Path
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"not read: torch is missing")
    argv = [a.replace("{parts}", str(parts)) for a in argv]
    _assert_hint(_defectd_without(NO_TRAINING, *argv, cwd=tmp_path), "train")


def test_opcua_certificates_without_asyncua_say_to_install_the_opcua_extra(
    tmp_path: Path,
) -> None:
    out = _defectd_without(
        "asyncua,cryptography",
        *("opcua", "cert", "--cert", str(tmp_path / "c.der"), "--key", str(tmp_path / "k.pem")),
    )
    _assert_hint(out, "opcua")
    assert not (tmp_path / "c.der").exists()


def test_threshold_plots_without_matplotlib_say_to_install_the_plots_extra(
    parts: Path, tmp_path: Path
) -> None:
    out = _defectd_without(
        "matplotlib",
        *("calibrate", "threshold", "--model", str(DEMO_MODEL), "--data", str(parts)),
        *("--out", str(tmp_path / "cal.json"), "--report", str(tmp_path / "plots")),
    )
    _assert_hint(out, "plots")
    assert not (tmp_path / "cal.json").exists()


@pytest.mark.slow
def test_a_station_evaluates_and_calibrates_onnx_models_without_torch(
    parts: Path, tmp_path: Path
) -> None:
    evaluated = _defectd_without(
        NO_TRAINING, "eval", "--model", str(DEMO_MODEL), "--data", str(parts), "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert 0.0 <= report["dice"] <= 1.0
    calibrated = _defectd_without(
        NO_TRAINING,
        *("calibrate", "threshold", "--model", str(DEMO_MODEL), "--data", str(parts)),
        *("--split", "test", "--out", str(tmp_path / "cal.json"), "--json"),
        # A target the demo model reaches on a split of four parts: this test is about running
        # without torch, not about the model's operating point.
        *("--target-false-reject", "0.5"),
    )
    assert calibrated.returncode == 0, calibrated.stderr
    section = json.loads((tmp_path / "cal.json").read_text())["threshold"]
    assert 0.0 < section["pixel_threshold"] < 1.0


def test_the_station_start_up_imports_no_torch() -> None:
    """What ``defectd run`` imports before it opens an ONNX model, and the CPU backends."""
    modules = (
        "defectd.cli",
        "defectd.cli.run_cmd",
        "defectd.daemon.service",
        "defectd.demo",
        "defectd.engines.openvino_backend",
        "defectd.engines.ort_backend",
        "defectd.training.evaluate",
    )
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import " + ", ".join(modules)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert set(modules) <= imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "onnxscript", "matplotlib")}


def test_the_version_is_one_number_in_the_cli_and_model_cards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"defectd {defectd.__version__}"
    made = tmp_path / "new" / "model.onnx"
    ModelCard(name="m").save(card_path(made))
    assert load_card(made).producer == PRODUCER == f"defectd {defectd.__version__}"
    # A card written before the field existed does not claim this version.
    older = tmp_path / "old" / "model.onnx"
    stored = json.loads(DEMO_MODEL.with_name("model.card.json").read_text())
    stored.pop("producer", None)
    card_path(older).parent.mkdir()
    card_path(older).write_text(json.dumps(stored))
    assert load_card(older).producer == ""


def test_the_status_message_carries_the_package_version(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    config = MqttConfig(host=broker.host, port=broker.port, topic_prefix="t")
    pub = Publisher(config, OutboxConfig(path=tmp_path / "outbox.sqlite"), "st1")
    status = mqtt_collector(broker.host, broker.port, "t/st1/status")
    pub.start()
    try:
        assert status.wait_for(lambda ms: len(ms) >= 1)
    finally:
        pub.stop()
    assert status.payloads("status")[0]["version"] == defectd.__version__


# What a wheel is built from (the sdist holds the same).
SOURCES = ("pyproject.toml", "README.md", "src", "models/demo", "configs", "systemd")


@pytest.mark.slow
def test_the_wheel_and_sdist_build_and_pass_twine_check(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for name in SOURCES:
        src, dst = ROOT / name, tree / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    dist = tmp_path / "dist"
    built = _python("-m", "build", "--no-isolation", "--outdir", str(dist), str(tree), timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    version = defectd.__version__
    wheel = dist / f"defectd-{version}-py3-none-any.whl"
    sdist = dist / f"defectd-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())

    checked = _python("-m", "twine", "check", "--strict", str(wheel), str(sdist), timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2

    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta = email.message_from_bytes(whl.read(f"defectd-{version}.dist-info/METADATA"))
    assert meta["Version"] == version
    requires = meta.get_all("Requires-Dist") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert not [r for r in runtime if r.split()[0].split(">")[0] in ("torch", "matplotlib")]
    assert any(r.startswith("torch==2.13.0") and 'extra == "train"' in r for r in requires)
    assert {"train", "plots", "gpu", "dev"} <= set(meta.get_all("Provides-Extra") or [])
    data = f"defectd-{version}.data/data/share/defectd"
    assert f"{data}/models/demo/model.onnx" in names
    assert f"{data}/models/demo/model.card.json" in names
    assert f"{data}/systemd/defectd.service" in names
    assert "defectd/py.typed" in names
    assert any(n.startswith("defectd/publish/schemas/") and n.endswith(".json") for n in names)

    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "models/demo/model.onnx", "src/defectd/__init__.py"} <= members
