"""``defectd run`` as systemd runs it: a subprocess with ``NOTIFY_SOCKET`` on a real unix
datagram socket, a real Mosquitto on a free port, a tiny real model and a synthetic camera.

Each test starts one daemon (a few seconds: Python, the runtimes, the model) and ends it with
SIGTERM, so the shutdown contract is checked every time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

DRAIN_TIMEOUT_S = 4.0
START_TIMEOUT_S = 60.0  # imports + model load on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifyListener:
    """The service manager's end of ``NOTIFY_SOCKET``: records every datagram with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def times(self, line: str) -> list[float]:
        with self._cond:
            return [t for t, m in self.messages if line in m.splitlines()]

    def wait_for(self, line: str, timeout: float, after: float = 0.0) -> float:
        """Time of the first datagram holding ``line`` (sent after ``after``)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(t > after for t in self.times(line)), timeout)
        assert ok, f"no {line} within {timeout} s; got {[m for _, m in self.messages][-5:]}"
        return next(t for t in self.times(line) if t > after)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class Daemon:
    """One ``defectd run`` subprocess with its notify socket, health address and log file."""

    def __init__(
        self,
        tmp: Path,
        config: Path,
        health_port: int,
        env: dict[str, str],
        hang_file: Path | None = None,
    ) -> None:
        self.notify = NotifyListener(tmp / "notify.sock")
        self.health = f"http://127.0.0.1:{health_port}"
        self.log_path = tmp / "daemon.log"
        full_env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify.path),
            "WATCHDOG_USEC": "1000000",
            **env,
        }
        full_env.pop("WATCHDOG_PID", None)
        full_env.pop("STATE_DIRECTORY", None)
        self._log = self.log_path.open("wb")
        # With a hang file: the same command, its engine blocking while the file exists.
        entry = ["-m", "defectd"]
        if hang_file is not None:
            entry = [str(Path(__file__).with_name("hanging_daemon.py")), str(hang_file)]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *entry,
                "--log-format",
                "json",
                "run",
                "--config",
                str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=full_env,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.health + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; returns the exit code and the seconds it took."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        self.notify.close()


def write_config(tmp: Path, model: Path, broker_port: int, health_port: int, **extra: str) -> Path:
    """A station with one synthetic 128x128 camera at 20 Hz and the tiny model."""
    sections = {
        "model": f'path = "{model}"\nbackend = "ort"\nthreads = 1\nwarmup = 1',
        "mqtt": f'host = "127.0.0.1"\nport = {broker_port}\nreconnect_min_s = 0.2\n'
        "reconnect_max_s = 0.5\nconnect_timeout_s = 2",
        "health": f'address = "127.0.0.1:{health_port}"',
        "daemon": f'state_dir = "{tmp / "state"}"\ndrain_timeout_s = {DRAIN_TIMEOUT_S}\n'
        "stall_timeout_s = 1.5\nstatus_interval_s = 1",
        "archive": "pass_sample = 0.0",
        "pipeline": "max_batch = 4\nmax_latency_ms = 2000",
    }
    sections.update(extra)
    text = 'station = "st1"\n\n[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\n'
    text += "rate_hz = 20\nheight = 128\nwidth = 128\nseed = 3\n\n"
    text += "\n\n".join(f"[{name}]\n{body}" for name, body in sections.items()) + "\n"
    path = tmp / "station.toml"
    path.write_text(text)
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(
        config: Path,
        health_port: int,
        env: dict[str, str] | None = None,
        hang_file: Path | None = None,
    ) -> Daemon:
        d = Daemon(tmp_path, config, health_port, env or {}, hang_file)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _results(collector: Any) -> list[dict[str, Any]]:
    return collector.payloads("/cam0/result")


def _assert_every_result_published(d: Daemon, collector: Any) -> None:
    (stopped,) = d.events("stopped")
    assert stopped["outbox_left"] == 0
    assert collector.wait_for(
        lambda msgs: len({p["result_id"] for p in _results(collector)}) >= stopped["results"],
        timeout=10,
    )
    seqs = sorted({p["seq"] for p in _results(collector)})
    assert seqs == list(range(seqs[0], seqs[0] + stopped["results"]))  # none missing


def test_ready_watchdog_health_metrics_and_clean_sigterm(
    tmp_path: Path, tiny_model: Path, mosquitto: Any, mqtt_collector: Any, daemon: Any
) -> None:
    broker = mosquitto()
    collector = mqtt_collector(broker.host, broker.port, "defectd/st1/#")
    health_port = free_port()
    d = daemon(write_config(tmp_path, tiny_model, broker.port, health_port), health_port)

    ready = d.notify.wait_for("READY=1", START_TIMEOUT_S)
    first_ping = d.notify.wait_for("WATCHDOG=1", 3, after=ready)
    second_ping = d.notify.wait_for("WATCHDOG=1", 3, after=first_ping)
    third_ping = d.notify.wait_for("WATCHDOG=1", 3, after=second_ping)
    assert third_ping - first_ping < 2.0  # every half WATCHDOG_USEC (1 s) while frames flow

    status, body = d.get("/healthz")
    assert status == 200, body
    health = json.loads(body)
    assert health["ready"] and health["checks"]["broker"]["connected"]
    assert health["checks"]["cameras"]["cam0"]["state"] == "streaming"
    first = _metric(d.get("/metrics")[1], 'defectd_frames_total{camera="cam0"}')
    time.sleep(0.6)
    metrics = d.get("/metrics")[1]
    assert _metric(metrics, 'defectd_frames_total{camera="cam0"}') > first
    assert "defectd_stage_latency_ms_bucket" in metrics
    # label order is the exposition library's (sorted), so look for the label, not the prefix
    assert re.search(r'^defectd_engine_info\{[^}]*\bmodel="tiny"', metrics, re.MULTILINE)

    code, took = d.terminate(timeout=DRAIN_TIMEOUT_S + 10)
    assert code == 0
    assert took < DRAIN_TIMEOUT_S + 3
    assert d.notify.times("STOPPING=1")
    _assert_every_result_published(d, collector)
    late = mqtt_collector(broker.host, broker.port, "defectd/st1/status")  # after the exit
    assert late.wait_for(lambda m: len(m) >= 1, timeout=5)
    assert late.messages[0].retain
    assert json.loads(late.messages[0].payload)["state"] == "offline"


def test_watchdog_stops_while_inference_hangs_and_resumes_after(
    tmp_path: Path, tiny_model: Path, mosquitto: Any, daemon: Any
) -> None:
    broker = mosquitto()
    health_port = free_port()
    hang = tmp_path / "hang"
    d = daemon(
        write_config(tmp_path, tiny_model, broker.port, health_port),
        health_port,
        hang_file=hang,
    )
    ready = d.notify.wait_for("READY=1", START_TIMEOUT_S)
    d.notify.wait_for("WATCHDOG=1", 3, after=ready)

    hang.touch()
    hung_at = time.monotonic()
    time.sleep(4.0)  # stall_timeout_s = 1.5: pings stop within ~2 s of the hang
    late = [t for t in d.notify.times("WATCHDOG=1") if t > hung_at + 2.2]
    assert late == []
    status, body = d.get("/healthz")
    assert status == 503
    assert not json.loads(body)["live"]
    assert any("pipeline stuck" in r for r in json.loads(body)["reasons"])

    hang.unlink()
    d.notify.wait_for("WATCHDOG=1", 5, after=time.monotonic())
    code, _ = d.terminate(timeout=DRAIN_TIMEOUT_S + 10)
    assert code == 0


def test_sighup_swaps_the_model_without_skipping_a_sequence_number(
    tmp_path: Path, tiny_model: Path, mosquitto: Any, mqtt_collector: Any, daemon: Any
) -> None:
    from defectd.model import ModelCard, UNet, UNetConfig, load_card
    from defectd.model.card import card_path
    from defectd.model.export import export_onnx

    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(tiny_model, live / "model.onnx")
    shutil.copy(card_path(tiny_model), card_path(live / "model.onnx"))
    staged = tmp_path / "staged" / "model.onnx"
    export_onnx(
        UNet(UNetConfig(base=4, depth=2)),
        ModelCard(name="tiny-b", input=load_card(tiny_model).input),
        staged,
    )

    broker = mosquitto()
    collector = mqtt_collector(broker.host, broker.port, "defectd/st1/#")
    health_port = free_port()
    d = daemon(write_config(tmp_path, live / "model.onnx", broker.port, health_port), health_port)
    ready = d.notify.wait_for("READY=1", START_TIMEOUT_S)
    assert collector.wait_for(lambda m: len(_results(collector)) >= 10, timeout=10)

    # Deploy the new model as an operator would: files replaced atomically, then SIGHUP.
    os.replace(card_path(staged), card_path(live / "model.onnx"))
    os.replace(staged, live / "model.onnx")
    d.proc.send_signal(signal.SIGHUP)
    reloading = d.notify.wait_for("RELOADING=1", 10, after=ready)
    d.notify.wait_for("READY=1", 20, after=reloading)
    assert collector.wait_for(
        lambda m: sum(p["model"]["name"] == "tiny-b" for p in _results(collector)) >= 10,
        timeout=10,
    )
    code, _ = d.terminate(timeout=DRAIN_TIMEOUT_S + 10)
    assert code == 0
    _assert_every_result_published(d, collector)

    by_seq = {p["seq"]: p["model"]["name"] for p in _results(collector)}
    names = [by_seq[s] for s in sorted(by_seq)]
    switch = names.index("tiny-b")
    assert names[:switch] == ["tiny"] * switch  # before: the old model
    assert names[switch:] == ["tiny-b"] * (len(names) - switch)  # after: the new one
    events = collector.payloads("/events")
    assert any(e["event"] == "model_reloaded" for e in events)


def test_unreachable_broker_at_start_runs_and_queues_until_it_comes(
    tmp_path: Path, tiny_model: Path, mosquitto: Any, daemon: Any
) -> None:
    port = free_port()  # nothing listens here yet
    health_port = free_port()
    d = daemon(write_config(tmp_path, tiny_model, port, health_port), health_port)
    d.notify.wait_for("READY=1", START_TIMEOUT_S)  # frames flow without a broker
    time.sleep(1.0)
    status, body = d.get("/healthz")
    assert status == 503
    assert "broker not connected (results wait in the outbox)" in json.loads(body)["reasons"]
    assert _metric(d.get("/metrics")[1], "defectd_outbox_depth") > 0

    mosquitto(port=port)
    deadline = time.monotonic() + 15
    while d.get("/healthz")[0] != 200:
        assert time.monotonic() < deadline, d.get("/healthz")[1]
        time.sleep(0.2)
    code, _ = d.terminate(timeout=DRAIN_TIMEOUT_S + 10)
    assert code == 0
    (stopped,) = d.events("stopped")
    assert stopped["outbox_left"] == 0
