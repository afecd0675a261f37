"""``defectd demo``: the demo station with a live view, for a first run on a fresh install.

The same station as ``configs/demo.toml`` (``DEMO_STATION``): a synthetic camera line with
known truth, the bundled model ``models/demo/model.onnx``, and a broker — the local one on
127.0.0.1:1883 when it answers, otherwise an embedded ``amqtt`` broker on a free port (MQTT
3.1.1, in this process). A subscriber counts what arrives over MQTT; at the end a summary
compares the verdicts with the truth the synthetic line knows.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

import defectd
from defectd.calibration.threshold import Rate
from defectd.daemon.config import StationConfig, parse_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.errors import ModelError, PublishError
from defectd.log import get_logger
from defectd.model.card import load_card
from defectd.pipeline.inspection import Verdict
from defectd.pipeline.runner import PipelineResult

log = get_logger(__name__)

DEMO_MODEL = Path("models") / "demo" / "model.onnx"
LOCAL_BROKER = ("127.0.0.1", 1883)

# The demo station; configs/demo.toml holds the same settings (a test keeps them equal).
# Camera size follows the model's input, so each frame is one model input (no tiling).
DEMO_STATION: dict[str, Any] = {
    "station": "demo",
    "model": {"path": str(DEMO_MODEL), "backend": "auto"},
    "cameras": [
        {
            "type": "synthetic",
            "camera": "line1",
            "rate_hz": 10.0,
            "defect_rate": 0.3,
            "seed": 7,
        }
    ],
    "pipeline": {
        "mode": "throughput",
        "max_batch": 1,
        "max_delay_ms": 5.0,
        "max_latency_ms": 2000.0,
    },
    "mqtt": {"host": LOCAL_BROKER[0], "port": LOCAL_BROKER[1]},
    "archive": {"pass_sample": 0.02, "quota_mb": 200.0},
    "health": {"address": "127.0.0.1:9464"},
}


def repo_root() -> Path:
    """The source tree the package runs from (``src/defectd`` -> the repository)."""
    return Path(defectd.__file__).resolve().parents[2]


def installed_data_dirs() -> list[Path]:
    """``<prefix>/share/defectd`` of this installation (and of a ``pip install --user``): where
    a wheel puts the demo model, the example configs and the systemd unit."""
    schemes = [sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")]
    dirs = [Path(sysconfig.get_path("data", scheme)) / "share" / "defectd" for scheme in schemes]
    return list(dict.fromkeys(dirs))


def find_demo_model(explicit: Path | None = None) -> Path:
    """``explicit``, else ``models/demo/model.onnx`` of the repository the package was
    installed from (``pip install -e .``), else of the installation's data folder
    (``<prefix>/share/defectd``, a wheel install), else of the current folder.

    Raises ``ModelError`` naming every place looked at.
    """
    candidates = (
        [explicit]
        if explicit is not None
        else [
            repo_root() / DEMO_MODEL,
            *(data / DEMO_MODEL for data in installed_data_dirs()),
            DEMO_MODEL,
        ]
    )
    for path in candidates:
        if path.is_file():
            return path.resolve()
    looked = ", ".join(str(p) for p in candidates)
    raise ModelError(f"demo model not found (looked at {looked}); pass --model PATH")


def broker_reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """An ``amqtt`` broker (MQTT 3.1.1, anonymous, loopback only) on its own thread and loop.

    For the demo only: production and the reliability tests use Mosquitto.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port if port is not None else _free_port()
        self._loop = asyncio.new_event_loop()
        self._broker: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-broker", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        try:
            self._broker = Broker(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise PublishError(f"embedded MQTT broker did not start: {self._error!r}")
        log.info("embedded_broker_started", host=self.host, port=self.port)

    def stop(self, timeout: float = 5.0) -> None:
        if self._broker is not None and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                fut.result(timeout)
            except Exception as exc:  # a demo broker that stops untidily is not worth a crash
                log.debug("embedded_broker_stop_failed", error=repr(exc))
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


class ResultCounter:
    """An MQTT subscriber counting distinct result ids on ``<prefix>/<station>/+/result``."""

    def __init__(self, host: str, port: int, topic: str, protocol: MQTTProtocolVersion) -> None:
        self.ids: set[str] = set()
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"defectd-demo-watch-{_free_port()}",
            protocol=protocol,
        )  # fmt: skip
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_message = self._on_message
        self._client.connect(host, port, 30)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            rid = json.loads(msg.payload)["result_id"]
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            self.ids.add(str(rid))

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.ids)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class Confusion:
    """Verdicts against the synthetic line's truth (``error`` counts as a reject)."""

    true_reject: int = 0  # defective part rejected
    false_reject: int = 0  # good part rejected
    escape: int = 0  # defective part passed
    true_pass: int = 0
    errors: int = 0

    def add(self, verdict: Verdict, defective: bool) -> None:
        if verdict is Verdict.ERROR:
            self.errors += 1
        rejected = verdict is not Verdict.PASS
        if defective:
            if rejected:
                self.true_reject += 1
            else:
                self.escape += 1
        elif rejected:
            self.false_reject += 1
        else:
            self.true_pass += 1

    @property
    def total(self) -> int:
        return self.true_reject + self.false_reject + self.escape + self.true_pass

    @property
    def accuracy(self) -> float:
        return (self.true_reject + self.true_pass) / self.total if self.total else 0.0

    @property
    def escapes(self) -> Rate:
        """Defective parts passed, of the defective parts, with its Wilson 95% interval."""
        return Rate(self.escape, self.true_reject + self.escape)

    @property
    def false_rejects(self) -> Rate:
        """Good parts rejected, of the good parts, with its Wilson 95% interval."""
        return Rate(self.false_reject, self.true_pass + self.false_reject)

    @property
    def escape_rate(self) -> float:
        return self.escapes.rate

    @property
    def false_reject_rate(self) -> float:
        return self.false_rejects.rate

    def as_dict(self) -> dict[str, float]:
        """Counts, rates and the rates' 95% intervals (``*_low``, ``*_high``): a few hundred
        parts measure an escape rate to a few points, not to a tenth of one."""
        escape_low, escape_high = self.escapes.interval
        fr_low, fr_high = self.false_rejects.interval
        return {
            "true_reject": self.true_reject,
            "false_reject": self.false_reject,
            "escape": self.escape,
            "true_pass": self.true_pass,
            "accuracy": round(self.accuracy, 4),
            "escape_rate": round(self.escape_rate, 4),
            "escape_rate_low": round(escape_low, 4),
            "escape_rate_high": round(escape_high, 4),
            "false_reject_rate": round(self.false_reject_rate, 4),
            "false_reject_rate_low": round(fr_low, 4),
            "false_reject_rate_high": round(fr_high, 4),
        }


@dataclass
class DemoSummary:
    station: str
    model: str
    engine: str
    broker: str
    duration_s: float
    parts: int
    verdicts: dict[str, int]
    fps: float
    latency_ms: dict[str, dict[str, float]]
    confusion: dict[str, float]
    published_received: int
    outbox_left: int | None
    archive_dir: str
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DemoView:
    """Collects results (observer, pipeline threads) and renders the live view (main loop)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.confusion = Confusion()
        self.verdicts: dict[str, int] = {v.value: 0 for v in Verdict}
        self.rejects: deque[dict[str, Any]] = deque(maxlen=6)
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def observe(self, result: PipelineResult) -> None:
        ins = result.inspection
        defective = bool(result.frame.meta.get("truth_defective", False))
        with self._lock:
            self.verdicts[ins.verdict.value] += 1
            self.confusion.add(ins.verdict, defective)
            if ins.verdict is not Verdict.PASS:
                self.rejects.appendleft(
                    {
                        "seq": ins.seq,
                        "verdict": ins.verdict.value,
                        "rule": ins.rule or "",
                        "defects": len(ins.defects),
                        "truth": ",".join(result.frame.meta.get("truth_kinds") or ()) or "good",
                        "ms": ins.latencies_ms.get("total", 0.0),
                    }
                )

    def render(self, service: Service) -> Group:
        gen_stats = service.pipeline_stats()
        with self._lock:
            verdicts = dict(self.verdicts)
            c = Confusion(**asdict(self.confusion))
            rejects = list(self.rejects)
        top = Table.grid(padding=(0, 3))
        top.add_row(
            f"[bold]{sum(verdicts.values())}[/] parts",
            f"[green]{verdicts['pass']} pass[/]",
            f"[red]{verdicts['fail']} fail[/]",
            f"[yellow]{verdicts['error']} error[/]",
            f"{gen_stats.fps if gen_stats else 0.0:.1f} fps" if gen_stats else "",
        )
        lat = gen_stats.latency_ms if gen_stats else {}
        lat_table = Table("stage", "p50 ms", "p99 ms", title="latency", expand=False)
        for stage in ("preprocess", "batch_wait", "infer", "postprocess", "total"):
            if stage in lat:
                lat_table.add_row(stage, f"{lat[stage]['p50']:.1f}", f"{lat[stage]['p99']:.1f}")
        truth = Table("", "truth: defective", "truth: good", title="verdicts vs truth")
        truth.add_row("rejected", str(c.true_reject), str(c.false_reject))
        truth.add_row("passed", str(c.escape), str(c.true_pass))
        rej = Table("seq", "verdict", "rule", "defects", "truth", "ms", title="last rejects")
        for r in rejects:
            rej.add_row(
                str(r["seq"]), r["verdict"], r["rule"], str(r["defects"]), r["truth"],
                f"{r['ms']:.0f}",
            )  # fmt: skip
        side = Table.grid(padding=(0, 2))
        side.add_row(lat_table, truth)
        parts: list[Any] = [Panel(top, title=self.title), side, rej]
        if not service.should_exit:
            parts.append(service.status_line())
        return Group(*parts)


def demo_config(
    model: Path, broker: tuple[str, int], protocol: str, state_dir: Path, parts: int | None
) -> StationConfig:
    """``DEMO_STATION`` with the model, broker, state folder and part count of this run."""
    card = load_card(model)
    data = json.loads(json.dumps(DEMO_STATION))
    data["model"]["path"] = str(model)
    cam = data["cameras"][0]
    cam.update({"height": card.input.height, "width": card.input.width})
    cam["channels"] = card.input.channels
    if parts is not None:
        cam["count"] = parts
    data["mqtt"].update({"host": broker[0], "port": broker[1], "protocol": protocol})
    data["health"]["address"] = "127.0.0.1:0"  # a running daemon may hold 9464
    data["daemon"] = {"state_dir": str(state_dir), "drain_timeout_s": 5.0}
    return parse_station_config(data, base=Path.cwd(), where="defectd demo", env={})


def run_demo(
    *,
    duration_s: float = 30.0,
    parts: int | None = None,
    model: Path | None = None,
    state_dir: Path | None = None,
    console: Console | None = None,
    live: bool = True,
    local_broker: bool = True,
    on_ready: Callable[[Service], None] | None = None,
) -> DemoSummary:
    """Run the demo station for ``duration_s`` seconds (from ready) or ``parts`` parts.

    ``local_broker=False`` skips the local broker and always starts the embedded one.
    Raises ``ModelError`` when the demo model cannot be found, ``PublishError`` when no
    broker can be reached or started.
    """
    model_path = find_demo_model(model)
    state = state_dir if state_dir is not None else Path.cwd() / "var" / "demo"
    embedded: EmbeddedBroker | None = None
    if local_broker and broker_reachable(*LOCAL_BROKER):
        broker, protocol, kind = LOCAL_BROKER, "5", "local"
    else:
        embedded = EmbeddedBroker()
        embedded.start()
        broker, protocol, kind = (embedded.host, embedded.port), "3.1.1", "embedded"
    counter: ResultCounter | None = None
    try:
        cfg = demo_config(model_path, broker, protocol, state, parts)
        counter = ResultCounter(
            broker[0],
            broker[1],
            f"{cfg.mqtt.topic_prefix}/{cfg.station}/+/result",
            mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        title = (
            f"defectd demo · model {model_path.parent.name} · broker {kind} {broker[0]}:{broker[1]}"
        )
        view = DemoView(title)
        out = console or Console()
        t0 = time.monotonic()
        holder: dict[str, Any] = {}

        def tick(service: Service) -> None:
            if service.ready and "ready" not in holder:
                holder["ready"] = True
                if service.http_url is not None:
                    out.print(f"operator view: {service.http_url}/")
                if on_ready is not None:
                    on_ready(service)
            display = holder.get("live")
            now = time.monotonic()
            if display is not None and now - holder.get("drawn", 0.0) >= 0.25:
                holder["drawn"] = now
                display.update(view.render(service))

        service = Service(
            cfg,
            notifier=SdNotifier({}),
            observers=[view.observe],
            on_tick=tick,
            max_runtime_s=duration_s,
            stop_after_results=parts,
        )
        if live:
            with Live(console=out, refresh_per_second=4, transient=False) as display:
                holder["live"] = display
                service.serve()
                display.update(view.render(service))
        else:
            service.serve()
        stats = service.final_stats
        engine = service.engine_info()
        time.sleep(0.3)  # the last acknowledged results reach the counter
        return DemoSummary(
            station=cfg.station,
            model=engine.model if engine else model_path.name,
            engine=engine.engine if engine else "",
            broker=f"{kind} {broker[0]}:{broker[1]} (MQTT {protocol})",
            duration_s=round(time.monotonic() - t0, 2),
            parts=sum(view.verdicts.values()),
            verdicts=dict(view.verdicts),
            fps=stats.fps if stats else 0.0,
            latency_ms=stats.latency_ms if stats else {},
            confusion=view.confusion.as_dict(),
            published_received=counter.count,
            outbox_left=service.outbox_left,
            archive_dir=str(cfg.archive.dir),
            rejects=list(view.rejects),
        )
    finally:
        if counter is not None:
            counter.close()
        if embedded is not None:
            embedded.stop()


def summary_table(summary: DemoSummary) -> Table:
    """The end-of-run summary as a rich table."""
    c = summary.confusion
    table = Table(title="defectd demo: summary", show_header=False)
    fps = f"{summary.fps:.1f} fps"
    outbox = f"outbox left: {summary.outbox_left}"
    rows = [
        ("model / engine", f"{summary.model} / {summary.engine}"),
        ("broker", summary.broker),
        ("parts inspected", f"{summary.parts} in {summary.duration_s:.1f} s ({fps})"),
        ("verdicts", ", ".join(f"{k} {v}" for k, v in summary.verdicts.items())),
        ("rejected: defective / good", f"{c['true_reject']:.0f} / {c['false_reject']:.0f}"),
        ("passed: defective / good", f"{c['escape']:.0f} / {c['true_pass']:.0f}"),
        ("accuracy", f"{c['accuracy']:.1%}"),
        ("escape rate (95% interval)", _rate(c, "escape_rate")),
        ("false-reject rate (95% interval)", _rate(c, "false_reject_rate")),
        ("latency p50 / p99 (grab to verdict)", _latency(summary, "total")),
        ("results received over MQTT", f"{summary.published_received} ({outbox})"),
        ("archive (fails + 2% of passes)", summary.archive_dir),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _rate(confusion: dict[str, float], key: str) -> str:
    low, high = confusion[f"{key}_low"], confusion[f"{key}_high"]
    return f"{confusion[key]:.1%} ({low:.1%} to {high:.1%})"


def _latency(summary: DemoSummary, stage: str) -> str:
    lat = summary.latency_ms.get(stage)
    return f"{lat['p50']:.1f} / {lat['p99']:.1f} ms" if lat else "-"
