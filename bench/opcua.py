"""OPC UA beside MQTT: trigger -> verdict latency on both, and what the server costs the line.

Against the real daemon (``defectd run`` in its own process, the shipped demo model on ONNX
Runtime, a synthetic camera at the model's 256x256) and a real Mosquitto on a free port:

1. ``latency``: one daemon whose camera takes a frame per PLC trigger (``trigger = "request"``,
   line mode ``plc-trigger``) with the OPC UA server on (Basic256Sha256 Sign&Encrypt, user and
   password). The bench acts as the PLC on both protocols in the same run, parts alternating:
   even parts are announced with the OPC UA ``Trigger`` method, odd ones on the MQTT trigger
   topic (QoS 1), open loop at ``--rate`` parts/s. For every part it records when the verdict
   arrived as an OPC UA ``Verdict`` event (subscription publishing interval ``--interval-ms``)
   and as an MQTT ``result`` message. Reported: trigger -> verdict on the same protocol
   (OPC UA -> OPC UA event, MQTT -> MQTT result), and for all parts the verdict's arrival on
   each protocol measured from the same trigger.
2. ``throughput``: a free-running synthetic line of ``--tp-parts`` parts as fast as the
   daemon takes them (admission ``block``, no deadline), with the OPC UA server off and on (on:
   one client subscribed to the Verdict events, as a SCADA would be), rows alternating,
   ``--runs`` runs each; parts/s from the MQTT results received (the middle 80% of each run),
   and the daemon process's CPU time per part over the same window (psutil). The target is
   on >= 0.95 x off. On a shared machine the wall-clock rate follows the other load; the CPU
   time per part is the steadier measure of what the server costs.

Timings are wall-clock on a shared machine: compare within one run.

    python bench/opcua.py [--quick] [--json] [--parts 300] [--rate 10] [--tp-parts 600] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from defectd.opcua.certs import add_user, make_certificate
from defectd.testing.mosquitto import Mosquitto, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = ROOT / "models" / "demo" / "model.onnx"
STATION = "bench1"
PREFIX = "opcbench"
USER, PASSWORD = "plc", "bench-pass"
CLIENT_URI = "urn:defectd:bench:plc"
WATCHDOG_S = 1.0  # asyncua's default: a server_state read slower than this = connection lost


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_pki(root: Path) -> dict[str, Path]:
    (root / "trusted").mkdir(parents=True, exist_ok=True)
    make_certificate(root / "server.der", root / "server.key.pem",
                     application_uri=f"urn:defectd:{STATION}:server", common_name=STATION,
                     hosts=("localhost", "127.0.0.1"))  # fmt: skip
    make_certificate(root / "trusted" / "plc.der", root / "plc.key.pem",
                     application_uri=CLIENT_URI, common_name="plc", role="client")  # fmt: skip
    add_user(root / "users", USER, PASSWORD)
    return {
        "server": root / "server.der",
        "server_key": root / "server.key.pem",
        "trusted": root / "trusted",
        "client": root / "trusted" / "plc.der",
        "client_key": root / "plc.key.pem",
        "users": root / "users",
    }


def station_config(
    work: Path, broker: Mosquitto, pki: dict[str, Path], *, opcua_port: int | None,
    triggered: bool, parts: int,
) -> Path:  # fmt: skip
    camera = 'type = "synthetic"\ncamera = "cam0"\nheight = 256\nwidth = 256\ndefect_rate = 0.3\n'
    if triggered:
        camera += 'trigger = "request"\n[cameras.line]\nmode = "plc-trigger"\n'
        camera += "frame_timeout_ms = 2000\n"
        pipeline = ""
        daemon = "camera_idle_ok = true\n"
    else:
        camera += f"rate_hz = 1000\ncount = {parts}\n"
        pipeline = '[pipeline]\nadmission = "block"\nmax_latency_ms = 0\n'
        daemon = "exit_when_sources_end = true\n"
    opcua = ""
    if opcua_port is not None:
        opcua = (
            f'[opcua]\nendpoint = "opc.tcp://127.0.0.1:{opcua_port}/defectd/"\n'
            f'certificate = "{pki["server"]}"\nprivate_key = "{pki["server_key"]}"\n'
            f'trusted_clients = "{pki["trusted"]}"\nusers_file = "{pki["users"]}"\n'
            f"history_size = 100\n"
        )
    text = (
        f'station = "{STATION}"\n'
        f'[model]\npath = "{MODEL}"\nbackend = "ort"\nthreads = 1\n'
        f"[[cameras]]\n{camera}{pipeline}"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{PREFIX}"\n'
        f"reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
        f"[archive]\nenabled = false\n[health]\nenabled = false\n"
        f'[daemon]\nstate_dir = "{work / "state"}"\ndrain_timeout_s = 20\n{daemon}{opcua}'
    )
    path = work / "station.toml"
    path.write_text(text)
    return path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "defectd", "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


class MqttSide:
    """The PLC on MQTT: publishes triggers, records when each result arrives (by part id)."""

    def __init__(self, broker: Mosquitto, cpu_marks: tuple[int, int] | None = None) -> None:
        self.results: dict[str, float] = {}
        self.times: list[float] = []
        # CPU seconds of the daemon (``watch``) when the n-th result arrives, for n in cpu_marks.
        self.cpu_marks = cpu_marks
        self.watch: psutil.Process | None = None
        self.cpu_at: dict[int, float] = {}
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError("MQTT subscriber did not subscribe")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(f"{PREFIX}/{STATION}/cam0/result", qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        part = json.loads(msg.payload).get("part_id")
        self.times.append(now)
        if self.cpu_marks and self.watch is not None and len(self.times) in self.cpu_marks:
            with contextlib.suppress(psutil.Error):
                cpu = self.watch.cpu_times()
                self.cpu_at[len(self.times)] = cpu.user + cpu.system
        if part is not None and part not in self.results:
            self.results[part] = now

    def trigger(self, part: str, gate_ms: float) -> None:
        payload = json.dumps({"part_id": part, "gate_ms": gate_ms})
        self.client.publish(f"{PREFIX}/{STATION}/cam0/trigger", payload, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class OpcUaSide:
    """The PLC on OPC UA: calls Trigger, records when each Verdict event arrives."""

    def __init__(self) -> None:
        self.events: dict[str, float] = {}
        self.count = 0

    def event_notification(self, event: Any) -> None:
        now = time.perf_counter()
        self.count += 1
        if event.PartId and event.PartId not in self.events:
            self.events[event.PartId] = now

    async def connect(self, url: str, pki: dict[str, Path], interval_ms: float) -> Any:
        from asyncua import Client, ua
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

        deadline = time.monotonic() + 120
        while True:
            client = Client(url, timeout=10, watchdog_intervall=WATCHDOG_S)
            client.application_uri = CLIENT_URI
            await client.set_security(
                SecurityPolicyBasic256Sha256, str(pki["client"]), str(pki["client_key"]),
                server_certificate=str(pki["server"]), mode=ua.MessageSecurityMode.SignAndEncrypt,
            )  # fmt: skip
            client.set_user(USER)
            client.set_password(PASSWORD)
            try:
                await client.connect()
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        ns = await client.get_namespace_index(f"urn:defectd:{STATION}")
        station = client.get_node(ua.NodeId(STATION, ns))
        etype = await client.nodes.base_event_type.get_child(f"{ns}:VerdictEventType")
        sub = await client.create_subscription(interval_ms, self)
        await sub.subscribe_events(station, etype, queuesize=0)
        self.ns = ns
        self.client = client
        self.camera = client.get_node(ua.NodeId(f"{STATION}/cam0", ns))
        self.method = ua.NodeId(f"{STATION}/cam0/Trigger", ns)
        return client

    async def trigger(self, part: str, gate_ms: float) -> None:
        from asyncua import ua

        answer = await self.camera.call_method(
            self.method, ua.Variant(part, ua.VariantType.String),
            ua.Variant(ua.get_win_epoch(), ua.VariantType.DateTime),
            ua.Variant(gate_ms, ua.VariantType.Double),
        )  # fmt: skip
        if answer[0] is not True:
            raise RuntimeError(f"Trigger {part}: {answer[1]}")


async def run_latency(
    work: Path, broker: Mosquitto, pki: dict[str, Path], *, parts: int, rate: float, interval: float
) -> dict[str, Any]:
    port = free_port()
    config = station_config(work, broker, pki, opcua_port=port, triggered=True, parts=parts)
    daemon = start_daemon(config, work / "latency-daemon.log")
    mqtt_side = MqttSide(broker)
    opc = OpcUaSide()
    try:
        client = await opc.connect(f"opc.tcp://127.0.0.1:{port}/defectd/", pki, interval)
        try:
            await asyncio.sleep(2.0)  # the daemon's trigger subscriber connects to the broker
            # Warm-up: a few parts on each protocol, not counted.
            for i in range(6):
                if i % 2 == 0:
                    await opc.trigger(f"W-{i}", 5000)
                else:
                    mqtt_side.trigger(f"W-{i}", 5000)
                await asyncio.sleep(0.3)
            sent: dict[str, tuple[str, float]] = {}
            period = 1.0 / rate
            t_next = time.perf_counter()
            for i in range(parts):
                part = f"L-{i:05d}"
                via = "opcua" if i % 2 == 0 else "mqtt"
                t_next += period
                t0 = time.perf_counter()
                sent[part] = (via, t0)
                if via == "opcua":
                    await opc.trigger(part, 5000)
                else:
                    mqtt_side.trigger(part, 5000)
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            end = time.monotonic() + 30
            while time.monotonic() < end and not (
                all(p in opc.events for p in sent) and all(p in mqtt_side.results for p in sent)
            ):
                await asyncio.sleep(0.05)
        finally:
            await client.disconnect()
    finally:
        mqtt_side.close()
        daemon.terminate()
        daemon.wait(60)
    same: dict[str, list[float]] = {"opcua": [], "mqtt": []}
    arrival: dict[str, list[float]] = {"opcua": [], "mqtt": []}
    for part, (via, t0) in sent.items():
        got = {"opcua": opc.events.get(part), "mqtt": mqtt_side.results.get(part)}
        if got[via] is not None:
            same[via].append((got[via] - t0) * 1000)  # type: ignore[operator]
        for proto, t in got.items():
            if t is not None:
                arrival[proto].append((t - t0) * 1000)

    def summary(values: list[float], n: int) -> dict[str, Any]:
        return {"n": len(values), "of": n, "p50_ms": pct(values, 50), "p99_ms": pct(values, 99)}

    n_each = {"opcua": (parts + 1) // 2, "mqtt": parts // 2}
    return {
        "parts": parts,
        "rate": rate,
        "publishing_interval_ms": interval,
        "same_protocol": {k: summary(v, n_each[k]) for k, v in same.items()},
        "verdict_arrival_all_parts": {k: summary(v, parts) for k, v in arrival.items()},
    }


async def run_throughput_once(
    work: Path, broker: Mosquitto, pki: dict[str, Path], parts: int, opcua: bool
) -> dict[str, Any]:
    port = free_port() if opcua else None
    run_dir = work / f"tp-{time.monotonic_ns()}"
    run_dir.mkdir()
    config = station_config(run_dir, broker, pki, opcua_port=port, triggered=False, parts=parts)
    lo, hi = int(parts * 0.1), int(parts * 0.9)
    mqtt_side = MqttSide(broker, cpu_marks=(lo, hi))
    opc = OpcUaSide()
    daemon = start_daemon(config, run_dir / "daemon.log")
    mqtt_side.watch = psutil.Process(daemon.pid)
    try:
        if opcua:
            client = await opc.connect(f"opc.tcp://127.0.0.1:{port}/defectd/", pki, 50)
            while daemon.poll() is None:
                await asyncio.sleep(0.1)
            with contextlib.suppress(Exception):  # the daemon has gone: the session with it
                await client.disconnect()
        else:
            while daemon.poll() is None:
                await asyncio.sleep(0.1)
        end = time.monotonic() + 10
        while len(mqtt_side.times) < parts and time.monotonic() < end:
            await asyncio.sleep(0.05)
    finally:
        mqtt_side.close()
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(60)
    if daemon.returncode != 0:
        tail = (run_dir / "daemon.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the daemon exited with {daemon.returncode}:\n{tail}")
    times = mqtt_side.times
    fps = (hi - lo) / (times[hi - 1] - times[lo - 1]) if len(times) >= hi else 0.0
    cpu = mqtt_side.cpu_at
    cpu_ms = (cpu[hi] - cpu[lo]) / (hi - lo) * 1000 if lo in cpu and hi in cpu else None
    return {"fps": fps, "cpu_ms_per_part": cpu_ms, "results": len(times), "opcua_events": opc.count}


async def run_throughput(
    work: Path, broker: Mosquitto, pki: dict[str, Path], parts: int, runs: int
) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for r in range(runs):
        for row in ("off", "on") if r % 2 == 0 else ("on", "off"):
            result = await run_throughput_once(work, broker, pki, parts, row == "on")
            _log(
                f"throughput run {r + 1} {row}: {result['fps']:.1f} parts/s, "
                f"{result['cpu_ms_per_part'] or 0:.1f} CPU ms/part "
                f"({result['results']} results, {result['opcua_events']} OPC UA events)"
            )
            rows[row].append(result)
    med = {k: statistics.median(x["fps"] for x in v) for k, v in rows.items()}
    cpu = {
        k: statistics.median(x["cpu_ms_per_part"] for x in v if x["cpu_ms_per_part"] is not None)
        for k, v in rows.items()
    }
    return {
        "parts": parts,
        "runs": rows,
        "median_fps": med,
        "ratio_on_off": med["on"] / med["off"] if med["off"] else None,
        "median_cpu_ms_per_part": cpu,
        "cpu_ratio_off_on": cpu["off"] / cpu["on"] if cpu["on"] else None,
    }


def machine() -> dict[str, str]:
    cpu = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name")), "")  # fmt: skip
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "load": " ".join(
        f"{x:.2f}" for x in os.getloadavg())}  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"CPU {m['cpu']} ({m['cores']} cores), load at start {m['load_start']}, "
          f"at end {m['load_end']}")  # fmt: skip
    lat = report.get("latency")
    if lat:
        print(
            f"\ntrigger -> verdict, {lat['parts']} parts at {lat['rate']}/s, alternating "
            f"protocols; OPC UA publishing interval {lat['publishing_interval_ms']} ms"
        )
        print("| path | parts | p50 ms | p99 ms |\n|---|---|---|---|")
        names = {"opcua": "OPC UA Trigger -> Verdict event", "mqtt": "MQTT trigger -> result"}
        for k, s in lat["same_protocol"].items():
            print(f"| {names[k]} | {s['n']}/{s['of']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
        for k, s in lat["verdict_arrival_all_parts"].items():
            print(f"| any trigger -> verdict on {k} | {s['n']}/{s['of']} | "
                  f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")  # fmt: skip
    tp = report.get("throughput")
    if tp:
        print(f"\nthroughput, {tp['parts']} parts per run, median of {len(tp['runs']['on'])}")
        print("| OPC UA server | parts/s (runs) | daemon CPU ms/part (runs) |\n|---|---|---|")
        for k in ("off", "on"):
            runs = ", ".join(f"{r['fps']:.1f}" for r in tp["runs"][k])
            cpus = ", ".join(f"{r['cpu_ms_per_part'] or 0:.1f}" for r in tp["runs"][k])
            cpu = tp["median_cpu_ms_per_part"][k]
            print(f"| {k} | {tp['median_fps'][k]:.1f} ({runs}) | {cpu:.1f} ({cpus}) |")
        print(f"throughput on / off = {tp['ratio_on_off']:.3f} (target >= 0.95)")
        print(
            f"CPU per part off / on = {tp['cpu_ratio_off_on']:.3f} "
            "(what the throughput ratio is where the daemon has its cores to itself)"
        )


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": {**machine()}}
    report["machine"]["load_start"] = report["machine"].pop("load")
    with tempfile.TemporaryDirectory(prefix="opcua-bench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        broker = Mosquitto(work / "broker", persistence=False)
        broker.start()
        try:
            if not args.skip_latency:
                _log("latency run ...")
                report["latency"] = await run_latency(
                    work, broker, pki, parts=args.parts, rate=args.rate, interval=args.interval_ms
                )
            if not args.skip_throughput:
                report["throughput"] = await run_throughput(
                    work, broker, pki, args.tp_parts, args.runs
                )
        finally:
            broker.close()
    report["machine"]["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (~1-2 minutes)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--parts", type=int, default=300, help="latency: parts (both protocols)")
    p.add_argument("--rate", type=float, default=10.0, help="latency: parts per second")
    p.add_argument("--interval-ms", type=float, default=10.0, help="OPC UA publishing interval")
    p.add_argument("--tp-parts", type=int, default=600, help="throughput: parts per run")
    p.add_argument("--runs", type=int, default=3, help="throughput: runs per row")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.parts, args.tp_parts, args.runs = min(args.parts, 60), min(args.tp_parts, 200), 1
    report = asyncio.run(amain(args))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
