"""Soak: a million frames through the real daemon, watching for leaks.

Starts Mosquitto on a free port and ``defectd run`` (a subprocess) with a tiny U-Net (32x32,
base 4, depth 2: this bench is about the daemon, not the model) and the fastest synthetic line
(``admission = "block"``: every frame is inspected, none is an ``error:queue_full``). Every
``--sample-s`` it reads the daemon's RSS, threads and open file descriptors from ``/proc``, the
verdicts so far (the result ledger: 33 bytes per id) and the outbox depth (a read-only query of
the outbox file). One row per 100,000 verdicts; the RSS growth after the warm-up (the first
``--warmup`` verdicts) is the leak figure (``--max-growth``, 5 %).

    nice -n 10 python bench/soak.py [--frames 1000000] [--json] [--png bench/soak_rss.png]

The last line is ``rss_growth_pct=X frames=N`` (with ``--json`` stdout is one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model
from defectd.testing.mosquitto import Mosquitto

HERE = Path(__file__).resolve().parent
ID_BYTES = 33  # a result id (32 hex digits) and a newline


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tiny_model(work: Path) -> Path:
    from defectd.model import ModelCard, UNet, UNetConfig
    from defectd.model.export import export_onnx

    model = work / "model" / "model.onnx"
    card = ModelCard(name="soak-tiny", input={"height": 32, "width": 32})  # type: ignore[arg-type]
    export_onnx(UNet(UNetConfig(base=4, depth=2)), card, model)
    return model


def station_config(work: Path, broker: Mosquitto, model: Path, frames: int) -> Path:
    config = work / "station.toml"
    config.write_text(
        f'station = "soak"\n'
        f'[model]\npath = "{model}"\nbackend = "ort"\nthreads = 1\n'
        f'cache_dir = "{work / "cache"}"\n'
        f'[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\nrate_hz = 100000\n'
        f"height = 32\nwidth = 32\ncount = {frames}\ndefect_rate = 0.3\n"
        f'[pipeline]\nadmission = "block"\nmax_latency_ms = 0\ntile_overlap_px = 0\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "soak"\n'
        f"reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
        f'[outbox]\npath = "{work / "outbox.sqlite"}"\n'
        f"[archive]\nenabled = false\n[health]\nenabled = false\n"
        f'[daemon]\nstate_dir = "{work / "state"}"\nexit_when_sources_end = true\n'
        f'result_ledger = "{work / "ids.txt"}"\ndrain_timeout_s = 60\nstop_timeout_s = 120\n'
        f"camera_stall_s = 600\n"
    )
    return config


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (bytes), threads and open descriptors of a live process, from /proc."""
    rss = threads = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss": rss, "threads": threads, "fds": fds}


def outbox_depth(path: Path) -> int | None:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def verdicts_so_far(ledger: Path) -> int:
    try:
        return ledger.stat().st_size // ID_BYTES
    except OSError:
        return 0


def plot(samples: list[dict[str, Any]], warmup: int, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["verdicts"] / 1000 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(x, [s["rss"] / 2**20 for s in samples], color="tab:blue", label="RSS (MiB)")
    ax.axvline(warmup / 1000, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("verdicts (thousands)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(x, [s["threads"] for s in samples], color="tab:orange", label="threads")
    ax2.plot(x, [s["fds"] for s in samples], color="tab:green", label="open fds")
    ax2.plot(x, [s["outbox"] or 0 for s in samples], color="tab:red", label="outbox depth")
    ax2.set_ylabel("threads / fds / outbox rows")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--warmup", type=int, default=100_000, help="verdicts before the baseline")
    ap.add_argument("--every", type=int, default=100_000, help="verdicts per table row")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--max-growth", type=float, default=5.0, help="percent, after warm-up")
    ap.add_argument("--png", type=Path, default=HERE / "soak_rss.png")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="defectd-soak-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker", persistence=False)
        broker.start()
        try:
            model = tiny_model(work)
            config = station_config(work, broker, model, args.frames)
            cmd = [sys.executable, "-m", "defectd", "--log-level", "warning", "--log-format",
                   "json", "run", "--config", str(config)]  # fmt: skip
            log_path = work / "daemon.log"
            t0 = time.monotonic()
            with open(log_path, "wb") as log_fh:
                proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
                samples: list[dict[str, Any]] = []
                while proc.poll() is None:
                    time.sleep(args.sample_s)
                    try:
                        s: dict[str, Any] = proc_sample(proc.pid)
                    except OSError:
                        break
                    if s["rss"] == 0:  # exiting: no memory map left to read
                        break
                    s["verdicts"] = verdicts_so_far(work / "ids.txt")
                    s["outbox"] = outbox_depth(work / "outbox.sqlite")
                    s["t"] = round(time.monotonic() - t0, 1)
                    samples.append(s)
                    if len(samples) % 30 == 0:
                        rate = s["verdicts"] / max(s["t"], 1e-9)
                        _log(
                            f"{s['verdicts']:>9} verdicts, {rate:.0f}/s, RSS "
                            f"{s['rss'] / 2**20:.1f} MiB, threads {s['threads']}, fds "
                            f"{s['fds']}, outbox {s['outbox']}"
                        )
                rc = proc.wait()
            elapsed = time.monotonic() - t0
        finally:
            broker.close()
        total = verdicts_so_far(work / "ids.txt")
        if rc != 0 or not samples:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            _log(f"daemon exited {rc}")
            return 1
        rows = []
        for mark in range(args.every, total + 1, args.every):
            s = min(samples, key=lambda x: abs(x["verdicts"] - mark))
            rows.append({**s, "mark": mark})
        base = min(samples, key=lambda x: abs(x["verdicts"] - args.warmup))
        after = [s for s in samples if s["verdicts"] >= args.warmup]
        end = samples[-1]
        growth = 100.0 * (end["rss"] - base["rss"]) / base["rss"]
        peak = 100.0 * (max(s["rss"] for s in after) - base["rss"]) / base["rss"]
        cpu = cpu_model()
        title = (
            f"defectd soak: {total:,} frames in {elapsed / 60:.1f} min; RSS after warm-up "
            f"{growth:+.2f} % (end), {peak:+.2f} % (peak); {cpu}"
        )
        plot(samples, args.warmup, args.png, title)
        report = {
            "frames": total,
            "elapsed_s": round(elapsed, 1),
            "fps": round(total / elapsed, 1),
            "warmup_verdicts": args.warmup,
            "rss_base_mib": round(base["rss"] / 2**20, 2),
            "rss_end_mib": round(end["rss"] / 2**20, 2),
            "rss_growth_pct": round(growth, 2),
            "rss_peak_growth_pct": round(peak, 2),
            "rows": [
                {
                    "verdicts": r["mark"],
                    "rss_mib": round(r["rss"] / 2**20, 2),
                    "threads": r["threads"],
                    "fds": r["fds"],
                    "outbox_depth": r["outbox"],
                }
                for r in rows
            ],
            "png": str(args.png),
            "cpu": cpu,
            "load": os.getloadavg(),
        }
        if args.json:
            print(json.dumps(report))
        else:
            print(f"{'verdicts':>10} {'RSS MiB':>8} {'threads':>8} {'fds':>5} {'outbox':>7}")
            for r in report["rows"]:
                print(
                    f"{r['verdicts']:>10} {r['rss_mib']:>8} {r['threads']:>8} {r['fds']:>5}"
                    f" {r['outbox_depth']!s:>7}"
                )
        ok = growth <= args.max_growth and total >= args.frames
        print(
            f"rss_growth_pct={growth:.2f} frames={total} ok={str(ok).lower()}",
            file=sys.stderr if args.json else sys.stdout,
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
