"""Scale-out: station daemons whose model runs on one shared Triton Inference Server.

The same synthetic line (``defectd run``, one synthetic camera, the same seed) through:

- ``local``: the model on the station's own CPU engine (``--backend``, default ``ort``);
- ``triton``: the ``triton`` engine against a local ``tritonserver`` (nvidia-pytriton wheel,
  Python backend running the same ONNX with ONNX Runtime on the same CPU), over gRPC.

Rows, interleaved so that both sides see the same machine load:

0. engines: the local engine and the ``triton`` engine alone in one process, one frame per call,
   interleaved: what the server path adds to one inference (p50 of the per-call differences);
1. throughput: the line as fast as the station takes it (``admission = "block"``), parts/s per
   run; the ratio triton/local of the medians;
2. latency: the line paced at ``--rate`` parts/s; grab -> verdict p50/p99 per run, and what the
   server adds (triton minus local, the medians of the runs);
3. shared: ``--stations`` daemons at once on the one server, each as fast as it is served:
   aggregate parts/s and missing verdicts (each station's ledger must hold every part once);
4. crash: one station paced at ``--crash-rate``; the server is SIGKILLed after a third of the
   parts and restarted ``--outage`` s later. Every part must get exactly one verdict
   (``error:engine_error`` while the server is down); the station must recover by itself:
   the time from the server answering again to the first verdict it inspected.

Verdicts are read from each station's outbox (no broker: they stay there) and ledger. The CPU
model and the load average are printed with every run. Exit 1 when a verdict is missing or
doubled, or the station did not recover.

    python bench/scaleout.py --quick --json     # ~5 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import cpu_model
from defectd.engines.triton_repo import RepoOptions, write_repository
from defectd.testing.triton import TritonServer, server_missing

ROOT = Path(__file__).resolve().parent.parent
SEED = 11


def load() -> float:
    return round(os.getloadavg()[0], 2)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Run:
    """One daemon's run: its verdicts (from the outbox), in part order."""

    name: str
    parts: int
    seqs: list[int] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    verdict_t: list[float] = field(default_factory=list)  # epoch s of each verdict
    grab_t: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    ledger: int = 0
    load: float = 0.0
    exit_code: int | None = None

    @property
    def missing(self) -> int:
        return self.parts - len(set(self.seqs))

    @property
    def doubled(self) -> int:
        return len(self.seqs) - len(set(self.seqs))

    @property
    def errors(self) -> int:
        return sum(r.startswith("error") for r in self.rules)

    @property
    def parts_per_s(self) -> float:
        if len(self.verdict_t) < 2:
            return 0.0
        return len(self.verdict_t) / (max(self.verdict_t) - min(self.grab_t))

    def ok_latency(self) -> list[float]:
        return [
            t for t, r in zip(self.total_ms, self.rules, strict=True) if not r.startswith("error")
        ]


def station_config(
    work: Path,
    name: str,
    args: argparse.Namespace,
    *,
    triton: str | None,
    parts: int,
    rate: float | None,
) -> Path:
    state = work / name
    state.mkdir(parents=True, exist_ok=True)
    engine = (
        f'backend = "triton"\n[model.triton]\nurl = "{triton}"\ntimeout_ms = 2000\n'
        "retries = 1\nbackoff_ms = 50\nreconnect_max_s = 0.5\n"
        if triton
        else f'backend = "{args.backend}"\n'
    )
    paced = f"rate_hz = {rate:g}\n" if rate else ""
    admission = "reject" if rate else "block"
    path = work / f"{name}.toml"
    path.write_text(
        f'station = "{name}"\n[model]\npath = "{args.model}"\nwarmup = 1\n{engine}'
        f'[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\nheight = {args.size}\n'
        f"width = {args.size}\nseed = {SEED}\ndefect_rate = 0.3\ncount = {parts}\n{paced}"
        f'[pipeline]\nmax_batch = {args.max_batch}\nadmission = "{admission}"\n'
        f"max_latency_ms = {args.deadline_ms if rate else 0:g}\n"
        "[mqtt]\nport = 1\nreconnect_min_s = 0.5\nreconnect_max_s = 1\nconnect_timeout_s = 1\n"
        "[health]\nenabled = false\n[archive]\nenabled = false\n"
        f'[daemon]\nstate_dir = "{state}"\ndrain_timeout_s = 20\nexit_when_sources_end = true\n'
        'result_ledger = "ledger.txt"\ncamera_idle_ok = true\n'
    )
    return path


def start(config: Path) -> subprocess.Popen[bytes]:
    log = config.with_suffix(".log").open("ab")
    cmd = [sys.executable, "-m", "defectd", "--log-format", "json", "run", "--config", str(config)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def collect(config: Path, name: str, parts: int, proc: subprocess.Popen[bytes]) -> Run:
    run = Run(name, parts, exit_code=proc.returncode, load=load())
    if proc.returncode != 0:
        log = config.with_suffix(".log").read_text().strip().splitlines()
        print(f"{name}: daemon exited {proc.returncode}: {log[-1] if log else ''}", file=sys.stderr)
    state = config.parent / name
    ledger = state / "ledger.txt"
    run.ledger = len(ledger.read_text().split()) if ledger.exists() else 0
    rows: list[tuple[bytes]] = []
    if (state / "outbox.sqlite").exists():
        db = sqlite3.connect(state / "outbox.sqlite")
        try:
            rows = db.execute(
                "SELECT payload FROM outbox WHERE kind = 'result' ORDER BY id"
            ).fetchall()
        except sqlite3.OperationalError:
            rows = []
        finally:
            db.close()
    for (payload,) in rows:
        msg = json.loads(payload)
        run.seqs.append(int(msg["seq"]))
        run.rules.append(str(msg.get("rule") or ""))
        run.grab_t.append(float(msg["t_grab"]["epoch"]))
        run.verdict_t.append(float(msg["t_published"]["epoch"]))
        run.total_ms.append(float(msg["latencies_ms"]["total"]))
    return run


def daemon_run(config: Path, parts: int, timeout: float) -> Run:
    """``defectd run`` on ``config`` (made by ``station_config``, named for its station) to
    the end of its ``parts``, waited for at most ``timeout`` seconds."""
    proc = start(config)
    proc.wait(timeout)
    return collect(config, config.stem, parts, proc)


def shared_run(work: Path, args: argparse.Namespace, triton: str, k: int) -> dict[str, Any]:
    configs = [
        station_config(
            work, f"shared{k}-st{i}", args, triton=triton, parts=args.shared_parts, rate=None
        )
        for i in range(args.stations)
    ]
    procs = [start(c) for c in configs]
    for p in procs:
        p.wait(args.timeout)
    runs = [
        collect(c, f"shared{k}-st{i}", args.shared_parts, p)
        for i, (c, p) in enumerate(zip(configs, procs, strict=True))
    ]
    first = min(min(r.grab_t) for r in runs if r.grab_t)
    last = max(max(r.verdict_t) for r in runs if r.verdict_t)
    verdicts = sum(len(r.seqs) for r in runs)
    return {
        "stations": args.stations,
        "parts": args.stations * args.shared_parts,
        "aggregate_parts_per_s": round(verdicts / (last - first), 2),
        "per_station_parts_per_s": [round(r.parts_per_s, 2) for r in runs],
        "missing": sum(r.missing for r in runs),
        "doubled": sum(r.doubled for r in runs),
        "errors": sum(r.errors for r in runs),
        "ledger_missing": sum(r.parts - r.ledger for r in runs),
        "exit_codes": [r.exit_code for r in runs],
        "load": load(),
    }


def crash_run(work: Path, args: argparse.Namespace, server: TritonServer) -> dict[str, Any]:
    parts = args.crash_parts
    config = station_config(
        work, "crash", args, triton=server.grpc_url, parts=parts, rate=args.crash_rate
    )
    proc = start(config)
    ledger = config.parent / "crash" / "ledger.txt"
    killed = restarted = answered = 0.0
    while proc.poll() is None:
        time.sleep(0.05)
        done = len(ledger.read_text().split()) if ledger.exists() else 0
        if not killed and done >= parts // 3:
            server.kill()
            killed = time.time()
        if killed and not restarted and time.time() - killed >= args.outage:
            restarted = time.time()
            server.start()
            answered = time.time()
    proc.wait(args.timeout)
    run = collect(config, "crash", parts, proc)
    down = [
        t
        for t, r in zip(run.verdict_t, run.rules, strict=True)
        if r.startswith("error") and t >= killed
    ]
    back = [
        t
        for t, r in zip(run.verdict_t, run.rules, strict=True)
        if not r.startswith("error") and t >= answered
    ]
    after_back = [r for t, r in zip(run.verdict_t, run.rules, strict=True) if t >= answered + 2]
    return {
        "parts": parts,
        "rate_hz": args.crash_rate,
        "verdicts": len(run.seqs),
        "missing": run.missing,
        "doubled": run.doubled,
        "ledger": run.ledger,
        "errors": run.errors,
        "error_rules": sorted({r for r in run.rules if r.startswith("error")}),
        "outage_s": round(answered - killed, 2),
        "server_restart_s": round(answered - restarted, 2),
        "first_error_after_kill_s": round(min(down) - killed, 3) if down else None,
        "recovered_s": round(min(back) - answered, 3) if back else None,
        "errors_after_recovery": sum(r.startswith("error") for r in after_back),
        "exit_code": run.exit_code,
        "load": load(),
    }


def engine_row(args: argparse.Namespace, server: TritonServer) -> dict[str, Any]:
    """The engines alone, in this process: one frame per call, local and triton interleaved;
    what the server path adds to one inference (gRPC, serialisation, the server's queue)."""
    import numpy as np

    from defectd.engines import open_engine
    from defectd.engines.remote import TritonOptions

    local = open_engine(args.model, backend=args.backend, max_batch=args.max_batch)
    remote = open_engine(
        args.model, backend="triton", max_batch=args.max_batch,
        remote=TritonOptions(url=server.grpc_url, timeout_ms=5000),
    )  # fmt: skip
    spec = local.spec
    x = np.random.default_rng(SEED).normal(0, 1, (1, *spec.chw)).astype(np.float32)
    times: dict[str, list[float]] = {"local": [], "triton": []}
    try:
        for engine in (local, remote):
            engine.infer(x)
        for k in range(args.engine_calls):
            pair = (("local", local), ("triton", remote))
            for side, engine in pair if k % 2 == 0 else pair[::-1]:
                t = time.perf_counter()
                engine.infer(x)
                times[side].append((time.perf_counter() - t) * 1e3)
    finally:
        local.close()
        remote.close()
    added = [t - u for t, u in zip(times["triton"], times["local"], strict=True)]
    return {
        "calls": args.engine_calls,
        **{
            f"{side}_{q}_ms": round(pct(v, p), 2)
            for side, v in times.items()
            for q, p in (("p50", 50), ("p99", 99))
        },
        "added_p50_ms": round(pct(added, 50), 2),
        "added_p99_ms": round(pct(times["triton"], 99) - pct(times["local"], 99), 2),
        "load": load(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer parts and runs (~5 min)")
    ap.add_argument("--json", action="store_true", help="one JSON object line first")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo" / "model.onnx")
    ap.add_argument("--backend", default="ort", help="the local engine (ort or openvino)")
    ap.add_argument("--size", type=int, default=256, help="synthetic frame size (px)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--parts", type=int, default=None, help="parts per throughput run")
    ap.add_argument("--rate", type=float, default=4.0, help="paced line for the latency row")
    ap.add_argument("--stations", type=int, default=4)
    ap.add_argument("--shared-parts", type=int, default=None)
    ap.add_argument("--crash-parts", type=int, default=None)
    ap.add_argument("--crash-rate", type=float, default=5.0)
    ap.add_argument("--outage", type=float, default=3.0, help="s the server stays down")
    ap.add_argument("--deadline-ms", type=float, default=2000.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="s one daemon may run")
    ap.add_argument("--engine-calls", type=int, default=None, help="calls per engine (row 0)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    args.runs = args.runs or (3 if args.quick else 5)
    args.parts = args.parts or (60 if args.quick else 300)
    args.shared_parts = args.shared_parts or (40 if args.quick else 200)
    args.crash_parts = args.crash_parts or (100 if args.quick else 300)
    args.engine_calls = args.engine_calls or (100 if args.quick else 400)
    missing = server_missing()
    if missing is not None:
        print(f"scaleout: cannot start a local tritonserver: {missing}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="defectd-scaleout-"))
    header = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_start": load()}
    repo = work / "repo"
    write_repository(
        args.model, repo, "python", RepoOptions(max_batch=max(8, args.max_batch)), force=True
    )
    server = TritonServer(repo, work / "server")
    t0 = time.monotonic()
    server.start()
    header["server_start_s"] = round(time.monotonic() - t0, 2)
    rows: dict[str, list[dict[str, Any]]] = {"throughput": [], "latency": []}
    try:
        engines = engine_row(args, server)
        print(f"engines: {engines}", file=sys.stderr)
        for k in range(args.runs):
            for side in ("local", "triton") if k % 2 == 0 else ("triton", "local"):
                url = server.grpc_url if side == "triton" else None
                config = station_config(
                    work, f"tp{k}-{side}", args, triton=url, parts=args.parts, rate=None
                )
                r = daemon_run(config, args.parts, args.timeout)
                rows["throughput"].append(
                    {
                        "run": k,
                        "side": side,
                        "parts_per_s": round(r.parts_per_s, 2),
                        "missing": r.missing,
                        "errors": r.errors,
                        "load": r.load,
                    }
                )
                print(
                    f"throughput run {k} {side}: {r.parts_per_s:.2f} parts/s (load {r.load})",
                    file=sys.stderr,
                )
            for side in ("triton", "local") if k % 2 == 0 else ("local", "triton"):
                url = server.grpc_url if side == "triton" else None
                n = max(20, int(args.rate * (8 if args.quick else 30)))
                config = station_config(
                    work, f"lat{k}-{side}", args, triton=url, parts=n, rate=args.rate
                )
                r = daemon_run(config, n, args.timeout)
                ok = r.ok_latency()
                rows["latency"].append(
                    {
                        "run": k,
                        "side": side,
                        "p50_ms": round(pct(ok, 50), 1),
                        "p99_ms": round(pct(ok, 99), 1),
                        "parts": n,
                        "missing": r.missing,
                        "errors": r.errors,
                        "load": r.load,
                    }
                )
                print(
                    f"latency run {k} {side}: p50 {pct(ok, 50):.1f} ms p99 {pct(ok, 99):.1f} ms "
                    f"(load {r.load})",
                    file=sys.stderr,
                )
        shared = shared_run(work, args, server.grpc_url, 0)
        print(f"shared: {shared}", file=sys.stderr)
        crash = crash_run(work, args, server)
        print(f"crash: {crash}", file=sys.stderr)
    finally:
        server.stop()

    def med(rows_: list[dict[str, Any]], side: str, key: str) -> float:
        return float(statistics.median(r[key] for r in rows_ if r["side"] == side))

    tp_local = med(rows["throughput"], "local", "parts_per_s")
    tp_triton = med(rows["throughput"], "triton", "parts_per_s")
    summary = {
        **header,
        "load_end": load(),
        "model": str(args.model),
        "local_backend": args.backend,
        "throughput": {
            "local_parts_per_s": tp_local,
            "triton_parts_per_s": tp_triton,
            "ratio_triton_over_local": round(tp_triton / tp_local, 3) if tp_local else None,
        },
        "latency": {
            side: {
                "p50_ms": med(rows["latency"], side, "p50_ms"),
                "p99_ms": med(rows["latency"], side, "p99_ms"),
            }
            for side in ("local", "triton")
        },
        "engines": engines,
        "shared": shared,
        "crash": crash,
        "runs": rows,
    }
    lat = summary["latency"]
    summary["latency"]["added_p50_ms"] = round(lat["triton"]["p50_ms"] - lat["local"]["p50_ms"], 1)
    summary["latency"]["added_p99_ms"] = round(lat["triton"]["p99_ms"] - lat["local"]["p99_ms"], 1)
    all_runs_missing = sum(r["missing"] for r in rows["throughput"] + rows["latency"])
    bad = (
        all_runs_missing
        or shared["missing"]
        or shared["doubled"]
        or crash["missing"]
        or crash["doubled"]
        or crash["recovered_s"] is None
        or crash["errors_after_recovery"]
    )
    if args.json:
        print(json.dumps(summary))
    print(
        f"CPU: {header['cpu']} ({header['cores']} cores), load {header['load_start']} -> "
        f"{summary['load_end']}; model {args.model.name}, {args.size}x{args.size}"
    )
    print("| row | local | triton | triton vs local |")
    print("|---|---|---|---|")
    print(
        f"| throughput (parts/s, median of {args.runs}) | {tp_local:.2f} | {tp_triton:.2f} | "
        f"x{summary['throughput']['ratio_triton_over_local']} |"
    )
    for q in ("p50", "p99"):
        print(
            f"| one frame, engine alone, {q} (ms, {engines['calls']} calls) | "
            f"{engines['local_' + q + '_ms']:.1f} | {engines['triton_' + q + '_ms']:.1f} | "
            f"{engines['added_' + q + '_ms']:+.1f} ms |"
        )
    for q in ("p50", "p99"):
        print(
            f"| grab -> verdict {q} at {args.rate:g}/s (ms) | {lat['local'][q + '_ms']:.1f} | "
            f"{lat['triton'][q + '_ms']:.1f} | {lat['added_' + q + '_ms']:+.1f} ms |"
        )
    print(
        f"shared server: {shared['stations']} stations, {shared['parts']} parts, "
        f"{shared['aggregate_parts_per_s']} parts/s aggregate, missing {shared['missing']}, "
        f"doubled {shared['doubled']}, errors {shared['errors']}"
    )
    print(
        f"server SIGKILL: {crash['parts']} parts at {crash['rate_hz']:g}/s, down "
        f"{crash['outage_s']} s: verdicts {crash['verdicts']}, missing {crash['missing']}, "
        f"doubled {crash['doubled']}, errors {crash['errors']} {crash['error_rules']}, "
        f"first error {crash['first_error_after_kill_s']} s after the kill, recovered "
        f"{crash['recovered_s']} s after the server answered"
    )
    print(
        f"missing={all_runs_missing + shared['missing'] + crash['missing']} "
        f"doubled={shared['doubled'] + crash['doubled']} "
        f"recovered={crash['recovered_s'] is not None}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
