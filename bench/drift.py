"""Drift monitoring on the synthetic line, through the real daemon: alarm delay and false alarms.

Runs ``defectd.daemon.service.Service`` (in this process) with the demo model
(``models/demo/model.onnx``) and one synthetic camera, default ``[drift]`` settings, three times:

- **stable**: ``--stable-parts`` parts (default 10,500: the first ``learn_parts`` = 500 make
  the reference, 10,000 are watched) of an unchanging line: every alarm is a false alarm;
- **lighting**: the line dims by ``--lighting-amount`` (default 0.2: gain 0.8) from part
  ``--drift-after`` on (default 1,000);
- **texture**: the surface smooths (blended with a blurred copy, weight ``--texture-amount``,
  default 0.5) from the same part on.

The drifting runs stop ``--watch`` parts (default 500) after the change; parts-to-alarm is the
alarming part's number minus ``drift_after`` (part numbers from the synthetic line's part id).
Verdicts go to an outbox with no broker (port 1): MQTT is not what is measured. The archive
keeps errors and a sample of passes (not fails), so the pass-sampling boost while drifting shows
as archived passes per 1,000 parts before and after the alarm.

It also times ``DriftMonitor.observe`` on its own (the per-part cost in the result path) and
reports the daemon's throughput. ``--json``: one JSON object on stdout; progress on stderr.

    nice -n 10 python bench/drift.py [--json] [--stable-parts N] [--drift-after N] [--watch N]
        [--size 256] [--seed 11]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import cpu_model
from defectd.daemon.config import parse_station_config
from defectd.daemon.drift import DriftConfig, DriftMonitor
from defectd.daemon.service import Service
from defectd.data.synth import PartRenderer
from defectd.log import configure_logging
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.runner import PipelineResult

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "demo" / "model.onnx"


def station(
    state: Path, *, size: int, seed: int, count: int, drift: dict[str, Any] | None
) -> dict[str, Any]:
    camera: dict[str, Any] = {
        "type": "synthetic",
        "camera": "line1",
        "rate_hz": None,
        "height": size,
        "width": size,
        "defect_rate": 0.3,
        "seed": seed,
        "count": count,
        **(drift or {}),
    }
    return {
        "station": "drift-bench",
        "model": {"path": str(MODEL), "backend": "auto", "warmup": 1},
        "cameras": [camera],
        "pipeline": {"admission": "block", "max_latency_ms": 0.0, "max_batch": 4},
        "mqtt": {"port": 1, "reconnect_min_s": 1, "reconnect_max_s": 5, "connect_timeout_s": 1},
        "archive": {"fails": False, "pass_sample": 0.01, "overlays": False},
        "health": {"enabled": False},
        "daemon": {
            "state_dir": str(state),
            "exit_when_sources_end": True,
            "drain_timeout_s": 2.0,
        },
    }


def part_number(part_id: str | None) -> int:
    return int(part_id.rsplit("-", 1)[1]) if part_id else -1


def run_line(
    name: str, *, size: int, seed: int, count: int, drift: dict[str, Any] | None
) -> dict[str, Any]:
    """One daemon run; returns its alarms (part numbers), parts, seconds, archived passes."""
    alarms: list[dict[str, Any]] = []
    passes_archived: list[int] = []  # part numbers of archived passes

    with tempfile.TemporaryDirectory(prefix=f"drift-{name}-") as tmp:
        cfg = parse_station_config(
            station(Path(tmp), size=size, seed=seed, count=count, drift=drift),
            base=REPO,
            where=name,
        )
        last = [0.0]

        def tick(service: Service) -> None:
            now = time.monotonic()
            if now - last[0] >= 5.0:
                last[0] = now
                snap = service.drift.snapshot() if service.drift else {}
                view = snap.get("line1")
                if view is not None:
                    print(
                        f"  {name}: {view.parts} parts, {view.state.value}, score "
                        f"{view.score:.2f}, alarms {view.alarms}",
                        file=sys.stderr,
                    )

        service = Service(cfg, on_tick=tick, install_signals=False)
        monitor = service.drift
        assert monitor is not None
        monitor.listen(
            on_alarm=lambda view: alarms.append(
                {"part": part_number(view.part_id), **view.evidence()}
            )
        )
        t0 = time.perf_counter()
        service.serve()
        seconds = time.perf_counter() - t0
        snap = monitor.snapshot()["line1"]
        results = Path(tmp) / "archive" / "results"
        for path in results.glob("*.json"):
            result = json.loads(path.read_text())
            if result["verdict"] == "pass":
                passes_archived.append(part_number(result.get("part_id")))
        engine = service.final_stats
        info = service.engine_info()
    return {
        "parts": snap.parts,
        "alarms": alarms,
        "seconds": round(seconds, 1),
        "fps": round(snap.parts / seconds, 1),
        "final_score": round(snap.score, 3),
        "limits_sigma": {k: v.limit_sigma for k, v in snap.statistics.items()},
        "passes_archived": sorted(passes_archived),
        "errors": engine.errors if engine is not None else {},
        "engine": info.engine if info is not None else None,
    }


def observe_cost(size: int, parts: int = 2000) -> dict[str, float]:
    """Microseconds per ``DriftMonitor.observe`` (charts calibrated), and image stats alone."""
    renderer = PartRenderer(size, size)
    rng = np.random.default_rng(0)
    images = [renderer.render(rng).image for _ in range(64)]
    monitor = DriftMonitor(DriftConfig(learn_parts=50), background=False)
    results = []
    for i in range(parts):
        ins = Inspection("s", "cam0", i, Verdict.PASS if i % 3 else Verdict.FAIL)
        frame = Frame("s", "cam0", i, images[i % 64], 0, 0.0)
        results.append(PipelineResult(ins, frame, None, score=0.1 + 0.8 * (i % 3 == 0)))
    for r in results[:60]:  # learn and calibrate first
        monitor.observe(r)
    t0 = time.perf_counter()
    for r in results:
        monitor.observe(r)
    per_part = (time.perf_counter() - t0) / parts * 1e6
    return {"observe_us_per_part": round(per_part, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--stable-parts", type=int, default=10_500)
    ap.add_argument("--drift-after", type=int, default=1_000)
    ap.add_argument("--watch", type=int, default=500, help="parts run after the change")
    ap.add_argument("--lighting-amount", type=float, default=0.2)
    ap.add_argument("--texture-amount", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--runs", default="lighting,texture,stable")
    args = ap.parse_args()
    configure_logging("warning")

    learn = DriftConfig().learn_parts
    out: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "model": str(MODEL.relative_to(REPO)),
        "size": args.size,
        "seed": args.seed,
        "drift_config": DriftConfig().model_dump(),
    }
    out.update(observe_cost(args.size))
    print(f"observe(): {out['observe_us_per_part']} us per part", file=sys.stderr)
    count = args.drift_after + args.watch
    for name in args.runs.split(","):
        if name == "stable":
            print(f"stable line, {args.stable_parts} parts ...", file=sys.stderr)
            res = run_line(
                name, size=args.size, seed=args.seed, count=args.stable_parts, drift=None
            )
            res["watched_parts"] = res["parts"] - learn
            res["false_alarms"] = len(res["alarms"])
        else:
            amount = args.lighting_amount if name == "lighting" else args.texture_amount
            drift = {"drift_after": args.drift_after, "drift_kind": name, "drift_amount": amount}
            print(f"{name} drift {amount} after part {args.drift_after} ...", file=sys.stderr)
            res = run_line(name, size=args.size, seed=args.seed, count=count, drift=drift)
            res["drift"] = drift
            before = [a for a in res["alarms"] if a["part"] < args.drift_after]
            after = [a for a in res["alarms"] if a["part"] >= args.drift_after]
            res["false_alarms"] = len(before)
            res["parts_to_alarm"] = after[0]["part"] - args.drift_after if after else None
            if after:
                at = after[0]["part"]
                pa = res["passes_archived"]
                res["passes_archived_per_1000"] = {
                    "before_alarm": round(1000 * sum(p < at for p in pa) / max(at, 1), 1),
                    "after_alarm": round(
                        1000 * sum(p >= at for p in pa) / max(res["parts"] - at, 1), 1
                    ),
                }
        res.pop("passes_archived", None)
        out[name] = res
        print(
            f"  {name}: {res['parts']} parts in {res['seconds']} s ({res['fps']} parts/s), "
            f"false alarms {res['false_alarms']}"
            + (f", parts to alarm {res.get('parts_to_alarm')}" if name != "stable" else ""),
            file=sys.stderr,
        )
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    ok = all(
        out[n]["false_alarms"] == 0
        and (
            n == "stable"
            or (out[n]["parts_to_alarm"] is not None and out[n]["parts_to_alarm"] <= 500)
        )
        for n in args.runs.split(",")
    )
    out["ok"] = ok
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
