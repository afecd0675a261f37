"""How long ``defectd`` takes to start: the CLI's help, parsing a station config, and
``defectd run`` from process start to its first verdict.

Rows (each the median of ``--repeats`` fresh processes):

- ``help``: ``defectd --help`` (imports the CLI and every subcommand module).
- ``import config``: ``python -c "import defectd.daemon.config"`` (what ``defectd config check``
  and every station start pay before the first line is validated).
- ``first verdict``: ``defectd run`` on the demo station's synthetic camera with the demo
  model on ONNX Runtime, from spawn to the ``ready`` event (READY=1: the model has inspected a
  frame), then SIGTERM. The broker need not answer (results wait in the outbox).

The tree measured is the one ``defectd`` imports from (set PYTHONPATH to compare two trees).

    python bench/startup.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo" / "model.onnx"


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _station(tmp: Path) -> Path:
    text = f"""station = "startup"

[model]
path = "{MODEL}"
backend = "ort"

[[cameras]]
type = "synthetic"
camera = "line1"
rate_hz = 10.0
height = 256
width = 256
seed = 7

[mqtt]
host = "127.0.0.1"
port = 9
connect_timeout_s = 1

[health]
enabled = false

[daemon]
state_dir = "{tmp / "state"}"
"""
    path = tmp / "station.toml"
    path.write_text(text)
    return path


def first_verdict_s(config: Path) -> float:
    """Seconds from spawning ``defectd run`` to its ``ready`` event (JSON logs on stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectd", "--log-format", "json", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                return time.perf_counter() - t0
        raise RuntimeError(f"defectd run exited with {proc.wait()} before its first verdict")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"help": [], "import config": [], "first verdict": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = _station(Path(tmp))
        for _ in range(args.repeats):
            rows["help"].append(_timed([sys.executable, "-m", "defectd", "--help"]))
            rows["import config"].append(
                _timed([sys.executable, "-c", "import defectd.daemon.config"])
            )
            rows["first verdict"].append(first_verdict_s(config))
    medians = {name: round(statistics.median(v), 3) for name, v in rows.items()}
    if args.json:
        print(json.dumps({"median_s": medians, "runs_s": rows, "pid": os.getpid()}))
        return
    for name, value in medians.items():
        print(f"{name:>14}: {value:.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
