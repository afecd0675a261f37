"""Fault benchmark: the real daemon, a real broker, a model that rejects, and what users hit.

For each fault a fresh Mosquitto (free port, persistence on) and a fresh state directory; the
daemon is ``defectd run`` (a subprocess) with a synthetic line and a tiny U-Net trained in a few
seconds to find bright spots (it rejects a share of the parts: the reject path is under fault
too). A subscriber with a persistent session (QoS 1) counts every result and reject. The bench
polls ``/healthz`` and listens on a notify socket (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``) for
the daemon's ``WATCHDOG=1`` pings.

Faults (each after production started):

- ``broker_sigkill_x3``: the broker is SIGKILLed three times, down ``--outage`` s each;
- ``broker_sigstop_20s``: the broker is frozen (SIGSTOP) for 20 s, then SIGCONT;
- ``daemon_sigkill``: the daemon is SIGKILLed and started again on the same state;
- ``disk_full``: the state directory is a small tmpfs that a filler fills (and keeps full) for
  ``--full-s`` s, then frees; without permission to mount, a documented substitute: the filler
  cannot be made, and the row says ``skipped``;
- ``outbox_corrupt``: a clean run, a page of the outbox file overwritten between runs, a start
  that must refuse (exit 2, naming the file), the file moved aside as the message says, a new run.

Per fault: ``produced`` (verdicts the daemon gave: durable ids in its result ledger plus
``not_durable`` ones), ``delivered`` (of those, received), ``lost``, ``duplicates`` (result
messages received more than once), ``rejects_delivered``, ``not_durable`` (verdicts sent
directly because the outbox could not store them), ``stops_delivery`` (the fault stops durable
delivery for a while), ``health_reported`` (``/healthz`` answered 503 naming the fault, or the
daemon refused to start naming it, or could not be reached while killed), ``watchdog_withheld``
(no ``WATCHDOG=1`` for more than two intervals during the fault).

    python bench/faults.py [--quick] [--json]

The last line is ``lost=N results=M health_reported_all=true|false`` (with ``--json`` stdout
also has one JSON object before it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import cpu_model
from defectd.testing.disk import FullDisk
from defectd.testing.mosquitto import Mosquitto
from defectd.testing.notify import NotifySocket

PREFIX = "faults"
STATION = "line1"
SIZE = 32
WATCHDOG_S = 1.0


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_model(out: Path) -> Path:
    """A U-Net (base 4, depth 2, 1x32x32) trained for a few seconds on bright discs over noise:
    on the synthetic line it rejects a share of the parts."""
    import numpy as np
    import torch

    from defectd.model import ModelCard, UNet, UNetConfig
    from defectd.model.export import export_onnx

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    card = ModelCard(name="faults-tiny", input={"channels": 1, "height": SIZE, "width": SIZE})  # type: ignore[arg-type]
    net = UNet(UNetConfig(base=4, depth=2))
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))
    torch.set_num_threads(1)
    for _ in range(60):
        images = rng.normal(0.45, 0.08, size=(8, 1, SIZE, SIZE)).astype(np.float32)
        masks = np.zeros_like(images)
        for i in range(8):
            for _ in range(rng.integers(0, 3)):
                cy, cx = rng.integers(4, SIZE - 4, size=2)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(2.0, 5.0) ** 2
                masks[i, 0][disc] = 1.0
                images[i, 0][disc] += 0.35
        x = torch.from_numpy(card.normalisation.apply(np.clip(images, 0, 1) * 255.0))
        loss = loss_fn(net(x), torch.from_numpy(masks))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    export_onnx(net, card, out)
    return out


class Subscriber:
    """A QoS 1 subscriber with a persistent session: counts results (with duplicates), rejects
    and ``not_durable`` rejects by result id."""

    def __init__(self, broker: Mosquitto, client_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.results: Counter[str] = Counter()
        self.rejects: set[str] = set()
        self.not_durable: set[str] = set()
        self.last = time.monotonic()
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.reconnect_delay_set(0.1, 0.5)
        self._client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/#", qos=1)
        self._client.on_subscribe = lambda *a: self.subscribed.set()
        self._client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self._client.connect(broker.host, broker.port, 30, clean_start=False, properties=props)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        kind = payload.get("kind")
        rid = payload.get("result_id")
        with self._lock:
            self.last = time.monotonic()
            if kind == "result" and rid:
                self.results[rid] += 1
            elif kind == "reject" and rid:
                self.rejects.add(rid)
                if payload.get("not_durable"):
                    self.not_durable.add(rid)

    def snapshot(self) -> tuple[Counter[str], set[str], set[str]]:
        with self._lock:
            return Counter(self.results), set(self.rejects), set(self.not_durable)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class HealthPoller:
    """Polls ``/healthz`` every 0.25 s: (time, status, reasons); status 0 = unreachable."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.samples: list[tuple[float, int, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            status, reasons = 0, []
            try:
                with urllib.request.urlopen(self.url, timeout=1.0) as resp:
                    status, reasons = resp.status, json.loads(resp.read()).get("reasons", [])
            except urllib.error.HTTPError as exc:
                status = exc.code
                with contextlib.suppress(ValueError):
                    reasons = json.loads(exc.read()).get("reasons", [])
            except (OSError, ValueError):
                pass
            self.samples.append((time.monotonic(), status, reasons))
            self._stop.wait(0.25)

    def reported(self, t0: float, t1: float, words: tuple[str, ...]) -> bool:
        """A 503 naming one of ``words`` (or no answer at all when ``words`` is empty)."""
        for t, status, reasons in self.samples:
            if not t0 <= t <= t1:
                continue
            if not words and status == 0:
                return True
            if status == 503 and any(w in r for r in reasons for w in words):
                return True
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)


class Station:
    """One fault's daemon: config, state directory, ledger, log; ``start``/``wait``/``kill``."""

    def __init__(self, work: Path, broker: Mosquitto, model: Path, state: Path, rate: float):
        self.work, self.state = work, state
        self.health_port = free_port()
        self.ledger = work / "ids.txt"
        self.log = work / "daemon.log"
        self.notify = NotifySocket(work / "notify.sock")
        self.config = work / "station.toml"
        self.config.write_text(
            f'station = "{STATION}"\n'
            f'[model]\npath = "{model}"\nbackend = "ort"\nthreads = 1\nwarmup = 1\n'
            f'cache_dir = "{work / "cache"}"\n'
            f'[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\nrate_hz = {rate}\n'
            f"height = {SIZE}\nwidth = {SIZE}\ndefect_rate = 0.4\ncount = COUNT\n"
            f"[pipeline]\nmax_latency_ms = 0\ntile_overlap_px = 0\n"
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{PREFIX}"\n'
            f"reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
            f"[outbox]\nreserve_bytes = 262144\n"
            f'[archive]\nenabled = false\n[health]\naddress = "127.0.0.1:{self.health_port}"\n'
            f'[daemon]\nstate_dir = "{state}"\nexit_when_sources_end = true\n'
            f'result_ledger = "{self.ledger}"\ndrain_timeout_s = 60\nstop_timeout_s = 120\n'
            f"max_result_age_s = 5\ndisk_warn_free_bytes = 1048576\n"
            # every result_not_stored line logged: the bench counts not_durable verdicts by id
            f"log_burst = 1000000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.results_total = 0  # from each run's "stopped" line
        self.exits: list[int] = []

    def start(self, count: int) -> None:
        cfg = self.config.read_text()
        self.config.with_name("run.toml").write_text(cfg.replace("COUNT", str(count)))
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify.path),
            "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
        }
        cmd = [sys.executable, "-m", "defectd", "--log-format", "json", "--log-level", "info",
               "run", "--config", str(self.config.with_name("run.toml"))]  # fmt: skip
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self.exits.append(rc)
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.exits.append(self.proc.wait())

    def produced_ids(self) -> list[str]:
        if not self.ledger.exists():
            return []
        return [x for x in self.ledger.read_text().splitlines() if len(x) == 32]

    def wait_produced(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.produced_ids()) < n:
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                raise SystemExit(f"the daemon did not produce {n} results; see {self.log}")
            time.sleep(0.05)

    def not_durable_ids(self) -> set[str]:
        ids: set[str] = set()
        for line in self.log.read_text(errors="replace").splitlines():
            if '"result_not_stored"' in line:
                try:
                    rid = json.loads(line).get("result_id")
                except ValueError:
                    continue
                if rid:
                    ids.add(rid)
        return ids

    def verdicts_logged(self) -> int:
        """Verdicts over all runs that ended cleanly (each run's ``stopped`` line)."""
        total = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if '"event": "stopped"' in line:
                total += int(json.loads(line).get("results") or 0)
        return total


def settle(sub: Subscriber, want: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, _, _ = sub.snapshot()
        if want <= set(got) and time.monotonic() - sub.last > 1.0:
            return
        time.sleep(0.1)


def scenario(
    name: str,
    base: Path,
    model: Path,
    rate: float,
    body: Callable[[Station, Mosquitto, Path], dict[str, Any]],
    *,
    state_dir: Callable[[Path], Path] | None = None,
) -> dict[str, Any]:
    work = base / name
    work.mkdir()
    broker = Mosquitto(work / "broker")
    broker.start()
    sub = Subscriber(broker, f"faults-sub-{name}")
    if not sub.subscribed.wait(10) or not broker.wait_saved(10):
        raise SystemExit("subscriber could not subscribe")
    state = state_dir(work) if state_dir is not None else work / "state"
    station = Station(work, broker, model, state, rate)
    health = HealthPoller(station.health_port)
    t0 = time.monotonic()
    try:
        row = body(station, broker, work)
        durable = set(station.produced_ids())
        not_durable = station.not_durable_ids()
        logged = station.verdicts_logged()
        settle(sub, durable | not_durable)
    finally:
        health.close()
        station.notify.close()
        sub.close()
        broker.close()
    got, rejects, nd_rejects = sub.snapshot()
    produced = durable | not_durable
    window = row.pop("window")
    words = row.pop("words")
    reported = row.pop("reported", None)
    if reported is None:
        reported = health.reported(window[0], window[1], words)
    row = {
        "fault": name,
        "produced": len(produced),
        "delivered": len(produced & set(got)),
        "lost": len(produced - set(got)),
        "duplicates": sum(n - 1 for n in got.values() if n > 1),
        "rejects_delivered": len(rejects),
        "not_durable": len(not_durable),
        "not_durable_rejects_delivered": len(nd_rejects),
        # The daemon's own count over the runs that ended cleanly (a SIGKILLed run has none).
        "verdicts_logged": logged,
        **row,
        "health_reported": bool(reported),
        "watchdog_withheld": station.notify.max_gap(*window) > 2 * WATCHDOG_S,
        "daemon_exits": station.exits,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    _log(json.dumps(row))
    return row


# -- the faults ------------------------------------------------------------------------------
def _broker_fault(
    count: int, words: tuple[str, ...], disturb: Callable[[Mosquitto], None]
) -> Callable[[Station, Mosquitto, Path], dict]:
    """A fault on the broker: a tenth of ``count`` into the run, ``disturb`` it; the window is
    how long that took, and the daemon's log must say one of ``words``."""

    def body(st: Station, broker: Mosquitto, work: Path) -> dict[str, Any]:
        st.start(count)
        st.wait_produced(count // 10)
        t0 = time.monotonic()
        disturb(broker)
        t1 = time.monotonic()
        st.wait(300)
        return {"stops_delivery": True, "window": (t0, t1), "words": words}

    return body


def broker_sigkill(count: int, outage: float) -> Callable[[Station, Mosquitto, Path], dict]:
    def disturb(broker: Mosquitto) -> None:
        for _ in range(3):
            broker.kill()
            time.sleep(outage)
            broker.start()
            time.sleep(outage)

    return _broker_fault(count, ("broker not connected",), disturb)


def broker_sigstop(count: int, frozen: float) -> Callable[[Station, Mosquitto, Path], dict]:
    def disturb(broker: Mosquitto) -> None:
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        time.sleep(frozen)
        os.kill(broker.pid, signal.SIGCONT)

    return _broker_fault(count, ("broker is hung or slow", "broker not connected"), disturb)


def daemon_sigkill(count: int) -> Callable[[Station, Mosquitto, Path], dict]:
    def body(st: Station, broker: Mosquitto, work: Path) -> dict[str, Any]:
        st.start(count)
        st.wait_produced(count // 3)
        t0 = time.monotonic()
        st.kill()
        time.sleep(1.0)
        st.start(count)
        st.wait_produced(len(st.produced_ids()) + 10)
        t1 = time.monotonic()
        st.wait(300)
        # While it is dead nothing answers /healthz: an orchestrator sees it as down.
        return {"stops_delivery": True, "window": (t0, t1), "words": ()}

    return body


def disk_full(count: int, full_s: float) -> Callable[[Station, Mosquitto, Path], dict]:
    def body(st: Station, broker: Mosquitto, work: Path) -> dict[str, Any]:
        st.start(count)
        st.wait_produced(count // 5)
        disk = FullDisk(st.state / "filler")
        t0 = time.monotonic()
        disk.start()
        time.sleep(full_s)
        disk.stop()
        t1 = time.monotonic() + 1.0
        st.wait(300)
        return {"stops_delivery": True, "window": (t0, t1), "words": ("not stored durably",)}

    return body


def outbox_corrupt(count: int) -> Callable[[Station, Mosquitto, Path], dict]:
    def body(st: Station, broker: Mosquitto, work: Path) -> dict[str, Any]:
        st.start(count)
        st.wait(300)  # a clean run: everything delivered, the outbox file stays
        outbox = st.state / "outbox.sqlite"
        rng = random.Random(11)
        with open(outbox, "r+b") as fh:  # one page of the outbox table overwritten
            fh.seek(4096)
            fh.write(rng.randbytes(4096))
        t0 = time.monotonic()
        st.start(count)
        rc = st.wait(120)
        text = st.log.read_text(errors="replace")
        refused = rc == 2 and f"outbox {outbox} is damaged" in text and "forensics" in text
        # What the message says to do: keep the file aside, start again with a new outbox.
        outbox.rename(outbox.with_name("outbox.sqlite.damaged"))
        for extra in ("-wal", "-shm"):
            outbox.with_name(outbox.name + extra).unlink(missing_ok=True)
        st.start(count)
        st.wait(300)
        t1 = time.monotonic()
        return {
            "stops_delivery": True,
            "window": (t0, t1),
            "words": (),
            "reported": refused,
            "refused_start_exit": rc,
        }

    return body


def mount_tmpfs(where: Path, size: int) -> Path | None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return where if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about 5,000 results in all")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--rate", type=float, default=100.0, help="parts per second")
    ap.add_argument("--outage", type=float, default=2.0, help="seconds a killed broker is down")
    ap.add_argument("--full-s", type=float, default=4.0, help="seconds the disk stays full")
    args = ap.parse_args(argv)
    n = 1100 if args.quick else 3000
    rate = args.rate
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    mounts: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="defectd-faults-") as tmp:
        base = Path(tmp)
        model = train_model(base / "model" / "model.onnx")
        try:
            rows.append(scenario("broker_sigkill_x3", base, model, rate,
                                 broker_sigkill(n, args.outage)))  # fmt: skip
            stop_n = max(n, int(rate * 30))
            rows.append(scenario("broker_sigstop_20s", base, model, rate,
                                 broker_sigstop(stop_n, 20.0)))  # fmt: skip
            rows.append(scenario("daemon_sigkill", base, model, rate, daemon_sigkill(n)))
            probe = mount_tmpfs(base / "probe", 1 << 20)
            if probe is not None:
                subprocess.run(["umount", str(probe)], check=False)

                def tmpfs_state(work: Path) -> Path:
                    where = mount_tmpfs(work / "state", 8 << 20)
                    assert where is not None
                    mounts.append(where)
                    return where

                rows.append(scenario("disk_full", base, model, rate,
                                     disk_full(n, args.full_s), state_dir=tmpfs_state))  # fmt: skip
            else:
                rows.append({"fault": "disk_full", "skipped": "cannot mount a tmpfs here (needs "
                             "root): run as root, or put the state directory on a small "
                             "filesystem and fill it"})  # fmt: skip
            rows.append(scenario("outbox_corrupt", base, model, rate, outbox_corrupt(n // 2)))
        finally:
            for where in mounts:
                subprocess.run(["umount", "-l", str(where)], check=False)
    ran = [r for r in rows if "skipped" not in r]
    lost = sum(r["lost"] for r in ran)
    results = sum(r["produced"] for r in ran)
    reported_all = all(r["health_reported"] for r in ran if r["stops_delivery"])
    report = {
        "rows": rows,
        "results": results,
        "lost": lost,
        "health_reported_all": reported_all,
        "rate": rate,
        "wall_s": round(time.monotonic() - started, 1),
        "cpu": cpu_model(),
        "load": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        cols = ("fault", "produced", "delivered", "lost", "duplicates", "rejects_delivered",
                "not_durable", "health_reported", "watchdog_withheld")  # fmt: skip
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r.get(c, r.get("skipped", ""))) for c in cols))
    print(
        f"lost={lost} results={results} health_reported_all={str(reported_all).lower()}",
        flush=True,
    )
    return 0 if lost == 0 and reported_all else 1


if __name__ == "__main__":
    sys.exit(main())
