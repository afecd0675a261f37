"""The line contract under faults: ``defectd plc-sim`` against ``defectd run`` on a real Mosquitto.

The station has one synthetic camera in line mode ``plc-trigger`` (``trigger = "request"``):
the simulated PLC sends ``--parts`` parts at ``--rate``/s, each with a trigger carrying its part
id, an absolute gate deadline (``--gate-ms`` after the trigger) and MQTT 5 correlation data;
the daemon fires the camera for each part and publishes the verdict; the PLC's reject gate
passes a part only on a pass verdict for it received before the gate. Meanwhile the bench
SIGKILLs the broker twice (down ``--outage`` s each), SIGSTOPs it for ``--stall`` s and SIGKILLs
the daemon once (restarted at once). Parts that meet a fault get no verdict in time and are
rejected (system rejects); no part may pass the gate without a pass verdict of its own
(system escape).

``--genicam`` runs the same against a GenICam camera instead: TLSimu.cti (genicam 1.5.0 wheel,
fetched with pip into the work folder; it has TriggerSoftware) or, with ``--producer viky``,
viky.cti (no TriggerSoftware node: the documented substitute ``request_substitute = true``
takes the next fresh frame), ``--parts`` triggers (default 500) without faults; it checks that
every trigger is paired with a frame and none is unpaired.

Output: with ``--json`` one JSON object line first; then the table of the six outcomes, the
trigger -> verdict latency (p50/p99) against the gate, the fault timeline, and as the last line
``system_escapes=N unpaired=M parts=K``. Exit 1 when a system escape or an unpaired frame or
verdict was seen.

    python bench/line.py --quick --json          # 5,000 parts at 25/s with the faults (~4 min)
    python bench/line.py --genicam --json        # 500 PLC triggers on TLSimu.cti
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from defectd.testing.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "line"
STATION = "bench"
CAMERA = "cam0"
SEED = 7
DEFECT_RATE = 0.3


def defectd(*args: str) -> list[str]:
    return [sys.executable, "-m", "defectd", *args]


def tlsimu(work: Path) -> Path:
    """TLSimu.cti (+ libVirtualFG.so) unpacked from the genicam 1.5.0 wheel into ``work``."""
    folder = work / "tlsimu"
    folder.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "genicam==1.5.0", "--no-deps",
         "--only-binary=:all:", "-d", str(folder), "-q"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = folder.glob("genicam-1.5.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(("/TLSimu.cti", "/libVirtualFG.so")):
                (folder / Path(name).name).write_bytes(zf.read(name))
    return folder / "TLSimu.cti"


def camera_table(args: argparse.Namespace, work: Path) -> str:
    if not args.genicam:
        return (
            f'type = "synthetic"\ncamera = "{CAMERA}"\ntrigger = "request"\n'
            f"height = {args.size}\nwidth = {args.size}\nseed = {SEED}\n"
            f"defect_rate = {DEFECT_RATE}\n"
        )
    if args.producer == "viky":
        import genicam

        cti = Path(genicam.__file__).parent / "viky.cti"
        nodes = '{ Width = 256, Height = 256, PixelFormat = "Mono8", AcquisitionFrameRate = 200.0 }'
        extra = "request_substitute = true\n"
    else:
        cti = tlsimu(work)
        nodes = "{ Width = 256, Height = 256 }"
        extra = ""
    return (
        f'type = "genicam"\ncamera = "{CAMERA}"\nproducers = ["{cti}"]\n'
        f'device = {{ index = 0 }}\nnodes = {nodes}\ntrigger = "request"\n{extra}'
        f"fetch_timeout_s = 1.0\n"
    )


def station_config(args: argparse.Namespace, work: Path, broker: Mosquitto) -> Path:
    path = work / "station.toml"
    path.write_text(
        f'station = "{STATION}"\n'
        f'[model]\npath = "{args.model}"\nbackend = "{args.backend}"\n'
        f'precision = "{args.precision}"\nthreads = 1\n'
        f"[[cameras]]\n{camera_table(args, work)}"
        f'[cameras.line]\nmode = "plc-trigger"\nframe_timeout_ms = {args.gate_ms * 0.8:g}\n'
        f"[pipeline]\nmax_batch = 2\nmax_delay_ms = 2.0\nmax_latency_ms = {args.gate_ms:g}\n"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{PREFIX}"\n'
        f"reconnect_min_s = 0.1\nreconnect_max_s = 1.0\nkeepalive_s = 5\n"
        f"[archive]\nenabled = false\n[health]\nenabled = false\n"
        f'[daemon]\nstate_dir = "{work / "state"}"\ndrain_timeout_s = 5\ncamera_idle_ok = true\n'
    )
    return path


class Daemon:
    """``defectd run`` as a child process; its log goes to ``work/daemon-<n>.log``."""

    def __init__(self, config: Path, work: Path) -> None:
        self._config = config
        self._work = work
        self._n = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path = work / "daemon-0.log"

    def start(self, timeout_s: float = 120.0) -> float:
        """Start and wait until its trigger subscriber is connected; returns the seconds taken."""
        t0 = time.monotonic()
        self._n += 1
        self.log = self._work / f"daemon-{self._n}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                defectd("--log-format", "json", "run", "--config", str(self._config)),
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        while time.monotonic() - t0 < timeout_s:
            if b"trigger_listener_connected" in self.log.read_bytes():
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the daemon exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise SystemExit(f"error: the daemon did not connect in {timeout_s:g} s ({self.log})")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def faults(
    args: argparse.Namespace, broker: Mosquitto, daemon: Daemon, t0: float, log: list[str]
) -> None:
    """The fault timeline, as fractions of the run: broker SIGKILL, SIGSTOP, daemon SIGKILL,
    broker SIGKILL."""
    run_s = args.parts / args.rate

    def at(fraction: float) -> None:
        time.sleep(max(0.0, t0 + fraction * run_s - time.monotonic()))

    def note(what: str) -> None:
        log.append(f"t={time.monotonic() - t0:6.1f} s  {what}")

    at(0.15)
    note(f"broker SIGKILL, down {args.outage:g} s")
    broker.kill()
    time.sleep(args.outage)
    broker.start()
    note("broker back")
    at(0.35)
    note(f"broker SIGSTOP {args.stall:g} s")
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    time.sleep(args.stall)
    os.kill(pid, signal.SIGCONT)
    note("broker SIGCONT")
    at(0.55)
    note("daemon SIGKILL, restarted at once")
    daemon.kill()
    took = daemon.start()
    note(f"daemon back (trigger subscriber connected after {took:.1f} s)")
    at(0.75)
    note(f"broker SIGKILL, down {args.outage:g} s")
    broker.kill()
    time.sleep(args.outage)
    broker.start()
    note("broker back")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine() -> dict[str, Any]:
    model = "?"
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load": list(os.getloadavg())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5,000 parts at 25/s (the default)")
    p.add_argument("--json", action="store_true", help="one JSON object line before the table")
    p.add_argument("--parts", type=int, default=None)
    p.add_argument("--rate", type=float, default=25.0, help="parts per second")
    p.add_argument("--gate-ms", type=float, default=1000.0, help="trigger -> gate")
    p.add_argument("--outage", type=float, default=2.0, help="seconds a killed broker stays down")
    p.add_argument("--stall", type=float, default=10.0, help="seconds of broker SIGSTOP")
    p.add_argument("--size", type=int, default=256, help="synthetic frame size")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo" / "model.onnx")
    p.add_argument("--backend", default="openvino")
    p.add_argument(
        "--precision", default=None, help="default: bf16 where the CPU has it, else fp32"
    )
    p.add_argument("--no-faults", action="store_true")
    p.add_argument("--genicam", action="store_true", help="GenICam camera, no faults")
    p.add_argument("--producer", choices=("tlsimu", "viky"), default="tlsimu")
    p.add_argument("--work", type=Path, default=None, help="keep logs here (default: a temp dir)")
    args = p.parse_args()
    if args.parts is None:
        args.parts = 500 if args.genicam else 5000
    if args.precision is None:
        args.precision = "bf16" if cpu_has_bf16() else "fp32"
    with_faults = not (args.no_faults or args.genicam)

    with tempfile.TemporaryDirectory(prefix="defectd-line-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        broker = Mosquitto(work / "broker")
        broker.start()
        daemon = Daemon(station_config(args, work, broker), work)
        timeline: list[str] = []
        try:
            startup_s = daemon.start()
            timeline.append(f"daemon ready for triggers after {startup_s:.1f} s")
            sim_cmd = defectd(
                "plc-sim", "--json", "--host", broker.host, "--port", str(broker.port),
                "--prefix", PREFIX, "--station", STATION, "--camera", CAMERA,
                "--rate", str(args.rate), "--parts", str(args.parts),
                "--gate-ms", str(args.gate_ms), "--seed", str(SEED),
                "--defect-rate", str(DEFECT_RATE), "--run-id", "b",
                *(["--no-truth"] if args.genicam else []),
            )  # fmt: skip
            t0 = time.monotonic()
            sim = subprocess.Popen(sim_cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            fault_thread = None
            if with_faults:
                fault_thread = threading.Thread(
                    target=faults, args=(args, broker, daemon, t0, timeline), daemon=True
                )
                fault_thread.start()
            out, _ = sim.communicate()
            if fault_thread is not None:
                fault_thread.join(60)
        finally:
            daemon.stop()
            broker.close()
        lines = out.decode().splitlines()
        report = json.loads(lines[0])
        report["machine"] = machine()
        report["faults"] = timeline
        report["mode"] = f"genicam-{args.producer}" if args.genicam else "synthetic"
        report["rate_hz"] = args.rate
        report["engine"] = f"{args.backend}-{args.precision}"
        if args.json:
            print(json.dumps(report, separators=(",", ":")))
        print("\n".join(lines[1:-1]))
        for line in timeline:
            print(f"  {line}")
        print(
            f"machine: {report['machine']['cpu']}, load "
            f"{' '.join(f'{x:.2f}' for x in report['machine']['load'])}"
        )
        print(lines[-1])
        return 0 if report["system_escapes"] == 0 and report["unpaired"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
