"""What shadow mode costs the live line: live verdict latency and throughput, shadow off vs on.

Each row is one run of the real daemon (``Service``: synthetic camera -> live pipeline ->
durable outbox -> MQTT QoS 1 to a Mosquitto started on a free port) in its own worker process,
with the shadow candidate off or on; rows alternate (off, on, off, on ...) so that load from
other processes on the machine falls on both alike, and the table gives medians.

Each run has two phases:

- **latency**: the camera at ``--rate`` Hz (a line below capacity, as in production) for
  ``--frames`` parts; live verdict latency = grab -> verdict committed to the outbox (measured in
  a result observer that runs before the shadow's), and the pipeline's own grab -> verdict
  (``latencies_ms.total``), p50 and p99; the first 10% are warm-up.
- **throughput**: the camera unthrottled (admission ``block``) for ``--throughput-frames``
  parts: live verdicts per second, and process CPU ms per part.

The live model is ``--model`` (default ``models/magnetic_tile/model.onnx``) on OpenVINO at
``--live-precision`` (int8: the QDQ model beside it); the candidate is ``--candidate`` (default:
the same model) at ``--candidate-precision`` (fp32: the heavier build, the worst case for the
live line). With the shadow on, the rows also show how many parts the candidate compared and
skipped, and its agreement with the live verdicts. Every row names the CPU and the load.

    python bench/shadow.py [--quick] [--json] [--repeats 3] [--frames 300] [--rate 8]
                           [--throughput-frames 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "magnetic_tile" / "model.onnx"
WARMUP_FRACTION = 0.1


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


# --- worker: one daemon run with the shadow off or on ---------------------------------------


def _station(args: argparse.Namespace, tmp: Path, *, rate: float | None, shadow: bool) -> Any:
    """The station config; ``rate`` None: the camera as fast as the line takes its frames."""
    import tomllib

    from defectd.daemon.config import parse_station_config

    admission = "block" if rate is None else "reject"
    text = f"""
station = "bench-shadow"
[model]
path = "{args.model}"
backend = "openvino"
precision = "{args.live_precision}"
warmup = 2
[[cameras]]
type = "synthetic"
camera = "cam0"
height = {args.size}
width = {args.size}
count = {args.frames if rate else args.throughput_frames}
seed = 11
defect_rate = 0.3
[pipeline]
max_batch = 1
admission = "{admission}"
max_latency_ms = 0
[mqtt]
host = "127.0.0.1"
port = {args.port}
[health]
enabled = false
[archive]
enabled = false
[daemon]
state_dir = "{tmp / "state"}"
exit_when_sources_end = true
drain_timeout_s = 60
stop_timeout_s = 120
"""
    if shadow:
        text += f"""
[shadow]
path = "{args.candidate}"
backend = "openvino"
precision = "{args.candidate_precision}"
publish_interval_s = 5
"""
    raw = tomllib.loads(text)
    raw["cameras"][0]["rate_hz"] = rate  # None (unthrottled) has no TOML spelling
    return parse_station_config(raw, base=tmp, where="bench-shadow")


def _run_daemon(args: argparse.Namespace, *, rate: float | None, shadow: bool) -> dict[str, Any]:
    from defectd.daemon.sdnotify import SdNotifier
    from defectd.daemon.service import Service
    from defectd.pipeline.runner import PipelineResult

    stored: list[tuple[int, float, float]] = []  # (t_ns at commit, stored ms, pipeline ms)
    lock = threading.Lock()

    def observe(result: PipelineResult) -> None:
        now = time.monotonic_ns()
        ins = result.inspection
        with lock:
            stored.append(
                (now, (now - result.frame.t_host_ns) / 1e6, ins.latencies_ms.get("total", 0.0))
            )

    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        cfg = _station(args, Path(tmp), rate=rate, shadow=shadow)
        service = Service(cfg, notifier=SdNotifier({}), install_signals=False, observers=(observe,))
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        load_start = _load()
        service.serve()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        verdicts = {
            v: int(service.metrics.verdicts.value(camera="cam0", verdict=v))
            for v in ("pass", "fail", "error")
        }
        runner = service.shadow
        summary = runner.summary() if runner is not None else None
    skip = int(len(stored) * WARMUP_FRACTION)
    kept = sorted(stored)[skip:]
    out: dict[str, Any] = {
        "results": len(stored),
        "load_start": load_start,
        "load_end": _load(),
        "verdicts": verdicts,
    }
    if rate is None:
        span_s = (kept[-1][0] - kept[0][0]) / 1e9 if len(kept) > 1 else 0.0
        cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        out["fps"] = round((len(kept) - 1) / span_s, 2) if span_s else None
        out["cpu_ms_per_part"] = round(1000 * cpu_s / max(1, len(stored)), 2)
    else:
        out["stored_p50"] = _pct([k[1] for k in kept], 50)
        out["stored_p99"] = _pct([k[1] for k in kept], 99)
        out["verdict_p50"] = _pct([k[2] for k in kept], 50)
        out["verdict_p99"] = _pct([k[2] for k in kept], 99)
    if summary is not None:
        out["shadow"] = {
            "parts": summary["parts"],
            "skipped": summary["skipped"],
            "agreement": summary["agreement"],
            "engine": summary["candidate"]["engine"],
        }
    return out


def worker(args: argparse.Namespace) -> None:
    shadow = args.worker == "on"
    row = {
        "shadow": shadow,
        "latency": _run_daemon(args, rate=args.rate, shadow=shadow),
        "throughput": _run_daemon(args, rate=None, shadow=shadow),
    }
    print(json.dumps(row))


# --- driver ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import cpu_model

    return cpu_model()


def _median(rows: list[dict[str, Any]], phase: str, key: str) -> float | None:
    values = [r[phase][key] for r in rows if r[phase].get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def drive(args: argparse.Namespace) -> dict[str, Any]:
    from defectd.testing.mosquitto import Mosquitto

    report: dict[str, Any] = {
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "load_start": _load()},
        "settings": {
            "model": str(args.model),
            "live_precision": args.live_precision,
            "candidate": str(args.candidate),
            "candidate_precision": args.candidate_precision,
            "frames": args.frames,
            "throughput_frames": args.throughput_frames,
            "rate_hz": args.rate,
            "size": args.size,
            "repeats": args.repeats,
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-shadow-broker-") as tmp:
        broker = Mosquitto(Path(tmp), persistence=False)
        broker.start()
        try:
            for i in range(args.repeats):
                for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    cmd = [sys.executable, __file__, "--worker", mode, "--port", str(broker.port)]
                    cmd += _passthrough(args)
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        sys.stderr.write(done.stderr[-4000:])
                        raise SystemExit(f"worker {mode} failed (exit {done.returncode})")
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    report["runs"].append(row)
                    print(f"run {i + 1} shadow {mode}: {_brief(row)}", file=sys.stderr)
        finally:
            broker.close()
    report["machine"]["load_end"] = _load()
    summary: dict[str, Any] = {}
    for mode, flag in (("off", False), ("on", True)):
        rows = [r for r in report["runs"] if r["shadow"] is flag]
        summary[mode] = {
            "stored_p50_ms": _median(rows, "latency", "stored_p50"),
            "stored_p99_ms": _median(rows, "latency", "stored_p99"),
            "verdict_p50_ms": _median(rows, "latency", "verdict_p50"),
            "verdict_p99_ms": _median(rows, "latency", "verdict_p99"),
            "fps": _median(rows, "throughput", "fps"),
            "cpu_ms_per_part": _median(rows, "throughput", "cpu_ms_per_part"),
        }
        if flag:
            summary[mode]["shadow_latency_phase"] = [r["latency"].get("shadow") for r in rows]
            summary[mode]["shadow_throughput_phase"] = [r["throughput"].get("shadow") for r in rows]
    off, on = summary["off"], summary["on"]
    summary["ratios"] = {
        "fps_on_vs_off": round(on["fps"] / off["fps"], 3) if on["fps"] and off["fps"] else None,
        "stored_p99_on_vs_off": (
            round(on["stored_p99_ms"] / off["stored_p99_ms"], 3)
            if on["stored_p99_ms"] and off["stored_p99_ms"]
            else None
        ),
    }
    report["summary"] = summary
    return report


def _brief(row: dict[str, Any]) -> str:
    lat, thr = row["latency"], row["throughput"]
    text = (
        f"p50/p99 stored {lat.get('stored_p50')}/{lat.get('stored_p99')} ms, "
        f"{thr.get('fps')} fps, {thr.get('cpu_ms_per_part')} CPU ms/part, "
        f"load {lat['load_start']}"
    )
    if "shadow" in lat:
        text += f"; shadow compared {lat['shadow']['parts']} skipped {lat['shadow']['skipped']}"
        text += f" (unthrottled: {thr['shadow']['parts']}/{thr['shadow']['skipped']})"
    return text


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--model", str(args.model),
        "--candidate", str(args.candidate),
        "--live-precision", args.live_precision,
        "--candidate-precision", args.candidate_precision,
        "--frames", str(args.frames),
        "--throughput-frames", str(args.throughput_frames),
        "--rate", str(args.rate),
        "--size", str(args.size),
    ]  # fmt: skip


def _table(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["summary"]
    lines = [
        f"CPU: {m['cpu']} ({m['cores']} cores); load average at start {m['load_start']}, "
        f"at end {m['load_end']}",
        f"latency phase: {report['settings']['frames']} parts at {report['settings']['rate_hz']} "
        f"Hz; throughput phase: {report['settings']['throughput_frames']} parts unthrottled; "
        f"{report['settings']['repeats']} runs per row (medians)",
        "",
        "| shadow | stored p50 ms | stored p99 ms | verdict p50 ms | verdict p99 ms | "
        "frames/s | CPU ms/part |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("off", "on"):
        r = s[mode]
        lines.append(
            f"| {mode} | {r['stored_p50_ms']} | {r['stored_p99_ms']} | {r['verdict_p50_ms']} | "
            f"{r['verdict_p99_ms']} | {r['fps']} | {r['cpu_ms_per_part']} |"
        )
    lines.append("")
    lines.append(f"ratios: {s['ratios']}")
    lines.append(f"shadow at {report['settings']['rate_hz']} Hz: {s['on']['shadow_latency_phase']}")
    lines.append(f"shadow unthrottled: {s['on']['shadow_throughput_phase']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true", help="150 parts per phase, 2 runs per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--rate", type=float, default=8.0, help="camera rate of the latency phase")
    p.add_argument("--throughput-frames", type=int, default=1500)
    p.add_argument("--size", type=int, default=256, help="frame size (square)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--candidate", type=Path, default=None, help="default: --model")
    p.add_argument("--live-precision", default="int8")
    p.add_argument("--candidate-precision", default="fp32")
    p.add_argument("--worker", choices=("off", "on"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=1883, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.candidate is None:
        args.candidate = args.model
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.frames, args.throughput_frames, args.repeats = 150, 500, 2
    report = drive(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
