"""Zero lost verdicts under faults: broker SIGKILLs and a producer SIGKILL, then count.

Against a real Mosquitto started on a free port with persistence on (``defectd.testing.mosquitto``):

1. ``latency``: at the steady rate, how long ``Publisher.submit`` blocks the caller and how long
   until the broker's PUBACK, next to a baseline measured in the same run: paho ``publish`` +
   ``wait_for_publish`` per result (what a pipeline pays when it publishes synchronously).
   Rounds alternate between the two; medians over rounds.
2. ``faults``: the producer (``producer_command`` below: the daemon, ``defectd run`` with a
   synthetic camera) makes ``--results`` results at ``--rate``/s and writes each produced result
   id to a file after its outbox commit. Meanwhile the broker is
   SIGKILLed three times, each time down for ``--outage`` seconds, and the producer is
   SIGKILLed once and restarted. A subscriber with a persistent session (QoS 1, clean start
   off, re-subscribing on every connect) records every result id it receives.
   ``lost`` = produced ids never received; ``duplicates`` = result messages received more than
   once (at-least-once delivery; consumers de-duplicate by result_id).

Mosquitto acknowledges a QoS 1 message before it saves it (``autosave_interval``): the
subscriber stays connected so that messages are delivered rather than only queued, and the
bench waits for one save after subscribing so the session itself survives the first SIGKILL.

The last line of output is ``lost=N duplicates=M results=K`` (on stderr with ``--json``, whose
stdout is one JSON object). Timings are wall-clock on a shared machine: compare the ratios.

    python bench/mqtt_faults.py [--quick] [--json] [--results 6000] [--rate 200] [--outage 4]
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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from defectd.publish.watch import Received, Watcher
from defectd.testing.mosquitto import Mosquitto

HERE = Path(__file__).resolve().parent
PREFIX = "faults"
STATION = "line1"


def script_producer_command(broker: Mosquitto, work: Path, total: int, rate: float) -> list[str]:
    """A stand-in producer: the real ``Publisher`` + ``Outbox`` fed with generated results."""
    return [sys.executable, str(HERE / "mqtt_fault_producer.py"), "--port", str(broker.port), "--prefix", PREFIX, "--station", STATION, "--outbox", str(work / "outbox.sqlite"), "--ids", str(work / "ids.txt"), "--total", str(total), "--rate", str(rate)]  # fmt: skip  # noqa: E501


def daemon_producer_command(broker: Mosquitto, work: Path, total: int, rate: float) -> list[str]:
    """The real daemon: ``defectd run`` with a synthetic camera at ``rate`` parts/s, a tiny
    U-Net (64x64; this bench is about delivery, not inference), the outbox in ``work`` and the
    ids of durable results in ``work/ids.txt`` (``[daemon] result_ledger``). It exits by itself
    after ``total`` parts (``exit_when_sources_end``); restarted, it runs ``total`` more."""
    model = work / "model" / "model.onnx"
    if not model.exists():
        from defectd.model import ModelCard, UNet, UNetConfig
        from defectd.model.export import export_onnx

        card = ModelCard(name="faults-tiny", input={"height": 64, "width": 64})
        export_onnx(UNet(UNetConfig(base=4, depth=2)), card, model)
    config = work / "station.toml"
    config.write_text(
        f'station = "{STATION}"\n'
        f'[model]\npath = "{model}"\nbackend = "ort"\nthreads = 1\n'
        f'[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\nrate_hz = {rate}\n'
        f"height = 64\nwidth = 64\ncount = {total}\n"
        f"[pipeline]\nmax_latency_ms = 10000\n"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{PREFIX}"\n'
        f"reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
        f'[outbox]\npath = "{work / "outbox.sqlite"}"\n'
        f"[archive]\nenabled = false\n[health]\nenabled = false\n"
        f'[daemon]\nstate_dir = "{work / "state"}"\nexit_when_sources_end = true\n'
        f'result_ledger = "{work / "ids.txt"}"\ndrain_timeout_s = 30\nstop_timeout_s = 60\n'
    )
    return [sys.executable, "-m", "defectd", "--log-format", "json", "run", "--config", str(config)]


def producer_command(broker: Mosquitto, work: Path, total: int, rate: float) -> list[str]:
    """The process under test. It must append each produced result id to ``work/ids.txt``
    once the result is durable."""
    return daemon_producer_command(broker, work, total, rate)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


# -- 1. latency ------------------------------------------------------------------------------
def _paced_passes(t0: float, n: int, rate: float) -> Iterator[Any]:
    """``n`` pass verdicts of cam0 (seq 0 to n-1), the i-th made and handed out at
    ``t0 + i / rate`` (sleeping until then), with the wall-clock time it was made."""
    from defectd.pipeline.inspection import Inspection, Verdict

    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield Inspection(STATION, "cam0", i, Verdict.PASS, t_grab_wall=time.time())


def latency_round_publisher(broker: Mosquitto, work: Path, n: int, rate: float) -> dict[str, float]:
    from defectd.publish import MqttConfig, OutboxConfig, Publisher

    config = MqttConfig(host=broker.host, port=broker.port, topic_prefix="lat", client_id="lat-pub")
    pub = Publisher(config, OutboxConfig(path=work / f"lat-{time.monotonic_ns()}.sqlite"), STATION)
    pub.start()
    deadline = time.monotonic() + 10
    while not pub.stats().connected and time.monotonic() < deadline:
        time.sleep(0.01)
    blocked: list[float] = []
    t0 = time.monotonic()
    for item in _paced_passes(t0, n, rate):
        s = time.perf_counter()
        pub.submit(item)
        blocked.append(time.perf_counter() - s)
    while pub.stats().outbox_depth and time.monotonic() < t0 + n / rate + 30:
        time.sleep(0.01)
    stats = pub.stats()
    pub.stop()
    return {
        "blocked_ms_p50": statistics.median(blocked) * 1e3,
        "blocked_ms_p99": _pct(blocked, 0.99) * 1e3,
        "puback_ms_p50": stats.ack_latency_ms_p50 or float("nan"),
        "puback_ms_p99": stats.ack_latency_ms_p99 or float("nan"),
    }


def latency_round_paho(broker: Mosquitto, n: int, rate: float) -> dict[str, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from defectd.publish.messages import encode, result_message

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lat-paho", protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    blocked: list[float] = []
    t0 = time.monotonic()
    for item in _paced_passes(t0, n, rate):
        s = time.perf_counter()
        info = client.publish(
            f"lat/{STATION}/cam0/result", encode(result_message(item, time.time())), qos=1
        )
        info.wait_for_publish(10)
        blocked.append(time.perf_counter() - s)
    client.disconnect()
    client.loop_stop()
    return {
        "blocked_ms_p50": statistics.median(blocked) * 1e3,
        "blocked_ms_p99": _pct(blocked, 0.99) * 1e3,
        "puback_ms_p50": statistics.median(blocked) * 1e3,
        "puback_ms_p99": _pct(blocked, 0.99) * 1e3,
    }


def run_latency(broker: Mosquitto, work: Path, n: int, rate: float, rounds: int) -> dict[str, Any]:
    rows: dict[str, list[dict[str, float]]] = {"publisher": [], "paho_sync": []}
    for r in range(rounds):
        _log(f"latency round {r + 1}/{rounds}: {n} results at {rate:g}/s each")
        rows["publisher"].append(latency_round_publisher(broker, work, n, rate))
        rows["paho_sync"].append(latency_round_paho(broker, n, rate))
    return {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in rows.items()
    }


# -- 2. faults -------------------------------------------------------------------------------
class Subscriber:
    """The persistent-session consumer, on its own named thread."""

    def __init__(self, broker: Mosquitto) -> None:
        from defectd.publish import MqttConfig

        config = MqttConfig(host=broker.host, port=broker.port, topic_prefix=PREFIX,
                            reconnect_min_s=0.05, reconnect_max_s=0.5)  # fmt: skip
        self.received: set[str] = set()
        self.last_message = time.monotonic()
        self._lock = threading.Lock()
        self.watcher = Watcher(config, self._on_message, station=STATION, persistent=True,
                               client_id="mqtt-faults-subscriber")  # fmt: skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.watcher.run(stop=self._stop)

    def _on_message(self, msg: Received) -> None:
        if msg.kind == "result":
            with self._lock:
                self.received.add(msg.payload["result_id"])
                self.last_message = time.monotonic()

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self.received)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def fault_plan(produce_s: float, outage_s: float) -> list[float]:
    """Seconds after the producer starts: three broker kills, then the producer kill, evenly
    spaced between 10 % and 85 % of the production time so the broker is up in between."""
    gap = (0.75 * produce_s - 3 * outage_s) / 3
    if gap < 1.5:
        need = int((3 * outage_s + 4.5) / 0.75 + 1)
        raise SystemExit(f"--results/--rate give too short a run for --outage: need >= {need} s")
    first = 0.1 * produce_s
    return [first + k * (outage_s + gap) for k in range(4)]


def produced_ids(work: Path) -> list[str]:
    path = work / "ids.txt"
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if len(line) == 32]


def run_faults(
    broker: Mosquitto, work: Path, total: int, rate: float, outage_s: float
) -> dict[str, Any]:
    sub = Subscriber(broker)
    if not sub.watcher.subscribed.wait(10):
        raise SystemExit("subscriber could not subscribe")
    if not broker.wait_saved(10):
        raise SystemExit("broker did not save its state")
    cmd = producer_command(broker, work, total, rate)
    log_file = open(work / "producer.log", "ab")  # noqa: SIM115 - closed below
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    _log(f"producer started (pid {proc.pid}): {total} results at {rate:g}/s")
    faults: list[dict[str, Any]] = []
    plan = fault_plan(total / rate, outage_s)

    def wait_until(at: float) -> None:
        while time.monotonic() - t0 < at and proc.poll() is None:
            time.sleep(0.02)

    for planned in plan[:3]:
        wait_until(planned)
        at = time.monotonic() - t0
        broker.kill()
        _log(f"broker SIGKILLed at {at:.1f}s ({len(produced_ids(work))} produced)")
        time.sleep(outage_s)
        broker.start()
        faults.append({"fault": "broker SIGKILL", "at_s": round(at, 1), "down_s": outage_s})
    wait_until(plan[3])
    at = time.monotonic() - t0
    if proc.poll() is not None:
        raise SystemExit("the producer finished before it could be killed: raise --results")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _log(f"producer SIGKILLed at {at:.1f}s ({len(produced_ids(work))} produced); restart in 1s")
    time.sleep(1.0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    faults.append({"fault": "producer SIGKILL + restart", "at_s": round(at, 1), "down_s": 1.0})
    out, _ = proc.communicate(timeout=max(120.0, 3 * total / rate))
    log_file.close()
    producer_stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    produce_s = time.monotonic() - t0

    produced = produced_ids(work)
    want = set(produced)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if want <= sub.snapshot() and time.monotonic() - sub.last_message > 1.0:
            break
        time.sleep(0.1)
    sub.stop()
    received = sub.snapshot()
    summary = sub.watcher.summary
    return {
        "results": len(want),
        "produced_lines": len(produced),
        "lost": len(want - received),
        "lost_ids": sorted(want - received)[:20],
        "duplicates": summary.duplicates_by_kind.get("result", 0),
        "received_unique": len(received & want),
        "unlisted": len(received - want),  # committed, but SIGKILL came before the id was listed
        "rejects_received": summary.by_kind.get("reject", 0),
        "subscriber_connects": summary.connects,
        "faults": faults,
        "elapsed_s": round(produce_s, 1),
        "producer_after_restart": producer_stats,
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    lat = report["latency"]
    t = Table(
        title=f"publish latency at {report['rate']:g} results/s"
        f" (median of {report['rounds']} rounds)"
    )
    for col in ("", "caller blocked p50 ms", "p99 ms", "to PUBACK p50 ms", "p99 ms"):
        t.add_column(col, justify="right" if col else "left")
    for name, label in (
        ("publisher", "Publisher.submit (outbox)"),
        ("paho_sync", "baseline: paho publish+wait"),
    ):
        r = lat[name]
        t.add_row(label, f"{r['blocked_ms_p50']:.3f}", f"{r['blocked_ms_p99']:.3f}",
                  f"{r['puback_ms_p50']:.2f}", f"{r['puback_ms_p99']:.2f}")  # fmt: skip
    ratio = lat["paho_sync"]["blocked_ms_p50"] / lat["publisher"]["blocked_ms_p50"]
    t.add_row("ratio baseline/publisher", f"{ratio:.1f}x", "", "", "")
    console.print(t)
    f = report["faults"]
    ft = Table(title="faults")
    for col in ("fault", "at s", "down s"):
        ft.add_column(col)
    for row in f["faults"]:
        ft.add_row(row["fault"], str(row["at_s"]), str(row["down_s"]))
    console.print(ft)
    console.print(
        f"produced {f['results']} results in {f['elapsed_s']} s; subscriber received "
        f"{f['received_unique']} of them ({f['duplicates']} duplicate deliveries, "
        f"{f['unlisted']} results published but not listed by the killed producer, "
        f"{f['rejects_received']} rejects, {f['subscriber_connects']} subscriber connects)"
    )
    if f["lost_ids"]:
        console.print(f"lost ids (first 20): {', '.join(f['lost_ids'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer results, shorter outages (< 60 s)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--results", type=int, default=None, help="results to produce (default 6000)")
    ap.add_argument("--rate", type=float, default=200.0, help="results per second")
    ap.add_argument("--outage", type=float, default=None, help="seconds the broker stays down")
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds (default 3)")
    args = ap.parse_args(argv)
    total = args.results or (3000 if args.quick else 6000)
    outage = args.outage or (2.0 if args.quick else 4.0)
    rounds = args.rounds or (1 if args.quick else 3)
    lat_n = 300 if args.quick else 1000

    from defectd.log import configure_logging

    configure_logging("warning", "console", sys.stderr)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mqtt-faults-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker")
        broker.start()
        try:
            latency = run_latency(broker, work, lat_n, args.rate, rounds)
            faults = run_faults(broker, work, total, args.rate, outage)
        finally:
            broker.close()
    report = {
        "rate": args.rate,
        "rounds": rounds,
        "latency": latency,
        "faults": faults,
        "wall_s": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "note": "shared CPU: compare ratios"},
    }
    last = f"lost={faults['lost']} duplicates={faults['duplicates']} results={faults['results']}"
    if args.json:
        print(json.dumps(report), flush=True)
        print(last, file=sys.stderr, flush=True)
    else:
        print_report(report)
        print(f"total wall time {report['wall_s']} s", flush=True)
        print(last, flush=True)
    return 0 if faults["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
