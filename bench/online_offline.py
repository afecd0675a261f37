"""Offline equals online: the station's verdicts on replayed images against the calibration's.

For each split (default ``val`` and ``test`` of the magnetic-tile set):

- **daemon**: ``defectd run`` (a subprocess) with one replay camera on the split's images, the
  shipped model (``models/magnetic_tile/model.onnx``) and its shipped calibration, default
  config otherwise, except what an offline replay needs to inspect every part however long it
  waits (``[pipeline] admission = "block"``, ``max_latency_ms = 0``) and an exit when the
  replay ends. Verdicts are read from a real Mosquitto (started on a free port) by
  ``defectd.publish.watch.Watcher``; ``error`` counts as a reject, as on the line.
- **calibration**: the computation of ``defectd calibrate threshold`` (``verdicts_at``, same
  default backend) at the calibration file's operating point and at the precision the file
  records (the one the daemon then runs, ``ThresholdSection.ran_at``), image by image.

It prints escapes and false rejects per split for both as a table, and as the last line
``mismatches=N``: the number of images whose two verdicts differ (exit 1 when N > 0). With
``--json`` stdout is one JSON object (counts, mismatching stems, engines, CPU, load, seconds)
followed by the ``mismatches=N`` line, as the other benches end; the table goes to stderr.

    nice -n 10 python bench/online_offline.py [--json] [--data DIR] [--splits val,test]
        [--model models/magnetic_tile/model.onnx] [--calibration models/magnetic_tile/...json]
        [--fit auto|resize|pad|tile]   (the station's [pipeline] fit; tile shows the old default)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, print_rows

REPO = Path(__file__).resolve().parent.parent
STATION = "replay"
CAMERA = "cam0"
DEFAULT_DATA_CANDIDATES = (
    REPO.parent / "shared" / "datasets" / "magnetic_tile",
    Path("/work/shared/datasets/magnetic_tile"),
)


def default_data() -> Path:
    for path in DEFAULT_DATA_CANDIDATES:
        if (path / "manifest.csv").is_file():
            return path
    return DEFAULT_DATA_CANDIDATES[-1]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_split_manifest(data: Path, splits: list[str], out: Path) -> dict[str, tuple[str, bool]]:
    """A manifest of ``data``'s ``splits`` in ``out`` (absolute paths to the original files),
    so the replay plays only those; returns ``stem -> (split, has_defect)``."""
    from defectd.data.datasets import open_dataset

    dataset = open_dataset(data)
    out.mkdir(parents=True, exist_ok=True)
    truth: dict[str, tuple[str, bool]] = {}
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "split", "has_defect"])
        for split in splits:
            for s in dataset.samples(split):
                writer.writerow(
                    [s.stem, s.cls, str(s.image), "" if s.mask is None else str(s.mask),
                     s.split, int(s.has_defect)]
                )  # fmt: skip
                truth[s.stem] = (s.split, s.has_defect)
    return truth


def station_config(
    work: Path, model: Path, replay: Path, calibration: Path, port: int, *, fit: str
) -> Path:
    """Default config, plus the replay camera, the broker's port, a state dir in ``work`` and
    what an offline replay needs: every part inspected (no deadline, blocking admission)."""
    path = work / "station.toml"
    path.write_text(
        f'station = "{STATION}"\n'
        f'[model]\npath = "{model}"\n'
        f'[[cameras]]\ntype = "replay"\ncamera = "{CAMERA}"\npath = "{replay}"\n'
        f'calibration = "{calibration}"\n'
        f'[pipeline]\nadmission = "block"\nmax_latency_ms = 0\nfit = "{fit}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
        '[health]\naddress = "127.0.0.1:0"\n'
        f'[daemon]\nstate_dir = "{work / "state"}"\nexit_when_sources_end = true\n'
        "drain_timeout_s = 60\nstop_timeout_s = 120\n"
    )
    return path


def daemon_verdicts(
    work: Path, model: Path, replay: Path, calibration: Path, expected: int, *, fit: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """``part_id -> verdict`` from ``defectd run`` over the replay, read off a real broker."""
    from defectd.publish import MqttConfig
    from defectd.publish.watch import Received, Watcher
    from defectd.testing.mosquitto import Mosquitto

    broker = Mosquitto(work / "broker", persistence=False)
    broker.start()
    verdicts: dict[str, str] = {}
    info: dict[str, Any] = {}
    lock = threading.Lock()
    all_in = threading.Event()

    def on_message(msg: Received) -> None:
        if msg.kind != "result":
            return
        with lock:
            verdicts[msg.payload["part_id"]] = msg.payload["verdict"]
            info.setdefault("model_sha256", msg.payload["model"]["sha256"])
            info.setdefault("config_hash", msg.payload["config_hash"])
            if len(verdicts) >= expected:
                all_in.set()

    watcher = Watcher(MqttConfig(host=broker.host, port=broker.port), on_message, station=STATION)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: watcher.run(stop=stop), name="bench-watch")
    thread.start()
    try:
        if not watcher.subscribed.wait(10):
            raise RuntimeError("the bench's subscriber could not subscribe")
        config = station_config(work, model, replay, calibration, broker.port, fit=fit)
        log_path = work / "daemon.log"
        t0 = time.perf_counter()
        with log_path.open("wb") as log:
            rc = subprocess.run(
                [sys.executable, "-m", "defectd", "--log-format", "json", "run", "--config",
                 str(config)],
                stdout=subprocess.DEVNULL, stderr=log, check=False,
            ).returncode  # fmt: skip
        info["daemon_seconds"] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"defectd run exited {rc}: {' | '.join(tail)}")
        if not all_in.wait(30):
            _log(f"only {len(verdicts)} of {expected} results arrived")
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"pipeline_started"' in line:
                info["engine"] = json.loads(line).get("engine")
    finally:
        stop.set()
        thread.join(10)
        broker.stop()
    with lock:
        return dict(verdicts), info


def calibration_verdicts(
    data: Path, splits: list[str], model: Path, calibration: Path
) -> tuple[dict[str, bool], dict[str, Any]]:
    """``stem -> rejected`` by the ``calibrate threshold`` computation at the file's point."""
    from defectd.calibration.file import load_calibration
    from defectd.cli.calibrate_threshold_cmd import verdicts_at
    from defectd.data.datasets import open_dataset
    from defectd.model.card import load_card
    from defectd.training.evaluate import open_model

    point = load_calibration(calibration).threshold
    if point is None:
        raise SystemExit(f"error: {calibration} has no threshold section")
    dataset = open_dataset(data)
    # The precision the point was calibrated at, as the station runs it (docs/calibration.md).
    opened = open_model(model, precision=point.ran_at(load_card(model).precision))
    t0 = time.perf_counter()
    try:
        rejected = verdicts_at(dataset, tuple(splits), opened, point)
    finally:
        opened.close()
    info = {
        "engine": opened.engine,
        "calibrated_precision": point.precision,
        "pixel_threshold": point.pixel_threshold,
        "min_area_px": point.min_area_px,
        "min_score": point.min_score,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return rejected, info


def counts(
    rejected: dict[str, bool], truth: dict[str, tuple[str, bool]], split: str
) -> dict[str, int]:
    stems = [s for s, (sp, _) in truth.items() if sp == split]
    defective = [s for s in stems if truth[s][1]]
    good = [s for s in stems if not truth[s][1]]
    return {
        "escapes": sum(1 for s in defective if not rejected.get(s, True)),
        "defective": len(defective),
        "false_rejects": sum(1 for s in good if rejected.get(s, True)),
        "good": len(good),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data(), help="labelled dataset")
    parser.add_argument("--splits", default="val,test", help="comma-separated splits")
    parser.add_argument("--model", type=Path, default=REPO / "models/magnetic_tile/model.onnx")
    parser.add_argument(
        "--calibration", type=Path, default=REPO / "models/magnetic_tile/calibration.json"
    )
    parser.add_argument(
        "--fit",
        default="auto",
        choices=("auto", "resize", "pad", "tile"),
        help="the station's [pipeline] fit (default auto: the card's policy)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object first on stdout")
    args = parser.parse_args()
    from defectd.log import configure_logging

    configure_logging("warning", stream=sys.stderr)  # stdout is for the results
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not (args.data / "manifest.csv").is_file():
        print(f"error: --data {args.data}: no manifest.csv (the labelled dataset)", file=sys.stderr)
        return 2
    model, calibration = args.model.resolve(), args.calibration.resolve()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="online-offline-") as tmp:
        work = Path(tmp)
        truth = write_split_manifest(args.data, splits, work / "replay")
        _log(f"daemon: replaying {len(truth)} images of {', '.join(splits)} through defectd run")
        verdicts, daemon_info = daemon_verdicts(
            work, model, work / "replay", calibration, len(truth), fit=args.fit
        )
    _log("calibration: the calibrate threshold computation on the same splits")
    offline, cal_info = calibration_verdicts(args.data, splits, model, calibration)
    online = {stem: verdicts.get(stem, "missing") != "pass" for stem in truth}
    missing = sorted(s for s in truth if s not in verdicts)
    errors = sorted(s for s, v in verdicts.items() if v == "error")
    mismatched = sorted(s for s in truth if online[s] != offline.get(s))
    per_split = {
        split: {
            "daemon": counts(online, truth, split),
            "calibration": counts(offline, truth, split),
        }
        for split in splits
    }
    result = {
        "data": str(args.data),
        "model": str(model),
        "calibration": str(calibration),
        "images": len(truth),
        "fit": args.fit,
        "splits": per_split,
        "mismatches": len(mismatched),
        "mismatched_stems": mismatched,
        "daemon_errors": len(errors),
        "daemon_missing": len(missing),
        "daemon": daemon_info,
        "calibrate": cal_info,
        "cpu": cpu_model("unknown"),
        "load_avg_start": [round(v, 2) for v in load_start],
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
    }
    if args.json:
        print(json.dumps(result), flush=True)
    out = sys.stderr if args.json else sys.stdout  # with --json, stdout: the object, the count
    print_rows(
        ["split", "who", "escapes", "false rejects"],
        "{split:<6} {who:<12} {escapes:>12} {false_rejects:>15}",
        [
            {
                "split": split,
                "who": who,
                "escapes": f"{c['escapes']}/{c['defective']}",
                "false_rejects": f"{c['false_rejects']}/{c['good']}",
            }
            for split, row in per_split.items()
            for who, c in row.items()
        ],
        file=out,
    )
    print(
        f"engines: daemon {daemon_info.get('engine')}, calibrate {cal_info['engine']}; "
        f"point t={cal_info['pixel_threshold']} min_area={cal_info['min_area_px']}; "
        f"daemon errors {len(errors)}, missing {len(missing)}",
        file=out,
    )
    print(
        f"cpu: {result['cpu']}; load {result['load_avg_start']} -> {result['load_avg_end']}",
        file=out,
    )
    print(f"mismatches={len(mismatched)}", flush=True)  # stdout's last line, with --json too
    return 0 if not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
